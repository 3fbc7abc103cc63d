"""The serving engine: request -> history -> encode once -> ANN retrieval -> rank on the same
KV cache -> utility -> top-k (docs/serving.md). No TorchServe here: the handlers in
`serving/` are thin adapters, and tests and benchmarks call the engine in-process too.

`Engine` composes the request's stages, each its own part: `HistoryResolver` (resolve.py),
`HistoryEncoder` (encoder.py: KV-cache hit / extend / miss), `Retriever` (retrieval.py: an
`ItemIndex` with the popularity fallback) and `Ranker` (ranking.py). One class serves the
three ways the benchmark compares:

- unified, KV shared (`share_kv=True`): one `encode_history`; ranking attends to its KV cache;
- unified, re-encoding (`share_kv=False`): ranking encodes the history a second time;
- two models (`ranking=` another model): a retrieval-only model encodes for retrieval, a
  ranking-only model encodes again for ranking (the paper's baseline).

Requests handed over together (TorchServe batching) go through each stage as one batch, and
each succeeds or fails on its own: bad input is that request's 4xx, and an unexpected error
re-runs the batch's requests one by one so only the one that raises gets a 500. A request
whose deadline ranking would overrun gets the retrieval order, marked `degraded`.
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import fused
from .encoder import HistoryEncoder
from .graphs import Graphs, warm_up
from .kv_cache import HandleState, HandleStore, UserKVCache
from .ranking import Ranker
from .request import ActionIn, Limits, Request, ServingError, parse_request
from .resolve import HistoryResolver, Resolved
from .retrieval import ItemIndex, Popularity, Retriever
from .store import OnlineStore
from .timing import StageTimer

log = logging.getLogger(__name__)


def settle_heap() -> int:
    """Once a server has loaded (engines built, graphs captured): collect, then move every object
    alive out of the garbage collector's view (`gc.freeze`). A full collection walks every tracked
    object, about 180,000 once torch is imported (85 ms on the development machine), and it falls
    on whichever batch allocates past the threshold (`bench/host_profile.py --gc`, batches of 64:
    five in 400 batches, up to 143 ms each; p99 105 ms, 10 ms once settled). Frozen objects are
    never walked again; objects made later are collected as usual. -> how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@dataclass
