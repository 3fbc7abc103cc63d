"""Streaming training input (unipinrec.stream): disjoint, complete epochs across DDP ranks and
workers, determinism given (seed, epoch, rank), a bounded shuffle buffer, exact resume."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from unipinrec import format as fmt
from unipinrec.batches import ItemVocab, TaskSpec, collate_examples
from unipinrec.actions import vocab_for
from unipinrec.config import TaskConfig
from unipinrec.stream import ExampleStream, ParquetExamples, ShuffleBuffer, StreamLoader, StreamPlan, read_pieces

NUM_ITEMS = 50


def _examples(n: int, start: int = 0) -> pa.Table:
    """n UnifiedExamples; request_ts = the example's id (start .. start + n - 1)."""
    rng = np.random.default_rng(start)
    hist, slate = [], []
    for i in range(start, start + n):
        k = int(rng.integers(1, 6))
        hist.append([{"item_id": int(rng.integers(1, NUM_ITEMS + 1)), "action": int(rng.integers(0, 5)), "ts": i - k + j,
                      "surface": 0} for j in range(k)])
        slate.append([{"item_id": int(rng.integers(1, NUM_ITEMS + 1)), "position": p, "action": int(rng.integers(0, 5))}
                      for p in range(3)])
    return pa.table({"user_id": np.arange(start, start + n) % 97, "request_ts": np.arange(start, start + n),
                     "history": hist, "slate": slate}, schema=fmt.UNIFIED_EXAMPLE_SCHEMA)


