"""From the unified format to model tensors: item vocabulary, history batches, training collate.

`ItemVocab` maps raw item ids to embedding rows (row 0 = padding). `Actions` (sequences.py)
is what `UniPinRec.encode_history` reads (right-padded histories); `batch_histories` builds one
from client histories. `collate_examples` turns a record batch of UnifiedExamples into a
`TrainBatch` (history, retrieval targets, task labels, slate).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .actions import ActionVocab
from .sequences import Actions, History, check_history


# ---------------------------------------------------------------------------------------------
# Items


class ItemVocab:
    """Raw item_id <-> embedding row. Rows 1..N follow the order of the items table."""

    def __init__(self, item_ids: Sequence[int] | np.ndarray):
        ids = np.asarray(item_ids, dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("item_ids contain duplicates")
        self.item_ids = ids  # row r holds item_ids[r - 1]
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]
        # ids that are small non-negative integers (the usual case) map through a dense table:
        # one gather instead of a binary search per id (serving looks up every request's history)
        top = int(ids.max()) if len(ids) else -1
        self._dense = None
        if len(ids) and ids.min() >= 0 and top <= 8 * len(ids) + 2**16:
            self._dense = np.zeros(top + 2, dtype=np.int64)  # last slot: any id past the top
            self._dense[ids] = np.arange(1, len(ids) + 1)

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def num_rows(self) -> int:
        """Embedding rows including padding: N + 1."""
        return len(self.item_ids) + 1

    @classmethod
    def from_items_table(cls, table: pa.Table) -> "ItemVocab":
        if "item_id" not in table.column_names:
            raise ValueError("items table: missing field 'item_id'")
        return cls(table.column("item_id").to_numpy())

    @classmethod
    def from_examples_dir(cls, examples_dir: str | Path) -> "ItemVocab":
        from .format import read_sharded

        return cls.from_items_table(read_sharded(Path(examples_dir) / "items", columns=["item_id"]))

    def lookup(self, item_ids, *, unknown: int | None = None) -> np.ndarray:
        """Rows of raw ids. Unknown ids raise KeyError (naming the first one), or map to
        `unknown` when given (e.g. 0 = padding)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        if self._dense is not None:
            # negative ids read as uint64 are past the top too: one minimum, not a clip (2x slower)
            rows = self._dense[np.minimum(ids.view(np.uint64), len(self._dense) - 1)]  # past the top: last slot (0)
            if not rows.size or rows.min() > 0:
                return rows
            found = rows > 0
            if unknown is None:
                bad = ids.reshape(-1)[np.flatnonzero(~found.reshape(-1))[0]]
                raise KeyError(f"item_id {int(bad)} is not in the item vocabulary ({len(self)} items)")
            return np.where(found, rows, unknown)
        if len(self._sorted) == 0:
            pos = np.zeros(ids.shape, dtype=np.int64)
            found = np.zeros(ids.shape, dtype=bool)
        else:
            pos = np.searchsorted(self._sorted, ids).clip(max=len(self._sorted) - 1)
            found = self._sorted[pos] == ids
        rows = self._order[pos] + 1
        if not found.all():
            if unknown is None:
                bad = ids.reshape(-1)[np.flatnonzero(~found.reshape(-1))[0]]
                raise KeyError(f"item_id {int(bad)} is not in the item vocabulary ({len(self)} items)")
            rows = np.where(found, rows, unknown)
        return rows

    def row(self, item_id: int) -> int:
        return int(self.lookup([item_id])[0])

    def ids(self, rows) -> np.ndarray:
        """Raw ids of rows (row 0 -> -1)."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.where(rows > 0, np.concatenate([[-1], self.item_ids])[rows.clip(0, len(self))], -1)

    def save(self, path: str | Path) -> None:
        table = pa.table({"item_id": pa.array(self.item_ids, pa.int64()),
                          "row": pa.array(np.arange(1, len(self) + 1), pa.int64())})
        pq.write_table(table, path)

    @classmethod
    def load(cls, path: str | Path) -> "ItemVocab":
        t = pq.read_table(path)
        rows = t.column("row").to_numpy()
        if not np.array_equal(rows, np.arange(1, len(rows) + 1)):
            raise ValueError(f"{path}: field 'row' must be 1..N in order")
        return cls(t.column("item_id").to_numpy())


# ---------------------------------------------------------------------------------------------
# Batches


def batch_histories(histories: Sequence, request_ts: Sequence[int], vocab: ItemVocab, max_history: int, *,
                    num_actions: int | None = None, spec: type[Actions] = Actions) -> Actions:
    """Histories (`History` objects, or lists of (item_id, action, ts[, surface]) tuples),
    chronological -> one validated batch of each one's last `max_history` actions.

    Bad input raises ActionError (a ValueError) naming the row and position, e.g.
    `history[1][4].item_id`."""
    kept = []
    for b, h in enumerate(histories):
        h = h if isinstance(h, History) else History.from_tuples(h, spec, where=f"history[{b}]")
        last = h.last(max_history)
        check_history(last, vocab, num_actions, where=f"history[{b}]", offset=len(h) - len(last))
        kept.append(last)
    return spec.from_histories(kept, request_ts, vocab=vocab)


@dataclass(kw_only=True)
class TrainBatch:
    history: Actions
    history_labels: torch.Tensor  # (B, W, T) float: task labels of each history action
    targets: torch.Tensor  # (B, W) item row of the next positive action after each position; 0 = none
    slate_items: torch.Tensor  # (B, S) item rows, 0 = padding
    slate_labels: torch.Tensor  # (B, S, T) float
    slate_valid: torch.Tensor  # (B, S) bool
    slate_actions: torch.Tensor  # (B, S) action ids of the impressions
    slate_positions: torch.Tensor  # (B, S) where each was shown

    def _others(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "history"}

    def to(self, device, non_blocking: bool = False) -> "TrainBatch":
        return TrainBatch(history=self.history.to(device, non_blocking),
                          **{n: t.to(device, non_blocking=non_blocking) for n, t in self._others().items()})

    def index_select(self, rows) -> "TrainBatch":
        """Rows of a batch, trimmed to the widest history and slate among them."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.targets.device)
        h = self.history.index_select(rows).trim()
        W = h.width
        sv = self.slate_valid.index_select(0, rows)
        S = int(sv.any(0).nonzero().max()) + 1 if sv.any() else 0  # up to the last real slate token
        width = {"history_labels": W, "targets": W}
        return TrainBatch(history=h, **{n: _pad_dim1(t.index_select(0, rows), width.get(n, S))
                                       for n, t in self._others().items()})

    @staticmethod
    def cat(parts: Sequence["TrainBatch"]) -> "TrainBatch":
        """Stack batches of different widths (history and slate padded to the widest)."""
        h = Actions.cat([p.history for p in parts])
        S = max(p.slate_items.shape[1] for p in parts)
        width = {"history_labels": h.width, "targets": h.width}
        return TrainBatch(history=h, **{n: torch.cat([_pad_dim1(getattr(p, n), width.get(n, S)) for p in parts])
                                        for n in parts[0]._others()})

    @property
    def num_tokens(self) -> int:
        return int(self.history.lengths.sum()) + int(self.slate_valid.sum())


