"""Where the train step trains: `launcher: local | torchrun | trainjob` (TrainConfig, docs/pipeline.md).

- local: `unipinrec.train.train` in this process;
- torchrun: `torchrun --standalone --nproc-per-node P unipinrec train ...` in this pod (DDP, one
  process per GPU, or gloo on CPU);
- trainjob: the same `unipinrec train` command as a Kubeflow Trainer TrainJob over `num_nodes`
  pods (unipinrec.deploy.trainjob). The examples and the model travel through the model-registry
  PVC, which the step and every node mount: REGISTRY/trainjobs/<job>/{config.yaml,examples,model}.
  The folder outlives a failed attempt, so a retry resumes from model/checkpoint/.

Every launcher leaves the same model folder in out_dir and returns the same summary:
meta.json's `train` section, `model_version`, `num_processes` (the world size) and `launcher`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

LAUNCHERS = ("local", "torchrun", "trainjob")
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class LaunchError(RuntimeError):
    """Training could not be launched or did not succeed; the message names the field or the job's reason."""


def validate_launch(tc) -> None:
    """The launcher fields of a TrainConfig (called by TrainConfig.validate)."""
    if tc.launcher not in LAUNCHERS:
        raise ValueError(f"launcher {tc.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    for name in ("num_nodes", "procs_per_node", "gpus_per_node"):
        if getattr(tc, name) < (1 if name == "num_nodes" else 0):
            raise ValueError(f"{name} must be {'>= 1' if name == 'num_nodes' else '>= 0'}")
    if tc.job_timeout_s <= 0:
        raise ValueError("job_timeout_s must be positive")
    kind, _, name = tc.trainjob_runtime.partition("/")
    if kind not in ("ClusterTrainingRuntime", "TrainingRuntime") or not name:
        raise ValueError(f"trainjob_runtime {tc.trainjob_runtime!r} is not ClusterTrainingRuntime/NAME or "
                         "TrainingRuntime/NAME")
    if tc.launcher != "trainjob" and tc.num_nodes > 1:
        raise ValueError(f"num_nodes {tc.num_nodes} needs launcher trainjob (launcher {tc.launcher} runs in one pod)")
    if tc.launcher == "local" and procs_per_node(tc) > 1:
        raise ValueError(f"launcher local trains in one process; {procs_per_node(tc)} processes need torchrun or "
                         "trainjob")


def procs_per_node(tc) -> int:
    return tc.procs_per_node or max(tc.gpus_per_node, 1)


def with_overrides(tc, *, launcher: str = "", num_nodes: int = 0, num_processes: int = 0, keep_job: bool = False):
    """TrainConfig with the pipeline's launcher parameters over the config's ("" / 0 / False keep them)."""
    changes = {k: v for k, v in (("launcher", launcher), ("num_nodes", num_nodes),
                                 ("procs_per_node", num_processes), ("keep_job", keep_job)) if v}
    if not changes:
        return tc
    from .config import ConfigError

    out = dataclasses.replace(tc, **changes)
    try:
        out.validate()
    except ValueError as e:
        raise ConfigError(f"train: {e}") from e
    return out


@dataclass(frozen=True)
class ClusterContext:
    """What the trainjob launcher needs to know about the step's pod."""
    image: str  # the project image the pipeline was compiled with: the nodes run the same code
    registry_dir: str  # where this step mounts the registry PVC
    pvc: str
    namespace: str
    run_id: str
    mount_path: str = "/registry"  # where the nodes mount it
    pod_name: str = ""
    pod_uid: str = ""

    @classmethod
    def from_env(cls, *, image: str, registry_dir: str, pvc: str, run_id: str,
                 environ: Mapping[str, str] | None = None) -> "ClusterContext":
        """The pod's namespace, name and uid from the downward-API variables the pipeline sets."""
        env = os.environ if environ is None else environ
        namespace = env.get("UNIPINREC_NAMESPACE", "")
        if not namespace and Path(SA_NAMESPACE_FILE).exists():
            namespace = Path(SA_NAMESPACE_FILE).read_text().strip()
        return cls(image=image, registry_dir=registry_dir, pvc=pvc, namespace=namespace, run_id=run_id,
                   mount_path=registry_dir or "/registry", pod_name=env.get("UNIPINREC_POD_NAME", ""),
                   pod_uid=env.get("UNIPINREC_POD_UID", ""))


def launch(cfg, examples_dir: str | Path, out_dir: str | Path, *, cluster: ClusterContext | None = None,
           api=None, echo: Callable[[str], None] = print, **wait) -> dict:
    """Train with cfg.train.launcher; `cluster` and `api` (a JobApi) are for trainjob; `wait` goes to
    unipinrec.deploy.trainjob.run_trainjob (poll_s, clock, sleep)."""
    tc = cfg.train
    if tc.launcher == "local":
        from .train import train

        train(cfg, examples_dir, out_dir, progress=False)
        return summary(out_dir, launcher="local")
    if tc.launcher == "torchrun":
        return _torchrun(cfg, examples_dir, out_dir, procs_per_node(tc))
    if cluster is None:
        raise LaunchError("launcher trainjob: the step has no cluster context (image, registry PVC, namespace)")
    if api is None:
        from .deploy.kube_jobs import KubernetesJobApi

        api = KubernetesJobApi()
    return _trainjob(cfg, examples_dir, out_dir, cluster, api, echo, wait)


def summary(out_dir: str | Path, *, launcher: str) -> dict:
    meta = json.loads((Path(out_dir) / "meta.json").read_text())
    train = meta.get("train") or {}
    return {**train, "model_version": meta["model_version"], "num_processes": train.get("world_size", 1),
            "launcher": launcher}


def train_command(config: str, examples: str, out: str, *, torchrun: list[str]) -> list[str]:
    """The one training command; torchrun reads the rendezvous from its flags or the PET_* variables."""
    return [*torchrun, "--no-python", "unipinrec", "train", "--config", config, "--examples", examples,
            "--out", out, "--no-progress"]


def config_text(cfg) -> str:
    import yaml

    from .config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _torchrun(cfg, examples_dir, out_dir, procs: int) -> dict:
    if procs > 64:
        raise LaunchError(f"procs_per_node: {procs} is more than one pod should run")
    bindir = str(Path(sys.executable).parent)
    if shutil.which("unipinrec", path=bindir) is None:
        raise LaunchError(f"the `unipinrec` command must be installed beside {sys.executable}")
    with tempfile.TemporaryDirectory(prefix="unipinrec-cfg-") as tmp:
        cfg_file = Path(tmp) / "config.yaml"
        cfg_file.write_text(config_text(cfg))
        cmd = train_command(str(cfg_file), str(examples_dir), str(out_dir), torchrun=[
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"])
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
        res = subprocess.run(cmd, env=env)
    if res.returncode != 0:
        raise LaunchError(f"distributed training failed (exit {res.returncode}): {' '.join(cmd)}")
    return summary(out_dir, launcher="torchrun")


def _trainjob(cfg, examples_dir, out_dir, cluster: ClusterContext, api, echo, wait) -> dict:
    from .deploy.trainjob import KFP_RUN_LABEL, RUN_LABEL, TrainJobSpec, job_name, render_trainjob, run_trainjob

    tc = cfg.train
    for field, value in (("image", cluster.image), ("registry_dir", cluster.registry_dir),
                         ("namespace", cluster.namespace), ("run_id", cluster.run_id)):
        if not value:
            raise LaunchError(f"launcher trainjob: {field} is empty (the pipeline's cluster mode sets it)")
    if not Path(cluster.registry_dir).is_dir():
        raise LaunchError(f"registry_dir: {cluster.registry_dir} is not a folder (the registry PVC is not mounted)")
    name = job_name(cluster.run_id)
    work, remote = Path(cluster.registry_dir) / "trainjobs" / name, f"{cluster.mount_path}/trainjobs/{name}"
    _stage(cfg, Path(examples_dir), work)
    owner = {"name": cluster.pod_name, "uid": cluster.pod_uid} if cluster.pod_name and cluster.pod_uid else None
    spec = TrainJobSpec(
        name=name, namespace=cluster.namespace, image=cluster.image, pvc=cluster.pvc, mount_path=cluster.mount_path,
        command=train_command(f"{remote}/config.yaml", f"{remote}/examples", f"{remote}/model", torchrun=["torchrun"]),
        num_nodes=tc.num_nodes, procs_per_node=procs_per_node(tc), gpus_per_node=tc.gpus_per_node,
        cpu=tc.cpu_per_node, memory=tc.memory_per_node, timeout_s=tc.job_timeout_s, runtime=tc.trainjob_runtime,
        env={"UNIPINREC_RUN_ID": cluster.run_id, "UNIPINREC_SEED": str(tc.seed), "HOME": "/tmp", "TMPDIR": "/tmp",
             "MPLCONFIGDIR": "/tmp/matplotlib"},
        labels={RUN_LABEL: cluster.run_id, KFP_RUN_LABEL: cluster.run_id}, owner=owner)
    outcome = run_trainjob(api, render_trainjob(spec), timeout_s=tc.job_timeout_s, keep=tc.keep_job, echo=echo,
                           **wait)
    if not outcome.ok:  # the work folder stays: a retry of the step resumes from its checkpoint
        raise LaunchError(outcome.describe() + (f"; node-0 log: kubectl logs -n {cluster.namespace} {outcome.node0_pod}"
                                                if outcome.node0_pod and not outcome.deleted else ""))
    if not (work / "model" / "meta.json").exists():
        raise LaunchError(f"TrainJob {name} completed but wrote no model to {work / 'model'}")
    shutil.copytree(work / "model", out_dir, dirs_exist_ok=True)
    if not tc.keep_job:
        shutil.rmtree(work, ignore_errors=True)
    return {**summary(out_dir, launcher="trainjob"), "trainjob": name}


def _stage(cfg, examples: Path, work: Path) -> None:
    """config.yaml and a copy of the examples in the job's PVC folder (kept from an earlier attempt)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(config_text(cfg))
    if not (work / "examples").is_dir():
        tmp = work / "examples.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(examples, tmp)
        tmp.rename(work / "examples")
