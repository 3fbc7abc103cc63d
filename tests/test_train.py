"""Training: the tiny config end to end, resume after a kill, DDP with 2 processes on CPU (gloo)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unipinrec.checkpoint import load_model
from unipinrec.config import load_config
from unipinrec.train import lr_factor, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
CLI = [sys.executable, "-c", "from unipinrec.cli import main; main()"]


@pytest.fixture(scope="module")
def tiny_examples(tmp_path_factory, tiny_builder) -> Path:
    return tiny_builder(tmp_path_factory.mktemp("tiny"))


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    return env


def test_tiny_config_trains_and_saves_a_loadable_model(tiny_examples, tmp_path):
    torch.set_num_threads(1)
    cfg = load_config(TINY)
    summary = train(cfg, tiny_examples, tmp_path / "m", progress=False)
    assert summary["steps"] > 0 and summary["tokens_per_s"] > 0
    loaded = load_model(tmp_path / "m")
    assert loaded.version == summary["model_version"] and loaded.kind == "unified"
    assert loaded.config.model.num_items == 80 and loaded.config.model.num_tasks == 3
    log = (tmp_path / "m" / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,lr,loss") and len(log) > 3
    first, last = float(log[1].split(",")[3]), float(log[-1].split(",")[3])
    assert last < first  # it learns something
    assert (tmp_path / "m" / "curves.png").stat().st_size > 1000
    # same seed, same data -> same weights (the version is a content hash)
    again = train(cfg, tiny_examples, tmp_path / "m2", progress=False)
    assert again["model_version"] == summary["model_version"]
    # running a finished training again is a no-op
    assert train(cfg, tiny_examples, tmp_path / "m", progress=False)["model_version"] == summary["model_version"]


@pytest.mark.parametrize("kind", ["retrieval_only", "ranking_only", "interleaved"])
def test_baselines_train(tiny_examples, tmp_path, kind):
    torch.set_num_threads(1)
    cfg = load_config(TINY)
    summary = train(cfg, tiny_examples, tmp_path / kind, kind=kind, progress=False)
    assert load_model(tmp_path / kind).kind == kind
    assert summary["steps"] > 0


def test_resume_after_kill_equals_uninterrupted_run(tiny_examples, tmp_path):
    args = ["train", "--config", str(TINY), "--examples", str(tiny_examples), "--max-steps", "150", "--no-progress"]
    ref = subprocess.run(CLI + args + ["--out", str(tmp_path / "ref")], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(CLI + args + ["--out", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 60
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                step = json.loads(state.read_text())["step"]
            except (json.JSONDecodeError, KeyError, FileNotFoundError):
                step = 0
            if step >= 10:
                break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 10 <= step < 150, f"the kill did not land mid-run (checkpoint step {step})"
    assert not (out / "model.safetensors").exists()
    resumed = subprocess.run(CLI + args + ["--out", str(out)], env=_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from_step"] >= 10 and summary["steps"] == 150
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [int(line.split(",")[0]) for line in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # no duplicated rows after the resume


def test_ddp_two_processes_on_cpu_gloo(tiny_examples, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           sys.executable, "-c", "from unipinrec.cli import main; main()"]
    cmd += ["train", "--config", str(TINY), "--examples", str(tiny_examples), "--out", str(out), "--max-steps", "6",
            "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    digests = {json.loads((out / f"ddp_rank{i}.json").read_text())["digest"] for i in (0, 1)}
    assert len(digests) == 1  # gradients were all-reduced: both ranks hold the same weights
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert load_model(out).kind == "unified"


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_bad_config_and_examples_fail_with_named_field(tiny_examples, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("lr: 0.003", "lr: fast"))
    r = subprocess.run(CLI + ["train", "--config", str(bad), "--examples", str(tiny_examples), "--out",
                              str(tmp_path / "o")], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "train.lr" in r.stderr
    r = subprocess.run(CLI + ["train", "--config", str(TINY), "--examples", str(tmp_path), "--out",
                              str(tmp_path / "o")], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--examples" in r.stderr
    r = subprocess.run(CLI + ["train", "--config", str(TINY), "--examples", str(tiny_examples), "--out",
                              str(tmp_path / "o"), "--kind", "both"], env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "--kind" in r.stderr


def test_use_category_fills_the_buffer_from_the_items_table(tiny_examples, tmp_path):
    import dataclasses

    from unipinrec import format as fmt

    torch.set_num_threads(1)
    cfg = load_config(TINY)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, use_category=True))
    train(cfg, tiny_examples, tmp_path / "m", progress=False)
    loaded = load_model(tmp_path / "m")
    items = fmt.read_sharded(tiny_examples / "items", columns=["item_id", "category"])
    cats = dict(zip(items.column("item_id").to_pylist(), items.column("category").to_pylist()))
    assert loaded.config.model.num_categories == max(cats.values()) + 1  # 0 in the config = from the data
    buf = loaded.model.item_category
    assert buf[0] == 0 and buf[1:].tolist() == [cats[int(i)] + 1 for i in loaded.vocab.item_ids]
    assert loaded.model.category_emb.weight[1:].abs().sum() > 0


def test_history_impressions_must_match_the_examples_and_train_with_rank_similarity(tiny_examples, tmp_path):
    import dataclasses

    from unipinrec.data import build_examples

    cfg = load_config(TINY)
    with_imp = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, history_impressions=True),
                                   model=dataclasses.replace(cfg.model, rank_similarity=True),
                                   train=dataclasses.replace(cfg.train, max_steps=3, progress=False))
    with pytest.raises(ValueError, match="data.history_impressions is True"):
        train(with_imp, tiny_examples, tmp_path / "m0", device="cpu")
    raw = Path(json.loads((tiny_examples / "meta.json").read_text())["raw"])
    ex = build_examples(raw, tmp_path / "ex_imp", max_history=cfg.data.max_history, progress=False,
                        history_impressions=True)
    assert ex["history_impressions"] is True
    summary = train(with_imp, tmp_path / "ex_imp", tmp_path / "m1", device="cpu")
    assert summary["steps"] == 3
    loaded = load_model(tmp_path / "m1")
    assert loaded.config.data.history_impressions and loaded.model.rank_sim_weight is not None
    with pytest.raises(ValueError, match="history_impressions needs data with impressions"):
        dataclasses.replace(cfg.data, source="movielens-1m", history_impressions=True).validate()


def test_trainer_resumed_in_process_equals_one_fit(tiny_examples, tmp_path):
    """Trainer pieces: steps by hand and a checkpoint, then a new Trainer's fit() resumes from it
    and ends on the weights of one uninterrupted fit()."""
    import dataclasses

    from unipinrec.train import Trainer

    torch.set_num_threads(1)
    cfg = load_config(TINY)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=8, progress=False))
    ref = Trainer.build(cfg, tiny_examples, tmp_path / "ref")
    assert ref.fit()["steps"] == 8 and ref.state_dict() == {"step": 8}
    part = Trainer.build(cfg, tiny_examples, tmp_path / "part")
    for _ in range(3):
        stats = part.train_step(part.batch_for(part.step))
    assert part.step == 3 and {"loss", "retrieval_loss", "ranking_loss", "lr", "grad_norm"} <= stats.keys()
    part.checkpointer.save(part.step, part.model, part.optimizer, part.state_dict())
    resumed = Trainer.build(cfg, tiny_examples, tmp_path / "part")
    assert resumed.fit()["resumed_from_step"] == 3 and resumed.step == 8
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_check_examples_names_what_does_not_fit(tiny_examples):
    import dataclasses

    from unipinrec import format as fmt
    from unipinrec.train import check_examples

    cfg = load_config(TINY)
    meta = fmt.read_meta(tiny_examples)
    assert check_examples(cfg, tiny_examples, meta).names[0] == "impression"
    with pytest.raises(ValueError, match="actions .* differ from the 'synthetic' vocabulary"):
        check_examples(cfg, tiny_examples, {**meta, "actions": ["impression", "click"]})
    longer = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_history=meta["max_history"] + 1))
    with pytest.raises(ValueError, match="model.max_history .* exceeds the examples' max_history"):
        check_examples(longer, tiny_examples, meta)
    with pytest.raises(ValueError, match="data.history_impressions is True"):
        check_examples(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, history_impressions=True)),
                       tiny_examples, meta)


def _kill_after_checkpoint(cmd: list[str], out: Path, min_step: int) -> dict:
    """Start a training, SIGKILL it once a checkpoint at or past min_step is on disk; its state."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state_path, state, deadline = out / "checkpoint" / "state.json", {}, time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads(state_path.read_text())
        except (json.JSONDecodeError, FileNotFoundError):
            state = {}
        if state.get("step", 0) >= min_step:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return state


