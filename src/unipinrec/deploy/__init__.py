"""Deploy to Kubernetes: render, plan, server-side apply, wait, smoke-test, roll back.

    from unipinrec.deploy import deploy_model, KubernetesApi, SmokeRequest
    result = deploy_model("manifests/overlays/prod", "3f2a9c1e", KubernetesApi())
    result.status   # "deployed" | "rolled_back" | "failed" | "planned"

    result = release_model(mar, model_dir, "/registry", "manifests/overlays/prod", KubernetesApi(),
                           record=DeploymentRecord("/registry/deployment"))  # publish, deploy, record

The cluster sits behind the small `KubeApi` protocol (`api.py`); `KubernetesApi` (`kube.py`)
imports the `kubernetes` client lazily, tests use an in-memory fake. `publish` writes model
versions into the registry (the serving pod fetches them: `unipinrec.serving.registry`),
`torchserve_config` renders the in-cluster config.properties (the token gateway lives with serving:
`unipinrec.serving.gateway`). The retraining CronJob submits
its runs through `unipinrec.kfp_client`.
"""
from __future__ import annotations

from .api import DeployError, HttpReply, KubeApi, Obj, ObjectRef
from .publish import publish_model
from .render import check_model_version, dump_objects, render, with_model_version
from .rollout import DeployResult, Plan, SmokeRequest, deploy_model, plan_deploy, release_model, rollout_state


def KubernetesApi(**kwargs):  # noqa: N802 - a factory that keeps `kubernetes` out of package import
    from .kube import KubernetesApi as _Api

    return _Api(**kwargs)


__all__ = ["DeployError", "DeployResult", "HttpReply", "KubeApi", "KubernetesApi", "Obj", "ObjectRef", "Plan",
           "SmokeRequest", "check_model_version", "deploy_model", "dump_objects", "plan_deploy", "publish_model",
           "release_model", "render", "rollout_state", "with_model_version"]
