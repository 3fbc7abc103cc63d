from typing import List

from kfp import dsl

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def bucket_ids(buckets: int) -> List[int]:
    """The user-hash buckets the example build fans out over (one build_examples pod each).

    Args:
        buckets: How many buckets; at least 1.
    """
    from unipinrec import steps

    return steps.bucket_ids(buckets)
