"""Streaming training input: examples read as a stream of parts, never a whole split in memory.

A split is a list of *parts* (`ExampleSource`: the row groups of the per-example Parquet layout,
`ParquetExamples`; a sequence-table reader plugs in the same way), each read as pyarrow record
batches in the UnifiedExample schema. One epoch lays the parts out in a permutation of
(seed, epoch) as one virtual sequence of rows; each DDP rank takes its contiguous share of it, and
within a rank each *reader* (a DataLoader worker) the rows of its batches (`StreamPlan`). A reader
shuffles its rows through a bounded buffer (`ShuffleBuffer`) and collates its batches on the fly.

Batch g of the run (g = the trainer's step) is a function of (seed, epoch, rank, world, readers)
only: reader g % readers makes it, so a run resumed at step g0 replays each reader's epoch from
its start without collating (a deterministic replay-skip) and takes the same batches as an
uninterrupted run. Ranks take the same number of batches per epoch, ceil(N / (batch_size *
world)), with sizes balanced to within one row, so every example is seen exactly once per epoch.
Imports torch, numpy and pyarrow only.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

log = logging.getLogger(__name__)

COLUMNS = ["request_ts", "history", "slate"]  # what collate_examples reads


class ExampleSource(Protocol):
    """A split as parts: rows per part known up front (from metadata), each part readable alone."""

    def part_rows(self) -> list[int]:
        """Rows of each part, in a fixed order."""

    def read(self, part: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Part `part` as record batches in the UnifiedExample schema (only `columns` when given)."""


class ParquetExamples:
    """The per-example layout (EX/{split}/part-*.parquet): one part per Parquet row group."""

    def __init__(self, directories: Sequence[str | Path], batch_rows: int = 1024):
        from .format import shard_paths

        self.batch_rows = batch_rows
        self._parts: list[tuple[Path, int, int]] = []  # (file, row group, rows)
        for d in directories:
            for path in shard_paths(d):
                meta = pq.ParquetFile(path).metadata
                self._parts += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]

    def part_rows(self) -> list[int]:
        return [rows for _, _, rows in self._parts]

    def read(self, part: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        path, group, _ = self._parts[part]
        with pq.ParquetFile(path) as f:
            yield from f.iter_batches(batch_size=self.batch_rows, row_groups=[group], columns=columns)


# ---------------------------------------------------------------------------------------------
# The plan: which rows each rank and reader takes in an epoch


@dataclass(frozen=True)
class StreamPlan:
    part_rows: tuple[int, ...]
    batch_size: int  # per rank
    seed: int
    rank: int = 0
    world: int = 1
    readers: int = 1  # DataLoader workers per rank (0 workers = 1 reader in the main process)

    @property
    def num_rows(self) -> int:
        return sum(self.part_rows)

    @cached_property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_rows / (self.batch_size * self.world)))

    @cached_property
    def rank_range(self) -> tuple[int, int]:
        n, w, r = self.num_rows, self.world, self.rank
        return n * r // w, n * (r + 1) // w

    @cached_property
    def batch_sizes(self) -> tuple[int, ...]:
        """This rank's batch sizes in an epoch: steps_per_epoch of them, balanced to one row."""
        rows, steps = self.rank_range[1] - self.rank_range[0], self.steps_per_epoch
        if rows < steps:
            raise ValueError(f"{self.num_rows} examples cannot make {steps} batches on each of {self.world} "
                             "processes: use fewer processes or a smaller train.batch_size")
        return tuple(rows // steps + (j < rows % steps) for j in range(steps))

    def reader_of(self, step: int) -> int:
        return step % self.readers

    def reader_batches(self, epoch: int, reader: int) -> list[int]:
        """Batches (index in the epoch) that `reader` makes in `epoch`."""
        base = epoch * self.steps_per_epoch
        return [j for j in range(self.steps_per_epoch) if (base + j) % self.readers == reader]

    def part_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.part_rows))

    def pieces(self, epoch: int, reader: int) -> list[tuple[int, int, int]]:
        """(part, first row, end row) slices that hold `reader`'s rows in `epoch`: a contiguous
        range of the epoch's virtual sequence, after the rank's start and the earlier readers'."""
        sizes = self.batch_sizes
        start = self.rank_range[0] + sum(sizes[j] for r in range(reader) for j in self.reader_batches(epoch, r))
        end = start + sum(sizes[j] for j in self.reader_batches(epoch, reader))
        out, offset = [], 0
        for part in self.part_order(epoch):
            n = self.part_rows[part]
            lo, hi = max(start, offset), min(end, offset + n)
            if lo < hi:
                out.append((int(part), lo - offset, hi - offset))
            offset += n
        return out

    def rng(self, epoch: int, reader: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, self.rank, reader, 1])


