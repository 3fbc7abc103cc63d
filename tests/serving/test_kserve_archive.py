"""The KServe model's `load()` without a server: every archive layout it accepts (unpacked
folder, .mar, KServe's storageUri folder from `publish_model`), the ones it refuses, and the
v2 field names its errors use."""
from __future__ import annotations

import asyncio
import gc
import shutil
import zipfile

import pytest

pytest.importorskip("kserve")

from unipinrec.deploy.publish import publish_model  # noqa: E402
from unipinrec.serving import torchserve as ts  # noqa: E402
from unipinrec.serving.kserve_model import UniPinRecModel, resolve_archive, v2_field  # noqa: E402
from unipinrec.serving.request import ServingError  # noqa: E402


@pytest.fixture(scope="module")
def mar(tiny, tmp_path_factory):
    return ts.build_archive(tiny.unified, tiny.unified_index, tmp_path_factory.mktemp("store"))


def test_a_mar_an_unpacked_folder_and_the_storage_uri_layout_load_the_same_model(mar, tmp_path):
    registry = tmp_path / "registry"
    publish_model(mar, registry, "v1")
    storage = registry / "unipinrec" / "v1"  # what KServe's storage initializer copies to /mnt/models
    unpacked = resolve_archive(mar, tmp_path / "work-a")
    versions = set()
    for i, path in enumerate((mar, unpacked, storage)):
        m = UniPinRecModel("unipinrec", path, work_dir=tmp_path / f"work{i}")
        gc.unfreeze()
        assert m.load() and asyncio.run(m.healthy())
        assert gc.get_freeze_count() > 10_000  # the loaded engine is out of the collector's walks (settle_heap)
        versions.add(m.engine.model_version)
        assert m.batcher.max_batch_size == 4  # the archive's model-config.yaml (batchSize)
    assert len(versions) == 1


def test_a_damaged_or_foreign_archive_is_refused(mar, tmp_path):
    registry = tmp_path / "registry"
    publish_model(mar, registry, "v1")
    stored = registry / "unipinrec" / "v1" / "model-store" / "unipinrec.mar"
    stored.chmod(0o644)
    with open(stored, "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="SHA-256"):
        resolve_archive(registry / "unipinrec" / "v1", tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="not exactly one"):
        resolve_archive(tmp_path / "registry", tmp_path / "w")
    foreign = tmp_path / "foreign.mar"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("../escape.txt", "x")
        z.writestr("weights.bin", "x")
    with pytest.raises(FileNotFoundError, match="serving.json"):
        resolve_archive(foreign, tmp_path / "w")
    assert not (tmp_path / "escape.txt").exists()  # zip paths never leave the work folder


def test_two_mars_in_the_storage_folder_pick_the_model_by_name(mar, tmp_path):
    (tmp_path / "model-store").mkdir()
    shutil.copy(mar, tmp_path / "model-store" / "unipinrec.mar")
    shutil.copy(mar, tmp_path / "model-store" / "other.mar")
    assert (resolve_archive(tmp_path, tmp_path / "w") / "serving.json").is_file()


@pytest.mark.parametrize("field, row, offset, want", [
    ("history[3].item_id", 1, 10, "history_item_id[13]"),
    ("history[0].ts", 0, 0, "history_ts[0]"),
    ("k", 2, 0, "k[2]"),
    ("history", 1, 4, "history_length[1]"),
    ("request_ts", 0, 0, "request_ts[0]"),
])
def test_engine_fields_map_to_v2_tensor_elements(field, row, offset, want):
    assert v2_field(field, row, offset) == want


def test_v1_rejects_non_json_before_decoding(mar, tmp_path):
    m = UniPinRecModel("unipinrec", mar, work_dir=tmp_path)
    m.load()
    with pytest.raises(ServingError) as e:
        asyncio.run(m.predict(b"{}", {"Content-Type": "text/csv"}))
    assert (e.value.status, e.value.field) == (415, "Content-Type")
    out = asyncio.run(m.predict(b'{"user_id": 3, "history": [], "k": 2}', {"content-type": "application/json"}))
    assert out["cold_start"] and len(out["items"]) == 2


def test_serve_runtime_errors_name_the_option(tmp_path):
    from typer.testing import CliRunner

    from unipinrec.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--runtime", "triton", "--model-store", str(tmp_path)])
    assert r.exit_code == 1 and "--runtime" in r.output
    r = runner.invoke(app, ["serve", "--runtime", "kserve"])
    assert r.exit_code == 1 and "--model-store" in r.output
    r = runner.invoke(app, ["serve", "--runtime", "kserve", "--stop", "--run-dir", str(tmp_path)])
    assert r.exit_code == 0 and "no server recorded" in r.output
    r = runner.invoke(app, ["serve", "--runtime", "kserve", "--model-store", str(tmp_path), "--run-dir", str(tmp_path / "r")])
    assert r.exit_code == 1 and "no .mar archives" in r.output
    r = runner.invoke(app, ["serve", "--runtime", "kserve", "--model-store", str(tmp_path), "--model", "x.mar"])
    assert r.exit_code == 1 and "NAME=FILE" in r.output
