"""`unipinrec index build | package | serve`: outputs, and one-line errors naming the option."""
from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest
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


# --- a real TorchServe: fail fast on a corrupt archive (issue 11, finding 8); logs (finding 6) ---

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (17)")


def _ports() -> list[str]:
    from unipinrec.serving.torchserve import free_port

    return ["--port", str(free_port()), "--management-port", str(free_port()), "--metrics-port", str(free_port())]


def _corrupt(mar: Path, how: str) -> None:
    data = mar.read_bytes()
    if how == "truncated":
        mar.write_bytes(data[: len(data) // 2])
        return
    tmp = mar.with_suffix(".tmp")
    with zipfile.ZipFile(mar) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for item in zin.infolist():
            body = zin.read(item.filename)
            zout.writestr(item, b"\0not weights" * 64 if item.filename.endswith("model/model.safetensors") else body)
    tmp.replace(mar)


@needs_java
@pytest.mark.integration
@pytest.mark.parametrize("how, says", [("weights", "ValueError"), ("truncated", "could not register")])
def test_serve_fails_as_soon_as_torchserve_gives_up_on_a_corrupt_archive(tiny, tmp_path, how, says):
    """The worker fails within seconds (TorchServe then retries it forever); `serve` used to wait
    out its whole --timeout (180 s) before saying anything."""
    from unipinrec.serving import torchserve as ts

    store = tmp_path / "store"
    _corrupt(ts.build_archive(tiny.unified, tiny.unified_index, store), how)
    t = time.monotonic()
    r = runner.invoke(app, ["serve", "--model-store", str(store), "--run-dir", str(tmp_path / "run"), *_ports(),
                            "--timeout", "180"])
    took = time.monotonic() - t
    assert r.exit_code == 1 and says in r.output, r.output
    assert took < 60, (took, r.output)
    assert not (tmp_path / "run" / "state.json").exists()  # stopped again


@needs_java
@pytest.mark.integration
def test_serve_logs_rotate_and_nothing_is_written_twice(tiny, tmp_path, monkeypatch):
    import requests

    from unipinrec.serving import torchserve as ts

    monkeypatch.setenv("UNIPINREC_LOG_MAX_SIZE", "16 KB")
    store, run = tmp_path / "store", tmp_path / "run"
    ts.build_archive(tiny.unified, tiny.unified_index, store)
    (run / "logs").mkdir(parents=True)  # a reused run folder: an earlier run's failure is not this run's
    (run / "logs" / "ts_log.log").write_text("2026-01-01T00:00:00,000 [WARN ] W-9000-unipinrec_1 org.pytorch.serve."
                                            "wlm.BatchAggregator - Load model failed: unipinrec, error: Worker died.\n")
    r = runner.invoke(app, ["serve", "--model-store", str(store), "--run-dir", str(run), *_ports(), "--no-token-auth"])
    assert r.exit_code == 0, r.output
    try:
        url = json.loads(r.output.strip().splitlines()[-1])["inference"] + "/predictions/unipinrec"
        with requests.Session() as s:
            for i in range(300):
                assert s.post(url, json={"user_id": i, "history": [], "k": 2}, timeout=30).status_code == 200
    finally:
        runner.invoke(app, ["serve", "--stop", "--run-dir", str(run)])
    logs = run / "logs"
    assert list(logs.glob("access_log.*.log.gz")), sorted(p.name for p in logs.iterdir())
    for path in logs.glob("*.log"):
        assert path.stat().st_size < 16 * 1024 + 4096, path
    assert (logs / "launcher.log").stat().st_size < 4096  # the console: only the launcher's own lines
    lines = (logs / "ts_log.log").read_text().splitlines()
    assert lines and not [line for line in lines if "[DEBUG]" in line] and len(set(lines)) > 0.9 * len(lines)