def _pad_dim1(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad (or cut) dim 1 of a (B, W, ...) tensor to `width` with zeros / False."""
    if t.shape[1] >= width:
        return t[:, :width]
    return torch.cat([t, t.new_zeros((t.shape[0], width - t.shape[1], *t.shape[2:]))], dim=1)


@dataclass(frozen=True)
class TaskSpec:
    """TaskConfig resolved against an action vocabulary."""

    names: tuple[str, ...]
    task_matrix: np.ndarray  # (num_actions, T) bool: action a is positive for task t
    positive: np.ndarray  # (num_actions,) bool: action counts as a retrieval positive

    @classmethod
    def resolve(cls, tasks, actions: ActionVocab) -> "TaskSpec":
        """tasks: a TaskConfig (positive_actions, tasks)."""
        names = tuple(tasks.tasks)
        m = np.zeros((actions.size, len(names)), dtype=bool)
        for j, name in enumerate(names):
            for a in tasks.tasks[name]:
                try:
                    m[actions.id(a), j] = True
                except ValueError as e:
                    raise ValueError(f"tasks.{name}: {e}") from None
        pos = np.zeros(actions.size, dtype=bool)
        for a in tasks.positive_actions:
            try:
                pos[actions.id(a)] = True
            except ValueError as e:
                raise ValueError(f"positive_actions: {e}") from None
        return cls(names, m, pos)

    @property
    def num_tasks(self) -> int:
        return len(self.names)


def _list_column(col: pa.ChunkedArray | pa.Array):
    """A list<struct> column -> (offsets (B+1,), {field: flat numpy values})."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values
    if offsets[0] != 0 or len(values) != offsets[-1]:  # sliced array
        values = values.slice(offsets[0], offsets[-1] - offsets[0])
        offsets = offsets - offsets[0]
    return offsets, {f.name: values.field(i).to_numpy(zero_copy_only=False) for i, f in enumerate(values.type)}


def _pad(offsets: np.ndarray, values: np.ndarray, keep_last: int | None, fill=0) -> tuple[np.ndarray, np.ndarray]:
    """Flat ragged values -> right-padded (B, W) keeping the last `keep_last` of each row."""
    lengths = np.diff(offsets)
    start = offsets[:-1]
    if keep_last is not None:
        start = offsets[1:] - np.minimum(lengths, keep_last)
        lengths = offsets[1:] - start
    W = max(1, int(lengths.max()) if len(lengths) else 1)
    out = np.full((len(lengths), W), fill, dtype=values.dtype if values.dtype != bool else bool)
    row = np.repeat(np.arange(len(lengths)), lengths)
    col = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[row, col] = values[np.repeat(start, lengths) + col]
    return out, lengths


def _history_columns(h_off: np.ndarray, h: dict, vocab: ItemVocab, max_history: int,
                     actions_type: type[Actions]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every per-action field of `actions_type`, right-padded (B, W), from the record's values
    (a field the records lack takes its declared default)."""
    cols, lengths = {}, None
    for name, (record, default) in actions_type.record_names().items():
        if record in h:
            values = h[record].astype(np.int64)
        elif default is not None:
            values = np.full(int(h_off[-1]), default, dtype=np.int64)
        else:
            raise ValueError(f"examples: history actions have no field {record!r}")
        if name == "items":
            values = vocab.lookup(values, unknown=0)
        cols[name], lengths = _pad(h_off, values, max_history)
    return cols, lengths


def collate_examples(batch: pa.RecordBatch | pa.Table, vocab: ItemVocab, spec: TaskSpec, max_history: int,
                     max_slate: int | None = None, *, actions_type: type[Actions] = Actions) -> TrainBatch:
    """UnifiedExamples -> TrainBatch. History truncated to the last `max_history`; slate kept in
    position order, the first `max_slate`. Unknown items become padding (they are skipped).

    Retrieval targets: at history position i the item at i+1 when its action is a positive; at
    the last position the first positive slate item (the next positive after the history)."""
    h_off, h = _list_column(batch.column("history"))
    s_off, s = _list_column(batch.column("slate"))
    B = batch.num_rows
    cols, lengths = _history_columns(h_off, h, vocab, max_history, actions_type)
    items, actions = cols["items"], cols["actions"]
    request_ts = batch.column("request_ts").to_numpy().astype(np.int64)

    # slate in position order
    s_len = np.diff(s_off)
    order = np.lexsort((s["position"], np.repeat(np.arange(B), s_len)))
    s_items = vocab.lookup(s["item_id"][order], unknown=0)
    s_actions = s["action"][order].astype(np.int64)
    s_positions = s["position"][order].astype(np.int64)
    if max_slate is not None:
        keep = (np.arange(len(order)) - np.repeat(s_off[:-1], s_len)) < max_slate
        s_items, s_actions, s_positions = s_items[keep], s_actions[keep], s_positions[keep]
        s_len = np.minimum(s_len, max_slate)
        s_off = np.concatenate([[0], np.cumsum(s_len)])
    slate_items, _ = _pad(s_off, s_items, None)
    slate_actions, _ = _pad(s_off, s_actions, None)
    slate_positions, _ = _pad(s_off, s_positions, None)
    W_s = slate_items.shape[1]
    slate_valid = (np.arange(W_s)[None] < s_len[:, None]) & (slate_items > 0)

    valid = (np.arange(items.shape[1])[None] < lengths[:, None]) & (items > 0)
    h_pos = spec.positive[actions.clip(0, len(spec.positive) - 1)] & valid
    targets = np.zeros_like(items)
    targets[:, :-1] = np.where(h_pos[:, 1:], items[:, 1:], 0)
    s_pos = spec.positive[slate_actions.clip(0, len(spec.positive) - 1)] & slate_valid
    first = s_pos.argmax(axis=1)
    has = s_pos.any(axis=1) & (lengths > 0)
    rows = np.flatnonzero(has)
    targets[rows, lengths[rows] - 1] = slate_items[rows, first[rows]]

    tm = spec.task_matrix.astype(np.float32)
    h_labels = tm[actions.clip(0, len(tm) - 1)] * valid[..., None]
    s_labels = tm[slate_actions.clip(0, len(tm) - 1)] * slate_valid[..., None]
    t = torch.from_numpy
    hist = actions_type(**{n: t(c) for n, c in cols.items()}, lengths=t(lengths.astype(np.int64)), request_ts=t(request_ts))
    return TrainBatch(history=hist, history_labels=t(h_labels), targets=t(targets), slate_items=t(slate_items),
                      slate_labels=t(s_labels), slate_valid=t(slate_valid), slate_actions=t(slate_actions),
                      slate_positions=t(slate_positions))