# ---------------------------------------------------------------------------------------------
# A reader: its rows through a bounded shuffle buffer


def read_pieces(source: ExampleSource, pieces: list[tuple[int, int, int]],
                columns: list[str] | None = COLUMNS) -> Iterator[pa.RecordBatch]:
    """The rows [lo, hi) of each piece's part, as record batches (a part is read from its start)."""
    for part, lo, hi in pieces:
        offset = 0
        for rb in source.read(part, columns):
            a, b = max(lo, offset), min(hi, offset + rb.num_rows)
            if a < b:
                yield rb.slice(a - offset, b - a)
            offset += rb.num_rows
            if offset >= hi:
                break


class ShuffleBuffer:
    """Rows from a stream of record batches, handed out in a random order, holding at most
    `capacity` rows (buffered + ready to hand out) plus the record batch being read. Each round
    shuffles the buffer and moves all but half of it (at least what is asked for) to `ready`."""

    def __init__(self, batches: Iterator[pa.RecordBatch], capacity: int, rng: np.random.Generator):
        self.batches, self.capacity, self.rng = batches, capacity, rng
        self.buf: pa.Table | None = None
        self.ready: pa.Table | None = None
        self.pending: pa.RecordBatch | None = None  # the unread rest of the last record batch
        self.done = False
        self.peak_rows = 0  # the most rows ever held in buf + ready (+ pending)

    @staticmethod
    def _len(t) -> int:
        return 0 if t is None else t.num_rows

    def _fill(self) -> None:
        chunks = [] if self.buf is None else [self.buf]
        held = self._len(self.buf) + self._len(self.ready)
        while held < self.capacity and not self.done:
            rb = self.pending if self.pending is not None else next(self.batches, None)
            self.pending = None
            if rb is None:
                self.done = True
                break
            take = min(rb.num_rows, self.capacity - held)
            if take < rb.num_rows:
                self.pending = rb.slice(take)
            chunks.append(pa.Table.from_batches([rb.slice(0, take)]))
            held += take
        self.buf = pa.concat_tables(chunks) if chunks else None
        self.peak_rows = max(self.peak_rows, held + self._len(self.pending))

    def take(self, n: int) -> pa.Table:
        """The next n rows (fewer only when the stream ends)."""
        while self._len(self.ready) < n:
            self._fill()
            size = self._len(self.buf)
            if size == 0:
                break
            perm = self.rng.permutation(size)
            emit = size if self.done else min(size, max(n - self._len(self.ready), size - self.capacity // 2))
            moved = self.buf.take(pa.array(perm[:emit]))
            self.ready = moved if self.ready is None else pa.concat_tables([self.ready, moved])
            self.buf = self.buf.take(pa.array(perm[emit:])) if emit < size else None
        if self.ready is None:
            raise RuntimeError("the shuffle buffer ran dry: the plan asked for more rows than its pieces hold")
        out = self.ready.slice(0, n)
        self.ready = self.ready.slice(n)
        return out


# ---------------------------------------------------------------------------------------------
# The dataset DataLoader workers run, and the loader the trainer calls


@dataclass
class StreamBatch:
    """One rank's batch of a step; `pin_memory` is what DataLoader's pin thread calls."""

    step: int
    batch: object  # TrainBatch

    def pin_memory(self) -> "StreamBatch":
        return StreamBatch(self.step, _map_tensors(self.batch, torch.Tensor.pin_memory))


def _map_tensors(obj, fn):
    """fn applied to every tensor of a (nested) dataclass, e.g. TrainBatch and its Actions."""
    if torch.is_tensor(obj):
        return fn(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


class ExampleStream(torch.utils.data.IterableDataset):
    """Batches start_step .. end_step - 1 of one rank; each DataLoader worker is one reader.

    `collate` turns a pa.Table of examples into a batch (collate_examples with the run's
    vocabulary and sizes); it runs in the worker."""

    def __init__(self, source: ExampleSource, plan: StreamPlan, collate: Callable[[pa.Table], object], *,
                 buffer_size: int, start_step: int, end_step: int):
        super().__init__()
        self.source, self.plan, self.collate = source, plan, collate
        self.buffer_size, self.start_step, self.end_step = buffer_size, start_step, end_step
        self.peak_rows = 0

    def __iter__(self) -> Iterator[StreamBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.plan.readers:
            raise ValueError(f"the plan has {self.plan.readers} readers but the DataLoader {workers} workers")
        # worker w makes steps start + w, start + w + readers, ...: DataLoader's round-robin order
        reader = (worker + self.start_step) % workers
        spe = self.plan.steps_per_epoch
        for epoch in range(self.start_step // spe, math.ceil(self.end_step / spe)):
            yield from self._epoch(epoch, reader)

    def _epoch(self, epoch: int, reader: int) -> Iterator[StreamBatch]:
        plan, spe = self.plan, self.plan.steps_per_epoch
        steps = [epoch * spe + j for j in plan.reader_batches(epoch, reader)]
        if not steps or steps[-1] < self.start_step or steps[0] >= self.end_step:
            return
        buffer = ShuffleBuffer(read_pieces(self.source, plan.pieces(epoch, reader)), self.buffer_size,
                               plan.rng(epoch, reader))
        for step in steps:
            if step >= self.end_step:
                break
            rows = buffer.take(plan.batch_sizes[step - epoch * spe])
            self.peak_rows = max(self.peak_rows, buffer.peak_rows)
            if step >= self.start_step:  # earlier steps: replayed to keep the shuffle, not collated
                yield StreamBatch(step, self.collate(rows))


class StreamLoader:
    """The trainer's view: `batch_for(step)` on `device`, cheap when called with consecutive
    steps (one DataLoader iterator), a restart anywhere else."""

    def __init__(self, source: ExampleSource, plan: StreamPlan, collate: Callable[[pa.Table], object], *,
                 buffer_size: int, total_steps: int, device: torch.device, workers: int):
        if max(1, workers) != plan.readers:
            raise ValueError(f"{workers} workers for a plan of {plan.readers} readers")
        if buffer_size < plan.batch_size:
            raise ValueError(f"train.shuffle_buffer ({buffer_size}) must be at least train.batch_size "
                             f"({plan.batch_size})")
        self.source, self.plan, self.collate = source, plan, collate
        self.buffer_size, self.total_steps, self.device, self.workers = buffer_size, total_steps, device, workers
        self._it, self._next = None, -1

    @property
    def num_rows(self) -> int:
        return self.plan.num_rows

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def position(self, step: int) -> dict:
        """The stream position after `step` batches: what a checkpoint records."""
        epoch, taken = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batches_taken": taken, "steps_per_epoch": self.steps_per_epoch}

    def batch_for(self, step: int):
        if step != self._next:
            self._start(step)
        item: StreamBatch = next(self._it)
        if item.step != step:  # the order is the contract; never train on another step's batch
            raise RuntimeError(f"the stream gave the batch of step {item.step} for step {step}")
        self._next = step + 1
        return item.batch.to(self.device, non_blocking=self.device.type == "cuda")

    def _start(self, step: int) -> None:
        self.close()
        workers = self.workers
        ds = ExampleStream(self.source, self.plan, self.collate, buffer_size=self.buffer_size, start_step=step,
                           end_step=max(self.total_steps, step + 1))
        self._it = iter(torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None, persistent_workers=False))

    def close(self) -> None:
        it, self._it, self._next = self._it, None, -1
        if it is None or not hasattr(it, "_shutdown_workers"):
            return
        try:
            it._shutdown_workers()
        except RuntimeError as e:
            # a forked worker of a process with threads (gloo, NCCL) can abort on its way out
            # ("terminate called without an active exception"; tests/test_stream.py's DDP test saw
            # it in 2 runs of ~35); what it had made was delivered or is discarded by this close anyway
            log.warning("stream loader: a worker died while shutting down (%s); nothing is lost", e)
