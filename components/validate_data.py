from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def validate_data(
    raw: Input[Dataset],
    report: Output[HTML],
    results: Output[Metrics],
) -> NamedTuple("ValidationOutputs", passed=bool, summary=str):
    """Checks the raw events and items against their Great Expectations contracts.

    The step itself succeeds either way, so the HTML report is kept as an artifact; the
    pipeline branches on `passed` and stops the run before training when it is false.

    Args:
        raw: RAW folder from ingest.
        report: Output HTML page with every expectation, failed ones first in the summary.
        results: Output metrics: rows validated per contract, number of failed expectations.

    Returns:
        passed: True when every expectation of both contracts holds.
        summary: The readable report (which expectation failed, on how many rows, examples).
    """
    import shutil
    import tempfile
    from collections import namedtuple

    from unipinrec import steps

    with tempfile.TemporaryDirectory() as tmp:
        out = steps.validate_raw(raw.path, tmp)
        shutil.copyfile(out["html"], report.path)
    for contract, rows in out["rows"].items():
        results.log_metric(f"rows_{contract}", rows)
    results.log_metric("failed_expectations", out["failed_expectations"])
    steps.save_metrics(results)
    print(out["summary"])
    return namedtuple("ValidationOutputs", ["passed", "summary"])(out["passed"], out["summary"])
