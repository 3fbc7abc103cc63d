"""One epoch of training input, no model: every batch of `train.data_loader` (stream or memory)
for a config and an examples folder, as `unipinrec train` takes them (same loader, same collate).
Prints rows, batches, seconds and rows/s; run it under bench/train_rss.py for its peak memory.

    python bench/train_rss.py -- python bench/stream_bench.py --config configs/tiny.yaml \
        --examples EX --set model.max_history=200 --set train.batch_size=512
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    import torch

    from unipinrec.config import load_config
    from unipinrec.train import Dist, make_loader, read_examples

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--examples", required=True, type=Path)
    p.add_argument("--set", action="append", default=[], help="section.key=value, as `unipinrec train --set`")
    p.add_argument("--epochs", type=float, default=1.0)
    args = p.parse_args()
    cfg, data = read_examples(load_config(args.config, args.set), args.examples, kind=None)
    t0 = time.perf_counter()
    loader = make_loader(cfg, data, Dist(), torch.device("cpu"))
    steps = max(1, round(args.epochs * loader.steps_per_epoch))
    rows = tokens = 0
    for step in range(steps):
        b = loader.batch_for(step)
        rows += b.history.lengths.shape[0]
        tokens += int(b.history.lengths.sum())
    loader.close()
    wall = time.perf_counter() - t0
    print(f"loader={cfg.train.data_loader} rows={rows} batches={steps} history_tokens={tokens} "
          f"wall_s={wall:.1f} rows_per_s={rows / wall:.0f}", flush=True)


if __name__ == "__main__":
    main()
