from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def build_index(
    model: Input[Model],
    examples: Input[Dataset],
    index: Output[Artifact],
    stats: Output[Metrics],
):
    """Builds the faiss item index of the model's retrieval vectors, tuned to a recall target.

    Args:
        model: Model folder (unified).
        examples: Examples folder: test histories give the held-out queries, train counts the popularity.
        index: Output index folder (index.faiss, ids.npy, popularity.npy, meta.json with model_version).
        stats: Output metrics: recall@K against exact search, build and query time.
    """
    from unipinrec import steps

    report = steps.build_index(model.path, examples.path, index.path)
    for key, value in report.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            stats.log_metric(key, value)
        elif isinstance(value, str):
            index.metadata[key] = value
    steps.save_metrics(stats)
