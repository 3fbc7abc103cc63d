"""The pipeline's steps as plain functions over folders: what each Kubeflow component calls.

A component (components/*.py) maps its artifacts to folders and calls one function here, so a
step runs the same in kfp's local runner, in a cluster pod, and in a test without kfp. Each
returns a JSON-able dict that the component logs as metrics or metadata.

The config is the ExperimentConfig YAML *text* (a pipeline parameter, so a run in a cluster
does not need the file); the pipeline's `config_overrides` lines and size parameters override it.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

SOURCES = ("synthetic", "movielens-1m", "movielens-100k", "raw", "events")
DEPLOY_MODES = ("local", "kubernetes", "none")


class StepError(RuntimeError):
    """A step cannot run with the inputs it was given; the message names the parameter."""


# ---------------------------------------------------------------------------------------------
# Config

def parse_config(config_yaml: str, *, overrides: str | Sequence[str] = (), num_users: int = 0, num_items: int = 0,
                 num_requests_per_user: int = 0, seed: int = -1, epochs: float = 0.0):
    """ExperimentConfig from YAML text, then its `section.key=value` override lines (the pipeline's
    `config_overrides`), then the pipeline's size/seed/epochs parameters (0 / -1 = keep the config's)."""
    from .config import load_config_text, override_lines

    sizes = {"data.synthetic_users": num_users, "data.synthetic_items": num_items,
             "data.synthetic_requests_per_user": num_requests_per_user}
    given = [f"{key}={n}" for key, n in sizes.items() if n > 0]
    if seed >= 0:
        given.append(f"train.seed={seed}")
    if epochs > 0:
        given += [f"train.epochs={float(epochs)}", "train.max_steps=0"]
    return load_config_text(config_yaml, [*override_lines(overrides), *given])


def config_yaml_text(cfg) -> str:
    import yaml

    from .config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def with_overrides(config_yaml: str, overrides: str | Sequence[str]) -> str:
    """The config text with override lines applied and checked (unchanged when there are none):
    what a component hands to the steps that take config text."""
    from .config import override_lines

    if not override_lines(overrides):
        return config_yaml
    return config_yaml_text(parse_config(config_yaml, overrides=overrides))


# ---------------------------------------------------------------------------------------------
# Data

def ingest(out_dir: str | Path, *, source: str, data_path: str = "", config_yaml: str = "",
           num_users: int = 0, num_items: int = 0, num_requests_per_user: int = 0) -> dict:
    """Write a RAW folder: generate synthetic data, load MovieLens, copy a RAW folder (`raw`), or
    load the user's own events (`events`: data_path holds the files and an optional mapping.yaml;
    the config's data.source names the action vocabulary)."""
    from . import format as fmt

    out = Path(out_dir)
    if source not in SOURCES:
        raise StepError(f"source: {source!r} is not one of {', '.join(SOURCES)}")
    cfg = parse_config(config_yaml, num_users=num_users, num_items=num_items,
                       num_requests_per_user=num_requests_per_user)
    if source == "synthetic":
        from .data import generate_synthetic

        return generate_synthetic(out, num_users=cfg.data.synthetic_users, num_items=cfg.data.synthetic_items,
                                  num_requests_per_user=cfg.data.synthetic_requests_per_user,
                                  slate_size=cfg.data.slate_size, seed=cfg.data.synthetic_seed, progress=False)
    if not data_path:
        raise StepError(f"data_path: source {source!r} reads its files from data_path, which is empty")
    src = Path(data_path)
    if not src.is_dir():
        raise StepError(f"data_path: {src} is not a folder")
    if source == "raw":
        for sub in ("events", "items"):
            fmt.shard_paths(src / sub)  # FileNotFoundError names the missing folder
        out.mkdir(parents=True, exist_ok=True)
        for sub in ("events", "items", "oracle"):
            if (src / sub).is_dir():
                shutil.copytree(src / sub, out / sub, dirs_exist_ok=True)
        meta = fmt.read_meta(src)
        fmt.write_meta(out, {**meta, "copied_from": str(src)})
        return meta
    if source == "events":
        from .actions import vocab_for
        from .data.events import load_events, load_mapping

        mapping = load_mapping(src / "mapping.yaml" if (src / "mapping.yaml").exists() else None)
        return load_events(src, out, vocab=vocab_for(cfg.data.source), vocab_source=cfg.data.source,
                           mapping=mapping, tasks=cfg.tasks)
    from .data.movielens import load_movielens

    return load_movielens(source, src, out)


