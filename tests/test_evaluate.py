from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unipinrec.config import load_config
from unipinrec.evaluate import auc, grouped_auc, retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.3
    s = rng.integers(0, 6, 60).astype(float)  # many ties
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(s[y], s[~y])]
    assert auc(y, s) == pytest.approx(np.mean(pairs))
    assert auc(np.ones(3), np.arange(3)) is None
    assert auc([0, 1], [0.2, 0.9]) == 1.0


def test_grouped_auc_weights_groups_and_skips_one_class_groups():
    g = np.array([1, 1, 1, 2, 2, 3])
    y = np.array([1, 0, 0, 0, 1, 1])
    s = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.5])
    assert grouped_auc(g, y, s) == pytest.approx((1.0 * 3 + 0.0 * 2) / 5)


def test_retrieval_metrics_ranks_and_exclusion():
    scores = torch.tensor([[-np.inf, 0.9, 0.8, 0.7, 0.1],
                           [-np.inf, 0.9, -np.inf, 0.5, 0.6]])
    positives = torch.tensor([[3, 0], [3, 1]])
    mask = torch.tensor([[True, False], [True, True]])
    m = retrieval_metrics(scores, positives, mask, [1, 3])
    # row 0: item 3 has rank 3. row 1: item 1 rank 1, item 3 rank 3 (item 2 excluded)
    assert m["HR@1"].tolist() == [0.0, 1.0]
    assert m["HR@3"].tolist() == [1.0, 1.0]
    assert m["NDCG@3"][0] == pytest.approx(1 / np.log2(4))
    idcg = 1 + 1 / np.log2(3)
    assert m["NDCG@3"][1] == pytest.approx((1 + 1 / np.log2(4)) / idcg)
    assert m["recall@1"].tolist() == [0.0, 0.5]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from unipinrec.data import build_examples, generate_synthetic
    from unipinrec.train import train

    root = tmp_path_factory.mktemp("eval")
    cfg = load_config(TINY)
    generate_synthetic(root / "raw", num_users=cfg.data.synthetic_users, num_items=cfg.data.synthetic_items,
                       num_requests_per_user=cfg.data.synthetic_requests_per_user, seed=cfg.data.synthetic_seed, progress=False)
    build_examples(root / "raw", root / "ex", max_history=cfg.data.max_history, progress=False)
    torch.set_num_threads(1)
    train(cfg, root / "ex", root / "model", progress=False)
    return root / "model", root / "ex"


def test_evaluate_cli_writes_metrics_and_curves(tiny_model, tmp_path):
    model, ex = tiny_model
    out = tmp_path / "metrics.json"
    r = subprocess.run([sys.executable, "-c", "from unipinrec.cli import main; main()", "evaluate", "--model", str(model),
                        "--examples", str(ex), "--out", str(out), "--no-progress"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert m["kind"] == "unified" and m["split"] == "test" and m["num_examples"] == 60
    for k in ("HR@10", "NDCG@10", "HR@50", "recall@100"):
        assert 0.0 <= m["retrieval"][k] <= 1.0 and 0.0 <= m["popularity"][k] <= 1.0
    assert m["retrieval"]["HR@10"] <= m["retrieval"]["HR@50"]
    assert set(m["ranking"]) == {"engaged", "saved", "hidden"}
    assert m["oracle"]["matched_impressions"] == m["ranking"]["engaged"]["num_impressions"] > 0
    assert 0.5 < m["oracle"]["engaged"]["auc"] <= 1.0  # the generator's probabilities rank its own draws
    assert out.with_suffix(".png").stat().st_size > 1000


def test_evaluate_fails_cleanly_on_a_missing_model(tmp_path, tiny_model):
    _, ex = tiny_model
    r = subprocess.run([sys.executable, "-c", "from unipinrec.cli import main; main()", "evaluate", "--model",
                        str(tmp_path / "nope"), "--examples", str(ex), "--out", str(tmp_path / "m.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "model.safetensors" in r.stderr


def test_new_item_retrieval_is_scored_with_history_removed(tiny_model):
    from unipinrec import format as fmt
    from unipinrec.batches import TaskSpec
    from unipinrec.actions import vocab_for
    from unipinrec.checkpoint import load_model
    from unipinrec.evaluate import evaluate_model

    model_dir, ex = tiny_model
    loaded = load_model(model_dir, "cpu")
    spec = TaskSpec.resolve(loaded.tasks, vocab_for("synthetic"))
    L = loaded.model.config.max_history
    kept = evaluate_model(loaded.model, loaded.vocab, spec, ex, progress=False, exclude_history=False, popularity=True)
    excluded = evaluate_model(loaded.model, loaded.vocab, spec, ex, progress=False, exclude_history=True)
    assert "retrieval_new_items" not in excluded
    # by hand: test examples with a positive slate item that is not in their (last L) history
    expected = 0
    for r in fmt.read_sharded(ex / "test").to_pylist():
        hist = {a["item_id"] for a in r["history"][-L:]}
        expected += any(spec.positive[a["action"]] and a["item_id"] not in hist for a in r["slate"])
    assert expected > 0
    assert kept["retrieval_new_items"]["num_examples"] == expected == kept["popularity_new_items"]["num_examples"]
    for k in ("HR@10", "recall@100"):
        assert 0.0 <= kept["retrieval_new_items"][k] <= 1.0
