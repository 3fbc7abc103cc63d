"""Deploy to Kubernetes: render, plan, server-side apply, wait, smoke-test, roll back.

    from unipinrec.deploy import deploy_model, KubernetesApi, SmokeRequest
    result = deploy_model("manifests/overlays/prod", "3f2a9c1e", KubernetesApi())
    result.status   # "deployed" | "rolled_back" | "failed" | "planned"

The cluster sits behind the small `KubeApi` protocol (`api.py`); `KubernetesApi` (`kube.py`)
imports the `kubernetes` client lazily, tests use an in-memory fake. The serving pod's
pieces live here too (the token gateway lives with serving: `unipinrec.serving.gateway`): `registry` (publish
and fetch model versions), `torchserve_config` (the in-cluster config.properties), and
`retrain` (submit a pipeline run from the retraining CronJob).
"""
from __future__ import annotations

from .api import DeployError, HttpReply, KubeApi, Obj, ObjectRef
from .registry import fetch_model, publish_model
from .render import check_model_version, dump_objects, render, with_model_version
from .rollout import DeployResult, Plan, SmokeRequest, deploy_model, plan_deploy, rollout_state


def KubernetesApi(**kwargs):  # noqa: N802 - a factory that keeps `kubernetes` out of package import
    from .kube import KubernetesApi as _Api

    return _Api(**kwargs)


__all__ = ["DeployError", "DeployResult", "HttpReply", "KubeApi", "KubernetesApi", "Obj", "ObjectRef", "Plan",
           "SmokeRequest", "check_model_version", "deploy_model", "dump_objects", "fetch_model", "plan_deploy",
           "publish_model", "render", "rollout_state", "with_model_version"]