def test_stream_killed_mid_epoch_resumes_to_the_same_weights(tiny_examples, tmp_path):
    """The streaming loader with 2 workers over 5 shards: a run SIGKILLed mid-epoch and restarted
    ends on exactly the weights of an uninterrupted run (same batches, masks and negatives)."""
    from unipinrec.data import build_examples

    raw = Path(json.loads((tiny_examples / "meta.json").read_text())["raw"])
    ex = tmp_path / "ex"
    build_examples(raw, ex, max_history=load_config(TINY).data.max_history, rows_per_shard=50, progress=False)
    assert len(list((ex / "train").glob("part-*.parquet"))) == 5
    args = CLI + ["train", "--config", str(TINY), "--examples", str(ex), "--max-steps", "60", "--no-progress",
                  "--set", "train.loader_workers=2", "--set", "train.shuffle_buffer=64"]
    ref = subprocess.run(args + ["--out", str(tmp_path / "ref")], env=_env(), capture_output=True, text=True,
                         timeout=180)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    state = _kill_after_checkpoint(args + ["--out", str(out)], out, 10)
    assert 10 <= state.get("step", 0) < 60, f"the kill did not land mid-run ({state})"
    pos = state["stream"]
    assert pos["steps_per_epoch"] == 8 and pos["epoch"] * 8 + pos["batches_taken"] == state["step"]
    assert pos["batches_taken"] > 0  # mid-epoch
    resumed = subprocess.run(args + ["--out", str(out)], env=_env(), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "train_summary.json").read_text())["resumed_from_step"] == state["step"]
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_memory_loader_trains_and_a_stream_position_off_its_step_is_refused(tiny_examples, tmp_path):
    import dataclasses

    from unipinrec.train import MemoryLoader, Trainer

    torch.set_num_threads(1)
    cfg = load_config(TINY)
    mem = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data_loader="memory", max_steps=6,
                                                             progress=False))
    t = Trainer.build(mem, tiny_examples, tmp_path / "mem")
    assert isinstance(t.loader, MemoryLoader) and t.steps_per_epoch == 8
    assert t.fit()["num_train_examples"] == 227 and load_model(tmp_path / "mem").kind == "unified"
    stream = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=6, progress=False))
    part = Trainer.build(stream, tiny_examples, tmp_path / "s")
    part.train_step(part.batch_for(0))
    part.checkpointer.save(part.step, part.model, part.optimizer, part.state_dict(), stream=part.loader.position(2))
    with pytest.raises(ValueError, match="stream position .* does not match step 1"):
        Trainer.build(stream, tiny_examples, tmp_path / "s").fit()
    with pytest.raises(ValueError, match="train.data_loader 'disk' is not one of stream, memory"):
        from unipinrec.config import with_overrides

        with_overrides(cfg, ["train.data_loader=disk"])
