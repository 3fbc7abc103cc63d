"""Host time of the fused GPU request path on any machine: the engine's fused path with the device
work replaced by a stub that returns a precomputed output, so only the host's steps are timed
(resolve, windows, the batch's buffers, copies, launch bookkeeping, response dicts). For finding
where a request's host time goes without a GPU; the GPU figures are in docs/serving.md.

    python bench/host_profile.py [--batch 1 8] [--L 2048] [--C 256] [--cprofile]
    python bench/host_profile.py --gc --batch 1 8 64 --repeats 400   # garbage collector pauses, before / after settle_heap
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
from unipinrec.serving.engine import settle_heap  # noqa: E402
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


class GCPauses:
    """The garbage collector's pauses, from its own callbacks: (generation, ms) each."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((info["generation"], (time.perf_counter() - self._t0) * 1e3))


def gc_table(eng, batches: list[int], L: int, C: int, repeats: int) -> None:
    """handle_batch's host time with the collector's pauses, before and after settle_heap (what
    the servers do once loaded): the same engine, requests and repeats."""
    import gc

    pauses = GCPauses()
    gc.callbacks.append(pauses)
    print("| batch | heap | objects walked | host ms p50 | p99 | max | full collections | longest pause ms | GC ms per batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        gc.unfreeze()  # sb.engines settled the heap, as a server does: undo it for the first rows
        for heap in ("as loaded", "settled"):
            if heap == "settled":
                settle_heap()
            for B in batches:
                reqs = [parse_request(sb.columnar(b), eng.limits) for b in sb.make_bodies(B, L, C, 20_000, 3)]
                eng.handle_batch(reqs)
                pauses.pauses.clear()
                lat = np.asarray(sb._timed(lambda: eng.handle_batch(reqs), repeats, cuda=False))
                full = [ms for g, ms in pauses.pauses if g == 2]
                print(f"| {B} | {heap} | {len(gc.get_objects()):,} | {np.median(lat):.3f} | {np.percentile(lat, 99):.3f} | "
                      f"{lat.max():.2f} | {len(full)} | {max([ms for _, ms in pauses.pauses], default=0):.1f} | "
                      f"{sum(ms for _, ms in pauses.pauses) / repeats:.3f} |", flush=True)
    gc.callbacks.remove(pauses)
    gc.unfreeze()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--C", type=int, default=256)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--gc", action="store_true", help="the garbage collector's pauses, before / after settle_heap")
    a = p.parse_args()
    torch.set_num_threads(1)
    ns = argparse.Namespace(d_model=32, layers=1, heads=2, items=20_000)
    paths = sb.make_models(Path(tempfile.mkdtemp()), a.L, ns)
    eng = sb.engines(paths, None, device="cpu", torch_index=True)
    if a.gc:
        return gc_table(stubbed(eng["a"]), a.batch, a.L, a.C, a.repeats)
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