def write_split(directory: Path, n: int, *, files: int = 3, row_group: int = 37) -> Path:
    """A split of n examples in `files` shards with row groups of `row_group` rows (uneven parts)."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        pq.write_table(_examples(int(bounds[f + 1] - bounds[f]), int(bounds[f])), directory / f"part-{f:05d}.parquet",
                       row_group_size=row_group)
    return directory


def _collate():
    vocab = ItemVocab(np.arange(1, NUM_ITEMS + 1))
    spec = TaskSpec.resolve(TaskConfig(), vocab_for("synthetic"))
    return functools.partial(collate_examples, vocab=vocab, spec=spec, max_history=4, max_slate=2)


def _ids(batch) -> list[int]:
    return batch.history.request_ts.tolist()


def _loader(source, *, batch_size=16, seed=7, rank=0, world=1, workers=0, buffer=64, total=100):
    plan = StreamPlan(part_rows=tuple(source.part_rows()), batch_size=batch_size, seed=seed, rank=rank, world=world,
                      readers=max(1, workers))
    return StreamLoader(source, plan, _collate(), buffer_size=buffer, total_steps=total, device=torch.device("cpu"),
                        workers=workers)


def _epoch_ids(loader, epoch: int) -> list[list[int]]:
    spe = loader.steps_per_epoch
    return [_ids(loader.batch_for(s)) for s in range(epoch * spe, (epoch + 1) * spe)]


def test_parquet_parts_are_row_groups(tmp_path):
    src = ParquetExamples([write_split(tmp_path / "train", 200, files=2, row_group=30)])
    assert src.part_rows() == [30, 30, 30, 10] * 2
    rows = [rb.column("request_ts").to_pylist() for rb in src.read(1, ["request_ts"])]
    assert sum(rows, []) == list(range(30, 60))


@pytest.mark.parametrize("world,readers", [(1, 1), (2, 1), (3, 2), (2, 4)])
def test_plan_gives_each_rank_and_reader_a_disjoint_share_of_every_row(world, readers):
    part_rows = (37, 37, 5, 37, 12, 37, 1)
    total = sum(part_rows)
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            plan = StreamPlan(part_rows=part_rows, batch_size=8, seed=3, rank=rank, world=world, readers=readers)
            assert len(plan.batch_sizes) == plan.steps_per_epoch == -(-total // (8 * world))
            assert max(plan.batch_sizes) - min(plan.batch_sizes) <= 1 and max(plan.batch_sizes) <= 8
            starts = np.cumsum((0,) + part_rows)
            for reader in range(readers):
                seen += [int(starts[p]) + r for p, lo, hi in plan.pieces(epoch, reader) for r in range(lo, hi)]
        assert sorted(seen) == list(range(total))


def test_every_example_once_per_epoch_and_a_new_order_each_epoch(tmp_path):
    src = ParquetExamples([write_split(tmp_path / "train", 300)])
    loader = _loader(src, workers=2)
    e0, e1 = _epoch_ids(loader, 0), _epoch_ids(loader, 1)
    loader.close()
    assert sorted(sum(e0, [])) == list(range(300)) == sorted(sum(e1, []))
    assert sum(e0, []) != sum(e1, [])
    assert sum(e0, []) != sorted(sum(e0, []))  # shuffled, not in file order
    assert {len(b) for b in e0} <= {15, 16}


def test_a_worker_dying_while_shut_down_is_logged_and_the_stream_goes_on(tmp_path, monkeypatch, caplog):
    """A forked worker of a threaded process can abort on its way out; torch's shutdown then raises
    from its SIGCHLD handler. close() logs it, and the loader starts the next stream as usual."""
    import logging

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    src = ParquetExamples([write_split(tmp_path / "train", 300)])
    loader = _loader(src, workers=2)
    first = _ids(loader.batch_for(0))
    real = _MultiProcessingDataLoaderIter._shutdown_workers

    def dies(self):
        real(self)  # the workers are gone, then the handler's error, as torch raises it
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Aborted.")

    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "_shutdown_workers", dies)
    with caplog.at_level(logging.WARNING, logger="unipinrec.stream"):
        loader.close()
    assert "died while shutting down" in caplog.text and "Aborted" in caplog.text
    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "_shutdown_workers", real)
    assert _ids(loader.batch_for(0)) == first  # a fresh stream from step 0: the same batch
    assert sorted(sum(_epoch_ids(loader, 0), [])) == list(range(300))
    loader.close()


def test_same_seed_epoch_rank_same_batches(tmp_path):
    src = ParquetExamples([write_split(tmp_path / "train", 300)])
    runs = {}
    for key, kw in {"a": {}, "again": {}, "seed": {"seed": 8}, "rank1": {"rank": 1, "world": 2}}.items():
        world = kw.get("world", 1)
        loader = _loader(src, workers=2, **kw)
        runs[key] = [_ids(loader.batch_for(s)) for s in range(loader.steps_per_epoch + 3)]
        loader.close()
        if world == 1:
            assert len(runs[key]) == 22
    assert runs["a"] == runs["again"]
    assert runs["a"] != runs["seed"]
    rank0 = _loader(src, rank=0, world=2, workers=2)
    spe = rank0.steps_per_epoch
    assert not set(sum(_epoch_ids(rank0, 0), [])) & set(sum(runs["rank1"][:spe], []))
    rank0.close()


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_anywhere_gives_the_uninterrupted_batches(tmp_path):
    """A loader started at step k (a resumed run: replay-skip in each worker) yields the batches an
    uninterrupted one yields from k, with 3 workers, across an epoch boundary."""
    src = ParquetExamples([write_split(tmp_path / "train", 250, row_group=20)])
    ref = _loader(src, workers=3, buffer=40, total=45)
    full = [_ids(ref.batch_for(s)) for s in range(45)]
    ref.close()
    assert ref.steps_per_epoch == 16
    for k in (5, 16, 23):
        resumed = _loader(src, workers=3, buffer=40, total=45)
        assert [_ids(resumed.batch_for(s)) for s in range(k, 45)] == full[k:], k
        resumed.close()
    inproc = _loader(src, workers=0, buffer=40, total=45)  # batch_for jumps restart the stream
    assert _ids(inproc.batch_for(3)) == _ids(_loader(src, buffer=40, total=45).batch_for(3))
    assert inproc.position(21) == {"epoch": 1, "batches_taken": 5, "steps_per_epoch": 16}


def test_shuffle_buffer_holds_at_most_its_capacity(tmp_path):
    """Memory does not grow with the split: the rows held (buffer + ready + the record batch being
    read) stay under capacity + one read batch, for a split 4x and 16x the buffer."""
    peaks = []
    for n in (400, 1600):
        src = ParquetExamples([write_split(tmp_path / f"s{n}", n, files=2, row_group=50)], batch_rows=10)
        plan = StreamPlan(part_rows=tuple(src.part_rows()), batch_size=16, seed=1)
        ds = ExampleStream(src, plan, lambda t: t, buffer_size=100, start_step=0, end_step=plan.steps_per_epoch)
        out = [item.batch for item in ds]
        assert sum(t.num_rows for t in out) == n
        assert sorted(sum((t.column("request_ts").to_pylist() for t in out), [])) == list(range(n))
        assert 100 <= ds.peak_rows <= 100 + 10
        peaks.append(ds.peak_rows)
    assert peaks[0] == peaks[1]
    buf = ShuffleBuffer(read_pieces(src, [(0, 5, 45)], columns=None), 8, np.random.default_rng(0))
    got = sum((buf.take(8).column("request_ts").to_pylist() for _ in range(5)), [])
    assert sorted(got) == list(range(5, 45)) and buf.peak_rows <= 8 + 10


def test_bad_stream_settings_are_named(tmp_path):
    src = ParquetExamples([write_split(tmp_path / "train", 30, files=1)])
    with pytest.raises(ValueError, match="train.shuffle_buffer .* must be at least train.batch_size"):
        _loader(src, buffer=8, batch_size=16)
    with pytest.raises(ValueError, match="30 examples cannot make"):
        StreamPlan(part_rows=(30,), batch_size=1, seed=0, rank=0, world=31).batch_sizes


def _ddp_rank(rank: int, world: int, split: str, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    src = ParquetExamples([split])
    loader = _loader(src, rank=dist.get_rank(), world=dist.get_world_size(), workers=2)
    ids = {e: sum(_epoch_ids(loader, e), []) for e in (0, 1)}
    loader.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, ids)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def test_two_ddp_ranks_gloo_see_every_example_exactly_once(tmp_path):
    import socket

    import torch.multiprocessing as mp

    split = write_split(tmp_path / "train", 333)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ids.txt"
    mp.spawn(_ddp_rank, args=(2, str(split), port, str(out)), nprocs=2, join=True)
    gathered = json.loads(out.read_text())
    for epoch in ("0", "1"):
        a, b = gathered[0][epoch], gathered[1][epoch]
        assert not set(a) & set(b) and sorted(a + b) == list(range(333)), epoch
        assert abs(len(a) - len(b)) <= 1


def test_pin_memory_maps_every_tensor_of_the_batch(tmp_path):
    """DataLoader's pin thread calls StreamBatch.pin_memory: every tensor of the TrainBatch and of
    its Actions goes through the map (checked with a map that marks each tensor)."""
    from unipinrec.stream import StreamBatch, _map_tensors

    batch = _collate()(_examples(5))
    seen = []
    mapped = _map_tensors(batch, lambda t: seen.append(t) or t.clone())
    assert len(seen) == 6 + 7  # Actions: 4 per-action fields, lengths, request_ts; TrainBatch: 7 more
    assert mapped.history.ts is not batch.history.ts and torch.equal(mapped.history.ts, batch.history.ts)
    assert mapped.slate_valid is not batch.slate_valid and torch.equal(mapped.slate_valid, batch.slate_valid)
    assert StreamBatch(3, batch).step == 3
