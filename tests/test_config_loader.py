"""The strict config loader: unknown keys, wrong types and bad values name the dotted field."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from unipinrec.config import ConfigError, DataConfig, TaskConfig, from_dict, load_yaml, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    maybe: int | None = None


def test_builds_nested_dataclasses_and_converts_ints_to_floats():
    cfg = from_dict(Outer, {"name": "x", "inner": {"lr": 1, "steps": 3}, "weights": {"a": 2}})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.steps == 3 and cfg.weights == {"a": 2.0}
    assert to_dict(cfg)["inner"] == {"lr": 1.0, "steps": 3}


@pytest.mark.parametrize(
    "data, where",
    [
        ({"name": "x", "inner": {"lr": "fast"}}, "inner.lr"),
        ({"name": "x", "inner": {"steps": 1.5}}, "inner.steps"),
        ({"name": "x", "inner": {"stepz": 1}}, "inner.stepz"),
        ({"name": "x", "tags": "a"}, "tags"),
        ({"name": "x", "maybe": "no"}, "maybe"),
        ({}, "name"),
    ],
)
def test_errors_name_the_dotted_field(data, where):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert str(e.value).startswith(where)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="inner.steps"):
        from_dict(Outer, {"name": "x", "inner": {"steps": True}})


def test_validate_hooks_run_and_report_the_section():
    with pytest.raises(ConfigError, match="data: source 'kaggle'"):
        from_dict(DataConfig, {"source": "kaggle"}, "data")
    with pytest.raises(ConfigError, match="score_weights.clicks"):
        from_dict(TaskConfig, {"score_weights": {"clicks": 1.0}}, "tasks")


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(lst)
