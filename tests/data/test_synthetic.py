"""The synthetic source: determinism by seed, layout, and the statistics it promises."""
from __future__ import annotations

import numpy as np
import pytest

from unipinrec import format as fmt
from unipinrec.actions import SYNTHETIC
from unipinrec.data import SyntheticConfig, generate_synthetic, size_for_events

CLICK, SAVE, SHARE, HIDE = SYNTHETIC.ids(("click", "save", "share", "hide"))
CFG = dict(num_users=600, num_items=800, num_requests_per_user=12, slate_size=10, chunk_users=250)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "raw"
    meta = generate_synthetic(out, progress=False, seed=3, **CFG)
    events = fmt.read_sharded(out / "events").to_pandas()
    oracle = fmt.read_sharded(out / "oracle").to_pandas()
    return out, meta, events, oracle


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    small = dict(num_users=80, num_items=200, num_requests_per_user=5, chunk_users=30)
    a = generate_synthetic(tmp_path / "a", seed=7, progress=False, **small)
    b = generate_synthetic(tmp_path / "b", seed=7, progress=False, **small)
    c = generate_synthetic(tmp_path / "c", seed=8, progress=False, **small)
    assert a == b
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa.keys() == fb.keys() and len(fa) == 3 and fa == fb
    ea = fmt.read_sharded(tmp_path / "a" / "events")
    ec = fmt.read_sharded(tmp_path / "c" / "events")
    assert not (ea.num_rows == ec.num_rows and ea.equals(ec))
    assert c["seed"] == 8 and a["seed"] == 7


def test_layout_meta_and_sorting(raw):
    out, meta, events, oracle = raw
    assert fmt.read_meta(out) == meta
    assert meta["source"] == "synthetic" and meta["has_impressions"] is True
    assert meta["actions"] == list(SYNTHETIC.names)
    assert meta["num_events"] == len(events) and meta["num_impressions"] == len(oracle)
    assert events["user_id"].nunique() == CFG["num_users"]
    assert sorted(events["user_id"].unique()) == list(range(1, CFG["num_users"] + 1))
    key = events[["user_id", "ts"]].to_numpy()
    assert (np.diff(key[:, 0]) >= 0).all()
    same_user = np.diff(key[:, 0]) == 0
    assert (np.diff(key[:, 1])[same_user] >= 0).all()
    items = fmt.read_sharded(out / "items").to_pandas()
    assert list(items["item_id"]) == list(range(1, CFG["num_items"] + 1))
    assert events["item_id"].between(1, CFG["num_items"]).all()
    assert set(events["action"].unique()) <= set(range(SYNTHETIC.size))


def test_requests_and_slates(raw):
    _, meta, events, _ = raw
    feed = events[events["request_id"].notna()]
    assert (feed["surface"] == 0).all()
    per_request = feed.groupby("request_id")
    assert per_request["user_id"].nunique().max() == 1 and per_request["ts"].nunique().max() == 1
    assert per_request["item_id"].agg(lambda s: s.is_unique).all()  # distinct items in a slate
    assert per_request["position"].agg(lambda s: sorted(s) == list(range(len(s)))).all()
    sizes = per_request.size()
    assert sizes.max() == CFG["slate_size"] and (sizes == CFG["slate_size"]).mean() > 0.99
    assert feed["request_id"].nunique() == meta["num_requests"]
    assert events.groupby("user_id")["request_id"].nunique().min() >= 3  # train, valid, test


def test_organic_actions_fall_strictly_between_requests(raw):
    _, _, events, _ = raw
    organic = events[events["request_id"].isna()]
    assert len(organic) > 0 and (organic["surface"] == 1).all() and organic["position"].isna().all()
    assert set(organic["action"].unique()) <= {CLICK, SAVE}
    req = events[events["request_id"].notna()].groupby("user_id")["ts"].agg(["min", "max"])
    o = organic.join(req, on="user_id")
    assert ((o["ts"] > o["min"]) & (o["ts"] < o["max"])).all()
    feed_keys = set(zip(events.loc[events["request_id"].notna(), "user_id"], events.loc[events["request_id"].notna(), "ts"]))
    assert not any(k in feed_keys for k in zip(organic["user_id"], organic["ts"]))


