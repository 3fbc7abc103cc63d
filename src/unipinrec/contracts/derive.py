"""Flat columns for GX: the raw flat fields plus derived columns for the nested and cross-table rules.

GX expectations work on flat columns. The rules that look inside lists (history order, slate
positions, item ids of history/slate) or across tables (item ids present in the items table)
are computed here, vectorised with pyarrow/numpy, into one value per row; the GX suites then
check those columns (see suites.py). Only pyarrow, numpy and pandas are imported.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..format import EVENTS_SCHEMA, ITEMS_SCHEMA, UNIFIED_EXAMPLE_SCHEMA

DERIVED_DOCS: dict[str, dict[str, str]] = {
    "events": {
        "impression_fields_paired": "bool: request_id and position are both null or both set",
        "organic_row": "int8: 1 for an organic row (request_id null), null for an impression row",
        "in_order": "bool: the row is not before the previous row (shard order) in (user_id, ts) order",
        "unknown_item_id": "int64: item_id when it is not in the items table, else null",
    },
    "items": {},
    "examples": {
        "history_type": "string: the Arrow type of 'history' ('missing' when the column is absent)",
        "slate_type": "string: the Arrow type of 'slate' ('missing' when the column is absent)",
        "history_len": "int64: number of history actions (null when history is null)",
        "slate_len": "int64: number of slate impressions (null when slate is null)",
        "history_null_values": "int64: null elements or fields inside history",
        "slate_null_values": "int64: null elements or fields inside slate",
        "history_min_ts": "int64: earliest history ts (null when history is empty)",
        "history_max_ts": "int64: latest history ts (null when history is empty)",
        "history_sorted": "bool: history ts never decreases (true when empty)",
        "history_min_action": "int8: smallest history action id (null when empty)",
        "history_max_action": "int8: largest history action id (null when empty)",
        "history_min_surface": "int8: smallest history surface id (null when empty)",
        "slate_min_action": "int8: smallest slate action id (null when empty)",
        "slate_max_action": "int8: largest slate action id (null when empty)",
        "slate_min_position": "int16: smallest slate position (null when empty)",
        "slate_positions_unique": "bool: no position repeats within the slate (true when empty)",
        "unknown_item_id": "int64: the first history-then-slate item_id missing from the items table, else null",
    },
}

_SUMMARY_TYPES = {name: {"string": pa.string(), "int64": pa.int64(), "int8": pa.int8(), "int16": pa.int16(),
                         "bool": pa.bool_()}[doc.split(":")[0]] for name, doc in DERIVED_DOCS["examples"].items()}

RAW_COLUMNS = {
    "events": EVENTS_SCHEMA.names,
    "items": ITEMS_SCHEMA.names,
    "examples": ["user_id", "request_ts"],  # history/slate are summarised, never copied to pandas
}
# Which column places a row in a validation chunk: all rows of one key land in the same chunk,
# so per-user (events, examples) and per-item (items) uniqueness holds across chunks exactly.
PARTITION_KEY = {"events": "user_id", "items": "item_id", "examples": "user_id"}

_PANDAS_TYPES = {
    pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(), pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(),
    pa.bool_(): pd.BooleanDtype(), pa.string(): pd.StringDtype(), pa.large_string(): pd.StringDtype(),
}


def to_pandas(table: pa.Table, raw_columns: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """The flat table as pandas, shaped for GX's type rules and its fast paths.

    Raw columns keep their Arrow integer width; a raw integer column with nulls becomes a
    nullable pandas int, so a null id fails only the not-null rule, not the type rule too.
    Derived integer summaries become float64 (NaN = null): GX's between-rule is vectorised only
    for int64/float64 numpy columns and loops in Python otherwise (10x slower). Timestamps and
    counts stay exact in float64 below 2**53; item ids (unknown_item_id) stay int64.
    """
    data = {}
    for name, col in zip(table.column_names, table.columns):
        t = col.type
        if name not in raw_columns and pa.types.is_integer(t) and name != "unknown_item_id":
            data[name] = col.cast(pa.float64()).to_pandas()
        elif name not in raw_columns or (col.null_count == 0 and not pa.types.is_string(t)
                                         and not pa.types.is_large_string(t)):
            data[name] = col.to_pandas()
        else:
            data[name] = col.to_pandas(types_mapper=_PANDAS_TYPES.get)
    return pd.DataFrame(data, index=pd.RangeIndex(table.num_rows))


def as_int64(col) -> np.ndarray | None:
    """An integer-like column as int64 numpy (nulls as 0), or None when it is not integer-like."""
    if col is None:
        return None
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not (pa.types.is_integer(col.type)):
        try:
            col = pc.cast(col, pa.int64())  # e.g. "123" strings: type rule fails, the rest still runs
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
    return pc.fill_null(col, 0).cast(pa.int64()).to_numpy(zero_copy_only=False)


class OrderState:
    """Tracks (user_id, ts) of the last row seen, so that order is checked across batches/shards."""

    def __init__(self) -> None:
        self.last: tuple[int, int] | None = None

    def update(self, batch: pa.RecordBatch) -> pa.Array | None:
        if "user_id" not in batch.schema.names or "ts" not in batch.schema.names:
            return None
        user, ts = as_int64(batch.column("user_id")), as_int64(batch.column("ts"))
        if user is None or ts is None or len(user) == 0:
            return None if user is None or ts is None else pa.array([], pa.bool_())
        prev_user = np.empty_like(user)
        prev_ts = np.empty_like(ts)
        prev_user[1:], prev_ts[1:] = user[:-1], ts[:-1]
        if self.last is None:
            prev_user[0], prev_ts[0] = user[0], ts[0]
        else:
            prev_user[0], prev_ts[0] = self.last
        ok = (user > prev_user) | ((user == prev_user) & (ts >= prev_ts))
        self.last = (int(user[-1]), int(ts[-1]))
        return pa.array(ok)


def derive(contract: str, batch: pa.RecordBatch | pa.Table, *, item_ids: pa.Array | None,
           in_order: pa.Array | None = None, notes: set[str] | None = None) -> pa.Table:
    """The flat table GX validates for one batch of rows (already selected for the chunk)."""
    notes = notes if notes is not None else set()
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    cols: dict[str, pa.Array | pa.ChunkedArray] = {n: table.column(n) for n in RAW_COLUMNS[contract] if n in table.column_names}
    n = table.num_rows
    if contract == "events":
        if "request_id" in cols and "position" in cols:
            cols["impression_fields_paired"] = pc.equal(pc.is_null(cols["request_id"]), pc.is_null(cols["position"]))
        if "request_id" in cols:  # impression rows are null here, so the uniqueness rule skips them
            organic = pc.is_null(cols["request_id"])
            cols["organic_row"] = pc.if_else(organic, pa.scalar(1, pa.int8()), pa.scalar(None, pa.int8()))
        if in_order is not None:
            cols["in_order"] = in_order
        if item_ids is not None and "item_id" in cols:
            cols["unknown_item_id"] = _unknown_ids(cols["item_id"], item_ids, notes)
    elif contract == "examples":
        unknown = pa.nulls(n, pa.int64())
        for name in ("slate", "history"):  # history last: its first unknown id wins
            derived, unk = _summarise_list(name, table, item_ids, notes)
            cols.update(derived)
            if unk is not None:
                unknown = pc.coalesce(unk, unknown)
        if item_ids is not None:
            cols["unknown_item_id"] = unknown
    if not cols:  # nothing recognisable: keep the row count so that the table rules still see it
        cols["__row__"] = pa.nulls(n, pa.int8())
    return pa.table(cols)


def _unknown_ids(item_col, item_ids: pa.Array, notes: set[str]) -> pa.Array:
    ids = item_col.combine_chunks() if isinstance(item_col, pa.ChunkedArray) else item_col
    if not pa.types.is_integer(ids.type):
        try:
            ids = pc.cast(ids, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            notes.add("item ids are not integers: referential integrity could not be computed")
            return pa.nulls(len(ids), pa.int64())
    ids = ids.cast(pa.int64())
    known = pc.is_in(ids, value_set=item_ids)
    return pc.if_else(pc.fill_null(known, True), pa.nulls(len(ids), pa.int64()), ids)


def _summarise_list(name: str, table: pa.Table, item_ids: pa.Array | None, notes: set[str]):
    """Per-row summaries of a list<struct> column; returns (columns, first unknown item id or None)."""
    n = table.num_rows
    expected = UNIFIED_EXAMPLE_SCHEMA.field(name).type
    # every summary exists (null = unknown) so that a missing or mistyped list fails its type and
    # not-null rules, and the other rules pass vacuously instead of erroring on a missing column
    out: dict[str, pa.Array] = {c: pa.nulls(n, _SUMMARY_TYPES[c]) for c in DERIVED_DOCS["examples"]
                                if c.startswith(name + "_")}
    if name not in table.column_names:
        out[f"{name}_type"] = pa.array(["missing"] * n, pa.string())
        return out, None
    col = table.column(name).combine_chunks()
    out[f"{name}_type"] = pa.array([str(col.type)] * n, pa.string())
    if col.type != expected:
        try:
            col = col.cast(expected)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            notes.add(f"'{name}' has type {col.type}, not {expected}: its nested rules were not computed")
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                out[f"{name}_len"] = pc.list_value_length(col).cast(pa.int64())
            return out, None
    lengths = pc.list_value_length(col)  # null where the list itself is null
    out[f"{name}_len"] = lengths.cast(pa.int64())
    lens = pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    values = pc.list_flatten(col)  # honours slicing and null lists
    parent = np.repeat(np.arange(n, dtype=np.int64), lens)
    fields = {f.name: arr for f, arr in zip(values.type, values.flatten())}  # flatten merges element nulls

    nulls = np.zeros(n, dtype=np.int64)
    for arr in fields.values():
        if arr.null_count:
            nulls += np.bincount(parent[np.asarray(pc.is_null(arr))], minlength=n)
    out[f"{name}_null_values"] = pa.array(nulls)

    nonempty = lens > 0

    def group(field: str, fn, typ) -> pa.Array:
        vals = pc.fill_null(fields[field], 0).to_numpy(zero_copy_only=False)
        res = np.zeros(n, dtype=vals.dtype)
        if nonempty.any():
            res[nonempty] = fn.reduceat(vals, starts[:-1][nonempty])
        return pa.array(res, type=typ, mask=~nonempty)

    (_history_rules if name == "history" else _slate_rules)(out, group, fields, parent, n)
    return out, _first_unknown(n, parent, fields, item_ids, len(values))


def _history_rules(out: dict, group, fields: dict, parent: np.ndarray, n: int) -> None:
    out["history_min_ts"] = group("ts", np.minimum, pa.int64())
    out["history_max_ts"] = group("ts", np.maximum, pa.int64())
    out["history_min_action"] = group("action", np.minimum, pa.int8())
    out["history_max_action"] = group("action", np.maximum, pa.int8())
    out["history_min_surface"] = group("surface", np.minimum, pa.int8())
    ts = pc.fill_null(fields["ts"], 0).to_numpy(zero_copy_only=False)
    bad = parent[1:][(ts[1:] < ts[:-1]) & (parent[1:] == parent[:-1])]  # rows with a step back in time
    ok = np.ones(n, dtype=bool)
    ok[bad] = False
    out["history_sorted"] = pa.array(ok)


def _slate_rules(out: dict, group, fields: dict, parent: np.ndarray, n: int) -> None:
    out["slate_min_action"] = group("action", np.minimum, pa.int8())
    out["slate_max_action"] = group("action", np.maximum, pa.int8())
    out["slate_min_position"] = group("position", np.minimum, pa.int16())
    pos = pc.fill_null(fields["position"], 0).to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((pos, parent))
    sp, spos = parent[order], pos[order]
    dup = sp[1:][(sp[1:] == sp[:-1]) & (spos[1:] == spos[:-1])]  # rows with a position twice
    ok = np.ones(n, dtype=bool)
    ok[dup] = False
    out["slate_positions_unique"] = pa.array(ok)


def _first_unknown(n: int, parent: np.ndarray, fields: dict, item_ids: pa.Array | None, num_values: int):
    """Per row, the first item id not in `item_ids` (null where all are known); None: not checked."""
    if item_ids is None:
        return None
    if not num_values:
        return pa.nulls(n, pa.int64())
    ids = fields["item_id"].cast(pa.int64())
    missing = ~np.asarray(pc.fill_null(pc.is_in(ids, value_set=item_ids), True))
    rows, idx = np.unique(parent[missing], return_index=True)  # parent is sorted: first per row
    first = np.zeros(n, dtype=np.int64)
    has = np.zeros(n, dtype=bool)
    first[rows] = ids.to_numpy(zero_copy_only=False)[missing][idx]
    has[rows] = True
    return pa.array(first, type=pa.int64(), mask=~has)
