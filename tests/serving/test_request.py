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
    ({"history": {"item_id": 7, "action": 1, "ts": 1}}, "history.item_id"),  # columnar: lists only
    ({"history": 7}, "history"),
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


def test_a_non_finite_number_under_an_empty_key_is_named():
    """Found by the fuzz test above: the field path of an empty key was empty."""
    for raw, field in (({"": float("inf")}, 'body[""]'), ({"a": {"": float("nan")}}, 'a[""]')):
        with pytest.raises(ServingError) as e:
            parse_request(json.dumps(raw, allow_nan=True))
        assert (e.value.status, e.value.field) == (400, field)


# --- the columnar history form -------------------------------------------------------------------

COLS = {"item_id": [7, 9, 11], "action": [2, 0, 1], "ts": [1700000000, 1700000060, 1700000090]}


def test_columnar_history_parses_to_arrays():
    req = parse_request(json.dumps(body(history=COLS)).encode())
    cols = req.history_columns
    assert req.has_history and req.history is None
    assert cols["item_id"].tolist() == [7, 9, 11] and cols["ts"].dtype.kind == "i" and "surface" not in cols
    with_surface = parse_request(body(history={**COLS, "surface": [0, 3, 1]}))
    assert with_surface.history_columns["surface"].tolist() == [0, 3, 1]
    assert not parse_request(body(history=...)).has_history


@pytest.mark.parametrize("history, status, field", [
    ({"item_id": [1], "action": [0]}, 422, "history.ts"),
    ({**COLS, "colour": [1, 2, 3]}, 422, "history.colour"),
    ({**COLS, "action": [2, 0]}, 422, "history.action"),
    ({**COLS, "ts": "1700000000"}, 422, "history.ts"),
    ({**COLS, "action": [2, True, 1]}, 422, "history.action[1]"),
    ({**COLS, "item_id": [7, 9.0, 11]}, 422, "history.item_id[1]"),
    ({**COLS, "item_id": [7, 9, -1]}, 422, "history.item_id[2]"),
    ({**COLS, "action": [2, 128, 1]}, 422, "history.action[1]"),
    ({**COLS, "ts": [1, 2, 2**63]}, 422, "history.ts[2]"),
    ({**COLS, "surface": [0, 0, "x"]}, 422, "history.surface[2]"),
    ({**COLS, "ts": [1, 2, float("nan")]}, 400, "history.ts[2]"),  # as the list form: not a finite number
    ({**COLS, "item_id": [7, -2**64, 11]}, 422, "history.item_id[1]"),
])
def test_columnar_history_errors_name_the_field(history, status, field):
    with pytest.raises(ServingError) as e:
        parse_request(body(history=history))
    assert (e.value.status, e.value.field) == (status, field)


def test_columnar_history_limits_cut_and_rank_stage():
    n = 30
    long = {"item_id": list(range(1, n + 1)), "action": [0] * n, "ts": list(range(n))}
    with pytest.raises(ServingError) as e:
        parse_request(body(history=long), Limits(max_history_request=n - 1))
    assert (e.value.status, e.value.field) == (413, "history")
    req = parse_request(body(history=long), Limits(keep_history=10))
    assert req.history_offset == 20 and req.history_columns["item_id"].tolist() == list(range(21, 31))
    bad = {**long, "action": [0] * (n - 1) + [-3]}  # named at the position the client sent
    with pytest.raises(ServingError) as e:
        parse_request(body(history=bad), Limits(keep_history=10))
    assert e.value.field == f"history.action[{n - 1}]"
    with pytest.raises(ServingError) as e:
        parse_request({"user_id": 1, "stage": "rank", "handle": "h", "history": COLS})
    assert e.value.field == "history"
