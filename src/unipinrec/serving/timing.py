"""Stage timings of one engine call (CUDA-synchronised on a GPU, so a stage's time is its own)."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StageTimer:
    def __init__(self, device: torch.device):
        self.ms: dict[str, float] = {}
        self.cuda = device.type == "cuda"
        self.t0 = time.perf_counter()

    @contextmanager
    def stage(self, name: str, sync: bool = True):
        """sync=False: a stage that waits for its own device work (no device-wide wait around it)."""
        sync = sync and self.cuda
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t) * 1000

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 3) for k, v in self.ms.items()}, "total": round(self.elapsed_ms(), 3)}
