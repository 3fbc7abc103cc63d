"""History resolution, the first stage of a request: the client's history (validated by the
one path `sequences.check_history`) or the online store's (cleaned: the store is ours, so what
the model cannot read is dropped, not refused), and the request time."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..sequences import ActionError, Actions, History, check_histories, check_history, ids_out_of_range
from .kv_cache import Lookup, UserKVCache
from .request import Request, ServingError
from .store import OnlineStore
from .timing import StageTimer


@dataclass
class Resolved:
    req: Request
    history: History  # chronological, raw item ids, not yet cut to the model's L
    rows: np.ndarray  # embedding rows of history.items
    request_ts: int
    source: str  # "request" | "store" | "handle"
    cached: Lookup | None = None  # a cross-request cache hit found before the checks (UserKVCache.probe)
    # the known items of client actions dropped before validation (beyond L): never encoded, but
    # excluded with the rest of the history (`exclude_seen`)
    dropped_items: np.ndarray | None = None  # raw item ids
    dropped_rows: np.ndarray | None = None  # their embedding rows

    def seen_items(self) -> np.ndarray:
        """Raw ids of every item of the history as sent: what `exclude_seen` excludes."""
        return self.history.items if self.dropped_items is None else np.concatenate([self.dropped_items, self.history.items])

    def seen_rows(self) -> np.ndarray:
        """Embedding rows of `seen_items`."""
        return self.rows if self.dropped_rows is None else np.concatenate([self.dropped_rows, self.rows])

    def window(self, max_history: int, start: int = 0) -> History:
        """The last `max_history` actions (from `start` of those on), items as embedding rows:
        what the model encodes."""
        n0 = max(0, len(self.rows) - max_history)
        return self.history.with_items(self.rows).take(slice(n0 + start, None))

    def raw_window(self, max_history: int) -> History:
        """The last `max_history` actions with the item ids as sent: what the cross-request
        cache compares (the same decision as comparing rows, and possible before the checks)."""
        return self.history.last(max_history)


def _client_history(req: Request, spec: type[Actions] = Actions) -> History:
    """The request's history as arrays: columnar as sent, or the list of objects in one pass."""
    cols = req.history_columns
    if cols is None:
        return History.from_actions(req.history, spec)
    names = spec.record_names()
    n = len(next(iter(cols.values()))) if cols else 0
    arrays = {}
    for attr, (rec, default) in names.items():  # validated at parsing: int64, equal lengths
        if rec in cols:
            arrays[attr] = cols[rec]
        elif default is not None:  # left out (e.g. surface): its default, as History would fill it
            arrays[attr] = np.full(n, default, dtype=np.int64)
        else:  # a required field missing: History names it
            return History(spec, **{a: cols[r] for a, (r, _) in names.items() if r in cols})
    return History._trusted(spec, arrays)


class HistoryResolver:
    def __init__(self, vocab, num_actions: int, store: OnlineStore | None = None, actions_type: type[Actions] = Actions,
                 cache: UserKVCache | None = None, num_surfaces: int | None = None):
        self.vocab = vocab
        self.num_actions = num_actions
        self.num_surfaces = num_surfaces  # the surface ids a client may send; None: the model reads none
        self.store = store
        self.actions_type = actions_type  # the model's per-action fields
        self.cache = cache  # the engine's cross-request cache: hits skip the checks (`_probe`)

    def resolve(self, reqs: Sequence[Request], timer: StageTimer) -> list[Resolved | ServingError]:
        need = [i for i, r in enumerate(reqs) if not r.has_history]
        stored: dict[int, History | None] = {}
        if need and self.store is None:
            return [ServingError(422, "history", "required: this server has no online store to read it from")
                    if not r.has_history else self.resolve_one(r, None) for r in reqs]
        if need:
            with timer.stage("lookup"):
                stored = dict(zip(need, self.store.get_histories([reqs[i].user_id for i in need])))
        hs = {i: _client_history(r, self.actions_type) for i, r in enumerate(reqs) if r.has_history}
        probed = self._probe(reqs, hs)
        check = [i for i in hs if i not in probed]  # validated together: one pass
        checked = dict(zip(check, zip([hs[i] for i in check], check_histories(
            [hs[i] for i in check], self.vocab, self.num_actions, offsets=[reqs[i].history_offset for i in check],
            num_surfaces=self.num_surfaces))))
        checked.update({i: (hs[i], lk.rows) for i, lk in probed.items()})
        out = [self.resolve_one(r, stored.get(i), checked.get(i)) for i, r in enumerate(reqs)]
        for i, lk in probed.items():
            out[i].cached = lk
        return out

    def _probe(self, reqs: Sequence[Request], hs: dict) -> dict[int, Lookup]:
        """The requests whose whole history is, byte for byte, the one cached for their user
        (`UserKVCache.probe`) and whose request_ts is not before its last action: their checks
        would pass, so they are skipped (a 2,048-action history's checks and look-up: 33 us)."""
        if self.cache is None or not self.cache.enabled:
            return {}
        out = {}
        for i, h in hs.items():
            ts = reqs[i].request_ts
            if len(h) and (ts is None or ts >= h.ts[-1]):
                lk = self.cache.probe(reqs[i].user_id, h, ts)
                if lk is not None:
                    out[i] = lk
        return out

    def resolve_one(self, req: Request, from_store: History | None, checked=None) -> Resolved | ServingError:
        """checked: (the client's history, its rows or ActionError) when validated already."""
        if req.has_history:
            h, rows = checked if checked is not None else (_client_history(req, self.actions_type), None)
            source = "request"
            if rows is None:
                try:
                    rows = check_history(h, self.vocab, self.num_actions, offset=req.history_offset,
                                         num_surfaces=self.num_surfaces)
                except ActionError as e:
                    rows = e
            if isinstance(rows, ActionError):
                return ServingError(422, rows.field, rows.message)
        else:
            h, source = (from_store if from_store is not None else History.empty(self.actions_type)), "store"
            h, rows = self._clean(h)
        last_ts = int(h.ts[-1]) if len(h) else 0
        if req.request_ts is not None and req.request_ts < last_ts:
            return ServingError(422, "request_ts", f"{req.request_ts} is before the last history action ({last_ts})")
        out = Resolved(req, h, rows, max(int(time.time()), last_ts) if req.request_ts is None else req.request_ts, source)
        if req.dropped_items is not None and req.exclude_seen:  # each item once: they size the seen buffer
            items = np.unique(req.dropped_items)
            known = self.vocab.lookup(items, unknown=0)
            out.dropped_items, out.dropped_rows = items[known > 0], known[known > 0]
        return out

    def _clean(self, h: History) -> tuple[History, np.ndarray]:
        rows = self.vocab.lookup(h.items, unknown=0)
        # what a client's history would be refused for (a cached window's rows are probed unchecked)
        keep = (rows > 0) & ~ids_out_of_range(h.arrays.__getitem__, self.num_actions, self.num_surfaces)
        if not keep.all():
            h, rows = h.take(keep), rows[keep]
        order = np.argsort(h.ts, kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            h, rows = h.take(order), rows[order]
        return h, rows
