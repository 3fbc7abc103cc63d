"""The unified example builder against brute-force references of the documented rules."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from unipinrec import format as fmt
from unipinrec.actions import MOVIELENS
from unipinrec.data import build_examples, generate_synthetic, iter_user_chunks, load_movielens


# ---------------------------------------------------------------------------------------------
# references: plain Python, one user at a time, straight from docs/data.md

def _rows(raw) -> dict[int, list[dict]]:
    ev = fmt.read_sharded(raw / "events").to_pylist()
    ev.sort(key=lambda r: (r["user_id"], r["ts"], -1 if r["request_id"] is None else r["request_id"],
                           -1 if r["position"] is None else r["position"]))
    users: dict[int, list[dict]] = {}
    for r in ev:
        users.setdefault(r["user_id"], []).append(r)
    return users


def _act(r):
    return {"item_id": r["item_id"], "action": r["action"], "ts": r["ts"], "surface": r["surface"]}


def reference_impressions(raw, L, S, history_impressions=False) -> dict[str, list[dict]]:
    out = {s: [] for s in fmt.SPLITS}
    for user, rows in _rows(raw).items():
        requests = list(dict.fromkeys(r["request_id"] for r in rows if r["request_id"] is not None))
        for k, rid in enumerate(requests):
            slate = [r for r in rows if r["request_id"] == rid and r["position"] < S]
            ts = slate[0]["ts"]
            history = [_act(r) for r in rows if (history_impressions or r["action"] != 0) and r["ts"] < ts][-L:]
            split = "test" if k == len(requests) - 1 else "valid" if k == len(requests) - 2 else "train"
            out[split].append({"user_id": user, "request_ts": ts, "history": history, "slate": [
                {"item_id": r["item_id"], "position": r["position"], "action": r["action"]} for r in slate]})
    return out


def reference_sequences(raw, L, S) -> dict[str, list[dict]]:
    out = {s: [] for s in fmt.SPLITS}

    def example(user, s, t, end):
        return {"user_id": user, "request_ts": s[t]["ts"], "history": [_act(r) for r in s[max(0, t - L):t]],
                "slate": [{"item_id": r["item_id"], "position": i, "action": r["action"]}
                          for i, r in enumerate(s[t:end])]}

    for user, s in _rows(raw).items():
        n = len(s)
        out["test"].append(example(user, s, n - 1, n))
        if n >= 2:
            out["valid"].append(example(user, s, n - 2, n - 1))
        m = n - 2
        ts, t = [], max(1, m - S)
        while m >= 2 and t >= 1:
            ts.append(t)
            t -= L
        out["train"] += [example(user, s, t, min(t + S, m)) for t in reversed(ts)]
    return out


def _built(ex) -> dict[str, list[dict]]:
    return {s: fmt.read_sharded(ex / s).to_pylist() for s in fmt.SPLITS}


# ---------------------------------------------------------------------------------------------
# data

@pytest.fixture(scope="module")
def synthetic_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("syn") / "raw"
    generate_synthetic(raw, num_users=60, num_items=150, num_requests_per_user=8, slate_size=6, organic_rate=1.5,
                       chunk_users=25, seed=11, progress=False)
    return raw


def write_sequences(raw, lengths, seed=0):
    """A MovieLens-like RAW folder: users with the given sequence lengths, ratings as actions."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    n = len(user)
    ts = np.concatenate([np.sort(rng.choice(10_000, k, replace=False)) for k in lengths]) + 1_000
    events = pa.table({
        "user_id": user, "item_id": rng.integers(1, 40, n), "action": rng.integers(1, 6, n).astype(np.int8),
        "ts": ts, "surface": np.zeros(n, np.int8), "request_id": pa.nulls(n, pa.int64()),
        "position": pa.nulls(n, pa.int16()),
    })
    fmt.write_sharded(raw / "events", fmt.conform(events, fmt.EVENTS_SCHEMA), fmt.EVENTS_SCHEMA)
    items = pa.table({"item_id": np.arange(1, 40), "category": np.zeros(39, np.int32), "title": pa.nulls(39, pa.string())})
    fmt.write_sharded(raw / "items", fmt.conform(items, fmt.ITEMS_SCHEMA), fmt.ITEMS_SCHEMA)
    fmt.write_meta(raw, {"source": "movielens-test", "actions": list(MOVIELENS.names), "num_events": n,
                         "num_users": len(lengths), "num_items": 39, "has_impressions": False})
    return raw


# ---------------------------------------------------------------------------------------------
# with impressions

