"""What one CUDA call costs the host on this machine (the GPU machine runs under gVisor, where a
driver call is a trapped system call): the calls a fused batch makes, each timed alone with the
device idle (median microseconds of the host's clock around the call).

    python bench/cuda_call_cost.py
"""
from __future__ import annotations

import time

import numpy as np
import torch


def host_us(fn, n: int = 2000) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return float(np.median(out)) * 1e6


def main():
    ev = torch.cuda.Event()
    ev.record()
    torch.cuda.synchronize()
    host = torch.zeros(65552, dtype=torch.long, pin_memory=True)  # a batch of 8 x 2,048 actions
    dev = torch.zeros_like(host, device="cuda")
    small_h, small_d = torch.zeros(18, dtype=torch.long, pin_memory=True), torch.zeros(18, dtype=torch.long, device="cuda")
    rows = {"torch.cuda.synchronize() (idle)": torch.cuda.synchronize,
            "Event() made and recorded": lambda: torch.cuda.Event().record(),
            "event.record() (made before)": ev.record,
            "event.synchronize() (done)": ev.synchronize,
            "event.query() (done)": ev.query,
            "copy_ 144 B host -> device (pinned, non_blocking)": lambda: small_d.copy_(small_h, non_blocking=True),
            "copy_ 512 KiB host -> device (pinned, non_blocking)": lambda: dev.copy_(host, non_blocking=True),
            "copy_ 144 B device -> host (pinned, non_blocking)": lambda: small_h.copy_(small_d, non_blocking=True),
            "torch.empty(18, pin_memory=True)": lambda: torch.empty(18, dtype=torch.long, pin_memory=True),
            "a tiny kernel (x.add_(1))": lambda: small_d.add_(1)}
    print("| call | host us (median) |")
    print("|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {host_us(fn):.1f} |", flush=True)


if __name__ == "__main__":
    main()
