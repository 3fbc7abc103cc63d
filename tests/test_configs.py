from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from unipinrec.config import ConfigError, ExperimentConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
JOBS_FILE = REPO / "bench" / "gpu_jobs.txt"  # the GPU jobs of docs/results.md: base config + override lines


def job_table() -> dict[str, tuple[str, list[str]]]:
    """bench/gpu_jobs.txt as {job: (base config, override lines)}."""
    jobs = {}
    for line in JOBS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            job, base, *overrides = line.split()
            assert job not in jobs, f"{job} is listed twice"
            jobs[job] = (base, overrides)
    return jobs


JOBS = job_table()


def _field(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_the_expected_configs_exist():
    assert {"tiny.yaml", "synthetic.yaml", "ml1m.yaml", "ml1m-large.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_says_how_to_run_it(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "unipinrec train --config configs/" + path.name in first


def test_ml1m_configs_use_hstu_settings():
    for name, layers in (("ml1m.yaml", 2), ("ml1m-large.yaml", 8)):
        cfg = load_config(next(p for p in CONFIGS if p.name == name))
        assert (cfg.model.max_history, cfg.model.d_model, cfg.model.n_layers) == (200, 50, layers)
        assert cfg.model.temperature == 0.05 and cfg.train.batch_size == 128
        assert cfg.train.num_uniform_negatives == 128 or cfg.train.full_softmax
        # our epoch holds ~2.4 windows per user: 40 epochs ~ HSTU's 101 in optimizer steps
        assert cfg.train.epochs >= (40 if cfg.train.full_softmax else 90)
        assert cfg.data.source == "movielens-1m" and list(cfg.tasks.tasks) == ["liked"]


def test_bad_values_name_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {n_heads: 3, d_model: 50}\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(p)
    p.write_text("model: {max_history: 20}\n")
    with pytest.raises(ConfigError, match="max_history"):
        load_config(p)
    p.write_text("train: {lr: 0}\n")
    with pytest.raises(ConfigError, match="lr"):
        load_config(p)


def test_the_job_table_holds_the_jobs_of_calls_3_to_8():
    assert len(JOBS) >= 40 and not (REPO / "configs" / "ml1m_variants").exists()
    assert {"ml1m-c3-sampled", "ml1m-drop03", "ml1m-c5-drop01", "synthetic-imp-c8-seed2"} <= set(JOBS)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_job_of_the_table_loads_through_the_strict_loader(job):
    base, overrides = JOBS[job]
    assert base in {f"configs/{p.name}" for p in CONFIGS}
    cfg = load_config(REPO / base, [f"name={job}", *overrides])
    assert isinstance(cfg, ExperimentConfig) and cfg.validated is None
    plain = load_config(REPO / base, [f"name={job}"])  # what the script runs without the lines
    for line in overrides:  # each line changes that (else it is noise, or stale)
        key = line.split("=", 1)[0]
        assert _field(cfg, key) != _field(plain, key), f"{job}: {line} is what {base} already has"


def test_docs_results_show_each_jobs_override_lines_beside_it():
    lines = (REPO / "docs" / "results.md").read_text().splitlines()
    for job, (_, overrides) in JOBS.items():
        shown = [ln for ln in lines if f"`{job}`" in ln]
        assert shown, f"docs/results.md does not mention {job}"
        wanted = [f"`{o}`" for o in overrides if not o.startswith("name=")]  # the name only labels the model
        assert any(all(w in ln for w in wanted) for ln in shown), f"{job}: no line shows {wanted}"


def test_the_gpu_commands_of_docs_results_run_table_jobs_or_committed_configs():
    text = (REPO / "docs" / "results.md").read_text().replace("\\\n", " ")
    commands = [line.split("bench/gpu_results.sh", 1)[1].split() for line in text.splitlines()
                if "bash bench/gpu_results.sh" in line]
    named = {arg.split(":")[0] for cmd in commands for arg in cmd[4:]}
    assert len(commands) >= 8 and set(JOBS) <= named
    as_committed = {"ml1m", "ml1m-large", "synthetic", "ml1m-retrieval_only", "ml1m-ranking_only"}  # calls 1, 2, 6, 7
    assert named - set(JOBS) <= as_committed


def test_gpu_results_sh_trains_each_job_as_its_base_plus_overrides():
    jobs = ["ml1m-drop03:0", "synthetic-imp-c8-seed1:1:--kind,ranking_only", "ml1m:0", "ml1m-large-x:0"]
    r = subprocess.run(["bash", "bench/gpu_results.sh", "runs/g", "runs/ml", "runs/syn", "10", *jobs], cwd=REPO,
                       env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line) for line in r.stdout.splitlines()]
    assert len(commands) == len(jobs) and all(c[:2] == ["unipinrec", "train"] for c in commands)

    def config_of(args: list[str]) -> ExperimentConfig:
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        return load_config(REPO / args[args.index("--config") + 1], sets)

    drop03, seed1, plain, large = commands
    base, overrides = JOBS["ml1m-drop03"]
    assert config_of(drop03) == load_config(REPO / base, ["name=ml1m-drop03", *overrides])
    assert config_of(drop03).model.dropout == 0.3 and config_of(drop03).name == "ml1m"  # the table's name= wins
    assert config_of(seed1).train.seed == 1 and config_of(seed1).name == "synthetic-imp-c8-seed1"
    assert seed1[-2:] == ["--kind", "ranking_only"] and "cuda:1" in seed1
    assert "--set" not in plain and config_of(plain) == load_config(REPO / "configs" / "ml1m.yaml")
    assert config_of(large) == load_config(REPO / "configs" / "ml1m-large.yaml")  # by its name's prefix


def test_train_cli_set_overrides_and_names_a_bad_key(tmp_path):
    from typer.testing import CliRunner

    from unipinrec.cli import app

    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "meta.json").write_text("{}")
    args = ["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--examples", str(tmp_path / "ex"),
            "--out", str(tmp_path / "m")]
    for bad, named in (("model.dropuot=0.1", "model.dropuot: unknown field"), ("train.lr=fast", "train.lr: expected a number"),
                       ("train.lr", "expected section.key=value"), ("model.dropout=2", "model.dropout must be in")):
        r = CliRunner().invoke(app, [*args, "--set", "train.lr=2e-3", "--set", bad])
        assert r.exit_code == 1 and named in r.output, r.output
        assert not (tmp_path / "m").exists()  # nothing written


