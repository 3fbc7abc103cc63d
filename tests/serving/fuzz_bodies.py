"""Hypothesis strategies for request bodies near and far from valid, shared by the TorchServe and
KServe fuzz tests (item ids 990..1310 are the tiny archives' catalog)."""
from __future__ import annotations

import json

from hypothesis import strategies as st

RTS = 1_800_000_000
JSON = {"Content-Type": "application/json"}


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
