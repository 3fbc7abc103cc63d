"""The train step's launchers. `trainjob` against a local stand-in for Kubeflow Trainer that runs the
TrainJob's command as 2 nodes (torchrun, gloo, CPU) on the tiny examples: the model it leaves is
the one the evaluate step accepts, and the step's outputs have the local launcher's shape. A
failed job fails the step with its reason and keeps the PVC folder to resume from. The compiled
pipeline carries the launcher parameters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deploy.fake_kube import FakeKube, LocalTrainJobExecutor
from unipinrec import steps
from unipinrec.config import ConfigError, load_config
from unipinrec.training_launch import ClusterContext

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
RUN_ID = "5e0b7c2a-91d4-4f6e-8a3b-c4d5e6f70812"
PVC = "unipinrec-model-registry"


@pytest.fixture(scope="module")
def tiny_examples(tmp_path_factory, tiny_builder) -> Path:
    return tiny_builder(tmp_path_factory.mktemp("tiny"))


def _config(**train) -> str:
    data = yaml.safe_load(TINY.read_text())
    data["train"].update({"max_steps": 6, **train})
    return yaml.safe_dump(data)


def _cluster(registry: Path) -> ClusterContext:
    registry.mkdir(parents=True, exist_ok=True)
    return ClusterContext(image="example.org/up:1.2.3", registry_dir=str(registry), pvc=PVC, namespace="team-recsys",
                          run_id=RUN_ID, mount_path="/registry", pod_name="unipinrec-train-pod", pod_uid="uid-1")


@pytest.fixture(scope="module")
def trained(tiny_examples, tmp_path_factory):
    """The same config trained by each launcher: here, 2 torchrun workers here, a 2-node TrainJob on the stand-in."""
    root = tmp_path_factory.mktemp("launchers")
    local = steps.train(tiny_examples, root / "local", config_yaml=_config())
    torchrun = steps.train(tiny_examples, root / "torchrun", config_yaml=_config(launcher="torchrun"), num_processes=2)
    executor = LocalTrainJobExecutor({PVC: root / "registry"})
    api = FakeKube(trainjob_executor=executor)
    job = steps.train(tiny_examples, root / "trainjob", config_yaml=_config(seed=7), launcher="trainjob",
                      num_nodes=2, num_processes=1, cluster=_cluster(root / "registry"), api=api)
    return {"root": root, "local": local, "torchrun": torchrun, "trainjob": job, "api": api, "executor": executor}


@pytest.mark.slow
def test_a_two_node_trainjob_gives_a_model_the_evaluate_step_accepts(trained, tiny_examples):
    root, job, api = trained["root"], trained["trainjob"], trained["api"]
    assert job["launcher"] == "trainjob" and job["world_size"] == job["num_processes"] == 2 and job["steps"] == 6
    (cmd,) = trained["executor"].commands  # what the nodes ran: the TrainJob's command, PVC paths mapped
    work = root / "registry" / "trainjobs" / job["trainjob"]
    assert cmd[3:7] == ["--no-python", "unipinrec", "train", "--config"] and cmd[7] == str(work / "config.yaml")
    assert yaml.safe_load((root / "trainjob" / "config.yaml").read_text())["train"]["seed"] == 7
    digests = {json.loads((root / "trainjob" / f"ddp_rank{i}.json").read_text())["digest"] for i in (0, 1)}
    assert len(digests) == 1  # the two nodes all-reduced their gradients
    ev = steps.evaluate(root / "trainjob", tiny_examples, root / "eval")
    assert ev["evaluation"]["model_version"] == job["model_version"]
    assert 0.0 <= ev["evaluation"]["retrieval"]["HR@10"] <= 1.0
    # cleaned up: the job (and its pods) are gone, and so is its PVC folder
    assert not [o for o in api.objects.values() if o["kind"] in ("TrainJob", "Pod")]
    assert not work.exists()
    kinds = [c for c in api.calls if c[2] == "trainjobs"]
    assert kinds[:2] == [("get", "trainer.kubeflow.org", "trainjobs"), ("patch", "trainer.kubeflow.org", "trainjobs")]
    assert kinds[-1] == ("delete", "trainer.kubeflow.org", "trainjobs")


@pytest.mark.slow
def test_every_launcher_leaves_the_same_outputs(trained):
    root, local, torchrun, job = trained["root"], trained["local"], trained["torchrun"], trained["trainjob"]
    assert set(job) - set(local) == {"trainjob"} and set(torchrun) == set(local)
    assert (local["launcher"], local["num_processes"]) == ("local", 1)
    assert (torchrun["launcher"], torchrun["num_processes"], torchrun["world_size"]) == ("torchrun", 2, 2)
    files = {n: {p.name for p in (root / n).iterdir() if not p.name.startswith("ddp_rank")}
             for n in ("local", "torchrun", "trainjob")}
    assert files["local"] == files["torchrun"] == files["trainjob"]
    assert {"model.safetensors", "meta.json", "config.yaml", "checkpoint"} <= files["local"]


def test_a_failed_trainjob_fails_the_step_with_its_reason_and_keeps_the_checkpoint_folder(tiny_examples, tmp_path):
    api = FakeKube(trainjob_executor=lambda job: (False, "RuntimeError: CUDA out of memory"))
    with pytest.raises(steps.StepError, match=r"TrainJob unipinrec-train-5e0b7c2a91d4 failed .*FailedJobs"):
        steps.train(tiny_examples, tmp_path / "model", config_yaml=_config(), launcher="trainjob",
                    cluster=_cluster(tmp_path / "registry"), api=api)
    work = tmp_path / "registry" / "trainjobs" / "unipinrec-train-5e0b7c2a91d4"
    assert (work / "examples" / "meta.json").exists() and (work / "config.yaml").exists()  # a retry resumes here
    assert not [o for o in api.objects.values() if o["kind"] == "TrainJob"]  # the job itself is cleaned up
    assert not (tmp_path / "model" / "meta.json").exists()


def test_launcher_settings_are_checked_naming_the_field(tiny_examples, tmp_path):
    with pytest.raises(ConfigError, match="train: launcher 'k8s' is not one of local, torchrun, trainjob"):
        steps.train(tiny_examples, tmp_path / "m", config_yaml=_config(), launcher="k8s")
    with pytest.raises(ConfigError, match="launcher local trains in one process"):
        steps.train(tiny_examples, tmp_path / "m", config_yaml=_config(), num_processes=2)
    with pytest.raises(ConfigError, match="num_nodes 2 needs launcher trainjob"):
        steps.train(tiny_examples, tmp_path / "m", config_yaml=_config(launcher="torchrun"), num_nodes=2)
    with pytest.raises(ConfigError, match="trainjob_runtime"):
        steps.train(tiny_examples, tmp_path / "m", config_yaml=_config(trainjob_runtime="torch-distributed"))
    with pytest.raises(steps.StepError, match="no cluster context"):
        steps.train(tiny_examples, tmp_path / "m", config_yaml=_config(), launcher="trainjob")
    with pytest.raises(steps.StepError, match="registry_dir: .* is not a folder"):
        cluster = ClusterContext(image="i", registry_dir=str(tmp_path / "nope"), pvc=PVC, namespace="ns", run_id=RUN_ID)
        steps.train(tiny_examples, tmp_path / "m", config_yaml=_config(), launcher="trainjob", cluster=cluster,
                    api=FakeKube())
    assert not (tmp_path / "m").exists()


def test_the_cluster_context_comes_from_the_downward_api():
    env = {"UNIPINREC_NAMESPACE": "team-recsys", "UNIPINREC_POD_NAME": "p-1", "UNIPINREC_POD_UID": "u-1"}
    ctx = ClusterContext.from_env(image="i:1", registry_dir="/registry", pvc=PVC, run_id=RUN_ID, environ=env)
    assert (ctx.namespace, ctx.pod_name, ctx.pod_uid, ctx.mount_path) == ("team-recsys", "p-1", "u-1", "/registry")


def test_the_compiled_pipeline_carries_the_launcher_parameters(tmp_path):
    from pipelines.run import compile_pipeline

    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "c.yaml", cluster=True, image="example.org/up:1.2.3")
                                   .read_text()))
    params = docs[0]["root"]["inputDefinitions"]["parameters"]
    assert (params["launcher"]["defaultValue"], params["num_nodes"]["defaultValue"],
            params["keep_train_job"]["defaultValue"]) == ("", 0, False)
    tasks = {n: t for c in [docs[0]["root"], *docs[0]["components"].values()]
             for n, t in c.get("dag", {}).get("tasks", {}).items()}
    inputs = tasks["train"]["inputs"]["parameters"]
    assert inputs["launcher"] == {"componentInputParameter": "pipelinechannel--launcher"}
    assert inputs["keep_job"] == {"componentInputParameter": "pipelinechannel--keep_train_job"}
    assert inputs["image"]["runtimeValue"]["constant"] == "example.org/up:1.2.3"  # the compile-time image
    assert inputs["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert inputs["registry_pvc"]["runtimeValue"]["constant"] == PVC
    executor = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert {e["name"]: e["fieldPath"] for e in executor["fieldPathAsEnv"]} == {
        "UNIPINREC_POD_NAME": "metadata.name", "UNIPINREC_POD_UID": "metadata.uid",
        "UNIPINREC_NAMESPACE": "metadata.namespace"}
    assert executor["pvcMount"][0]["mountPath"] == inputs["registry_dir"]["runtimeValue"]["constant"] == "/registry"
