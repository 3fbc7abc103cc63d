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


def build_tiny_examples(root: Path, data=None, *, out: str = "ex", raw: bool = True, **build) -> Path:
    """configs/tiny.yaml's synthetic world (or `data`, a DataConfig) in root/raw, and its examples
    in root/<out> (`build`: more build_examples options, e.g. layout="sequences")."""
    from unipinrec.config import load_config
    from unipinrec.data import build_examples, generate_synthetic

    d = data if data is not None else load_config(REPO / "configs" / "tiny.yaml").data
    if raw:
        generate_synthetic(root / "raw", num_users=d.synthetic_users, num_items=d.synthetic_items,
                           num_requests_per_user=d.synthetic_requests_per_user, seed=d.synthetic_seed, progress=False)
    build_examples(root / "raw", root / out, max_history=d.max_history, progress=False, **build)
    return root / out


@pytest.fixture(scope="session")
def tiny_builder():
    """build_tiny_examples, for tests that need their own copy of the tiny examples."""
    return build_tiny_examples


@pytest.fixture(scope="session")
def train_tiny(tmp_path_factory):
    """train_tiny(**model_overrides) -> (model_dir, examples_dir): configs/tiny.yaml's synthetic data
    and model, trained in seconds on CPU; keywords replace fields of its ModelConfig."""
    import dataclasses

    import torch

    from unipinrec.config import load_config
    from unipinrec.train import train

    def make(**model_overrides):
        root = tmp_path_factory.mktemp("tiny")
        cfg = load_config(REPO / "configs" / "tiny.yaml")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_overrides))
        build_tiny_examples(root, cfg.data)
        torch.set_num_threads(1)
        train(cfg, root / "ex", root / "model", progress=False)
        return root / "model", root / "ex"

    return make
