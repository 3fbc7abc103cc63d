"""Training throughput of each model kind: tokens/s, seconds per epoch, peak memory.

    python bench/train_bench.py --config configs/ml1m.yaml --examples runs/ml1m_ex --device cuda \
        --kinds unified interleaved retrieval_only --steps 60

Each kind runs in a fresh process (so peak memory is its own): the configured batch size,
`--warmup` untimed steps, then `--steps` timed training steps (forward, backward, AdamW) on
batches drawn as in `unipinrec.train`. tokens = tokens encoded (history tokens, 2 per action for
interleaved, plus slate tokens); events = actions + slate items (the same work for every kind).
Prints a table; --json writes the rows.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_one(args) -> dict:
    import torch

    from unipinrec import format as fmt
    from unipinrec.actions import vocab_for
    from unipinrec.batches import ItemVocab, TaskSpec
    from unipinrec.config import load_config
    from unipinrec.losses import UniPinRecLoss
    from unipinrec.model import UniPinRec, resolve
    from unipinrec.train import load_item_categories, load_split, pick_device, Dist, select

    cfg = load_config(args.config)
    tc = cfg.train
    dev = pick_device(args.device, Dist())
    meta = fmt.read_meta(args.examples)
    actions = vocab_for(meta["source"])
    vocab = ItemVocab.from_examples_dir(args.examples)
    spec = TaskSpec.resolve(cfg.tasks, actions)
    cats = load_item_categories(args.examples, vocab) if cfg.model.use_category else None
    mcfg = resolve(cfg.model, num_items=len(vocab), num_actions=actions.size, num_tasks=spec.num_tasks, kind=args.one,
                   num_categories=max(1, int(cats.max()) + 1) if cats is not None else None)
    data = load_split(args.examples, "train", vocab, spec, mcfg.max_history, tc.max_slate).to(dev)
    n = data.history.lengths.shape[0]
    torch.manual_seed(0)
    model = UniPinRec(mcfg)
    if cats is not None:
        model.set_item_categories(cats)
    model = model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    loss_fn = UniPinRecLoss.from_config(tc)
    bf16 = tc.bf16 and dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    tokens = events = 0

    def step():
        nonlocal tokens, events
        rows = torch.randint(0, n, (tc.batch_size,), generator=g).to(dev)
        b = select(data, rows)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_fn(model, model(b, mam_rate=tc.mam_rate), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acts, slate = int(b.history.lengths.sum()), int(b.slate_valid.sum())
        tokens += acts * mcfg.tokens_per_action + slate
        events += acts + slate

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    tokens = events = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    steps_per_epoch = -(-n // tc.batch_size)
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"kind": args.one, "device": str(dev), "bf16": bf16, "batch_size": tc.batch_size,
            "max_history": mcfg.max_history, "n_layers": mcfg.n_layers, "d_model": mcfg.d_model,
            "encoded_width": mcfg.max_history * mcfg.tokens_per_action,
            "step_ms": round(1000 * dt / args.steps, 2), "tokens_per_s": round(tokens / dt),
            "events_per_s": round(events / dt), "s_per_epoch": round(steps_per_epoch * dt / args.steps, 2),
            "peak_memory_mb": round(peak, 1), "memory": "cuda max allocated" if dev.type == "cuda" else "process max RSS",
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--examples", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kinds", nargs="+", default=["unified", "interleaved"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one kind in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for kind in args.kinds:
        cmd = [sys.executable, __file__, "--config", args.config, "--examples", args.examples, "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--one", kind]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{kind} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    cols = ["kind", "device", "encoded_width", "step_ms", "tokens_per_s", "events_per_s", "s_per_epoch", "peak_memory_mb"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
