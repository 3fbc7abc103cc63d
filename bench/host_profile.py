"""Host time of the fused GPU request path on any machine: the engine's fused path with the device
work replaced by a stub that returns a precomputed output, so only the host's steps are timed
(resolve, windows, the batch's buffers, copies, launch bookkeeping, response dicts). For finding
where a request's host time goes without a GPU; the GPU figures are in docs/serving.md.

    python bench/host_profile.py [--batch 1 8] [--L 2048] [--C 256] [--cprofile]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_profile as gp  # noqa: E402
import serving_bench as sb  # noqa: E402

from unipinrec.serving import fused  # noqa: E402
from unipinrec.serving.request import parse_request  # noqa: E402


def stubbed(eng):
    """eng.fused with its run() answering from a cache per shape: no device work."""
    graphs = fused.FusedGraphs(eng)
    real, cache = graphs.run, {}

    def run(acts, seen_rows, cands, cached=None):
        key = (acts.batch_size, acts.width, seen_rows.shape[1], cands, cached is not None)
        if key not in cache:
            cache[key] = real(acts, seen_rows, cands, cached)
        return cache[key]

    graphs.run = run
    eng.fused = graphs
    return eng


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--C", type=int, default=256)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--cprofile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    ns = argparse.Namespace(d_model=32, layers=1, heads=2, items=20_000)
    paths = sb.make_models(Path(tempfile.mkdtemp()), a.L, ns)
    eng = sb.engines(paths, None, device="cpu", torch_index=True)
    print("| batch | mode | handle_batch ms (median) | per request ms | handle_stream ms per batch |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for B in a.batch:
            reqs = [parse_request(sb.columnar(b), eng["a"].limits) for b in sb.make_bodies(B, a.L, a.C, 20_000, 3)]
            for m in ("a", "c"):
                e = stubbed(eng[m])
                for _ in range(5):
                    e.handle_batch(reqs)
                lat = sb._timed(lambda: e.handle_batch(reqs), a.repeats, cuda=False)
                t = time.perf_counter()
                sb._drain(e.handle_stream([reqs] * a.repeats))
                per = (time.perf_counter() - t) * 1000 / a.repeats
                med = float(np.median(lat))
                print(f"| {B} | {m} | {med:.3f} | {med / B:.3f} | {per:.3f} |", flush=True)
                if a.cprofile and m == "a":
                    gp.cprofiled(lambda: e.handle_batch(reqs), 100, f"handle_batch, batch {B}, mode a", rows=25)


if __name__ == "__main__":
    main()
