"""The request (docs/serving.md, "The request"), validated at the edge with pydantic.

Every rejection is a `ServingError` with an HTTP status and the dotted name of the field at
fault (`history[3].item_id`, `k`, `body`), so a client can fix its request; nothing here
raises anything else for any input.

    {"user_id": 42, "history": [{"item_id": 7, "action": 2, "ts": 1700000000}, ...],
     "k": 20, "num_candidates": 500, "exclude_seen": true}

The history may also come columnar, one list per per-action field (the same fields, bounds and
defaults as the list of objects; an error names `history.ts[3]`), which parses as arrays rather
than one object per action -- the form to send long histories in:

    {"user_id": 42, "history": {"item_id": [7, 9], "action": [2, 0], "ts": [1700000000, 1700000060]}}

Beyond the items and history: `request_ts` (default: the last history ts, or now), `stage` ("all" | "retrieve"
| "rank") with `handle` and `candidates` for the split flow. Numbers must be JSON integers
(no strings, floats, NaN or booleans). A history longer than the model's L is truncated to its
last L actions before they are validated (reported as `history_truncated` in the answer); longer
than `max_history_request` is rejected. `deadline_ms`: when ranking would finish after it, the
answer is the retrieval order, marked `"degraded": "ranking_deadline"`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, StrictStr, ValidationError,
                      ValidationInfo, model_validator)
from pydantic_core import PydanticCustomError

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Bounds applied to requests; the engine fills them from the model and its config."""

    max_k: int = 1000
    max_candidates: int = 5000
    max_history_request: int = 100_000  # longer histories are rejected, not truncated
    max_body_bytes: int = 4 * 1024 * 1024
    max_rank_candidates: int = 5000
    # the model reads only the last L actions: longer histories are cut to them before the
    # per-action validation (the dropped part is only counted), so a long body costs its JSON
    # decode and not L-independent validation work; None = keep all
    keep_history: int | None = None
    # per-action fields the model reads beyond ActionIn's (an `Actions` subclass): integers >= 0
    extra_action_fields: tuple[str, ...] = ()


MAX_FIELD_CHARS = 200  # a field's name in an error: a client's own key may be megabytes long


class ServingError(Exception):
    """A request the server will not serve: `status` (4xx) and the field at fault."""

    def __init__(self, status: int, field: str, message: str):
        if len(field) > MAX_FIELD_CHARS:
            field = field[:MAX_FIELD_CHARS] + "..."
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = message

    def to_dict(self) -> dict:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}


Int64 = StrictInt  # range-checked below: Field(ge=..., le=INT64_MAX)


class ActionIn(BaseModel):
    """One action: the per-action fields of `sequences.Actions` by their record names, plus
    those a model's `Actions` subclass adds (named in the validation context; integers >= 0)."""

    model_config = ConfigDict(extra="allow")
    item_id: Int64 = Field(ge=0, le=INT64_MAX)
    action: Int64 = Field(ge=0, le=127)
    ts: Int64 = Field(ge=0, le=INT64_MAX)
    surface: Int64 = Field(default=0, ge=0, le=127)

    @model_validator(mode="after")
    def _extra_fields(self, info: ValidationInfo) -> "ActionIn":
        allowed = (info.context or {}).get("extra_action_fields", ())
        for name, value in (self.model_extra or {}).items():
            if name not in allowed:
                raise PydanticCustomError("extra_forbidden", "unknown field", {"field": name})
            if type(value) is not int or not 0 <= value <= INT64_MAX:
                raise PydanticCustomError("extra_value", "must be an integer in 0..2^63-1", {"field": name})
        return self


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Int64 = Field(ge=0, le=INT64_MAX)
    history: list[ActionIn] | None = None  # None: read from the online store by user_id
    request_ts: Int64 | None = Field(default=None, ge=0, le=INT64_MAX)
    k: Int64 = Field(default=20, ge=1)
    num_candidates: Int64 = Field(default=500, ge=1)
    exclude_seen: StrictBool = True
    stage: Literal["all", "retrieve", "rank"] = "all"
    handle: StrictStr | None = Field(default=None, max_length=128)
    candidates: list[Annotated[Int64, Field(ge=0, le=INT64_MAX)]] | None = None  # stage "rank": item ids to rank (default: the retrieved ones)
    deadline_ms: Int64 | None = Field(default=None, ge=1, le=600_000)  # None: the server default
    _history_offset: int = PrivateAttr(default=0)
    _columns: Any = PrivateAttr(default=None)  # a columnar history: record name -> int64 array
    _dropped_items: Any = PrivateAttr(default=None)  # item ids of the dropped actions (int64), for exclude_seen

    # The properties read the private values from pydantic's own dict: `self._columns` goes
    # through BaseModel.__getattr__, which cost about 0.15 ms per batch of 8 on the GPU's host path.
    @property
    def history_offset(self) -> int:
        """Leading actions of the client's history dropped before validation (beyond the model's L)."""
        return self.__pydantic_private__["_history_offset"]

    @property
    def has_history(self) -> bool:
        """The client sent a history (either form); False: read it from the online store."""
        return self.history is not None or self.__pydantic_private__["_columns"] is not None

    @property
    def history_columns(self) -> dict[str, np.ndarray] | None:
        """A columnar history as validated arrays by record name (None for the list form)."""
        return self.__pydantic_private__["_columns"]

    @property
    def dropped_items(self) -> np.ndarray | None:
        """The item ids of the actions dropped before validation (those that are integers in
        0..2^63-1): the model never reads them, but `exclude_seen` excludes the whole history."""
        return self.__pydantic_private__["_dropped_items"]


