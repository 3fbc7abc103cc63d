from __future__ import annotations

import json

import pytest
import torch

from unipinrec.batches import HistoryBatch, ItemVocab
from unipinrec.checkpoint import load_model, save_model
from unipinrec.config import ExperimentConfig, TaskConfig
from unipinrec.model import ModelConfig, UniPinRec


def _model(seed=0, kind="unified"):
    torch.manual_seed(seed)
    cfg = ModelConfig(num_items=5, num_actions=5, num_tasks=3, d_model=16, n_layers=1, n_heads=2,
                      max_history=50, kind=kind)
    return UniPinRec(cfg).eval()


def test_save_load_roundtrip_is_exact_and_versioned(tmp_path):
    m = _model()
    vocab = ItemVocab([101, 102, 103, 104, 105])
    cfg = ExperimentConfig(name="t")
    version = save_model(tmp_path / "m", m, cfg, vocab, TaskConfig(), "unified")
    assert len(version) == 16
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.yaml", "items.parquet", "meta.json", "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["model_version"] == version and meta["kind"] == "unified"
    assert meta["tasks"] == ["engaged", "saved", "hidden"] and meta["actions"][0] == "impression"

    loaded = load_model(tmp_path / "m")
    assert loaded.version == version and loaded.kind == "unified" and not loaded.model.training
    assert loaded.vocab.item_ids.tolist() == [101, 102, 103, 104, 105]
    assert loaded.task_names == ["engaged", "saved", "hidden"]
    assert loaded.config.model.num_items == 5
    h = HistoryBatch.from_histories([[(101, 1, 5), (103, 2, 9)]], [20], vocab, 50)
    with torch.no_grad():
        u1, c1 = m.encode_history(h)
        u2, c2 = loaded.model.encode_history(h)
        assert torch.equal(u1, u2)
        assert torch.equal(m.rank(torch.tensor([[1, 2]]), c1), loaded.model.rank(torch.tensor([[1, 2]]), c2))

    # same content -> same version; different weights -> different version
    assert save_model(tmp_path / "m2", m, cfg, vocab, TaskConfig(), "unified") == version
    assert save_model(tmp_path / "m3", _model(seed=1), cfg, vocab, TaskConfig(), "unified") != version


def test_load_detects_tampering_and_missing_files(tmp_path):
    m = _model()
    vocab = ItemVocab([1, 2, 3, 4, 5])
    save_model(tmp_path / "m", m, ExperimentConfig(), vocab)
    cfg_path = tmp_path / "m" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("dropout: 0.1", "dropout: 0.2"))
    with pytest.raises(ValueError, match="content hash"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "items.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="items.parquet"):
        load_model(tmp_path / "m")


def test_save_rejects_mismatches(tmp_path):
    m = _model()
    with pytest.raises(ValueError, match="vocabulary has 2 items"):
        save_model(tmp_path / "m", m, ExperimentConfig(), ItemVocab([1, 2]))
    with pytest.raises(ValueError, match="does not match"):
        save_model(tmp_path / "m", m, ExperimentConfig(), ItemVocab([1, 2, 3, 4, 5]), kind="interleaved")


def test_weights_file_is_safetensors_not_pickle(tmp_path):
    save_model(tmp_path / "m", _model(kind="retrieval_only"), ExperimentConfig(), ItemVocab([1, 2, 3, 4, 5]))
    head = (tmp_path / "m" / "model.safetensors").read_bytes()[:8]
    assert int.from_bytes(head, "little") > 0  # safetensors: little-endian header length, then JSON
    assert (tmp_path / "m" / "model.safetensors").read_bytes()[8:9] == b"{"
    assert load_model(tmp_path / "m").kind == "retrieval_only"
