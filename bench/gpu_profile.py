"""Where the GPU engine's time goes (issue 12): kernels of the fused graph vs the limit's blocks
(torch.profiler, CUDA activities, graph replays and eager), the fused graph split into its parts
(encode / retrieval / rank, each its own graph), and the host steps of one fused batch
(time.perf_counter per step, on parsed requests).

    python bench/gpu_profile.py [--batch 1 64] [--compile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import serving_bench as sb  # noqa: E402

from unipinrec.sequences import Actions  # noqa: E402
from unipinrec.serving import fused  # noqa: E402
from unipinrec.serving.graphs import Buckets, _Graph, to_host  # noqa: E402
from unipinrec.serving.request import parse_request  # noqa: E402
from unipinrec.serving.timing import StageTimer  # noqa: E402


events_ms = sb.events_ms  # the benches' one CUDA-event timing helper


def kernels(fn, title, n=10, rows=14):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    print(f"\n## kernels: {title} ({n} calls; times are totals)")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))


def cprofiled(fn, n: int, title: str, rows: int = 18) -> None:
    """Print the functions taking most of `n` calls of fn (cProfile, by own time)."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(rows)
    print(f"\n## cProfile {title} x{n} (tottime)\n" + s.getvalue()[-6000:])


def host_steps(eng, reqs, n=30):
    """perf_counter per step of the fused path (fused.serve's steps, written out)."""
    L = eng.ret.model.config.max_history
    steps: dict[str, list[float]] = {}

    def mark(name, t0):
        t = time.perf_counter()
        steps.setdefault(name, []).append((t - t0) * 1e3)
        return t

    for _ in range(n):
        t = time.perf_counter()
        timer = StageTimer(eng.device)
        preps = eng.resolver.resolve(reqs, timer)
        t = mark("resolve", t)
        fused.eligible(eng, preps)
        t = mark("eligible", t)
        b = Buckets(max_history=L)
        windows = [p.window(L) for p in preps]
        t = mark("windows", t)
        rows, width = b.batch(len(preps)), b.width(max(len(w) for w in windows))
        ring = eng.fused.host  # as fused.launch does
        staging = ring.take((Actions.flat_size(rows, width),), torch.long)
        acts = Actions.from_histories(windows, [p.request_ts for p in preps], device=eng.device, rows=rows,
                                      width=width, out=eng.fused.input(rows, width), staging=staging)
        t = mark("from_histories", t)
        seen = fused._seen_before_window(preps, rows, L, ring)
        t = mark("seen (pinned)", t)
        kv, packed = eng.fused.run(acts, seen, b.candidates(max(p.req.num_candidates for p in preps)))
        ring.mark(staging, seen)
        t = mark("run (copies+replay launch)", t)
        host = to_host(packed[:len(preps)])
        t = mark("to_host (waits for GPU)", t)
        fused.Pending(eng, preps, torch.from_numpy(host), ring).responses(host, timer.as_dict())
        t = mark("items", t)
        for p in preps:
            eng._history_meta(p)
        mark("meta", t)
    return {k: float(np.median(v)) for k, v in steps.items()}


def launch_ms(graph, n: int = 30) -> float:
    """Host ms of one `graph.replay()` call alone (the launch, not the work: synchronised between
    calls); it grows with the graph's nodes."""
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        out.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return float(np.median(out))


