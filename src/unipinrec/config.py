"""One config system: typed dataclasses loaded from YAML and validated once, at the edge.

`load_config(path)` returns an `ExperimentConfig`; unknown keys, wrong types and bad values
raise `ConfigError` naming the dotted field (e.g. `train.lr`). Sections are dataclasses that
live beside the code they configure (the model's `ModelConfig` in `model.py`, ...).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the dotted field."""


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        k_tp, v_tp = args if args else (Any, Any)
        return {_convert(k, k_tp, where): _convert(v, v_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly: unknown keys and bad types are errors.

    After construction a `validate()` method, when the class has one, checks cross-field rules
    and raises ValueError, which is reported against `where`.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where + '.' if where else ''}{key}: unknown field (known: {sorted(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required field is missing")
    try:
        obj = cls(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate()
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass (tree) as plain YAML/JSON-able values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------
# Sections owned by the data side. The model/train/eval sections are added by their modules.

@dataclass
class DataConfig:
    """Where examples come from and their shape."""

    source: str = "synthetic"  # synthetic | movielens-1m | movielens-100k
    path: str | None = None  # folder of the source files (MovieLens); unused for synthetic
    num_users: int = 2_000  # synthetic sizes
    num_items: int = 1_000
    num_requests_per_user: int = 20
    seed: int = 42
    max_history: int = 50  # L: the last L actions are kept
    slate_size: int = 10  # S: MovieLens next-action slates; synthetic slates have this many items
    # keep earlier impressions (shown, not engaged) in the history (`examples build --history-impressions`);
    # only for data with impressions (synthetic)
    history_impressions: bool = False

    def validate(self) -> None:
        if self.source not in ("synthetic", "movielens-1m", "movielens-100k"):
            raise ValueError(f"source '{self.source}' is not one of synthetic, movielens-1m, movielens-100k")
        for name in ("num_users", "num_items", "num_requests_per_user", "max_history", "slate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.history_impressions and self.source != "synthetic":
            raise ValueError(f"history_impressions needs data with impressions; source '{self.source}' has none")


@dataclass
class TaskConfig:
    """Which actions are positive for retrieval and which binary tasks the ranker predicts.

    Actions are named by the source's vocabulary (`unipinrec.actions`).
    """

    positive_actions: list[str] = field(default_factory=lambda: ["click", "save", "share"])
    tasks: dict[str, list[str]] = field(
        default_factory=lambda: {"engaged": ["click", "save", "share"], "saved": ["save"], "hidden": ["hide"]}
    )
    # serving utility = sum(weight * P(task)); tasks absent here weigh 0
    score_weights: dict[str, float] = field(default_factory=lambda: {"engaged": 1.0, "saved": 0.5, "hidden": -1.0})

    def validate(self) -> None:
        if not self.positive_actions:
            raise ValueError("positive_actions must name at least one action")
        if not self.tasks:
            raise ValueError("tasks must define at least one task")
        for name in self.score_weights:
            if name not in self.tasks:
                raise ValueError(f"score_weights.{name}: no such task (tasks: {sorted(self.tasks)})")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


# ---------------------------------------------------------------------------------------------
# The experiment: data + tasks + model + training + evaluation (owned by the model side).

from .model import ModelConfig  # noqa: E402  (imports torch; the model's section lives beside it)


@dataclass
class TrainConfig:
    """One-stage training (unipinrec.train)."""

    epochs: float = 10.0  # may be fractional; max_steps > 0 wins
    max_steps: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    alpha: float = 1.0  # loss = retrieval + alpha * ranking
    num_uniform_negatives: int = 128
    num_inbatch_negatives: int = 128
    logq_correction: bool = True
    full_softmax: bool = False  # retrieval loss over the whole catalog (negatives counts unused)
    max_slate: int = 16  # slate tokens kept per training example
    include_valid: bool = False  # also train on the valid split (HSTU's protocol trains on it)
    seed: int = 42
    checkpoint_every: int = 500  # steps; a resumable checkpoint (overwritten)
    log_every: int = 20
    eval_every_epochs: int = 0  # 0 = evaluate only at the end
    bf16: bool = True  # autocast on CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    # Where training runs (unipinrec.training_launch): local (this process) | torchrun (DDP workers
    # in this pod) | trainjob (a Kubeflow Trainer TrainJob across num_nodes pods; docs/pipeline.md).
    launcher: str = "local"
    num_nodes: int = 1  # trainjob only
    procs_per_node: int = 0  # 0 = one per GPU, else 1
    gpus_per_node: int = 0
    cpu_per_node: str = "4"  # trainjob: requests = limits per node
    memory_per_node: str = "16Gi"
    job_timeout_s: float = 86400.0  # trainjob: the step's wait, and the job's activeDeadlineSeconds
    keep_job: bool = False  # trainjob: keep the TrainJob and its PVC work folder after the step
    trainjob_runtime: str = "ClusterTrainingRuntime/torch-distributed"  # KIND/NAME of the runtimeRef

    def validate(self) -> None:
        from .training_launch import validate_launch

        validate_launch(self)
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("one of epochs or max_steps must be positive")
        for name in ("batch_size", "log_every", "checkpoint_every", "max_slate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if len(self.betas) != 2:
            raise ValueError("betas must hold two numbers")
        if self.num_uniform_negatives < 0 or self.num_inbatch_negatives < 0:
            raise ValueError("negative counts must be >= 0")
        if self.num_uniform_negatives + self.num_inbatch_negatives == 0 and not self.full_softmax:
            raise ValueError("the retrieval loss needs some negatives")


@dataclass
class EvalConfig:
    """Evaluation (unipinrec.evaluate)."""

    ks: list[int] = field(default_factory=lambda: [10, 50, 200])
    split: str = "test"
    batch_size: int = 256
    max_users: int = 0  # 0 = all
    exclude_history: bool = True  # drop the items of the (truncated) history from full ranking

    def validate(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ValueError("ks must be positive integers")
        if self.split not in ("train", "valid", "test"):
            raise ValueError(f"split {self.split!r} is not one of train, valid, test")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    validated: str | None = None  # when the figures in docs/results.md were produced with it

    def validate(self) -> None:
        if self.model.max_history != self.data.max_history:
            raise ValueError(f"model.max_history ({self.model.max_history}) must equal data.max_history "
                             f"({self.data.max_history})")


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an ExperimentConfig YAML file (ConfigError names the bad field)."""
    return from_dict(ExperimentConfig, load_yaml(path))
