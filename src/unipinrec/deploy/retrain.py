"""Submit one run of the UniPinRec pipeline: what the retraining CronJob does on its schedule.

An alternative to a KFP recurring run, for clusters that prefer schedules in Kubernetes
objects (GitOps, `kubectl get cronjobs`). The run uses either the newest version of a
pipeline already uploaded to KFP (`pipeline_name`) or a compiled pipeline file
(`package_path`). In a multi-user Kubeflow the pod authenticates with a projected service
account token (audience `pipelines.kubeflow.org`), which `kfp.Client` reads from
`KF_PIPELINES_SA_TOKEN_PATH`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .api import DeployError


@dataclass(frozen=True)
class RetrainRequest:
    experiment: str = "unipinrec-retraining"
    namespace: str | None = None  # the Kubeflow profile namespace (multi-user)
    pipeline_name: str | None = "unipinrec"
    package_path: str | None = None
    params: dict[str, Any] | None = None
    run_name: str | None = None
    service_account: str | None = None  # the runner SA for the pipeline's pods


def make_client(host: str | None, namespace: str | None):
    import kfp  # lazily: only the CronJob and the CLI need it

    return kfp.Client(host=host, namespace=namespace or "kubeflow")


def _experiment_id(client, name: str, namespace: str | None) -> str:
    try:
        return client.get_experiment(experiment_name=name, namespace=namespace).experiment_id
    except ValueError:  # kfp raises ValueError when no experiment has the name
        return client.create_experiment(name=name, namespace=namespace).experiment_id


def _pipeline_id(client, name: str | None, namespace: str | None) -> str | None:
    """The pipeline named `name`: in the profile namespace first, then among shared pipelines."""
    by_name = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    for ns in dict.fromkeys([namespace, None]):
        found = getattr(client.list_pipelines(filter=by_name, namespace=ns), "pipelines", None) or []
        if len(found) > 1:
            raise DeployError(f"pipeline_name: {len(found)} pipelines are named {name!r}; names must be unique")
        if found:
            return found[0].pipeline_id
    return None


def _latest_version_id(client, pipeline_id: str) -> str:
    versions = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=1, sort_by="created_at desc")
    items = getattr(versions, "pipeline_versions", None) or []
    if not items:
        raise DeployError(f"pipeline {pipeline_id} has no versions")
    return items[0].pipeline_version_id


def submit_run(client, req: RetrainRequest, now: datetime | None = None) -> str:
    """Submit the run; returns its run id. `client` is a `kfp.Client` (or a test double)."""
    if bool(req.pipeline_name) == bool(req.package_path):
        raise DeployError("give exactly one of pipeline_name (uploaded to KFP) or package_path (compiled YAML)")
    now = now or datetime.now(timezone.utc)
    run_name = req.run_name or f"unipinrec-retrain-{now:%Y%m%d-%H%M%S}"
    experiment_id = _experiment_id(client, req.experiment, req.namespace)
    params = dict(req.params or {})
    if req.package_path:
        run = client.run_pipeline(experiment_id, run_name, pipeline_package_path=req.package_path, params=params,
                                  service_account=req.service_account)
    else:
        pipeline_id = _pipeline_id(client, req.pipeline_name, req.namespace)
        if pipeline_id is None:
            raise DeployError(f"pipeline_name: no pipeline named {req.pipeline_name!r} in KFP; upload it first "
                              "(docs/deploy.md, step 6)")
        run = client.run_pipeline(experiment_id, run_name, params=params, pipeline_id=pipeline_id,
                                  version_id=_latest_version_id(client, pipeline_id),
                                  service_account=req.service_account)
    return run.run_id


def parse_params(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are JSON when they parse as JSON (numbers, booleans), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeployError(f"param: expected key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
