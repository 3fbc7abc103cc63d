"""CLI commands: `unipinrec pipeline compile | run --local | submit | schedule | serve | request`.

The pipeline itself lives in the repository's `pipelines/` and `components/` packages (beside
`src/`, installed with the project by `pip install -e .`); only compile, run and a submit or
schedule without --package/--pipeline-name import them, so `submit --pipeline-name` (the
retraining CronJob's command) runs on the project image, which has the library only. Talking
to KFP is `unipinrec.kfp_client`; kfp is imported inside the commands only.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import List, Optional

import typer

from .common import fail, user_errors

pipeline_app = typer.Typer(help="The Kubeflow pipeline: compile, run locally, submit, schedule; serve what it deployed.",
                           no_args_is_help=True)

DEFAULT_ROOT = Path("runs/pipeline")
DEFAULT_DEPLOY = Path("runs/deploy")


def _pipelines():
    """The repository's `pipelines` package (pipeline definition, compile, local run)."""
    try:
        from pipelines import pipeline, run
    except ModuleNotFoundError as e:
        if e.name not in ("pipelines", "components"):
            raise
        fail(f"{e.name}/ is not installed: the pipeline commands run from a checkout of the repository, "
             "installed with `pip install -e .` (make setup)")
    return pipeline, run


def _config_text(config: Optional[Path]) -> Optional[str]:
    if config is None:
        return None
    if not config.is_file():
        fail(f"--config: {config} is not a file")
    from ..config import ConfigError
    from ..steps import parse_config

    pipeline, _ = _pipelines()
    text = pipeline.config_text(config)
    with user_errors(ConfigError):
        parse_config(text)  # a bad config fails here, naming the field, not in the third step
    return text


@pipeline_app.command("compile")
def compile_cmd(
    out: Path = typer.Option(Path("unipinrec_pipeline.yaml"), "--out", help="IR YAML to write (upload it in the Kubeflow UI)."),
    target: str = typer.Option("cluster", "--target", help="cluster: Redis features, Kubernetes deploy, the "
                               "model-registry volume | local: the defaults of `run --local`."),
    image: Optional[str] = typer.Option(None, "--image", help="Project image for every step (default: components/_image.py)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Default experiment config (default: configs/synthetic.yaml)."),
    gpus: int = typer.Option(0, "--gpus", help="GPUs for the train step (cluster)."),
    registry_pvc: str = typer.Option("unipinrec-model-registry", "--registry-pvc", help="PVC of the model registry (cluster)."),
) -> None:
    """Compile the pipeline to Kubeflow's IR YAML."""
    if target not in ("cluster", "local"):
        fail(f"--target: {target!r} is not cluster or local")
    if gpus < 0:
        fail(f"--gpus must be >= 0, got {gpus}")
    _, run = _pipelines()
    text = _config_text(config)
    path = run.compile_pipeline(out, cluster=target == "cluster", image=image, gpus=gpus, config_yaml=text,
                                registry_pvc=registry_pvc)
    names = run.component_names(path)
    typer.echo(f"wrote {path}: pipeline '{run.PIPELINE_NAME}', {len(names)} components: {', '.join(names)}")


