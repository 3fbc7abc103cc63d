from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def merge_examples(
    parts: Input[List[Dataset]],
    examples: Output[Dataset],
    report: Output[HTML],
    stats: Output[Metrics],
):
    """Assembles the buckets of the parallel example build into one examples folder and checks it.

    The folder is the one the one-process build writes (same records, same order); it must pass
    the `examples` contract.

    Args:
        parts: Every bucket's folder from build_examples (dsl.Collected over the ParallelFor).
        examples: Output examples folder (train/, valid/, test/, items/, meta.json).
        report: Output HTML report of the examples contract.
        stats: Output metrics: examples per split, histories that differ from the builder's rule, buckets.
    """
    import shutil
    import tempfile

    from unipinrec import steps

    with tempfile.TemporaryDirectory() as tmp:
        out = steps.merge_examples([p.path for p in parts], examples.path, report_dir=tmp)
        shutil.copyfile(out["html"], report.path)
    for split, n in out["splits"].items():
        stats.log_metric(f"examples_{split}", n)
        examples.metadata[f"examples_{split}"] = n
    stats.log_metric("history_differs_from_builder", out["history_differs_from_builder"])
    stats.log_metric("buckets", out["buckets"])
    steps.save_metrics(stats)
