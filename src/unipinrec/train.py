"""One-stage training (DESIGN section 3): one optimizer, loss = retrieval + alpha * ranking.

`train(config, examples_dir, out_dir)` reads EX/ (docs/architecture.md), trains on CPU, one
GPU, or several processes under `torchrun` (DDP), and writes the MODEL/ folder into out_dir,
plus `train_log.csv` (scalars every log_every steps), `eval_log.csv` (validation metrics when
eval_every_epochs > 0), `curves.png` and `checkpoint/` (resumable state, every
checkpoint_every steps). Re-running the same command after a kill resumes from the checkpoint.

Data order and randomness are functions of (seed, step, rank), so a resumed run takes the same
batches, masks and negatives as an uninterrupted one.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import format as fmt
from .actions import vocab_for
from .batches import ItemVocab, TaskSpec, TrainBatch, collate_examples
from .checkpoint import save_model
from .config import ExperimentConfig, to_dict
from .model import UniPinRec, resolve

LOG_FIELDS = ["step", "epoch", "lr", "loss", "retrieval_loss", "ranking_loss", "grad_norm",
              "tokens_per_s", "examples_per_s", "elapsed_s"]


# ---------------------------------------------------------------------------------------------
# Data: a split collated once into padded tensors; batches are row selections trimmed to width


def load_split(examples_dir: str | Path, split: str, vocab: ItemVocab, spec: TaskSpec, max_history: int,
               max_slate: int, batch_rows: int = 65_536) -> TrainBatch:
    parts = [collate_examples(rb, vocab, spec, max_history, max_slate)
             for rb in fmt.iter_batches(Path(examples_dir) / split, batch_size=batch_rows) if rb.num_rows]
    if not parts:
        raise ValueError(f"{examples_dir}/{split}: no examples")
    return cat_batches(parts)


def load_item_categories(examples_dir: str | Path, vocab: ItemVocab) -> "np.ndarray":
    """EX/items `category` in item-row order (rows 1..N of `vocab`); null -> -1 (unknown)."""
    import numpy as np

    table = fmt.read_sharded(Path(examples_dir) / "items", columns=["item_id", "category"])
    rows = vocab.lookup(table.column("item_id").to_numpy())
    cat = table.column("category").fill_null(-1).to_numpy().astype(np.int64)
    if (cat < -1).any():
        raise ValueError(f"{examples_dir}/items: field 'category' must be >= 0 (found {int(cat.min())})")
    out = np.full(len(vocab), -1, dtype=np.int64)
    out[rows - 1] = cat
    return out


def cat_batches(parts: list[TrainBatch]) -> TrainBatch:
    return TrainBatch.cat(parts)


def select(data: TrainBatch, rows: torch.Tensor) -> TrainBatch:
    """Rows of a collated split, trimmed to the widest history and slate among them."""
    return data.index_select(rows)


# ---------------------------------------------------------------------------------------------
# Processes and devices


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """DDP when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str, d: Dist) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("train.device: cuda was asked for but no GPU is visible")
        if requested == "cuda":
            requested = f"cuda:{d.local_rank}"
    return torch.device(requested)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Checkpoints (no pickles: tensors in safetensors, the rest in JSON)


