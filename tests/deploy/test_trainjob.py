"""The train step's TrainJob: it validates against Kubeflow Trainer's CRD; through the fake Kubernetes
API it is created, waited on, succeeds on Complete, fails naming the reason on Failed, times out
cleanly and is cleaned up (or kept); the RBAC in manifests/training grants exactly what it uses."""
from __future__ import annotations

import copy
import re

import pytest
import yaml

from unipinrec.deploy.api import DeployError, ObjectRef
from unipinrec.deploy.trainjob import JobApi, TrainJobSpec, job_name, render_trainjob, run_trainjob

from .fake_kube import FakeKube
from .test_manifests import _closed

RUN_ID = "8d2c41f0-5b7e-4c1a-9f3e-0a1b2c3d4e5f"


def _spec(**kw) -> TrainJobSpec:
    base = dict(name=job_name(RUN_ID), namespace="team-recsys", image="example.org/up:1.2.3",
                command=["torchrun", "--no-python", "unipinrec", "train", "--config", "/registry/trainjobs/j/config.yaml",
                         "--examples", "/registry/trainjobs/j/examples", "--out", "/registry/trainjobs/j/model",
                         "--no-progress"],
                pvc="unipinrec-model-registry", num_nodes=2, procs_per_node=4, gpus_per_node=4, timeout_s=3600,
                env={"UNIPINREC_SEED": "7", "UNIPINREC_RUN_ID": RUN_ID},
                labels={"unipinrec.io/run-id": RUN_ID, "pipeline/runid": RUN_ID},
                owner={"name": "unipinrec-abc-system-container-impl-123", "uid": "0d9e-uid"})
    return TrainJobSpec(**{**base, **kw})


