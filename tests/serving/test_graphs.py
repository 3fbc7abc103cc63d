"""The GPU serving path's static shapes, on CPU (CI has no GPU): bucket rules, and padding a
batch to its bucket (rows, history width, candidates) leaves every real score unchanged; the
device top-K's one-scatter exclusion equals excluding row by row."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unipinrec.index import TorchIndex
from unipinrec.model import ModelConfig, UniPinRec
from unipinrec.sequences import Actions, History
from unipinrec.serving.graphs import Buckets, bucket, pad_kv, padded_rank

N_ITEMS, L = 60, 40


def test_buckets_are_half_octave_steps_and_powers_of_two_stay():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17, 25)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 16, 24, 32]
    assert all(bucket(2**k) == 2**k for k in range(12))
    assert bucket(656) == 768 and bucket(992, hi=992) == 992 and bucket(3, lo=16) == 16
    b = Buckets(max_history=L)
    assert b.width(1) == 16 and b.width(33) == L and b.candidates(1) == 8 and b.batch(5) == 6


def model(kind: str) -> UniPinRec:
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=N_ITEMS, num_actions=4, num_tasks=3, d_model=32, n_layers=2, n_heads=4,
                      max_history=L, dropout=0.0, kind=kind, use_surface=True)
    return UniPinRec(cfg).float().eval()


def histories(lengths, seed=1) -> list[History]:
    rng = np.random.default_rng(seed)
    return [History(items=rng.integers(1, N_ITEMS + 1, n), actions=rng.integers(0, 4, n),
                    ts=np.cumsum(rng.integers(0, 5000, n)) + 1_700_000_000, surfaces=rng.integers(0, 3, n))
            for n in lengths]


@pytest.mark.parametrize("kind", ["unified", "interleaved", "ranking_only"])
def test_padding_to_the_bucket_gives_the_same_scores_fp32(kind):
    m = model(kind)
    hs, rts = histories([5, 13, 0, 21, 9]), [1_800_000_000] * 5
    cand = torch.randint(1, N_ITEMS + 1, (5, 11), generator=torch.Generator().manual_seed(3))
    b = Buckets(max_history=L)
    with torch.no_grad():
        plain = Actions.from_histories(hs, rts)
        u, kv = m.encode_history(plain)
        gaps = m.default_candidate_gaps(kv.lengths, kv.last_ts(), kv.request_ts)
        ref = m.rank(cand, kv, gaps)
        # the encode graph's input: the batch built straight at the bucket shape
        big = Actions.from_histories(hs, rts, rows=b.batch(5), width=b.width(21))
        assert big.items.shape == (6, 24) and big.lengths.tolist() == [5, 13, 0, 21, 9, 0]
        u_big, kv_big = m.encode_history(big)
        got = m.rank(cand, kv_big[:5], gaps)
        padded = padded_rank(m, cand, kv, gaps, b)  # the rank graph's shape: rows, width and candidates padded
    assert torch.isfinite(u_big).all() and (u_big[:5] - u).abs().max() < 1e-5
    assert (got - ref).abs().max() < 1e-5
    assert padded.shape == ref.shape and (padded - ref).abs().max() < 1e-5


def test_pad_kv_keeps_rows_and_masks_the_padding():
    m = model("unified")
    with torch.no_grad():
        _, kv = m.encode_history(Actions.from_histories(histories([3, 7]), [1_800_000_000] * 2))
        big = pad_kv(kv, 4, 16)
    assert big.keys[0].shape[0] == 4 and big.keys[0].shape[2] == 16
    assert big.lengths.tolist() == [3, 7, 0, 0] and not big.padding_mask[2:].any()
    assert torch.equal(big.keys[1][:2, :, :7], kv.keys[1])


def test_device_topk_exclusion_equals_row_by_row():
    rng = np.random.default_rng(0)
    v = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    ids = rng.permutation(1000)[:50] + 7
    index = TorchIndex(v, ids, "v")
    q = torch.randn(4, 8)
    excl = [ids[[1, 1, 5]], None, np.array([999_999, ids[3]]), ids[:49]]  # duplicates, unknown ids, nearly all
    scores, found = index.search(q, 10, exclude=excl)
    full = (q @ v.T).numpy()
    for i, e in enumerate(excl):
        s = full[i].copy()
        if e is not None:
            s[np.isin(ids, e)] = -np.inf
        order = np.argsort(-s, kind="stable")[:10]
        keep = np.isfinite(s[order])
        assert found[i][keep].tolist() == ids[order][keep].tolist()
        assert (found[i][~keep] == -1).all()
    assert (found[3] >= 0).sum() == 1  # 49 of 50 excluded


def test_engine_over_the_device_index_equals_the_faiss_engine(tiny):
    """The device path of retrieval (TorchIndex: seen items masked by one scatter, candidate rows
    handed to the ranker without a host lookup) serves what the faiss path serves."""
    from unipinrec.checkpoint import load_model
    from unipinrec.serving.engine import Engine
    from unipinrec.serving.request import parse_request
    from unipinrec.serving.synthetic import random_history

    faiss_engine = Engine.from_dirs(tiny.unified, tiny.unified_index)
    m = load_model(tiny.unified)
    dev_engine = Engine(m, TorchIndex.for_model(m, m.vocab.item_ids))
    rng = np.random.default_rng(4)
    bodies = [{"user_id": i, "history": random_history(rng, n, 300), "k": 10, "num_candidates": 30,
               "request_ts": 1_800_000_000, "exclude_seen": i != 2} for i, n in enumerate([16, 3, 9, 0])]
    reqs = [parse_request(b, faiss_engine.limits) for b in bodies]
    for a, b, body in zip(faiss_engine.handle_batch(reqs), dev_engine.handle_batch(reqs), bodies):
        assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]]
        assert np.allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]], atol=1e-5)
        seen = {h["item_id"] for h in body["history"]}
        if body["exclude_seen"]:
            assert not seen & {x["item_id"] for x in b["items"]}


@pytest.mark.parametrize("mode", ["a", "b", "c"])
def test_fused_serving_equals_the_staged_path(tiny, mode):
    """The one-graph path (fused.py; eager on CPU) answers a plain batch exactly as the staged
    encoder -> retriever -> ranker path does, in all three modes, and stores the same cache entries."""
    from unipinrec.checkpoint import load_model
    from unipinrec.serving import fused
    from unipinrec.serving.engine import Engine, EngineConfig
    from unipinrec.serving.request import parse_request
    from unipinrec.serving.synthetic import random_history
    from unipinrec.serving.timing import StageTimer

    m = load_model(tiny.unified if mode != "c" else tiny.retrieval)
    rnk = load_model(tiny.ranking) if mode == "c" else None
    eng = Engine(m, TorchIndex.for_model(m, m.vocab.item_ids), ranking=rnk,
                 config=EngineConfig(share_kv=mode == "a"))
    rng = np.random.default_rng(6)
    shapes = [(16, 30), (5, 12), (9, 20), (m.model.config.max_history + 9, 25)]  # (history, candidates)
    bodies = [{"user_id": 100 + i, "history": random_history(rng, n, 300), "k": 7, "num_candidates": c,
               "request_ts": 1_800_000_000, "exclude_seen": i != 1} for i, (n, c) in enumerate(shapes)]
    reqs = [parse_request(b, eng.limits) for b in bodies]
    staged = eng.handle_batch(reqs)
    for r in reqs:  # forget the staged run's cache entries
        eng.user_cache.lru.pop(r.user_id)
    preps = eng.resolver.resolve(reqs, StageTimer(eng.device))
    with torch.inference_mode():  # as the engine serves
        got, looked = fused.serve(eng, preps, StageTimer(eng.device), fused.FusedGraphs(eng))
    assert got is not None and all(lk.status == "miss" for lk in looked)
    for a, b in zip(staged, got):
        assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]]
        for x, y in zip(a["items"], b["items"]):
            assert abs(x["score"] - y["score"]) < 1e-5 and abs(x["retrieval_score"] - y["retrieval_score"]) < 1e-5
            assert x["tasks"].keys() == y["tasks"].keys()
        assert {k: v for k, v in a.items() if k not in ("items", "timings_ms")} == \
               {k: v for k, v in b.items() if k not in ("items", "timings_ms")}
    # a longer history is cut to its last L at parsing; its whole history is excluded, the dropped actions too
    seen = {h["item_id"] for h in bodies[3]["history"]}
    assert got[3]["history_truncated"] == 9 and not seen & {x["item_id"] for x in got[3]["items"]}
    assert len(eng.user_cache.lru) == 4  # the fused misses were stored
    again = eng.handle_batch(reqs)  # now hits: the staged path serves them, from what fused stored
    assert [r["kv_cache"] for r in again] == ["hit"] * 4
    with torch.inference_mode():  # hits through the fused path: the cached KV, no encode, the same answers
        hit, _ = fused.serve(eng, eng.resolver.resolve(reqs, StageTimer(eng.device)), StageTimer(eng.device),
                             fused.FusedGraphs(eng))
    assert [r["kv_cache"] for r in hit] == ["hit"] * 4
    for a, b in zip(again, hit):
        assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]]
        assert np.allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]], atol=1e-5)
    assert [x["item_id"] for x in again[0]["items"]] == [x["item_id"] for x in staged[0]["items"]]
    deadline = [parse_request({**bodies[0], "deadline_ms": 5000}, eng.limits)]
    assert fused.serve(eng, eng.resolver.resolve(deadline, StageTimer(eng.device)), StageTimer(eng.device),
                       fused.FusedGraphs(eng))[0] is None  # a deadline takes the staged path


def test_pipelined_chunks_answer_as_one_batch(tiny):
    """A large fused batch served in chunks (fused.serve_pipelined; eager on CPU) answers every
    request as the staged path does, in order, with a bad request and a deadline request (a
    chunk that is not plain takes the staged path) among them."""
    from unipinrec.checkpoint import load_model
    from unipinrec.serving import fused
    from unipinrec.serving.engine import Engine
    from unipinrec.serving.request import ServingError, parse_request
    from unipinrec.serving.synthetic import random_history

    m = load_model(tiny.unified)
    eng = Engine(m, TorchIndex.for_model(m, m.vocab.item_ids))
    rng = np.random.default_rng(8)
    bodies = [{"user_id": 300 + i, "history": random_history(rng, 3 + i, 300), "k": 5, "num_candidates": 10 + i,
               "request_ts": 1_800_000_000} for i in range(7)]
    bodies[2]["request_ts"] = 5  # before its history: a 422 for this request alone
    bodies[5]["deadline_ms"] = 5000  # its chunk is not plain
    reqs = [parse_request(b, eng.limits) for b in bodies]
    staged = eng.handle_batch(reqs)
    for r in reqs:
        eng.user_cache.lru.pop(r.user_id)
    eng.fused = fused.FusedGraphs(eng)
    with torch.inference_mode():
        got = fused.serve_pipelined(eng, reqs, 2)
    assert len(got) == 7 and isinstance(got[2], ServingError) and got[2].status == 422
    for i, (a, b) in enumerate(zip(staged, got)):
        if i == 2:
            continue
        assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]], i
        assert np.allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]], atol=1e-5)
        assert a["history_length"] == b["history_length"] and b["kv_cache"] == "miss"
    assert len(eng.user_cache.lru) == 6  # every served miss was stored


def test_handle_stream_answers_each_batch_as_handle_batch(tiny):
    """Engine.handle_stream (a serving loop's pipelined batches; the fused path run eagerly on
    CPU) gives every batch handle_batch's answers, in order: plain batches, a bad request, a
    deadline batch (staged), a split-flow retrieve batch and its rank batch between them."""
    from unipinrec.checkpoint import load_model
    from unipinrec.serving import fused
    from unipinrec.serving.engine import Engine, EngineConfig
    from unipinrec.serving.request import ServingError, parse_request
    from unipinrec.serving.synthetic import random_history

    m = load_model(tiny.unified)
    eng = Engine(m, TorchIndex.for_model(m, m.vocab.item_ids), config=EngineConfig(kv_cache_bytes=0))
    rng = np.random.default_rng(9)
    body = lambda i, **kw: {"user_id": 400 + i, "history": random_history(rng, 3 + i, 300), "k": 5,  # noqa: E731
                            "num_candidates": 10 + i, "request_ts": 1_800_000_000, **kw}
    batches = [[parse_request(body(i), eng.limits) for i in range(3)],
               [parse_request(body(3, request_ts=5), eng.limits), parse_request(body(4), eng.limits)],
               [parse_request(body(5, deadline_ms=5000), eng.limits)],
               [parse_request(body(6), eng.limits) for _ in range(2)]]
    expected = [eng.handle_batch(b) for b in batches]
    eng.fused = fused.FusedGraphs(eng)
    got = list(eng.handle_stream(iter(batches)))
    assert len(got) == len(batches)
    for exp, out in zip(expected, got):
        assert len(exp) == len(out)
        for a, b in zip(exp, out):
            if isinstance(a, ServingError):
                assert isinstance(b, ServingError) and (a.status, a.field) == (b.status, b.field)
                continue
            assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]]
            assert np.allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]], atol=1e-5)
    # a split flow among the batches: the retrieve batch, then its rank batch, answered in order
    retr = eng.handle_batch([parse_request(body(7, stage="retrieve"), eng.limits)])[0]
    rank = parse_request({"user_id": 407, "stage": "rank", "handle": retr["handle"], "k": 3}, eng.limits)
    mixed = list(eng.handle_stream([batches[0], [rank], batches[3]]))
    assert [len(o) for o in mixed] == [3, 1, 2] and len(mixed[1][0]["items"]) == 3
    assert [x["item_id"] for x in mixed[2][0]["items"]] == [x["item_id"] for x in expected[3][0]["items"]]


def test_fused_function_traces_as_one_graph(tiny):
    """EngineConfig.compile: the fused function goes through torch.compile with fullgraph=True
    (on CUDA with inductor; here dynamo's tracing with the eager backend), so a graph break, which
    would leave Python between the kernels of a captured replay, fails here; the traced function
    gives the eager answers."""
    from unipinrec.checkpoint import load_model
    from unipinrec.serving import fused
    from unipinrec.serving.engine import Engine, EngineConfig
    from unipinrec.serving.request import parse_request
    from unipinrec.serving.synthetic import random_history
    from unipinrec.serving.timing import StageTimer

    m = load_model(tiny.unified)
    eng = Engine(m, TorchIndex.for_model(m, m.vocab.item_ids), config=EngineConfig(kv_cache_bytes=0, compile=True))
    rng = np.random.default_rng(4)
    L = m.model.config.max_history
    reqs = [parse_request({"user_id": i, "history": random_history(rng, n, 300), "k": 5, "num_candidates": 12,
                           "request_ts": 1_800_000_000, "exclude_seen": i % 2 == 0}, eng.limits)
            for i, n in enumerate((3, L + 5, 1))]
    preps = eng.resolver.resolve(reqs, StageTimer(eng.device))
    acts = Actions.from_histories([p.window(L) for p in preps], [p.request_ts for p in preps], rows=4, width=L)
    seen = torch.as_tensor(fused._seen_before_window(preps, 4, L))
    r = eng.retriever
    args = (m.model, None, r.index, r._row_to_pos, r._pos_to_row, eng.ranker.weights)
    graphs = fused.FusedGraphs(eng)
    assert graphs.backend == "eager"
    import unipinrec.attention as attention

    attention._CHOSEN_KERNEL.clear()  # as in a fresh process: the kernel is chosen before the trace
    with torch.inference_mode():
        got = graphs.function(lambda: fused.serve_fn(*args, acts, seen, 16))()[1]
        ref = fused.serve_fn(*args, acts, seen, 16)[1]
    assert torch.equal(ref, got)


def test_pinned_ring_hands_each_buffer_back_only_after_the_others_of_its_shape():
    """The fused path's host buffers are reused in turn: a batch's buffer is not handed to the
    next `depth - 1` batches of its shape (those still in flight may read or fill it)."""
    from unipinrec.serving import fused

    ring = fused.PinnedRing(pin=False, depth=3)
    first = [ring.take((4, 5), torch.long)]
    assert len(ring._rings[((4, 5), torch.long)]) == 3  # a shape's buffers made at its first take (the warm-up's)
    first += [ring.take((4, 5), torch.long) for _ in range(2)]
    assert len({b.data_ptr() for b in first}) == 3 and all(b.shape == (4, 5) for b in first)
    other = ring.take((2,), torch.float32)  # another shape: its own buffers
    assert other.dtype == torch.float32 and other.data_ptr() not in {b.data_ptr() for b in first}
    again = [ring.take((4, 5), torch.long) for _ in range(4)]
    assert [b.data_ptr() for b in again] == [b.data_ptr() for b in first + first[:1]]
    assert ring.mark(again[0]) is None  # unpinned: no device copy to wait for


def test_pinned_ring_marks_a_batch_with_one_event_and_asks_the_device_once(monkeypatch):
    """A batch's buffers share one event, and once the host has waited for a mark, earlier marks
    are known done: taking their buffers again asks the device nothing (each CUDA call costs the
    GPU machine's host 4-11 us). A fake event stands in for CUDA's."""
    from unipinrec.serving import fused

    class Event:
        made = syncs = 0

        def __init__(self):
            Event.made += 1
            self.records = 0

        def record(self):
            self.records += 1

        def synchronize(self):
            Event.syncs += 1

    monkeypatch.setattr(fused.torch.cuda, "Event", Event)
    ring = fused.PinnedRing(pin=False, depth=2)
    a, b = ring.take((3,), torch.long), ring.take((2,), torch.long)
    ring.pin = True  # the buffers exist (unpinned here); from now on the ring marks as on a GPU
    first = ring.mark(a, b)
    assert first[0] == 1 and Event.made == 1 and ring._marks[b.data_ptr()] == first
    second = ring.mark(ring.take((3,), torch.long))
    assert second[0] == 2 and Event.made == 2
    ring.wait(second)
    assert Event.syncs == 1
    ring.wait(first)  # before the one waited for: done already
    again = ring.take((3,), torch.long)  # a again, its mark done
    assert again.data_ptr() == a.data_ptr() and Event.syncs == 1
    third = ring.mark(again)  # a's own event, recorded again
    assert third[1] is first[1] and first[1].records == 2 and Event.made == 2
    ring.take((3,), torch.long)
    ring.take((3,), torch.long)  # a once more: its mark 3 not waited for yet, so the device is asked
    assert Event.syncs == 2


def test_descending_places_are_a_stable_descending_sort_of_each_row():
    """The fused graph orders a row's candidates by counting, for each, the entries that go
    before it (no device sort): the same permutation as a stable descending sort, ties (equal
    utilities, the -inf of candidates not found) kept in retrieval order."""
    from unipinrec.serving import fused

    rng = np.random.default_rng(7)
    x = rng.normal(size=(5, 40)).astype(np.float32)
    x[0, ::3] = x[0, 1]  # ties
    x[1, 10:] = -np.inf  # not found
    x[2] = 0.5  # all equal
    x[3, :20] = np.round(x[3, :20])  # more ties, among integers
    places = fused.descending_places(torch.from_numpy(x)).numpy()
    for row, p in zip(x, places):
        order = np.argsort(-row, kind="stable")
        assert sorted(p.tolist()) == list(range(len(row)))  # a permutation: the scatter fills every place
        assert np.array_equal(np.argsort(p), order)


@pytest.mark.parametrize("pairs", [10**9, 0], ids=["places", "sort"])
def test_nan_utilities_are_not_found_and_the_others_keep_their_order(monkeypatch, pairs):
    """Some candidates' probabilities NaN (a broken model): those are not found (id -1, placed
    last), and the others keep the stable descending order of their utilities, by places and by
    sort alike."""
    from types import SimpleNamespace

    from unipinrec.serving import fused

    monkeypatch.setattr(fused, "PLACES_MAX_PAIRS", pairs)
    rng = np.random.default_rng(5)
    B, C, T = 3, 12, 2
    probs = torch.from_numpy(rng.random((B, C, T)).astype(np.float32))
    probs[0, [1, 4], 0] = float("nan")
    probs[2, :, 1] = float("nan")  # a whole row
    top = torch.sort(torch.from_numpy(rng.normal(size=(B, C)).astype(np.float32)), dim=1, descending=True).values
    pos = torch.arange(C).repeat(B, 1)
    seen = torch.tensor([[0, C], [0, 9], [0, C]])  # row 1 asked for 9 candidates
    weights = torch.tensor([1.0, -0.5])
    index = SimpleNamespace(_ids_t=torch.arange(100, 100 + C))
    packed, utility = fused.pack_candidates(probs, top, pos, seen, weights, index)
    out = fused.in_response_order(packed, utility)
    ids = out[..., T + 2]
    for b in range(B):
        u = (probs[b] @ weights).numpy()
        ok = [i for i in range(C) if not np.isnan(u[i]) and i < int(seen[b, 1])]
        want = [100 + i for i in sorted(ok, key=lambda i: -u[i])]
        assert ids[b, :len(ok)].tolist() == want and (ids[b, len(ok):] == -1).all()
    assert (ids[2] == -1).all()


def test_a_nan_utility_is_not_found_and_the_others_keep_their_places(tiny):
    """A broken model's NaN utility must not break the order (NaN compares false with all, so it
    would share a place and leave another empty): that candidate counts as not found."""
    from unipinrec.checkpoint import load_model
    from unipinrec.serving import fused
    from unipinrec.serving.engine import Engine, EngineConfig
    from unipinrec.serving.request import parse_request
    from unipinrec.serving.synthetic import random_history
    from unipinrec.serving.timing import StageTimer

    m = load_model(tiny.unified)
    eng = Engine(m, TorchIndex.for_model(m, m.vocab.item_ids), config=EngineConfig(kv_cache_bytes=0))
    L = m.model.config.max_history
    req = parse_request({"user_id": 1, "history": random_history(np.random.default_rng(2), 9, 300), "k": 5,
                         "num_candidates": 12, "request_ts": 1_800_000_000}, eng.limits)
    preps = eng.resolver.resolve([req], StageTimer(eng.device))
    acts = Actions.from_histories([p.window(L) for p in preps], [p.request_ts for p in preps], rows=1, width=16)
    seen = torch.as_tensor(fused._seen_before_window(preps, 1, L))
    r = eng.retriever
    T = len(eng.ranker.task_names)
    with torch.inference_mode():
        ok = fused.serve_fn(m.model, None, r.index, r._row_to_pos, r._pos_to_row, eng.ranker.weights, acts, seen, 16)[1]
        nan = torch.full_like(eng.ranker.weights, float("nan"))
        bad = fused.serve_fn(m.model, None, r.index, r._row_to_pos, r._pos_to_row, nan, acts, seen, 16)[1]
    assert (ok[0, :12, T + 2] >= 0).all() and (ok[0, 12:, T + 2] == -1).all()  # 12 found, in the first places
    assert (bad[:, :, T + 2] == -1).all()  # every utility NaN: none found, and every place filled
    assert sorted(bad[0, :, T + 1].view(torch.int64).tolist()) == sorted(ok[0, :, T + 1].view(torch.int64).tolist())


def test_the_response_order_is_the_same_by_places_and_by_sort(monkeypatch):
    """in_response_order scatters small batches to their places and sorts larger ones: both give
    the stable descending order of the utilities, ties (and the not-found -inf) in retrieval order."""
    from unipinrec.serving import fused

    rng = np.random.default_rng(3)
    util = torch.from_numpy(np.round(rng.normal(size=(6, 32)), 1).astype(np.float32))  # many ties
    util[2, 5:] = float("-inf")
    packed = torch.arange(6 * 32 * 3).reshape(6, 32, 3)
    order = torch.from_numpy(np.stack([np.argsort(-u, kind="stable") for u in util.numpy()]))
    want = packed.gather(1, order[..., None].expand_as(packed))
    monkeypatch.setattr(fused, "PLACES_MAX_PAIRS", 6 * 32 * 32)
    assert torch.equal(fused.in_response_order(packed, util), want)  # places
    monkeypatch.setattr(fused, "PLACES_MAX_PAIRS", 6 * 32 * 32 - 1)
    assert torch.equal(fused.in_response_order(packed, util), want)  # sort
