"""Every kustomization renders, every object validates (kubernetes-validate --strict, Kubernetes
1.30; the InferenceService against KServe's CRD), and the overlays wire together."""
from __future__ import annotations

import copy

import pytest
import yaml
from kubernetes_validate import utils as kv

from .conftest import KUSTOMIZATIONS, MANIFESTS

K8S = "1.30.0"
CRD_KINDS = {"InferenceService", "ServingRuntime", "TrainingRuntime"}


def test_every_kustomization_is_rendered():
    found = sorted(str(p.parent.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("kustomization.yaml"))
    assert found == sorted(KUSTOMIZATIONS)


def test_overlays_hold_the_whole_serving_stack(rendered):
    for overlay, ns in (("overlays/dev", "unipinrec-dev"), ("overlays/prod", "unipinrec"), ("overlays/gpu", "unipinrec")):
        kinds = sorted({o["kind"] for o in rendered[overlay]})
        assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                         "PersistentVolumeClaim", "PodDisruptionBudget", "Service", "ServiceAccount", "StatefulSet"]
        assert {o["metadata"].get("namespace") for o in rendered[overlay]} == {ns}
    admin = {o["kind"] for o in rendered["overlays/prod/admin"]}
    assert admin == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_objects_validate_strictly_against_kubernetes_1_30(rendered, name):
    checked = 0
    for obj in rendered[name]:
        if obj["kind"] in CRD_KINDS:
            continue  # checked against their CRDs below
        try:
            kv.validate(obj, K8S, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        checked += 1
    assert checked == sum(o["kind"] not in CRD_KINDS for o in rendered[name]) > 0


def test_strict_validation_catches_typos_and_wrong_types(rendered):
    """Control: the validator really rejects what the API server would."""
    dep = next(o for o in rendered["overlays/prod"] if o["kind"] == "Deployment")
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/ping"}
    wrong = copy.deepcopy(dep)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    for bad in (typo, wrong):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, K8S, strict=True)


