"""The `synthetic` data source: feeds, slates and engagement drawn from a known utility.

The world (all of it deterministic by seed):

- items belong to one of `num_topics` topics and have a Zipf popularity and a hidden quality;
- each user has a few latent interests (a topic mixture) that drift over the user's requests:
  one interest fades out while a new one fades in;
- each feed request shows a slate of `slate_size` distinct items, a mix of items from the
  user's current interests and globally popular items, in random order;
- each shown item is examined with a position-dependent probability (position bias) and,
  if examined, engaged with probability sigmoid(relevance), where relevance is a position-free
  utility (user interest in the item's topic + popularity + quality + user bias). Engaged
  items are clicked, saved or shared; examined but unappealing items are sometimes hidden;
  the rest stay impressions (action 0 = shown, not engaged);
- between feed requests users take a few organic actions (surface 1) on items of their interests.

RAW/oracle/ holds, per impression, the relevance and the exact probabilities that drew the
action, so a trained model can be compared with the oracle.

Generation runs in chunks of users with vectorised numpy, so memory is bounded by the chunk.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import format as fmt
from ..actions import SYNTHETIC

BASE_TS = 1_700_000_000  # 2023-11-14; request times are seconds after this
SURFACE_FEED, SURFACE_ORGANIC = 0, 1
CLICK, SAVE, SHARE, HIDE = SYNTHETIC.ids(("click", "save", "share", "hide"))

ORACLE_SCHEMA = pa.schema([pa.field(name, type_, nullable=False) for name, type_ in (
    ("user_id", pa.int64()), ("request_id", pa.int64()), ("request_ts", pa.int64()), ("item_id", pa.int64()),
    ("position", pa.int16()),
    ("relevance", pa.float32()),  # position-free utility (a logit)
    ("p_engaged", pa.float32()),  # click, save or share; position included
    ("p_saved", pa.float32()), ("p_shared", pa.float32()), ("p_hidden", pa.float32()),
)])

ITEMS_SCHEMA = pa.schema(list(fmt.ITEMS_SCHEMA) + [pa.field("popularity", pa.float32(), nullable=False)])


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic world. Defaults give ~10% engagement and a clear position bias."""

    num_users: int = 2_000
    num_items: int = 1_000
    num_requests_per_user: int = 20  # mean; each user gets 3 + Poisson(mean - 3) requests
    slate_size: int = 10
    seed: int = 42
    num_topics: int = 0  # 0: num_items // 25, clipped to [4, 50]
    interests_per_user: int = 3
    organic_rate: float = 0.5  # mean organic actions between two feed requests
    relevant_share: float = 0.6  # share of slate candidates drawn from the user's interests
    zipf_exponent: float = 1.0
    position_decay: float = 0.7  # P(examined | position p) = (1 + p) ** -position_decay
    hide_rate: float = 0.08  # P(hide | examined, not engaged) = hide_rate
    share_rate: float = 0.05  # P(share | engaged)
    mean_gap_s: float = 8 * 3600  # mean time between two feed requests of a user
    chunk_users: int = 2_000  # users generated together; part of the seed's meaning

    def validate(self) -> None:
        for name in ("num_users", "num_items", "num_requests_per_user", "slate_size", "chunk_users",
                     "interests_per_user"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_requests_per_user < 3:
            raise ValueError("num_requests_per_user must be at least 3 (train, valid and test requests)")
        if self.slate_size > self.num_items:
            raise ValueError(f"slate_size ({self.slate_size}) cannot exceed num_items ({self.num_items})")
        if self.num_topics < 0 or self.num_topics > self.num_items:
            raise ValueError(f"num_topics must be in [0, num_items], got {self.num_topics}")
        if self.organic_rate < 0 or not 0 <= self.relevant_share <= 1:
            raise ValueError("organic_rate must be >= 0 and relevant_share in [0, 1]")

    @property
    def topics(self) -> int:
        if self.num_topics:
            return self.num_topics
        return int(min(self.num_items, max(4, min(50, self.num_items // 25))))

    def events_per_user(self) -> float:
        return self.num_requests_per_user * (self.slate_size + self.organic_rate)


def size_for_events(num_events: int, **kwargs) -> SyntheticConfig:
    """A config with about `num_events` events: users scale with the target, items as
    max(1000, events / 1000) unless given."""
    if num_events <= 0:
        raise ValueError(f"events must be positive, got {num_events}")
    probe = SyntheticConfig(**{k: v for k, v in kwargs.items() if k != "num_users"})
    kwargs.setdefault("num_items", max(1_000, num_events // 1_000))
    kwargs["num_users"] = max(1, round(num_events / probe.events_per_user()))
    return SyntheticConfig(**kwargs)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class _Catalog:
    """Items: topic, Zipf popularity, quality, and samplers by popularity (global and per topic)."""

    def __init__(self, cfg: SyntheticConfig):
        rng = np.random.default_rng([cfg.seed, 7919])
        n, t = cfg.num_items, cfg.topics
        self.topic = rng.permutation(np.arange(n) % t)  # every topic has items
        rank = rng.permutation(n)
        pop = 1.0 / (rank + 1.0) ** cfg.zipf_exponent
        self.pop = pop / pop.sum()
        self.quality = rng.normal(0.0, 0.5, n)
        logp = np.log(self.pop)
        self.popz = (logp - logp.mean()) / (logp.std() + 1e-9)
        self.global_cum = np.cumsum(self.pop)
        self.global_cum[-1] = 1.0
        # items sorted by topic; cumulative within-topic popularity shifted by the topic index,
        # so searchsorted(topic + u) samples an item of that topic in one vectorised call
        self.by_topic = np.argsort(self.topic, kind="stable")
        top = self.topic[self.by_topic]
        p = self.pop[self.by_topic]
        topic_mass = np.bincount(top, weights=p, minlength=t)
        within = p / topic_mass[top]
        cum = np.cumsum(within)
        starts = np.searchsorted(top, np.arange(t))
        cum -= np.concatenate([[0.0], cum])[starts][top]  # restart the sum at each topic
        self.topic_cum = top + np.minimum(cum, 1.0)
        self.topic_cum[np.r_[starts[1:] - 1, n - 1]] = np.arange(1, t + 1)  # exact topic ends

    def popular(self, u: np.ndarray) -> np.ndarray:
        return np.minimum(np.searchsorted(self.global_cum, u, side="right"), len(self.pop) - 1)

    def in_topic(self, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.topic_cum, topic + u, side="right")
        return self.by_topic[np.minimum(idx, len(self.pop) - 1)]

    def table(self) -> pa.Table:
        n = len(self.pop)
        return pa.table(
            {
                "item_id": np.arange(1, n + 1, dtype=np.int64),
                "category": self.topic.astype(np.int32),
                "title": pa.nulls(n, pa.string()),
                "popularity": self.pop.astype(np.float32),
            },
            schema=ITEMS_SCHEMA,
        )


@dataclass
class _Requests:
    """The users of a chunk and their requests: times, drifting interest weights."""

    user_topics: np.ndarray  # (U, K+1) topic ids
    user_bias: np.ndarray  # (U,)
    req_user: np.ndarray  # (R,) user of each request
    req_first: np.ndarray  # (U,) index of each user's first request
    req_ts: np.ndarray  # (R,)
    w_req: np.ndarray  # (R, K+1) interest weights at each request
    w_cum: np.ndarray  # (R, K+1) their cumulative sums

    @property
    def num(self) -> int:
        return len(self.req_user)


def _requests(cfg: SyntheticConfig, rng: np.random.Generator, num_users: int, K: int) -> _Requests:
    T = cfg.topics
    # users: K+1 distinct topics; interests start on the first K and drift to the last K
    user_topics = np.argsort(rng.random((num_users, T)), axis=1)[:, : K + 1]
    w_start = np.zeros((num_users, K + 1))
    w_end = np.zeros((num_users, K + 1))
    w_start[:, :K] = rng.dirichlet(np.ones(K), num_users)
    w_end[:, 1:] = rng.dirichlet(np.ones(K), num_users)
    user_bias = rng.normal(0.0, 0.3, num_users)
    n_req = 3 + rng.poisson(cfg.num_requests_per_user - 3, num_users)
    # requests: per-user times, drift fraction, current interest weights
    R = int(n_req.sum())
    req_user = np.repeat(np.arange(num_users), n_req)
    req_first = np.cumsum(n_req) - n_req
    req_idx = np.arange(R) - np.repeat(req_first, n_req)
    gaps = 60 + rng.exponential(cfg.mean_gap_s, R).astype(np.int64)
    start = BASE_TS + rng.integers(0, 30 * 86_400, num_users)
    gaps[req_first] = start
    req_ts = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[req_first] - start, n_req)
    frac = req_idx / np.maximum(n_req[req_user] - 1, 1)
    w_req = (1 - frac)[:, None] * w_start[req_user] + frac[:, None] * w_end[req_user]
    w_cum = np.cumsum(w_req, axis=1)
    w_cum[:, -1] = 1.0 + 1e-9
    return _Requests(user_topics, user_bias, req_user, req_first, req_ts, w_req, w_cum)


def _interest_items(q: _Requests, cat: _Catalog, K: int, rows: np.ndarray, u_slot: np.ndarray,
                    u_item: np.ndarray) -> np.ndarray:
    """Items of the users' current interests: a topic from the mixture, then by popularity."""
    topics = q.user_topics[q.req_user[rows]]
    if u_slot.ndim == 2:  # (requests, candidates)
        slot = np.minimum((u_slot[:, :, None] > q.w_cum[rows][:, None, :]).sum(-1), K)
        topic = np.take_along_axis(topics, slot, axis=1)
    else:
        slot = np.minimum((u_slot[:, None] > q.w_cum[rows]).sum(-1), K)
        topic = topics[np.arange(len(rows)), slot]
    return cat.in_topic(topic, u_item)


def _slates(cfg: SyntheticConfig, rng: np.random.Generator, q: _Requests, cat: _Catalog, K: int):
    """-> (request of each impression, item, position): 3S candidates per request, duplicates
    dropped, the first S kept (random order); a slate is shorter than S only when 3S draws hold
    fewer than S distinct items (rare)."""
    S, R = cfg.slate_size, q.num
    M = 3 * S
    relevant = rng.random((R, M)) < cfg.relevant_share
    cand = np.where(relevant, _interest_items(q, cat, K, np.arange(R), rng.random((R, M)), rng.random((R, M))),
                    cat.popular(rng.random((R, M))))
    order = np.argsort(cand, axis=1, kind="stable")
    sorted_c = np.take_along_axis(cand, order, axis=1)
    first = np.ones_like(cand, dtype=bool)
    first[:, 1:] = sorted_c[:, 1:] != sorted_c[:, :-1]
    keep = np.empty_like(first)
    np.put_along_axis(keep, order, first, axis=1)
    keep &= np.cumsum(keep, axis=1) <= S
    imp_req, _ = np.nonzero(keep)
    # random order within the slate, so position is independent of relevance (the dedup above
    # drops repeats of interest items more often, which would otherwise push them to the front)
    shuffle = np.lexsort((rng.random(len(imp_req)), imp_req))
    imp_item = cand[keep][shuffle]
    slate_len = np.bincount(imp_req, minlength=R)
    imp_pos = (np.arange(len(imp_req)) - np.repeat(np.cumsum(slate_len) - slate_len, slate_len)).astype(np.int16)
    return imp_req, imp_item, imp_pos


def _responses(cfg: SyntheticConfig, rng: np.random.Generator, q: _Requests, cat: _Catalog, imp_req, imp_item,
               imp_pos) -> dict[str, np.ndarray]:
    """Utility, the action probabilities and the drawn action of each impression."""
    u_of = q.req_user[imp_req]
    match = q.user_topics[u_of] == cat.topic[imp_item][:, None]
    affinity = (match * q.w_req[imp_req]).sum(1)
    relevance = -2.5 + 4.0 * affinity + 0.3 * cat.popz[imp_item] + cat.quality[imp_item] + q.user_bias[u_of]
    examined = (1.0 + imp_pos) ** -cfg.position_decay
    appeal = _sigmoid(relevance)
    p_engaged = examined * appeal
    p_saved = p_engaged * (1 - cfg.share_rate) * _sigmoid(-1.5 + cat.quality[imp_item] + 0.5 * relevance)
    p_shared = p_engaged * cfg.share_rate
    p_hidden = examined * (1 - appeal) * cfg.hide_rate
    u = rng.random(len(imp_item))
    action = np.zeros(len(imp_item), dtype=np.int8)
    action[u < p_hidden + p_engaged] = CLICK
    action[u < p_hidden + p_saved + p_shared] = SHARE
    action[u < p_hidden + p_saved] = SAVE
    action[u < p_hidden] = HIDE
    return {"relevance": relevance, "p_engaged": p_engaged, "p_saved": p_saved, "p_shared": p_shared,
            "p_hidden": p_hidden, "action": action}


def _organic(cfg: SyntheticConfig, rng: np.random.Generator, q: _Requests, cat: _Catalog, K: int):
    """Organic actions: Poisson(organic_rate) in the gap before each request but the first.
    -> (request they precede, ts, item, action)."""
    n_org = rng.poisson(cfg.organic_rate, q.num)
    n_org[q.req_first] = 0
    org_req = np.repeat(np.arange(q.num), n_org)
    gap = q.req_ts[org_req] - q.req_ts[org_req - 1] if len(org_req) else np.zeros(0, np.int64)
    org_ts = q.req_ts[org_req] - gap + 1 + (rng.random(len(org_req)) * (gap - 1)).astype(np.int64)
    org_item = _interest_items(q, cat, K, org_req, rng.random(len(org_req)), rng.random(len(org_req)))
    org_action = np.where(rng.random(len(org_req)) < 0.2, SAVE, CLICK).astype(np.int8)
    return org_req, org_ts, org_item, org_action


def _events_table(q: _Requests, first_user: int, first_request: int, imp_req, imp_item, imp_pos, action,
                  organic) -> pa.Table:
    org_req, org_ts, org_item, org_action = organic
    n_imp, n_o = len(imp_item), len(org_req)
    user_id = first_user + 1 + np.concatenate([q.req_user[imp_req], q.req_user[org_req]]).astype(np.int64)
    ts = np.concatenate([q.req_ts[imp_req], org_ts])
    position = np.concatenate([imp_pos, np.full(n_o, -1, np.int16)])
    srt = np.lexsort((position, ts, user_id))
    is_org = (np.arange(n_imp + n_o) >= n_imp)[srt]
    request_id = np.concatenate([first_request + 1 + imp_req, np.zeros(n_o, np.int64)])[srt]
    return pa.table({
        "user_id": user_id[srt],
        "item_id": np.concatenate([imp_item, org_item]).astype(np.int64)[srt] + 1,
        "action": np.concatenate([action, org_action])[srt],
        "ts": ts[srt],
        "surface": np.where(is_org, SURFACE_ORGANIC, SURFACE_FEED).astype(np.int8),
        "request_id": pa.array(request_id, pa.int64(), mask=is_org),
        "position": pa.array(position[srt], pa.int16(), mask=is_org),
    }, schema=fmt.EVENTS_SCHEMA)


def _chunk(cfg: SyntheticConfig, cat: _Catalog, chunk_index: int, first_user: int, num_users: int,
           first_request: int) -> tuple[pa.Table, pa.Table, int]:
    """Events and oracle rows of users [first_user, first_user + num_users)."""
    rng = np.random.default_rng([cfg.seed, chunk_index])
    K = min(cfg.interests_per_user, max(1, cfg.topics - 1))
    q = _requests(cfg, rng, num_users, K)
    imp_req, imp_item, imp_pos = _slates(cfg, rng, q, cat, K)
    resp = _responses(cfg, rng, q, cat, imp_req, imp_item, imp_pos)
    events = _events_table(q, first_user, first_request, imp_req, imp_item, imp_pos, resp["action"],
                           _organic(cfg, rng, q, cat, K))
    oracle = pa.table({  # impressions are already in (user, ts, position) order
        "user_id": first_user + 1 + q.req_user[imp_req].astype(np.int64),
        "request_id": first_request + 1 + imp_req.astype(np.int64),
        "request_ts": q.req_ts[imp_req], "item_id": imp_item.astype(np.int64) + 1, "position": imp_pos,
        **{name: resp[name].astype(np.float32) for name in ("relevance", "p_engaged", "p_saved", "p_shared", "p_hidden")},
    }, schema=ORACLE_SCHEMA)
    return events, oracle, q.num


def generate_synthetic(out_dir: str | Path, config: SyntheticConfig | None = None, *, progress: bool = True,
                       rows_per_shard: int = 1_000_000, **overrides) -> dict:
    """Write a RAW dataset folder (meta.json, events/, items/, oracle/); returns the meta dict.

    `generate_synthetic(out, num_users=500, seed=1)` or `generate_synthetic(out, SyntheticConfig(...))`.
    """
    from tqdm.auto import tqdm

    cfg = config or SyntheticConfig(**overrides)
    if config is not None and overrides:
        cfg = SyntheticConfig(**{**asdict(config), **overrides})
    cfg.validate()
    out = Path(out_dir)
    cat = _Catalog(cfg)
    fmt.write_sharded(out / "items", cat.table(), ITEMS_SCHEMA)

    n_chunks = math.ceil(cfg.num_users / cfg.chunk_users)
    num_events = num_requests = num_impressions = num_engaged = 0
    with fmt.ShardedWriter(out / "events", fmt.EVENTS_SCHEMA, rows_per_shard) as ev_w, \
            fmt.ShardedWriter(out / "oracle", ORACLE_SCHEMA, rows_per_shard) as or_w, \
            tqdm(total=cfg.num_users, unit="user", desc="generate", disable=not progress) as bar:
        for c in range(n_chunks):
            first = c * cfg.chunk_users
            n = min(cfg.chunk_users, cfg.num_users - first)
            events, oracle, n_requests = _chunk(cfg, cat, c, first, n, num_requests)
            ev_w.write(events)
            or_w.write(oracle)
            num_events += events.num_rows
            num_requests += n_requests
            num_impressions += oracle.num_rows
            act = events.column("action").to_numpy()
            surf = events.column("surface").to_numpy()
            num_engaged += int(np.isin(act[surf == SURFACE_FEED], (CLICK, SAVE, SHARE)).sum())
            bar.update(n)

    meta = {
        "source": "synthetic",
        "actions": list(SYNTHETIC.names),
        "surfaces": ["feed", "organic"],
        "num_users": cfg.num_users,
        "num_items": cfg.num_items,
        "num_events": num_events,
        "num_requests": num_requests,
        "num_impressions": num_impressions,
        "engagement_rate": num_engaged / max(num_impressions, 1),
        "has_impressions": True,
        "seed": cfg.seed,
        "config": {**asdict(cfg), "num_topics": cfg.topics},
    }
    fmt.write_meta(out, meta)
    return meta
