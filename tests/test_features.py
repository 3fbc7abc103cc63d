"""Feast feature store: point-in-time histories (no leak at or after request_ts), online/offline
parity, and examples whose histories come from Feast equal the example builder's rule."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from unipinrec import features as F
from unipinrec import format as fmt

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

L = 3  # small, so truncation to the last L is exercised


def _events(rows):
    """rows: (user, item, action, ts, surface, request_id, position)."""
    cols = list(zip(*rows))
    return pa.table({
        "user_id": pa.array(cols[0], pa.int64()), "item_id": pa.array(cols[1], pa.int64()),
        "action": pa.array(cols[2], pa.int8()), "ts": pa.array(cols[3], pa.int64()),
        "surface": pa.array(cols[4], pa.int8()), "request_id": pa.array(cols[5], pa.int64()),
        "position": pa.array(cols[6], pa.int16()),
    })


# user 1: clicks at 100, 200 (two actions in the same second), 300, 400; an impression (action 0)
# at 250 that is not history. user 2: one action at 1000. user 3 has no history actions at all.
EVENTS = [
    (1, 10, 1, 100, 1, None, None),
    (1, 11, 2, 200, 0, 7, 0),
    (1, 12, 1, 200, 0, 7, 1),
    (1, 13, 0, 250, 0, 8, 0),
    (1, 14, 3, 300, 1, None, None),
    (1, 15, 1, 400, 1, None, None),
    (2, 20, 4, 1000, 1, None, None),
    (3, 30, 0, 500, 0, 9, 0),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("feast")
    raw = root / "raw"
    fmt.write_sharded(raw / "events", _events(EVENTS), fmt.EVENTS_SCHEMA)
    items = pa.table({"item_id": pa.array(range(10, 31), pa.int64()), "category": pa.array([i % 3 for i in range(21)], pa.int32()),
                      "title": pa.array([f"item {i}" for i in range(10, 31)])})
    fmt.write_sharded(raw / "items", items, fmt.ITEMS_SCHEMA)
    repo = root / "repo"
    meta = F.build_feature_store(raw, repo, max_history=L)
    return repo, meta


def _items(hist: pa.ListArray) -> list[list[int]]:
    return [[a["item_id"] for a in h] for h in hist.to_pylist()]


def test_history_is_strictly_before_request_ts(store):
    repo, _ = store
    queries = [(1, 99), (1, 100), (1, 101), (1, 200), (1, 201), (1, 300), (1, 301), (1, 10_000),
               (2, 1000), (2, 1001), (3, 600), (4, 600)]
    hist = F.historical_histories(repo, [u for u, _ in queries], [t for _, t in queries])
    assert _items(hist) == [
        [],            # before anything
        [],            # an action AT request_ts is not history
        [10],
        [10],          # both actions at 200 are hidden at 200 ...
        [10, 11, 12],  # ... and visible one second later; the impression at 250 never is
        [10, 11, 12],
        [11, 12, 14],  # the last L = 3
        [12, 14, 15],
        [],
        [20],
        [],            # only an impression: no history
        [],            # unknown user
    ]
    for (u, t), h in zip(queries, hist.to_pylist()):
        assert all(a["ts"] < t for a in h), (u, t, h)
        assert [a["ts"] for a in h] == sorted(a["ts"] for a in h)


def test_history_fields_round_trip(store):
    repo, _ = store
    (h,) = F.historical_histories(repo, [1], [301]).to_pylist()
    assert h == [
        {"item_id": 11, "action": 2, "ts": 200, "surface": 0},
        {"item_id": 12, "action": 1, "ts": 200, "surface": 0},
        {"item_id": 14, "action": 3, "ts": 300, "surface": 1},
    ]


def test_online_matches_offline_for_the_same_user(store):
    repo, meta = store
    assert meta["online"] is True
    lookup = F.OnlineHistoryLookup(repo)
    later = 10**9
    offline = F.historical_histories(repo, [1, 2, 3], [later] * 3).to_pylist()
    for user, off in zip([1, 2, 3], offline):
        assert lookup(user) == off
    assert lookup(1)[-1]["item_id"] == 15
    assert lookup(12345) == []  # cold start


def test_item_features_are_online(store):
    repo, _ = store
    fs = F.open_store(repo)
    got = fs.get_online_features(features=fs.get_feature_service("item_catalog_v1"),
                                 entity_rows=[{"item_id": 10}, {"item_id": 14}]).to_dict()
    assert got["category"] == [0, 1]
    assert got["title"] == ["item 10", "item 14"]


def test_examples_read_histories_through_feast(tmp_path):
    """On generated data, every Feast point-in-time history equals the example builder's."""
    from unipinrec.data import build_examples, generate_synthetic

    raw, ex, repo = tmp_path / "raw", tmp_path / "ex", tmp_path / "repo"
    generate_synthetic(raw, num_users=60, num_items=80, num_requests_per_user=6, seed=3, progress=False)
    build_examples(raw, ex, max_history=8, progress=False)
    F.build_feature_store(raw, repo, max_history=8, at=F.request_times(raw, 8))  # as the pipeline does
    builder = {s: fmt.read_sharded(ex / s) for s in fmt.SPLITS}
    stats = F.attach_histories(ex, repo, tmp_path / "ex_feast")
    assert {s: v["examples"] for s, v in stats.items()} == {s: t.num_rows for s, t in builder.items()}
    assert all(v["history_differs_from_builder"] == 0 for v in stats.values()), stats
    feast_test = fmt.read_sharded(tmp_path / "ex_feast" / "test")
    assert feast_test.column("history").equals(builder["test"].column("history"))
    assert fmt.read_meta(tmp_path / "ex_feast")["history_source"] == "feast:unipinrec_v1"
    # no history reaches request_ts
    for row in feast_test.slice(0, 30).to_pylist():
        assert all(a["ts"] < row["request_ts"] for a in row["history"])
    # between two requests a lookup sees an earlier snapshot: stale, never a later action
    users = feast_test.column("user_id").to_numpy()[:20]
    when = feast_test.column("request_ts").to_numpy()[:20] - 1
    for t, h in zip(when, F.historical_histories(repo, users, when).to_pylist()):
        assert all(a["ts"] < t for a in h)
    # the online store holds each user's latest history (all actions, the last 8)
    events = fmt.read_sharded(raw / "events").to_pylist()
    lookup = F.OnlineHistoryLookup(repo)
    for u in (0, 1, 2):
        mine = sorted((e for e in events if e["user_id"] == u and e["action"] != 0),
                      key=lambda e: (e["ts"], e["request_id"] if e["request_id"] is not None else -1,
                                     e["position"] if e["position"] is not None else -1))
        assert [a["item_id"] for a in lookup(u)] == [e["item_id"] for e in mine[-8:]]