def validate_raw(raw_dir: str | Path, out_dir: str | Path) -> dict:
    """Run the `events` and `items` data contracts; write one HTML page plus each report's files.

    Returns {"passed", "summary", "failed": {contract: [rules]}, "html": path, "rows": {...}}.
    """
    from .contracts import validate
    from .reports import validation_html

    raw, out = Path(raw_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = [validate(raw / "events", "events", out_dir=out), validate(raw / "items", "items", out_dir=out)]
    page = out / "report.html"
    page.write_text(validation_html(reports))
    failed = {r.contract: [f.rule for f in r.failed] for r in reports if not r.success}
    summary = "\n".join(r.render_text() for r in reports)
    return {"passed": not failed, "failed": failed, "summary": summary, "html": str(page),
            "rows": {r.contract: r.rows_validated for r in reports},
            "failed_expectations": sum(len(v) for v in failed.values())}


def build_features(raw_dir: str | Path, repo_dir: str | Path, *, config_yaml: str = "", env: str = "local",
                   snapshots: str = "requests") -> dict:
    """Feast: copy the definitions, write the sources from RAW, apply, materialize.

    snapshots: "requests" stores a user's history at each time an example looks it up (the
    example builder's request times) and the latest one; "actions" after every action (exact
    at any time, but rows x L grows with every action)."""
    from .features import build_feature_store, request_times

    if snapshots not in ("requests", "actions"):
        raise StepError(f"snapshots: {snapshots!r} is not requests or actions")
    cfg = parse_config(config_yaml)
    rule = cfg.data.history_impressions  # the history rule of the examples this store will serve
    at = request_times(raw_dir, cfg.data.max_history, cfg.data.slate_size) if snapshots == "requests" else None
    return build_feature_store(raw_dir, repo_dir, max_history=cfg.data.max_history, env=env, at=at,
                               history_impressions=rule)


def build_examples(raw_dir: str | Path, repo_dir: str | Path, out_dir: str | Path, *, config_yaml: str = "",
                   env: str = "local", report_dir: str | Path | None = None, bucket: int | None = None,
                   buckets: int = 1) -> dict:
    """UnifiedExamples whose histories come from Feast (point in time at request_ts); the slates
    and splits come from the example builder. With `report_dir`, checked with the `examples` contract.

    bucket: only the users in user-hash bucket `bucket` of `buckets` (one pod of a parallel build;
    `merge_examples` assembles the parts). Feast is asked for those users' (user, request_ts)
    only, and a point-in-time lookup depends on nothing else, so the records are the full build's.
    """
    from .data import build_examples as build
    from .features import attach_histories

    if buckets < 1:
        raise StepError(f"buckets: must be at least 1, got {buckets}")
    if bucket is not None and not 0 <= bucket < buckets:
        raise StepError(f"bucket: must be in 0..{buckets - 1} (buckets={buckets}), got {bucket}")
    cfg = parse_config(config_yaml)
    with tempfile.TemporaryDirectory(prefix="unipinrec-ex-") as tmp:
        meta = build(raw_dir, tmp, max_history=cfg.data.max_history, slate_size=cfg.data.slate_size, progress=False,
                     history_impressions=cfg.data.history_impressions, bucket=bucket, buckets=buckets)
        stats = attach_histories(tmp, repo_dir, out_dir, env=env)
    result = {"splits": meta["splits"], "feast": stats,
              "history_differs_from_builder": sum(v["history_differs_from_builder"] for v in stats.values())}
    if report_dir is not None:
        result.update(_check_examples(out_dir, report_dir))
    return result


def bucket_ids(buckets: int) -> list[int]:
    """The buckets of a parallel example build, 0..buckets-1 (what the pipeline fans out over)."""
    if buckets < 1:
        raise StepError(f"example_buckets: must be at least 1, got {buckets}")
    return list(range(buckets))


def merge_examples(part_dirs: Sequence[str | Path], out_dir: str | Path, *,
                   report_dir: str | Path | None = None) -> dict:
    """One examples folder from the bucket parts of a parallel build (unipinrec.data.buckets): the
    folder the one-process build writes. With `report_dir`, checked with the `examples` contract."""
    from .data.buckets import merge_buckets

    try:
        meta = merge_buckets(part_dirs, out_dir)
    except ValueError as e:
        raise StepError(f"parts: {e}") from e
    feast = meta.get("feast") or {}
    result = {"splits": meta["splits"], "feast": feast, "buckets": meta["parallel_build"]["buckets"],
              "history_differs_from_builder": sum(v["history_differs_from_builder"] for v in feast.values())}
    if report_dir is not None:
        result.update(_check_examples(out_dir, report_dir))
    return result


def _check_examples(examples_dir: str | Path, report_dir: str | Path) -> dict:
    from .contracts import validate

    report = validate(examples_dir, "examples", out_dir=report_dir)
    if not report.success:
        raise StepError("the examples built from Feast break their contract:\n" + report.render_text())
    return {"contract_passed": report.success, "contract_failed": [f.rule for f in report.failed],
            "html": str(Path(report_dir) / "examples_validation.html")}


# ---------------------------------------------------------------------------------------------
# Model

def train(examples_dir: str | Path, out_dir: str | Path, *, config_yaml: str, seed: int = -1, epochs: float = 0.0,
          num_processes: int = 0, launcher: str = "", num_nodes: int = 0, keep_job: bool = False,
          cluster=None, api=None) -> dict:
    """Train one model with the config's launcher (or the `launcher` given): local, torchrun (DDP
    workers in this pod) or trainjob (a Kubeflow Trainer TrainJob; `cluster` is its
    training_launch.ClusterContext). num_processes / num_nodes: per node / nodes, 0 keeps the config's."""
    from .training_launch import LaunchError, launch, with_overrides

    cfg = parse_config(config_yaml, seed=seed, epochs=epochs)
    tc = with_overrides(dataclasses.replace(cfg.train, progress=False), launcher=launcher, num_nodes=num_nodes,
                        num_processes=num_processes, keep_job=keep_job)
    try:
        return launch(dataclasses.replace(cfg, train=tc), examples_dir, out_dir, cluster=cluster, api=api)
    except LaunchError as e:
        raise StepError(str(e)) from e


def evaluate(model_dir: str | Path, examples_dir: str | Path, out_dir: str | Path) -> dict:
    """Evaluation dict (also written to OUT/evaluation.json), ROC points per task and an HTML page,
    all from one inference pass: the curves are those of the predictions the AUCs came from."""
    from .evaluate import evaluate_with_predictions, write_metrics
    from .reports import evaluation_html, roc_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate_with_predictions(model_dir, examples_dir, progress=False)
    evaluation = result.metrics
    write_metrics(evaluation, out / "evaluation.json")
    roc = roc_curves(result.predictions)
    (out / "roc.json").write_text(json.dumps(roc) + "\n")
    (out / "report.html").write_text(evaluation_html(evaluation, model_dir=model_dir, roc=roc))
    return {"evaluation": evaluation, "roc": roc, "html": str(out / "report.html")}


def flat_metrics(evaluation: dict) -> dict[str, float]:
    """The scalar metrics worth a Kubeflow Metrics entry: retrieval@K, AUCs, oracle AUCs."""
    out = {}
    for k, v in (evaluation.get("retrieval") or {}).items():
        if isinstance(v, (int, float)) and "@" in k:
            out[f"retrieval_{k}"] = float(v)
    for k, v in (evaluation.get("popularity") or {}).items():
        if isinstance(v, (int, float)) and k.startswith(("HR@", "NDCG@")):
            out[f"popularity_{k}"] = float(v)
    for task, m in (evaluation.get("ranking") or {}).items():
        for name in ("auc", "gauc"):
            if m.get(name) is not None:
                out[f"{name}_{task}"] = float(m[name])
    for task, m in (evaluation.get("oracle") or {}).items():
        if isinstance(m, dict) and m.get("auc") is not None:
            out[f"oracle_auc_{task}"] = float(m["auc"])
    return out


def gate(candidate: dict, examples_dir: str | Path, deploy_dir: str | Path, *, metrics: str = "",
         tolerance: float = 0.01, force: bool = False) -> dict:
    """Compare the candidate's evaluation with the deployed model's, evaluated here on the same
    examples. A deployed model that cannot be evaluated on them blocks (unless `force`)."""
    from .deployment_record import DeploymentRecord
    from .evaluate import evaluate as run
    from .gate import GateDecision, gate as decide, parse_metrics

    record = DeploymentRecord(deploy_dir) if deploy_dir else None
    current = record.current() if record else None
    patterns, deployed_eval = parse_metrics(metrics), None
    if current is None:
        decision = decide(candidate, None, metrics=patterns, tolerance=tolerance)
    else:
        try:
            deployed_eval = run(current["model_dir"], examples_dir, progress=False)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            decision = GateDecision(False, f"the deployed model {current.get('model_version')} cannot be evaluated "
                                    f"on these examples ({type(e).__name__}: {e})", candidate.get("model_version"),
                                    current.get("model_version"), tolerance)
        else:
            decision = decide(candidate, deployed_eval, metrics=patterns, tolerance=tolerance)
    if force and not decision.promote:
        decision.promote, decision.reason = True, f"forced ({decision.reason})"
    if record:
        record.log("gate", **decision.to_dict())
    return {"decision": decision.to_dict(), "text": decision.render_text(), "deployed_evaluation": deployed_eval}


# ---------------------------------------------------------------------------------------------
# Serving

def build_index(model_dir: str | Path, examples_dir: str | Path, out_dir: str | Path) -> dict:
    from .index import build_index_for_model

    report = build_index_for_model(model_dir, out_dir, examples_dir=examples_dir)
    return dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(report)


def serving_feature_repo(deploy_mode: str, deploy_dir: str, override: str = "") -> str | None:
    """Where the server finds the Feast repo for user_id-only requests."""
    if override:
        return override
    if deploy_mode == "local" and deploy_dir:
        return str(Path(deploy_dir).resolve() / "features" / "current")
    return None


def package(model_dir: str | Path, index_dir: str | Path, out_dir: str | Path, *, feature_repo: str | None = None,
            feature_env: str = "local") -> dict:
    """unipinrec.mar: model, index, serving config; the online store is the Feast repo at
    `feature_repo` (as the server will see it), read through `unipinrec.features.online_store`."""
    from .serving.torchserve import build_archive

    store = {"factory": "unipinrec.features:online_store", "kwargs": {"repo_dir": feature_repo, "env": feature_env}} \
        if feature_repo else None
    t0 = time.perf_counter()
    mar = build_archive(model_dir, index_dir, out_dir, store=store)
    return {"mar": str(mar), "bytes": mar.stat().st_size, "seconds": time.perf_counter() - t0,
            "online_store": store}


def deploy(mar: str | Path, model_dir: str | Path, *, mode: str, deploy_dir: str = "",
           feature_repo: str | Path | None = None, evaluation: dict | None = None, registry_dir: str = "",
           overlay_dir: str = "", timeout_s: float = 600.0) -> dict:
    """local: hot-swap into the local TorchServe (unipinrec.release); kubernetes: publish the
    archive to the model registry and roll the Deployment out (unipinrec.deploy); none: record.
    Every mode records what it did in `deploy_dir` (unipinrec.deployment_record) when given."""
    from .deployment_record import DeploymentRecord, read_model_version

    if mode not in DEPLOY_MODES:
        raise StepError(f"deploy_mode: {mode!r} is not one of {', '.join(DEPLOY_MODES)}")
    record = DeploymentRecord(deploy_dir) if deploy_dir else None
    if mode == "local":
        from .release import deploy_local

        if not deploy_dir:
            raise StepError("deploy_dir: the local deployment needs a folder")
        out = deploy_local(mar, model_dir, deploy_dir, feature_repo=feature_repo, evaluation=evaluation,
                           timeout_s=timeout_s)
        return dataclasses.asdict(out)
    version = read_model_version(model_dir)
    if mode == "none":
        if record:
            record.log("deploy skipped (deploy_mode none)", model_version=version)
        return {"model_version": version, "message": "deploy_mode none: nothing deployed"}
    from .deploy import KubernetesApi, release_model

    if not registry_dir or not overlay_dir:
        raise StepError("registry_dir and overlay_dir: the kubernetes deployment needs both")
    result = release_model(mar, model_dir, registry_dir, overlay_dir, KubernetesApi(), record=record,
                           evaluation=evaluation, timeout_s=timeout_s)
    if result.status != "deployed":
        raise StepError(f"kubernetes deploy of {version}: {result.status}: {result.message}")
    return {"model_version": version, "status": result.status, "message": result.message}


def save_metrics(*artifacts) -> None:
    """Write each metrics artifact's values to its path as JSON. Kubeflow keeps metrics in the
    artifact's metadata; the file makes the artifact exist on disk, which kfp's local cache
    checks before it reuses a step's outputs."""
    for a in artifacts:
        Path(a.path).parent.mkdir(parents=True, exist_ok=True)
        Path(a.path).write_text(json.dumps(dict(a.metadata), default=str) + "\n")
