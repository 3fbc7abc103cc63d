"""ModelConfig: importable without torch; what each kind's heads are."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from unipinrec.model_config import KINDS, ModelConfig

REPO = Path(__file__).resolve().parents[1]


def test_model_config_and_experiment_config_import_without_torch():
    code = ("import sys; import unipinrec.model_config, unipinrec.config; "
            "from unipinrec.config import load_config; c = load_config(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(c.model.kind)")
    r = subprocess.run([sys.executable, "-c", code, str(REPO / "configs" / "tiny.yaml")], capture_output=True,
                       text=True, timeout=60, env={"PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "unified"


def test_model_module_re_exports_the_config():
    from unipinrec import model

    assert model.ModelConfig is ModelConfig and model.KINDS is KINDS


@pytest.mark.parametrize("kind, retrieval, ranking, mam, tokens", [
    ("unified", True, True, True, 1),
    ("retrieval_only", True, False, False, 1),
    ("ranking_only", False, True, True, 1),
    ("interleaved", True, True, False, 2),
])
def test_heads_of_each_kind(kind, retrieval, ranking, mam, tokens):
    cfg = ModelConfig(kind=kind)
    assert (cfg.has_retrieval_head, cfg.has_ranking_head, cfg.uses_mam, cfg.tokens_per_action) == \
        (retrieval, ranking, mam, tokens)


def test_training_settings_are_not_model_settings():
    from dataclasses import fields

    from unipinrec.config import TrainConfig

    names = {f.name for f in fields(ModelConfig)}
    assert "mam_rate" not in names and "alpha" not in names
    assert TrainConfig().mam_rate == 0.15
    with pytest.raises(ValueError, match="mam_rate"):
        TrainConfig(mam_rate=1.0).validate()
