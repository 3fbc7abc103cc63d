"""One-stage training (arXiv 2606.00422): one optimizer, loss = retrieval + alpha * ranking.

`train(config, examples_dir, out_dir)` reads EX/ (docs/architecture.md), trains on CPU, one
GPU, or several processes under `torchrun` (DDP), and writes the MODEL/ folder into out_dir,
plus `train_log.csv` (scalars every log_every steps), `eval_log.csv` (validation metrics when
eval_every_epochs > 0), `curves.png` and `checkpoint/` (resumable state, every
checkpoint_every steps; `checkpoint.TrainCheckpoint`). Re-running the same command after a
kill resumes from the checkpoint.

It is a thin wrapper over `Trainer`, shaped like torchtitan's: `Trainer.build` checks and reads
the examples (`read_examples`, `check_examples`) and builds model, loss (`losses.UniPinRecLoss`),
optimizer and checkpointer; `train_step` is one optimizer step; `fit` resumes, loops, logs,
checkpoints, evaluates and writes the model folder; `state_dict` is what a resume needs beyond
the model and optimizer. The batches come from a loader (`make_loader`, train.data_loader):
`stream` (the default; `unipinrec.stream`) reads Parquet row groups as it goes, so host memory
does not grow with the data; `memory` collates the splits once onto the device. Data order and
randomness are functions of (seed, step, rank), so a resumed run takes the same batches, masks
and negatives as an uninterrupted one; the checkpoint also records the stream position.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import format as fmt
from .actions import ActionVocab, vocab_for
from .batches import ItemVocab, TaskSpec, TrainBatch, collate_examples
from .checkpoint import TrainCheckpoint, run_fingerprint, save_model
from .config import ExperimentConfig
from .losses import UniPinRecLoss
from .model import UniPinRec, resolve
from .stream import ParquetExamples, StreamLoader, StreamPlan

if TYPE_CHECKING:
    import numpy as np

LOG_FIELDS = ["step", "epoch", "lr", "loss", "retrieval_loss", "ranking_loss", "grad_norm",
              "tokens_per_s", "examples_per_s", "elapsed_s"]


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
# Examples: checked against the config; the loaders that read them


@dataclasses.dataclass
class TrainData:
    """What training reads from EX/: the split folders trained on and what collating them needs."""

    examples_dir: Path
    splits: list[Path]  # train (+ valid with include_valid)
    vocab: ItemVocab
    spec: TaskSpec
    ex_meta: dict
    categories: "np.ndarray | None"  # category per item row, with model.use_category
    max_history: int
    max_slate: int
    actions_type: type = None  # the model's per-action fields (sequences.Actions or a subclass)

    @property
    def num_rows(self) -> int:
        return sum(self.source().part_rows())

    def collate(self) -> "functools.partial[TrainBatch]":
        """Record batches -> TrainBatch with this run's vocabulary and sizes (picklable, for workers)."""
        return functools.partial(collate_examples, vocab=self.vocab, spec=self.spec, max_history=self.max_history,
                                 max_slate=self.max_slate, actions_type=self.actions_type or UniPinRec.actions_type)

    def source(self):
        """The splits as a stream source: per-example Parquet, or the sequence layout (request rows
        joined with each user's sequence and cut to the window while streaming)."""
        if self.ex_meta.get("layout") == "sequences":
            from .data.sequence_table import SequenceExamples

            return SequenceExamples(self.examples_dir, [d.name for d in self.splits], max_history=self.max_history)
        return ParquetExamples(self.splits)


