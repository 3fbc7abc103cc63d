"""Data benchmark: synthetic generation and example building, events/s, wall time, peak RSS.

    .venv/bin/python bench/data_bench.py --events 100000 1000000

Each (size, step) runs in a fresh child process so that its peak RSS (ru_maxrss) is its own.
Target (issue 2): 1M synthetic events through generate + build in <= 120 s with <= 4 GB peak.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S, TARGET_GB = 120.0, 4.0


def child(step: str, events: int, work: Path, max_history: int, chunk_events: int) -> dict:
    from unipinrec.data import build_examples, generate_synthetic, size_for_events

    t = time.perf_counter()
    if step == "generate":
        meta = generate_synthetic(work / "raw", size_for_events(events), progress=False)
        n = meta["num_events"]
    else:
        meta = build_examples(work / "raw", work / "ex", max_history=max_history, chunk_events=chunk_events,
                              progress=False)
        n = meta["num_events"]
    wall = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"step": step, "events": n, "wall_s": wall, "peak_rss_mb": peak_kb / 1024,
            "examples": meta.get("num_examples")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000], help="target sizes")
    p.add_argument("--max-history", type=int, default=50)
    p.add_argument("--chunk-events", type=int, default=500_000)
    p.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder, removed)")
    p.add_argument("--_child", nargs=2, metavar=("STEP", "EVENTS"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._child:
        step, events = args._child[0], int(args._child[1])
        print(json.dumps(child(step, events, args.workdir, args.max_history, args.chunk_events)))
        return

    import shutil

    rows = []
    base = args.workdir or Path(tempfile.mkdtemp(prefix="unipinrec-bench-"))
    try:
        for n in args.events:
            work = base / f"e{n}"
            for step in ("generate", "build"):
                cmd = [sys.executable, __file__, "--_child", step, str(n), "--workdir", str(work),
                       "--max-history", str(args.max_history), "--chunk-events", str(args.chunk_events)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append({"target": n, **json.loads(out.strip().splitlines()[-1])})
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)

    cores = len(os.sched_getaffinity(0))
    print(f"data benchmark: {cores} cores, L={args.max_history}, chunk_events={args.chunk_events:,}")
    header = f"{'events':>12} {'step':>10} {'wall s':>8} {'events/s':>12} {'peak RSS MB':>12} {'examples':>10}"
    print(header)
    print("-" * len(header))
    for n in args.events:
        gen, build = [r for r in rows if r["target"] == n]
        for r in (gen, build):
            ex = f"{r['examples']:,}" if r["examples"] else ""
            print(f"{r['events']:>12,} {r['step']:>10} {r['wall_s']:>8.2f} {r['events'] / r['wall_s']:>12,.0f} "
                  f"{r['peak_rss_mb']:>12.0f} {ex:>10}")
        total = gen["wall_s"] + build["wall_s"]
        peak = max(gen["peak_rss_mb"], build["peak_rss_mb"])
        ok = total <= TARGET_S and peak <= TARGET_GB * 1024
        print(f"{gen['events']:>12,} {'total':>10} {total:>8.2f} {gen['events'] / total:>12,.0f} {peak:>12.0f} "
              f"{'(target <= 120 s, <= 4096 MB: ' + ('met' if ok else 'MISSED') + ')' if n >= 1_000_000 else ''}")


if __name__ == "__main__":
    main()
