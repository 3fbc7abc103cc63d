"""Randomly initialised model folders and requests, for serving tests and benchmarks.

Latency does not depend on what the weights learned, so a benchmark may use an untrained
model of the right shape; tests use tiny ones. Item ids are 1000 + row so that ids and rows
never coincide by accident.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..actions import SYNTHETIC

ITEM_ID_OFFSET = 1000


def make_model_dir(out_dir: str | Path, *, kind: str = "unified", num_items: int = 500, d_model: int = 32,
                   n_layers: int = 2, n_heads: int = 2, max_history: int = 32, seed: int = 0,
                   time_gap: str = "previous", rank_similarity: bool = False) -> str:
    """Write a random-init model folder (checkpoint layout); returns its model_version."""
    import torch

    from ..batches import ItemVocab
    from ..checkpoint import save_model
    from ..config import DataConfig, ExperimentConfig, TaskConfig
    from ..model import ModelConfig, UniPinRec

    tasks = TaskConfig()
    mcfg = ModelConfig(num_items=num_items, num_actions=SYNTHETIC.size, num_tasks=len(tasks.tasks),
                       d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_history=max_history,
                       dropout=0.0, kind=kind, time_gap=time_gap, rank_similarity=rank_similarity)
    torch.manual_seed(seed)
    model = UniPinRec(mcfg).eval()
    with torch.no_grad():  # a wider spread than the 0.02 init, so that scores differ visibly
        model.item_emb.weight.normal_(0, 1.0)
        model.item_emb.weight[0].zero_()
        model.rank_head[-1].weight.normal_(0, 0.5)
        if model.rank_sim_weight is not None:  # else the user-item match term would start switched off
            model.rank_sim_weight.normal_(0, 0.5)
    config = ExperimentConfig(name=f"random-{kind}", data=DataConfig(source="synthetic", max_history=max_history),
                              tasks=tasks, model=mcfg)
    vocab = ItemVocab(np.arange(num_items, dtype=np.int64) + ITEM_ID_OFFSET)
    return save_model(out_dir, model, config, vocab)


def random_history(rng: np.random.Generator, length: int, num_items: int, start_ts: int = 1_700_000_000,
                   num_actions: int = SYNTHETIC.size) -> list[dict]:
    """A chronological history of `length` actions on random items, as request JSON."""
    items = rng.integers(0, num_items, size=length) + ITEM_ID_OFFSET
    actions = rng.integers(0, num_actions, size=length)
    ts = start_ts + np.cumsum(rng.integers(1, 600, size=length))
    return [{"item_id": int(i), "action": int(a), "ts": int(t)} for i, a, t in zip(items, actions, ts)]
