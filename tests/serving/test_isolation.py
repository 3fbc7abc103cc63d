"""Serving that one bad request cannot break (issue 11, engine side): range-checked integers,
per-request isolation inside a batch, histories cut before validation, split-flow edges, a
deadline that degrades to the retrieval order, and cache bounds that are memory bounds."""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import psutil
import pytest
import torch

from unipinrec.serving.engine import Engine, EngineConfig, engine_stats
from unipinrec.serving.request import Limits, ServingError, parse_request
from unipinrec.serving.synthetic import random_history
from unipinrec.serving.timing import StageTimer

L, NUM_ITEMS = 16, 300  # tests/serving/conftest.py's tiny models
RTS = 1_800_000_000


def body(user_id=1, n=10, seed=0, **kw) -> dict:
    return {"user_id": user_id, "history": random_history(np.random.default_rng(seed), n, NUM_ITEMS), "k": 5,
            "num_candidates": 20, "request_ts": RTS, **kw}


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_dirs(tiny.unified, tiny.unified_index)


def test_integers_out_of_int64_are_a_4xx_naming_the_field():
    for bad in (2**63, -1, 2**64 + 5):
        with pytest.raises(ServingError) as e:
            parse_request({"user_id": 1, "stage": "rank", "handle": "h", "candidates": [3, bad]})
        assert e.value.status == 422 and e.value.field == "candidates[1]"


def test_a_co_batched_bad_rank_call_fails_alone(engine):
    handle = engine.handle(body(user_id=5, stage="retrieve"))["handle"]
    good = [parse_request(body(user_id=10 + i, seed=i)) for i in range(3)]
    with pytest.raises(ServingError):  # finding 1: this used to pass validation and fail the whole batch
        parse_request({"user_id": 5, "stage": "rank", "handle": handle, "candidates": [2**63]})
    ranked = parse_request({"user_id": 5, "stage": "rank", "handle": handle})
    out = engine.handle_batch([good[0], ranked, good[1], good[2]])
    assert all(isinstance(r, dict) and r["items"] for r in out)


def test_an_unexpected_error_fails_only_its_own_request(engine, monkeypatch):
    reqs = [parse_request(body(user_id=20 + i, seed=i)) for i in range(4)]
    alone = [engine.handle_batch([r])[0] for r in reqs]
    real = engine.retriever.retrieve

    def flaky(preps, user_vectors, timer):  # a bug that only request 2's history triggers
        if any(p.req.user_id == 22 for p in preps):
            raise RuntimeError("boom")
        return real(preps, user_vectors, timer)

    monkeypatch.setattr(engine.retriever, "retrieve", flaky)
    before = engine_stats(engine)["isolated_errors"]
    out = engine.handle_batch(reqs)
    assert isinstance(out[2], ServingError) and out[2].status == 500
    for i in (0, 1, 3):
        assert [it["item_id"] for it in out[i]["items"]] == [it["item_id"] for it in alone[i]["items"]]
    assert engine_stats(engine)["isolated_errors"] == before + 1


def test_rank_refuses_a_history_or_request_ts_it_would_ignore():
    for extra in ({"history": []}, {"request_ts": 5}):
        with pytest.raises(ServingError) as e:
            parse_request({"user_id": 1, "stage": "rank", "handle": "h", **extra})
        assert e.value.status == 422 and e.value.field == next(iter(extra))


def test_long_histories_are_cut_to_L_before_validation(engine):
    long = body(user_id=30, n=50_000, seed=3)
    t = time.perf_counter()
    req = parse_request(long, engine.limits)
    parse_s = time.perf_counter() - t
    assert len(req.history) == L and req.history_offset == 50_000 - L
    assert long["history"] and len(long["history"]) == 50_000  # the caller's body is untouched
    resp = engine.handle_batch([parse_request({**long, "exclude_seen": False}, engine.limits)])[0]
    assert resp["history_truncated"] == 50_000 - L and resp["history_length"] == L
    cut = engine.handle({**long, "user_id": 31, "history": long["history"][-L:], "exclude_seen": False})
    assert [it["item_id"] for it in resp["items"]] == [it["item_id"] for it in cut["items"]]
    assert engine.handle_batch([req])[0]["items"] == []  # 50,000 actions saw every item: all excluded
    # a bad action inside the kept window is named at its position in the body the client sent
    bad = {**long, "history": [*long["history"][:-1], {"item_id": 1, "action": -3, "ts": RTS}]}
    with pytest.raises(ServingError) as e:
        parse_request(bad, engine.limits)
    assert e.value.field == f"history[{50_000 - 1}].action"
    assert parse_s < 5.0  # generous: only the last L actions are validated