def check_examples(config: ExperimentConfig, examples_dir: Path, ex_meta: dict) -> ActionVocab:
    """Every check of an examples folder's metadata against the config, in one place (action
    vocabulary, history impressions, max_history); returns the source's action vocabulary."""
    actions = vocab_for(ex_meta["source"])
    if list(ex_meta.get("actions", actions.names)) != list(actions.names):
        raise ValueError(f"{examples_dir}/meta.json: actions {ex_meta.get('actions')} differ from the "
                         f"'{ex_meta['source']}' vocabulary {list(actions.names)}")
    built_with = bool(ex_meta.get("history_impressions", False))
    if built_with != config.data.history_impressions:  # the model would learn from other histories than serving sends
        raise ValueError(f"data.history_impressions is {config.data.history_impressions} but {examples_dir} was built "
                         f"{'with' if built_with else 'without'} impressions in the history "
                         f"(`unipinrec examples build --{'' if config.data.history_impressions else 'no-'}history-impressions`)")
    max_history = config.model.max_history
    if int(ex_meta.get("max_history", max_history)) < max_history:
        raise ValueError(f"model.max_history {max_history} exceeds the examples' max_history {ex_meta['max_history']}")
    return actions


def read_examples(config: ExperimentConfig, examples_dir: Path, *, kind: str | None,
                  actions_type: type | None = None) -> tuple[ExperimentConfig, TrainData]:
    """Check EX/ against the config and fill the model's data-dependent sizes (the rows are read
    by the loader, `make_loader`, into `actions_type`: the model's per-action fields)."""
    ex_meta = fmt.read_meta(examples_dir)
    actions = check_examples(config, examples_dir, ex_meta)
    vocab = ItemVocab.from_examples_dir(examples_dir)
    spec = TaskSpec.resolve(config.tasks, actions)
    categories = load_item_categories(examples_dir, vocab) if config.model.use_category else None
    mcfg = resolve(config.model, num_items=len(vocab), num_actions=actions.size, num_tasks=spec.num_tasks, kind=kind,
                   num_categories=max(1, int(categories.max()) + 1) if categories is not None and len(categories) else 1)
    mcfg.validate()
    tc = config.train
    splits = [examples_dir / "train"] + ([examples_dir / "valid"] if tc.include_valid else [])
    data = TrainData(examples_dir=examples_dir, splits=splits, vocab=vocab, spec=spec, ex_meta=ex_meta,
                     categories=categories, max_history=mcfg.max_history, max_slate=tc.max_slate,
                     actions_type=actions_type or UniPinRec.actions_type)
    if data.num_rows == 0:
        raise ValueError(f"{splits[0]}: no examples")
    return dataclasses.replace(config, model=mcfg), data


class MemoryLoader:
    """train.data_loader = memory: the splits collated once into padded tensors on the device;
    the batch of a step is this rank's share of a permutation per (seed, epoch)."""

    def __init__(self, data: TrainData, *, seed: int, batch_size: int, dist: Dist, device: torch.device):
        parts = [load_split(d.parent, d.name, data.vocab, data.spec, data.max_history, data.max_slate,
                            actions_type=data.actions_type) for d in data.splits]
        self.rows = cat_batches(parts).to(device)
        self.num_rows = self.rows.history.lengths.shape[0]
        self.seed, self.global_batch, self.dist, self.device = seed, batch_size * dist.world, dist, device
        self.steps_per_epoch = max(1, math.ceil(self.num_rows / self.global_batch))
        self._perm_epoch, self._perm = -1, None

    def position(self, step: int) -> dict:
        epoch, taken = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batches_taken": taken, "steps_per_epoch": self.steps_per_epoch}

    def batch_for(self, step: int) -> TrainBatch:
        epoch = step // self.steps_per_epoch
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_rows, generator=g).to(self.device), epoch
        i = step % self.steps_per_epoch
        rows = self._perm[i * self.global_batch:(i + 1) * self.global_batch][self.dist.rank::self.dist.world]
        return select(self.rows, rows)

    def close(self) -> None:
        pass


