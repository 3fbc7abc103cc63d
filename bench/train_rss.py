"""Peak host memory of a command and its child processes (e.g. `unipinrec train` and its
DataLoader workers): samples /proc every 0.2 s; prints peak total PSS (shared pages counted once
across processes), peak total RSS, peak RSS of the command itself, and wall seconds.

    python bench/train_rss.py -- unipinrec train --config configs/tiny.yaml --examples EX --out OUT
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _kb(pid: int, path: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(cmd: list[str]) -> int:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak_pss = peak_rss = peak_main = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        peak_pss = max(peak_pss, sum(_kb(p, "smaps_rollup", "Pss:") for p in pids))
        peak_rss = max(peak_rss, sum(_kb(p, "status", "VmRSS:") for p in pids))
        peak_main = max(peak_main, _kb(proc.pid, "status", "VmRSS:"))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    print(f"peak_pss_mb={peak_pss / 1024:.0f} peak_rss_total_mb={peak_rss / 1024:.0f} "
          f"peak_rss_main_mb={peak_main / 1024:.0f} wall_s={wall:.1f} rc={proc.returncode}", flush=True)
    return proc.returncode


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv[argv.index("--") + 1:] if "--" in argv else argv))
