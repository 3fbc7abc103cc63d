"""The whole pipeline on kfp's local runner (SubprocessRunner, this environment) on tiny data:
it builds the examples in 2 user-hash buckets (ParallelFor) and merges them into the one-process
build, trains, gates, packages and deploys; a corrupted input stops the run at validation, with
the failed expectations in the report, and leaves the deployed model untouched."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from unipinrec import format as fmt

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = ["ingest", "validate-data", "build-features", "bucket-ids", "build-examples", "merge-examples", "train",
         "evaluate", "gate", "build-index", "package", "deploy"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_config_text):
    from pipelines.run import run_local

    root = tmp_path_factory.mktemp("local-run")
    deploy_dir = root / "deploy"
    args = {"config_yaml": tiny_config_text, "deploy_dir": str(deploy_dir), "example_buckets": 2}
    result = run_local(args, pipeline_root=root / "pipeline", caching=True)
    return root, deploy_dir, result


def test_pipeline_runs_end_to_end_and_deploys(first_run):
    root, deploy_dir, result = first_run
    assert result.status == "SUCCESS", (result.error, result.log.read_text()[-3000:])
    assert [s for s in STEPS if result.steps.get(s) and result.steps[s].status == "SUCCESS"] == STEPS
    assert "stop-run" not in result.steps or result.steps["stop-run"].status == "SKIPPED"

    model_dir = result.artifact("train", "model")
    version = json.loads((model_dir / "meta.json").read_text())["model_version"]
    current = json.loads((deploy_dir / "current.json").read_text())
    assert current["model_version"] == version and current["previous"] is None
    assert (deploy_dir / "model_store" / f"unipinrec-{version}.mar").stat().st_size > 10_000
    assert (deploy_dir / "features" / "current" / "data" / "online_store.db").exists()
    events = [json.loads(line)["event"] for line in (deploy_dir / "history.jsonl").read_text().splitlines()]
    assert events == ["gate", "deploy"]

    # the reports a user opens
    assert "PASSED" in result.artifact("validate-data", "report").read_text()
    evaluation_page = result.artifact("evaluate", "report").read_text()
    assert "Retrieval" in evaluation_page and "data:image/png;base64" in evaluation_page
    evaluation = json.loads((result.artifact("evaluate", "evaluation") / "evaluation.json").read_text())
    assert evaluation["model_version"] == version and "HR@10" in evaluation["retrieval"]
    assert current["evaluation"]["model_version"] == version

    # the examples the model trained on came from Feast, equal to the builder's rule
    ex_meta = fmt.read_meta(result.artifact("merge-examples", "examples"))
    assert ex_meta["history_source"] == "feast:unipinrec_v1"
    assert all(v["history_differs_from_builder"] == 0 for v in ex_meta["feast"].values())


def test_the_buckets_built_in_parallel_merge_into_the_one_process_build(first_run, tmp_path, tiny_config_text):
    from unipinrec import steps

    _, _, result = first_run
    parts = sorted(result.run_dir.glob("for-loop-*-iteration-*/build-examples/examples"))
    assert [fmt.read_meta(p)["bucket"] for p in parts] == [0, 1]  # the ParallelFor ran one task per bucket
    merged = result.artifact("merge-examples", "examples")
    assert fmt.read_meta(merged)["parallel_build"] == {"buckets": 2}
    one = tmp_path / "one"
    steps.build_examples(result.artifact("ingest", "raw"), result.artifact("build-features", "feature_repo"), one,
                         config_yaml=tiny_config_text)
    for split in fmt.SPLITS:
        assert fmt.read_sharded(merged / split).equals(fmt.read_sharded(one / split)), split
        sizes = [fmt.count_rows(p / split) for p in parts]
        assert all(sizes) and sum(sizes) == fmt.count_rows(one / split)


def test_the_archive_reads_histories_from_the_deployed_feature_store(first_run):
    import zipfile

    _, deploy_dir, _ = first_run
    current = json.loads((deploy_dir / "current.json").read_text())
    with zipfile.ZipFile(deploy_dir / "model_store" / current["mar"]) as z:
        spec = json.loads(z.read("serving.json"))
    assert spec["model_version"] == current["model_version"]
    assert spec["store"] == {"factory": "unipinrec.features:online_store",
                             "kwargs": {"repo_dir": str(deploy_dir.resolve() / "features" / "current"),
                                        "env": "local"}}
    from unipinrec.features import online_store

    store = online_store(**spec["store"]["kwargs"])
    (h,) = store.get_histories([1])
    assert h is not None and len(h) > 0 and np.all(np.diff(h.ts) >= 0)


def _corrupt(src, dst):
    """A copy of a RAW folder whose events carry an unknown action and negative timestamps."""
    import shutil

    shutil.copytree(src, dst)
    table = fmt.read_sharded(dst / "events")
    action = table.column("action").to_numpy().copy()
    ts = table.column("ts").to_numpy().copy()
    action[::50] = 42
    ts[1::97] = -5
    table = table.set_column(table.schema.get_field_index("action"), "action", pa.array(action, pa.int8()))
    table = table.set_column(table.schema.get_field_index("ts"), "ts", pa.array(ts, pa.int64()))
    fmt.write_sharded(dst / "events", table, fmt.EVENTS_SCHEMA)


def test_corrupted_input_stops_at_validation_and_keeps_the_deployed_model(first_run, tiny_config_text):
    from pipelines.run import run_local

    root, deploy_dir, first = first_run
    assert first.status == "SUCCESS"
    bad_raw = root / "bad_raw"
    _corrupt(first.artifact("ingest", "raw"), bad_raw)
    before = {p.name: p.read_bytes() for p in deploy_dir.iterdir() if p.is_file()}
    store_before = sorted(p.name for p in (deploy_dir / "model_store").iterdir())

    result = run_local({"config_yaml": tiny_config_text, "deploy_dir": str(deploy_dir), "source": "raw",
                        "data_path": str(bad_raw), "seed": 5}, pipeline_root=root / "pipeline-bad", caching=True)
    assert result.status == "FAILURE"
    assert "stop-run" in result.error
    ran = {n for n, s in result.steps.items() if s.status in ("SUCCESS", "FAILURE")}
    assert ran == {"ingest", "validate-data", "stop-run"}, result.steps
    assert result.steps["stop-run"].status == "FAILURE"

    page = result.artifact("validate-data", "report").read_text()
    assert "FAILED" in page
    assert "action_in_vocabulary" in page and "ts_sane" in page
    results = json.loads(result.artifact("validate-data", "results").read_text())
    assert results["failed_expectations"] >= 2
    log = result.log.read_text()
    assert "FAIL action_in_vocabulary" in log  # the readable summary is in the run log too

    after = {p.name: p.read_bytes() for p in deploy_dir.iterdir() if p.is_file()}
    assert after == before
    assert sorted(p.name for p in (deploy_dir / "model_store").iterdir()) == store_before