def _field_name(loc: tuple) -> str:
    """A location (keys and list positions) -> `history[3].item_id`; an empty key as `[""]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "":
            out = (out or "body") + '[""]'
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def decode_json(body: Any, limits: Limits = Limits()) -> Any:
    """Raw body (bytes / str / already-decoded JSON) -> JSON value. Bodies over
    `limits.max_body_bytes` are rejected; NaN/Infinity literals decode to floats here and are
    rejected, naming their field, by `parse_request`."""
    if isinstance(body, (bytes, bytearray)):
        if len(body) > limits.max_body_bytes:
            raise ServingError(413, "body", f"{len(body)} bytes is over the limit of {limits.max_body_bytes}")
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise ServingError(400, "body", "not UTF-8 text") from None
    if isinstance(body, str):
        if len(body) > limits.max_body_bytes:
            raise ServingError(413, "body", f"{len(body)} characters is over the limit of {limits.max_body_bytes}")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:
            raise ServingError(400, "body", f"malformed JSON: {e}") from None
    return body


def _non_finite(value: Any, loc: tuple = (), depth: int = 0) -> tuple[tuple, str] | None:
    """Already-decoded JSON (the server may decode it for us) may hold NaN/inf floats -> (the
    location of the first one or of too deep a nesting, the problem), or None. Only containers
    and floats are visited and a location is built only for them, so a body costs its size."""
    if depth > 64:
        return loc, "nested too deeply"
    if isinstance(value, float):
        return None if math.isfinite(value) else (loc, f"{value} is not a finite number")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, v in items:
        if isinstance(v, (float, dict, list)):
            found = _non_finite(v, (*loc, key if isinstance(key, int) else str(key)), depth + 1)
            if found is not None:
                return found
    return None


def _check_finite(data: dict, offset: int = 0) -> None:
    found = _non_finite(data)
    if found is not None:
        raise ServingError(400, _field_name(_as_sent(found[0], offset)), found[1])


def _as_sent(loc: tuple, offset: int) -> tuple:
    """A location in the cut list history -> the position the client sent."""
    if offset and len(loc) > 1 and loc[0] == "history" and isinstance(loc[1], int):
        return ("history", loc[1] + offset, *loc[2:])
    return loc


def parse_request(body: Any, limits: Limits = Limits()) -> Request:
    """Decode and validate one request body; raises ServingError (4xx) naming the field."""
    data = decode_json(body, limits)
    if not isinstance(data, dict):
        raise ServingError(400, "body", f"expected a JSON object, got {type(data).__name__}")
    columns = None
    if isinstance(data.get("history"), dict):
        columns, offset, dropped = _parse_columns(data["history"], limits)
        data = {k: v for k, v in data.items() if k != "history"}
    else:
        if isinstance(data.get("history"), list) and len(data["history"]) > limits.max_history_request:
            raise ServingError(413, "history", f"{len(data['history'])} actions is over the limit of "
                                               f"{limits.max_history_request}")
        data, offset, dropped = _cut_history(data, limits.keep_history)
    _check_finite(data, offset)  # the kept actions: the dropped ones are only counted
    if isinstance(data.get("candidates"), list) and len(data["candidates"]) > limits.max_rank_candidates:
        raise ServingError(413, "candidates", f"{len(data['candidates'])} candidates is over the limit of "
                                              f"{limits.max_rank_candidates}")
    try:
        req = Request.model_validate(data, context={"extra_action_fields": limits.extra_action_fields})
        req._history_offset = offset
        req._columns = columns
        req._dropped_items = dropped
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = tuple(err["loc"])
        if err["type"] in ("extra_forbidden", "extra_value") and "field" in (err.get("ctx") or {}):
            loc = (*loc, err["ctx"]["field"])  # raised by ActionIn for one of its extra fields
        loc = _as_sent(loc, offset)
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise ServingError(422, _field_name(loc), msg) from None
    if req.k > limits.max_k:
        raise ServingError(422, "k", f"{req.k} is over the limit of {limits.max_k}")
    if req.num_candidates > limits.max_candidates:
        raise ServingError(422, "num_candidates", f"{req.num_candidates} is over the limit of {limits.max_candidates}")
    if req.num_candidates < req.k:
        raise ServingError(422, "num_candidates", f"must be at least k ({req.k}), got {req.num_candidates}")
    if req.stage == "rank" and not req.handle:
        raise ServingError(422, "handle", "stage 'rank' needs the handle returned by stage 'retrieve'")
    if req.stage != "rank" and (req.handle is not None or req.candidates is not None):
        field = "handle" if req.handle is not None else "candidates"
        raise ServingError(422, field, "only allowed with stage 'rank'")
    if req.stage == "rank":
        given = {"history": req.has_history, "request_ts": req.request_ts is not None,
                 "deadline_ms": "deadline_ms" in req.model_fields_set, "exclude_seen": "exclude_seen" in req.model_fields_set}
        field = next((f for f in _NOT_WITH_RANK if given[f]), None)
        if field is not None:
            raise ServingError(422, field, f"not allowed with stage 'rank': {_NOT_WITH_RANK[field]}")
    return req


_NOT_WITH_RANK = {  # what stage 'rank' would ignore, and why
    "history": "the handle holds the history and request time",
    "request_ts": "the handle holds the history and request time",
    "deadline_ms": "a deadline degrades a whole request (stage 'all') to its retrieval order",
    "exclude_seen": "stage 'retrieve' excluded the seen items",
}


def _cut_history(data: dict, keep: int | None) -> tuple[dict, int, np.ndarray | None]:
    """-> (the body with only the last `keep` actions of a list history, how many were dropped,
    the item ids among them). The caller's dict is left as it is."""
    hist = data.get("history")
    if keep is None or not isinstance(hist, list) or len(hist) <= keep:
        return data, 0, None
    n = len(hist) - keep
    dropped = _item_ids(a.get("item_id") if isinstance(a, dict) else None for a in hist[:n])
    return {**data, "history": hist[n:]}, n, dropped


