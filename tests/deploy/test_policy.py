"""Security and operability policy over every rendered object of every kustomization.

Probes: long-running containers (Deployments, StatefulSets, the InferenceService predictor)
must have readiness and liveness probes. Init containers and Job/CronJob containers run to
completion, so probes do not apply to them; they still need requests and limits.
"""
from __future__ import annotations

import pytest

from unipinrec.deploy.torchserve_config import parse_properties, torchserve_config

from .conftest import KUSTOMIZATIONS, MANIFESTS, containers

MANAGEMENT_PORT = 8081


def _all(rendered):
    for name in KUSTOMIZATIONS:
        for obj in rendered[name]:
            yield name, obj


def _where(name, obj, c=None):
    return f"{name}: {obj['kind']}/{obj['metadata']['name']}" + (f" container {c.get('name', '(model)')}" if c else "")


def _workload_containers(rendered):
    for name, obj in _all(rendered):
        if obj["kind"] == "ServingRuntime":
            continue  # its container is merged with the InferenceService's model spec, checked there
        for role, c, pod in containers(obj):
            yield name, obj, role, c, pod


def test_there_are_containers_to_check(rendered):
    seen = {(obj["kind"], c.get("name", "model")) for _, obj, _, c, _ in _workload_containers(rendered)}
    assert {("Deployment", "torchserve"), ("Deployment", "fetch-model"), ("StatefulSet", "redis"),
            ("Deployment", "feature-server"), ("CronJob", "submit"), ("InferenceService", "model")} <= seen


