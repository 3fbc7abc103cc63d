"""Per-action fields, declared once: `Actions` (right-padded tensors, a batch) and `History`
(one user's actions as numpy arrays, what stores and requests hand the engine).

A per-action field is a field of `Actions` made with `action_field(record_name)`. Every
operation here (pad, trim, slice, append, concatenate, move, select rows, count bytes,
compare) loops over `Actions.per_action_fields()`, and `History` keys its arrays by the
same names, so a subclass that adds one field gets all of them::

    @dataclass(kw_only=True)
    class DeviceActions(Actions):
        devices: torch.Tensor = action_field("device", default=0)

`items` holds embedding rows in a batch (0 = padding) and raw item ids in a `History`.
Imports torch and numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def action_field(record: str, *, default: int | None = None) -> Any:
    """A per-action field named `record` in the unified record and the request; `default` is
    its value where a record or request leaves it out (None: required)."""
    return field(default=None, metadata={"record": record, "default": default})


class ActionError(ValueError):
    """A history the model cannot read; `field` names the action at fault (`history[3].ts`)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(kw_only=True)
class Actions:
    """Right-padded histories: real actions at 0..len-1 of each row, chronological."""

    items: torch.Tensor = action_field("item_id")  # (B, W) item rows, 0 = padding
    actions: torch.Tensor = action_field("action")  # (B, W) action ids
    ts: torch.Tensor = action_field("ts")  # (B, W) seconds
    surfaces: torch.Tensor = action_field("surface", default=0)  # (B, W)
    lengths: torch.Tensor  # (B,) real actions per row
    request_ts: torch.Tensor  # (B,) when each row's request was made

    _per_action: ClassVar[dict[type, tuple[str, ...]]] = {}

    @classmethod
    def per_action_fields(cls) -> tuple[str, ...]:
        """Names of the (B, W) fields, in declaration order."""
        if cls not in Actions._per_action:
            Actions._per_action[cls] = tuple(f.name for f in fields(cls) if "record" in f.metadata)
        return Actions._per_action[cls]

    _records: ClassVar[dict[type, dict]] = {}

    @classmethod
    def record_names(cls) -> dict[str, tuple[str, int | None]]:
        """attribute -> (name in the record / request, default when absent)."""
        if cls not in Actions._records:  # per class, once: every request's History asks
            Actions._records[cls] = {f.name: (f.metadata["record"], f.metadata["default"])
                                     for f in fields(cls) if "record" in f.metadata}
        return Actions._records[cls]

    def per_action(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.per_action_fields()}

    def _map(self, fn, rows=None) -> "Actions":
        """Apply fn to every per-action tensor (rows: to lengths/request_ts as well)."""
        extra = {} if rows is None else {"lengths": rows(self.lengths), "request_ts": rows(self.request_ts)}
        return replace(self, **{n: fn(t) for n, t in self.per_action().items()}, **extra)

    # --- shape ----------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def width(self) -> int:
        return self.items.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        """(B, W) True at real actions."""
        return torch.arange(self.width, device=self.lengths.device)[None] < self.lengths[:, None]

    def last(self, name: str = "ts") -> torch.Tensor:
        """(B,) each row's last value of a field (0 where the history is empty)."""
        t = getattr(self, name)
        idx = (self.lengths - 1).clamp(min=0)[:, None]
        return torch.where(self.lengths > 0, t.gather(1, idx)[:, 0], torch.zeros_like(self.lengths))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.per_action().values(), self.lengths, self.request_ts))

    # --- operations -----------------------------------------------------------------------

    def to(self, device, non_blocking: bool = False) -> "Actions":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return self._map(move, rows=move)

    def index_select(self, rows) -> "Actions":
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        pick = lambda t: t.index_select(0, rows)  # noqa: E731
        return self._map(pick, rows=pick)

    def pad(self, width: int) -> "Actions":
        """Right-pad (or cut) every row to `width` columns."""
        return self._map(lambda t: F.pad(t, (0, width - t.shape[1])))

    def trim(self) -> "Actions":
        """Cut the padding columns no row uses (width max(1, longest row))."""
        return self.pad(max(1, int(self.lengths.max())) if self.batch_size else 1)

    def keep_last(self, width: int) -> "Actions":
        """Each row's last min(len, width) actions, right-padded to `width`."""
        shift = (self.lengths - width).clamp(min=0)  # (B,)
        idx = (shift[:, None] + torch.arange(width, device=self.lengths.device)[None])  # (B, width)

        def cut(t):
            t = F.pad(t, (0, max(0, width - t.shape[1])))
            return torch.gather(t, 1, idx.clamp(max=t.shape[1] - 1)) * (idx < self.lengths[:, None])

        return replace(self._map(cut), lengths=self.lengths.clamp(max=width))

    def append(self, new: "Actions") -> "Actions":
        """Row-wise: each row's `new` actions follow its own (padding zeroed); request_ts is the new one's."""
        W, Wn = self.width, new.width
        valid_new = new.valid
        dest = self.lengths[:, None] + torch.arange(Wn, device=self.lengths.device)[None]  # (B, Wn)

        total = self.lengths + new.lengths
        keep = torch.arange(W + Wn, device=total.device)[None] < total[:, None]  # (B, W + Wn) real actions

        def join(a, b):
            out = F.pad(a, (0, Wn))  # (B, W + Wn)
            return out.scatter(1, dest, torch.where(valid_new, b, out.gather(1, dest))) * keep

        joined = {n: join(a, getattr(new, n)) for n, a in self.per_action().items()}
        out = replace(self, **joined, lengths=total, request_ts=new.request_ts)
        return out.pad(max(1, int(out.lengths.max())) if W + Wn else 1)

    @classmethod
    def cat(cls, parts: Sequence["Actions"]) -> "Actions":
        """Stack batches of different widths into one (padding to the widest)."""
        W = max(p.width for p in parts)
        padded = [p.pad(W) for p in parts]
        cols = {n: torch.cat([getattr(p, n) for p in padded]) for n in parts[0].per_action_fields()}
        return replace(parts[0], **cols, lengths=torch.cat([p.lengths for p in parts]),
                       request_ts=torch.cat([p.request_ts for p in parts]))

    def row(self, b: int) -> "Actions":
        """Row b as a batch of one, without padding."""
        return self.index_select([b]).trim()

    # --- from numpy histories -------------------------------------------------------------

    @classmethod
    def from_histories(cls, histories: Sequence["History"], request_ts: Sequence[int], *,
                       vocab=None, max_history: int | None = None, device="cpu", rows: int | None = None,
                       width: int | None = None, out: torch.Tensor | None = None,
                       staging: torch.Tensor | None = None) -> "Actions":
        """Histories (raw ids mapped through `vocab`, or already rows when vocab is None) ->
        one right-padded batch of each one's last `max_history` actions, in one host buffer
        (pinned when `device` is CUDA) and one copy to `device`. `rows`/`width`: pad the batch
        to at least that many rows (empty histories) and columns (static shapes on a GPU).
        `out`: a `flat_size(rows, width)` tensor on `device` to copy into (a CUDA graph's static
        input: the batch is then views of it, and nothing is copied again). `staging`: a host
        buffer of that size to build the batch in (a pinned one kept for reuse: allocating one
        per batch cost 25 us on the GPU machine)."""
        if len(histories) != len(request_ts):
            raise ValueError(f"{len(histories)} histories but {len(request_ts)} request_ts values")
        kept = [h if max_history is None else h.last(max_history) for h in histories]
        names = cls.per_action_fields()
        n, F_ = len(kept), len(names)
        lens = [len(h) for h in kept]
        B, W = max(n, rows or 0), max(1, width or 0, *lens)
        pin = torch.device(device).type == "cuda"
        # empty, not zeros: each row's padding is cleared as it is filled (zeroing the whole buffer
        # first cost several times the copy itself)
        size = F_ * B * W + 2 * B  # fields, lengths, request_ts
        for name, given in (("staging", staging), ("out", out)):
            if given is not None and given.numel() != size:
                raise ValueError(f"{name}: {given.numel()} elements, the batch needs {size} ({B} rows x {W})")
        host = torch.empty(size, dtype=torch.long, pin_memory=pin) if staging is None else staging
        flat = host.numpy()
        buf = flat[:F_ * B * W].reshape(F_, B, W)
        if n < B:
            buf[:, n:] = 0  # padding rows
        for b, (h, k) in enumerate(zip(kept, lens)):  # a row a field at a time: one copy each
            arrays = h.arrays
            for j, name in enumerate(names):
                buf[j, b, :k] = arrays[name] if j or vocab is None or not k else vocab.lookup(h.items)
            if k < W:
                buf[:, b, k:] = 0
        tail = flat[F_ * B * W:]
        tail[:n] = lens
        tail[B:B + n] = request_ts
        if n < B:
            tail[n:B] = 0
            tail[B + n:] = 0
        if out is None:
            return cls.of_flat(host.to(device, non_blocking=pin), B, W)
        return cls.of_flat(out.copy_(host, non_blocking=pin), B, W)

    @classmethod
    def stack_rows(cls, fields: Sequence[torch.Tensor], tail: torch.Tensor, *, rows: int, width: int,
                   out: torch.Tensor | None = None) -> "Actions":
        """Rows already on the device, each its per-action fields stacked, (fields, 1, w) (a
        cached row's `KVCache.history_stacked`), and the batch's tail, lengths then request_ts
        (2 * rows longs: pinned host or device) -> one right-padded batch of `rows` x `width` in
        `out` (a `flat_size` tensor, e.g. a CUDA graph's static input) or a new one, by device
        copies in one call: `from_histories`'s batch without building it on the host."""
        flat = torch.zeros(cls.flat_size(rows, width), dtype=torch.long, device=fields[0].device) \
            if out is None else out.zero_()
        n = len(cls.per_action_fields()) * rows * width
        whole = flat[:n].view(-1, rows, width)
        dst = [whole[:, b:b + 1, :f.shape[2]] for b, f in enumerate(fields)]
        torch._foreach_copy_([*dst, flat[n:]], [*fields, tail], non_blocking=True)
        return cls.of_flat(flat, rows, width)

    @classmethod
    def flat_size(cls, rows: int, width: int) -> int:
        """Elements of a batch's flat buffer: every per-action field, then lengths and request_ts."""
        return len(cls.per_action_fields()) * rows * width + 2 * rows

    @classmethod
    def of_flat(cls, flat: torch.Tensor, rows: int, width: int) -> "Actions":
        """The batch whose fields are views of `flat` (`flat_size(rows, width)` longs)."""
        names = cls.per_action_fields()
        n = len(names) * rows * width
        lengths, request_ts = flat[n:].view(2, rows).unbind(0)
        return cls(**dict(zip(names, flat[:n].view(len(names), rows, width).unbind(0))), lengths=lengths,
                   request_ts=request_ts)


