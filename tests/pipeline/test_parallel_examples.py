"""Parallel example building: the builder restricted to one user-hash bucket, the merge of the
buckets, and the pipeline's ParallelFor over them. The merged folder equals the one-process
build record by record, in both layouts and with Feast's point-in-time histories; the end-to-end
run on kfp's local runner is in test_pipeline_local.py."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from unipinrec import format as fmt
from unipinrec import steps
from unipinrec.data import build_examples, generate_synthetic
from unipinrec.data.buckets import merge_buckets
from unipinrec.data.examples import LAYOUTS
from unipinrec.data.sequence_table import iter_split, user_bucket

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "raw"
    generate_synthetic(out, num_users=60, num_items=50, num_requests_per_user=4, seed=3, progress=False)
    return out


def _records(ex, split) -> pa.Table:
    return pa.Table.from_batches(list(iter_split(ex, split)), schema=fmt.UNIFIED_EXAMPLE_SCHEMA)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bucket_parts_merged_equal_the_one_process_build(raw, tmp_path, layout):
    n = 3
    kw = dict(max_history=8, progress=False, layout=layout, buckets=n, chunk_events=300)  # chunks of a few users
    full = build_examples(raw, tmp_path / "full", **kw)
    parts = [tmp_path / f"part{k}" for k in range(n)]
    for k, part in enumerate(parts):
        meta = build_examples(raw, part, bucket=k, **kw)
        assert meta["bucket"] == k and 0 < meta["num_users"] < full["num_users"]
        users = np.concatenate([_records(part, s).column("user_id").to_numpy() for s in fmt.SPLITS])
        assert set(user_bucket(users, n)) == {k}  # the part holds its bucket's users only
    merged = merge_buckets(parts[::-1], tmp_path / "merged", batch_size=5)  # small batches: users cut across
    for split in fmt.SPLITS:
        assert _records(tmp_path / "merged", split).equals(_records(tmp_path / "full", split)), split
    assert fmt.read_sharded(tmp_path / "merged" / "items").equals(fmt.read_sharded(tmp_path / "full" / "items"))
    assert {k: v for k, v in merged.items() if k not in ("chunks", "parallel_build")} == \
        {k: v for k, v in full.items() if k != "chunks"}
    assert merged["parallel_build"] == {"buckets": n} and fmt.read_meta(tmp_path / "merged") == merged


def test_a_merge_refuses_parts_that_are_not_one_whole_build_and_writes_nothing(raw, tmp_path):
    kw = dict(max_history=8, progress=False, buckets=2)
    b0, b1, short, whole = (tmp_path / name for name in ("b0", "b1", "short", "whole"))
    build_examples(raw, b0, bucket=0, **kw)
    build_examples(raw, b1, bucket=1, **kw)
    build_examples(raw, short, bucket=1, **{**kw, "max_history": 4})
    build_examples(raw, whole, **kw)
    out = tmp_path / "out"
    for parts, message in (([b0], r"missing \[1\]"), ([b0, b0, b1], r"more than once \[0\]"),
                           ([b0, short], "'max_history'"), ([b0, whole], "no 'bucket'"), ([], "no bucket folders")):
        with pytest.raises(ValueError, match=message):
            merge_buckets(parts, out)
        assert not out.exists()
    with pytest.raises(ValueError, match=r"bucket must be in 0\.\.1 \(buckets=2\), got 2"):
        build_examples(raw, tmp_path / "bad", bucket=2, **kw)
    assert not (tmp_path / "bad").exists()


def test_feast_histories_built_per_bucket_equal_the_one_process_build(tmp_path, tiny_config_text):
    raw, repo = tmp_path / "raw", tmp_path / "repo"
    steps.ingest(raw, source="synthetic", config_yaml=tiny_config_text, num_users=30)
    steps.build_features(raw, repo, config_yaml=tiny_config_text)
    one = steps.build_examples(raw, repo, tmp_path / "one", config_yaml=tiny_config_text)
    parts = [tmp_path / f"b{k}" for k in range(3)]
    counts = [steps.build_examples(raw, repo, p, config_yaml=tiny_config_text, bucket=k, buckets=3)["splits"]
              for k, p in enumerate(parts)]
    assert all(c["test"] > 0 for c in counts)
    out = steps.merge_examples(parts, tmp_path / "merged", report_dir=tmp_path / "report")
    assert out["contract_passed"] and out["buckets"] == 3 and out["history_differs_from_builder"] == 0
    assert out["splits"] == one["splits"] and out["feast"] == one["feast"]
    for split in fmt.SPLITS:
        assert fmt.read_sharded(tmp_path / "merged" / split).equals(fmt.read_sharded(tmp_path / "one" / split))
    assert fmt.read_meta(tmp_path / "merged")["history_source"] == "feast:unipinrec_v1"
    with pytest.raises(steps.StepError, match=r"^bucket: must be in 0\.\.2"):
        steps.build_examples(raw, repo, tmp_path / "x", config_yaml=tiny_config_text, bucket=3, buckets=3)
    with pytest.raises(steps.StepError, match=r"^parts: .*missing \[1, 2\]"):
        steps.merge_examples(parts[:1], tmp_path / "y")
    with pytest.raises(steps.StepError, match="^example_buckets: must be at least 1"):
        steps.bucket_ids(0)
    assert steps.bucket_ids(3) == [0, 1, 2]


def test_the_compiled_pipeline_builds_each_bucket_in_a_parallel_for_and_trains_on_the_merge(local_ir):
    doc, tasks = local_ir.doc, local_ir.tasks
    param = doc["root"]["inputDefinitions"]["parameters"]["example_buckets"]
    assert param == {"defaultValue": 1.0, "isOptional": True, "parameterType": "NUMBER_INTEGER"}
    (loop_name, loop), = [(n, t) for n, t in tasks.items() if "parameterIterator" in t]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--bucket-ids-Output"
    assert loop["inputs"]["parameters"]["pipelinechannel--bucket-ids-Output"]["taskOutputParameter"] == \
        {"outputParameterKey": "Output", "producerTask": "bucket-ids"}
    assert tasks["bucket-ids"]["inputs"]["parameters"]["buckets"]["componentInputParameter"].endswith("example_buckets")
    body = doc["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"build-examples"}  # one pod per bucket
    given = body["build-examples"]["inputs"]["parameters"]
    assert given["bucket"]["componentInputParameter"] == loop["parameterIterator"]["itemInput"]
    assert given["buckets"]["componentInputParameter"] == "pipelinechannel--example_buckets"
    parts = tasks["merge-examples"]["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]
    assert parts["producerTask"] == loop_name  # dsl.Collected: every bucket's folder
    for step in ("train", "evaluate", "gate"):  # (build-index reads it through the promoted condition)
        assert tasks[step]["inputs"]["artifacts"]["examples"]["taskOutputArtifact"]["producerTask"] == "merge-examples"
