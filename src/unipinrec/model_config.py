"""The model's config section, importable without torch (config loading, CLI checks, serving glue).

`ModelConfig` says what the model *is* (sizes, token features, architecture `kind`); how it is
trained (MAM rate, loss weights, negatives) lives in `config.TrainConfig`. `model.py` re-exports
both names, so `from unipinrec.model import ModelConfig` keeps working.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

KINDS = ("unified", "retrieval_only", "ranking_only", "interleaved")

# keys that left ModelConfig for TrainConfig; old model folders still carry them (upgrade_config)
MOVED_TO_TRAIN = ("mam_rate",)


@dataclass
class ModelConfig:
    num_items: int = 0  # N: item rows 1..N, row 0 = padding. 0 in a config file = from the data
    num_actions: int = 0  # action vocabulary size; MASK is the extra id num_actions. 0 = from the data
    num_tasks: int = 0  # T ranking tasks; 0 = from the task config
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_history: int = 50  # L
    mlp_ratio: int = 4
    dropout: float = 0.1
    time_buckets: int = 64  # log buckets of half a binary order each: 64 covers 2^32 s
    time_gap: Literal["previous", "request"] = "previous"
    use_surface: bool = False
    num_surfaces: int = 16
    # retrieval softmax temperature over cosine similarities; also scales the rank_similarity term at serving
    temperature: float = 0.05
    # > 0: candidate tokens carry an embedding of their slate position (clipped to this many), so
    # training absorbs position bias; serving ranks every candidate at position 0 unless told
    slate_positions: int = 0
    # item category (items table `category`: topic / first genre) embedded into every item token and
    # added to the retrieval item vectors: items of a sparse id share what their category has learnt
    use_category: bool = False
    num_categories: int = 0  # category ids 0..num_categories-1; 0 in a config file = from the data
    # add w_t * cos(user vector, candidate item vector) / temperature to each task's logit: the
    # retrieval tower's user-item match, which an MLP over the candidate token only approximates
    # (it cannot multiply interest by topic), handed to the ranker; w_t starts at 0
    rank_similarity: bool = False
    kind: Literal["unified", "retrieval_only", "ranking_only", "interleaved"] = "unified"

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "max_history", "mlp_ratio", "time_buckets", "num_surfaces"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("num_items", "num_actions", "num_tasks", "slate_positions", "num_categories"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = taken from the data)")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.time_gap not in ("previous", "request"):
            raise ValueError(f"time_gap {self.time_gap!r} is not one of previous, request")
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {list(KINDS)}")

    @property
    def mask_action(self) -> int:
        return self.num_actions

    @property
    def tokens_per_action(self) -> int:
        return 2 if self.kind == "interleaved" else 1

    @property
    def has_retrieval_head(self) -> bool:
        """Trained for retrieval: its user and item vectors are meaningful (an index can be built)."""
        return self.kind != "ranking_only"

    @property
    def has_ranking_head(self) -> bool:
        """Trained for ranking: `rank` gives task logits."""
        return self.kind != "retrieval_only"

    @property
    def uses_mam(self) -> bool:
        """Masked action modeling in training (the interleaved ablation ranks from item tokens instead)."""
        return self.kind in ("unified", "ranking_only")


def upgrade_config(raw: dict, where: Path | str = "config.yaml") -> dict:
    """An ExperimentConfig mapping of an older release -> today's: keys that moved from `model`
    to `train` (MOVED_TO_TRAIN) are moved, with a DeprecationWarning; train's own value wins.
    checkpoint.load_model reads old model folders through it."""
    model = raw.get("model")
    moved = [k for k in MOVED_TO_TRAIN if isinstance(model, dict) and k in model]
    if not moved:
        return raw
    warnings.warn(f"{where}: {', '.join(f'model.{k}' for k in moved)} moved to the train section "
                  f"({', '.join(f'train.{k}' for k in moved)}); read as such", DeprecationWarning, stacklevel=2)
    model = dict(model)
    train = dict(raw.get("train") or {})
    for k in moved:
        value = model.pop(k)
        train.setdefault(k, value)
    return {**raw, "model": model, "train": train}
