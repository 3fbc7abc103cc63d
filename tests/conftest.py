"""Shared fixtures. Environment variables are read here, once, at the edge of the tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNIPINREC_SHARED_DIR", REPO.parent / "shared"))
DATA_DIR = Path(os.environ.get("UNIPINREC_DATA_DIR", SHARED / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set UNIPINREC_DATA_DIR / UNIPINREC_SHARED_DIR); "
                    "MovieLens is not redistributed with the project")
    return path


@pytest.fixture(scope="session")
def ml1m_dir() -> Path:
    return _require(DATA_DIR / "movielens-1m", "MovieLens-1M")


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    return _require(DATA_DIR / "movielens-100k", "MovieLens-100K")


@pytest.fixture(scope="session")
def trainer_dir() -> Path:
    return _require(SHARED / "kubeflow-trainer" / "trainer.kubeflow.org_trainjobs.yaml", "Kubeflow Trainer CRD test data").parent


@pytest.fixture(scope="session")
def kserve_crd() -> Path:
    return _require(SHARED / "kserve" / "serving.kserve.io_inferenceservices.yaml", "KServe CRD test data")