@pipeline_app.command("run")
def run_cmd(
    local: bool = typer.Option(False, "--local", help="Run here with kfp's local SubprocessRunner (required; "
                               "use `submit` for a cluster)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment config (default: pipelines/demo.yaml, "
                                          "sized for a laptop; configs/*.yaml for the full ones)."),
    source: str = typer.Option("synthetic", "--source", help="synthetic | movielens-1m | movielens-100k | raw."),
    data_path: Optional[Path] = typer.Option(None, "--data-path", help="MovieLens files or a RAW folder (source raw)."),
    users: int = typer.Option(0, "--users", help="Synthetic users (0: the config's)."),
    items: int = typer.Option(0, "--items", help="Synthetic items (0: the config's)."),
    requests_per_user: int = typer.Option(0, "--requests-per-user", help="Synthetic feed requests per user (0: the config's)."),
    example_buckets: int = typer.Option(1, "--example-buckets", help="User-hash buckets the examples are built in, "
                                        "one build_examples task each (ParallelFor), then merged."),
    seed: int = typer.Option(-1, "--seed", help="Training seed (-1: the config's). A new seed retrains even when "
                             "every earlier step is cached."),
    epochs: float = typer.Option(0.0, "--epochs", help="Training epochs (0: the config's)."),
    deploy_dir: Path = typer.Option(DEFAULT_DEPLOY, "--deploy-dir", help="Local deployment: model store, current.json, history."),
    deploy_mode: str = typer.Option("local", "--deploy-mode", help="local (hot-swap into a running TorchServe) | none."),
    gate_metrics: str = typer.Option("retrieval.HR@10,ranking.*.auc", "--gate-metrics", help="Metrics the gate guards."),
    gate_tolerance: float = typer.Option(0.01, "--gate-tolerance", help="Largest allowed drop per guarded metric."),
    force_promote: bool = typer.Option(False, "--force-promote", help="Deploy even if the gate says keep."),
    pipeline_root: Path = typer.Option(DEFAULT_ROOT, "--pipeline-root", help="Where the steps' artifacts and the cache go."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse the outputs of unchanged deterministic steps."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
) -> None:
    """Run the whole pipeline locally: ingest, validate, features, examples, train, evaluate, gate,
    index, package, deploy. Prints one line per step; the full log goes to a file."""
    if not local:
        fail("only --local runs here; for a Kubeflow cluster use `unipinrec pipeline submit --host URL`")
    _check_run_options(source, data_path, deploy_mode, example_buckets,
                       {"--users": users, "--items": items, "--requests-per-user": requests_per_user,
                        "--epochs": epochs, "--gate-tolerance": gate_tolerance})
    pipeline, run = _pipelines()
    text = _config_text(config if config is not None else Path(pipeline.__file__).with_name("demo.yaml"))
    args = {"source": source, "data_path": str(data_path.resolve()) if data_path else "",
            "num_users": users, "num_items": items, "num_requests_per_user": requests_per_user, "seed": seed,
            "example_buckets": example_buckets,
            "epochs": float(epochs), "deploy_mode": deploy_mode, "deploy_dir": str(deploy_dir.resolve()),
            "gate_metrics": gate_metrics, "gate_tolerance": float(gate_tolerance), "force_promote": force_promote}
    args["config_yaml"] = text
    echo = None if as_json else (lambda line: typer.echo(line, err=True))
    if echo:
        echo(f"running pipeline '{run.PIPELINE_NAME}' locally (artifacts in {pipeline_root}/, cache "
             f"{'on' if cache else 'off'})")
    result = run.run_local(args, pipeline_root=pipeline_root, caching=cache, echo=echo)
    summary = _summary(result, deploy_dir)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        _print_summary(summary)
    if result.status != "SUCCESS":
        raise typer.Exit(1)


def _check_run_options(source: str, data_path: Optional[Path], deploy_mode: str, example_buckets: int,
                       non_negative: dict) -> None:
    from ..steps import DEPLOY_MODES, SOURCES

    if source not in SOURCES:
        fail(f"--source: {source!r} is not one of {', '.join(SOURCES)}")
    if deploy_mode not in ("local", "none"):
        fail(f"--deploy-mode: {deploy_mode!r} is not local or none (kubernetes runs through `submit`)"
             if deploy_mode in DEPLOY_MODES else f"--deploy-mode: {deploy_mode!r} is not local or none")
    if source != "synthetic" and data_path is None:
        fail(f"--data-path is required for --source {source}")
    if data_path is not None and not data_path.is_dir():
        fail(f"--data-path: {data_path} is not a folder")
    if example_buckets < 1:
        fail(f"--example-buckets must be >= 1, got {example_buckets}")
    for option, value in non_negative.items():
        if value < 0:
            fail(f"{option} must be >= 0, got {value}")


def _summary(result, deploy_dir: Path) -> dict:
    from ..deployment_record import DeploymentRecord

    record = DeploymentRecord(deploy_dir)
    s = result.to_dict()
    reports = {}
    for task, output in (("validate-data", "report"), ("merge-examples", "report"), ("evaluate", "report"),
                         ("gate", "report")):
        p = result.artifact(task, output)
        if p is not None:
            reports[task] = str(p.resolve())
    s["reports"] = reports
    if result.steps.get("gate") and result.steps["gate"].status == "SUCCESS":
        gate = record.last("gate")
        s["gate"] = {"promote": gate["promote"], "reason": gate["reason"]} if gate else None
    current = record.current()
    s["deployed"] = {k: current.get(k) for k in ("model_version", "deployed_at", "mar")} if current else None
    s["deploy_dir"] = str(deploy_dir.resolve())
    return s


def _print_summary(s: dict) -> None:
    typer.echo(f"pipeline {s['status']} in {s['seconds']:.0f} s; log: {s['log']}")
    if s.get("error"):
        typer.echo(f"  {s['error']}")
    if s.get("gate"):
        typer.echo(f"gate: {'PROMOTE' if s['gate']['promote'] else 'KEEP'} - {s['gate']['reason']}")
    if s.get("deployed"):
        typer.echo(f"deployed: {s['deployed']['model_version']} (since {s['deployed']['deployed_at']}) in {s['deploy_dir']}")
    for task, path in s["reports"].items():
        typer.echo(f"report ({task}): {path}")


def _run_arguments(params: List[str], config: Optional[Path], package: Optional[Path]) -> dict:
    """Pipeline arguments of a submitted or scheduled run, checked before anything is sent."""
    from ..kfp_client import KfpError, parse_params

    with user_errors(KfpError):
        args = parse_params(params)
    text = _config_text(config)
    if text is not None:
        args["config_yaml"] = text
    if package is not None and not package.is_file():
        fail(f"--package: {package} is not a file")
    return args


def _compiled(package: Optional[Path], tmp: str) -> Path:
    """The given package, or the pipeline compiled now for a cluster."""
    if package is not None:
        return package
    _, run = _pipelines()
    return run.compile_pipeline(Path(tmp) / "unipinrec_pipeline.yaml", cluster=True)


HOST_HELP = "Kubeflow Pipelines API, e.g. http://localhost:8888 or https://kubeflow.example.com/pipeline."
TOKEN_HELP = "Bearer token (or KFP_TOKEN; in a pod, the token at KF_PIPELINES_SA_TOKEN_PATH)."


@pipeline_app.command("submit")
def submit_cmd(
    host: Optional[str] = typer.Option(None, "--host", help=HOST_HELP + " Default: kfp's in-cluster default."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="Kubeflow profile namespace (multi-user)."),
    experiment: str = typer.Option("unipinrec", "--experiment", help="Experiment to file the run under (created when missing)."),
    package: Optional[Path] = typer.Option(None, "--package", help="Compiled YAML (default: compile now, target cluster)."),
    pipeline_name: Optional[str] = typer.Option(None, "--pipeline-name", help="Or run the newest version of this "
                                                "pipeline uploaded to KFP (what the retraining CronJob does)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment config for this run."),
    params: List[str] = typer.Option([], "--param", help="Pipeline parameter key=value (repeatable; JSON values)."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Run name (default: <experiment>-<UTC time>)."),
    service_account: Optional[str] = typer.Option(None, "--service-account", help="Runner service account for the run's pods."),
    token: Optional[str] = typer.Option(None, "--token", envvar="KFP_TOKEN", help=TOKEN_HELP),
) -> None:
    """Submit one run to a Kubeflow Pipelines server; prints the run id."""
    from ..kfp_client import RunRequest, make_client, submit_run

    if package is not None and pipeline_name:
        fail("give --package or --pipeline-name, not both")
    args = _run_arguments(params, config, package)
    with tempfile.TemporaryDirectory() as tmp, user_errors(ValueError, ConnectionError, OSError):
        path = None if pipeline_name else _compiled(package, tmp)
        req = RunRequest(experiment=experiment, namespace=namespace, pipeline_name=pipeline_name,
                         package_path=str(path) if path else None, params=args, run_name=run_name,
                         service_account=service_account)
        run_id = submit_run(make_client(host, namespace, token), req)
    typer.echo(f"submitted run {run_id} to {host or 'the in-cluster KFP'} (experiment {experiment})")


@pipeline_app.command("schedule")
def schedule_cmd(
    host: Optional[str] = typer.Option(None, "--host", help=HOST_HELP + " Default: kfp's in-cluster default."),
    cron: str = typer.Option("0 3 * * *", "--cron", help="When to retrain, 5-field cron in UTC (default: daily 03:00)."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="Kubeflow profile namespace (multi-user)."),
    experiment: str = typer.Option("unipinrec", "--experiment", help="Experiment of the recurring runs."),
    job_name: str = typer.Option("unipinrec-retraining", "--name", help="Recurring run name."),
    package: Optional[Path] = typer.Option(None, "--package", help="Compiled YAML to upload as the newest version."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment config for the scheduled runs."),
    params: List[str] = typer.Option([], "--param", help="Pipeline parameter key=value (repeatable; JSON values)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="KFP_TOKEN", help=TOKEN_HELP),
) -> None:
    """Upload the pipeline as a new version and create a recurring run (max concurrency 1, latest version)."""
    from ..kfp_client import KfpError, check_cron, make_client, schedule

    with user_errors(KfpError):
        check_cron(cron)  # a bad cron fails before anything is compiled or uploaded
    args = _run_arguments(params, config, package)
    with tempfile.TemporaryDirectory() as tmp, user_errors(ValueError, ConnectionError, OSError):
        out = schedule(make_client(host, namespace, token), _compiled(package, tmp), cron, args,
                       experiment=experiment, job_name=job_name, namespace=namespace)
    typer.echo(f"scheduled '{job_name}' on {host or 'the in-cluster KFP'}: cron '{out['cron']}', max concurrency 1, "
               "latest pipeline version")
    typer.echo(json.dumps(out))


@pipeline_app.command("serve")
def serve_cmd(
    deploy_dir: Path = typer.Option(DEFAULT_DEPLOY, "--deploy-dir", help="The local deployment the pipeline wrote."),
    stop: bool = typer.Option(False, "--stop", help="Stop the TorchServe of this deployment."),
    port: int = typer.Option(8080, "--port", help="Inference port (management = port+1, metrics = port+2)."),
    token_auth: bool = typer.Option(True, "--token-auth/--no-token-auth", help="TorchServe token auth."),
) -> None:
    """Start TorchServe on the deployed model (the pipeline's deploy step then hot-swaps new
    versions into it), or stop it."""
    from ..deployment_record import RecordError
    from ..release import ReleaseError, serve_deployed, stop_deployed
    from ..serving.torchserve import ServeError

    if stop:
        typer.echo("TorchServe stopped." if stop_deployed(deploy_dir) else f"no server running for {deploy_dir}")
        return
    if not 0 < port < 65534:
        fail(f"--port must be a TCP port, got {port}")
    with user_errors(ReleaseError, RecordError, ServeError):
        info = serve_deployed(deploy_dir, ports=(port, port + 1, port + 2), token_auth=token_auth)
    typer.echo(f"serving {deploy_dir}: POST {info['inference']}/predictions/unipinrec; management {info['management']}")
    typer.echo(f"stop with `unipinrec pipeline serve --stop --deploy-dir {deploy_dir}`")


@pipeline_app.command("request")
def request_cmd(
    user_id: int = typer.Option(..., "--user-id", help="User to recommend for (history read from the online store)."),
    deploy_dir: Path = typer.Option(DEFAULT_DEPLOY, "--deploy-dir", help="The local deployment whose server to ask."),
    k: int = typer.Option(10, "--k", help="Items to return."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw response."),
) -> None:
    """Ask the running TorchServe of a deployment for a user's top-k, with per-stage timings."""
    from ..release import ReleaseError, recommend

    if k <= 0:
        fail(f"--k must be positive, got {k}")
    with user_errors(ReleaseError):
        status, body, wall_ms = recommend(deploy_dir, {"user_id": user_id, "k": k})
    if status != 200:
        fail(f"HTTP {status}: {json.dumps(body)}")
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    typer.echo(f"user {user_id}: top {len(body['items'])} from model {body.get('model_version')}")
    typer.echo(f"{'#':>3} {'item_id':>8} {'score':>8} {'retrieval':>9}  tasks")
    for i, item in enumerate(body["items"], 1):
        tasks = " ".join(f"{t}={p:.3f}" for t, p in (item.get("tasks") or {}).items())
        typer.echo(f"{i:>3} {item['item_id']:>8} {item['score']:>8.4f} {item.get('retrieval_score', 0):>9.4f}  {tasks}")
    timings = "  ".join(f"{s} {ms:.1f} ms" for s, ms in (body.get("timings_ms") or {}).items())
    typer.echo(f"server stages: {timings}; round trip {wall_ms:.1f} ms")


def register(app: typer.Typer) -> None:
    app.add_typer(pipeline_app, name="pipeline")
