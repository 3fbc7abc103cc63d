"""The data contracts as rules: one list per table, turned into Great Expectations 1.x suites.

GX checks flat columns, so nested rules (history order, slate positions, item ids inside lists)
run on *derived* columns that `derive.py` computes with pyarrow/numpy; every rule below is still
a real GX expectation, evaluated by GX. This module is plain data and imports no GX: the suite
JSON in `data_contracts/` is generated from it (`python -m unipinrec.contracts export`) and a
test keeps the two equal.

Suite parameters (`{"$PARAMETER": name}`) are filled in at validation time from the dataset:
`action_ids` / `max_action_id` from meta.json's action vocabulary, `max_ts` from the clock,
`max_history` from the examples folder's meta.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from ..format import EVENTS_SCHEMA, ITEMS_SCHEMA, UNIFIED_EXAMPLE_SCHEMA

CONTRACTS = ("events", "items", "examples")

# What a rule may need from the dataset; a rule whose need is missing is skipped and the report
# says why (e.g. no items table beside the data -> referential integrity not checked).
NEEDS = {
    "items": "an items table (pass items=... / --items, or keep items/ beside the data)",
    "actions": "an action vocabulary (meta.json 'actions', or pass actions=... / --actions)",
    "max_history": "max_history (the examples folder's meta.json)",
}

PARAMETERS = {
    "action_ids": "ids of the dataset's action vocabulary (meta.json 'actions': names by id)",
    "max_action_id": "largest action id of the vocabulary",
    "max_ts": "latest plausible timestamp: validation time + max_future_s (default 1 day)",
    "max_history": "the L of the examples build (meta.json 'max_history')",
}


@dataclass(frozen=True)
class Rule:
    rule: str          # short name used in reports and tests, unique within a suite
    type: str          # the GX expectation type (snake_case)
    kwargs: dict
    description: str   # what it checks, in words
    protects: str      # what breaks downstream without it
    needs: str | None = None  # key of NEEDS, or None
    derived: tuple[str, ...] = field(default=())  # derived columns it reads (documentation)


def _param(name: str) -> dict:
    return {"$PARAMETER": name}


def _schema_rules(schema, required_nonnull: bool = True) -> list[Rule]:
    rules = []
    for f in schema:
        rules.append(Rule(f"{f.name}_exists", "expect_column_to_exist", {"column": f.name},
                          f"column '{f.name}' is present", "a reader failing (or silently reading nothing) on a renamed or dropped field"))
    for f in schema:
        # GX compares with the pandas dtype; derive.to_pandas maps Arrow ints to nullable pandas
        # ints of the same width and strings to pandas' string dtype (whose type is str)
        type_name = "str" if pa.types.is_string(f.type) else str(f.type)
        rules.append(Rule(f"{f.name}_type", "expect_column_values_to_be_of_type", {"column": f.name, "type_": type_name},
                          f"'{f.name}' is {f.type}", "ids read as strings or floats (joins that match nothing, rounding of large ids)"))
    if required_nonnull:
        for f in schema:
            if not f.nullable:
                rules.append(Rule(f"{f.name}_not_null", "expect_column_values_to_not_be_null", {"column": f.name},
                                  f"'{f.name}' is never null", "rows that cannot be attributed to a user/item/time"))
    return rules


def _ids_non_negative(*columns: str) -> list[Rule]:
    return [Rule(f"{c}_non_negative", "expect_column_values_to_be_between", {"column": c, "min_value": 0},
                 f"'{c}' is not negative (serving rejects negative ids)",
                 "training on ids that no request can ever ask for; sentinel ids like -1 taken as real")
            for c in columns]


_NOT_EMPTY = Rule("not_empty", "expect_table_row_count_to_be_between", {"min_value": 1},
                  "the table has at least one row", "an upstream step that silently produced nothing")


def _events_rules() -> list[Rule]:
    return [
        _NOT_EMPTY,
        *_schema_rules(EVENTS_SCHEMA),
        Rule("action_in_vocabulary", "expect_column_values_to_be_in_set", {"column": "action", "value_set": _param("action_ids")},
             "action is an id of the dataset's action vocabulary", "embedding lookups out of range; tasks computed on unknown actions", needs="actions"),
        *_ids_non_negative("user_id", "item_id"),
        Rule("ts_sane", "expect_column_values_to_be_between", {"column": "ts", "min_value": 0, "max_value": _param("max_ts")},
             "ts is in seconds, not negative and not far in the future", "milliseconds mistaken for seconds; sentinel values like -1; broken time-gap buckets"),
        Rule("surface_non_negative", "expect_column_values_to_be_between", {"column": "surface", "min_value": 0},
             "surface id is not negative", "negative embedding indices"),
        Rule("position_non_negative", "expect_column_values_to_be_between", {"column": "position", "min_value": 0},
             "slate position of an impression row is not negative", "broken position-bias features"),
        Rule("impression_fields_paired", "expect_column_values_to_be_in_set", {"column": "impression_fields_paired", "value_set": [True]},
             "request_id and position are both set (impression row) or both null (organic action)",
             "impressions that cannot be grouped into a slate", derived=("impression_fields_paired",)),
        Rule("slate_positions_unique", "expect_compound_columns_to_be_unique",
             {"column_list": ["request_id", "position"], "ignore_row_if": "any_value_is_missing"},
             "no two impressions of one feed request share a slate position", "duplicated impressions; ambiguous slates"),
        Rule("organic_rows_unique", "expect_compound_columns_to_be_unique",
             {"column_list": ["user_id", "item_id", "action", "ts", "surface", "organic_row"], "ignore_row_if": "any_value_is_missing"},
             "no organic action (no request_id) appears twice with the same user, item, action, ts and surface",
             "a replayed or double-written log counting one action twice in histories and as a training target",
             derived=("organic_row",)),
        Rule("sorted_by_user_ts", "expect_column_values_to_be_in_set", {"column": "in_order", "value_set": [True]},
             "rows are sorted by (user_id, ts) across shards, as the layout promises",
             "the streaming example builder mixing users or building histories out of order", derived=("in_order",)),
        Rule("item_id_known", "expect_column_values_to_be_null", {"column": "unknown_item_id"},
             "every item_id exists in the items table", "events on items the model cannot embed; silently dropped rows",
             needs="items", derived=("unknown_item_id",)),
    ]


def _items_rules() -> list[Rule]:
    return [
        _NOT_EMPTY,
        *_schema_rules(ITEMS_SCHEMA),
        *_ids_non_negative("item_id"),
        Rule("item_id_unique", "expect_column_values_to_be_unique", {"column": "item_id"},
             "each item_id appears once", "two embedding rows for one item; joins that multiply rows"),
    ]


def _examples_rules() -> list[Rule]:
    flat = [f for f in UNIFIED_EXAMPLE_SCHEMA if f.name in ("user_id", "request_ts")]
    rules = [_NOT_EMPTY, *_schema_rules(pa.schema(flat)), *_ids_non_negative("user_id")]
    for name in ("history", "slate"):
        expected = str(UNIFIED_EXAMPLE_SCHEMA.field(name).type)
        rules += [
            Rule(f"{name}_type", "expect_column_values_to_be_in_set", {"column": f"{name}_type", "value_set": [expected]},
                 f"'{name}' is present with type {expected}", "nested fields renamed, missing or of the wrong type",
                 derived=(f"{name}_type",)),
            Rule(f"{name}_not_null", "expect_column_values_to_not_be_null", {"column": f"{name}_len"},
                 f"'{name}' is a list (possibly empty), never null", "examples the collate step cannot read",
                 derived=(f"{name}_len",)),
            Rule(f"{name}_fields_not_null", "expect_column_values_to_be_between", {"column": f"{name}_null_values", "max_value": 0},
                 f"no null element or field inside '{name}'", "NaN ids/actions reaching the model", derived=(f"{name}_null_values",)),
            Rule(f"{name}_action_min", "expect_column_values_to_be_between", {"column": f"{name}_min_action", "min_value": 0},
                 f"every {name} action id is >= 0", "negative action ids", needs="actions", derived=(f"{name}_min_action",)),
            Rule(f"{name}_action_in_vocabulary", "expect_column_values_to_be_between",
                 {"column": f"{name}_max_action", "max_value": _param("max_action_id")},
                 f"every {name} action id is in the vocabulary (ids are 0..max_action_id)",
                 "embedding lookups out of range; labels from unknown actions", needs="actions", derived=(f"{name}_max_action",)),
        ]
    rules += [
        Rule("request_ts_sane", "expect_column_values_to_be_between", {"column": "request_ts", "min_value": 0, "max_value": _param("max_ts")},
             "request_ts is in seconds, not negative and not far in the future", "milliseconds mistaken for seconds; sentinel values"),
        Rule("history_ts_non_negative", "expect_column_values_to_be_between", {"column": "history_min_ts", "min_value": 0},
             "no history action has a negative ts", "sentinel timestamps; broken time-gap buckets", derived=("history_min_ts",)),
        Rule("history_before_request", "expect_column_pair_values_a_to_be_greater_than_b",
             {"column_A": "request_ts", "column_B": "history_max_ts", "or_equal": False, "ignore_row_if": "either_value_is_missing"},
             "every history action is strictly before request_ts", "label leakage: the model sees the future it must predict",
             derived=("history_max_ts",)),
        Rule("history_sorted", "expect_column_values_to_be_in_set", {"column": "history_sorted", "value_set": [True]},
             "history is chronological (ts never decreases)", "causal attention over a shuffled sequence; wrong 'last L' truncation",
             derived=("history_sorted",)),
        Rule("history_surface_non_negative", "expect_column_values_to_be_between", {"column": "history_min_surface", "min_value": 0},
             "every history surface id is >= 0", "negative embedding indices", derived=("history_min_surface",)),
        Rule("history_length_at_most_max_history", "expect_column_values_to_be_between", {"column": "history_len", "max_value": _param("max_history")},
             "history keeps at most the last L actions", "sequences longer than the model's context", needs="max_history"),
        Rule("slate_position_non_negative", "expect_column_values_to_be_between", {"column": "slate_min_position", "min_value": 0},
             "slate positions are >= 0", "broken position-bias features", derived=("slate_min_position",)),
        Rule("slate_positions_unique", "expect_column_values_to_be_in_set", {"column": "slate_positions_unique", "value_set": [True]},
             "no two impressions of one slate share a position", "duplicated impressions counted twice as labels",
             derived=("slate_positions_unique",)),
        Rule("no_duplicate_examples", "expect_compound_columns_to_be_unique", {"column_list": ["user_id", "request_ts"]},
             "one example per (user_id, request_ts), across all splits validated together", "double-counted examples; train/test leakage"),
        Rule("item_id_known", "expect_column_values_to_be_null", {"column": "unknown_item_id"},
             "every history and slate item_id exists in the items table (the value shown is the first unknown id of the row)",
             "items the model cannot embed", needs="items", derived=("unknown_item_id",)),
    ]
    return rules


def rules_for(contract: str) -> list[Rule]:
    if contract not in CONTRACTS:
        raise ValueError(f"unknown contract '{contract}'; choose one of {', '.join(CONTRACTS)}")
    return {"events": _events_rules, "items": _items_rules, "examples": _examples_rules}[contract]()


def suite_dict(contract: str) -> dict:
    """The GX suite of a contract as the JSON dict that `gx.ExpectationSuite(**d)` accepts."""
    from . import derive

    expectations = []
    for r in rules_for(contract):
        meta = {"rule": r.rule, "protects": r.protects}
        if r.needs:
            meta["needs"] = r.needs
        expectations.append({"type": r.type, "kwargs": dict(r.kwargs), "meta": meta, "description": r.description})
    return {
        "name": f"unipinrec_{contract}",
        "expectations": expectations,
        "meta": {
            "unipinrec_contract": contract,
            "parameters": {k: v for k, v in PARAMETERS.items() if _uses(expectations, k)},
            "derived_columns": derive.DERIVED_DOCS[contract],
            "generated_by": "python -m unipinrec.contracts export data_contracts/",
        },
    }


def _uses(expectations: list[dict], param: str) -> bool:
    return any(v == {"$PARAMETER": param} for e in expectations for v in e["kwargs"].values())

