"""Data benchmark: synthetic generation and example building, events/s, wall time, peak RSS.

    .venv/bin/python bench/data_bench.py --events 100000 1000000
    .venv/bin/python bench/data_bench.py --layouts --max-history 200 2048   # the two EX layouts

Each (size, step) runs in a fresh child process so that its peak RSS (ru_maxrss) is its own.
Target (issue 2): 1M synthetic events through generate + build in <= 120 s with <= 4 GB peak.
--layouts (issue 13): on `data generate --users 500 --requests-per-user 200` data, build both
layouts (with --history-impressions) at each L; bytes of the training input (the splits, or the
sequences + requests) against the raw events' bytes (target <= 2x), and the build's peak RSS
(target: flat in L).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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


def _bytes(*dirs: Path) -> int:
    return sum(p.stat().st_size for d in dirs if d.exists() for p in d.rglob("*.parquet"))


def layout_child(layout: str, work: Path, max_history: int, chunk_events: int) -> dict:
    from unipinrec import format as fmt
    from unipinrec.data import build_examples, generate_synthetic, iter_examples

    if layout == "generate":
        meta = generate_synthetic(work / "raw", num_users=500, num_requests_per_user=200, progress=False)
        return {"events": meta["num_events"], "raw_bytes": _bytes(work / "raw" / "events")}
    out = work / f"{layout}-L{max_history}"
    t = time.perf_counter()
    meta = build_examples(work / "raw", out, max_history=max_history, chunk_events=chunk_events, progress=False,
                          history_impressions=True, layout=layout)
    wall = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    subdirs = ("sequences", "requests") if layout == "sequences" else ("train", "valid", "test")
    size = _bytes(*(out / d for d in subdirs))
    t = time.perf_counter()  # one pass over the train split, as UnifiedExample batches
    batches = iter_examples(out, "train") if layout == "sequences" else fmt.iter_batches(out / "train")
    read = sum(b.num_rows for b in batches)
    read_s = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"layout": layout, "L": max_history, "wall_s": wall, "peak_rss_mb": peak_kb / 1024, "bytes": size,
            "examples": meta["num_examples"], "read_s": read_s, "read": read}


def layouts(args) -> None:
    base = args.workdir or Path(tempfile.mkdtemp(prefix="unipinrec-bench-"))

    def child_run(*extra: str) -> dict:
        cmd = [sys.executable, __file__, "--workdir", str(base), "--chunk-events", str(args.chunk_events), *extra]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    try:
        raw = child_run("--_layout", "generate", "0")
        rows = [child_run("--_layout", layout, str(L)) for L in args.max_history
                for layout in ("examples", "sequences")]
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"layout benchmark: {raw['events']:,} events (data generate --users 500 --requests-per-user 200), raw "
          f"events {raw['raw_bytes'] / 2**20:.1f} MiB, --history-impressions, chunk_events={args.chunk_events:,}")
    header = (f"{'layout':>10} {'L':>6} {'examples':>10} {'build s':>8} {'peak RSS MB':>12} {'MiB':>8} {'x raw':>6} "
              f"{'read train s':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layout']:>10} {r['L']:>6} {r['examples']:>10,} {r['wall_s']:>8.2f} {r['peak_rss_mb']:>12.0f} "
              f"{r['bytes'] / 2**20:>8.1f} {r['bytes'] / raw['raw_bytes']:>6.2f} {r['read_s']:>13.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000], help="target sizes")
    p.add_argument("--max-history", type=int, nargs="+", default=[50])
    p.add_argument("--layouts", action="store_true", help="compare the per-example and sequence layouts")
    p.add_argument("--_layout", nargs=2, metavar=("LAYOUT", "L"), help=argparse.SUPPRESS)
    p.add_argument("--chunk-events", type=int, default=500_000)
    p.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder, removed)")
    p.add_argument("--_child", nargs=2, metavar=("STEP", "EVENTS"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._child:
        step, events = args._child[0], int(args._child[1])
        print(json.dumps(child(step, events, args.workdir, args.max_history[0], args.chunk_events)))
        return
    if args._layout:
        print(json.dumps(layout_child(args._layout[0], args.workdir, int(args._layout[1]), args.chunk_events)))
        return
    if args.layouts:
        return layouts(args)

    rows = []
    base = args.workdir or Path(tempfile.mkdtemp(prefix="unipinrec-bench-"))
    try:
        for n in args.events:
            work = base / f"e{n}"
            for step in ("generate", "build"):
                cmd = [sys.executable, __file__, "--_child", step, str(n), "--workdir", str(work),
                       "--max-history", str(args.max_history[0]), "--chunk-events", str(args.chunk_events)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append({"target": n, **json.loads(out.strip().splitlines()[-1])})
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)

    cores = len(os.sched_getaffinity(0))
    print(f"data benchmark: {cores} cores, L={args.max_history[0]}, chunk_events={args.chunk_events:,}")
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
