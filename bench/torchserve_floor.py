"""TorchServe's own floor, per setting: the serving bench's floor handler (a fixed answer, no
engine) behind the same frontend, for each maxBatchDelay, with the bench's 2,048-action columnar
body and with a tiny one; p50 at one client and the throughput at many.

    python bench/torchserve_floor.py [--delays 0 1 2] [--workers 4] [--batch-size 8] [--clients 16]
        [--client-procs 4] [--requests 800]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serving_bench as sb  # noqa: E402


def one_client_p50(url: str, body: bytes, n: int) -> float:
    sb.run_clients(url, [body] * 5, 1)  # warms the connection and the worker
    return statistics.median(sb.run_clients(url, [body] * n, 1)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--requests", type=int, default=800, help="requests at --clients per cell")
    p.add_argument("--one-client", type=int, default=100, help="requests at one client per cell")
    args = p.parse_args()
    from unipinrec.serving import torchserve as ts

    work = Path(tempfile.mkdtemp(prefix="ts-floor-"))
    store = work / "store"
    names = []
    for d in args.delays:
        sb.build_floor_archive(store, workers=args.workers, batch_size=args.batch_size, max_batch_delay=d,
                               name=f"floor_d{d}")
        names.append((d, f"floor_d{d}"))
    big = sb.payload(sb.make_bodies(1, 2048, 256, 20_000, seed=1)[0], argparse.Namespace(history_form="columnar"))
    bodies = {f"columnar 2,048 actions ({len(big) // 1024} KiB)": big, "tiny (7 B)": b'{"x":1}'}
    info = ts.start(store, work / "run", ports=(ts.free_port(), ts.free_port(), ts.free_port()), token_auth=False)
    print(f"| maxBatchDelay ms | body | p50 ms, one client | QPS, {args.clients} clients |")
    print("|---|---|---|---|")
    try:
        for d, name in names:
            url = f"{info.inference}/predictions/{name}"
            for label, body in bodies.items():
                p50 = one_client_p50(url, body, args.one_client)
                sb.run_clients(url, [body] * args.clients, args.clients, args.client_procs)  # warm every client
                lat, wall = sb.run_clients(url, [body] * args.requests, args.clients, args.client_procs)
                print(f"| {d} | {label} | {p50:.2f} | {len(lat) / wall:,.0f} |", flush=True)
    finally:
        ts.stop(work / "run")


if __name__ == "__main__":
    main()