def test_popularity_skew(raw):
    _, _, events, _ = raw
    feed = events[events["request_id"].notna()]
    counts = np.sort(np.bincount(feed["item_id"], minlength=CFG["num_items"] + 1)[1:])[::-1]
    top10 = counts[: CFG["num_items"] // 10].sum() / counts.sum()
    assert top10 > 0.35, top10  # uniform would be 0.10
    engaged = feed[feed["action"].isin([CLICK, SAVE, SHARE])]
    ec = np.sort(np.bincount(engaged["item_id"], minlength=CFG["num_items"] + 1)[1:])[::-1]
    assert ec[: CFG["num_items"] // 10].sum() / ec.sum() > 0.35


def test_engagement_rate_in_stated_range_and_position_bias(raw):
    _, meta, events, _ = raw
    feed = events[events["request_id"].notna()]
    engaged = feed["action"].isin([CLICK, SAVE, SHARE])
    rate = engaged.mean()
    assert 0.05 <= rate <= 0.25, rate  # docs/data.md states 5-25% (about 12% by default)
    assert meta["engagement_rate"] == pytest.approx(rate)
    by_pos = engaged.groupby(feed["position"]).mean()
    assert by_pos[0] > 3 * by_pos[CFG["slate_size"] - 1]
    assert (np.diff(by_pos.to_numpy()) < 0.01).all()  # (nearly) monotone decreasing
    hides = (feed["action"] == HIDE).mean()
    assert 0.005 < hides < 0.06


def test_oracle_matches_impressions_and_explains_the_actions(raw):
    _, _, events, oracle = raw
    feed = events[events["request_id"].notna()].reset_index(drop=True)
    assert len(oracle) == len(feed)
    for col in ("user_id", "request_id", "item_id", "position"):
        assert (oracle[col].to_numpy() == feed[col].to_numpy()).all(), col
    assert (oracle["request_ts"].to_numpy() == feed["ts"].to_numpy()).all()
    p = oracle[["p_engaged", "p_saved", "p_shared", "p_hidden"]]
    assert ((p >= 0) & (p <= 1)).all().all()
    assert (oracle["p_saved"] + oracle["p_shared"] <= oracle["p_engaged"] + 1e-6).all()
    assert (oracle["p_engaged"] + oracle["p_hidden"] <= 1 + 1e-6).all()
    a = feed["action"]
    n = len(feed)
    for observed, p_col in (((a == CLICK) | (a == SAVE) | (a == SHARE), "p_engaged"), (a == SAVE, "p_saved"),
                            (a == HIDE, "p_hidden"), (a == SHARE, "p_shared")):
        expected = oracle[p_col].sum()
        sd = np.sqrt((oracle[p_col] * (1 - oracle[p_col])).sum())
        assert abs(observed.sum() - expected) < 5 * sd + 1, (p_col, observed.sum(), expected)
    # relevance is position-free: the mean is flat over positions while p_engaged falls
    by_pos = oracle.groupby("position")[["relevance", "p_engaged"]].mean()
    assert by_pos["relevance"].max() - by_pos["relevance"].min() < 0.15
    assert by_pos["p_engaged"].iloc[0] > 3 * by_pos["p_engaged"].iloc[-1]
    # the oracle ranks well: engaged impressions have higher relevance than the rest
    engaged = ((a == CLICK) | (a == SAVE) | (a == SHARE)).to_numpy()
    assert oracle["relevance"][engaged].mean() > oracle["relevance"][~engaged].mean() + 0.5


def test_interests_drift_over_a_users_requests(raw):
    out, _, events, _ = raw
    items = fmt.read_sharded(out / "items").to_pandas().set_index("item_id")
    engaged = events[events["action"].isin([CLICK, SAVE, SHARE])].copy()
    engaged["topic"] = items.loc[engaged["item_id"], "category"].to_numpy()
    first_ts = events.groupby("user_id")["ts"].transform("min")
    last_ts = events.groupby("user_id")["ts"].transform("max")
    phase = ((events["ts"] - first_ts) / (last_ts - first_ts)).loc[engaged.index]
    early = engaged[phase < 0.3].groupby(["user_id", "topic"]).size()
    late = engaged[phase > 0.7].groupby(["user_id", "topic"]).size()
    # share of a user's late engagement on topics never engaged early: clearly above zero
    joined = late.to_frame("late").join(early.to_frame("early"), how="left").fillna(0)
    new_share = joined.loc[joined["early"] == 0, "late"].sum() / joined["late"].sum()
    assert new_share > 0.2, new_share


def test_size_for_events_and_config_errors(tmp_path):
    cfg = size_for_events(50_000, slate_size=8)
    assert cfg.slate_size == 8 and cfg.num_items == 1_000
    meta = generate_synthetic(tmp_path / "s", cfg, progress=False)
    assert 0.85 * 50_000 < meta["num_events"] < 1.15 * 50_000
    assert size_for_events(5_000_000).num_items == 5_000
    with pytest.raises(ValueError, match="num_requests_per_user"):
        SyntheticConfig(num_requests_per_user=2).validate()
    with pytest.raises(ValueError, match="slate_size"):
        generate_synthetic(tmp_path / "x", num_items=5, slate_size=10, progress=False)
    with pytest.raises(ValueError, match="events"):
        size_for_events(0)