def _closed(schema):
    """The CRD schema with unknown fields rejected (the API server's strict field validation)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def isvc_validator(kserve_crd):
    import jsonschema

    crd = yaml.load(kserve_crd.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    schema = _closed(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def test_inferenceservice_validates_against_the_kserve_crd(rendered, isvc_validator):
    isvcs = [o for o in rendered["kserve"] if o["kind"] == "InferenceService"]
    assert len(isvcs) == 1
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in isvc_validator.iter_errors(isvcs[0])]
    assert errors == []
    model = isvcs[0]["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v1"
    assert model["storageUri"].startswith("pvc://unipinrec-model-registry/unipinrec/")


def test_kserve_schema_check_rejects_unknown_and_invalid_fields(rendered, isvc_validator):
    isvc = next(o for o in rendered["kserve"] if o["kind"] == "InferenceService")
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["model"]["storageURI"] = typo["spec"]["predictor"]["model"].pop("storageUri")
    bad_enum = copy.deepcopy(isvc)
    bad_enum["spec"]["predictor"]["scaleMetric"] = "gpu"
    for bad in (typo, bad_enum):
        assert list(isvc_validator.iter_errors(bad))


def test_native_kserve_predictor_validates_and_serves_the_registry_layout(rendered, isvc_validator):
    (isvc,) = [o for o in rendered["kserve/native"] if o["kind"] == "InferenceService"]
    assert [f"{'.'.join(map(str, e.path))}: {e.message}" for e in isvc_validator.iter_errors(isvc)] == []
    pred = isvc["spec"]["predictor"]
    assert "model" not in pred and not any(o["kind"] == "ServingRuntime" for o in rendered["kserve/native"])
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container" and c["image"].startswith("registry.example.com/unipinrec/kserve:")
    assert c["command"][-2:] == ["-m", "unipinrec.serving.kserve_model"] and "--model=unipinrec=/mnt/models" in c["args"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["STORAGE_URI"].startswith("pvc://unipinrec-model-registry/unipinrec/")
    assert "--token-file=/var/run/secrets/unipinrec/token" in c["args"]  # token auth on
    assert {m["name"] for m in c["volumeMounts"]} <= {v["name"] for v in pred["volumes"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/models/unipinrec/ready"
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/"}
    assert list(isvc_validator.iter_errors(bad))


def test_servingruntime_serves_the_inferenceservice(rendered):
    objs = {o["kind"]: o for o in rendered["kserve"]}
    rt, isvc = objs["ServingRuntime"], objs["InferenceService"]
    assert rt["apiVersion"] == "serving.kserve.io/v1alpha1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == rt["metadata"]["name"]
    assert {"name": "pytorch", "version": "1", "autoSelect": False} in rt["spec"]["supportedModelFormats"]
    assert model["protocolVersion"] in rt["spec"]["protocolVersions"]
    (container,) = rt["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"].startswith("registry.example.com/unipinrec/serving:")
    assert "--ts-config=/mnt/models/config/config.properties" in container["args"]  # storageUri layout
    mounts = {m["name"] for m in model["volumeMounts"]}
    assert mounts <= {v["name"] for v in isvc["spec"]["predictor"]["volumes"]}


def _labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod", "overlays/gpu"])
def test_serving_objects_point_at_each_other(rendered, overlay):
    objs = rendered[overlay]
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    dep = by[("Deployment", "unipinrec-serving")]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert _labels_match(selector, pod_labels) and "app.kubernetes.io/version" not in selector
    assert "replicas" not in dep["spec"]  # owned by the HPA
    assert _labels_match(by[("Service", "unipinrec-serving")]["spec"]["selector"], pod_labels)
    assert _labels_match(by[("PodDisruptionBudget", "unipinrec-serving")]["spec"]["selector"]["matchLabels"], pod_labels)
    assert _labels_match(by[("NetworkPolicy", "unipinrec-serving")]["spec"]["podSelector"]["matchLabels"], pod_labels)
    hpa = by[("HorizontalPodAutoscaler", "unipinrec-serving")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "unipinrec-serving" and hpa["spec"]["minReplicas"] >= 1
    pod = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_maps = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
    assert volumes["config"]["configMap"]["name"] in config_maps  # the hash-suffixed generator name
    assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == "unipinrec-model-registry"
    assert volumes["inference-token"]["secret"]["secretName"] == dep["metadata"]["annotations"]["unipinrec.io/token-secret"]
    assert pod["serviceAccountName"] in {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
    # Redis, which the serving pods may reach, carries the label the serving egress rule names
    redis = by[("StatefulSet", "feast-redis")]
    egress_labels = [t["podSelector"]["matchLabels"] for rule in by[("NetworkPolicy", "unipinrec-serving")]["spec"]["egress"]
                     for t in rule["to"] if "podSelector" in t and "namespaceSelector" not in t]
    assert any(_labels_match(sel, redis["spec"]["template"]["metadata"]["labels"]) for sel in egress_labels)


def test_prod_is_bigger_than_dev(rendered):
    def hpa(o):
        h = next(x for x in rendered[o] if x["kind"] == "HorizontalPodAutoscaler")
        return h["spec"]["minReplicas"], h["spec"]["maxReplicas"]

    assert hpa("overlays/dev") == (1, 2) and hpa("overlays/prod") == (3, 10)
    pvc = {o: next(x for x in rendered[o] if x["kind"] == "PersistentVolumeClaim") for o in ("overlays/dev", "overlays/prod")}
    assert pvc["overlays/prod"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["overlays/dev"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    cron = next(x for x in rendered["overlays/dev/admin"] if x["kind"] == "CronJob")
    assert cron["spec"]["suspend"] is True  # dev does not retrain on its own


def test_retraining_cronjob_submits_a_run_with_a_kfp_scoped_token(rendered):
    objs = {(o["kind"], o["metadata"]["name"]): o for o in rendered["overlays/prod/admin"]}
    cron = objs[("CronJob", "unipinrec-retrain")]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["unipinrec", "pipeline", "submit"]
    assert "--pipeline-name=unipinrec" in c["args"]  # the newest uploaded version: the image has no pipelines/
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    token = next(v for v in pod["volumes"] if v["name"] == "kfp-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert pod["automountServiceAccountToken"] is False
    binding = objs[("RoleBinding", "unipinrec-retrain")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "unipinrec"}]
    rules = objs[("Role", "unipinrec-retrain")]["rules"]
    assert {g for r in rules for g in r["apiGroups"]} == {"pipelines.kubeflow.org"}
    assert not any("*" in r["verbs"] or "*" in r["resources"] or "delete" in r["verbs"] for r in rules)


def test_deployer_role_is_least_privilege(rendered):
    role = next(o for o in rendered["rbac"] if o["kind"] == "Role")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "delete" not in rule["verbs"]
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"] and rule["resourceNames"] == ["unipinrec-inference-token"]
    assert not any(r in rule["resources"] for rule in role["rules"] for r in ("roles", "rolebindings", "pods/exec"))
    # what the deploy step applies is covered by the role
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    for obj in rendered["overlays/prod"]:
        group = obj["apiVersion"].rpartition("/")[0]
        plural = obj["kind"].lower() + ("es" if obj["kind"].endswith("s") else "s")
        assert (group, plural.replace("policys", "policies")) in granted, obj["kind"]


def _gpu_request(resources: dict) -> tuple:
    return resources.get("requests", {}).get("nvidia.com/gpu"), resources.get("limits", {}).get("nvidia.com/gpu")


def test_gpu_overlay_gives_torchserve_one_gpu_on_gpu_nodes(rendered):
    from unipinrec.deploy.torchserve_config import parse_properties

    dep = next(o for o in rendered["overlays/gpu"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "unipinrec-serving")
    pod = dep["spec"]["template"]["spec"]
    by = {c["name"]: c for c in pod["containers"]}
    assert _gpu_request(by["torchserve"]["resources"]) == ("1", "1")
    assert all(_gpu_request(c.get("resources", {})) == (None, None) for n, c in by.items() if n != "torchserve")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    cm = next(o for o in rendered["overlays/gpu"] if o["kind"] == "ConfigMap" and "config.properties" in o["data"])
    assert parse_properties(cm["data"]["config.properties"])["number_of_gpu"] == "1"
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert cm["metadata"]["name"] in mounted  # the pods read the GPU config, not prod's
    prod = next(o for o in rendered["overlays/prod"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "unipinrec-serving")
    assert "nodeSelector" not in prod["spec"]["template"]["spec"]  # prod itself stays CPU


def test_kserve_gpu_variant_validates_and_asks_for_a_gpu(rendered, isvc_validator):
    isvc = next(o for o in rendered["overlays/kserve-gpu"] if o["kind"] == "InferenceService")
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in isvc_validator.iter_errors(isvc)]
    assert errors == []
    pred = isvc["spec"]["predictor"]
    assert _gpu_request(pred["model"]["resources"]) == ("1", "1")
    assert pred["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pred["tolerations"][0]["key"] == "nvidia.com/gpu"
