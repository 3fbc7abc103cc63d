"""`unipinrec data ...` / `unipinrec examples ...`: end to end, and one-line errors naming the option."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from unipinrec import format as fmt
from unipinrec.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_build_stats(tmp_path):
    r = run("data", "generate", "--out", tmp_path / "raw", "--users", 50, "--items", 120,
            "--requests-per-user", 6, "--slate-size", 5, "--seed", 3, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "engagement rate" in r.output
    meta = fmt.read_meta(tmp_path / "raw")
    assert meta["num_users"] == 50 and meta["config"]["slate_size"] == 5 and meta["seed"] == 3
    r = run("examples", "build", "--raw", tmp_path / "raw", "--out", tmp_path / "ex", "--max-history", 8, "--no-progress")
    assert r.exit_code == 0, r.output
    ex = fmt.read_meta(tmp_path / "ex")
    assert ex["max_history"] == 8 and ex["slate_size"] == 5 and ex["splits"]["test"] == 50
    r = run("examples", "stats", tmp_path / "ex")
    assert r.exit_code == 0, r.output
    for word in ("train", "valid", "test", "history length p90", "slate size mean", "positive rate", "click", "hide"):
        assert word in r.output
    r = run("examples", "stats", tmp_path / "ex", "--json", "--positive", "save")
    stats = json.loads(r.output)
    assert stats["positives"] == ["save"] and stats["splits"]["test"]["examples"] == 50
    assert stats["splits"]["train"]["history_length"]["max"] <= 8
    slate = stats["splits"]["train"]["slate_actions"]
    assert stats["splits"]["train"]["positive_rate"] == pytest.approx(slate["save"] / sum(slate.values()))
    assert ex["history_impressions"] is False
    r = run("examples", "build", "--raw", tmp_path / "raw", "--out", tmp_path / "ex_imp", "--max-history", 8,
            "--history-impressions", "--no-progress")
    assert r.exit_code == 0, r.output
    assert fmt.read_meta(tmp_path / "ex_imp")["history_impressions"] is True
    hist = fmt.read_sharded(tmp_path / "ex_imp" / "test").column("history").to_pylist()
    assert any(a["action"] == 0 for h in hist for a in h)  # shown-not-engaged items are history now


def test_generate_by_events(tmp_path):
    r = run("data", "generate", "--out", tmp_path / "raw", "--events", 20_000, "--no-progress")
    assert r.exit_code == 0, r.output
    assert 17_000 < fmt.read_meta(tmp_path / "raw")["num_events"] < 23_000


def test_load_movielens_100k(ml100k_dir, tmp_path):
    r = run("data", "load", "--source", "movielens-100k", "--path", ml100k_dir, "--out", tmp_path / "raw")
    assert r.exit_code == 0, r.output
    assert "100,000 ratings" in r.output


@pytest.mark.parametrize(
    "args, option",
    [
        (("data", "generate", "--out", "{t}/r", "--users", 0), "--users"),
        (("data", "generate", "--out", "{t}/r", "--slate-size", -2), "--slate-size"),
        (("data", "generate", "--out", "{t}/r", "--requests-per-user", 2), "--requests-per-user"),
        (("data", "generate", "--out", "{t}/r", "--items", 5), "--slate-size"),
        (("data", "generate", "--out", "{t}/r", "--items", 100, "--topics", 500), "--topics"),
        (("data", "generate", "--out", "{t}/r", "--events", 100, "--users", 3), "--events"),
        (("data", "generate", "--out", "{t}/file"), "--out"),
        (("data", "load", "--source", "netflix", "--path", "{t}", "--out", "{t}/r"), "--source"),
        (("data", "load", "--source", "movielens-1m", "--path", "{t}/absent", "--out", "{t}/r"), "--path"),
        (("data", "load", "--source", "movielens-100k", "--path", "{t}", "--out", "{t}/r"), "u.data"),
        (("examples", "build", "--raw", "{t}", "--out", "{t}/e"), "--raw"),
        (("examples", "stats", "{t}"), "EXAMPLES_DIR"),
        (("examples", "build", "--raw", "{t}/raw", "--out", "{t}/raw"), "--out"),
    ],
)
def test_bad_input_is_one_line_naming_the_option(tmp_path, args, option):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "meta.json").write_text("{}")
    r = run(*[str(a).replace("{t}", str(tmp_path)) for a in args])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0], r.output


def test_build_refuses_bad_numbers(tmp_path):
    assert run("data", "generate", "--out", tmp_path / "raw", "--users", 10, "--no-progress").exit_code == 0
    for opt in ("--max-history", "--slate-size", "--chunk-events"):
        r = run("examples", "build", "--raw", tmp_path / "raw", "--out", tmp_path / "ex", opt, 0)
        assert r.exit_code == 1 and opt in r.output


def test_data_group_lists_its_commands_including_validate():
    r = run("data", "--help")
    assert r.exit_code == 0
    for command in ("generate", "load", "validate"):  # validate: cli/contracts.py via contracts.register
        assert command in r.output
    r = run("examples", "--help")
    assert "build" in r.output and "stats" in r.output
