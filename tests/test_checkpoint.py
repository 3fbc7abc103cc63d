from __future__ import annotations

import json

import pytest
import torch

from unipinrec.batches import ItemVocab, batch_histories
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
    h = batch_histories([[(101, 1, 5), (103, 2, 9)]], [20], vocab, 50)
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


def test_category_buffer_round_trips_and_is_in_the_version(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=5, num_actions=5, num_tasks=3, d_model=16, n_layers=1, n_heads=2,
                      max_history=50, use_category=True, num_categories=3)
    m = UniPinRec(cfg).eval()
    with torch.no_grad():
        m.category_emb.weight[1:].normal_(0, 1.0)
    m.set_item_categories([2, 0, 1, -1, 2])
    vocab = ItemVocab([101, 102, 103, 104, 105])
    version = save_model(tmp_path / "m", m, ExperimentConfig(), vocab)
    loaded = load_model(tmp_path / "m")
    assert loaded.config.model.use_category and loaded.config.model.num_categories == 3
    assert loaded.model.item_category.tolist() == [0, 3, 1, 2, 0, 3]  # row 0 and unknown -> padding
    assert torch.equal(loaded.model.item_vectors(), m.item_vectors())
    h = batch_histories([[(101, 1, 5), (104, 2, 9)]], [20], vocab, 50)
    with torch.no_grad():
        c1, c2 = m.encode_history(h)[1], loaded.model.encode_history(h)[1]
        assert torch.equal(m.rank(torch.tensor([[1, 5]]), c1), loaded.model.rank(torch.tensor([[1, 5]]), c2))
    # the categories are part of the content hash: other categories, other version
    m.set_item_categories([0, 0, 1, -1, 2])
    assert save_model(tmp_path / "m2", m, ExperimentConfig(), vocab) != version


def test_checkpoint_without_the_category_option_still_loads(tmp_path):
    """A model folder written before use_category existed: its config.yaml has no such keys."""
    from unipinrec.checkpoint import _version

    m = _model()
    vocab = ItemVocab([1, 2, 3, 4, 5])
    save_model(tmp_path / "m", m, ExperimentConfig(), vocab)
    cfg_path, meta_path = tmp_path / "m" / "config.yaml", tmp_path / "m" / "meta.json"
    old = "".join(line for line in cfg_path.read_text().splitlines(keepends=True)
                  if "use_category" not in line and "num_categories" not in line)
    assert old != cfg_path.read_text()
    cfg_path.write_text(old)
    meta = json.loads(meta_path.read_text())
    meta["model_version"] = _version((tmp_path / "m" / "model.safetensors").read_bytes(), old.encode())
    meta_path.write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "m")
    assert not loaded.config.model.use_category and loaded.model.category_emb is None
    assert "item_category" not in loaded.model.state_dict()
    assert torch.equal(loaded.model.item_vectors(), m.item_vectors())


def test_model_folder_with_mam_rate_in_the_model_section_still_loads(tmp_path):
    """A model folder written when mam_rate was a model setting: it loads, the value read as train.mam_rate."""
    import yaml

    from unipinrec.checkpoint import _version

    m = _model()
    save_model(tmp_path / "m", m, ExperimentConfig(), ItemVocab([1, 2, 3, 4, 5]))
    cfg_path, meta_path = tmp_path / "m" / "config.yaml", tmp_path / "m" / "meta.json"
    raw = yaml.safe_load(cfg_path.read_text())
    del raw["train"]["mam_rate"]
    raw["model"]["mam_rate"] = 0.3
    old = yaml.safe_dump(raw, sort_keys=False)
    cfg_path.write_text(old)
    meta = json.loads(meta_path.read_text())
    meta["model_version"] = _version((tmp_path / "m" / "model.safetensors").read_bytes(), old.encode())
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(DeprecationWarning, match="model.mam_rate moved to the train section"):
        loaded = load_model(tmp_path / "m")
    assert loaded.config.train.mam_rate == 0.3 and loaded.version == meta["model_version"]
    assert torch.equal(loaded.model.item_vectors(), m.item_vectors())


def _opt(m):
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        m.item_vectors().sum().backward()
        opt.step()
    return opt


def test_train_checkpoint_round_trips_model_optimizer_and_trainer_state(tmp_path):
    from unipinrec.checkpoint import TrainCheckpoint

    m = _model().train()
    opt = _opt(m)
    ck = TrainCheckpoint(tmp_path / "checkpoint", "fp1")
    assert not ck.exists()
    ck.save(7, m, opt, {"step": 7})
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 7
    m2 = _model(seed=1).train()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    assert ck.exists() and ck.load(m2, opt2) == {"step": 7}
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[p]["exp_avg"], s2[p]["exp_avg"]) for p in s1)
    assert all(float(s1[p]["step"]) == float(s2[p]["step"]) == 2 for p in s1)
    # a kill between the two renames leaves only checkpoint.old: it is read
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    assert ck.exists() and ck.load(m2, opt2) == {"step": 7}
    with pytest.raises(ValueError, match="different run"):
        TrainCheckpoint(tmp_path / "checkpoint", "fp2").load(m2, opt2)