def make_loader(config: ExperimentConfig, data: TrainData, dist: Dist,
                device: torch.device) -> "StreamLoader | MemoryLoader":
    """The loader train.data_loader names; both give `batch_for(step)`, `position(step)`,
    `num_rows`, `steps_per_epoch` and `close()`."""
    tc = config.train
    if tc.data_loader == "memory":
        return MemoryLoader(data, seed=tc.seed, batch_size=tc.batch_size, dist=dist, device=device)
    # on CPU a reader process competes with the training for the same cores (measured: docs/data.md)
    workers = tc.loader_workers if tc.loader_workers >= 0 else (2 if device.type == "cuda" else 0)
    source = data.source()
    plan = StreamPlan(part_rows=tuple(source.part_rows()), batch_size=tc.batch_size, seed=tc.seed, rank=dist.rank,
                      world=dist.world, readers=max(1, workers))
    return StreamLoader(source, plan, data.collate(), buffer_size=tc.shuffle_buffer,
                        total_steps=_total_steps(tc, plan.steps_per_epoch),
                        device=device, workers=workers)


def _total_steps(tc, steps_per_epoch: int) -> int:
    return tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(tc.epochs * steps_per_epoch))


# ---------------------------------------------------------------------------------------------
# The trainer


class TrainingModule(torch.nn.Module):
    """The model's forward and the loss as one call; this is what DDP wraps, as DDP syncs the
    gradients of the parameters used inside its forward and the loss reads the model's heads
    and item table."""

    def __init__(self, model: UniPinRec, loss_fn: UniPinRecLoss, mam_rate: float):
        super().__init__()
        self.model, self.loss_fn, self.mam_rate = model, loss_fn, mam_rate

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, dict]:
        return self.loss_fn(self.model, self.model(batch, mam_rate=self.mam_rate), batch)


class _Throughput:
    """Tokens and examples per second (all ranks) over the log window and the whole run."""

    def __init__(self) -> None:
        self.t0 = self.window_t = time.perf_counter()
        self.tokens = self.examples = self.total_tokens = 0

    def add(self, tokens: int, examples: int) -> None:
        self.tokens += tokens
        self.examples += examples
        self.total_tokens += tokens

    def window(self) -> dict:
        now = time.perf_counter()
        span = max(now - self.window_t, 1e-9)
        row = {"elapsed_s": round(now - self.t0, 3), "tokens_per_s": round(self.tokens / span, 1),
               "examples_per_s": round(self.examples / span, 1)}
        self.window_t, self.tokens, self.examples = now, 0, 0
        return row


def _set_step_seed(seed: int, step: int, rank: int) -> None:
    torch.manual_seed((seed * 1_000_003 + step * 7919 + rank) % (2**63))


