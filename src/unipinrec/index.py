"""The item index: ANN top-K over the model's L2-normalised item vectors (inner product).

`build_index(vectors, item_ids, model_version, out_dir)` picks a faiss index by catalog size,
tunes its search parameter on held-out queries until recall@K against exact search reaches a
target, measures recall on *other* held-out queries, and writes

    OUT/index.faiss   the faiss index (positions 0..N-1)
    OUT/ids.npy       position -> item_id (int64)
    OUT/meta.json     {"model_version", "kind", "factory", "params", "num_items", "dim",
                       "recall_at_k", "k", "query_ms_per_query", ...}

`ItemIndex.load(dir, expect_model_version=...)` refuses an index built for another model
version: its item vectors would not match the served model's user vectors.

faiss is imported lazily (inside functions) so that the serving engine and the model import
without it; `TorchIndex` is an exact top-K in torch for machines without faiss (the GPU box).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
META_FILE = "meta.json"

# Catalog size up to which the default is exact search: 200k x 256 is ~50M multiply-adds a
# query (a few ms on 2 cores), still fine for serving. Past it the default is IVF-PQ whose
# shortlist is re-scored exactly (RFlat). HNSW is available too, but for recall@100 >= 0.95 on
# user-like queries it needed efSearch ~1500 on a 300k catalog, i.e. no faster than exact.
FLAT_MAX_ITEMS = 200_000
KINDS = ("auto", "flat", "hnsw", "ivfpq")


class IndexError_(ValueError):
    """A bad index folder, or an index that does not belong to the served model."""


class IndexVersionMismatch(IndexError_):
    pass


def choose_kind(num_items: int) -> str:
    return "flat" if num_items <= FLAT_MAX_ITEMS else "ivfpq"


def factory_string(kind: str, num_items: int, dim: int) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    if kind == "ivfpq":
        nlist = int(2 ** round(math.log2(max(16, 4 * math.sqrt(num_items)))))
        m = next(m for m in (dim // 2, dim // 4, dim // 8, 8, 4, 2, 1) if m >= 1 and dim % m == 0)
        # RFlat: the PQ shortlist is re-scored with the exact vectors (k_factor x k of them)
        return f"IVF{nlist},PQ{m}x8,RFlat"
    raise ValueError(f"kind '{kind}' is not one of {KINDS}")


# Search parameter tried in order until the tuning queries reach the recall target.
_LADDER = {
    "hnsw": ("efSearch", (64, 128, 256, 384, 512, 768, 1024, 1536, 2048)),
    "ivfpq": ("nprobe", (8, 16, 32, 64, 128, 256, 512)),
}


def synthetic_queries(vectors: np.ndarray, n: int, seed: int = 0, mix: int = 4, noise: float = 0.3) -> np.ndarray:
    """Held-out queries shaped like user vectors: normalised mixes of a few random item
    vectors plus isotropic noise (a user's interests are a few regions of item space)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(vectors), size=(n, mix))
    q = vectors[picks].sum(axis=1)
    q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-12
    q += noise * rng.standard_normal(q.shape).astype(np.float32) / math.sqrt(q.shape[1])
    q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-12
    return q.astype(np.float32)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-K found in its approximate top-K."""
    k = exact.shape[1]
    hits = sum(len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / (k * len(exact))


def _set_param(index, name: str, value) -> None:
    import faiss

    faiss.ParameterSpace().set_index_parameter(index, name, value)


@dataclass
class BuildReport:
    kind: str
    factory: str
    params: dict
    num_items: int
    dim: int
    k: int
    recall_at_k: float
    query_ms_per_query: float
    exact_query_ms_per_query: float
    build_s: float
    tuning: list = field(default_factory=list)


def build_index(
    vectors: np.ndarray,
    item_ids: np.ndarray,
    model_version: str,
    out_dir: str | Path | None = None,
    *,
    kind: str = "auto",
    k: int = 100,
    target_recall: float = 0.97,
    queries: np.ndarray | None = None,
    num_queries: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> tuple["ItemIndex", BuildReport]:
    """Build, tune and (when `out_dir` is given) save an index over `vectors` (N, D).

    Half the held-out queries tune the search parameter (the smallest one reaching
    `target_recall`), the other half measure the recall that is reported.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if vectors.ndim != 2 or len(vectors) != len(item_ids) or len(vectors) == 0:
        raise ValueError(f"vectors {vectors.shape} and item_ids {item_ids.shape} must be (N, D) and (N,), N > 0")
    if kind not in KINDS:
        raise ValueError(f"kind '{kind}' is not one of {KINDS}")
    n, d = vectors.shape
    kind = choose_kind(n) if kind == "auto" else kind
    k = min(k, n)
    factory = factory_string(kind, n, d)
    t0 = time.perf_counter()
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(n, size=min(n, 100_000), replace=False)]
        index.train(sample)
    step = 100_000
    chunks = range(0, n, step)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=f"index add ({factory})", unit_scale=step)
    for s in chunks:
        index.add(vectors[s : s + step])
    build_s = time.perf_counter() - t0

    if queries is None:
        queries = synthetic_queries(vectors, num_queries, seed=seed + 1)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    half = max(1, len(queries) // 2)
    tune_q, eval_q = queries[:half], queries[half:] if len(queries) > 1 else queries
    exact = faiss.IndexFlatIP(d)
    exact.add(vectors)
    _, tune_truth = exact.search(tune_q, k)
    t = time.perf_counter()
    _, eval_truth = exact.search(eval_q, k)
    exact_ms = (time.perf_counter() - t) * 1000 / len(eval_q)

    params: dict = {}
    tuning: list = []
    if kind == "ivfpq":
        params["k_factor"] = 4
        _set_param(index, "k_factor_rf", 4)
    if kind in _LADDER:
        name, ladder = _LADDER[kind]
        for value in ladder:
            if kind == "ivfpq" and value > int(factory.split(",")[0][3:]):
                break
            _set_param(index, name, value)
            _, got = index.search(tune_q, k)
            r = recall_at_k(got, tune_truth)
            tuning.append({name: value, "recall": round(r, 4)})
            params[name] = value
            if r >= target_recall:
                break

    t = time.perf_counter()
    _, got = index.search(eval_q, k)
    query_ms = (time.perf_counter() - t) * 1000 / len(eval_q)
    recall = recall_at_k(got, eval_truth)
    report = BuildReport(kind, factory, params, n, d, k, round(recall, 4), round(query_ms, 4),
                         round(exact_ms, 4), round(build_s, 2), tuning)
    item_index = ItemIndex(index, item_ids, model_version, meta=_meta(report, model_version))
    if out_dir is not None:
        item_index.save(out_dir)
    return item_index, report


def _meta(report: BuildReport, model_version: str) -> dict:
    return {
        "model_version": model_version,
        "kind": report.kind,
        "factory": report.factory,
        "params": report.params,
        "num_items": report.num_items,
        "dim": report.dim,
        "metric": "inner_product",
        "k": report.k,
        "recall_at_k": report.recall_at_k,
        "query_ms_per_query": report.query_ms_per_query,
        "exact_query_ms_per_query": report.exact_query_ms_per_query,
        "build_s": report.build_s,
        "tuning": report.tuning,
    }


class ItemIndex:
    """A faiss index plus its position -> item_id map and the model version it belongs to."""

    def __init__(self, index, item_ids: np.ndarray, model_version: str, meta: dict | None = None):
        self.index = index
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.model_version = model_version
        self.meta = dict(meta or {"model_version": model_version})
        self._pos_of = None

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def save(self, out_dir: str | Path) -> Path:
        import faiss

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(out / INDEX_FILE))
        np.save(out / IDS_FILE, self.item_ids)
        (out / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path, expect_model_version: str | None = None) -> "ItemIndex":
        import faiss

        d = Path(directory)
        for name in (INDEX_FILE, IDS_FILE, META_FILE):
            if not (d / name).exists():
                raise IndexError_(f"index folder {d}: {name} is missing (build it with `unipinrec index build`)")
        meta = json.loads((d / META_FILE).read_text())
        version = meta.get("model_version")
        if expect_model_version is not None and version != expect_model_version:
            raise IndexVersionMismatch(
                f"index {d} was built for model_version {version!r}, but the model is "
                f"{expect_model_version!r}; rebuild it with `unipinrec index build`"
            )
        index = faiss.read_index(str(d / INDEX_FILE))
        ids = np.load(d / IDS_FILE, allow_pickle=False)
        if index.ntotal != len(ids):
            raise IndexError_(f"index {d}: {index.ntotal} vectors but {len(ids)} ids")
        for name, value in meta.get("params", {}).items():
            _set_param(index, "k_factor_rf" if name == "k_factor" else name, value)
        return cls(index, ids, version, meta)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None):
        """Top-`k` item ids and scores per query, skipping each query's `exclude` item ids.

        Over-fetches by the exclusion count and filters, so that all queries of a batch go
        through one faiss call. Rows with fewer than k results are padded with id -1.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        b = len(queries)
        excl = [set(map(int, e)) if e is not None else set() for e in (exclude or [None] * b)]
        fetch = min(self.num_items, k + max((len(e) for e in excl), default=0))
        scores, pos = self.index.search(queries, fetch)
        out_ids = np.full((b, k), -1, dtype=np.int64)
        out_scores = np.full((b, k), -np.inf, dtype=np.float32)
        for i in range(b):
            p = pos[i]
            ok = p >= 0
            ids = self.item_ids[p[ok]]
            sc = scores[i][ok]
            if excl[i]:
                keep = ~np.isin(ids, np.fromiter(excl[i], dtype=np.int64, count=len(excl[i])))
                ids, sc = ids[keep], sc[keep]
            m = min(k, len(ids))
            out_ids[i, :m] = ids[:m]
            out_scores[i, :m] = sc[:m]
        return out_scores, out_ids


class TorchIndex:
    """Exact inner-product top-K in torch (same `search` contract as ItemIndex), for hosts
    without faiss, such as the GPU box, and for small catalogs in tests."""

    def __init__(self, vectors, item_ids: np.ndarray, model_version: str):
        import torch

        self.vectors = vectors if isinstance(vectors, torch.Tensor) else torch.as_tensor(vectors)
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self._ids_t = torch.as_tensor(self.item_ids, device=self.vectors.device)
        self.model_version = model_version
        self.meta = {"model_version": model_version, "kind": "torch-exact"}

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def search(self, queries, k: int, exclude: Sequence[Sequence[int]] | None = None):
        import torch

        q = torch.as_tensor(queries, device=self.vectors.device, dtype=self.vectors.dtype)
        scores = q @ self.vectors.T
        if exclude:
            for i, e in enumerate(exclude):
                if e is not None and len(e):
                    mask = torch.isin(self._ids_t, torch.as_tensor(list(e), device=q.device))
                    scores[i].masked_fill_(mask, float("-inf"))
        k = min(k, self.num_items)
        top, pos = scores.topk(k, dim=1)
        ids = self._ids_t[pos]
        ids = torch.where(torch.isfinite(top), ids, torch.full_like(ids, -1))
        return top.float().cpu().numpy(), ids.cpu().numpy()