def _fingerprint(cfg: ExperimentConfig, ex_meta: dict, world: int) -> str:
    blob = json.dumps([to_dict(dataclasses.replace(cfg, validated=None)), ex_meta.get("splits"),
                       ex_meta.get("num_items"), world], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_checkpoint(directory: Path, model: UniPinRec, opt: torch.optim.Optimizer, step: int, fingerprint: str) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                "param_groups": sd["param_groups"], "scalars": scalars}))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)  # the last complete checkpoint is always on disk
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path, model: UniPinRec, opt: torch.optim.Optimizer, fingerprint: str) -> int:
    if not (directory / "state.json").exists() and directory.with_name(directory.name + ".old").exists():
        directory = directory.with_name(directory.name + ".old")  # killed between the two renames
    state = json.loads((directory / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"{directory} holds a checkpoint of a different run (config, data or process count "
                         "changed); use a new --out folder or delete the checkpoint")
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    tensors = load_file(str(directory / "optimizer.safetensors"))
    opt_state: dict = {}
    for key, value in list(tensors.items()) + list(state["scalars"].items()):
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return int(state["step"])


# ---------------------------------------------------------------------------------------------
# Training


def _set_step_seed(seed: int, step: int, rank: int) -> None:
    torch.manual_seed((seed * 1_000_003 + step * 7919 + rank) % (2**63))


def train(config: ExperimentConfig, examples_dir: str | Path, out_dir: str | Path, *, kind: str | None = None,
          device: str | None = None, progress: bool | None = None) -> dict:
    """Train one model; returns the summary written into MODEL/meta.json under "train"."""
    from tqdm.auto import tqdm

    tc = config.train
    examples_dir, out_dir = Path(examples_dir), Path(out_dir)
    d = init_distributed(device or tc.device)
    dev = pick_device(device or tc.device, d)
    ex_meta = fmt.read_meta(examples_dir)
    actions = vocab_for(ex_meta["source"])
    if list(ex_meta.get("actions", actions.names)) != list(actions.names):
        raise ValueError(f"{examples_dir}/meta.json: actions {ex_meta.get('actions')} differ from the "
                         f"'{ex_meta['source']}' vocabulary {list(actions.names)}")
    vocab = ItemVocab.from_examples_dir(examples_dir)
    spec = TaskSpec.resolve(config.tasks, actions)
    categories = load_item_categories(examples_dir, vocab) if config.model.use_category else None
    mcfg = resolve(config.model, num_items=len(vocab), num_actions=actions.size, num_tasks=spec.num_tasks, kind=kind,
                   num_categories=max(1, int(categories.max()) + 1) if categories is not None and len(categories) else 1)
    mcfg.validate()
    config = dataclasses.replace(config, model=mcfg)
    built_with = bool(ex_meta.get("history_impressions", False))
    if built_with != config.data.history_impressions:  # the model would learn from other histories than serving sends
        raise ValueError(f"data.history_impressions is {config.data.history_impressions} but {examples_dir} was built "
                         f"{'with' if built_with else 'without'} impressions in the history "
                         f"(`unipinrec examples build --{'' if config.data.history_impressions else 'no-'}history-impressions`)")
    if int(ex_meta.get("max_history", mcfg.max_history)) < mcfg.max_history:
        raise ValueError(f"model.max_history {mcfg.max_history} exceeds the examples' max_history {ex_meta['max_history']}")

    data = load_split(examples_dir, "train", vocab, spec, mcfg.max_history, tc.max_slate)
    if tc.include_valid:
        data = cat_batches([data, load_split(examples_dir, "valid", vocab, spec, mcfg.max_history, tc.max_slate)])
    data = data.to(dev)
    n = data.history.lengths.shape[0]
    global_batch = tc.batch_size * d.world
    steps_per_epoch = max(1, math.ceil(n / global_batch))
    total_steps = tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(tc.epochs * steps_per_epoch))

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = UniPinRec(mcfg)
    if categories is not None:
        model.set_item_categories(categories)  # before the checkpoint: a resume overwrites it with the same
    model = model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                            fused=dev.type == "cuda")
    fingerprint = _fingerprint(config, ex_meta, d.world)
    ckpt_dir = out_dir / "checkpoint"
    step = 0
    if (ckpt_dir / "state.json").exists() or ckpt_dir.with_name("checkpoint.old").exists():
        step = load_checkpoint(ckpt_dir, model, opt, fingerprint)
    ddp = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      find_unused_parameters=True)
    use_bf16 = tc.bf16 and dev.type == "cuda"
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.csv"
    if d.main:
        _trim_log(log_path, step, LOG_FIELDS)
    show = (tc.progress if progress is None else progress) and d.main
    loss_kw = dict(alpha=tc.alpha, num_uniform_negatives=tc.num_uniform_negatives,
                   num_inbatch_negatives=tc.num_inbatch_negatives, logq_correction=tc.logq_correction,
                   full_softmax=tc.full_softmax)
    tokens_per_action = mcfg.tokens_per_action
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    start_step = step
    summary_path = out_dir / "train_summary.json"
    if step >= total_steps and summary_path.exists() and (out_dir / "meta.json").exists():
        return json.loads(summary_path.read_text())  # already finished: re-running is a no-op
    t0 = time.perf_counter()
    window_t, window_tokens, window_examples = t0, 0, 0
    tokens_total = 0
    perm_epoch, perm = -1, None
    bar = tqdm(total=total_steps, initial=step, disable=not show, unit="step", dynamic_ncols=True, desc=mcfg.kind)
    model.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        if epoch != perm_epoch:
            g = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
            perm, perm_epoch = torch.randperm(n, generator=g).to(dev), epoch
        i = step % steps_per_epoch
        rows = perm[i * global_batch:(i + 1) * global_batch][d.rank::d.world]
        batch = select(data, rows)
        lr = tc.lr * lr_factor(step, tc.warmup_steps, total_steps, tc.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        _set_step_seed(tc.seed, step, d.rank)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, stats = ddp(batch, **loss_kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        tokens = (int(batch.history.lengths.sum()) * tokens_per_action + int(batch.slate_valid.sum())) * d.world
        window_tokens += tokens
        tokens_total += tokens
        window_examples += len(rows) * d.world
        if step % tc.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr,
                   "grad_norm": float(grad_norm), "elapsed_s": round(now - t0, 3),
                   "tokens_per_s": round(window_tokens / max(now - window_t, 1e-9), 1),
                   "examples_per_s": round(window_examples / max(now - window_t, 1e-9), 1),
                   **{k: float(v) for k, v in stats.items()}}
            window_t, window_tokens, window_examples = now, 0, 0
            if d.main:
                _append_log(log_path, row, LOG_FIELDS)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if d.main and (step % tc.checkpoint_every == 0 or step == total_steps):
            save_checkpoint(ckpt_dir, model, opt, step, fingerprint)
        if tc.eval_every_epochs > 0 and d.main and step % steps_per_epoch == 0 and \
                (step // steps_per_epoch) % tc.eval_every_epochs == 0:
            _eval_during_training(model, vocab, spec, examples_dir, config, step, steps_per_epoch, out_dir, dev)
            model.train()
    bar.close()
    wall = time.perf_counter() - t0
    summary = {
        "steps": total_steps, "resumed_from_step": start_step, "epochs": round(total_steps / steps_per_epoch, 3),
        "steps_per_epoch": steps_per_epoch, "num_train_examples": n, "world_size": d.world,
        "device": str(dev), "bf16": use_bf16, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens_total / max(wall, 1e-9), 1),
        "s_per_epoch": round(wall / max((total_steps - start_step) / steps_per_epoch, 1e-9), 3),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None,
        "num_parameters": model.num_parameters(),
    }
    if d.world > 1:
        _write_param_digest(model, out_dir, d)
    if d.main:
        model.eval()
        version = save_model(out_dir, model, config, vocab, config.tasks, mcfg.kind,
                             extra_meta={"train": summary, "examples": str(examples_dir)})
        summary["model_version"] = version
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        try:
            from .evaluate import plot_curves

            plot_curves(out_dir, out_dir / "curves.png")
        except ImportError:  # matplotlib absent (e.g. a bare GPU image): the CSV logs remain
            pass
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return summary


def _eval_during_training(model, vocab, spec, examples_dir, config, step, steps_per_epoch, out_dir, dev) -> None:
    from .evaluate import evaluate_model

    # with include_valid the valid split is trained on, so the curve follows eval.split (no model
    # selection is made from it: the final model is the last step's)
    split = config.eval.split if config.train.include_valid else "valid"
    m = evaluate_model(model, vocab, spec, examples_dir, split=split, ks=config.eval.ks,
                       batch_size=config.eval.batch_size, device=dev, progress=False,
                       exclude_history=config.eval.exclude_history)
    row = {"step": step, "epoch": step // steps_per_epoch, "split": split}
    row.update({f"retrieval_{k}": v for k, v in m.get("retrieval", {}).items() if isinstance(v, (int, float))})
    for task, r in m.get("ranking", {}).items():
        row[f"auc_{task}"] = r.get("auc")
    path = out_dir / "eval_log.csv"
    fields = list(row)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def _trim_log(path: Path, step: int, fields: list[str]) -> None:
    """On resume keep the rows up to the checkpoint's step; on a fresh start, start over."""
    rows = []
    if step > 0 and path.exists():
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    eval_log = path.with_name("eval_log.csv")
    if step == 0 and eval_log.exists():
        eval_log.unlink()


def _append_log(path: Path, row: dict, fields: list[str]) -> None:
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerow(row)


def _write_param_digest(model: UniPinRec, out_dir: Path, d: Dist) -> None:
    """Each DDP rank records a digest of its weights: equal digests show gradients were synced."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"ddp_rank{d.rank}.json").write_text(json.dumps({"rank": d.rank, "digest": h.hexdigest()}))

