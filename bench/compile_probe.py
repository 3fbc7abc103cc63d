"""Probe: the fused serving graph (fused.serve_fn) captured eagerly vs after torch.compile
(inductor, static shapes), replay time per batch, plus compile seconds and the answers' difference.

    python bench/compile_probe.py [--batch 1 8 64]
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
from unipinrec.serving.graphs import _Graph  # noqa: E402


def compare(ref, got):
    """Packed fused outputs (rows, C, T + 3) -> (max |utility difference| over the (row, item)
    pairs both hold, mean overlap of the top-10 items by utility)."""
    fl = lambda x: x[..., :-1].to(torch.int32).view(torch.float32).cpu().numpy()  # noqa: E731
    fr, fg = fl(ref), fl(got)
    ir, ig = ref[..., -1].cpu().numpy(), got[..., -1].cpu().numpy()
    T = fr.shape[-1] - 2
    diffs, overlaps = [], []
    for b in range(ir.shape[0]):
        ur, ug = dict(zip(ir[b], fr[b, :, T])), dict(zip(ig[b], fg[b, :, T]))
        both = set(ur) & set(ug)
        diffs.append(max(abs(ur[i] - ug[i]) for i in both))
        top = lambda u: set(sorted(u, key=u.get, reverse=True)[:10])  # noqa: E731
        overlaps.append(len(top(ur) & top(ug)) / 10)
    return float(max(diffs)), float(np.mean(overlaps))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--mode", default="default")
    args = p.parse_args()
    ns = argparse.Namespace(d_model=256, layers=4, heads=4, items=20_000, repeats=30)
    paths = sb.make_models(Path(tempfile.mkdtemp()), 2048, ns)
    warm = tuple((B, 2048, 256) for B in args.batch)

    eng = sb.engines(paths, None, device="cuda", torch_index=True, graph_warmup=warm)
    torch._dynamo.config.cache_size_limit = 64
    with torch.inference_mode():
        for m in ("a", "c"):
            e = eng[m]
            r = e.retriever
            fargs = (e.ret.model, None if e.share_kv else e.rnk.model, r.index, r._row_to_pos, r._pos_to_row,
                     e.ranker.weights)
            for B in args.batch:
                (st_acts, st_seen, _, graph), = [v for k, v in e.fused.graphs.items() if k[0] == B and not k[-1]]
                eager = gp.events_ms(graph.replay)
                fn = lambda: fused.serve_fn(*fargs, st_acts, st_seen, 256)  # noqa: E731
                cfn = torch.compile(fn, dynamic=False, mode=None if args.mode == "default" else args.mode)
                t = time.perf_counter()
                ref = fn()[1].clone()
                got = cfn()[1]
                torch.cuda.synchronize()
                comp_s = time.perf_counter() - t
                cg = _Graph(cfn)
                comp = gp.events_ms(cg.replay)
                diff, overlap = compare(ref[:B], got[:B])
                print(f"mode {m} batch {B}: eager graph {eager:.3f} ms, compiled graph {comp:.3f} ms "
                      f"({eager / comp:.2f}x), compile {comp_s:.1f} s; utility of the items both return: max "
                      f"|diff| {diff:.2e}; top-10 by utility overlap {overlap:.3f}", flush=True)


if __name__ == "__main__":
    main()
