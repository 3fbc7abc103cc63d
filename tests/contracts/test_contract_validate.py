"""Every contract passes on good data and fails, naming the right expectation (and only it), on
injected corruptions. Runs real GX suites; one GX context is shared by the whole process."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from unipinrec import format as fmt
from unipinrec.contracts import validate


def _with_type(schema: pa.Schema, name: str, typ: pa.DataType) -> pa.Schema:
    return schema.set(schema.get_field_index(name), pa.field(name, typ))


def test_good_hand_built_data_passes_every_contract(raw, ex):
    r = raw()
    for contract, path in (("events", r / "events"), ("items", r / "items")):
        report = validate(path, contract)
        assert report.success, report.render_text()
        assert report.rows_validated == report.rows_total > 0
        assert not [x for x in report.results if x.skipped], report.render_text()  # items + actions were found
    report = validate(ex(), "examples")
    assert report.success, report.render_text()
    assert report.rows_validated == 4  # all three splits together
    assert not [x for x in report.results if x.skipped], report.render_text()


def test_synthetic_generator_output_passes(tmp_path):
    from unipinrec.data import build_examples, generate_synthetic

    raw = tmp_path / "raw"
    generate_synthetic(raw, num_users=40, num_items=200, progress=False)
    build_examples(raw, tmp_path / "ex", max_history=8, progress=False)
    for contract, path in (("events", raw / "events"), ("items", raw / "items"), ("examples", tmp_path / "ex")):
        report = validate(path, contract)
        assert report.success, report.render_text()
        assert not [x for x in report.results if x.skipped], report.render_text()
    # many small chunks give the same verdict and the same row count as one chunk
    chunked = validate(tmp_path / "ex", "examples", chunk_rows=50)
    assert chunked.chunks > 1 and chunked.success and chunked.rows_validated == report.rows_validated
    sampled = validate(raw / "events", "events", sample_rows=500)
    assert sampled.success and 0 < sampled.rows_validated < sampled.rows_total
    assert any("sampled" in n for n in sampled.notes)


# ------------------------------------------------------------------------------------------------
# events: each corruption -> exactly the rules that must fail

def _set(i, key, value):
    def f(rows):
        rows[i][key] = value
        return rows
    return f


def _swap(i, j):
    def f(rows):
        rows[i], rows[j] = rows[j], rows[i]
        return rows
    return f


EVENT_CORRUPTIONS = {
    "null user_id": (_set(0, "user_id", None), None, {"user_id_not_null"}),
    "unknown action": (_set(4, "action", 9), None, {"action_in_vocabulary"}),
    "negative ts": (_set(0, "ts", -5), None, {"ts_sane"}),
    "ts in milliseconds": (lambda rows: [{**r, "ts": r["ts"] * 1000 + 1_700_000_000_000} for r in rows], None, {"ts_sane"}),
    "item_id as string": (lambda rows: [{**r, "item_id": str(r["item_id"])} for r in rows],
                          _with_type(fmt.EVENTS_SCHEMA, "item_id", pa.string()),
                          {"item_id_type", "item_id_non_negative"}),  # strings cannot be compared with 0
    "ts as float": (lambda rows: rows, _with_type(fmt.EVENTS_SCHEMA, "ts", pa.float64()), {"ts_type"}),
    "unknown item id": (_set(2, "item_id", 999), None, {"item_id_known"}),
    "duplicate slate position": (_set(2, "position", 1), None, {"slate_positions_unique"}),
    "impression without position": (_set(1, "position", None), None, {"impression_fields_paired"}),
    "unsorted rows": (_swap(3, 4), None, {"sorted_by_user_ts"}),
    "missing column": (lambda rows: [{k: v for k, v in r.items() if k != "surface"} for r in rows],
                       fmt.EVENTS_SCHEMA.remove(fmt.EVENTS_SCHEMA.get_field_index("surface")),
                       {"surface_exists", "surface_type", "surface_not_null", "surface_non_negative",
                        "organic_rows_unique"}),  # the duplicate rule compares surface too
    "empty table": (lambda rows: [], None, {"not_empty"}),
    # issue 11, finding 7: these passed the contract and trained, though serving rejects user_id < 0
    "negative user_id": (_set(0, "user_id", -1), None, {"user_id_non_negative"}),
    "negative item_id": (_set(2, "item_id", -3), None, {"item_id_non_negative", "item_id_known"}),
    "exact duplicate organic row": (lambda rows: rows[:4] + [dict(rows[3])] + rows[4:], None, {"organic_rows_unique"}),
}


@pytest.mark.parametrize("name", list(EVENT_CORRUPTIONS))
def test_events_corruption_names_the_rule(name, raw, good_events):
    mutate, schema, expected = EVENT_CORRUPTIONS[name]
    root = raw(events=mutate(good_events), events_schema=schema or fmt.EVENTS_SCHEMA)
    report = validate(root / "events", "events")
    assert not report.success
    assert {r.rule for r in report.failed} == expected, report.render_text()
    for rule in expected:
        assert rule in report.render_text()


def test_organic_actions_that_differ_in_any_field_are_not_duplicates(raw, good_events):
    """A click and a save of one item in the same second are two actions; so is the same action on
    another surface. Impression rows are left to slate_positions_unique."""
    organic = good_events[3]
    rows = good_events[:4] + [{**organic, "action": 3}, {**organic, "surface": 0}] + good_events[4:]
    report = validate(raw(events=rows) / "events", "events")
    assert report.success, report.render_text()


def test_events_report_counts_and_offending_values(raw, good_events):
    good_events[2]["item_id"] = 999
    good_events[5]["item_id"] = 998
    report = validate(raw(events=good_events) / "events", "events")
    r = report.result("item_id_known")
    assert (r.unexpected_count, r.element_count) == (2, len(good_events))
    assert sorted(r.examples) == [998, 999]
    assert {row["user_id"] for row in r.example_rows} == {1}
    assert "2 of 11 rows" in report.render_text()


# ------------------------------------------------------------------------------------------------
# items

ITEM_CORRUPTIONS = {
    "duplicate item id": (_set(1, "item_id", 100), None, {"item_id_unique"}),
    "null item id": (_set(3, "item_id", None), None, {"item_id_not_null"}),
    "category as string": (lambda rows: [{**r, "category": str(r["category"])} for r in rows],
                           _with_type(fmt.ITEMS_SCHEMA, "category", pa.string()), {"category_type"}),
    "negative item id": (_set(3, "item_id", -103), None, {"item_id_non_negative"}),
}


@pytest.mark.parametrize("name", list(ITEM_CORRUPTIONS))
def test_items_corruption_names_the_rule(name, raw, good_items):
    mutate, schema, expected = ITEM_CORRUPTIONS[name]
    root = raw(items=mutate(good_items), items_schema=schema or fmt.ITEMS_SCHEMA)
    report = validate(root / "items", "items")
    assert {r.rule for r in report.failed} == expected, report.render_text()


# ------------------------------------------------------------------------------------------------
# examples (EX folder: all splits validated together)

def _ex_set(split, i, fn):
    def f(splits):
        fn(splits[split][i])
        return splits
    return f


def _assign(**kv):
    return lambda row: row.update(kv)


EXAMPLE_CORRUPTIONS = {
    "null user_id": (_ex_set("train", 0, _assign(user_id=None)), None, {"user_id_not_null"}),
    "negative user_id": (_ex_set("train", 0, _assign(user_id=-1)), None, {"user_id_non_negative"}),
    "history at request_ts": (_ex_set("valid", 0, lambda r: r["history"][-1].update(ts=2000)), None, {"history_before_request"}),
    "history after request_ts": (_ex_set("test", 0, lambda r: r["history"][-1].update(ts=3500)), None, {"history_before_request"}),
    "unsorted history": (_ex_set("test", 0, lambda r: r["history"].reverse()), None, {"history_sorted"}),
    "duplicate example across splits": (lambda s: {**s, "test": s["test"] + [s["train"][0]]}, None, {"no_duplicate_examples"}),
    "negative history ts": (_ex_set("test", 0, lambda r: r["history"][0].update(ts=-1)), None, {"history_ts_non_negative"}),
    "negative request_ts": (_ex_set("train", 0, _assign(request_ts=-1)), None, {"request_ts_sane"}),
    "user_id as string": (lambda s: {k: [{**r, "user_id": str(r["user_id"])} for r in v] for k, v in s.items()},
                          _with_type(fmt.UNIFIED_EXAMPLE_SCHEMA, "user_id", pa.string()),
                          {"user_id_type", "user_id_non_negative"}),  # strings cannot be compared with 0
    "history item_id as string": (
        lambda s: {k: [{**r, "history": [{**a, "item_id": str(a["item_id"])} for a in r["history"]]} for r in v]
                   for k, v in s.items()},
        _with_type(fmt.UNIFIED_EXAMPLE_SCHEMA, "history", pa.list_(pa.struct([
            ("item_id", pa.string()), ("action", pa.int8()), ("ts", pa.int64()), ("surface", pa.int8())]))),
        {"history_type"}),
    "unknown item id in slate": (_ex_set("test", 0, lambda r: r["slate"][0].update(item_id=999)), None, {"item_id_known"}),
    "duplicate slate positions": (_ex_set("train", 0, lambda r: r["slate"][2].update(position=1)), None, {"slate_positions_unique"}),
    "unknown action in history": (_ex_set("valid", 0, lambda r: r["history"][0].update(action=7)), None,
                                  {"history_action_in_vocabulary"}),
    "negative slate action": (_ex_set("valid", 0, lambda r: r["slate"][0].update(action=-1)), None, {"slate_action_min"}),
    "missing slate column": (lambda s: {k: [{kk: vv for kk, vv in r.items() if kk != "slate"} for r in v] for k, v in s.items()},
                             fmt.UNIFIED_EXAMPLE_SCHEMA.remove(3), {"slate_type", "slate_not_null"}),
}


@pytest.mark.parametrize("name", list(EXAMPLE_CORRUPTIONS))
def test_examples_corruption_names_the_rule(name, ex, good_examples):
    mutate, schema, expected = EXAMPLE_CORRUPTIONS[name]
    root = ex(splits=mutate(good_examples), schema=schema or fmt.UNIFIED_EXAMPLE_SCHEMA)
    report = validate(root, "examples")
    assert not report.success
    assert {r.rule for r in report.failed} == expected, report.render_text()


def test_examples_offending_values_name_the_item_and_row(ex, good_examples):
    good_examples["valid"][0]["history"][0]["item_id"] = 998
    good_examples["valid"][0]["slate"][1]["item_id"] = 997
    good_examples["test"][0]["slate"][0]["item_id"] = 999
    report = validate(ex(splits=good_examples), "examples")
    r = report.result("item_id_known")
    assert r.unexpected_count == 2
    assert sorted(r.examples) == [998, 999]  # history's unknown id is shown first for its row
    assert sorted((x["user_id"], x["request_ts"]) for x in r.example_rows) == [(1, 2000), (2, 3000)]


def test_history_longer_than_max_history(ex):
    report = validate(ex(max_history=2), "examples")
    assert {r.rule for r in report.failed} == {"history_length_at_most_max_history"}
    assert report.result("history_length_at_most_max_history").examples == [3]


def test_duplicates_found_across_chunks(ex, good_examples):
    """Rows are chunked by user, so a duplicate is caught however small the chunks are."""
    good_examples["test"].append(dict(good_examples["train"][1]))
    report = validate(ex(splits=good_examples), "examples", chunk_rows=1)
    assert report.chunks > 1
    assert {r.rule for r in report.failed} == {"no_duplicate_examples"}
    assert report.result("no_duplicate_examples").unexpected_count == 2


# ------------------------------------------------------------------------------------------------
# what the report says when something cannot be checked; files it writes

def test_without_items_table_referential_integrity_is_skipped_and_said(raw, tmp_path):
    root = raw()
    lone = tmp_path / "lone" / "events"
    lone.mkdir(parents=True)
    (root / "events" / "part-00000.parquet").rename(lone / "part-00000.parquet")
    report = validate(lone, "events", actions="synthetic")
    assert report.success
    assert report.result("item_id_known").skipped
    assert any("referential integrity NOT checked" in n for n in report.notes)
    assert "referential integrity NOT checked" in report.render_text()
    # ...and an explicit items table turns it back on
    report = validate(lone, "events", actions="synthetic", items=root / "items")
    assert not report.result("item_id_known").skipped and report.success


def test_action_vocabulary_comes_from_meta_or_argument(raw, good_events):
    good_events[0]["action"] = 5  # not in the synthetic vocabulary (0..4), fine in MovieLens (0..5)
    root = raw(events=good_events)
    assert not validate(root / "events", "events").success
    assert validate(root / "events", "events", actions="movielens-1m").success


def test_write_produces_json_and_standalone_html(raw, good_events, tmp_path):
    from html.parser import HTMLParser

    good_events[4]["action"] = 9
    report = validate(raw(events=good_events) / "events", "events", out_dir=tmp_path / "out")
    data = json.loads((tmp_path / "out" / "events_validation.json").read_text())
    assert data["success"] is False and data["failed_rules"] == ["action_in_vocabulary"]
    failed = [r for r in data["results"] if r["rule"] == "action_in_vocabulary"][0]
    assert failed["unexpected_count"] == 1 and failed["examples"] == [9]
    gx = json.loads((tmp_path / "out" / "events_gx_results.json").read_text())
    assert gx[0]["success"] is False  # GX's own result, one per chunk
    page = (tmp_path / "out" / "events_validation.html").read_text()
    HTMLParser().feed(page)
    assert "FAILED" in page and "action_in_vocabulary" in page and "<script" not in page and "http" not in page.split("<body>")[1]
    assert report.render_html() == page
