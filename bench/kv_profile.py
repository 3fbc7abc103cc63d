"""Where a cross-request KV cache miss and hit spend their time (host and device), per batch:

    python bench/kv_profile.py --batch 64 [--rounds 4]

Per round: B new users with L-8 actions (miss, stored), the same bodies again (hit). Prints the
median of each, the same with the cache off (no store), and cProfile of one miss and one hit batch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_profile as gp  # noqa: E402
import serving_bench as sb  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--C", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    from unipinrec.checkpoint import load_model
    from unipinrec.index import TorchIndex
    from unipinrec.serving.engine import Engine, EngineConfig
    from unipinrec.serving.request import parse_request

    shape = argparse.Namespace(items=20_000, d_model=256, layers=4, heads=4)
    paths = sb.make_models(Path(tempfile.mkdtemp()), args.L, shape)
    uni = load_model(paths["unified"], device=args.device)
    index = TorchIndex.for_model(uni, uni.vocab.item_ids, args.device)
    B, L, C = args.batch, args.L, args.C
    engs = {on: Engine(uni, index, config=EngineConfig(kv_cache_bytes=(8 * 2**30 if on else 0), device=args.device,
                                                        graph_warmup=((B, L - 8, C),)))
            for on in (True, False)}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(eng, reqs):
        sync()
        t = time.perf_counter()
        out = eng.handle_batch(reqs)
        sync()
        return (time.perf_counter() - t) * 1000, out[0]["kv_cache"]

    by: dict[str, list[float]] = {}
    for rnd in range(args.rounds + 1):
        bodies = sb.make_bodies(B, L, C, shape.items, seed=7 + rnd, first_user=10**6 * (rnd + 1))
        reqs = [parse_request(sb.columnar({**b, "history": b["history"][:-8]}), engs[True].limits) for b in bodies]
        for name, eng in (("cache off", engs[False]), ("miss", engs[True]), ("hit", engs[True])):
            ms, status = timed(eng, reqs)
            if rnd:  # round 0 warms every path
                by.setdefault(f"{name} ({status})", []).append(ms)
    for k, v in by.items():
        print(f"batch {B} {k}: median {statistics.median(v):.2f} ms over {len(v)}")
    bodies = sb.make_bodies(B, L, C, shape.items, seed=99, first_user=9 * 10**7)
    reqs = [parse_request(sb.columnar({**b, "history": b["history"][:-8]}), engs[True].limits) for b in bodies]
    gp.cprofiled(lambda: (engs[True].handle_batch(reqs), sync()), 1, f"batch {B} miss (stored)", rows=14)
    gp.cprofiled(lambda: (engs[True].handle_batch(reqs), sync()), 1, f"batch {B} hit", rows=14)


if __name__ == "__main__":
    main()