@pytest.mark.parametrize("L, S", [(5, 6), (50, 6), (3, 2)])
def test_impression_examples_equal_the_reference(synthetic_raw, tmp_path, L, S):
    meta = build_examples(synthetic_raw, tmp_path / "ex", max_history=L, slate_size=S, progress=False)
    built, ref = _built(tmp_path / "ex"), reference_impressions(synthetic_raw, L, S)
    for split in fmt.SPLITS:
        assert built[split] == ref[split], split
    assert meta["splits"] == {s: len(ref[s]) for s in fmt.SPLITS}
    assert meta["splits"]["test"] == meta["splits"]["valid"] == 60


@pytest.mark.parametrize("L", [5, 200])
def test_history_impressions_keep_earlier_impressions_only(synthetic_raw, tmp_path, L):
    meta = build_examples(synthetic_raw, tmp_path / "ex", max_history=L, slate_size=6, progress=False,
                          history_impressions=True)
    built, ref = _built(tmp_path / "ex"), reference_impressions(synthetic_raw, L, 6, history_impressions=True)
    for split in fmt.SPLITS:
        assert built[split] == ref[split], split
    assert meta["history_impressions"] is True
    tests = built["test"]
    # the skips are there (action 0), and never the request's own slate (same ts as the request)
    assert any(h["action"] == 0 for r in tests for h in r["history"])
    assert all(h["ts"] < r["request_ts"] for r in tests for h in r["history"])
    without = build_examples(synthetic_raw, tmp_path / "ex0", max_history=L, slate_size=6,
                                            progress=False)
    assert without["history_impressions"] is False


def test_histories_sorted_strictly_before_request_and_last_L(synthetic_raw, tmp_path):
    build_examples(synthetic_raw, tmp_path / "ex", max_history=7, progress=False)
    rows = [r for s in fmt.SPLITS for r in fmt.read_sharded(tmp_path / "ex" / s).to_pylist()]
    assert any(len(r["history"]) == 7 for r in rows)
    for r in rows:
        ts = [h["ts"] for h in r["history"]]
        assert ts == sorted(ts) and all(t < r["request_ts"] for t in ts) and len(ts) <= 7
        assert all(h["action"] != 0 for h in r["history"])
        assert [s["position"] for s in r["slate"]] == list(range(len(r["slate"])))
    # per user: test is the last request, valid the one before, train earlier
    by_split = {s: fmt.read_sharded(tmp_path / "ex" / s).to_pandas() for s in fmt.SPLITS}
    last = {s: by_split[s].groupby("user_id")["request_ts"].max() for s in fmt.SPLITS}
    assert (last["train"] < last["valid"].loc[last["train"].index]).all()
    assert (last["valid"] < last["test"]).all()


def test_layout_meta_items_and_oracle(synthetic_raw, tmp_path):
    meta = build_examples(synthetic_raw, tmp_path / "ex", max_history=10, progress=False)
    assert fmt.read_meta(tmp_path / "ex") == meta
    for key in ("source", "actions", "max_history", "slate_size", "has_impressions", "splits", "num_items"):
        assert key in meta
    assert meta["slate_size"] == 6 and meta["has_impressions"] is True and meta["num_items"] == 150
    assert fmt.read_sharded(tmp_path / "ex" / "items").equals(fmt.read_sharded(synthetic_raw / "items"))
    assert fmt.read_sharded(tmp_path / "ex" / "oracle").equals(fmt.read_sharded(synthetic_raw / "oracle"))
    for s in fmt.SPLITS:
        assert fmt.read_sharded(tmp_path / "ex" / s).schema.equals(fmt.UNIFIED_EXAMPLE_SCHEMA)


# ---------------------------------------------------------------------------------------------
# streaming

def test_streaming_in_small_chunks_gives_the_same_examples(synthetic_raw, tmp_path):
    big = build_examples(synthetic_raw, tmp_path / "one", max_history=20, progress=False)
    small = build_examples(synthetic_raw, tmp_path / "many", max_history=20, chunk_events=500, progress=False)
    assert big["chunks"]["count"] == 1
    per_user = fmt.read_sharded(synthetic_raw / "events").to_pandas().groupby("user_id").size()
    assert small["chunks"]["count"] >= per_user.sum() // (500 + per_user.max())
    assert small["chunks"]["max_events"] <= 500 + per_user.max()
    for s in fmt.SPLITS:
        assert fmt.read_sharded(tmp_path / "one" / s).equals(fmt.read_sharded(tmp_path / "many" / s))


