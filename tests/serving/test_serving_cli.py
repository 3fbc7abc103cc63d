"""`unipinrec index build | package | serve`: outputs, and one-line errors naming the option."""
from __future__ import annotations

import json
import zipfile

from typer.testing import CliRunner

from unipinrec.cli import app

runner = CliRunner()


def test_index_build_writes_a_pinned_index(tiny, tmp_path):
    out = tmp_path / "idx"
    r = runner.invoke(app, ["index", "build", "--model", str(tiny.unified), "--out", str(out), "--queries", "40",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "recall@100 1.0000" in r.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model_version"] == json.loads((tiny.unified / "meta.json").read_text())["model_version"]


def test_index_build_errors_name_the_option(tiny, tmp_path):
    r = runner.invoke(app, ["index", "build", "--model", str(tiny.ranking), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "no retrieval head" in r.output
    r = runner.invoke(app, ["index", "build", "--model", str(tmp_path), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "--model" in r.output
    r = runner.invoke(app, ["index", "build", "--model", str(tiny.unified), "--out", str(tmp_path / "x"),
                            "--kind", "lsh"])
    assert r.exit_code == 1 and "--kind" in r.output


def test_package_builds_the_three_archives(tiny, tmp_path):
    store = tmp_path / "store"
    r = runner.invoke(app, ["package", "--model", str(tiny.unified), "--index", str(tiny.unified_index),
                            "--out", str(store), "--baseline-retrieval", str(tiny.retrieval),
                            "--baseline-ranking", str(tiny.ranking), "--recompute", "--batch-size", "2",
                            "--workers", "2", "--torch-threads", "1"])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in store.glob("*.mar"))
    assert names == ["unipinrec.mar", "unipinrec_baseline.mar", "unipinrec_recompute.mar"]
    with zipfile.ZipFile(store / "unipinrec_baseline.mar") as z:
        files = set(z.namelist())
        spec = json.loads(z.read("serving.json"))
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert {"model/model.safetensors", "ranking/model.safetensors", "index/index.faiss", "handler.py"} <= files
    assert spec["ranking"] is True and spec["kind"] == "retrieval_only" and spec["torch_threads"] == 1
    with zipfile.ZipFile(store / "unipinrec_recompute.mar") as z:
        assert json.loads(z.read("serving.json"))["engine"]["share_kv"] is False
        cfg = z.read(manifest["model"]["configFile"]).decode()
        assert "batchSize: 2" in cfg and "maxWorkers: 2" in cfg


def test_package_refuses_an_index_of_another_model(tiny, tmp_path):
    r = runner.invoke(app, ["package", "--model", str(tiny.unified), "--index", str(tiny.retrieval_index),
                            "--out", str(tmp_path / "s")])
    assert r.exit_code == 1 and "rebuild the index" in r.output
    r = runner.invoke(app, ["package", "--model", str(tiny.unified), "--index", str(tiny.unified_index),
                            "--out", str(tmp_path / "s"), "--baseline-retrieval", str(tiny.retrieval)])
    assert r.exit_code == 1 and "--baseline-ranking" in r.output


def test_serve_needs_a_store_and_stop_without_a_server_says_so(tmp_path):
    r = runner.invoke(app, ["serve"])
    assert r.exit_code == 1 and "--model-store" in r.output
    r = runner.invoke(app, ["serve", "--stop", "--run-dir", str(tmp_path)])
    assert r.exit_code == 0 and "no server recorded" in r.output
    r = runner.invoke(app, ["serve", "--model-store", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    assert r.exit_code == 1 and "no .mar archives" in r.output