class EngineConfig:
    share_kv: bool = True  # False: re-encode the history for ranking (benchmark mode b)
    kv_cache_bytes: int = 256 * 2**20  # cross-request KV cache; 0 turns it off
    kv_cache_entries: int = 200_000  # and at most this many users (per-entry overhead is real memory)
    handle_bytes: int = 256 * 2**20  # split retrieve/rank state
    handle_entries: int = 100_000
    handle_ttl_s: float = 120.0
    max_k: int = 1000
    max_candidates: int = 5000
    max_history_request: int = 100_000
    max_body_bytes: int = 4 * 2**20
    deadline_ms: float = 0.0  # server default for requests without deadline_ms; 0 = none
    device: str = "cpu"
    # on CUDA: bf16 weights, CUDA graphs per (batch, history, candidates) bucket, captured at load
    # for these shapes (history 0 = the model's L; others are captured on first use), exact
    # torch top-K over the items up to torch_index_max_items (faiss beyond) -- serving/graphs.py
    cuda_graphs: bool = True
    fused: bool = True  # plain batches through one graph of every stage (fused.py), with cuda_graphs
    graph_warmup: tuple = ((1, 0, 512), (8, 0, 512))
    max_graphs: int = 64
    pipeline_rows: int = 32  # fused batches of at least twice this many run in chunks of it (0: never)
    torch_index_max_items: int = 5_000_000
    # torch.compile each fused graph's function before capture (static shapes, fullgraph): about
    # 1.4-1.6x less device time per batch on an H200, 2-11 s of compiling per bucket at load
    # (docs/serving.md, "On a GPU"); off by default: it lowers the KV-sharing gain over two models
    compile: bool = False

    def validate(self) -> None:
        for name in ("max_k", "max_candidates", "max_history_request", "max_body_bytes", "kv_cache_entries",
                     "handle_entries"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.kv_cache_bytes < 0 or self.handle_bytes < 0 or self.handle_ttl_s <= 0:
            raise ValueError("cache sizes must be >= 0 and handle_ttl_s positive")
        if self.deadline_ms < 0:
            raise ValueError("deadline_ms must be >= 0 (0 = none)")

    def limits(self, max_history: int, actions_type=None) -> Limits:
        extra = () if actions_type is None else tuple(
            rec for rec, _ in actions_type.record_names().values() if rec not in ActionIn.model_fields)
        return Limits(max_k=self.max_k, max_candidates=self.max_candidates,
                      max_history_request=self.max_history_request, max_body_bytes=self.max_body_bytes,
                      max_rank_candidates=self.max_candidates, keep_history=max_history, extra_action_fields=extra)


class Engine:
    """Serves requests with a retrieval model + item index and a ranking model (the same
    model, unified, unless `ranking` is given)."""

    def __init__(self, retrieval, index: ItemIndex, *, ranking=None, config: EngineConfig | None = None,
                 store: OnlineStore | None = None, popularity: np.ndarray | None = None):
        self.config = config or EngineConfig()
        self.config.validate()
        self.device = torch.device(self.config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # the graphs, their streams and the pinned ring's events use the current device
        self.ret, self.rnk = retrieval, (ranking if ranking is not None else retrieval)
        self.two_models = ranking is not None and ranking is not retrieval
        self._check_models(index)
        cuda = self.device.type == "cuda"
        for m in {id(self.ret): self.ret, id(self.rnk): self.rnk}.values():
            m.model.to(self.device, dtype=torch.bfloat16 if cuda else None).eval()
        self.share_kv = self.config.share_kv and not self.two_models
        self.vocab = self.ret.vocab
        self.model_version = self.ret.version if not self.two_models else f"{self.ret.version}+{self.rnk.version}"
        self.limits = self.config.limits(self.ret.model.config.max_history, type(self.ret.model).actions_type)
        with torch.inference_mode():
            self.item_vectors = self.ret.model.item_vectors().to(self.device)  # (N+1, D)
        self.user_cache = UserKVCache(self.config.kv_cache_bytes, max_entries=self.config.kv_cache_entries,
                                      request_dependent=self.ret.model.config.time_gap == "request")
        self.handles = HandleStore(self.config.handle_bytes, self.config.handle_ttl_s,
                                   max_entries=self.config.handle_entries)
        actions_type = type(self.ret.model).actions_type
        self.resolver = HistoryResolver(self.vocab, self.ret.model.config.num_actions, store, actions_type,
                                        cache=self.user_cache, num_surfaces=self._num_surfaces())
        self.graphs = Graphs.for_device(self.device, self.config.cuda_graphs, self.config.max_graphs)
        self.encoder = HistoryEncoder(self.device, self.user_cache, self.graphs, actions_type)
        self.retriever = Retriever(index, Popularity(self.vocab.item_ids, popularity), self.vocab)
        self.ranker = Ranker(self.vocab, list(self.rnk.tasks.tasks), self.rnk.tasks.score_weights, self.device,
                             self.graphs)
        self.counts = {"degraded": 0, "isolated_errors": 0}
        self.fused = fused.FusedGraphs(self) if self.config.fused and (self.graphs is not None) else None
        L = self.ret.model.config.max_history
        warm_up(self, [(b, h or L, c) for b, h, c in self.config.graph_warmup])

    def _check_models(self, index) -> None:
        if not self.ret.model.config.has_retrieval_head:
            raise ValueError(f"the retrieval model is {self.ret.kind!r}: it needs a retrieval head")
        if not self.rnk.model.config.has_ranking_head:
            raise ValueError(f"the ranking model is {self.rnk.kind!r}: it needs a ranking head")
        if self.two_models and not np.array_equal(self.ret.vocab.item_ids, self.rnk.vocab.item_ids):
            raise ValueError("the retrieval and ranking models must embed the same items")
        if getattr(index, "model_version", None) != self.ret.version:
            from ..index import IndexVersionMismatch

            raise IndexVersionMismatch(f"index model_version {getattr(index, 'model_version', None)!r} differs from "
                                       f"the retrieval model's {self.ret.version!r}")

    def _num_surfaces(self) -> int | None:
        """The surface ids a client's history may hold: those every model that embeds surfaces
        has (an id past them would be clamped to the last); None when neither reads them."""
        sizes = [m.model.config.num_surfaces for m in (self.ret, self.rnk) if m.model.config.use_surface]
        return min(sizes) if sizes else None

    @property
    def store(self) -> OnlineStore | None:
        return self.resolver.store

    @property
    def index(self) -> ItemIndex:
        return self.retriever.index

    @property
    def popular_ids(self) -> np.ndarray:
        return self.retriever.popularity.item_ids

    @property
    def task_names(self) -> list[str]:
        return self.ranker.task_names

    # --- construction from folders --------------------------------------------------------------

    @classmethod
    def from_dirs(cls, model_dir: str | Path, index_dir: str | Path | None = None, *,
                  ranking_dir: str | Path | None = None, config: EngineConfig | None = None,
                  store: OnlineStore | None = None, model_cls=None) -> "Engine":
        """Load a model folder (+ a ranking model folder for the two-model baseline) and the
        index built for the retrieval model; the index must carry the model's version.
        `model_cls`: the UniPinRec subclass the model was trained as (docs/extending.md)."""
        from ..checkpoint import load_model
        from ..index import ItemIndex as FaissIndex

        config = config or EngineConfig()
        retrieval = load_model(model_dir, device=config.device, **({"model_cls": model_cls} if model_cls else {}))
        ranking = load_model(ranking_dir, device=config.device) if ranking_dir else None
        if index_dir is None:
            raise ValueError("an index folder is needed (`unipinrec index build`)")
        index = FaissIndex.load(index_dir, expect_model_version=retrieval.version)
        if torch.device(config.device).type == "cuda" and index.num_items <= config.torch_index_max_items:
            from ..index import TorchIndex

            index = TorchIndex.for_model(retrieval, index.item_ids, config.device)  # exact top-K on the GPU
        elif torch.device(config.device).type == "cuda":
            index = index.on_gpu(config.device)  # faiss-gpu beyond that (or the host, with a warning)
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
        """Validated requests -> one response dict or ServingError per request, in order. An
        unexpected error fails only the request that raises it: the rest are served again
        without it."""
        try:
            return self._serve(requests)
        except Exception:  # noqa: BLE001  (a bug, not bad input: isolate it)
            if len(requests) == 1:
                log.exception("unipinrec engine failed on a request")
                self.counts["isolated_errors"] += 1
                return [ServingError(500, "server", "internal error while serving this request")]
            log.warning("unipinrec engine failed on a batch of %d: serving its requests one by one", len(requests))
            return [res for r in requests for res in self.handle_batch([r])]

    def handle_stream(self, batches: Iterable[Sequence[Request]]) -> Iterator[list[dict | ServingError]]:
        """Batches -> each one's `handle_batch` answers, in order. On a GPU, batches of plain
        requests (stage "all") are pipelined: one is on the device while the host resolves the
        next and builds the responses of the one before, so a serving loop's throughput is the
        larger of host and device time rather than their sum. Elsewhere, `handle_batch` per batch."""
        if self.fused is None:  # no fused path (CPU): nothing to overlap
            yield from (self.handle_batch(b) for b in batches)
            return
        run: list[Sequence[Request]] = []  # plain batches not yet answered, in order
        for b in batches:
            if all(r.stage == "all" for r in b):
                run.append(b)
                continue
            yield from self._stream_plain(run)
            run = []
            yield self.handle_batch(b)
        yield from self._stream_plain(run)

    def _stream_plain(self, batches: list[Sequence[Request]]) -> Iterator[list[dict | ServingError]]:
        done = 0
        try:
            with torch.inference_mode():
                for out in fused.serve_chunks(self, batches):
                    done += 1
                    yield out
        except Exception:  # noqa: BLE001  (a bug: the batches not yet answered get handle_batch's isolation)
            log.warning("unipinrec engine: pipelined batches failed; serving the rest one batch at a time")
            yield from (self.handle_batch(b) for b in batches[done:])

    def _serve(self, requests: Sequence[Request]) -> list[dict | ServingError]:
        out: list[dict | ServingError | None] = [None] * len(requests)
        by_stage: dict[str, list[int]] = {"all": [], "retrieve": [], "rank": []}
        for i, r in enumerate(requests):
            by_stage[r.stage].append(i)
        with torch.inference_mode():
            for idx, serve in ((by_stage["all"] + by_stage["retrieve"], self._retrieve_and_rank),
                               (by_stage["rank"], self._rank_handles)):
                if idx:
                    for i, res in zip(idx, serve([requests[i] for i in idx])):
                        out[i] = res
        return out  # type: ignore[return-value]

    # --- the two flows --------------------------------------------------------------------------

    def _retrieve_and_rank(self, reqs: Sequence[Request]) -> list[dict | ServingError]:
        chunk = self.config.pipeline_rows
        if self.fused is not None and self.device.type == "cuda" and chunk and len(reqs) >= 2 * chunk:
            return fused.serve_pipelined(self, reqs, chunk)  # host work of one chunk under another's GPU work
        timer = StageTimer(self.device)
        return self._serve_resolved(self.resolver.resolve(reqs, timer), timer)

    def _serve_resolved(self, resolved: list, timer: StageTimer, looked=None,
                        fused_ok: bool = True) -> list[dict | ServingError]:
        out: list[dict | ServingError | None] = [p if isinstance(p, ServingError) else None for p in resolved]
        ok = [i for i, p in enumerate(resolved) if not isinstance(p, ServingError)]
        if not ok:
            return out  # type: ignore[return-value]
        preps: list[Resolved] = [resolved[i] for i in ok]  # type: ignore[misc]
        fast = None
        if self.fused is not None and fused_ok:
            fast, looked = fused.serve(self, preps, timer, self.fused)
        if fast is not None:  # a plain batch on a GPU: one graph for all stages (fused.py)
            for j, res in zip(ok, fast):
                out[j] = res
            return out  # type: ignore[return-value]
        kv, status = self.encoder.encode(self.ret, preps, timer, "encode", use_cache=True, looked=looked)
        ids, scores, cand_rows = self.retriever.retrieve(preps, kv.user_vectors, timer)
        full = [j for j, p in enumerate(preps) if p.req.stage == "all"]
        ranked, degraded = self._rank_within_deadline(kv, preps, full, ids, timer, cand_rows)
        timings = timer.as_dict()
        for j, p in enumerate(preps):
            meta = {"model_version": self.model_version, "timings_ms": timings, "kv_cache": status[j],
                    **self._history_meta(p)}
            if p.req.stage == "retrieve":
                out[ok[j]] = {**self._new_handle(kv, j, p, ids[j], scores[j]), **meta}
            elif j in degraded:
                out[ok[j]] = {"items": Ranker.retrieval_order(p.req.k, ids[j], scores[j]),
                              "degraded": "ranking_deadline", **meta}
            else:
                probs, util = ranked[j]
                out[ok[j]] = {"items": self.ranker.items(p.req.k, ids[j], scores[j], probs, util), **meta}
        return out  # type: ignore[return-value]

    def _rank_within_deadline(self, kv, preps: Sequence[Resolved], full: list[int], ids, timer: StageTimer,
                              cand_rows=None):
        """Rank the `full` rows whose deadline allows it; -> ({row: (probs, utility)}, degraded rows)."""
        if not full:
            return {}, set()
        estimate = self.ranker.estimate_ms(len(full) * max(len(ids[j]) for j in full))
        elapsed = timer.elapsed_ms()
        degraded = {j for j in full if 0 < self._deadline(preps[j].req) < elapsed + estimate}
        rank = [j for j in full if j not in degraded]
        self.counts["degraded"] += len(degraded)
        if not rank:
            return {}, degraded
        sub = None if len(rank) == len(preps) else torch.as_tensor(rank, device=self.device)
        rank_kv = kv if sub is None else kv.index_select(sub)
        if cand_rows is not None and sub is not None:
            cand_rows = cand_rows.index_select(0, sub)
        if not self.share_kv:
            rank_kv, _ = self.encoder.encode(self.rnk, [preps[j] for j in rank], timer, "encode_rank", use_cache=False)
        t = time.perf_counter()
        res = self.ranker.rank(self.rnk, rank_kv, [ids[j] for j in rank], [preps[j].request_ts for j in rank], timer,
                               rows=cand_rows)
        self.ranker.observe((time.perf_counter() - t) * 1000, len(rank) * max(1, max(len(ids[j]) for j in rank)))
        return dict(zip(rank, res)), degraded

    def _deadline(self, req: Request) -> float:
        return float(req.deadline_ms) if req.deadline_ms is not None else self.config.deadline_ms

    def _history_meta(self, p: Resolved) -> dict:
        L = self.ret.model.config.max_history
        dropped = p.req.history_offset if p.source == "request" else 0
        return {"history_source": p.source, "history_length": int(min(len(p.rows), L)),
                "history_truncated": int(dropped + max(0, len(p.rows) - L)), "cold_start": len(p.rows) == 0}

    def _new_handle(self, kv, j: int, p: Resolved, ids, scores) -> dict:
        L = self.ret.model.config.max_history
        state = HandleState(kv=kv.row(j, min(len(p.rows), L)) if self.share_kv else None, history=p.history,
                            request_ts=p.request_ts, user_id=p.req.user_id, candidates=ids, retrieval_scores=scores,
                            user_vector=kv.user_vectors[j].clone())
        return {"handle": self.handles.new(state), "ttl_s": self.config.handle_ttl_s,
                "candidates": [{"item_id": int(a), "retrieval_score": float(s)} for a, s in zip(ids, scores)]}

    def _rank_handles(self, reqs: Sequence[Request]) -> list[dict | ServingError]:
        from ..model import KVCache

        timer = StageTimer(self.device)
        out: list[dict | ServingError | None] = [None] * len(reqs)
        found = []  # (request index, state, candidate ids, retrieval scores)
        for i, r in enumerate(reqs):
            got = self._handle_state(r)
            if isinstance(got, ServingError):
                out[i] = got
            else:
                found.append((i, got, *self._handle_candidates(r, got)))
        for i, state, c, s in found:
            if isinstance(c, ServingError):
                out[i] = c
        found = [f for f in found if not isinstance(f[2], ServingError)]
        if not found:
            return out  # type: ignore[return-value]
        if self.share_kv:
            kv = KVCache.cat([st.kv.to(self.device) for _, st, _, _ in found])
        else:
            preps = [Resolved(reqs[i], st.history, self.vocab.lookup(st.history.items), st.request_ts, "handle")
                     for i, st, _, _ in found]
            kv, _ = self.encoder.encode(self.rnk, preps, timer, "encode_rank", use_cache=False)
        res = self.ranker.rank(self.rnk, kv, [c for _, _, c, _ in found], [st.request_ts for _, st, _, _ in found], timer)
        timings = timer.as_dict()
        for (i, _, c, s), (probs, util) in zip(found, res):
            out[i] = {"items": self.ranker.items(reqs[i].k, c, s, probs, util), "model_version": self.model_version,
                      "timings_ms": timings}
        return out  # type: ignore[return-value]

    def _handle_state(self, r: Request) -> HandleState | ServingError:
        state, why = self.handles.get(r.handle)
        if state is None and why == "missing":
            return ServingError(404, "handle", f"unknown handle {r.handle!r}: handles come from stage 'retrieve' "
                                "and live only in the worker that made them")
        if state is None:
            return ServingError(410, "handle", f"handle {r.handle!r} has {why} (handles live "
                                f"{self.config.handle_ttl_s:g} s); call stage 'retrieve' again")
        if state.user_id != r.user_id:
            return ServingError(422, "user_id", f"{r.user_id} is not the user of this handle")
        return state

    def _handle_candidates(self, r: Request, state: HandleState):
        """(candidate ids, retrieval scores) of a rank call: the client's, or the retrieved ones."""
        if r.candidates is None:
            return state.candidates[: r.num_candidates], state.retrieval_scores[: r.num_candidates]
        c = np.asarray(r.candidates, dtype=np.int64)  # range-checked at validation
        # one sorted lookup validates and maps (np.isin would sort the whole vocab per request)
        c_rows = self.vocab.lookup(c, unknown=0)
        if not (c_rows > 0).all():
            j = int(np.flatnonzero(c_rows == 0)[0])
            return ServingError(422, f"candidates[{j}]", f"unknown item id {int(c[j])}"), None
        if not len(c):
            return c, np.zeros(0, np.float32)
        rows = torch.from_numpy(c_rows).to(self.device)
        return c, (self.item_vectors[rows] @ state.user_vector).float().cpu().numpy()


def engine_stats(engine: Engine) -> dict:
    """Counters for metrics and tests."""
    return {"kv_cache": engine.user_cache.stats.as_dict(), "kv_cache_bytes": engine.user_cache.lru.bytes,
            "kv_cache_entries": len(engine.user_cache.lru), "handles": len(engine.handles.lru),
            "handle_bytes": engine.handles.lru.bytes, **engine.counts}


__all__ = ["Engine", "EngineConfig", "engine_stats"]
