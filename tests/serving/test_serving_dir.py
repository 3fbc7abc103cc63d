"""Where the TorchServe files (handler, configs) are found: repository, then ./serving."""
from __future__ import annotations

import pytest

from unipinrec.serving import torchserve
from unipinrec.serving.torchserve import SERVING_FILES, ServeError, serving_dir


def test_repository_serving_folder_is_found(repo_root):
    assert serving_dir() == repo_root / "serving"


def test_falls_back_to_working_directory_when_the_package_is_installed(tmp_path, monkeypatch):
    # as in the images: the package lives in site-packages, serving/ beside the working directory
    monkeypatch.setattr(torchserve, "REPO_SERVING_DIR", tmp_path / "site-packages" / "serving")
    (tmp_path / "work" / "serving").mkdir(parents=True)
    for name in SERVING_FILES:
        (tmp_path / "work" / "serving" / name).write_text("")
    monkeypatch.chdir(tmp_path / "work")
    assert serving_dir() == tmp_path / "work" / "serving"


def test_missing_file_is_named(tmp_path):
    (tmp_path / "handler.py").write_text("")
    with pytest.raises(ServeError, match="config.properties is missing"):
        serving_dir(tmp_path)