def test_apply_leaves_the_process_clean(store, tmp_path):
    """`feast apply` imports the definition files by generic names (entities, ...); they must
    not stay in sys.modules or change the working directory."""
    import os
    import sys

    cwd = os.getcwd()
    repo = F.prepare_repo(tmp_path / "r")
    fmt.write_sharded(tmp_path / "raw" / "events", _events(EVENTS), fmt.EVENTS_SCHEMA)
    fmt.write_sharded(tmp_path / "raw" / "items", pa.table({"item_id": [10], "category": [1], "title": ["x"]}),
                      fmt.ITEMS_SCHEMA)
    F.write_sources(tmp_path / "raw", repo, 2)
    F.apply(repo)
    assert os.getcwd() == cwd
    assert "entities" not in sys.modules and "user_history" not in sys.modules
    assert (repo / "data" / "registry.db").exists()


def test_bad_env_and_missing_repo_are_clear(tmp_path):
    with pytest.raises(ValueError, match="env 'prod'"):
        F.open_store(tmp_path, env="prod")
    with pytest.raises(F.FeatureStoreError, match="feature_store.yaml not found"):
        F.open_store(tmp_path)
    with pytest.raises(F.FeatureStoreError, match="feature_meta.json"):
        F.read_feature_meta(tmp_path)