class History:
    """One user's actions, chronological, as equal-length int64 arrays (raw item ids), under
    the per-action field names of `spec` (an `Actions` class)."""

    __slots__ = ("spec", "arrays")

    def __init__(self, spec: type[Actions] = Actions, **arrays):
        names = spec.per_action_fields()
        defaults = spec.record_names()
        unknown = set(arrays) - set(names)
        if unknown:
            raise ValueError(f"History: unknown per-action field(s) {sorted(unknown)} (fields: {list(names)})")
        n = len(np.asarray(arrays["items"]).reshape(-1)) if "items" in arrays else 0
        cols = {}
        for name in names:
            if name in arrays:
                cols[name] = np.asarray(arrays[name], dtype=np.int64).reshape(-1)
            elif defaults[name][1] is not None or n == 0:
                cols[name] = np.full(n, defaults[name][1] or 0, dtype=np.int64)
            else:
                raise ValueError(f"History: field {name!r} is required")
        if any(len(a) != n for a in cols.values()):
            raise ValueError("History arrays must have equal lengths")
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "arrays", cols)

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.arrays[name]
        except KeyError:
            raise AttributeError(name) from None

    def __len__(self) -> int:
        return len(self.arrays["items"])

    @classmethod
    def _trusted(cls, spec: type[Actions], arrays: dict[str, np.ndarray]) -> "History":
        """From arrays already checked (int64, equal lengths, every field): no checks again."""
        h = object.__new__(cls)
        object.__setattr__(h, "spec", spec)
        object.__setattr__(h, "arrays", arrays)
        return h

    def _new(self, fn) -> "History":
        return History._trusted(self.spec, {n: fn(a) for n, a in self.arrays.items()})

    def last(self, n: int) -> "History":
        return self if n >= len(self) else self._new(lambda a: a[len(self) - n:])

    def take(self, index) -> "History":
        """Actions at an index array or boolean mask."""
        return self._new(lambda a: a[index])

    def with_items(self, items: np.ndarray) -> "History":
        items = np.asarray(items, dtype=np.int64).reshape(-1)
        if len(items) != len(self):
            raise ValueError("History arrays must have equal lengths")
        return History._trusted(self.spec, {**self.arrays, "items": items})

    def concat(self, new: "History") -> "History":
        return History(self.spec, **{n: np.concatenate([a, new.arrays[n]]) for n, a in self.arrays.items()})

    def as_bytes(self) -> tuple[bytes, ...]:
        """The actions' arrays as bytes, field by field: what the KV cache keeps to compare with."""
        return tuple(a.tobytes() for a in self.arrays.values())

    def starts_with(self, actions: tuple[bytes, ...], length: int) -> bool:
        """True when this history's first `length` actions are exactly `actions` (`as_bytes` of
        a history of that length): bytes compared field by field, stopping at the first that
        differs (12 us for 2,048 equal actions of 8 fields, where SHA-256 over them took 98)."""
        return len(self) >= length and len(actions) == len(self.arrays) and all(
            a[:length].tobytes() == b for a, b in zip(self.arrays.values(), actions))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @classmethod
    def empty(cls, spec: type[Actions] = Actions) -> "History":
        return cls(spec)

    @classmethod
    def from_actions(cls, actions: Iterable, spec: type[Actions] = Actions) -> "History":
        """From dicts {item_id, action, ts[, surface]} (record names) or objects with those attributes."""
        actions = list(actions)
        recs = spec.record_names()
        if not actions:
            return cls.empty(spec)

        def values():  # one flat pass, no per-action tuples (this runs on every request)
            for a in actions:
                get = a.get if isinstance(a, Mapping) else (lambda k, d=None, a=a: getattr(a, k, d))
                for rec, default in recs.values():
                    v = get(rec, default)
                    if v is None:
                        raise KeyError(rec)
                    yield v

        k = len(recs)
        arr = np.fromiter(values(), dtype=np.int64, count=k * len(actions)).reshape(len(actions), k)
        return cls(spec, **{name: arr[:, j] for j, name in enumerate(recs)})

    @classmethod
    def from_tuples(cls, actions: Iterable[tuple], spec: type[Actions] = Actions, where: str = "history") -> "History":
        """From (item_id, action, ts[, surface, ...]) tuples in field order; trailing optional
        fields may be left out."""
        names = spec.per_action_fields()
        rows = []
        for i, a in enumerate(actions):
            if not 3 <= len(a) <= len(names):
                raise ActionError(f"{where}[{i}]", f"expected {len(names)} values ({', '.join(names)}) "
                                  f"with the optional ones last, got {a!r}")
            rows.append(tuple(a) + tuple(spec.record_names()[n][1] or 0 for n in names[len(a):]))
        arr = np.asarray(rows, dtype=np.int64).reshape(len(rows), len(names))
        return cls(spec, **{n: arr[:, j] for j, n in enumerate(names)})


