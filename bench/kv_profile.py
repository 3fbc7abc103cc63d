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
    from unipinrec.serving.request import parse_request

    shape = argparse.Namespace(items=20_000, d_model=256, layers=4, heads=4)
    paths = sb.make_models(Path(tempfile.mkdtemp()), args.L, shape)
    B, L, C = args.batch, args.L, args.C
    cuda = args.device.startswith("cuda")
    engs = {on: sb.kv_engine(paths["unified"], args.device, ((B, L - 8, C),), kv_cache_bytes=8 * 2**30 if on else 0)
            for on in (True, False)}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def batch(seed: int, first_user: int) -> list:  # B new users, L-8 actions each
        bodies = sb.make_bodies(B, L, C, shape.items, seed=seed, first_user=first_user)
        return [parse_request(sb.columnar({**b, "history": b["history"][:-8]}), engs[True].limits) for b in bodies]

    by: dict[str, list[float]] = {}
    for rnd in range(args.rounds + 1):
        reqs = batch(7 + rnd, 10**6 * (rnd + 1))
        for name, eng in (("cache off", engs[False]), ("miss", engs[True]), ("hit", engs[True])):
            ms, status = sb.timed_batch(eng, reqs, cuda)
            if rnd:  # round 0 warms every path
                by.setdefault(f"{name} ({status})", []).append(ms)
    for k, v in by.items():
        print(f"batch {B} {k}: median {statistics.median(v):.2f} ms over {len(v)}")
    reqs = batch(99, 9 * 10**7)
    gp.cprofiled(lambda: (engs[True].handle_batch(reqs), sync()), 1, f"batch {B} miss (stored)", rows=14)
    gp.cprofiled(lambda: (engs[True].handle_batch(reqs), sync()), 1, f"batch {B} hit", rows=14)


if __name__ == "__main__":
    main()