def test_snapshots_table_shape():
    """Vectorised snapshots agree with a naive per-row construction."""
    import tempfile

    rng = np.random.default_rng(0)
    rows = []
    for u in range(5):
        ts = np.sort(rng.integers(0, 50, size=12))
        for t in ts:
            rows.append((u, int(rng.integers(0, 9)), int(rng.integers(0, 3)), int(t), 1, None, None))
    with tempfile.TemporaryDirectory() as d:
        fmt.write_sharded(d, _events(rows), fmt.EVENTS_SCHEMA)
        snap = F.history_snapshots(d, 4).to_pylist()
    hist = [r for r in rows if r[2] != 0]
    expected = []
    for u in range(5):
        mine = [r for r in hist if r[0] == u]
        for t in sorted({r[3] for r in mine}):
            upto = [r for r in mine if r[3] <= t][-4:]
            expected.append((u, t + 1, [r[1] for r in upto], [r[3] for r in upto]))
    got = [(r["user_id"], int(r["event_timestamp"].timestamp()), r["hist_item_ids"], r["hist_ts"]) for r in snap]
    assert got == expected

    # snapshots at given (user, time) points hold the actions strictly before the time, plus
    # every user's latest state; user 9 has no actions, time 0 precedes every action
    at_users, at_times = np.array([0, 0, 1, 3, 9, 2]), np.array([25, 50, 0, 30, 10, 51])
    with tempfile.TemporaryDirectory() as d:
        fmt.write_sharded(d, _events(rows), fmt.EVENTS_SCHEMA)
        snap = F.history_snapshots(d, 4, at=(at_users, at_times)).to_pylist()
    expected = []
    for u, t in zip(at_users, at_times):
        before = [r for r in hist if r[0] == u and r[3] < t][-4:]
        if before:
            expected.append((int(u), int(t), [r[1] for r in before]))
    for u in range(5):
        mine = [r for r in hist if r[0] == u]
        expected.append((u, mine[-1][3] + 1, [r[1] for r in mine[-4:]]))
    got = [(r["user_id"], int(r["event_timestamp"].timestamp()), r["hist_item_ids"]) for r in snap]
    assert sorted(got) == sorted(expected)


# ---------------------------------------------------------------------------------------------
# history_impressions: impressions (action 0) are history too, in Feast as in the example builder

@pytest.fixture(scope="module")
def store_with_impressions(tmp_path_factory):
    root = tmp_path_factory.mktemp("feast-imp")
    raw = root / "raw"
    fmt.write_sharded(raw / "events", _events(EVENTS), fmt.EVENTS_SCHEMA)
    items = pa.table({"item_id": pa.array(range(10, 31), pa.int64()), "category": pa.array([0] * 21, pa.int32()),
                      "title": pa.array([f"item {i}" for i in range(10, 31)])})
    fmt.write_sharded(raw / "items", items, fmt.ITEMS_SCHEMA)
    repo = root / "repo"
    return repo, F.build_feature_store(raw, repo, max_history=L, history_impressions=True)


def test_store_meta_records_the_history_rule(store, store_with_impressions):
    assert store[1]["sources"]["history_impressions"] is False
    assert store_with_impressions[1]["sources"]["history_impressions"] is True
    assert F.read_feature_meta(store_with_impressions[0])["sources"]["history_impressions"] is True


def test_history_impressions_are_point_in_time_history_and_online(store_with_impressions):
    repo, _ = store_with_impressions
    queries = [(1, 250), (1, 251), (1, 10_000), (3, 500), (3, 501)]
    hist = F.historical_histories(repo, [u for u, _ in queries], [t for _, t in queries])
    assert _items(hist) == [
        [10, 11, 12],  # the impression at 250 is hidden at 250 ...
        [11, 12, 13],  # ... and history one second later (the last L = 3)
        [13, 14, 15],
        [],
        [30],          # a user with only an impression now has a history
    ]
    assert hist.to_pylist()[1][-1] == {"item_id": 13, "action": 0, "ts": 250, "surface": 0}
    lookup = F.OnlineHistoryLookup(repo)
    assert [(a["item_id"], a["action"]) for a in lookup(1)] == [(13, 0), (14, 3), (15, 1)]
    assert lookup(3) == [{"item_id": 30, "action": 0, "ts": 500, "surface": 0}]


@pytest.fixture(scope="module")
def synthetic_with_impressions(tmp_path_factory):
    """Generated data; examples and a Feast store both built with history_impressions=True."""
    from unipinrec.data import build_examples, generate_synthetic

    root = tmp_path_factory.mktemp("feast-imp-syn")
    raw, ex, repo = root / "raw", root / "ex", root / "repo"
    generate_synthetic(raw, num_users=40, num_items=60, num_requests_per_user=5, seed=4, progress=False)
    build_examples(raw, ex, max_history=12, progress=False, history_impressions=True)
    F.build_feature_store(raw, repo, max_history=12, history_impressions=True,
                          at=F.request_times(raw, 12))
    return root, raw, ex, repo


