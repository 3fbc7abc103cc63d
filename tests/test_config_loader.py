"""The strict config loader: unknown keys, wrong types and bad values name the dotted field."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from unipinrec.config import (ConfigError, DataConfig, ExperimentConfig, TaskConfig, from_dict, load_config_text,
                               load_yaml, override_lines, to_dict, upgrade, with_overrides)


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


def test_validate_hooks_run_and_report_the_field():
    with pytest.raises(ConfigError, match="^data.source 'kaggle' is not one of"):
        from_dict(DataConfig, {"source": "kaggle"}, "data")
    with pytest.raises(ConfigError, match="score_weights.clicks"):
        from_dict(TaskConfig, {"score_weights": {"clicks": 1.0}}, "tasks")
    for bad in (float("inf"), float("-inf"), float("nan")):  # YAML's .inf / .nan: no order to serve by
        with pytest.raises(ConfigError, match="score_weights.engaged: must be a finite number"):
            from_dict(TaskConfig, {"score_weights": {"engaged": bad}}, "tasks")


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


def test_a_float_field_takes_yaml_1_1_exponents():
    # PyYAML reads `2e-3` as a string; the number it spells is what the author meant
    assert from_dict(Outer, {"name": "x", "inner": {"lr": "2e-3"}}).inner.lr == 0.002
    with pytest.raises(ConfigError, match="inner.lr"):
        from_dict(Outer, {"name": "x", "inner": {"lr": "2e-3x"}})


def test_overrides_set_typed_values_through_the_loader():
    cfg = from_dict(Outer, {"name": "x", "tags": ["a"]})
    out = with_overrides(cfg, ["inner.lr=2e-3", "inner.steps=7", "tags=[b, c]", "weights.w=2", "maybe=3"])
    assert (out.inner.lr, out.inner.steps, out.tags, out.weights, out.maybe) == (0.002, 7, ["b", "c"], {"w": 2.0}, 3)
    assert cfg.inner.lr == 1e-3  # the original is unchanged
    assert with_overrides(cfg, ["inner.steps=1", "inner.steps=2"]).inner.steps == 2  # in order, the last wins
    assert with_overrides(cfg, []) is cfg


@pytest.mark.parametrize(
    "line, message",
    [
        ("inner.lr=fast", "^inner.lr: expected a number, got 'fast'"),
        ("inner.steps=1.5", "^inner.steps: expected an integer"),
        ("inner.stepz=1", r"^inner.stepz: unknown field \(known: \['lr', 'steps'\]\)"),
        ("outer.lr=1", "^outer.lr: unknown field outer"),
        ("inner.lr.x=1", "^inner.lr.x: inner.lr is a value, not a section"),
        ("inner.lr", "expected section.key=value"),
        ("=3", "expected section.key=value"),
        ("inner..lr=3", "expected section.key=value"),
        ("tags=[a", "^tags: '\\[a' is not a YAML value"),
    ],
)
def test_a_bad_override_names_its_key(line, message):
    with pytest.raises(ConfigError, match=message):
        with_overrides(from_dict(Outer, {"name": "x"}), [line])


def test_override_lines_from_a_pipeline_parameter():
    text = "train.lr=2e-3; model.dropout=0.1\n# a comment\n\n  eval.ks=[10, 50]  "
    assert override_lines(text) == ["train.lr=2e-3", "model.dropout=0.1", "eval.ks=[10, 50]"]
    assert override_lines(["a.b=1", " ", "c.d=2"]) == ["a.b=1", "c.d=2"]
    cfg = load_config_text("name: t\n", text)
    assert (cfg.train.lr, cfg.model.dropout, cfg.eval.ks) == (0.002, 0.1, [10, 50])


def test_overrides_check_cross_field_rules_and_drop_the_validated_note():
    base = load_config_text("validated: 'figures of this file'\n")
    with pytest.raises(ConfigError, match="model.max_history .* must equal data.max_history"):
        with_overrides(base, ["model.max_history=20"])
    both = with_overrides(base, ["model.max_history=20", "data.max_history=20"])
    assert both.model.max_history == both.data.max_history == 20
    assert base.validated and both.validated is None  # the figures were not produced with the overrides
    with pytest.raises(ConfigError, match="^model.dropout must be in"):
        with_overrides(base, ["model.dropout=2"])
    assert isinstance(both, ExperimentConfig)


def test_renamed_fields_name_their_new_key_and_saved_configs_upgrade():
    with pytest.raises(ConfigError, match="^data.num_items: renamed to data.synthetic_items"):
        load_config_text("data: {num_items: 50}\n")
    with pytest.raises(ConfigError, match="^data.seed: renamed to data.synthetic_seed"):
        load_config_text("", ["data.seed=3"])
    old = {"data": {"num_users": 5, "num_items": 7, "seed": 3, "max_history": 20}, "model": {"max_history": 20}}
    cfg = from_dict(ExperimentConfig, upgrade(old))
    assert (cfg.data.synthetic_users, cfg.data.synthetic_items, cfg.data.synthetic_seed) == (5, 7, 3)
    assert old["data"]["num_items"] == 7  # the input mapping is left as it was