def _id_bounds(num_actions: int | None, num_surfaces: int | None) -> list[tuple[str, str, int, str]]:
    """(History field, record name, exclusive bound, what an id is) of the per-action ids a
    model bounds: action ids always, surface ids when it embeds them."""
    return [b for b in (("actions", "action", num_actions, "an action id"),
                        ("surfaces", "surface", num_surfaces, "a surface id of this model")) if b[2] is not None]


def _outside(values, bound: int) -> np.ndarray:
    """Per id, whether it is outside 0..bound-1 (one comparison: a negative id is huge as uint64)."""
    return np.asarray(values, np.int64).view(np.uint64) >= bound


def ids_out_of_range(field, num_actions: int | None = None, num_surfaces: int | None = None) -> np.ndarray:
    """Per action, whether any bounded id (`_id_bounds`) is outside 0..bound-1; `field(name)`
    gives a History field's array."""
    out = None
    for name, _, bound, _ in _id_bounds(num_actions, num_surfaces):
        wrong = _outside(field(name), bound)
        out = wrong if out is None else out | wrong
    return np.zeros(len(field("items")), dtype=bool) if out is None else out


def check_history(h: History, vocab, num_actions: int | None = None, where: str = "history", offset: int = 0,
                  num_surfaces: int | None = None) -> np.ndarray:
    """The one validation path for a client's history: known items, action ids in range (and
    surface ids, for a model that embeds them), chronological. Returns the embedding rows of
    its items; raises ActionError naming the first action at fault (`offset`: where h starts in
    the history the client sent)."""
    rows = vocab.lookup(h.items, unknown=0)
    bad = np.flatnonzero(rows == 0)
    if len(bad):
        j = int(bad[0])
        raise ActionError(f"{where}[{j + offset}].item_id", f"unknown item id {int(h.items[j])}")
    for name, record, bound, what in _id_bounds(num_actions, num_surfaces):
        values = h.arrays[name]
        bad = np.flatnonzero(_outside(values, bound))
        if len(bad):
            j = int(bad[0])
            raise ActionError(f"{where}[{j + offset}].{record}", f"{int(values[j])} is not {what} (0..{bound - 1})")
    back = np.flatnonzero(np.diff(h.ts) < 0)
    if len(back):
        j = int(back[0]) + 1
        raise ActionError(f"{where}[{j + offset}].ts", "history must be chronological (ts never decreasing)")
    return rows


