"""The suites in data_contracts/ are GX JSON that round-trips, equal what the code generates, and
run the same as the built-in contracts; the JSON Schemas match format.py."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import jsonschema
import pytest

from unipinrec.contracts import CONTRACTS, suite_dict, validate
from unipinrec.contracts.__main__ import export
from unipinrec.contracts.schema_export import json_schema


@pytest.fixture(scope="module")
def contracts_dir(repo_root):
    return repo_root / "data_contracts"


@pytest.mark.parametrize("contract", CONTRACTS)
def test_suite_json_round_trips_through_gx(contract, contracts_dir):
    import great_expectations as gx

    text = (contracts_dir / f"{contract}.json").read_text()
    suite = gx.ExpectationSuite(**json.loads(text))
    assert suite.name == f"unipinrec_{contract}"
    assert len(suite.expectations) == len(suite_dict(contract)["expectations"])
    assert json.loads(json.dumps(suite.to_json_dict())) == json.loads(text)


def test_committed_files_equal_what_the_code_generates(contracts_dir, tmp_path):
    written = export(tmp_path)
    for p in written:
        committed = contracts_dir / p.name
        assert committed.exists(), f"{committed} missing: run `python -m unipinrec.contracts export data_contracts`"
        assert json.loads(committed.read_text()) == json.loads(p.read_text()), (
            f"{committed} is stale: run `python -m unipinrec.contracts export data_contracts`")


@pytest.mark.parametrize("contract", CONTRACTS)
def test_rule_names_unique_and_documented(contract):
    exps = suite_dict(contract)["expectations"]
    rules = [e["meta"]["rule"] for e in exps]
    assert len(rules) == len(set(rules))
    assert all(e["description"] and e["meta"]["protects"] for e in exps)


def test_suite_file_from_disk_gives_the_same_verdict(ex, good_examples, contracts_dir):
    good_examples["valid"][0]["history"][-1]["ts"] = 2000
    root = ex(splits=good_examples)
    builtin = validate(root, "examples")
    from_file = validate(root, "examples", suite=contracts_dir / "examples.json")
    assert [r.rule for r in from_file.failed] == [r.rule for r in builtin.failed] == ["history_before_request"]


def test_an_edited_suite_is_honoured(raw, contracts_dir):
    suite = json.loads((contracts_dir / "items.json").read_text())
    suite["expectations"].append({"type": "expect_column_values_to_be_between",
                                  "kwargs": {"column": "category", "max_value": 1}, "meta": {"rule": "few_categories"}})
    report = validate(raw() / "items", "items", suite=suite)
    assert [r.rule for r in report.failed] == ["few_categories"]
    assert report.result("few_categories").unexpected_count == 3  # categories 2 of items 2, 5, 8


def test_importing_contracts_does_not_import_great_expectations():
    code = ("import sys, unipinrec.contracts, unipinrec.cli.contracts; "
            "print('great_expectations' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------
# JSON Schemas of the unified format

@pytest.mark.parametrize("table", CONTRACTS)
def test_json_schema_accepts_good_rows_and_rejects_bad_ones(table, good_events, good_items, good_examples):
    schema = json_schema(table)
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    rows = {"events": good_events, "items": good_items, "examples": [r for s in good_examples.values() for r in s]}[table]
    for row in rows:
        v.validate(row)
    bad = copy.deepcopy(rows[-1])
    bad["item_id" if table != "examples" else "user_id"] = "7"
    assert not v.is_valid(bad)
    if table == "examples":
        bad = copy.deepcopy(rows[-1])
        bad["history"][0]["action"] = 300  # out of int8
        assert not v.is_valid(bad)
        bad = copy.deepcopy(rows[-1])
        del bad["slate"][0]["position"]
        assert not v.is_valid(bad)



# ------------------------------------------------------------------------------------------------
# data_contracts/README.md documents every field, every rule, and its example records are valid

def _readme(contracts_dir) -> str:
    return (contracts_dir / "README.md").read_text()


def test_readme_documents_every_field(contracts_dir):
    from unipinrec import format as fmt

    text = _readme(contracts_dir)
    for schema in (fmt.EVENTS_SCHEMA, fmt.ITEMS_SCHEMA, fmt.UNIFIED_EXAMPLE_SCHEMA):
        for f in schema:
            typ = f"list\\<{'Action' if f.name == 'history' else 'Impression'}\\>" if f.name in ("history", "slate") else f.type
            assert f"| `{f.name}` | {typ} | {'yes' if f.nullable else 'no'}" in text, f"{f.name} not documented"
    for lst in ("history", "slate"):
        for f in fmt.UNIFIED_EXAMPLE_SCHEMA.field(lst).type.value_type:
            assert f"| `{lst}[].{f.name}` | {f.type} |" in text, f"{lst}[].{f.name} not documented with its type"


@pytest.mark.parametrize("contract", CONTRACTS)
def test_readme_lists_every_rule(contract, contracts_dir):
    from unipinrec.contracts import rules_for

    text = _readme(contracts_dir)
    rules = rules_for(contract)
    assert f"(`{contract}.json`, {len(rules)} expectations)" in text
    for r in rules:
        schema_rule = r.type in ("expect_column_to_exist", "expect_column_values_to_be_of_type",
                                 "expect_column_values_to_not_be_null") and r.kwargs["column"] in r.rule
        assert schema_rule or f"`{r.rule}`" in text, f"rule {r.rule} of {contract} is not documented"


def test_readme_example_records_validate_against_the_json_schemas(contracts_dir):
    import re

    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", _readme(contracts_dir), re.S)]
    seen = set()
    for rec in blocks:
        table = "examples" if "history" in rec else ("events" if "ts" in rec else "items")
        jsonschema.validate(rec, json.loads((contracts_dir / {"examples": "unified_example.schema.json",
                                                               "events": "events.schema.json",
                                                               "items": "items.schema.json"}[table]).read_text()))
        seen.add(table)
    assert seen == set(CONTRACTS)


def test_a_suite_gx_cannot_fully_load_is_an_error_not_a_pass(raw):
    from unipinrec.format import FormatError

    root = raw() / "items"
    with pytest.raises(FormatError, match="expect_nonsense"):
        validate(root, "items", suite={"name": "x", "expectations": [
            {"type": "expect_column_to_exist", "kwargs": {"column": "item_id"}},
            {"type": "expect_nonsense", "kwargs": {}}]})
    with pytest.raises(FormatError, match="no expectations"):
        validate(root, "items", suite={"name": "x", "expectations": []})
    with pytest.raises(ValueError, match="colum"):  # GX's own message names the bad keyword
        validate(root, "items", suite={"name": "x", "expectations": [
            {"type": "expect_column_values_to_be_between", "kwargs": {"colum": "category", "min_value": 0}}]})
