"""Request bodies shared by the TorchServe and KServe integration tests: a valid body, the bad
inputs both runtimes must answer alike, the three archives, and hypothesis strategies for bodies
near and far from valid (item ids 990..1310 are the tiny archives' catalog)."""
from __future__ import annotations

import json

import numpy as np
from hypothesis import strategies as st

from unipinrec.serving.engine import Engine, EngineConfig
from unipinrec.serving.synthetic import random_history

NUM_ITEMS, L = 300, 16  # tests/serving/conftest.py's tiny models
RTS = 1_800_000_000
JSON = {"Content-Type": "application/json"}


def body(user_id=1, n=10, seed=0, **kw):
    return {"user_id": user_id, "history": random_history(np.random.default_rng(seed), n, NUM_ITEMS), "k": 8,
            "num_candidates": 40, "request_ts": RTS, **kw}


def mutated(**changes):
    return {**body(user_id=80), **changes}


# (name, payload, headers, status, field): the same status and field on both runtimes
BAD = [
    ("malformed JSON", b'{"user_id": 1,', JSON, 400, "body"),
    ("wrong content type", json.dumps(body()), {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("form encoded", "user_id=1&k=3", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    ("missing field", {"k": 3}, JSON, 422, "user_id"),
    ("unknown item", mutated(history=[{"item_id": 5, "action": 1, "ts": 1}]), JSON, 422, "history[0].item_id"),
    ("negative k", mutated(k=-1), JSON, 422, "k"),
    ("huge k", mutated(k=10**12), JSON, 422, "k"),
    ("NaN", b'{"user_id": 1, "k": NaN}', JSON, 400, "k"),
    ("string number", mutated(num_candidates="40"), JSON, 422, "num_candidates"),
    ("float ts", mutated(history=[{"item_id": 1001, "action": 1, "ts": 1.5}]), JSON, 422, "history[0].ts"),
    ("oversize body", b'{"user_id": 1, "pad": "' + b"x" * (5 * 2**20) + b'"}', JSON, 413, "body"),
]

# (archive name, how the in-process engine that should answer the same is built)
ARCHIVES = [
    ("unipinrec", {}),
    ("unipinrec_recompute", {"config": EngineConfig(share_kv=False)}),
    ("unipinrec_baseline", {"ranking": True}),
]


def local_engine(tiny, kwargs: dict) -> Engine:
    """The in-process engine of an ARCHIVES row."""
    if kwargs.get("ranking"):
        return Engine.from_dirs(tiny.retrieval, tiny.retrieval_index, ranking_dir=tiny.ranking)
    return Engine.from_dirs(tiny.unified, tiny.unified_index, **kwargs)


def _containers(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=10)
json_values = st.recursive(scalars, _containers, max_leaves=10)
action = st.fixed_dictionaries({"item_id": st.integers(990, 1310) | scalars, "action": st.integers(-1, 6) | scalars,
                                "ts": st.integers(-5, 2 * RTS) | scalars},
                               optional={"surface": st.integers(-1, 200) | scalars, "zz": scalars})
near_valid = st.fixed_dictionaries(
    {"user_id": st.integers(-3, 2**64) | scalars},
    optional={"history": st.lists(action, max_size=20) | json_values, "k": st.integers(-3, 5000) | scalars,
              "num_candidates": st.integers(-3, 10**5) | scalars, "exclude_seen": scalars,
              "request_ts": st.integers(-1, 2 * RTS) | scalars, "stage": st.sampled_from(["all", "retrieve", "rank", "?"]),
              "handle": st.text(max_size=20) | scalars, "candidates": st.lists(st.integers(990, 1310) | scalars, max_size=5)},
)


def bodies(*extra):
    """(payload, headers) cases: near-valid JSON bodies, `extra` strategies of the same form, any
    JSON, raw bytes, and near-valid bodies under other content types."""
    return st.one_of(
        near_valid.map(lambda d: (json.dumps(d), JSON)),
        *extra,
        json_values.map(lambda d: (json.dumps(d), JSON)),
        st.binary(max_size=64).map(lambda b: (b, JSON)),
        st.tuples(near_valid.map(json.dumps), st.sampled_from(["text/plain", "application/xml", "application/octet-stream"]))
        .map(lambda t: (t[0], {"Content-Type": t[1]})),
    )