def test_feast_histories_with_impressions_equal_the_builders(synthetic_with_impressions):
    root, raw, ex, repo = synthetic_with_impressions
    builder = {s: fmt.read_sharded(ex / s) for s in fmt.SPLITS}
    stats = F.attach_histories(ex, repo, root / "ex_feast")
    assert {s: v["examples"] for s, v in stats.items()} == {s: t.num_rows for s, t in builder.items()}
    assert all(v["history_differs_from_builder"] == 0 for v in stats.values()), stats
    for s in fmt.SPLITS:
        assert fmt.read_sharded(root / "ex_feast" / s).column("history").equals(builder[s].column("history"))
    meta = fmt.read_meta(root / "ex_feast")
    assert meta["history_impressions"] is True
    test = fmt.read_sharded(root / "ex_feast" / "test").to_pylist()
    actions = [a["action"] for row in test for a in row["history"]]
    assert 0 in actions and any(a != 0 for a in actions)  # impressions and engagements, both
    for row in test:
        assert all(a["ts"] < row["request_ts"] for a in row["history"])
    # online: each user's latest history, impressions included (all events, the last 12)
    events = fmt.read_sharded(raw / "events").to_pylist()
    lookup = F.OnlineHistoryLookup(repo)
    for u in (0, 1, 2):
        mine = sorted((e for e in events if e["user_id"] == u),
                      key=lambda e: (e["ts"], e["request_id"] if e["request_id"] is not None else -1,
                                     e["position"] if e["position"] is not None else -1))
        assert [(a["item_id"], a["action"]) for a in lookup(u)] == [(e["item_id"], e["action"]) for e in mine[-12:]]


def test_attach_histories_refuses_a_store_with_the_other_history_rule(synthetic_with_impressions):
    from unipinrec.data import build_examples

    root, raw, ex, repo = synthetic_with_impressions
    plain = root / "ex_plain"
    build_examples(raw, plain, max_history=12, progress=False)  # default rule: no impressions
    with pytest.raises(F.FeatureStoreError, match="history_impressions=True.*history_impressions=False"):
        F.attach_histories(plain, repo, root / "ex_refused")
    assert not (root / "ex_refused").exists()  # refused before writing anything
    # examples from before the option (no key in meta) hold the default rule: refused too
    old = root / "ex_old"
    import shutil

    shutil.copytree(ex, old)
    meta = fmt.read_meta(old)
    del meta["history_impressions"]
    fmt.write_meta(old, meta)
    with pytest.raises(F.FeatureStoreError, match="history_impressions"):
        F.attach_histories(old, repo, root / "ex_refused")


def test_engine_serves_a_user_from_a_store_with_impressions(tmp_path):
    """A user_id-only request reads impressions from the online store and is scored; so is a
    request whose own history holds action 0."""
    from unipinrec.index import build_index_for_model
    from unipinrec.serving.engine import Engine
    from unipinrec.serving.synthetic import ITEM_ID_OFFSET, make_model_dir

    # the model's items start at ITEM_ID_OFFSET: a store over those ids, with impressions
    raw = tmp_path / "raw"
    shifted = [(u, ITEM_ID_OFFSET + i, a, t, s, r, p) for u, i, a, t, s, r, p in EVENTS]
    fmt.write_sharded(raw / "events", _events(shifted), fmt.EVENTS_SCHEMA)
    ids = range(ITEM_ID_OFFSET, ITEM_ID_OFFSET + 40)
    fmt.write_sharded(raw / "items", pa.table({"item_id": pa.array(ids, pa.int64()), "category": pa.array([0] * 40, pa.int32()),
                                               "title": pa.array([str(i) for i in ids])}), fmt.ITEMS_SCHEMA)
    repo = tmp_path / "repo"
    F.build_feature_store(raw, repo, max_history=L, history_impressions=True)
    make_model_dir(tmp_path / "model", num_items=40, d_model=16, n_layers=1, max_history=8, seed=0)
    build_index_for_model(tmp_path / "model", tmp_path / "index", num_queries=10)
    engine = Engine.from_dirs(tmp_path / "model", tmp_path / "index", store=F.online_store(repo))
    out = engine.handle({"user_id": 3, "k": 5, "num_candidates": 10})
    assert out["history_source"] == "store" and out["history_length"] == 1 and not out["cold_start"]
    assert len(out["items"]) == 5
    out = engine.handle({"user_id": 1, "k": 5, "num_candidates": 10})
    assert out["history_length"] == L
    history = [{"item_id": ITEM_ID_OFFSET + 13, "action": 0, "ts": 250}, {"item_id": ITEM_ID_OFFSET + 14, "action": 0, "ts": 300}]
    out = engine.handle({"user_id": 99, "history": history, "k": 5, "num_candidates": 10})
    assert out["history_source"] == "request" and out["history_length"] == 2 and len(out["items"]) == 5
