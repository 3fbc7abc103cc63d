"""Tiny random-init models and indexes shared by the serving tests (built once per session)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from unipinrec.serving.synthetic import make_model_dir

NUM_ITEMS, L = 300, 16


@dataclass
class TinyModels:
    unified: Path
    unified_index: Path
    retrieval: Path
    retrieval_index: Path
    ranking: Path
    request_time_model: Path  # time_gap "request"
    request_time_index: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    from unipinrec.index import build_index_for_model

    root = tmp_path_factory.mktemp("tiny-models")
    make_model_dir(root / "unified", num_items=NUM_ITEMS, max_history=L, seed=0)
    make_model_dir(root / "retrieval", kind="retrieval_only", num_items=NUM_ITEMS, max_history=L, seed=1)
    make_model_dir(root / "ranking", kind="ranking_only", num_items=NUM_ITEMS, max_history=L, seed=2)
    make_model_dir(root / "request_time", num_items=NUM_ITEMS, max_history=L, seed=3, time_gap="request")
    for name in ("unified", "retrieval", "request_time"):
        build_index_for_model(root / name, root / f"{name}-index", num_queries=50)
    return TinyModels(root / "unified", root / "unified-index", root / "retrieval", root / "retrieval-index",
                      root / "ranking", root / "request_time", root / "request_time-index")