def _item_ids(values) -> np.ndarray:
    """The values that are item ids (JSON integers in 0..2^63-1) as int64; others are passed over."""
    return np.array([v for v in values if type(v) is int and 0 <= v <= INT64_MAX], dtype=np.int64)


def _column_rules() -> dict[str, tuple[int, int, bool, Any]]:
    """record name -> (lowest, highest, required, default), read off `ActionIn` (one definition;
    a model's extra per-action fields are integers >= 0, as in the list form)."""
    out = {}
    for name, f in ActionIn.model_fields.items():
        lo = next(m.ge for m in f.metadata if hasattr(m, "ge"))
        hi = next(m.le for m in f.metadata if hasattr(m, "le"))
        out[name] = (lo, hi, f.is_required(), f.default)
    return out


def _parse_columns(hist: dict, limits: Limits) -> tuple[dict[str, np.ndarray], int, np.ndarray | None]:
    """A columnar history -> (int64 arrays of its last `keep_history` actions, actions dropped,
    the item ids among them), with the list form's checks: known fields, JSON integers only,
    bounds, equal lengths."""
    rules = {**_column_rules(), **{name: (0, INT64_MAX, False, 0) for name in limits.extra_action_fields}}
    for name in hist:
        if name not in rules:
            raise ServingError(422, f"history.{name}", "unknown field")
    for name, (_, _, required, _) in rules.items():
        if required and name not in hist:
            raise ServingError(422, f"history.{name}", "required field is missing")
    n = None
    for name, col in hist.items():
        if not isinstance(col, list):
            raise ServingError(422, f"history.{name}", "expected a list of integers (one per action)")
        if n is not None and len(col) != n:
            raise ServingError(422, f"history.{name}", f"has {len(col)} values, history.item_id has {n}")
        n = len(col)
    if n > limits.max_history_request:
        raise ServingError(413, "history", f"{n} actions is over the limit of {limits.max_history_request}")
    offset = max(0, n - limits.keep_history) if limits.keep_history is not None else 0
    dropped = _item_ids(hist["item_id"][:offset]) if offset else None
    return {name: _int_column(f"history.{name}", col[offset:], offset, *rules[name][:2])
            for name, col in hist.items()}, offset, dropped


def _int_column(field: str, col: list, offset: int, lo: int, hi: int) -> np.ndarray:
    if set(map(type, col)) - {int}:  # bool is not int here, as in the list form (StrictInt)
        j = next(i for i, v in enumerate(col) if type(v) is not int)
        if isinstance(col[j], float) and not math.isfinite(col[j]):  # as the list form says it
            raise ServingError(400, f"{field}[{j + offset}]", f"{col[j]} is not a finite number")
        raise ServingError(422, f"{field}[{j + offset}]", "Input should be a valid integer")
    try:
        arr = np.array(col, dtype=np.int64)
    except OverflowError:
        j = next(i for i, v in enumerate(col) if not -2**63 <= v <= INT64_MAX)
        side = f"greater than or equal to {lo}" if col[j] < 0 else f"less than or equal to {hi}"
        raise ServingError(422, f"{field}[{j + offset}]", f"Input should be {side}") from None
    bad = np.flatnonzero((arr < lo) | (arr > hi))
    if len(bad):
        j = int(bad[0])
        side = f"greater than or equal to {lo}" if arr[j] < lo else f"less than or equal to {hi}"
        raise ServingError(422, f"{field}[{j + offset}]", f"Input should be {side}")
    return arr
