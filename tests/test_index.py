"""The item index: exact for small catalogs, tuned ANN for large ones, version-pinned."""
from __future__ import annotations

import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")  # part of the platform extra the tests install

from unipinrec.index import (  # noqa: E402
    FLAT_MAX_ITEMS, IndexError_, IndexVersionMismatch, ItemIndex, TorchIndex, build_index, build_index_for_model,
    choose_kind, factory_string, recall_at_k, synthetic_queries,
)


def clustered(n: int, d: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    v = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def brute_force(vectors, ids, q, k, exclude=()):
    s = vectors @ q
    order = [i for i in np.argsort(-s, kind="stable") if ids[i] not in set(exclude)]
    return ids[order[:k]], s[order[:k]]


def test_kind_follows_catalog_size():
    assert choose_kind(1_000) == "flat"
    assert choose_kind(FLAT_MAX_ITEMS) == "flat"
    assert choose_kind(FLAT_MAX_ITEMS + 1) == "ivfpq"
    assert factory_string("ivfpq", 1_000_000, 64) == "IVF4096,PQ32x8,RFlat"  # ~4 sqrt(N) lists, 2 dims per code
    assert factory_string("hnsw", 10, 8) == "HNSW32,Flat"


def test_flat_index_is_exact_and_excludes_seen_items(tmp_path):
    v = clustered(2_000, 16)
    ids = np.arange(2_000, dtype=np.int64) * 7 + 3
    index, report = build_index(v, ids, "v1", tmp_path, num_queries=100)
    assert report.kind == "flat" and report.recall_at_k == 1.0
    q = synthetic_queries(v, 3, seed=9)
    seen = [ids[:50].tolist(), [], ids[::3].tolist()]
    scores, got = index.search(q, 10, exclude=seen)
    for i in range(3):
        want_ids, want_scores = brute_force(v, ids, q[i], 10, seen[i])
        assert got[i].tolist() == want_ids.tolist()
        np.testing.assert_allclose(scores[i], want_scores, rtol=1e-5, atol=1e-6)
        assert not set(got[i].tolist()) & set(seen[i])


def test_ivfpq_reaches_the_recall_target_on_held_out_queries(tmp_path):
    v = clustered(5_000, 16, clusters=100)
    # 4-bit PQ trains in ~1 s here; the default (8-bit, factory_string) is for large catalogs
    index, report = build_index(v, np.arange(5_000), "v1", tmp_path, kind="ivfpq", k=50, target_recall=0.95,
                                num_queries=200, factory="IVF64,PQ8x4,RFlat")
    assert report.kind == "ivfpq" and "nprobe" in report.params
    assert report.recall_at_k >= 0.9  # measured on the half of the queries not used for tuning
    # re-measure independently on fresh queries
    q = synthetic_queries(v, 50, seed=123)
    exact = faiss.IndexFlatIP(16)
    exact.add(v)
    _, truth = exact.search(q, 50)
    _, got = ItemIndex.load(tmp_path, expect_model_version="v1").search(q, 50)
    assert recall_at_k(got, truth) >= 0.9


def test_saved_index_round_trips_and_refuses_another_model_version(tmp_path):
    v = clustered(500, 8)
    ids = np.arange(500) + 10
    built, _ = build_index(v, ids, "abc", tmp_path, num_queries=20)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["model_version"] == "abc" and meta["num_items"] == 500 and "recall_at_k" in meta
    loaded = ItemIndex.load(tmp_path, expect_model_version="abc")
    q = synthetic_queries(v, 4, seed=5)
    assert np.array_equal(loaded.search(q, 5)[1], built.search(q, 5)[1])
    with pytest.raises(IndexVersionMismatch, match="model_version 'abc'"):
        ItemIndex.load(tmp_path, expect_model_version="other")
    (tmp_path / "ids.npy").unlink()
    with pytest.raises(IndexError_, match="ids.npy is missing"):
        ItemIndex.load(tmp_path)


def test_torch_index_matches_faiss_exact_search():
    v = clustered(1_000, 16, seed=2)
    ids = np.arange(1_000) + 100
    faiss_index, _ = build_index(v, ids, "v", None, num_queries=20)
    torch_index = TorchIndex(v, ids, "v")
    q = synthetic_queries(v, 5, seed=3)
    seen = [ids[:10], None, ids[5:400], [], ids[::2]]
    fs, fi = faiss_index.search(q, 20, exclude=seen)
    ts, ti = torch_index.search(q, 20, exclude=seen)
    assert np.array_equal(fi, ti)
    np.testing.assert_allclose(fs, ts, rtol=1e-5, atol=1e-6)


def test_on_gpu_without_faiss_gpu_keeps_the_host_index_and_says_why():
    v = clustered(500, 8)
    index, _ = build_index(v, np.arange(500), "v", None, num_queries=10)
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss has GPU support on this machine: the GPU copy is benchmarked in bench/serving_bench.py ann")
    with pytest.warns(UserWarning, match="faiss has no GPU support here.*faiss-gpu-cu12"):
        assert index.on_gpu("cuda:0") is index


def test_a_gpu_index_hands_searches_past_its_k_limit_to_the_host_copy():
    """faiss on a GPU returns at most GPU_MAX_K neighbours a query; a search needing more (k plus
    the exclusions) goes to the host copy, so the answer is the same as on the host."""
    v = clustered(3_000, 8, seed=4)
    ids = np.arange(3_000)
    host, _ = build_index(v, ids, "v", None, num_queries=10)

    class Capped:  # stands for the GPU index: the same answers, and faiss's GPU limit on k
        def __init__(self, index):
            self.index, self.calls = index, []

        def search(self, q, k):
            self.calls.append(k)
            assert k <= ItemIndex.GPU_MAX_K
            return self.index.search(q, k)

    gpu = ItemIndex(Capped(host.index), ids, "v")
    gpu._gpu, gpu._cpu = object(), host.index
    q = synthetic_queries(v, 2, seed=5)
    for k, seen in ((10, [ids[:100], []]), (10, [ids[:2_100], []]), (2_500, None)):
        assert all(np.array_equal(a, b) for a, b in zip(gpu.search(q, k, exclude=seen), host.search(q, k, exclude=seen)))
    assert gpu.index.calls == [110]  # only the first fits the GPU's limit


def test_search_pads_when_exclusions_leave_fewer_than_k():
    v = clustered(30, 4)
    index, _ = build_index(v, np.arange(30), "v", None, num_queries=10)
    _, got = index.search(v[:1], 10, exclude=[list(range(25))])
    assert sorted(got[0][:5].tolist()) == [25, 26, 27, 28, 29]
    assert (got[0][5:] == -1).all()


def test_build_for_model_folder_uses_its_version_and_items(tiny_model_dir, tmp_path):
    from unipinrec.checkpoint import load_model

    report = build_index_for_model(tiny_model_dir, tmp_path / "idx", num_queries=40)
    loaded = load_model(tiny_model_dir)
    index = ItemIndex.load(tmp_path / "idx", expect_model_version=loaded.version)
    assert report.num_items == len(loaded.vocab) and report.recall_at_k == 1.0
    assert np.array_equal(np.sort(index.item_ids), np.sort(loaded.vocab.item_ids))


@pytest.fixture
def tiny_model_dir(tmp_path):
    from unipinrec.serving.synthetic import make_model_dir

    make_model_dir(tmp_path / "m", num_items=120, max_history=8)
    return tmp_path / "m"