def _validator(trainer_dir, crd_file: str, version: str = "v1alpha1"):
    import jsonschema

    crd = yaml.load((trainer_dir / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(_closed(ver["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def trainjob_validator(trainer_dir):
    return _validator(trainer_dir, "trainer.kubeflow.org_trainjobs.yaml")


def _errors(validator, obj) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_rendered_trainjob_validates_against_the_trainer_crd(trainjob_validator):
    for spec in (_spec(), _spec(num_nodes=1, procs_per_node=1, gpus_per_node=0, owner=None)):
        job = render_trainjob(spec)
        assert _errors(trainjob_validator, job) == []
        # the CRD's CEL rules, which jsonschema does not run
        name = job["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
        assert len(f"{name}-node-0-0-abcde") <= 63  # the JobSet's pod names stay DNS labels
        assert job["spec"]["trainer"]["numProcPerNode"] >= 1


def test_the_crd_check_rejects_typos_and_wrong_types(trainjob_validator):
    good = render_trainjob(_spec())
    typo = copy.deepcopy(good)
    typo["spec"]["trainer"]["numProcsPerNode"] = typo["spec"]["trainer"].pop("numProcPerNode")
    wrong = copy.deepcopy(good)
    wrong["spec"]["trainer"]["numNodes"] = "2"
    bad_patch = copy.deepcopy(good)
    pod = bad_patch["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod["template"]["spec"]["template"]["spec"]["containers"][0]["image"] = "x"  # not patchable by a TrainJob
    for bad in (typo, wrong, bad_patch):
        assert _errors(trainjob_validator, bad)


def test_the_trainjob_carries_image_nodes_resources_volume_env_and_owner():
    job = render_trainjob(_spec())
    meta, spec = job["metadata"], job["spec"]
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert meta["labels"]["unipinrec.io/run-id"] == RUN_ID and meta["namespace"] == "team-recsys"
    assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "unipinrec-abc-system-container-impl-123",
                                        "uid": "0d9e-uid"}]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    assert spec["activeDeadlineSeconds"] == 3600
    t = spec["trainer"]
    assert t["image"] == "example.org/up:1.2.3" and t["numNodes"] == 2 and t["numProcPerNode"] == 4
    assert t["command"][:4] == ["torchrun", "--no-python", "unipinrec", "train"]
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert {e["name"]: e["value"] for e in t["env"]} == {"UNIPINREC_SEED": "7", "UNIPINREC_RUN_ID": RUN_ID}
    (patch,) = spec["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = rj["template"]["spec"]["template"]["spec"]
    assert rj["name"] == "node" and pod["containers"][0]["name"] == "node"
    pod_labels = rj["template"]["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["unipinrec.io/run-id"] == RUN_ID and "pipeline/runid" not in pod_labels  # KFP's pods only
    assert pod_labels["app.kubernetes.io/component"] == "training"  # what the training NetworkPolicy selects
    assert {"name": "registry", "persistentVolumeClaim": {"claimName": "unipinrec-model-registry"}} in pod["volumes"]
    assert {"name": "registry", "mountPath": "/registry"} in pod["containers"][0]["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["serviceAccountName"] == "unipinrec-trainer"
    assert "nvidia.com/gpu" not in render_trainjob(_spec(gpus_per_node=0))["spec"]["trainer"]["resourcesPerNode"]["limits"]
    with pytest.raises(DeployError, match="PET_MASTER_ADDR"):
        render_trainjob(_spec(env={"PET_MASTER_ADDR": "x"}))
    assert job_name(RUN_ID) == job_name(RUN_ID) != job_name("1" + RUN_ID[1:])  # stable per run


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _run(api: FakeKube, *, timeout_s: float = 600.0, keep: bool = False, spec: TrainJobSpec | None = None):
    clock, lines = Clock(), []
    job = render_trainjob(spec or _spec())
    outcome = run_trainjob(api, job, timeout_s=timeout_s, poll_s=10.0, keep=keep, echo=lines.append, clock=clock,
                           sleep=clock.sleep)
    return outcome, lines, ObjectRef.of(job), clock


def test_the_step_creates_the_job_waits_and_succeeds_on_complete():
    api = FakeKube(trainjob_after=3)
    assert isinstance(api, JobApi)
    outcome, lines, ref, clock = _run(api)
    assert outcome.ok and outcome.status == "Complete" and outcome.reason == "JobSetCompleted"
    assert api.applied == [(str(ref), "unipinrec-train")]
    assert clock.t == 20.0  # two polls of 10 s: the fake completes on the third get
    assert api.get(ref) is None and outcome.deleted  # cleaned up, with its pods
    assert not api.list("v1", "Pod", "team-recsys", f"jobset.sigs.k8s.io/jobset-name={ref.name}")
    pod0 = f"{ref.name}-node-0-0-fake0"
    assert outcome.node0_pod == pod0
    assert f"kubectl logs -n team-recsys -f {pod0} -c node" in "\n".join(lines)
    assert [x for x in lines if x.startswith("[node-0]")] == ["[node-0] step 1: training", "[node-0] step 2: training"]


def test_a_failed_job_fails_with_its_reason_and_is_cleaned_up():
    api = FakeKube(trainjob_outcome=("Failed", "DeadlineExceeded", "TrainJob exceeded its activeDeadlineSeconds"))
    outcome, lines, ref, _ = _run(api)
    assert not outcome.ok and outcome.status == "Failed"
    assert "DeadlineExceeded: TrainJob exceeded its activeDeadlineSeconds" in outcome.describe()
    assert api.get(ref) is None


def test_a_job_that_does_not_finish_times_out_cleanly():
    api = FakeKube(trainjob_outcome=None)
    outcome, lines, ref, clock = _run(api, timeout_s=45.0)
    assert outcome.status == "TimedOut" and outcome.reason == "Timeout"
    assert "timed out after 50 s (Timeout: not finished within 45 s" in outcome.describe()
    assert "Pending" in outcome.message
    assert clock.t == 50.0  # stopped at the first poll past the timeout
    assert api.get(ref) is None and outcome.deleted


def test_keep_leaves_the_job_and_a_retry_replaces_a_failed_one():
    api = FakeKube(trainjob_outcome=("Failed", "FailedJobs", "jobset failed due to one or more job failures"))
    outcome, _, ref, _ = _run(api, keep=True)
    assert outcome.status == "Failed" and not outcome.deleted
    live = api.get(ref)
    assert live is not None and live["status"]["conditions"][0]["reason"] == "FailedJobs"
    # the retried step finds the failed job under the same name, deletes it and starts again
    api.trainjob_outcome = ("Complete", "JobSetCompleted", "done")
    api._gets.clear()
    outcome, lines, _, _ = _run(api)
    assert outcome.ok and any("failed in an earlier attempt" in x for x in lines)
    assert [c[0] for c in api.calls if c[2] == "trainjobs"].count("delete") == 2  # the failed one, then cleanup


def test_a_changed_spec_for_a_running_job_is_refused_not_silently_ignored():
    api = FakeKube(trainjob_outcome=None)
    _run(api, keep=True, timeout_s=10.0)
    with pytest.raises(DeployError, match="immutable"):
        _run(api, spec=_spec(num_nodes=3))


def _used_permissions() -> set[tuple[str, str, str]]:
    used = set()
    for kw, run in ((dict(), {}), (dict(trainjob_outcome=None), {"timeout_s": 20.0}),
                    (dict(trainjob_outcome=("Failed", "FailedJobs", "x")), {"keep": True})):
        api = FakeKube(**kw)
        _run(api, **run)
        if run.get("keep"):  # a retry after a kept failure
            api.trainjob_outcome = ("Complete", "JobSetCompleted", "done")
            api._gets.clear()
            _run(api)
        used |= set(api.calls)
    return used


def test_the_training_rbac_grants_exactly_what_the_step_uses(rendered):
    objs = {(o["kind"], o["metadata"]["name"]): o for o in rendered["training"]}
    role = objs[("Role", "unipinrec-trainjob-launcher")]
    granted = {(v, g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert not any("*" in x for x in granted) and not any(rule.get("resourceNames") == [] for rule in role["rules"])
    assert granted == _used_permissions()
    binding = objs[("RoleBinding", "unipinrec-trainjob-launcher")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor"}]  # KFP's step identity
    trainer_sa = objs[("ServiceAccount", "unipinrec-trainer")]
    assert trainer_sa["automountServiceAccountToken"] is False
    assert not any(trainer_sa["metadata"]["name"] in str(b.get("subjects")) for b in rendered["training"]
                   if b["kind"] == "RoleBinding")  # the training pods get no API rights
    assert trainer_sa["metadata"]["name"] == _spec().service_account
    admin = [o for o in rendered["overlays/prod/admin"] if o["metadata"]["name"] == "unipinrec-trainjob-launcher"
             and o["kind"] == "RoleBinding"]
    # a ServiceAccount subject without a namespace is the binding's namespace's (RBAC's rule)
    assert admin[0]["metadata"]["namespace"] == "unipinrec" and admin[0]["subjects"] == binding["subjects"]


def test_the_pinned_runtime_component_validates_and_uses_the_project_image(rendered, trainer_dir):
    # TrainingRuntime (namespaced) and ClusterTrainingRuntime share one spec type; the shared test
    # data has the cluster-scoped CRD
    validator = _validator(trainer_dir, "trainer.kubeflow.org_clustertrainingruntimes.yaml")
    (rt,) = [o for o in rendered["training/runtime"] if o["kind"] == "TrainingRuntime"]
    assert _errors(validator, rt) == []
    assert rt["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    (rj,) = rt["spec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == "node"
    assert rj["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = rj["template"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "unipinrec-trainer"
    (c,) = pod["containers"]
    from components._image import PROJECT_IMAGE

    assert c["name"] == "node" and c["image"] == PROJECT_IMAGE
    assert rt["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] >= 1
    job = render_trainjob(_spec(runtime=f"TrainingRuntime/{rt['metadata']['name']}"))
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": "unipinrec-torch-distributed"}
    # the NetworkPolicy covers the training pods, from this runtime or from the TrainJob's patch
    (netpol,) = [o for o in rendered["training/runtime"] if o["kind"] == "NetworkPolicy"]
    selector = netpol["spec"]["podSelector"]["matchLabels"]
    (patch_rj,) = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    for labels in (rj["template"]["spec"]["template"]["metadata"]["labels"],
                   patch_rj["template"]["spec"]["template"]["metadata"]["labels"]):
        assert selector.items() <= labels.items()
    assert [p["from"] for p in netpol["spec"]["ingress"]] == [[{"podSelector": {"matchLabels": selector}}]]


def test_a_cancelled_step_still_deletes_its_job():
    """SIGTERM (a cancelled run) exits through the wait loop: the train component turns it into SystemExit."""
    api = FakeKube(trainjob_outcome=None)

    def cancelled(_):
        raise SystemExit(143)

    job = render_trainjob(_spec())
    with pytest.raises(SystemExit):
        run_trainjob(api, job, timeout_s=600.0, echo=lambda _: None, sleep=cancelled)
    assert api.get(ObjectRef.of(job)) is None


def test_the_kubernetes_adapter_maps_delete_list_and_logs_to_the_client():
    """KubernetesJobApi over stand-ins for the dynamic and core clients: foreground delete, a label-selected
    pod list, timestamped container logs; a container that has not started yet reads as no log."""
    from types import SimpleNamespace

    from kubernetes.client.exceptions import ApiException
    from kubernetes.dynamic.exceptions import NotFoundError

    from unipinrec.deploy.kube_jobs import KubernetesJobApi

    calls = []

    class Resource:
        def delete(self, **kw):
            calls.append(("delete", kw))
            if kw["name"] == "gone":
                raise NotFoundError(ApiException(status=404))

        def get(self, **kw):
            calls.append(("list", kw))
            return SimpleNamespace(items=[SimpleNamespace(to_dict=lambda: {"metadata": {"name": "p0"}})])

    class Core:
        def read_namespaced_pod_log(self, name, namespace, **kw):
            calls.append(("log", name, namespace, kw))
            if name == "pending":
                raise ApiException(status=400, reason="container is waiting to start")
            return "2026-12-01T00:00:01Z step 1"

    api = object.__new__(KubernetesJobApi)
    api._resource, api._core, api._api_exception = (lambda v, k: Resource()), Core(), ApiException
    assert api.delete(ObjectRef("trainer.kubeflow.org/v1alpha1", "TrainJob", "j", "ns")) is True
    assert api.delete(ObjectRef("trainer.kubeflow.org/v1alpha1", "TrainJob", "gone", "ns")) is False
    assert calls[0] == ("delete", {"name": "j", "namespace": "ns", "propagation_policy": "Foreground"})
    assert api.list("v1", "Pod", "ns", "a=b") == [{"metadata": {"name": "p0"}}]
    assert calls[2] == ("list", {"namespace": "ns", "label_selector": "a=b"})
    assert api.pod_log("ns", "p0", container="node", tail_lines=5) == "2026-12-01T00:00:01Z step 1"
    assert calls[3] == ("log", "p0", "ns", {"container": "node", "timestamps": True, "tail_lines": 5})
    assert api.pod_log("ns", "pending", container="node", tail_lines=5) == ""
