"""Request validation: every bad body is a ServingError (4xx) naming the field; nothing else escapes."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unipinrec.serving.request import Limits, ServingError, parse_request

GOOD = {"user_id": 42, "history": [{"item_id": 7, "action": 2, "ts": 1700000000}], "k": 20, "num_candidates": 500,
        "exclude_seen": True}


def body(**changes) -> dict:
    b = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is ...:
            b.pop(key)
        else:
            b[key] = value
    return b


def test_design_request_parses():
    req = parse_request(json.dumps(GOOD).encode())
    assert req.user_id == 42 and req.k == 20 and req.history[0].item_id == 7 and req.history[0].surface == 0
    assert req.stage == "all" and req.exclude_seen


@pytest.mark.parametrize("raw, status, field", [
    (b'{"user_id": 1,', 400, "body"),
    (b"\xff\xfe", 400, "body"),
    (b"[1, 2]", 400, "body"),
    (b'{"user_id": NaN}', 400, "user_id"),
    (b'{"user_id": 1, "k": Infinity}', 400, "k"),
    (b'{"user_id": 1, "history": [{"item_id": 1, "action": 1, "ts": -Infinity}]}', 400, "history[0].ts"),
])
def test_undecodable_bodies(raw, status, field):
    with pytest.raises(ServingError) as e:
        parse_request(raw)
    assert (e.value.status, e.value.field) == (status, field)


@pytest.mark.parametrize("changes, field", [
    ({"user_id": ...}, "user_id"),
    ({"user_id": "42"}, "user_id"),
    ({"user_id": 4.2}, "user_id"),
    ({"user_id": True}, "user_id"),
    ({"user_id": -1}, "user_id"),
    ({"user_id": 2**64}, "user_id"),
    ({"k": -5}, "k"),
    ({"k": 0}, "k"),
    ({"k": 10**9}, "k"),
    ({"k": "20"}, "k"),
    ({"num_candidates": 10, "k": 20}, "num_candidates"),
    ({"num_candidates": 10**7}, "num_candidates"),
    ({"exclude_seen": "yes"}, "exclude_seen"),
    ({"history": [{"item_id": 7, "action": 2}]}, "history[0].ts"),
    ({"history": [{"item_id": 7, "action": 2, "ts": 1, "extra": 0}]}, "history[0].extra"),
    ({"history": [GOOD["history"][0], {"item_id": "x", "action": 1, "ts": 2}]}, "history[1].item_id"),
    ({"history": [{"item_id": 7, "action": 1000, "ts": 1}]}, "history[0].action"),
    ({"history": {"item_id": 7}}, "history"),
    ({"stage": "both"}, "stage"),
    ({"stage": "rank"}, "handle"),
    ({"handle": "abc"}, "handle"),
    ({"colour": "red"}, "colour"),
])
def test_invalid_fields_are_named(changes, field):
    with pytest.raises(ServingError) as e:
        parse_request(json.dumps(body(**changes)))
    assert 400 <= e.value.status < 500
    assert e.value.field == field, e.value.message


def test_oversize_body_and_history_are_413():
    limits = Limits(max_body_bytes=1000, max_history_request=10)
    with pytest.raises(ServingError) as e:
        parse_request(b" " * 1001, limits)
    assert (e.value.status, e.value.field) == (413, "body")
    long = body(history=[{"item_id": 1, "action": 1, "ts": i} for i in range(11)])
    with pytest.raises(ServingError) as e:
        parse_request(long, Limits(max_history_request=10))
    assert (e.value.status, e.value.field) == (413, "history")


def test_history_may_be_absent_or_empty():
    assert parse_request(body(history=...)).history is None
    assert parse_request(body(history=[])).history == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
near_valid = st.fixed_dictionaries(
    {"user_id": st.one_of(st.integers(-5, 2**64), st.text(max_size=3), st.floats())},
    optional={"k": json_values | st.integers(-3, 3000), "num_candidates": json_values | st.integers(-3, 10**6),
              "history": st.lists(st.dictionaries(st.sampled_from(["item_id", "action", "ts", "surface", "x"]),
                                                  json_values | st.integers(-2, 10**12), max_size=5), max_size=4)
              | json_values,
              "stage": st.sampled_from(["all", "retrieve", "rank", "x"]), "handle": json_values,
              "exclude_seen": json_values},
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(json_values, near_valid, st.binary(max_size=40)))
def test_any_body_is_either_a_request_or_a_4xx(value):
    raw = value if isinstance(value, bytes) else json.dumps(value, allow_nan=True)
    try:
        req = parse_request(raw)
    except ServingError as e:
        assert 400 <= e.status < 500 and e.field
    else:
        assert req.k >= 1 and req.num_candidates >= req.k
