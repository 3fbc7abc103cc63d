"""The serving engine: request -> history -> encode once -> ANN retrieval -> rank on the same
KV cache -> utility -> top-k (DESIGN sections 3 and 5). No TorchServe here: the handler in
`serving/` is a thin adapter, and tests and benchmarks call the engine in-process too.

One class serves the three ways the benchmark compares:

- unified, KV shared (`share_kv=True`): one `encode_history`; ranking attends to its KV cache;
- unified, re-encoding (`share_kv=False`): ranking encodes the history a second time;
- two models (`ranking=` another model): a retrieval-only model encodes for retrieval, a
  ranking-only model encodes again for ranking (the paper's baseline).

Requests handed over together (TorchServe batching) go through each stage as one batch:
histories right-padded to the longest, candidates padded with row 0 and masked.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..sequences import Actions, ActionError, History, check_history
from .kv_cache import HandleState, HandleStore, UserKVCache
from .request import Limits, Request, ServingError, parse_request
from .store import OnlineStore


@dataclass
class EngineConfig:
    share_kv: bool = True  # False: re-encode the history for ranking (benchmark mode b)
    kv_cache_bytes: int = 256 * 2**20  # cross-request KV cache; 0 turns it off
    handle_bytes: int = 256 * 2**20  # split retrieve/rank state
    handle_ttl_s: float = 120.0
    max_k: int = 1000
    max_candidates: int = 5000
    max_history_request: int = 100_000
    max_body_bytes: int = 4 * 2**20
    device: str = "cpu"

    def validate(self) -> None:
        for name in ("max_k", "max_candidates", "max_history_request", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.kv_cache_bytes < 0 or self.handle_bytes < 0 or self.handle_ttl_s <= 0:
            raise ValueError("cache sizes must be >= 0 and handle_ttl_s positive")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_k, self.max_candidates, self.max_history_request, self.max_body_bytes,
                      self.max_candidates)


@dataclass
class _Prepared:
    req: Request
    history: History  # resolved: rows known, chronological, not yet truncated
    rows: np.ndarray  # embedding rows of history.items (raw ids)
    request_ts: int
    source: str  # "request" | "store"


def _window(p: _Prepared, max_history: int, start: int = 0) -> History:
    """The last `max_history` actions (from `start` of those on), items as embedding rows:
    what the model encodes."""
    n0 = max(0, len(p.rows) - max_history)
    return p.history.with_items(p.rows).take(slice(n0 + start, None))


class _Timer:
    def __init__(self, device: torch.device):
        self.ms: dict[str, float] = {}
        self.cuda = device.type == "cuda"

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                if timer.cuda:
                    torch.cuda.synchronize()
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                if timer.cuda:
                    torch.cuda.synchronize()
                timer.ms[name] = timer.ms.get(name, 0.0) + (time.perf_counter() - self.t) * 1000

        return _Stage()


class Engine:
    """Serves requests with a retrieval model + item index and a ranking model (the same
    model, unified, unless `ranking` is given)."""

    def __init__(self, retrieval, index, *, ranking=None, config: EngineConfig | None = None,
                 store: OnlineStore | None = None, popularity: np.ndarray | None = None):
        from ..batches import ItemVocab  # noqa: F401  (fail early if the library is incomplete)

        self.config = config or EngineConfig()
        self.config.validate()
        self.device = torch.device(self.config.device)
        self.ret = retrieval
        self.rnk = ranking if ranking is not None else retrieval
        self.two_models = ranking is not None and ranking is not retrieval
        if self.ret.kind not in ("unified", "retrieval_only"):
            raise ValueError(f"the retrieval model is {self.ret.kind!r}: it needs a retrieval head")
        if self.rnk.kind not in ("unified", "ranking_only"):
            raise ValueError(f"the ranking model is {self.rnk.kind!r}: it needs a ranking head")
        if self.two_models and not np.array_equal(self.ret.vocab.item_ids, self.rnk.vocab.item_ids):
            raise ValueError("the retrieval and ranking models must embed the same items")
        if getattr(index, "model_version", None) != self.ret.version:
            from ..index import IndexVersionMismatch

            raise IndexVersionMismatch(f"index model_version {getattr(index, 'model_version', None)!r} differs from "
                                       f"the retrieval model's {self.ret.version!r}")
        for m in {id(self.ret): self.ret, id(self.rnk): self.rnk}.values():
            m.model.to(self.device).eval()
        self.share_kv = self.config.share_kv and not self.two_models
        self.index = index
        self.store = store
        self.vocab = self.ret.vocab
        self.num_actions = self.ret.model.config.num_actions
        self.task_names = list(self.rnk.tasks.tasks)
        weights = self.rnk.tasks.score_weights
        self.weights = torch.tensor([float(weights.get(t, 0.0)) for t in self.task_names], device=self.device)
        self.model_version = self.ret.version if not self.two_models else f"{self.ret.version}+{self.rnk.version}"
        self.limits = self.config.limits
        with torch.inference_mode():
            self.item_vectors = self.ret.model.item_vectors().to(self.device)  # (N+1, D)
        self.user_cache = UserKVCache(self.config.kv_cache_bytes,
                                      request_dependent=self.ret.model.config.time_gap == "request")
        self.handles = HandleStore(self.config.handle_bytes, self.config.handle_ttl_s)
        # cold start: the most popular items (counts aligned with the vocab; default: catalog order)
        n = len(self.vocab)
        pop = np.asarray(popularity, dtype=np.float64) if popularity is not None else np.linspace(1.0, 0.5, n)
        if len(pop) != n:
            raise ValueError(f"popularity has {len(pop)} entries for {n} items")
        order = np.argsort(-pop, kind="stable")
        self.popular_ids = self.vocab.item_ids[order]
        self.popular_scores = (pop[order] / max(pop.sum(), 1e-12)).astype(np.float32)

    # --- construction from folders --------------------------------------------------------------

    @classmethod
    def from_dirs(cls, model_dir: str | Path, index_dir: str | Path | None = None, *,
                  ranking_dir: str | Path | None = None, config: EngineConfig | None = None,
                  store: OnlineStore | None = None) -> "Engine":
        """Load a model folder (+ a ranking model folder for the two-model baseline) and the
        index built for the retrieval model; the index must carry the model's version."""
        from ..checkpoint import load_model
        from ..index import ItemIndex

        config = config or EngineConfig()
        retrieval = load_model(model_dir, device=config.device)
        ranking = load_model(ranking_dir, device=config.device) if ranking_dir else None
        if index_dir is None:
            raise ValueError("an index folder is needed (`unipinrec index build`)")
        index = ItemIndex.load(index_dir, expect_model_version=retrieval.version)
        popularity = None
        pop_path = Path(index_dir) / "popularity.npy"
        if pop_path.exists():
            counts = np.load(pop_path, allow_pickle=False)
            popularity = np.zeros(len(retrieval.vocab))
            popularity[retrieval.vocab.lookup(index.item_ids) - 1] = counts
        return cls(retrieval, index, ranking=ranking, config=config, store=store, popularity=popularity)

    # --- entry points ---------------------------------------------------------------------------

    def handle(self, body: Any) -> dict:
        """One request body (bytes / str / dict) -> response dict; raises ServingError."""
        req = body if isinstance(body, Request) else parse_request(body, self.limits)
        out = self.handle_batch([req])[0]
        if isinstance(out, ServingError):
            raise out
        return out

    def handle_batch(self, requests: Sequence[Request]) -> list[dict | ServingError]:
        """Validated requests -> one response dict or ServingError per request, in order."""
        out: list[dict | ServingError | None] = [None] * len(requests)
        by_stage: dict[str, list[int]] = {"all": [], "retrieve": [], "rank": []}
        for i, r in enumerate(requests):
            by_stage[r.stage].append(i)
        with torch.inference_mode():
            if by_stage["all"] or by_stage["retrieve"]:
                idx = by_stage["all"] + by_stage["retrieve"]
                for i, res in zip(idx, self._retrieve_and_rank([requests[i] for i in idx])):
                    out[i] = res
            if by_stage["rank"]:
                for i, res in zip(by_stage["rank"], self._rank_handles([requests[i] for i in by_stage["rank"]])):
                    out[i] = res
        return out  # type: ignore[return-value]

    # --- stages ---------------------------------------------------------------------------------

    def _prepare(self, reqs: Sequence[Request], timer: _Timer) -> list[_Prepared | ServingError]:
        need = [i for i, r in enumerate(reqs) if r.history is None]
        stored: dict[int, History | None] = {}
        if need:
            if self.store is None:
                return [ServingError(422, "history", "required: this server has no online store to read it from")
                        if r.history is None else self._prepare_one(r, None) for r in reqs]
            with timer.stage("lookup"):
                found = self.store.get_histories([reqs[i].user_id for i in need])
            stored = dict(zip(need, found))
        return [self._prepare_one(r, stored.get(i)) if i in stored else self._prepare_one(r, None)
                for i, r in enumerate(reqs)]

    def _prepare_one(self, req: Request, from_store: History | None) -> _Prepared | ServingError:
        if req.history is not None:
            h = History.from_actions(req.history)
            source = "request"
            try:
                rows = check_history(h, self.vocab, self.num_actions)
            except ActionError as e:
                return ServingError(422, e.field, e.message)
        else:
            # the store is ours, not the client's: drop what the model cannot read instead of failing
            h = from_store if from_store is not None else History.empty()
            source = "store"
            rows = self.vocab.lookup(h.items, unknown=0)
            keep = (rows > 0) & (h.actions < self.num_actions) & (h.actions >= 0)
            if not keep.all():
                h, rows = h.take(keep), rows[keep]
            order = np.argsort(h.ts, kind="stable")
            if not np.array_equal(order, np.arange(len(order))):
                h, rows = h.take(order), rows[order]
        last_ts = int(h.ts[-1]) if len(h) else 0
        if req.request_ts is not None:
            if req.request_ts < last_ts:
                return ServingError(422, "request_ts", f"{req.request_ts} is before the last history action ({last_ts})")
            request_ts = req.request_ts
        else:
            request_ts = max(int(time.time()), last_ts)
        return _Prepared(req, h, rows, request_ts, source)

    def _batch(self, preps: Sequence[_Prepared], max_history: int, start: Sequence[int] | None = None) -> Actions:
        """Right-padded batch of each prep's last `max_history` actions (from `start[i]` of those)."""
        windows = [_window(p, max_history, 0 if start is None else start[i]) for i, p in enumerate(preps)]
        return Actions.from_histories(windows, [p.request_ts for p in preps], device=self.device)

    def _encode(self, loaded, preps: Sequence[_Prepared], timer: _Timer, stage: str, use_cache: bool):
        """Encode each prep's history (reusing / extending the cross-request cache when asked).
        Returns (kv_cache of the batch in prep order, cache status per prep)."""
        from ..model import KVCache

        model = loaded.model
        L = model.config.max_history
        status = ["miss"] * len(preps)
        looked = [None] * len(preps)
        if use_cache and self.user_cache.enabled:
            for i, p in enumerate(preps):
                looked[i] = self.user_cache.lookup(p.req.user_id, _window(p, L), p.request_ts, L)
                status[i] = looked[i].status
        parts: list[tuple[Any, list[int]]] = []
        with timer.stage(stage):
            miss = [i for i, s in enumerate(status) if s == "miss"]
            if miss:
                _, kv = model.encode_history(self._batch([preps[i] for i in miss], L))
                parts.append((kv, miss))
            ext = [i for i, s in enumerate(status) if s == "extend"]
            if ext:
                cached = KVCache.cat([looked[i].kv.to(self.device) for i in ext])
                new = self._batch([preps[i] for i in ext], L, start=[looked[i].num_cached for i in ext])
                _, kv = model.extend_history(cached, new)
                parts.append((kv, ext))
            hit = [i for i, s in enumerate(status) if s == "hit"]
            if hit:
                parts.append((KVCache.cat([looked[i].kv.to(self.device) for i in hit]), hit))
            if len(parts) == 1:
                kv = parts[0][0]
            else:
                kv = KVCache.cat([p[0] for p in parts])
                order = [i for p in parts for i in p[1]]
                kv = kv.index_select(torch.as_tensor(np.argsort(order), device=self.device))
        if use_cache and self.user_cache.enabled:
            for i, p in enumerate(preps):
                if status[i] != "hit":
                    self.user_cache.put(p.req.user_id, kv.row(i), _window(p, L), p.request_ts)
        return kv, status

    def _search(self, preps: Sequence[_Prepared], user_vectors: torch.Tensor, timer: _Timer):
        """Top num_candidates per request (seen items excluded); cold starts get popular items."""
        C = max(p.req.num_candidates for p in preps)
        cold = [i for i, p in enumerate(preps) if len(p.rows) == 0]
        warm = [i for i, p in enumerate(preps) if len(p.rows) > 0]
        ids = [None] * len(preps)
        scores = [None] * len(preps)
        with timer.stage("retrieve"):
            if warm:
                q = user_vectors[warm].float().cpu().numpy() if not hasattr(self.index, "vectors") else user_vectors[warm]
                excl = [preps[i].history.items if preps[i].req.exclude_seen else None for i in warm]
                s, found = self.index.search(q, C, exclude=excl)
                for j, i in enumerate(warm):
                    n = preps[i].req.num_candidates
                    ok = found[j, :n] >= 0
                    ids[i], scores[i] = found[j, :n][ok], s[j, :n][ok]
            for i in cold:
                n = preps[i].req.num_candidates
                keep = slice(None)
                if preps[i].req.exclude_seen and len(preps[i].history):
                    keep = ~np.isin(self.popular_ids, preps[i].history.items)
                ids[i], scores[i] = self.popular_ids[keep][:n], self.popular_scores[keep][:n]
        return ids, scores

    def _rank(self, loaded, kv, cand_ids: Sequence[np.ndarray], request_ts: Sequence[int], timer: _Timer):
        """Task probabilities (C_i, T) and utilities (C_i,) per row, one batched `rank` call."""
        B = len(cand_ids)
        C = max([1] + [len(c) for c in cand_ids])
        rows = np.zeros((B, C), dtype=np.int64)
        for i, c in enumerate(cand_ids):
            if len(c):
                rows[i, :len(c)] = self.vocab.lookup(c)
        model = loaded.model
        with timer.stage("rank"):
            rts = torch.tensor(list(request_ts), dtype=torch.long, device=self.device)
            gaps = model.default_candidate_gaps(kv.lengths, kv.last_ts(), rts)
            logits = model.rank(torch.from_numpy(rows).to(self.device), kv, gaps)  # (B, C, T)
            probs = torch.sigmoid(logits.float())
            utility = probs @ self.weights
            probs, utility = probs.cpu().numpy(), utility.cpu().numpy()
        return [(probs[i, :len(c)], utility[i, :len(c)]) for i, c in enumerate(cand_ids)]

    def _items(self, k: int, ids, ret_scores, probs, utility) -> list[dict]:
        top = np.argsort(-utility, kind="stable")[:k]
        names = self.task_names
        return [{"item_id": int(ids[j]), "score": float(utility[j]), "retrieval_score": float(ret_scores[j]),
                 "tasks": {names[t]: float(probs[j, t]) for t in range(len(names))}} for j in top]

    def _retrieve_and_rank(self, reqs: Sequence[Request]) -> list[dict | ServingError]:
        t_all = time.perf_counter()
        timer = _Timer(self.device)
        prepared = self._prepare(reqs, timer)
        out: list[dict | ServingError] = [p if isinstance(p, ServingError) else None for p in prepared]
        ok = [i for i, p in enumerate(prepared) if not isinstance(p, ServingError)]
        if not ok:
            return out
        preps = [prepared[i] for i in ok]
        kv, status = self._encode(self.ret, preps, timer, "encode", use_cache=True)
        ids, scores = self._search(preps, kv.user_vectors, timer)
        full = [j for j, p in enumerate(preps) if p.req.stage == "all"]
        ranked: dict[int, tuple] = {}
        if full:
            rank_kv = kv if len(full) == len(preps) else kv.index_select(torch.as_tensor(full, device=self.device))
            if not self.share_kv:
                rank_kv, _ = self._encode(self.rnk, [preps[j] for j in full], timer, "encode_rank", use_cache=False)
            res = self._rank(self.rnk, rank_kv, [ids[j] for j in full], [preps[j].request_ts for j in full], timer)
            ranked = dict(zip(full, res))
        total = (time.perf_counter() - t_all) * 1000
        timings = {**{k: round(v, 3) for k, v in timer.ms.items()}, "total": round(total, 3)}
        for j, p in enumerate(preps):
            L = self.ret.model.config.max_history
            meta = {"model_version": self.model_version, "timings_ms": timings, "kv_cache": status[j],
                    "history_source": p.source, "history_length": int(min(len(p.rows), L)),
                    "history_truncated": int(max(0, len(p.rows) - L)), "cold_start": len(p.rows) == 0}
            if p.req.stage == "all":
                probs, util = ranked[j]
                out[ok[j]] = {"items": self._items(p.req.k, ids[j], scores[j], probs, util), **meta}
            else:
                state = HandleState(kv.row(j) if self.share_kv else None, p.history, p.request_ts,
                                    p.req.user_id, ids[j], scores[j], kv.user_vectors[j].clone())
                handle = self.handles.new(state)
                out[ok[j]] = {"handle": handle, "ttl_s": self.config.handle_ttl_s,
                              "candidates": [{"item_id": int(a), "retrieval_score": float(s)}
                                             for a, s in zip(ids[j], scores[j])], **meta}
        return out

    def _rank_handles(self, reqs: Sequence[Request]) -> list[dict | ServingError]:
        from ..model import KVCache

        t_all = time.perf_counter()
        timer = _Timer(self.device)
        out: list[dict | ServingError | None] = [None] * len(reqs)
        states, cands, rscores = [], [], []
        for i, r in enumerate(reqs):
            state, why = self.handles.get(r.handle)
            if state is None:
                if why == "missing":
                    out[i] = ServingError(404, "handle", f"unknown handle {r.handle!r}: handles come from stage "
                                          "'retrieve' and live only in the worker that made them")
                else:
                    out[i] = ServingError(410, "handle", f"handle {r.handle!r} has {why} (handles live "
                                          f"{self.config.handle_ttl_s:g} s); call stage 'retrieve' again")
                continue
            if state.user_id != r.user_id:
                out[i] = ServingError(422, "user_id", f"{r.user_id} is not the user of this handle")
                continue
            if r.candidates is not None:
                c = np.asarray(r.candidates, dtype=np.int64)
                # one sorted lookup validates and maps (np.isin would sort the whole vocab per request)
                c_rows = self.vocab.lookup(c, unknown=0)
                if not (c_rows > 0).all():
                    j = int(np.flatnonzero(c_rows == 0)[0])
                    out[i] = ServingError(422, f"candidates[{j}]", f"unknown item id {int(c[j])}")
                    continue
                rows = torch.from_numpy(c_rows).to(self.device) if len(c) else None
                s = (self.item_vectors[rows] @ state.user_vector).float().cpu().numpy() if len(c) else np.zeros(0, np.float32)
            else:
                c, s = state.candidates[: r.num_candidates], state.retrieval_scores[: r.num_candidates]
            states.append((i, state))
            cands.append(c)
            rscores.append(s)
        if states:
            idx = [i for i, _ in states]
            if self.share_kv:
                kv = KVCache.cat([st.kv.to(self.device) for _, st in states])
            else:
                preps = [_Prepared(reqs[i], st.history, self.vocab.lookup(st.history.items), st.request_ts, "handle")
                         for i, st in states]
                kv, _ = self._encode(self.rnk, preps, timer, "encode_rank", use_cache=False)
            res = self._rank(self.rnk, kv, cands, [st.request_ts for _, st in states], timer)
            timings = {**{k: round(v, 3) for k, v in timer.ms.items()},
                       "total": round((time.perf_counter() - t_all) * 1000, 3)}
            for j, i in enumerate(idx):
                probs, util = res[j]
                out[i] = {"items": self._items(reqs[i].k, cands[j], rscores[j], probs, util),
                          "model_version": self.model_version, "timings_ms": timings}
        return out  # type: ignore[return-value]


def engine_stats(engine: Engine) -> dict:
    """Counters for metrics and tests."""
    return {"kv_cache": engine.user_cache.stats.as_dict(), "kv_cache_bytes": engine.user_cache.lru.bytes,
            "handles": len(engine.handles.lru)}


__all__ = ["Engine", "EngineConfig", "engine_stats"]
