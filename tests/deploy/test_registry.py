"""Model registry: publish (pipeline side, unipinrec.deploy) and fetch (the serving pod's init
container, unipinrec.serving.registry)."""
from __future__ import annotations

import hashlib

import pytest

from unipinrec.deploy import DeployError, publish_model
from unipinrec.serving.registry import RegistryError, fetch_model
from unipinrec.serving.registry import main as fetch_main
from unipinrec.deploy.torchserve_config import parse_properties


@pytest.fixture
def mar(tmp_path):
    path = tmp_path / "unipinrec.mar"
    path.write_bytes(b"PK\x03\x04 pretend archive " * 1000)
    return path


def test_publish_writes_the_shared_layout(tmp_path, mar):
    root = publish_model(mar, tmp_path / "registry", "v1")
    assert root == tmp_path / "registry" / "unipinrec" / "v1"
    archive = root / "model-store" / "unipinrec.mar"
    assert archive.read_bytes() == mar.read_bytes()
    digest, name = (root / "model-store" / "unipinrec.mar.sha256").read_text().split()
    assert digest == hashlib.sha256(mar.read_bytes()).hexdigest() and name == "unipinrec.mar"
    props = parse_properties((root / "config" / "config.properties").read_text())
    assert props["model_store"] == "/mnt/models/model-store"  # KServe's storageUri mount
    assert props["load_models"] == "unipinrec.mar" and "disable_token_authorization" not in props
    assert not list(root.rglob(".*"))  # no temp files left behind


def test_versions_are_immutable(tmp_path, mar):
    publish_model(mar, tmp_path, "v1")
    publish_model(mar, tmp_path, "v1")  # same bytes: fine (a retried pipeline step)
    other = tmp_path / "other.mar"
    other.write_bytes(b"different")
    with pytest.raises(DeployError, match="already published with a different archive"):
        publish_model(other, tmp_path, "v1")
    assert (tmp_path / "unipinrec" / "v1" / "model-store" / "unipinrec.mar").read_bytes() == mar.read_bytes()


def test_fetch_copies_and_verifies(tmp_path, mar):
    publish_model(mar, tmp_path / "reg", "v2")
    out = fetch_model(str(tmp_path / "reg"), "v2", tmp_path / "store")
    assert out == tmp_path / "store" / "unipinrec.mar" and out.read_bytes() == mar.read_bytes()
    out2 = fetch_model(f"file://{tmp_path / 'reg'}", "v2", tmp_path / "store2")
    assert out2.read_bytes() == mar.read_bytes()


def test_fetch_refuses_a_tampered_archive(tmp_path, mar):
    root = publish_model(mar, tmp_path / "reg", "v3")
    (root / "model-store" / "unipinrec.mar").write_bytes(b"swapped")
    with pytest.raises(RegistryError, match="does not match the published"):
        fetch_model(str(tmp_path / "reg"), "v3", tmp_path / "store")
    assert not (tmp_path / "store" / "unipinrec.mar").exists()


def test_fetch_of_an_unpublished_version_names_it(tmp_path):
    with pytest.raises(RegistryError, match="model_version: v9 is not published"):
        fetch_model(str(tmp_path), "v9", tmp_path / "store")


@pytest.mark.parametrize("bad", ["../etc", "v1/x", "", "-v1", "v" * 64, "unset "])
def test_bad_versions_are_refused(tmp_path, mar, bad):
    with pytest.raises(DeployError, match="model_version"):
        publish_model(mar, tmp_path, bad)
    with pytest.raises(RegistryError, match="model_version"):
        fetch_model(str(tmp_path), bad, tmp_path / "store")


def test_publish_names_a_missing_archive(tmp_path):
    with pytest.raises(DeployError, match="mar_path"):
        publish_model(tmp_path / "nope.mar", tmp_path, "v1")


def test_init_container_entry_point(tmp_path, mar, capsys):
    publish_model(mar, tmp_path / "reg", "v4")
    assert fetch_main(["--registry", str(tmp_path / "reg"), "--model-version", "v4", "--dest", str(tmp_path / "s")]) == 0
    assert "SHA-256 verified" in capsys.readouterr().out
    assert fetch_main(["--registry", str(tmp_path / "reg"), "--model-version", "unset", "--dest", str(tmp_path / "s")]) == 1
    assert "error: model_version: unset is not published" in capsys.readouterr().err