def test_train_cli_trains_with_the_overrides(tmp_path):
    import torch
    from typer.testing import CliRunner

    from unipinrec.checkpoint import load_model
    from unipinrec.cli import app
    from unipinrec.data import build_examples, generate_synthetic

    torch.set_num_threads(1)
    data = load_config(REPO / "configs" / "tiny.yaml").data
    generate_synthetic(tmp_path / "raw", num_users=data.synthetic_users, num_items=data.synthetic_items,
                       num_requests_per_user=data.synthetic_requests_per_user, seed=data.synthetic_seed, progress=False)
    build_examples(tmp_path / "raw", tmp_path / "ex", max_history=data.max_history, progress=False)
    r = CliRunner().invoke(app, ["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--examples",
                                 str(tmp_path / "ex"), "--out", str(tmp_path / "m"), "--no-progress",
                                 "--set", "model.dropout=0.05", "--set", "train.lr=2e-3", "--max-steps", "3"])
    assert r.exit_code == 0, r.output
    cfg = load_model(tmp_path / "m").config
    assert (cfg.model.dropout, cfg.train.lr, cfg.train.max_steps) == (0.05, 0.002, 3)
    assert "3 steps" in r.output


def test_a_model_folder_saved_before_the_renames_still_loads(tmp_path):
    import json

    from unipinrec.checkpoint import _version, load_model
    from unipinrec.serving.synthetic import make_model_dir

    make_model_dir(tmp_path / "m", num_items=30, d_model=16, n_layers=1, max_history=8)
    config = (tmp_path / "m" / "config.yaml").read_text()
    old = config.replace("synthetic_items:", "num_items:").replace("max_examples:", "max_users:")
    assert old != config and "  num_items: 1000" in old
    (tmp_path / "m" / "config.yaml").write_text(old)
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())  # the content hash of that older folder
    weights = (tmp_path / "m" / "model.safetensors").read_bytes()
    meta["model_version"] = _version(weights, old.encode())
    (tmp_path / "m" / "meta.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "m")
    assert loaded.config.data.synthetic_items == 1000 and loaded.config.model.num_items == 30
    with pytest.raises(ConfigError, match="data.num_items: renamed to data.synthetic_items"):
        load_config(tmp_path / "m" / "config.yaml")  # a config file is told the new name instead