class Trainer:
    """One run: model, loss, optimizer and checkpointer over collated examples.

    `Trainer.build(config, examples_dir, out_dir)` reads and checks the examples; `fit()` trains
    to the end (resuming from out_dir/checkpoint) and writes the model folder; `train_step(batch)`
    is one optimizer step; `state_dict()` / `load_state_dict()` hold the step (the batches, masks
    and negatives of a step are functions of it, the seed and the rank)."""

    def __init__(self, *, config: ExperimentConfig, data: TrainData, out_dir: Path, dist: Dist,
                 device: torch.device, progress: bool = True, model_cls: type[UniPinRec] = UniPinRec):
        tc = config.train
        self.config, self.data, self.out_dir, self.dist, self.device = config, data, Path(out_dir), dist, device
        self.progress = progress and dist.main
        self.global_batch = tc.batch_size * dist.world
        self.loader = make_loader(config, data, dist, device)
        self.steps_per_epoch = self.loader.steps_per_epoch  # ceil(rows / global_batch)
        self.total_steps = _total_steps(tc, self.steps_per_epoch)
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        model = model_cls(config.model)
        if data.categories is not None:
            model.set_item_categories(data.categories)  # before the checkpoint: a resume overwrites it with the same
        self.model = model.to(device)
        self.loss_fn = UniPinRecLoss.from_config(tc)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                           weight_decay=tc.weight_decay, fused=device.type == "cuda")
        self.checkpointer = TrainCheckpoint(self.out_dir / "checkpoint",
                                            run_fingerprint(config, data.ex_meta, dist.world))
        self.bf16 = tc.bf16 and device.type == "cuda"
        self.step = 0
        self.module = self._wrap(TrainingModule(self.model, self.loss_fn, tc.mam_rate))

    @classmethod
    def build(cls, config: ExperimentConfig, examples_dir: str | Path, out_dir: str | Path, *, kind: str | None = None,
              device: str | None = None, progress: bool | None = None,
              model_cls: type[UniPinRec] = UniPinRec) -> "Trainer":
        """Processes and device, then the examples checked against the config, then the trainer.
        `model_cls`: a UniPinRec subclass (e.g. one with more per-action fields, docs/extending.md)."""
        tc = config.train
        dist = init_distributed(device or tc.device)
        dev = pick_device(device or tc.device, dist)
        config, data = read_examples(config, Path(examples_dir), kind=kind, actions_type=model_cls.actions_type)
        return cls(config=config, data=data, out_dir=Path(out_dir), dist=dist, device=dev,
                   progress=tc.progress if progress is None else progress, model_cls=model_cls)

    def _wrap(self, module: TrainingModule) -> torch.nn.Module:
        if self.dist.world <= 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=True)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def batch_for(self, step: int) -> TrainBatch:
        """This rank's batch of `step`, on the device (cheap for consecutive steps)."""
        return self.loader.batch_for(step)

    def resume(self) -> None:
        """Model, optimizer and step from the checkpoint; its stream position must be the step's."""
        self.load_state_dict(self.checkpointer.load(self.model, self.optimizer))
        pos = self.checkpointer.stream_position()
        if pos is not None and pos != self.loader.position(self.step):
            raise ValueError(f"{self.checkpointer.directory}: stream position {pos} does not match step {self.step} "
                             f"({self.loader.position(self.step)})")

    def train_step(self, batch: TrainBatch) -> dict:
        """One optimizer step at self.step; returns lr, grad_norm and the loss stats (tensors: no sync)."""
        tc = self.config.train
        lr = tc.lr * lr_factor(self.step, tc.warmup_steps, self.total_steps, tc.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        _set_step_seed(tc.seed, self.step, self.dist.rank)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, stats = self.module(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()
        self.step += 1
        return {"lr": lr, "grad_norm": grad_norm, **stats}

    def fit(self) -> dict:
        """Train from the checkpoint (if any) to total_steps and write the model folder; returns
        the summary (also in MODEL/meta.json under "train"). A finished run is not redone."""
        from tqdm.auto import tqdm

        if self.checkpointer.exists():
            self.resume()
        summary_path = self.out_dir / "train_summary.json"
        if self.step >= self.total_steps and summary_path.exists() and (self.out_dir / "meta.json").exists():
            return json.loads(summary_path.read_text())
        start_step = self.step
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _trim_log(self.out_dir / "train_log.csv", self.step, LOG_FIELDS)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        meter = _Throughput()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc=self.config.model.kind)
        tpa, world = self.config.model.tokens_per_action, self.dist.world
        self.model.train()
        while self.step < self.total_steps:
            batch = self.batch_for(self.step)
            stats = self.train_step(batch)
            meter.add((int(batch.history.lengths.sum()) * tpa + int(batch.slate_valid.sum())) * world,
                      batch.history.lengths.shape[0] * world)
            self._after_step(stats, meter, bar)
        bar.close()
        return self._finish(start_step, meter)

    def _after_step(self, stats: dict, meter: _Throughput, bar) -> None:
        """Log every log_every steps, checkpoint every checkpoint_every, evaluate every eval_every_epochs."""
        tc, step, last = self.config.train, self.step, self.step == self.total_steps
        if step % tc.log_every == 0 or last:
            row = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), **meter.window(),
                   **{k: float(v) for k, v in stats.items()}}
            if self.dist.main:
                _append_log(self.out_dir / "train_log.csv", row, LOG_FIELDS)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if self.dist.main and (step % tc.checkpoint_every == 0 or last):
            self.checkpointer.save(step, self.model, self.optimizer, self.state_dict(),
                                   stream=self.loader.position(step))
        epoch, epoch_end = divmod(step, self.steps_per_epoch)
        if tc.eval_every_epochs > 0 and self.dist.main and epoch_end == 0 and epoch % tc.eval_every_epochs == 0:
            self.evaluate()
            self.model.train()

    def evaluate(self) -> dict:
        """Validation metrics now, appended to eval_log.csv. With include_valid the valid split is
        trained on, so the curve follows eval.split (no model selection is made from it: the final
        model is the last step's)."""
        from .evaluate import evaluate_model

        cfg = self.config
        split = cfg.eval.split if cfg.train.include_valid else "valid"
        m = evaluate_model(self.model, self.data.vocab, self.data.spec, self.data.examples_dir, split=split,
                           ks=cfg.eval.ks, batch_size=cfg.eval.batch_size, device=self.device, progress=False,
                           exclude_history=cfg.eval.exclude_history)
        _append_eval_row(self.out_dir / "eval_log.csv", m, step=self.step, epoch=self.step // self.steps_per_epoch,
                         split=split)
        return m

    def summary(self, start_step: int, wall: float, tokens: int) -> dict:
        dev, total, spe = self.device, self.total_steps, self.steps_per_epoch
        return {
            "steps": total, "resumed_from_step": start_step, "epochs": round(total / spe, 3),
            "steps_per_epoch": spe, "num_train_examples": self.loader.num_rows, "world_size": self.dist.world,
            "device": str(dev), "bf16": self.bf16, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / max(wall, 1e-9), 1),
            "s_per_epoch": round(wall / max((total - start_step) / spe, 1e-9), 3),
            "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None,
            "num_parameters": self.model.num_parameters(),
        }

    def _finish(self, start_step: int, meter: _Throughput) -> dict:
        """The model folder, train_summary.json and curves.png (main rank); DDP ranks' weight digests."""
        summary = self.summary(start_step, time.perf_counter() - meter.t0, meter.total_tokens)
        self.loader.close()
        if self.dist.world > 1:
            _write_param_digest(self.model, self.out_dir, self.dist)
        if self.dist.main:
            self.model.eval()
            cfg = self.config
            summary["model_version"] = save_model(self.out_dir, self.model, cfg, self.data.vocab, cfg.tasks,
                                                  cfg.model.kind, extra_meta={"train": dict(summary),
                                                                              "examples": str(self.data.examples_dir)})
            (self.out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            _plot_curves(self.out_dir)
        if self.dist.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return summary


def train(config: ExperimentConfig, examples_dir: str | Path, out_dir: str | Path, *, kind: str | None = None,
          device: str | None = None, progress: bool | None = None, model_cls: type[UniPinRec] = UniPinRec) -> dict:
    """Train one model; returns the summary written into MODEL/meta.json under "train"."""
    return Trainer.build(config, examples_dir, out_dir, kind=kind, device=device, progress=progress,
                         model_cls=model_cls).fit()


# ---------------------------------------------------------------------------------------------
# Logs and curves


def _append_eval_row(path: Path, metrics: dict, **head) -> None:
    row = dict(head)
    row.update({f"retrieval_{k}": v for k, v in metrics.get("retrieval", {}).items() if isinstance(v, (int, float))})
    for task, r in metrics.get("ranking", {}).items():
        row[f"auc_{task}"] = r.get("auc")
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def _plot_curves(out_dir: Path) -> None:
    try:
        from .evaluate import plot_curves

        plot_curves(out_dir, out_dir / "curves.png")
    except ImportError:  # matplotlib absent (e.g. a bare GPU image): the CSV logs remain
        pass


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


# ---------------------------------------------------------------------------------------------
# Data: a split collated once into padded tensors; batches are row selections trimmed to width


def load_split(examples_dir: str | Path, split: str, vocab: ItemVocab, spec: TaskSpec, max_history: int,
               max_slate: int, batch_rows: int = 65_536, actions_type: type | None = None) -> TrainBatch:
    from .data.sequence_table import iter_split  # either layout

    parts = [collate_examples(rb, vocab, spec, max_history, max_slate, actions_type=actions_type or UniPinRec.actions_type)
             for rb in iter_split(examples_dir, split, batch_size=batch_rows) if rb.num_rows]
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