def check_histories(hs: Sequence[History], vocab, num_actions: int | None = None, where: str = "history",
                    offsets: Sequence[int] | None = None, num_surfaces: int | None = None) -> list:
    """`check_history` of many histories in one pass over their concatenation (one vocabulary
    look-up, one range check, one order check): per history its embedding rows, or the
    ActionError naming its first action at fault, exactly as `check_history` would."""
    if not hs:
        return []
    lens = np.fromiter((len(h) for h in hs), dtype=np.int64, count=len(hs))
    one = len(hs) == 1  # the usual batch of one: no concatenation, no split (half of this at batch 1)
    cat = (lambda name: hs[0].arrays[name]) if one else (  # noqa: E731
        lambda name: np.concatenate([h.arrays[name] for h in hs]))
    rows, ts = vocab.lookup(cat("items"), unknown=0), cat("ts")
    wrong = (rows == 0) | ids_out_of_range(cat, num_actions, num_surfaces)
    back = ts[1:] < ts[:-1]  # back[j]: action j + 1 is before action j
    ends = np.cumsum(lens)
    if not one:
        starts = ends[:-1][(ends[:-1] > 0) & (ends[:-1] < len(ts))]
        back[starts - 1] = False  # a history's first action follows nothing
    wrong[1:] |= back
    parts = [rows] if one else np.split(rows, ends[:-1])
    if not wrong.any():
        return parts
    out: list = []
    for i, h in enumerate(hs):
        if wrong[ends[i] - lens[i]:ends[i]].any():  # the slow path names the action
            try:
                check_history(h, vocab, num_actions, where, 0 if offsets is None else offsets[i], num_surfaces)
            except ActionError as e:
                out.append(e)
                continue
        out.append(parts[i])
    return out


__all__ = ["Actions", "ActionError", "History", "action_field", "check_histories", "check_history", "ids_out_of_range"]
