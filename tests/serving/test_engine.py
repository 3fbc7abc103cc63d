"""The serving engine in-process: scores equal a from-scratch reference, the three serving
modes agree where they must, caches and handles behave, bad input is a 4xx naming the field."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from unipinrec.batches import batch_histories
from unipinrec.checkpoint import load_model
from unipinrec.index import IndexVersionMismatch, ItemIndex
from unipinrec.serving.engine import Engine, EngineConfig, settle_heap
from unipinrec.serving.request import ServingError, parse_request
from unipinrec.serving.store import History, InMemoryStore
from unipinrec.serving.synthetic import random_history

L, NUM_ITEMS = 16, 300  # tests/serving/conftest.py's tiny models

RTS = 1_800_000_000


def req(user_id=1, n=10, seed=0, **kw) -> dict:
    h = random_history(np.random.default_rng(seed), n, NUM_ITEMS)
    return {"user_id": user_id, "history": h, "k": 8, "num_candidates": 40, "request_ts": RTS, **kw}


def ids(resp) -> list[int]:
    return [it["item_id"] for it in resp["items"]]


def scores(resp) -> np.ndarray:
    return np.array([it["score"] for it in resp["items"]])


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_dirs(tiny.unified, tiny.unified_index)


def reference(model_dir, body: dict, ranking_dir=None):
    """Serving computed from scratch: encode the last L actions, exact top-C over item vectors
    (seen excluded), full re-encode + rank with the ranking model, utility, top-k."""
    ret = load_model(model_dir)
    rnk = load_model(ranking_dir) if ranking_dir else ret
    hist = [(a["item_id"], a["action"], a["ts"], 0) for a in body["history"]]
    with torch.no_grad():
        batch = batch_histories([hist], [body["request_ts"]], ret.vocab, L)
        user, _ = ret.model.encode_history(batch)
        s = (ret.model.item_vectors()[1:] @ user[0]).numpy()
        seen = {a[0] for a in hist}
        order = [i for i in np.argsort(-s, kind="stable") if ret.vocab.item_ids[i] not in seen][:body["num_candidates"]]
        cand_rows = torch.tensor([[i + 1 for i in order]])
        _, kv = rnk.model.encode_history(batch)
        probs = torch.sigmoid(rnk.model.rank(cand_rows, kv))[0].numpy()
    w = np.array([rnk.tasks.score_weights.get(t, 0.0) for t in rnk.tasks.tasks])
    util = probs @ w
    top = np.argsort(-util, kind="stable")[: body["k"]]
    return [int(ret.vocab.item_ids[order[j]]) for j in top], util[top], s[[order[j] for j in top]]


def test_one_request_equals_the_from_scratch_reference(engine, tiny):
    body = req(n=12)
    resp = engine.handle(body)
    want_ids, want_scores, want_ret = reference(tiny.unified, body)
    assert ids(resp) == want_ids
    np.testing.assert_allclose(scores(resp), want_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([it["retrieval_score"] for it in resp["items"]], want_ret, rtol=1e-4, atol=1e-5)
    assert set(resp["timings_ms"]) >= {"encode", "retrieve", "rank", "total"}
    assert resp["model_version"] == load_model(tiny.unified).version
    assert set(resp["items"][0]["tasks"]) == {"engaged", "saved", "hidden"}
    assert not set(ids(resp)) & {a["item_id"] for a in body["history"]}  # seen items excluded


def test_shared_kv_equals_re_encoding_for_ranking(engine, tiny):
    recompute = Engine.from_dirs(tiny.unified, tiny.unified_index, config=EngineConfig(share_kv=False))
    for seed in range(3):
        a, b = engine.handle(req(user_id=100 + seed, seed=seed)), recompute.handle(req(user_id=100 + seed, seed=seed))
        assert ids(a) == ids(b)
        np.testing.assert_allclose(scores(a), scores(b), rtol=1e-5, atol=1e-6)
        assert "encode_rank" in b["timings_ms"] and "encode_rank" not in a["timings_ms"]


def test_two_model_baseline_serves_the_same_api(tiny):
    base = Engine.from_dirs(tiny.retrieval, tiny.retrieval_index, ranking_dir=tiny.ranking)
    body = req(n=9, seed=4)
    resp = base.handle(body)
    want_ids, want_scores, _ = reference(tiny.retrieval, body, ranking_dir=tiny.ranking)
    assert ids(resp) == want_ids
    np.testing.assert_allclose(scores(resp), want_scores, rtol=1e-5, atol=1e-6)
    assert "+" in resp["model_version"] and "encode_rank" in resp["timings_ms"]


def test_batched_requests_equal_one_at_a_time(engine):
    bodies = [req(user_id=200 + i, n=n, seed=i) for i, n in enumerate([1, 16, 5, 30])]
    bodies.append({**req(user_id=299), "history": []})
    fresh = Engine(engine.ret, engine.index, config=EngineConfig(kv_cache_bytes=0))
    batch = fresh.handle_batch([parse_request(b) for b in bodies])
    for b, got in zip(bodies, batch):
        one = fresh.handle(b)
        assert ids(got) == ids(one)
        np.testing.assert_allclose(scores(got), scores(one), rtol=1e-5, atol=1e-6)


def test_bad_requests_in_a_batch_fail_alone(engine):
    good = req(user_id=300)
    bad = req(user_id=301)
    bad["history"][3]["item_id"] = 5  # not in the catalog
    out = engine.handle_batch([parse_request(good), parse_request(bad)])
    assert isinstance(out[1], ServingError) and out[1].field == "history[3].item_id" and out[1].status == 422
    assert ids(out[0]) == ids(engine.handle(good))


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b["history"][2].update(action=99), "history[2].action"),
    (lambda b: b["history"][4].update(ts=0), "history[4].ts"),
    (lambda b: b.update(request_ts=5), "request_ts"),
])
def test_semantic_errors_name_the_field(engine, mutate, field):
    body = req(user_id=310)
    mutate(body)
    with pytest.raises(ServingError) as e:
        engine.handle(body)
    assert e.value.field == field and 400 <= e.value.status < 500


def test_cross_request_cache_hits_and_extends_with_unchanged_scores(tiny):
    cached = Engine.from_dirs(tiny.unified, tiny.unified_index)
    cold = Engine.from_dirs(tiny.unified, tiny.unified_index, config=EngineConfig(kv_cache_bytes=0))
    full = req(user_id=400, n=14, seed=7)
    first = {**full, "history": full["history"][:9]}
    assert cached.handle(first)["kv_cache"] == "miss"
    assert cached.handle(first)["kv_cache"] == "hit"
    ext = cached.handle(full)  # five actions appended
    assert ext["kv_cache"] == "extend"
    ref = cold.handle(full)
    assert ids(ext) == ids(ref)
    np.testing.assert_allclose(scores(ext), scores(ref), rtol=1e-5, atol=1e-6)
    assert cached.user_cache.stats.as_dict() == {"hits": 1, "extends": 1, "misses": 1}


def _counting_checks(monkeypatch) -> list:
    """check_histories as the resolver calls it, recording how many histories each call checks."""
    import unipinrec.serving.resolve as resolve_mod

    calls, real = [], resolve_mod.check_histories
    monkeypatch.setattr(resolve_mod, "check_histories", lambda hs, *a, **k: calls.append(len(hs)) or real(hs, *a, **k))
    return calls


def test_a_history_byte_for_byte_the_cached_one_skips_the_checks(tiny, monkeypatch):
    """A request whose whole history is exactly its user's cached one (checked when stored) is a
    hit found before the checks: they are skipped, the answer is the first one's, the hit counted
    once; in a batch, the other requests are checked as usual."""
    eng = Engine.from_dirs(tiny.unified, tiny.unified_index)
    body = req(user_id=420, n=12, seed=5)
    calls = _counting_checks(monkeypatch)
    first = eng.handle(body)
    assert first["kv_cache"] == "miss" and calls == [1]
    again = eng.handle(body)
    assert again["kv_cache"] == "hit" and calls == [1, 0]  # nothing checked the second time
    assert ids(again) == ids(first)
    np.testing.assert_allclose(scores(again), scores(first), rtol=1e-5, atol=1e-6)
    assert eng.user_cache.stats.as_dict() == {"hits": 1, "extends": 0, "misses": 1}
    other = req(user_id=421, n=7, seed=6)
    out = eng.handle_batch([parse_request(body), parse_request(other)])
    assert [o["kv_cache"] for o in out] == ["hit", "miss"] and calls[-1] == 1
    assert out[0]["history_length"] == 12 and not out[0]["cold_start"]


@pytest.mark.parametrize("mutate, field", [
    (lambda h: h[3].update(item_id=5), "history[3].item_id"),  # not in the catalog
    (lambda h: h[2].update(action=99), "history[2].action"),
    (lambda h: h[4].update(ts=0), "history[4].ts"),
])
def test_a_changed_history_of_a_cached_user_is_checked_again(tiny, mutate, field):
    """The same user with the same number of actions, one of them changed (a client replaying a
    cached user with a bad action): not a hit, checked, refused naming the action."""
    eng = Engine.from_dirs(tiny.unified, tiny.unified_index)
    body = req(user_id=430, n=10, seed=8)
    eng.handle(body)
    bad = copy.deepcopy(body)
    mutate(bad["history"])
    with pytest.raises(ServingError) as e:
        eng.handle(bad)
    assert e.value.field == field and e.value.status == 422
    assert eng.handle(body)["kv_cache"] == "hit"


def test_a_longer_history_or_an_earlier_request_ts_is_not_probed(tiny, monkeypatch):
    """The probe takes only a history that is the cached one whole: appended actions are checked
    (and extend the entry), and a request_ts before the last action is refused, as without a cache."""
    eng = Engine.from_dirs(tiny.unified, tiny.unified_index)
    full = req(user_id=440, n=14, seed=9)
    first = {**full, "history": full["history"][:9]}
    eng.handle(first)
    calls = _counting_checks(monkeypatch)
    assert eng.handle(full)["kv_cache"] == "extend" and calls == [1]
    with pytest.raises(ServingError) as e:
        eng.handle({**full, "request_ts": 5})
    assert e.value.field == "request_ts"


def test_request_time_gaps_model_hits_only_at_the_same_request_ts(tiny):
    eng = Engine.from_dirs(tiny.request_time_model, tiny.request_time_index)
    body = req(user_id=410, n=6)
    eng.handle(body)
    assert eng.handle(body)["kv_cache"] == "hit"
    later = eng.handle({**body, "request_ts": RTS + 3600})
    assert later["kv_cache"] == "miss"
    fresh = Engine.from_dirs(tiny.request_time_model, tiny.request_time_index, config=EngineConfig(kv_cache_bytes=0))
    np.testing.assert_allclose(scores(later), scores(fresh.handle({**body, "request_ts": RTS + 3600})), rtol=1e-5)


def test_split_retrieve_then_rank_equals_one_request(engine):
    body = req(user_id=500, n=11, seed=3)
    one = engine.handle(body)
    r = engine.handle({**body, "stage": "retrieve"})
    assert len(r["candidates"]) == body["num_candidates"] and r["handle"]
    ranked = engine.handle({"user_id": 500, "stage": "rank", "handle": r["handle"], "k": body["k"]})
    assert ids(ranked) == ids(one)
    np.testing.assert_allclose(scores(ranked), scores(one), rtol=1e-5, atol=1e-6)
    # rank a chosen subset (explicit candidates) on the same KV state
    subset = [c["item_id"] for c in r["candidates"][5:15]]
    chosen = engine.handle({"user_id": 500, "stage": "rank", "handle": r["handle"], "candidates": subset, "k": 3})
    by_id = {it["item_id"]: it["score"] for it in one["items"]}
    assert set(ids(chosen)) <= set(subset)
    for it in chosen["items"]:
        if it["item_id"] in by_id:
            assert abs(it["score"] - by_id[it["item_id"]]) < 1e-5


def test_split_rank_with_unknown_expired_or_foreign_handles(tiny):
    clock = [0.0]
    eng = Engine.from_dirs(tiny.unified, tiny.unified_index, config=EngineConfig(handle_ttl_s=30))
    eng.handles.lru.clock = lambda: clock[0]
    r = eng.handle({**req(user_id=600), "stage": "retrieve"})
    with pytest.raises(ServingError) as e:
        eng.handle({"user_id": 600, "stage": "rank", "handle": "nope"})
    assert (e.value.status, e.value.field) == (404, "handle")
    with pytest.raises(ServingError) as e:
        eng.handle({"user_id": 601, "stage": "rank", "handle": r["handle"]})
    assert (e.value.status, e.value.field) == (422, "user_id")
    with pytest.raises(ServingError) as e:
        eng.handle({"user_id": 600, "stage": "rank", "handle": r["handle"], "candidates": [1000, 3]})
    assert (e.value.status, e.value.field) == (422, "candidates[1]")
    clock[0] = 31.0
    with pytest.raises(ServingError) as e:
        eng.handle({"user_id": 600, "stage": "rank", "handle": r["handle"]})
    assert e.value.status == 410 and "expired" in e.value.message


def test_split_flow_of_the_baseline_re_encodes_with_the_ranking_model(tiny):
    base = Engine.from_dirs(tiny.retrieval, tiny.retrieval_index, ranking_dir=tiny.ranking)
    body = req(user_id=700, n=8, seed=5)
    r = base.handle({**body, "stage": "retrieve"})
    ranked = base.handle({"user_id": 700, "stage": "rank", "handle": r["handle"], "k": body["k"]})
    one = base.handle(body)
    assert ids(ranked) == ids(one)


def test_cold_start_uses_popularity_and_still_ranks(engine):
    resp = engine.handle({"user_id": 800, "history": [], "k": 5, "num_candidates": 20})
    assert resp["cold_start"] and len(resp["items"]) == 5
    assert {it["item_id"] for it in resp["items"]} <= set(engine.popular_ids[:20].tolist())
    assert resp["items"] == sorted(resp["items"], key=lambda it: -it["score"])


def test_history_longer_than_L_is_truncated_to_the_last_L(engine):
    body = req(user_id=900, n=L + 7, seed=8)
    resp = engine.handle(body)
    assert resp["history_truncated"] == 7 and resp["history_length"] == L
    short = engine.handle({**body, "user_id": 901, "history": body["history"][7:], "exclude_seen": False})
    long = engine.handle({**body, "user_id": 902, "exclude_seen": False})
    assert ids(short) == ids(long)


def test_history_from_the_online_store(tiny):
    body = req(user_id=1000, n=10, seed=9)
    store = InMemoryStore({1000: History.from_actions(body["history"])})
    eng = Engine.from_dirs(tiny.unified, tiny.unified_index, store=store)
    from_store = eng.handle({k: v for k, v in body.items() if k != "history"})
    assert from_store["history_source"] == "store" and from_store["history_length"] == 10
    assert ids(from_store) == ids(eng.handle(body))
    unknown = eng.handle({"user_id": 1001, "k": 3, "num_candidates": 10})
    assert unknown["cold_start"]
    no_store = Engine.from_dirs(tiny.unified, tiny.unified_index)
    with pytest.raises(ServingError) as e:
        no_store.handle({"user_id": 1000})
    assert e.value.field == "history"


def test_engine_refuses_an_index_of_another_model(tiny):
    with pytest.raises(IndexVersionMismatch):
        Engine.from_dirs(tiny.retrieval, tiny.unified_index)
    other = ItemIndex.load(tiny.retrieval_index)
    with pytest.raises(IndexVersionMismatch):
        Engine(load_model(tiny.unified), other)


def test_engine_refuses_models_without_the_needed_heads(tiny):
    with pytest.raises(ValueError, match="ranking head"):
        Engine.from_dirs(tiny.retrieval, tiny.retrieval_index, ranking_dir=tiny.retrieval)


def test_engine_imports_no_platform_libraries():
    import subprocess
    import sys

    code = ("import sys, unipinrec.serving.engine, unipinrec.serving.handler_support, unipinrec.index; "
            "print(sorted(m for m in ('kfp', 'feast', 'great_expectations', 'faiss', 'ts') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rank_similarity_model_serves_like_the_reference_through_batches_and_the_cache(tmp_path):
    """The user-item match term reaches serving: one request equals the from-scratch reference,
    batched equals one at a time, and an extended cross-request KV cache leaves scores unchanged."""
    from unipinrec.index import build_index_for_model
    from unipinrec.serving.synthetic import make_model_dir

    make_model_dir(tmp_path / "m", num_items=NUM_ITEMS, max_history=L, seed=5, rank_similarity=True)
    build_index_for_model(tmp_path / "m", tmp_path / "i", num_queries=50)
    assert float(load_model(tmp_path / "m").model.rank_sim_weight.detach().abs().sum()) > 0
    eng = Engine.from_dirs(tmp_path / "m", tmp_path / "i")
    body = req(user_id=500, n=12, seed=3)
    want_ids, want_scores, _ = reference(tmp_path / "m", body)
    resp = eng.handle(body)
    assert ids(resp) == want_ids
    np.testing.assert_allclose(scores(resp), want_scores, rtol=1e-5, atol=1e-6)
    bodies = [req(user_id=510 + i, n=5 + i, seed=10 + i) for i in range(3)]
    batched = eng.handle_batch([parse_request(b) for b in bodies])
    for b, got in zip(bodies, batched):
        one = Engine.from_dirs(tmp_path / "m", tmp_path / "i", config=EngineConfig(kv_cache_bytes=0)).handle(b)
        assert ids(got) == ids(one)
        np.testing.assert_allclose(scores(got), scores(one), rtol=1e-5, atol=1e-6)
    first = {**body, "user_id": 520, "history": body["history"][:7]}
    eng.handle(first)
    ext = eng.handle({**body, "user_id": 520})
    assert ext["kv_cache"] == "extend"
    np.testing.assert_allclose(scores(ext), want_scores, rtol=1e-5, atol=1e-6)


def test_columnar_history_serves_the_same_as_the_list_form(engine):
    b = req(user_id=77, n=12, seed=5)
    cols = {name: [a[name] for a in b["history"]] for name in ("item_id", "action", "ts", "surface")
            if name in b["history"][0]}
    listed = engine.handle(b)
    columnar = engine.handle({**b, "history": cols})
    assert ids(listed) == ids(columnar) and np.allclose(scores(listed), scores(columnar), atol=1e-6)
    assert columnar["history_length"] == 12
    bad = {**cols, "item_id": [*cols["item_id"][:-1], 10**9]}  # unknown item, named by the engine
    with pytest.raises(ServingError) as e:
        engine.handle({**b, "history": bad})
    assert e.value.status == 422 and e.value.field == "history[11].item_id"


def test_settle_heap_collects_garbage_then_freezes_what_is_alive():
    """After a server loads: cyclic garbage is collected (not frozen for good), what is alive is
    frozen, and a full collection then walks only what came after."""
    import gc
    import weakref

    class Node:
        pass

    try:
        cycle = Node()
        cycle.me = cycle
        gone = weakref.ref(cycle)
        del cycle
        kept = Node()
        frozen = settle_heap()
        assert gone() is None and frozen == gc.get_freeze_count() > 10_000
        view = gc.get_objects()  # what a full collection walks now: only what came after the freeze
        assert len(view) < 1_000 and not any(o is kept for o in view)
        after = Node()
        after.me = after
        assert any(o is after for o in gc.get_objects())  # new objects are collected as usual
    finally:
        gc.unfreeze()


def test_the_staged_ranker_leaves_a_nan_utility_out_and_refuses_an_infinite_weight():
    """The staged path's rule is the fused graph's: a NaN utility (a broken model) is not served
    (it sorted last but came back with a NaN score, invalid JSON); a model folder whose task
    weights are not finite is refused by name when the engine builds its ranker."""
    from unipinrec.serving.ranking import Ranker

    r = Ranker(None, ["a", "b"], {"a": 1.0, "b": -0.5}, torch.device("cpu"))
    ids, ret = np.array([11, 12, 13, 14]), np.array([4.0, 3.0, 2.0, 1.0])
    probs = np.array([[0.1, 0.2], [np.nan, 0.1], [0.9, 0.0], [0.3, 0.3]])
    util = probs @ np.array([1.0, -0.5])
    items = r.items(10, ids, ret, probs, util)
    assert [i["item_id"] for i in items] == [13, 14, 11]  # utility order, the NaN one left out
    assert all(np.isfinite(i["score"]) for i in items)
    with pytest.raises(ValueError, match="score_weights.b: must be a finite number"):
        Ranker(None, ["a", "b"], {"a": 1.0, "b": float("inf")}, torch.device("cpu"))