@pytest.mark.parametrize("columnar", [False, True])
def test_exclude_seen_covers_the_actions_dropped_before_L(engine, columnar):
    """A client history longer than L: the model reads its last L actions, and no item of the
    whole history is retrieved (as from the online store), the dropped actions' included;
    what remains of the catalog is still served."""
    hist = body(n=3 * L, seed=8)["history"]
    sent = {k: [a[k] for a in hist] for k in ("item_id", "action", "ts")} if columnar else hist
    req = parse_request(body(user_id=40, history=sent, k=NUM_ITEMS // 2, num_candidates=NUM_ITEMS), engine.limits)
    assert req.history_offset == 2 * L and len(req.dropped_items) == 2 * L
    got = {it["item_id"] for it in engine.handle_batch([req])[0]["items"]}
    dropped, kept = {a["item_id"] for a in hist[:2 * L]}, {a["item_id"] for a in hist[2 * L:]}
    (resolved,) = engine.resolver.resolve([req], StageTimer(engine.device))
    assert len(resolved.dropped_rows) == len(dropped)  # each item once: they size the seen buffer
    assert len(got) == NUM_ITEMS // 2 and not got & (dropped | kept)
    assert dropped - kept  # the check above is not vacuous: some items are only in the dropped part


def test_a_surface_the_model_does_not_embed_is_refused(tiny):
    """With surfaces embedded, a surface id past the model's is a 422 naming the action (it was
    served as the last surface); a model that reads no surface ignores the field."""
    from unipinrec.checkpoint import load_model
    from unipinrec.index import TorchIndex

    m = load_model(tiny.unified)
    plain = Engine(m, TorchIndex.for_model(m, m.vocab.item_ids))
    m.model.config = dataclasses.replace(m.model.config, use_surface=True)
    m.model.surface_emb = torch.nn.Embedding(m.model.config.num_surfaces, m.model.config.d_model)
    surfaced = Engine(m, TorchIndex.for_model(m, m.vocab.item_ids))
    n = m.model.config.num_surfaces
    hist = body(n=4)["history"]
    ok, bad = [{**hist[0], "surface": n - 1}, *hist[1:]], [*hist[:2], {**hist[2], "surface": n}, hist[3]]
    out = surfaced.handle_batch([parse_request(body(history=h), surfaced.limits) for h in (ok, bad)])
    assert "items" in out[0] and isinstance(out[1], ServingError)
    assert (out[1].status, out[1].field) == (422, "history[2].surface")
    assert "items" in plain.handle_batch([parse_request(body(history=bad), plain.limits)])[0]
    # a store history is cleaned as a client's would be refused: no out-of-range surface reaches
    # the cross-request cache, whose hits skip the checks
    from unipinrec.sequences import History

    h = History(items=[a["item_id"] for a in bad], actions=[a["action"] for a in bad], ts=[a["ts"] for a in bad],
                surfaces=[a.get("surface", 0) for a in bad])
    cleaned, rows = surfaced.resolver._clean(h)
    assert len(cleaned) == 3 and (cleaned.surfaces < n).all() and len(rows) == 3


def test_rank_refuses_what_only_retrieval_applies():
    for extra in ({"deadline_ms": 5}, {"exclude_seen": True}):
        with pytest.raises(ServingError) as e:
            parse_request({"user_id": 1, "stage": "rank", "handle": "h", **extra})
        assert e.value.status == 422 and e.value.field == next(iter(extra))


def test_a_long_key_over_a_long_list_is_refused_in_one_pass():
    """NaN checking walks containers only and names a location only for what it visits, so a
    megabytes-long unknown key over a million numbers (246 s before) is refused at once, its
    name cut short in the error."""
    key = "k" * 1_500_000
    raw = ('{"user_id": 1, "%s": [%s]}' % (key, ", ".join(["0"] * 1_000_000))).encode()
    t = time.perf_counter()
    with pytest.raises(ServingError) as e:
        parse_request(raw, Limits(max_body_bytes=8 * 2**20))
    assert e.value.status == 422 and e.value.message == "unknown field" and len(e.value.field) <= 203
    assert time.perf_counter() - t < 20.0  # generous: the quadratic walk took minutes


@pytest.mark.parametrize("name, field", [("int", "int"), ("list", "list"), ("", 'body[""]')])
def test_unknown_fields_are_named_whatever_they_are_called(name, field):
    with pytest.raises(ServingError) as e:
        parse_request({"user_id": 1, name: 5})
    assert e.value.field == field
    with pytest.raises(ServingError) as e:
        parse_request({"user_id": 1, "history": [{"item_id": 1, "action": 0, "ts": 1, "str": 2}]})
    assert e.value.field == "history[0].str"


def test_deadline_degrades_to_the_retrieval_order(tiny, monkeypatch):
    engine = Engine.from_dirs(tiny.unified, tiny.unified_index)  # its own ranking-time estimate
    real = engine.ranker.rank

    def slow(*args, **kw):  # a deliberately slow ranking stage
        time.sleep(0.2)
        return real(*args, **kw)

    monkeypatch.setattr(engine.ranker, "rank", slow)
    warm = engine.handle(body(user_id=40))  # observes how long ranking takes
    assert "degraded" not in warm
    before = engine_stats(engine)["degraded"]
    resp = engine.handle(body(user_id=41, deadline_ms=50))
    assert resp["degraded"] == "ranking_deadline" and len(resp["items"]) == 5
    retrieved = engine.handle(body(user_id=41, stage="retrieve"))["candidates"]
    assert [it["item_id"] for it in resp["items"]] == [c["item_id"] for c in retrieved[:5]]
    assert engine_stats(engine)["degraded"] == before + 1
    assert "degraded" not in engine.handle(body(user_id=42, deadline_ms=60_000))


def test_server_default_deadline(tiny):
    eng = Engine.from_dirs(tiny.unified, tiny.unified_index, config=EngineConfig(deadline_ms=1))
    eng.handle(body(user_id=50))  # first call: no estimate yet, so it ranks
    assert eng.handle(body(user_id=51)).get("degraded") == "ranking_deadline"


def test_user_cache_is_bounded_in_memory_and_entries(tiny):
    """Finding 3: many users with short histories. The counted bytes include a per-entry
    overhead, so the process grows by no more than the bound plus a constant."""
    bound = 2 * 2**20
    eng = Engine.from_dirs(tiny.unified, tiny.unified_index, config=EngineConfig(kv_cache_bytes=bound))
    proc = psutil.Process(os.getpid())
    reqs = [parse_request(body(user_id=1000 + i, n=1 + i % 3, seed=i % 50, k=1, num_candidates=1))
            for i in range(1500)]
    eng.handle_batch(reqs[:128])
    rss0 = proc.memory_info().rss
    for s in range(0, len(reqs), 128):
        eng.handle_batch(reqs[s:s + 128])
    grew = proc.memory_info().rss - rss0
    stats = engine_stats(eng)
    assert stats["kv_cache_bytes"] <= bound and stats["kv_cache_entries"] < 1500  # evicted by the counted bytes
    assert grew < bound * 1.2 + 16 * 2**20, f"RSS grew {grew / 2**20:.1f} MiB for a {bound / 2**20:.0f} MiB bound"


def test_counted_bytes_cover_the_real_memory_of_short_entries():
    """Finding 3: 400k short histories were counted as 256 MiB while the worker grew 2.58 GB.
    Each entry's count must cover what the process really spends on it."""
    import torch

    from unipinrec.model import KVCache
    from unipinrec.sequences import Actions, History
    from unipinrec.serving.kv_cache import UserKVCache

    cache = UserKVCache(10**12)
    proc = psutil.Process(os.getpid())
    one = torch.zeros(1, 1, dtype=torch.long)
    rss0 = proc.memory_info().rss
    n = 20_000
    for u in range(n):
        kv = KVCache(keys=[torch.randn(1, 4, 1, 8) for _ in range(2)], values=[torch.randn(1, 4, 1, 8) for _ in range(2)],
                     history=Actions(items=one + 1, actions=one, ts=one, surfaces=one, lengths=torch.ones(1, dtype=torch.long),
                                     request_ts=torch.zeros(1, dtype=torch.long)), user_vectors=torch.randn(1, 32))
        cache.put(u, kv, History(items=[u], actions=[0], ts=[0]), 0)
    grew = proc.memory_info().rss - rss0
    assert len(cache.lru) == n
    assert cache.lru.bytes >= 0.9 * grew, f"counted {cache.lru.bytes / n:.0f} B per entry, the process grew {grew / n:.0f}"


def test_limits_keep_history_none_keeps_all():
    req = parse_request(body(n=40), Limits(keep_history=None))
    assert len(req.history) == 40 and req.history_offset == 0