def test_no_container_runs_as_root(rendered):
    for name, obj, _, c, pod in _workload_containers(rendered):
        sc, psc = c.get("securityContext") or {}, pod.get("securityContext") or {}
        where = _where(name, obj, c)
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
        assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("privileged", False) is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
        assert (psc.get("seccompProfile") or sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where


def test_every_container_has_requests_and_limits(rendered):
    for name, obj, _, c, _ in _workload_containers(rendered):
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{_where(name, obj, c)}: {kind}"


def test_long_running_containers_have_probes(rendered):
    checked = 0
    for name, obj, role, c, _ in _workload_containers(rendered):
        if role == "init" or obj["kind"] in ("Job", "CronJob", "TrainingRuntime"):
            continue  # run to completion: no probes
        assert "readinessProbe" in c and "livenessProbe" in c, _where(name, obj, c)
        checked += 1
    assert checked >= 5


def test_torchserve_probes_go_through_the_gateway(rendered):
    dep = next(o for o in rendered["overlays/prod"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "unipinrec-serving")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == 8080


def test_no_service_exposes_the_management_port(rendered):
    services = 0
    for name, obj in _all(rendered):
        if obj["kind"] == "Service":
            services += 1
            for p in obj["spec"]["ports"]:
                assert MANAGEMENT_PORT not in (p["port"], p.get("targetPort"), p.get("nodePort")), _where(name, obj)
        for _, c, _ in containers(obj):
            assert all(p["containerPort"] != MANAGEMENT_PORT for p in c.get("ports", [])), _where(name, obj, c)
    assert services >= 3


def test_serving_service_exposes_only_inference_and_metrics(rendered):
    svc = next(o for o in rendered["overlays/prod"] if o["kind"] == "Service" and o["metadata"]["name"] == "unipinrec-serving")
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [8080, 8082]


def _config_properties(rendered):
    for name, obj in _all(rendered):
        if obj["kind"] == "ConfigMap" and "config.properties" in obj.get("data", {}):
            yield name, obj, parse_properties(obj["data"]["config.properties"])


def test_token_auth_is_not_disabled_in_any_cluster_manifest(rendered):
    configs = list(_config_properties(rendered))
    assert configs, "no TorchServe config.properties rendered"
    for name, obj, props in configs:
        assert props.get("disable_token_authorization", "false").lower() != "true", _where(name, obj)
        # env-var config stays off so TS_DISABLE_TOKEN_AUTHORIZATION cannot switch auth off either
        assert props.get("enable_envvars_config", "false").lower() == "false", _where(name, obj)
        assert props["management_address"].startswith("http://127.0.0.1:"), _where(name, obj)
        assert props["inference_address"].startswith("http://127.0.0.1:"), _where(name, obj)
        assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1", _where(name, obj)
    for name, obj, _, c, _ in _workload_containers(rendered):
        argv = [*c.get("command", []), *c.get("args", [])]
        assert "--disable-token-auth" not in argv, _where(name, obj, c)
        assert all(e["name"] != "TS_DISABLE_TOKEN_AUTHORIZATION" for e in c.get("env", [])), _where(name, obj, c)
    # and in the files themselves (a patch could hide it from one rendering but not from the tree)
    for path in MANIFESTS.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "--disable-token-auth" not in text, path
            assert not any(k == "disable_token_authorization" and v.lower() == "true"
                           for k, v in parse_properties(text).items()), path


def test_kserve_layout_config_keeps_token_auth_on():
    props = parse_properties(torchserve_config("/mnt/models/model-store"))
    assert "disable_token_authorization" not in props and props["enable_envvars_config"] == "false"
    assert props["model_store"] == "/mnt/models/model-store" and props["load_models"] == "unipinrec.mar"


def test_committed_config_properties_is_the_generated_one():
    committed = (MANIFESTS / "base" / "config.properties").read_text()
    assert committed == torchserve_config("/home/model-server/model-store"), \
        "regenerate manifests/base/config.properties from unipinrec.deploy.torchserve_config"


def test_committed_gpu_config_properties_is_the_generated_one():
    committed = (MANIFESTS / "overlays" / "gpu" / "config.properties").read_text()
    assert committed == torchserve_config("/home/model-server/model-store", gpus=1), \
        "regenerate manifests/overlays/gpu/config.properties from unipinrec.deploy.torchserve_config(..., gpus=1)"


def test_torchserve_writes_only_into_mounted_volumes(rendered):
    """readOnlyRootFilesystem: TorchServe's working dir (key file), TEMP, LOG_LOCATION, HOME are mounts."""
    workloads = [o for o in rendered["overlays/prod"] if o["kind"] == "Deployment"]
    workloads += [o for o in rendered["kserve"] if o["kind"] == "InferenceService"]
    for obj in workloads:
        for role, c, pod in containers(obj):
            if role == "init":
                continue
            mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")]
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if obj["kind"] == "InferenceService":  # env and workingDir come from the ServingRuntime
                rt = next(o for o in rendered["kserve"] if o["kind"] == "ServingRuntime")["spec"]["containers"][0]
                env |= {e["name"]: e.get("value") for e in rt["env"]}
                c = {**rt, **c}
            paths = [env.get(k) for k in ("TEMP", "TMPDIR", "HOME", "LOG_LOCATION")] + [c.get("workingDir")]
            if obj["metadata"]["name"] == "feast-feature-server":
                paths = [env["HOME"], env["TMPDIR"]]
            for p in paths:
                assert p and any(p == m or p.startswith(m + "/") for m in mounts), f"{_where('', obj, c)}: {p}"


def test_no_secret_values_in_git(rendered):
    for name, obj in _all(rendered):
        assert obj["kind"] != "Secret", f"{_where(name, obj)}: Secrets are created by the operator, never committed"


def test_images_are_pinned(rendered):
    for name, obj, _, c, _ in _workload_containers(rendered):
        if obj["kind"] == "InferenceService":
            continue  # the image comes from the ServingRuntime
        image = c["image"]
        tag = image.rsplit("/", 1)[-1]
        assert (":" in tag or "@sha256:" in image) and not tag.endswith(":latest"), f"{_where(name, obj, c)}: {image}"


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_pods_do_not_get_api_tokens(rendered, overlay):
    for obj in rendered[overlay]:
        for _, _, pod in containers(obj):
            assert pod.get("automountServiceAccountToken") is False, _where(overlay, obj)
