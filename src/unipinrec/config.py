"""One config system: typed dataclasses loaded from YAML and validated once, at the edge.

`load_config(path, overrides)` returns an `ExperimentConfig`; unknown keys, wrong types and bad
values raise `ConfigError` naming the dotted field (e.g. `train.lr`). Overrides are
`section.key=value` lines (`unipinrec train --set train.lr=2e-3`, the pipeline's
`config_overrides`), their values YAML, checked by the same loader. Sections are dataclasses that
live beside the code they configure (the model's `ModelConfig` in `model.py`, ...).
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from .model_config import MOVED_TO_TRAIN  # torch-free

T = TypeVar("T")

# YAML 1.1 (PyYAML) reads `2e-3` as a string; a float field takes it as the number it spells
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")

# fields renamed since configs were written (old dotted key -> new); an old key names its new one
RENAMED = {"data.num_users": "data.synthetic_users", "data.num_items": "data.synthetic_items",
           "data.num_requests_per_user": "data.synthetic_requests_per_user", "data.seed": "data.synthetic_seed",
           "eval.max_users": "eval.max_examples",
           **{f"model.{k}": f"train.{k}" for k in MOVED_TO_TRAIN}}  # the one list of training-only moves


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
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            return float(value)
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
        path = f"{where}.{key}" if where else key
        if path in RENAMED:
            raise ConfigError(f"{path}: renamed to {RENAMED[path]}")
        raise ConfigError(f"{path}: unknown field (known: {sorted(names)})")
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
        field_name = str(e).split(" ", 1)[0]  # "lr must be positive" reads as "train.lr must be positive"
        if where and field_name in names:
            raise ConfigError(f"{where}.{e}") from e
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
    # the synthetic world's size and seed (`source: synthetic` only; MovieLens brings its own)
    synthetic_users: int = 2_000
    synthetic_items: int = 1_000  # catalog size; the model's `model.num_items` comes from the data
    synthetic_requests_per_user: int = 20
    synthetic_seed: int = 42
    max_history: int = 50  # L: the last L actions are kept
    slate_size: int = 10  # S: MovieLens next-action slates; synthetic slates have this many items
    # keep earlier impressions (shown, not engaged) in the history (`examples build --history-impressions`);
    # only for data with impressions (synthetic)
    history_impressions: bool = False

    def validate(self) -> None:
        if self.source not in ("synthetic", "movielens-1m", "movielens-100k"):
            raise ValueError(f"source '{self.source}' is not one of synthetic, movielens-1m, movielens-100k")
        for name in ("synthetic_users", "synthetic_items", "synthetic_requests_per_user", "max_history", "slate_size"):
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
        for name, w in self.score_weights.items():
            if name not in self.tasks:
                raise ValueError(f"score_weights.{name}: no such task (tasks: {sorted(self.tasks)})")
            if not math.isfinite(w):  # an infinite weight makes utilities -inf or NaN: no order to serve
                raise ValueError(f"score_weights.{name}: must be a finite number, got {w}")


def parse_yaml(text: str, where: str) -> dict:
    """A YAML mapping from text; `where` (a file, a parameter) names it in errors."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping")
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    return parse_yaml(path.read_text(), str(path))


