from __future__ import annotations

from pathlib import Path

import pytest

from unipinrec.config import ConfigError, ExperimentConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_expected_configs_exist():
    assert {"tiny.yaml", "synthetic.yaml", "ml1m.yaml", "ml1m-large.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_says_how_to_run_it(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "unipinrec train --config configs/" + path.name in first


def test_ml1m_configs_use_hstu_settings():
    for name, layers in (("ml1m.yaml", 2), ("ml1m-large.yaml", 8)):
        cfg = load_config(next(p for p in CONFIGS if p.name == name))
        assert (cfg.model.max_history, cfg.model.d_model, cfg.model.n_layers) == (200, 50, layers)
        assert cfg.model.temperature == 0.05 and cfg.train.batch_size == 128
        assert cfg.train.num_uniform_negatives == 128 or cfg.train.full_softmax
        # our epoch holds ~2.4 windows per user: 40 epochs ~ HSTU's 101 in optimizer steps
        assert cfg.train.epochs >= (40 if cfg.train.full_softmax else 90)
        assert cfg.data.source == "movielens-1m" and list(cfg.tasks.tasks) == ["liked"]


def test_bad_values_name_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {n_heads: 3, d_model: 50}\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(p)
    p.write_text("model: {max_history: 20}\n")
    with pytest.raises(ConfigError, match="max_history"):
        load_config(p)
    p.write_text("train: {lr: 0}\n")
    with pytest.raises(ConfigError, match="lr"):
        load_config(p)
