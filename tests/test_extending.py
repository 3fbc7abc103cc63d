"""docs/extending.md followed literally: a per-action `device` field added by subclassing
(Actions + UniPinRec), carried by the examples, trained, served in-process, and the KV-cache
exactness of record checked with it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn as nn

from unipinrec import format as fmt
from unipinrec.config import load_config
from unipinrec.model import UniPinRec
from unipinrec.sequences import Actions, History, action_field

REPO = Path(__file__).resolve().parents[1]
NUM_DEVICES = 4


# --- step 1: declare the field --------------------------------------------------------------

@dataclasses.dataclass(kw_only=True)
class DeviceActions(Actions):
    devices: torch.Tensor = action_field("device", default=0)  # (B, W) device id of each action


# --- step 2: embed it -------------------------------------------------------------------------

class DeviceUniPinRec(UniPinRec):
    actions_type = DeviceActions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.device_emb = nn.Embedding(NUM_DEVICES, cfg.d_model)
        nn.init.normal_(self.device_emb.weight, std=0.02)

    def _action_features(self, history, pos, gaps):
        return super()._action_features(history, pos, gaps) + self.device_emb(history.devices.clamp(0, NUM_DEVICES - 1))


# --- step 3: the data carries it --------------------------------------------------------------

DEVICE_ACTION = pa.struct([*fmt.ACTION_TYPE, pa.field("device", pa.int8(), nullable=False)])
DEVICE_SCHEMA = fmt.UNIFIED_EXAMPLE_SCHEMA.set(
    fmt.UNIFIED_EXAMPLE_SCHEMA.get_field_index("history"), pa.field("history", pa.list_(DEVICE_ACTION), nullable=False))


def device_of(item_id: int, ts: int) -> int:
    return (item_id + ts // 3600) % NUM_DEVICES


def add_devices(split_dir: Path) -> None:
    rows = fmt.read_sharded(split_dir).to_pylist()
    for r in rows:
        for a in r["history"]:
            a["device"] = device_of(a["item_id"], a["ts"])
    for p in fmt.shard_paths(split_dir):
        p.unlink()
    fmt.write_sharded(split_dir, pa.Table.from_pylist(rows, schema=DEVICE_SCHEMA), DEVICE_SCHEMA)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_builder):
    from unipinrec.index import build_index_for_model
    from unipinrec.train import train

    root = tmp_path_factory.mktemp("extending")
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    tiny_builder(root, cfg.data)
    for split in fmt.SPLITS:
        add_devices(root / "ex" / split)
    torch.set_num_threads(1)
    train(cfg, root / "ex", root / "model", progress=False, model_cls=DeviceUniPinRec)  # step 4: train
    build_index_for_model(root / "model", root / "index", model_cls=DeviceUniPinRec)
    return root


def test_the_field_reaches_the_batches_and_is_learnt(trained):
    from unipinrec.checkpoint import load_model

    loaded = load_model(trained / "model", model_cls=DeviceUniPinRec)
    emb = loaded.model.device_emb.weight.detach()
    torch.manual_seed(0)
    assert not torch.allclose(emb, nn.init.normal_(torch.empty_like(emb), std=0.02), atol=1e-3)
    batch = fmt.read_sharded(trained / "ex" / "test").slice(0, 8)
    from unipinrec.actions import SYNTHETIC
    from unipinrec.batches import TaskSpec, collate_examples

    spec = TaskSpec.resolve(loaded.tasks, SYNTHETIC)
    tb = collate_examples(batch, loaded.vocab, spec, loaded.model.config.max_history, actions_type=DeviceActions)
    assert isinstance(tb.history, DeviceActions) and int(tb.history.devices.max()) > 0
    with torch.no_grad():
        u1, _ = loaded.model.encode_history(tb.history)
        u2, _ = loaded.model.encode_history(dataclasses.replace(tb.history, devices=(tb.history.devices + 1) % NUM_DEVICES))
    assert (u1 - u2).abs().max() > 1e-4  # the model reads the new field


def test_kv_cache_exactness_with_the_field(trained):
    from unipinrec.checkpoint import load_model

    m = load_model(trained / "model", model_cls=DeviceUniPinRec).model.double()
    g = torch.Generator().manual_seed(3)
    B, W = 3, 10
    h = DeviceActions(items=torch.randint(1, m.config.num_items + 1, (B, W), generator=g),
                      actions=torch.randint(0, m.config.num_actions, (B, W), generator=g),
                      ts=torch.cumsum(torch.randint(1, 5000, (B, W), generator=g), 1),
                      surfaces=torch.zeros(B, W, dtype=torch.long),
                      devices=torch.randint(0, NUM_DEVICES, (B, W), generator=g),
                      lengths=torch.tensor([10, 7, 4]), request_ts=torch.full((B,), 10**6))
    cand = torch.randint(1, m.config.num_items + 1, (B, 5), generator=g)
    with torch.no_grad():
        u_full, kv_full = m.encode_history(h)
        first = dataclasses.replace(h, lengths=h.lengths.clamp(max=3)).trim()
        rest = h.index_select([0, 1, 2])
        n_new = h.lengths - first.lengths
        new = DeviceActions(**{f: torch.stack([getattr(rest, f)[b, 3:3 + int(n_new.max())] for b in range(B)])
                               for f in DeviceActions.per_action_fields()}, lengths=n_new, request_ts=h.request_ts)
        _, kv_first = m.encode_history(first)
        u_ext, kv_ext = m.extend_history(kv_first, new)
        assert torch.allclose(u_ext, u_full, atol=1e-10)
        assert torch.allclose(m.rank(cand, kv_ext), m.rank(cand, kv_full), atol=1e-10)
        assert isinstance(kv_ext.history, DeviceActions) and torch.equal(kv_ext.history.devices, h.devices * h.valid)
        out = m.blended_forward(h, cand)  # the training forward: slate tokens see the history and themselves
        logits = m.rank_head(out.slate_hidden)
        assert torch.allclose(logits, m.rank(cand, kv_full), atol=1e-10)


def test_served_in_process_with_the_field(trained):
    from unipinrec.serving.engine import Engine
    from unipinrec.serving.request import ServingError, parse_request

    eng = Engine.from_dirs(trained / "model", trained / "index", model_cls=DeviceUniPinRec)
    test = fmt.read_sharded(trained / "ex" / "test").slice(0, 1).to_pylist()[0]
    body = {"user_id": test["user_id"], "history": test["history"], "request_ts": test["request_ts"], "k": 5,
            "num_candidates": 30}  # step 5: the request carries `device` per action
    served = eng.handle(body)
    other = eng.handle({**body, "history": [{**a, "device": (a["device"] + 1) % NUM_DEVICES} for a in body["history"]]})
    assert [it["score"] for it in served["items"]] != [it["score"] for it in other["items"]]
    h = History.from_actions(body["history"], DeviceActions)
    assert h.devices.tolist() == [a["device"] for a in body["history"]]
    with pytest.raises(ServingError) as e:
        parse_request({**body, "history": [{**body["history"][0], "devise": 1}]}, eng.limits)
    assert e.value.status == 422 and e.value.field == "history[0].devise"
