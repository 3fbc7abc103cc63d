"""`index build --examples`: real held-out user vectors as tuning queries and a popularity list
for cold starts, on a small synthetic dataset (unified format end to end)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from unipinrec.index import ItemIndex, build_index_for_model


@pytest.fixture(scope="module")
def examples_and_model(tmp_path_factory):
    import torch

    from unipinrec.batches import ItemVocab
    from unipinrec.checkpoint import save_model
    from unipinrec.config import DataConfig, ExperimentConfig, TaskConfig
    from unipinrec.data import build_examples, generate_synthetic
    from unipinrec.data.synthetic import SyntheticConfig
    from unipinrec.model import ModelConfig, UniPinRec

    root = tmp_path_factory.mktemp("ex-index")
    generate_synthetic(root / "raw", SyntheticConfig(num_users=120, num_items=200, num_requests_per_user=5),
                       progress=False)
    build_examples(root / "raw", root / "ex", max_history=16, progress=False)
    vocab = ItemVocab.from_examples_dir(root / "ex")
    tasks = TaskConfig()
    mcfg = ModelConfig(num_items=len(vocab), num_actions=5, num_tasks=len(tasks.tasks), d_model=16, n_layers=1,
                       n_heads=2, max_history=16, dropout=0.0)
    torch.manual_seed(0)
    save_model(root / "model", UniPinRec(mcfg).eval(), ExperimentConfig(data=DataConfig(max_history=16), tasks=tasks,
                                                                        model=mcfg), vocab)
    return root / "ex", root / "model", vocab


def test_index_from_examples_uses_user_vectors_and_writes_popularity(examples_and_model, tmp_path):
    ex, model, vocab = examples_and_model
    report = build_index_for_model(model, tmp_path / "idx", examples_dir=ex, num_queries=100)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["queries"] == "examples" and report.recall_at_k == 1.0
    pop = np.load(tmp_path / "idx" / "popularity.npy")
    index = ItemIndex.load(tmp_path / "idx")
    assert pop.shape == (len(index.item_ids),) and pop.sum() > 0
    # the counts are those of the train histories, aligned with ids.npy
    from unipinrec.format import read_sharded

    flat = [a["item_id"] for h in read_sharded(ex / "train", columns=["history"]).column("history").to_pylist()
            for a in h]
    ids, counts = np.unique(flat, return_counts=True)
    want = dict(zip(ids.tolist(), counts.tolist()))
    got = dict(zip(index.item_ids.tolist(), pop.tolist()))
    assert all(got[i] == want.get(i, 0) for i in got)


def test_engine_cold_start_follows_the_popularity_list(examples_and_model, tmp_path):
    from unipinrec.serving.engine import Engine

    ex, model, _ = examples_and_model
    build_index_for_model(model, tmp_path / "idx", examples_dir=ex, num_queries=50)
    engine = Engine.from_dirs(model, tmp_path / "idx")
    index = ItemIndex.load(tmp_path / "idx")
    pop = np.load(tmp_path / "idx" / "popularity.npy")
    top = set(index.item_ids[np.argsort(-pop, kind="stable")[:10]].tolist())
    resp = engine.handle({"user_id": 1, "history": [], "k": 10, "num_candidates": 10})
    assert {it["item_id"] for it in resp["items"]} == top
