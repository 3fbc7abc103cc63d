"""Kubeflow Pipelines client: submit one run, schedule recurring runs, parse run parameters.

The one way to talk to a KFP server. Its two callers are the CLI (`unipinrec pipeline submit |
schedule`) and the retraining CronJob, whose command is `unipinrec pipeline submit
--pipeline-name unipinrec` (manifests/retraining). It lives in the library, not in
`pipelines/`, because the CronJob runs on the project image, which installs the package but
has no `pipelines/` folder: so this module takes either a compiled package (YAML) or the name
of a pipeline already uploaded to KFP, never the pipeline definition. Compiling stays in
`pipelines/run.py`, the CLI compiles first when it is given neither. kfp is imported inside the
functions: importing this module needs no kfp (the model and serving never import it).

In a multi-user Kubeflow the CronJob's pod authenticates with a projected service account token
(audience `pipelines.kubeflow.org`), which `kfp.Client` reads from `KF_PIPELINES_SA_TOKEN_PATH`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PIPELINE_NAME = "unipinrec"  # the uploaded pipeline; its newest version is what scheduled runs use


class KfpError(ValueError):
    """A run cannot be submitted or scheduled as asked; the message names the option."""


def parse_params(items: list[str]) -> dict[str, Any]:
    """`key=value` pipeline parameters; values are JSON when they parse as JSON (numbers,
    booleans, lists), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KfpError(f"--param: expected key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def make_client(host: str | None, namespace: str | None = None, existing_token: str | None = None):
    """A `kfp.Client`; host None is kfp's in-cluster default."""
    import kfp

    return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=existing_token)


@dataclass(frozen=True)
class RunRequest:
    """One run: of a compiled package, or of the newest version of an uploaded pipeline."""
    experiment: str = PIPELINE_NAME
    namespace: str | None = None  # the Kubeflow profile namespace (multi-user)
    pipeline_name: str | None = None
    package_path: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None  # default: <experiment>-<UTC time>
    service_account: str | None = None  # the runner SA for the pipeline's pods
    enable_caching: bool | None = None  # None: each step's own setting in the pipeline


def _experiment_id(client, name: str, namespace: str | None) -> str:
    try:
        return client.get_experiment(experiment_name=name, namespace=namespace).experiment_id
    except ValueError:  # kfp raises ValueError when no experiment has the name
        return client.create_experiment(name=name, namespace=namespace).experiment_id


def _pipeline_id(client, name: str, namespace: str | None) -> str | None:
    """The pipeline named `name`: in the profile namespace first, then among shared pipelines."""
    by_name = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    for ns in dict.fromkeys([namespace, None]):
        found = getattr(client.list_pipelines(filter=by_name, namespace=ns), "pipelines", None) or []
        if len(found) > 1:
            raise KfpError(f"pipeline_name: {len(found)} pipelines are named {name!r}; names must be unique")
        if found:
            return found[0].pipeline_id
    return None


def _latest_version_id(client, pipeline_id: str) -> str:
    versions = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=1, sort_by="created_at desc")
    items = getattr(versions, "pipeline_versions", None) or []
    if not items:
        raise KfpError(f"pipeline {pipeline_id} has no versions")
    return items[0].pipeline_version_id


def submit_run(client, req: RunRequest, now: datetime | None = None) -> str:
    """Submit the run into `req.experiment` (created when missing); returns its run id.
    `client` is a `kfp.Client` (or a test double)."""
    if bool(req.pipeline_name) == bool(req.package_path):
        raise KfpError("give exactly one of pipeline_name (uploaded to KFP) or package_path (compiled YAML)")
    now = now or datetime.now(timezone.utc)
    run_name = req.run_name or f"{req.experiment}-{now:%Y%m%d-%H%M%S}"
    experiment_id = _experiment_id(client, req.experiment, req.namespace)
    common = dict(params=dict(req.params), enable_caching=req.enable_caching, service_account=req.service_account)
    if req.package_path:
        run = client.run_pipeline(experiment_id, run_name, pipeline_package_path=req.package_path, **common)
    else:
        pipeline_id = _pipeline_id(client, req.pipeline_name, req.namespace)
        if pipeline_id is None:
            raise KfpError(f"pipeline_name: no pipeline named {req.pipeline_name!r} in KFP; upload it first "
                           "(`unipinrec pipeline schedule`, or docs/deploy.md, step 6)")
        run = client.run_pipeline(experiment_id, run_name, pipeline_id=pipeline_id,
                                  version_id=_latest_version_id(client, pipeline_id), **common)
    return run.run_id


def upload_version(client, package: str | Path, *, name: str = PIPELINE_NAME,
                   version: str | None = None) -> tuple[str, str]:
    """Upload the package as pipeline `name` (first time) or as a new version of it.
    Returns (pipeline_id, version_id)."""
    version = version or f"{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        p = client.upload_pipeline(str(package), pipeline_name=name,
                                   description="UniPinRec: unified retrieval + ranking, retrained on a schedule")
        pipeline_id = p.pipeline_id
    v = client.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pipeline_id)
    return pipeline_id, v.pipeline_version_id


def check_cron(cron: str) -> str:
    """A 5-field cron (minute hour day month weekday) as KFP's 6-field one (leading seconds)."""
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise KfpError(f"cron: {cron!r} must have 5 fields (minute hour day month weekday)")
    return cron if len(fields) == 6 else f"0 {cron}"


def recurring_run_body(experiment_id: str, pipeline_id: str, cron: str, arguments: dict[str, Any], *,
                       job_name: str = "unipinrec-retraining"):
    """The KFP v2beta1 RecurringRun: cron trigger, max concurrency 1, no catch-up, and a pipeline
    reference WITHOUT a version id, which the API resolves to the latest version at each run
    (`kfp.Client.create_recurring_run` insists on a fixed version, hence the body by hand)."""
    import kfp_server_api as api

    return api.V2beta1RecurringRun(
        experiment_id=experiment_id, display_name=job_name,
        description="UniPinRec retraining: the latest pipeline version, one run at a time",
        mode=api.RecurringRunMode.ENABLE,
        pipeline_version_reference=api.V2beta1PipelineVersionReference(pipeline_id=pipeline_id),
        runtime_config=api.V2beta1RuntimeConfig(parameters=dict(arguments)),
        trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron=check_cron(cron))),
        max_concurrency=1, no_catchup=True)


def schedule(client, package: str | Path, cron: str, arguments: dict[str, Any], *, experiment: str = PIPELINE_NAME,
             job_name: str = "unipinrec-retraining", namespace: str | None = None) -> dict:
    """Upload `package` as a new version of pipeline `unipinrec`, then a recurring run on `cron`
    (UTC) with max concurrency 1 that always runs the latest version."""
    check_cron(cron)  # a bad cron fails before anything is uploaded
    pipeline_id, version_id = upload_version(client, package)
    body = recurring_run_body(_experiment_id(client, experiment, namespace), pipeline_id, cron, arguments,
                              job_name=job_name)
    job = client._recurring_run_api.recurring_run_service_create_recurring_run(recurring_run=body)
    return {"recurring_run_id": job.recurring_run_id, "pipeline_id": pipeline_id, "uploaded_version_id": version_id,
            "cron": body.trigger.cron_schedule.cron, "max_concurrency": body.max_concurrency,
            "pipeline_version": "latest"}
