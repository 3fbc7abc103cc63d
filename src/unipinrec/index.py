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
    factory: str | None = None,
) -> tuple["ItemIndex", BuildReport]:
    """Build, tune and (when `out_dir` is given) save an index over `vectors` (N, D).

    Half the held-out queries tune the search parameter (the smallest one reaching
    `target_recall`), the other half measure the recall that is reported. `factory` overrides
    the faiss factory string chosen for `kind` (e.g. a smaller PQ for quick tests).
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
    factory = factory or factory_string(kind, n, d)
    t0 = time.perf_counter()
    index = _filled_index(faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT), vectors, seed, progress, factory)
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
    params, tuning = _tune(index, kind, factory, tune_q, tune_truth, k, target_recall)

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


def _filled_index(index, vectors: np.ndarray, seed: int, progress: bool, factory: str):
    """Train the faiss index on a sample (when it needs training) and add every vector."""
    n = len(vectors)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        index.train(vectors[rng.choice(n, size=min(n, 100_000), replace=False)])
    step = 100_000
    bar = None
    if progress and n > step:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"index add ({factory})", unit="vec")
    for s in range(0, n, step):
        index.add(vectors[s : s + step])
        if bar is not None:
            bar.update(min(step, n - s))
    if bar is not None:
        bar.close()
    return index


def _tune(index, kind: str, factory: str, tune_q, tune_truth, k: int, target_recall: float) -> tuple[dict, list]:
    """The smallest search parameter of the kind's ladder that reaches `target_recall`."""
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
    return params, tuning


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
        self._gpu = self._cpu = None  # on a GPU: its faiss resources (kept alive), the index on the host

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

    # faiss searches at most this many neighbours per query on a GPU
    GPU_MAX_K = 2048

    def on_gpu(self, device) -> "ItemIndex":
        """The same index searched on `device`'s GPU (faiss-gpu: the IVF lists and codes in GPU
        memory, fp16 lookup tables), or this one unchanged, with a warning saying why, when faiss
        has no GPU support here or cannot move this kind of index. Searches take and return
        host arrays either way; one that needs more than GPU_MAX_K neighbours per query (k plus
        the exclusions) runs on the host copy, so no answer is cut short."""
        import warnings

        import faiss

        gpu_id = int(str(device).partition(":")[2] or 0)
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= gpu_id:
            warnings.warn("the item index searches on the CPU: faiss has no GPU support here (install "
                          "faiss-gpu-cu12 instead of faiss-cpu)", stacklevel=2)
            return self
        resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = True  # PQ lookup tables in fp16: larger codes fit the GPU's shared memory
        try:
            index = faiss.index_cpu_to_gpu(resources, gpu_id, self.index, options)
        except RuntimeError as e:  # a kind faiss cannot run on a GPU (e.g. HNSW)
            warnings.warn(f"the item index searches on the CPU: faiss could not move {self.meta.get('factory')} "
                          f"to the GPU ({str(e).splitlines()[0]})", stacklevel=2)
            return self
        out = ItemIndex(index, self.item_ids, self.model_version, {**self.meta, "device": f"cuda:{gpu_id}"})
        out._gpu, out._cpu = resources, self.index  # the GPU memory lives as long as its resources
        return out

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None):
        """Top-`k` item ids and scores per query, skipping each query's `exclude` item ids.

        Over-fetches by the exclusion count and filters, so that all queries of a batch go
        through one faiss call. Rows with fewer than k results are padded with id -1.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        b = len(queries)
        excl = [set(map(int, e)) if e is not None else set() for e in (exclude or [None] * b)]
        fetch = min(self.num_items, k + max((len(e) for e in excl), default=0))
        index = self._cpu if self._cpu is not None and fetch > self.GPU_MAX_K else self.index
        scores, pos = index.search(queries, fetch)
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
        self._ids_t = torch.tensor(self.item_ids, device=self.vectors.device)  # a copy: ids.npy may be read-only
        self.model_version = model_version
        self.meta = {"model_version": model_version, "kind": "torch-exact"}

    @classmethod
    def for_model(cls, loaded, item_ids, device=None) -> "TorchIndex":
        """The exact index of a loaded model's item vectors for `item_ids` (what a faiss index
        built for the model holds), on `device`: on a GPU, top-K over a few million vectors is
        one matrix product and one topk, faster than faiss on the host."""
        import torch

        with torch.inference_mode():
            table = loaded.model.item_vectors()
            v = table[torch.from_numpy(loaded.vocab.lookup(item_ids)).to(table.device)]
        return cls(v.to(device) if device is not None else v, item_ids, loaded.version)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def search(self, queries, k: int, exclude: Sequence[Sequence[int]] | None = None):
        top, pos = self.search_device(queries, k, exclude)
        ids = self._ids_t[pos]
        ids = torch_where_finite(top, ids)
        return top.float().cpu().numpy(), ids.cpu().numpy()

    def search_device(self, queries, k: int, exclude: Sequence[Sequence[int]] | None = None,
                      exclude_positions=None):
        """-> (scores (Q, k), positions in `item_ids` (Q, k)) as tensors on the index's device;
        excluded items score -inf. The exclusions of all rows go over in one copy and one
        scatter (ids found by a sorted search on the device), not a pass per row;
        `exclude_positions` (Q, W) on the device, positions in `item_ids` with num_items for
        none, skips the search (the serving engine maps its rows once)."""
        import torch
        import torch.nn.functional as F

        q = torch.as_tensor(queries, device=self.vectors.device, dtype=self.vectors.dtype)
        scores = q @ self.vectors.T  # (Q, N)
        if exclude_positions is not None:  # one scatter into a spare column for "none"
            scores = F.pad(scores, (0, 1)).scatter_(1, exclude_positions, float("-inf"))[:, :-1]
        elif exclude:
            parts = [np.asarray(list(e) if isinstance(e, (set, frozenset)) else e, dtype=np.int64)
                     if e is not None else np.zeros(0, np.int64) for e in exclude]
            lens = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
            if lens.sum():
                flat = torch.from_numpy(np.concatenate(parts)).to(q.device, non_blocking=True)
                which = torch.from_numpy(np.repeat(np.arange(len(parts)), lens)).to(q.device, non_blocking=True)
                sorted_ids, order = self._sorted()
                at = torch.searchsorted(sorted_ids, flat).clamp(max=len(sorted_ids) - 1)
                found = sorted_ids[at] == flat
                # unknown ids add 0 (their slot is some other item's); accumulate: duplicates are fine
                penalty = torch.where(found, torch.tensor(float("-inf"), dtype=scores.dtype, device=q.device),
                                      torch.tensor(0.0, dtype=scores.dtype, device=q.device))
                scores += torch.zeros_like(scores).index_put_((which, order[at]), penalty, accumulate=True)
        return scores.topk(min(k, scores.shape[1]), dim=1)  # shapes only: the fused graph's trace reads no numpy

    def _sorted(self):
        if getattr(self, "_sorted_cache", None) is None:
            import torch

            order = torch.argsort(self._ids_t)
            self._sorted_cache = (self._ids_t[order], order)
        return self._sorted_cache


def torch_where_finite(top, ids):
    """-1 where a score is -inf (fewer than k items were left)."""
    import torch

    return torch.where(torch.isfinite(top), ids, torch.full_like(ids, -1))


# --- from a model folder -----------------------------------------------------------------------


def _example_queries_and_popularity(loaded, examples_dir: Path, num_queries: int):
    """User vectors of up to `num_queries` test-split histories (real held-out queries) and
    item counts over the train split's histories (the cold-start popularity list)."""
    import pyarrow.compute as pc
    import torch

    from .batches import batch_histories
    from .format import read_sharded
    from .sequences import History

    vocab = loaded.vocab
    test = read_sharded(examples_dir / "test", columns=["request_ts", "history"]).slice(0, num_queries)
    hists, rts = [], []
    for h, r in zip(test.column("history").to_pylist(), test.column("request_ts").to_pylist()):
        hist = History.from_actions(h, type(loaded.model).actions_type)
        known = hist.take(vocab.lookup(hist.items, unknown=0) > 0)
        if len(known):
            hists.append(known)
            rts.append(r)
    queries = []
    with torch.inference_mode():
        for s in range(0, len(hists), 256):
            batch = batch_histories(hists[s:s + 256], rts[s:s + 256], vocab, loaded.model.config.max_history)
            user, _ = loaded.model.encode_history(batch)
            queries.append(user.float().numpy())
    queries = np.concatenate(queries) if queries else None
    train = read_sharded(examples_dir / "train", columns=["history"]).column("history")
    flat = pc.list_flatten(train.combine_chunks() if hasattr(train, "combine_chunks") else train)
    ids = flat.field("item_id").to_numpy(zero_copy_only=False)
    rows = vocab.lookup(ids, unknown=0)
    counts = np.bincount(rows, minlength=len(vocab) + 1)[1:].astype(np.float64)
    return queries, counts


