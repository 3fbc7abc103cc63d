"""The TorchServe handler puts the engine on the GPU TorchServe assigned its worker (gpu_id)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

HANDLER = Path(__file__).resolve().parents[2] / "serving" / "handler.py"


def load_handler():
    spec = importlib.util.spec_from_file_location("unipinrec_ts_handler", HANDLER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_engine_device_follows_the_assigned_gpu(monkeypatch):
    h = load_handler()
    cfg = {"handler": {"engine": {"kv_cache_bytes": 5}}, "batchSize": 8}
    assert h.with_assigned_gpu(cfg, {"model_dir": "/m"}) is cfg  # no GPU assigned: CPU as configured
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    out = h.with_assigned_gpu(cfg, {"model_dir": "/m", "gpu_id": "1"})
    assert out["handler"]["engine"] == {"kv_cache_bytes": 5, "device": "cuda:1"} and out["batchSize"] == 8
    assert chosen == [1] and "device" not in cfg["handler"]["engine"]  # the caller's dict is untouched
    pinned = {"handler": {"engine": {"device": "cpu"}}}
    assert h.with_assigned_gpu(pinned, {"gpu_id": 0}) is pinned  # a device named in the config wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert h.with_assigned_gpu(cfg, {"gpu_id": 0}) is cfg  # a gpu_id without CUDA: stay on the CPU
