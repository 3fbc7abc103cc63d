"""The sequence layout (histories stored once, cut while streaming) against the per-example
layout: the same UnifiedExamples, example by example, for the same raw data and split."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_examples import synthetic_raw, write_sequences  # noqa: F401 (synthetic_raw: a fixture)

from unipinrec import format as fmt
from unipinrec.actions import SYNTHETIC
from unipinrec.batches import ItemVocab, TaskSpec, collate_examples
from unipinrec.config import TaskConfig
from unipinrec.data import build_examples
from unipinrec.data.sequence_table import iter_examples, iter_split, user_bucket
from unipinrec.data.stats import examples_stats


def _by_user(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: r["user_id"])  # stable: each user's requests keep their order


def _same_examples(raw, tmp_path, buckets=4, chunk_events=400, **kw):
    per_example = build_examples(raw, tmp_path / "ex", progress=False, chunk_events=chunk_events, **kw)
    meta = build_examples(raw, tmp_path / "seq", progress=False, chunk_events=chunk_events, layout="sequences",
                          buckets=buckets, **kw)
    assert meta["splits"] == per_example["splits"] and meta["layout"] == "sequences" and meta["buckets"] == buckets
    for split in fmt.SPLITS:
        batches = list(iter_examples(tmp_path / "seq", split, batch_size=7))
        assert all(b.schema.equals(fmt.UNIFIED_EXAMPLE_SCHEMA) for b in batches)
        got = [r for b in batches for r in b.to_pylist()]
        want = fmt.read_sharded(tmp_path / "ex" / split).to_pylist()
        assert len(got) == len(want) == meta["splits"][split]
        assert _by_user(got) == _by_user(want), split
    return meta


@pytest.mark.parametrize("L, history_impressions", [(3, False), (40, False), (5, True), (300, True)])
def test_impression_data_same_examples_as_the_builder(synthetic_raw, tmp_path, L, history_impressions):
    _same_examples(synthetic_raw, tmp_path, max_history=L, history_impressions=history_impressions)


@pytest.mark.parametrize("L, S", [(4, 3), (1, 1), (50, 10)])
def test_sequence_data_same_examples_as_the_builder(tmp_path, L, S):
    raw = write_sequences(tmp_path / "raw", [1, 2, 3, 4, 5, 9, 17, 30, 2, 12, 40], seed=L + S)
    _same_examples(raw, tmp_path, buckets=3, chunk_events=25, max_history=L, slate_size=S)


def test_histories_stored_once_per_user_and_bucketed_by_hash(synthetic_raw, tmp_path):
    meta = _same_examples(synthetic_raw, tmp_path, buckets=5, max_history=300, history_impressions=True)
    events = fmt.read_sharded(synthetic_raw / "events")
    assert meta["sequence_rows"] == events.num_rows  # with impressions in the history: every event, once
    seen = set()
    for k in range(5):
        seq = fmt.read_sharded(tmp_path / "seq" / "sequences" / f"bucket={k}")
        users = seq.column("user_id").to_numpy()
        assert np.all(np.diff(users) >= 0) and set(user_bucket(users, 5)) <= {k}
        assert not seen & set(users)
        seen |= set(users)
        for split in fmt.SPLITS:
            req = fmt.read_sharded(tmp_path / "seq" / "requests" / split / f"bucket={k}")
            assert set(user_bucket(req.column("user_id").to_numpy(), 5)) <= {k}
    assert seen == set(events.column("user_id").to_numpy())
    # 60 users: several per bucket, none empty
    assert len({int(b) for b in user_bucket(np.arange(1, 61), 5)}) == 5


def test_reader_takes_a_shorter_L_and_a_part_of_the_buckets(synthetic_raw, tmp_path):
    build_examples(synthetic_raw, tmp_path / "seq", max_history=30, progress=False, layout="sequences", buckets=4,
                   history_impressions=True)
    build_examples(synthetic_raw, tmp_path / "ex", max_history=8, progress=False, history_impressions=True)
    got = [r for b in iter_examples(tmp_path / "seq", "train", max_history=8) for r in b.to_pylist()]
    assert _by_user(got) == _by_user(fmt.read_sharded(tmp_path / "ex" / "train").to_pylist())
    parts = [[r["user_id"] for b in iter_examples(tmp_path / "seq", "test", buckets=[k]) for r in b.to_pylist()]
             for k in range(4)]
    assert sorted(sum(parts, [])) == sorted(fmt.read_sharded(tmp_path / "ex" / "test").column("user_id").to_pylist())
    assert not set(parts[0]) & set(parts[1])
    with pytest.raises(ValueError, match="max_history must be in 1..30"):
        next(iter_examples(tmp_path / "seq", "train", max_history=31))
    with pytest.raises(ValueError, match="bucket 4 is not in 0..3"):
        next(iter_examples(tmp_path / "seq", "train", buckets=[4]))
    with pytest.raises(fmt.FormatError, match="not 'sequences'"):
        next(iter_examples(tmp_path / "ex", "train"))


def _tensors(batch) -> list:
    """Every tensor of a (nested) dataclass batch, in field order."""
    out = []
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        out += _tensors(v) if dataclasses.is_dataclass(v) else [v] if isinstance(v, torch.Tensor) else []
    return out


def test_collate_and_stats_read_the_sequence_layout(synthetic_raw, tmp_path):
    build_examples(synthetic_raw, tmp_path / "ex", max_history=20, progress=False)
    build_examples(synthetic_raw, tmp_path / "seq", max_history=20, progress=False, layout="sequences", buckets=2)
    vocab = ItemVocab.from_examples_dir(tmp_path / "ex")
    spec = TaskSpec.resolve(TaskConfig(), SYNTHETIC)
    batch = pa.Table.from_batches(list(iter_examples(tmp_path / "seq", "valid"))).sort_by("user_id")
    want = fmt.read_sharded(tmp_path / "ex" / "valid").sort_by("user_id")
    a, b = _tensors(collate_examples(batch, vocab, spec, 20, 6)), _tensors(collate_examples(want, vocab, spec, 20, 6))
    assert len(a) == len(b) > 5 and all(torch.equal(x, y) for x, y in zip(a, b))
    stats_seq, stats_ex = examples_stats(tmp_path / "seq"), examples_stats(tmp_path / "ex")
    assert stats_seq["splits"] == stats_ex["splits"]
    assert sum(b.num_rows for b in iter_split(tmp_path / "seq", "test", columns=["slate"])) == 60


def test_cli_builds_the_sequence_layout(synthetic_raw, tmp_path):
    from typer.testing import CliRunner

    from unipinrec.cli import app

    args = ["examples", "build", "--raw", str(synthetic_raw), "--max-history", "12", "--no-progress"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "seq"), "--layout", "sequences", "--buckets", "3"])
    assert r.exit_code == 0, r.output
    assert "sequence rows in 3 buckets" in r.output
    assert sorted(p.name for p in (tmp_path / "seq" / "sequences").iterdir()) == ["bucket=0", "bucket=1", "bucket=2"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "seq"), "--layout", "rows"])
    assert r.exit_code == 1 and "--layout must be examples or sequences" in r.output
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "seq"), "--buckets", "0"])
    assert r.exit_code == 1 and "--buckets must be positive" in r.output
    # rebuilt in the per-example layout, the folder drops the sequence one
    assert CliRunner().invoke(app, args + ["--out", str(tmp_path / "seq")]).exit_code == 0
    assert not (tmp_path / "seq" / "sequences").exists() and fmt.count_rows(tmp_path / "seq" / "test") == 60