def build_index_for_model(model_dir: str | Path, out_dir: str | Path, *, examples_dir: str | Path | None = None,
                          kind: str = "auto", k: int = 100, target_recall: float = 0.97, num_queries: int = 1000,
                          seed: int = 0, progress: bool = False, model_cls=None) -> BuildReport:
    """Export a model folder's item vectors and build its index in `out_dir` (`model_cls`: the
    UniPinRec subclass it was trained as, docs/extending.md).

    With `examples_dir`, held-out queries are real user vectors (test-split histories) and
    `popularity.npy` (train-split counts, aligned with ids.npy) is written for cold starts;
    without it, queries are synthetic (`synthetic_queries`)."""
    import torch

    from .checkpoint import load_model

    loaded = load_model(model_dir, **({"model_cls": model_cls} if model_cls else {}))
    if not loaded.model.config.has_retrieval_head:
        raise ValueError(f"{model_dir} is a ranking_only model: it has no retrieval head to index")
    with torch.inference_mode():
        vectors = loaded.model.item_vectors()[1:].float().numpy()
    queries, popularity = None, None
    if examples_dir is not None:
        queries, popularity = _example_queries_and_popularity(loaded, Path(examples_dir), num_queries)
        if queries is not None and len(queries) < 20:
            queries = None  # too few to tune on; fall back to synthetic
    index, report = build_index(vectors, loaded.vocab.item_ids, loaded.version, out_dir, kind=kind, k=k,
                                target_recall=target_recall, queries=queries, num_queries=num_queries,
                                seed=seed, progress=progress)
    meta = dict(index.meta, queries="examples" if queries is not None else "synthetic")
    if popularity is not None:
        np.save(Path(out_dir) / "popularity.npy", popularity)
        meta["popularity"] = "train-split item counts"
    (Path(out_dir) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return report