def upgrade(data: dict) -> dict:
    """A saved config mapping with the `RENAMED` keys under their new names, so that model
    folders written before a rename still load (config files get an error naming the new key)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in RENAMED.items():
        (old_section, old_key), (new_section, new_key) = old.split(".", 1), new.split(".", 1)
        if isinstance(out.get(old_section), dict) and old_key in out[old_section]:
            out.setdefault(new_section, {})[new_key] = out[old_section].pop(old_key)
    return out


# ---------------------------------------------------------------------------------------------
# Overrides: `section.key=value` lines applied to a loaded config, checked by the same loader.

def override_lines(overrides: str | Sequence[str]) -> list[str]:
    """Override lines from a list, or from one string split at newlines and `;` (a pipeline
    parameter); blank lines and `#` comments are dropped."""
    lines = re.split(r"[\n;]", overrides) if isinstance(overrides, str) else list(overrides)
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def parse_override(line: str) -> tuple[str, Any]:
    """`section.key=value` as (dotted key, value); the value is YAML: `2e-3`, `true`, `[10,50]`."""
    key, sep, text = line.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {line!r}: expected section.key=value")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: {text.strip()!r} is not a YAML value ({e.problem})") from e


def _set(data: dict, cls: type, key: str, value: Any) -> None:
    """data[section][...][key] = value, after checking that each part names a field of `cls`."""
    node, tp, parts = data, cls, key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        if dataclasses.is_dataclass(tp):
            names = sorted(f.name for f in dataclasses.fields(tp) if f.init)
            if part not in names:
                if where in RENAMED:
                    raise ConfigError(f"{key}: renamed to {RENAMED[where]}")
                raise ConfigError(f"{key}: unknown field{' ' + where if where != key else ''} (known: {names})")
            tp = typing.get_type_hints(tp)[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        else:
            raise ConfigError(f"{key}: {'.'.join(parts[:depth])} is a value, not a section")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]


def with_overrides(cfg: T, overrides: str | Sequence[str]) -> T:
    """`cfg` with the override lines applied in order, built and validated again by `from_dict`.

    An overridden ExperimentConfig drops its `validated` note: its figures were for the file.
    """
    pairs = [parse_override(line) for line in override_lines(overrides)]
    if not pairs:
        return cfg
    data = to_dict(cfg)
    for key, value in pairs:
        _set(data, type(cfg), key, value)
    if "validated" in data and "validated" not in dict(pairs):
        data["validated"] = None
    return from_dict(type(cfg), data)


# ---------------------------------------------------------------------------------------------
# The experiment: data + tasks + model + training + evaluation (owned by the model side).

from .model_config import ModelConfig  # noqa: E402  (torch-free; the model's section, beside model.py)


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
    mam_rate: float = 0.15  # share of history tokens given the MASK action in training (MAM)
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
    data_loader: str = "stream"  # stream (unipinrec.stream: row groups read as needed) | memory (split collated once)
    loader_workers: int = -1  # stream reader processes per rank; 0 = in the training process; -1 = 2 on CUDA, 0 on CPU
    shuffle_buffer: int = 16384  # rows each stream reader shuffles through (bounds its memory)

    def validate(self) -> None:
        from .training_launch import validate_launch

        validate_launch(self)
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("one of epochs or max_steps must be positive")
        if self.data_loader not in ("stream", "memory"):
            raise ValueError(f"data_loader {self.data_loader!r} is not one of stream, memory")
        if self.loader_workers < -1:
            raise ValueError("loader_workers must be >= 0, or -1 (2 on CUDA, 0 on CPU)")
        if self.shuffle_buffer < self.batch_size:
            raise ValueError(f"shuffle_buffer ({self.shuffle_buffer}) must be at least batch_size ({self.batch_size})")
        for name in ("batch_size", "log_every", "checkpoint_every", "max_slate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if not 0.0 <= self.mam_rate < 1.0:
            raise ValueError("mam_rate must be in [0, 1)")
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
    max_examples: int = 0  # evaluate the first N examples of the split; 0 = all
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


def load_config(path: str | Path, overrides: str | Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate an ExperimentConfig YAML file, then apply `section.key=value` override
    lines (ConfigError names the bad field)."""
    return with_overrides(from_dict(ExperimentConfig, load_yaml(path)), overrides)


def load_config_text(text: str, overrides: str | Sequence[str] = (), *, where: str = "config_yaml") -> ExperimentConfig:
    """`load_config` for YAML text (a pipeline parameter); `where` names it in errors."""
    return with_overrides(from_dict(ExperimentConfig, parse_yaml(text, where)), overrides)
