"""Model folders (docs/architecture.md): weights without pickles, config, item table, meta.

    MODEL/model.safetensors  weights
    MODEL/config.yaml        the ExperimentConfig (model sizes resolved, model.kind = kind)
    MODEL/items.parquet      ItemVocab (item_id -> embedding row)
    MODEL/meta.json          {"model_version", "kind", "actions", "tasks", "score_weights", ...}

model_version = the first 16 hex digits of sha256(weights file bytes + config.yaml bytes), so
the same weights and config always give the same version. Loading reads tensors with
safetensors and YAML with safe_load: no code is ever unpickled. A config.yaml written before a
key moved from `model` to `train` (model_config.MOVED_TO_TRAIN) still loads: the key is moved.

Training checkpoints (`TrainCheckpoint`, the resumable state under MODEL/checkpoint/) live here
too, in the same no-pickle way:

    checkpoint/model.safetensors      weights
    checkpoint/optimizer.safetensors  optimizer tensors (AdamW moments, per parameter id)
    checkpoint/state.json             {"step", "fingerprint", "trainer", "stream", "param_groups", "scalars"}

"stream" is the training input's position (epoch, batches_taken, steps_per_epoch; unipinrec.stream).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .actions import vocab_for
from .batches import ItemVocab
from .config import ExperimentConfig, TaskConfig, from_dict, to_dict, upgrade
from .model import KINDS, ModelConfig, UniPinRec
from .model_config import upgrade_config

WEIGHTS, CONFIG, ITEMS, META = "model.safetensors", "config.yaml", "items.parquet", "meta.json"


@dataclass
class LoadedModel:
    model: UniPinRec  # in eval mode
    config: ExperimentConfig
    vocab: ItemVocab
    tasks: TaskConfig
    version: str
    kind: str
    meta: dict

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks.tasks)


def _version(weights: bytes, config: bytes) -> str:
    return hashlib.sha256(weights + b"\0" + config).hexdigest()[:16]


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a reader never sees half a file


def save_model(directory: str | Path, model: UniPinRec, config: ExperimentConfig, vocab: ItemVocab,
               tasks: TaskConfig | None = None, kind: str | None = None, extra_meta: dict | None = None) -> str:
    """Write a model folder; returns the model version (content hash)."""
    kind = kind or model.config.kind
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {list(KINDS)}")
    if kind != model.config.kind:
        raise ValueError(f"kind {kind!r} does not match the model's kind {model.config.kind!r}")
    if len(vocab) != model.config.num_items:
        raise ValueError(f"the vocabulary has {len(vocab)} items but the model embeds {model.config.num_items}")
    tasks = tasks or config.tasks
    if len(tasks.tasks) != model.config.num_tasks:
        raise ValueError(f"{len(tasks.tasks)} tasks but the model predicts {model.config.num_tasks}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, model=model.config, tasks=tasks)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    weights = tmp.read_bytes()
    os.replace(tmp, directory / WEIGHTS)
    config_bytes = yaml.safe_dump(to_dict(config), sort_keys=False).encode()
    _write(directory / CONFIG, config_bytes)
    vocab.save(directory / ITEMS)
    version = _version(weights, config_bytes)
    meta = {
        "model_version": version,
        "kind": kind,
        "actions": list(vocab_for(config.data.source).names),
        "tasks": list(tasks.tasks),
        "score_weights": dict(tasks.score_weights),
        "positive_actions": list(tasks.positive_actions),
        "num_items": model.config.num_items,
        "max_history": model.config.max_history,
        "d_model": model.config.d_model,
        "time_gap": model.config.time_gap,
        "num_parameters": model.num_parameters(),
        **(extra_meta or {}),
    }
    _write(directory / META, (json.dumps(meta, indent=2) + "\n").encode())
    return version


def load_model(directory: str | Path, device: str | torch.device = "cpu", *, verify: bool = True,
               model_cls: type[UniPinRec] = UniPinRec) -> LoadedModel:
    """Read a model folder written by `save_model`; the model comes back in eval mode.
    `model_cls`: the UniPinRec subclass it was trained as (docs/extending.md)."""
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG, ITEMS, META):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} not found: is {directory} a unipinrec model folder?")
    config_bytes = (directory / CONFIG).read_bytes()
    config = from_dict(ExperimentConfig, upgrade(upgrade_config(yaml.safe_load(config_bytes) or {}, directory / CONFIG)))  # older folders load
    meta = json.loads((directory / META).read_text())
    if verify:
        actual = _version((directory / WEIGHTS).read_bytes(), config_bytes)
        if actual != meta.get("model_version"):
            raise ValueError(f"{directory}: model_version {meta.get('model_version')} in meta.json does not match "
                             f"the content hash {actual} of the weights and config")
    mcfg: ModelConfig = config.model
    model = model_cls(mcfg)
    state = load_file(str(directory / WEIGHTS), device="cpu")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    vocab = ItemVocab.load(directory / ITEMS)
    if len(vocab) != mcfg.num_items:
        raise ValueError(f"{directory / ITEMS}: {len(vocab)} items but the model embeds {mcfg.num_items}")
    return LoadedModel(model, config, vocab, config.tasks, meta["model_version"], meta.get("kind", mcfg.kind), meta)


# ---------------------------------------------------------------------------------------------
# Training checkpoints


def run_fingerprint(config: ExperimentConfig, ex_meta: dict, world: int) -> str:
    """What makes two runs the same run: the config, the examples' splits and size, the process count."""
    blob = json.dumps([to_dict(dataclasses.replace(config, validated=None)), ex_meta.get("splits"),
                       ex_meta.get("num_items"), world], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TrainCheckpoint:
    """The resumable state of one run in one folder, overwritten on each save. A save writes a
    sibling folder and renames it into place, so the last complete checkpoint is always on disk
    (`.old` is read when a kill fell between the two renames). `fingerprint` (run_fingerprint)
    guards against resuming another run's state."""

    def __init__(self, directory: str | Path, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def _readable(self) -> Path | None:
        old = self.directory.with_name(self.directory.name + ".old")
        for d in (self.directory, old):
            if (d / "state.json").exists():
                return d
        return None

    def exists(self) -> bool:
        return self._readable() is not None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer: dict,
             stream: dict | None = None) -> None:
        tmp = self.directory.with_name(self.directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        sd = optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, st in sd["state"].items():
            for name, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{name}"] = value
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": self.fingerprint, "trainer": trainer,
                                                    "stream": stream, "param_groups": sd["param_groups"],
                                                    "scalars": scalars}))
        old = self.directory.with_name(self.directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.directory.exists():
            os.replace(self.directory, old)
        os.replace(tmp, self.directory)
        shutil.rmtree(old, ignore_errors=True)

    def stream_position(self) -> dict | None:
        """The training input's position saved with the last checkpoint (None: not recorded)."""
        directory = self._readable()
        return None if directory is None else json.loads((directory / "state.json").read_text()).get("stream")

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore model and optimizer in place; returns the trainer's saved state."""
        directory = self._readable()
        if directory is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        state = json.loads((directory / "state.json").read_text())
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"{directory} holds a checkpoint of a different run (config, data or process count "
                             "changed); use a new --out folder or delete the checkpoint")
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
        tensors = load_file(str(directory / "optimizer.safetensors"))
        opt_state: dict = {}
        for key, value in list(tensors.items()) + list(state["scalars"].items()):
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        return state.get("trainer") or {"step": int(state["step"])}
