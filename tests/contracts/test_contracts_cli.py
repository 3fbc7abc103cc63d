"""`unipinrec data validate`: readable report, JSON + HTML files, exit 1 on failure, 0 on success."""
from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from unipinrec.cli.contracts import register

# A bare `data` group with only our command, so the test does not depend on the other groups.
data_app = typer.Typer()
register(data_app)
app = typer.Typer()
app.add_typer(data_app, name="data")
runner = CliRunner()


def test_good_data_exits_0_and_writes_reports(raw, tmp_path):
    root = raw()
    out = tmp_path / "reports"
    res = runner.invoke(app, ["data", "validate", str(root), "--contract", "events", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output
    assert json.loads((out / "events_validation.json").read_text())["success"] is True
    assert (out / "events_validation.html").read_text().startswith("<!DOCTYPE html>")


def test_bad_data_exits_1_naming_rule_count_and_values(ex, good_examples, tmp_path):
    good_examples["test"][0]["history"].reverse()
    good_examples["train"][0]["slate"][2]["position"] = 1
    out = tmp_path / "reports"
    res = runner.invoke(app, ["data", "validate", str(ex(splits=good_examples)), "--contract", "examples",
                              "--out", str(out), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "FAIL history_sorted" in res.output and "FAIL slate_positions_unique" in res.output
    assert "1 of 4 rows" in res.output
    assert "offending values" in res.output and '"request_ts": 3000' in res.output
    data = json.loads((out / "examples_validation.json").read_text())
    assert sorted(data["failed_rules"]) == ["history_sorted", "slate_positions_unique"]
    assert (out / "examples_gx_results.json").exists() and (out / "examples_validation.html").exists()


def test_bad_arguments_exit_1_with_a_message(raw, tmp_path):
    root = raw()
    res = runner.invoke(app, ["data", "validate", str(root), "--contract", "nope"])
    assert res.exit_code == 1 and "--contract must be one of" in res.output
    res = runner.invoke(app, ["data", "validate", str(tmp_path / "missing"), "--contract", "events"])
    assert res.exit_code == 1 and "does not exist" in res.output
    res = runner.invoke(app, ["data", "validate", str(root / "events"), "--contract", "events",
                              "--items", str(tmp_path / "no_items"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no_items" in res.output
    res = runner.invoke(app, ["data", "validate", str(root / "events"), "--contract", "events",
                              "--actions", "click,save", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "impression" in res.output  # vocabularies start with impression


def test_registered_on_the_real_cli():
    from unipinrec.cli import app as real_app

    res = runner.invoke(real_app, ["data", "validate", "--help"])
    assert res.exit_code == 0 and "--contract" in res.output
