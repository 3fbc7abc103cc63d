"""The trainer streams the sequence layout (issue 13 part 2): request rows joined with each user's
sequence inside the loader give the same examples as the per-example layout, and a run trains on it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest

from unipinrec.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory, tiny_builder):
    root = tmp_path_factory.mktemp("layouts")
    tiny_builder(root)
    tiny_builder(root, out="seq", raw=False, layout="sequences", buckets=3)
    return root


def _rows(source) -> list:
    rows = [r for part in range(len(source.part_rows()))
            for batch in source.read(part, ["user_id", "request_ts", "history", "slate"])
            for r in pa.Table.from_batches([batch]).to_pylist()]
    return sorted(rows, key=lambda r: (r["user_id"], r["request_ts"]))


def test_the_sequence_source_streams_the_same_examples(both_layouts):
    from unipinrec.data.sequence_table import SequenceExamples
    from unipinrec.stream import ParquetExamples

    seq = SequenceExamples(both_layouts / "seq", ["train", "valid"])
    flat = ParquetExamples([both_layouts / "ex" / "train", both_layouts / "ex" / "valid"])
    assert sum(seq.part_rows()) == sum(flat.part_rows()) and len(seq.part_rows()) == 6  # 2 splits x 3 buckets
    assert _rows(seq) == _rows(flat)


@pytest.mark.parametrize("loader", ["stream", "memory"])
def test_training_reads_the_sequence_layout(both_layouts, tmp_path, loader):
    import json

    from unipinrec.train import train

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"train.data_loader={loader}", "train.max_steps=6"])
    summary = train(cfg, both_layouts / "seq", tmp_path / "model", progress=False)
    flat = train(dataclasses.replace(cfg), both_layouts / "ex", tmp_path / "flat", progress=False)
    assert summary["steps"] == flat["steps"] == 6
    assert summary["num_train_examples"] == flat["num_train_examples"] > 0
    meta = json.loads((tmp_path / "model" / "meta.json").read_text())
    assert meta["model_version"]