def test_chunks_hold_whole_users_within_the_bound(synthetic_raw):
    per_user = fmt.read_sharded(synthetic_raw / "events").to_pandas().groupby("user_id").size()
    seen: set[int] = set()
    sizes = []
    for chunk in iter_user_chunks(synthetic_raw / "events", chunk_events=700):
        users = set(np.unique(chunk.user).tolist())
        assert not users & seen  # a user never spans two chunks
        seen |= users
        assert all(len(chunk.user[chunk.user == u]) == per_user[u] for u in users)
        sizes.append(len(chunk))
    assert seen == set(per_user.index)
    assert max(sizes) <= 700 + per_user.max() and len(sizes) > 3


def test_unsorted_users_are_refused(tmp_path):
    raw = write_sequences(tmp_path / "raw", [3, 4])
    ev = fmt.read_sharded(raw / "events")
    fmt.write_sharded(raw / "events", [ev.slice(3), ev.slice(0, 3)], fmt.EVENTS_SCHEMA, rows_per_shard=4)
    with pytest.raises(fmt.FormatError, match="user_id"):
        build_examples(raw, tmp_path / "ex", progress=False)


def test_bad_arguments_name_the_parameter(synthetic_raw, tmp_path):
    with pytest.raises(ValueError, match="max_history"):
        build_examples(synthetic_raw, tmp_path / "ex", max_history=0, progress=False)
    with pytest.raises(ValueError, match="slate_size"):
        build_examples(synthetic_raw, tmp_path / "ex", slate_size=0, progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        build_examples(tmp_path / "nothing", tmp_path / "ex", progress=False)
    with pytest.raises(ValueError, match="out_dir"):
        build_examples(synthetic_raw, synthetic_raw, progress=False)
    assert fmt.count_rows(synthetic_raw / "items") == 150  # nothing lost


# ---------------------------------------------------------------------------------------------
# without impressions: leave-one-out

@pytest.mark.parametrize("L, S", [(4, 3), (2, 5), (50, 10), (1, 1)])
def test_sequence_examples_equal_the_reference(tmp_path, L, S):
    raw = write_sequences(tmp_path / "raw", [1, 2, 3, 4, 5, 9, 17, 30, 2, 12], seed=L * 10 + S)
    meta = build_examples(raw, tmp_path / "ex", max_history=L, slate_size=S, chunk_events=20, progress=False)
    built, ref = _built(tmp_path / "ex"), reference_sequences(raw, L, S)
    for split in fmt.SPLITS:
        assert built[split] == ref[split], split
    assert meta["has_impressions"] is False and "oracle" not in [p.name for p in (tmp_path / "ex").iterdir()]


def test_every_train_action_is_a_target_in_some_window(tmp_path):
    L, S = 4, 3
    raw = write_sequences(tmp_path / "raw", [25, 11, 7])
    build_examples(raw, tmp_path / "ex", max_history=L, slate_size=S, progress=False)
    seqs = _rows(raw)
    covered = {u: set() for u in seqs}
    for ex in fmt.read_sharded(tmp_path / "ex" / "train").to_pylist():
        s = seqs[ex["user_id"]]
        t = next(i for i, r in enumerate(s) if r["ts"] == ex["request_ts"])
        covered[ex["user_id"]] |= set(range(t - len(ex["history"]) + 1, t + len(ex["slate"])))
    for u, s in seqs.items():
        assert covered[u] == set(range(1, len(s) - 2)), u  # positions 1..n-3; 0 has no history


def test_leave_one_out_on_movielens_100k(ml100k_dir, tmp_path):
    L, S = 50, 10
    load_movielens("movielens-100k", ml100k_dir, tmp_path / "raw")
    meta = build_examples(tmp_path / "raw", tmp_path / "ex", max_history=L, slate_size=S, progress=False)
    assert meta["splits"]["test"] == meta["splits"]["valid"] == 943
    ev = fmt.read_sharded(tmp_path / "raw" / "events").to_pandas()
    seq = ev.groupby("user_id")["item_id"].apply(list)
    ts = ev.groupby("user_id")["ts"].apply(list)
    ex = {s: fmt.read_sharded(tmp_path / "ex" / s).to_pylist() for s in fmt.SPLITS}
    for split, back in (("test", 1), ("valid", 2)):
        for r in ex[split]:
            s = seq[r["user_id"]]
            assert [x["item_id"] for x in r["slate"]] == [s[-back]]
            assert [h["item_id"] for h in r["history"]] == s[:-back][-L:]  # strictly before, last L
            assert r["request_ts"] == ts[r["user_id"]][-back]
    held_out = {u: set(s[-2:]) for u, s in seq.items()}
    for r in ex["train"]:
        items = {h["item_id"] for h in r["history"]} | {x["item_id"] for x in r["slate"]}
        assert not items & held_out[r["user_id"]]
        assert all(h["ts"] < r["request_ts"] for h in r["history"]) and len(r["history"]) <= L
        assert 1 <= len(r["slate"]) <= S