def parts(eng, acts, seen, C):
    """The fused graph's parts, each captured alone: -> ms per part."""
    m = eng.ret.model
    r = eng.retriever
    idx = r.index
    out = {}
    _, kv = m.encode_history(acts)
    uv = kv.user_vectors.clone()
    seen = seen[:, 2:]  # the rows to mask (columns 0 and 1: the exclude flag, num_candidates)
    gaps = m.default_candidate_gaps(kv.lengths, kv.last_ts(), acts.request_ts)
    cand = torch.randint(1, idx.num_items, (acts.batch_size, C), device=eng.device)

    def retr(dtype):
        def f():
            s = F.pad(uv.to(dtype) @ idx.vectors.to(dtype).T, (0, 1))
            s = s.scatter_(1, r._row_to_pos[seen], float("-inf"))[:, :-1]
            return s.topk(C, dim=1)
        return f

    vb = idx.vectors.to(torch.bfloat16)
    fns = {"encode": lambda: m.encode_history(acts),
           "retrieval fp32": retr(torch.float32),
           "retrieval bf16 (cast in)": lambda: F.pad(uv @ vb.T, (0, 1)).scatter_(
               1, r._row_to_pos[seen], float("-inf"))[:, :-1].topk(C, dim=1),
           "matmul fp32 only": lambda: uv.float() @ idx.vectors.T,
           "topk only fp32": (lambda s: (lambda: s.topk(C, dim=1)))(torch.randn(acts.batch_size, idx.num_items,
                                                                                 device=eng.device)),
           "rank (limit form)": lambda: m.rank(cand, kv),
           "rank+gaps+sigmoid": lambda: torch.sigmoid(m.rank(cand, kv, gaps).float()),
           "whole fused fn": lambda: fused.serve_fn(m, None, idx, r._row_to_pos, r._pos_to_row, eng.ranker.weights,
                                                    acts, seen, C)}
    for name, fn in fns.items():
        g = _Graph(fn)
        out[name] = events_ms(g.replay)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--C", type=int, default=256)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--compile", action="store_true", help="the engines with EngineConfig.compile")
    args = p.parse_args()
    ns = argparse.Namespace(d_model=256, layers=4, heads=4, items=args.items, repeats=30, compile=args.compile)
    work = Path(tempfile.mkdtemp())
    paths = sb.make_models(work, args.L, ns)
    warm = tuple((B, args.L, args.C) for B in args.batch)
    eng = sb.engines(paths, None, device="cuda", torch_index=True, graph_warmup=warm, compile=args.compile)
    print("index vectors dtype", eng["a"].retriever.index.vectors.dtype, "model dtype",
          next(eng["a"].ret.model.parameters()).dtype)
    summary = []
    with torch.inference_mode():
        for B in args.batch:
            bodies = sb.make_bodies(B, args.L, args.C, args.items, seed=3)
            reqs = [parse_request(sb.columnar(x), eng["a"].limits) for x in bodies]
            lims = sb.limit_fns(eng, args.L, args.C, B, args.items, "cuda")
            for m in ("a", "c"):
                e = eng[m]
                hb = events_ms(lambda: e.handle_batch(reqs), 30)
                (st_acts, st_seen, _, graph), = [v for k, v in e.fused.graphs.items() if k[0] == B and not k[-1]]
                gr = events_ms(graph.replay)
                lim = torch.compile(lims["l" + m], dynamic=False) if args.compile else lims["l" + m]  # as the bench
                lg = _Graph(lim)
                lr = events_ms(lg.replay)
                hb_after = events_ms(lambda: e.handle_batch(reqs), 30)  # the bench measures after its limit graphs
                hs = host_steps(e, reqs)
                summary.append((B, m, hb, gr, lr))
                print(f"\n# batch {B} mode {m}: handle_batch {hb:.3f} ms, fused graph replay {gr:.3f} ms, "
                      f"limit replay {lr:.3f} ms; host ms of the replay call alone {launch_ms(graph):.3f}; "
                      f"handle_batch after the limit graph's capture {hb_after:.3f} ms")
                print("host steps (median ms):", {k: round(v, 3) for k, v in hs.items()})
                kernels(graph.replay, f"fused graph replay, batch {B}, mode {m}")
                kernels(lg.replay, f"limit replay, batch {B}, mode {m}")
                if m == "a":
                    print("parts (graph replay ms):", {k: round(v, 3) for k, v in
                                                      parts(e, st_acts, st_seen, args.C).items()})
                    kernels(lambda: fused.serve_fn(e.ret.model, None, e.retriever.index, e.retriever._row_to_pos,
                                                   e.retriever._pos_to_row, e.ranker.weights, st_acts, st_seen,
                                                   args.C), f"fused fn EAGER, batch {B}", n=3, rows=25)
                    cprofiled(lambda: e.handle_batch(reqs), 20, f"handle_batch, batch {B}, mode a")
    print("\nSUMMARY batch mode handle_batch_ms fused_replay_ms limit_replay_ms")
    for row in summary:
        print("  ", row[0], row[1], *(f"{x:.3f}" for x in row[2:]))


if __name__ == "__main__":
    main()
