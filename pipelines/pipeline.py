"""The UniPinRec pipeline: wiring only (each step is a component in components/).

    ingest -> validate_data --(passed)--> build_features -> [build_examples per user-hash bucket] -> merge_examples
                            \\-(failed)--> stop_run                      -> train -> evaluate -> gate
                                                                       (promote) build_index -> package -> deploy

The examples are built in `example_buckets` pods (dsl.ParallelFor over example_buckets' list, each
pod the users of one bucket) and merged into the folder a one-process build writes.

`make_pipeline()` returns the pipeline for local runs and a plain cluster; `cluster=True`
adds what the steps need inside Kubernetes (the model-registry volume, the Redis secret,
resources, optional GPUs), kept in the compiled YAML and ignored by the local runner.
"""

from pathlib import Path

from kfp import dsl

from components import (bucket_ids, build_examples, build_features, build_index, deploy, evaluate, gate, ingest,
                        merge_examples, package, stop_run, train, validate_data)
from unipinrec.kfp_client import PIPELINE_NAME  # the retraining CronJob submits the newest version of this name

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_FILE = REPO / "configs" / "synthetic.yaml"
REGISTRY_MOUNT = "/registry"  # the model-registry volume in cluster mode (manifests/base)


def config_text(path: "str | Path") -> str:
    """A config file as one line of JSON (YAML's subset): a multi-line default would break the
    parameter comments kfp writes at the top of the compiled YAML."""
    import json

    import yaml

    return json.dumps(yaml.safe_load(Path(path).read_text()) or {}, separators=(",", ":"))


def _default_config() -> str:
    return config_text(DEFAULT_CONFIG_FILE) if DEFAULT_CONFIG_FILE.exists() else ""


def make_pipeline(*, cluster: bool = False, registry_pvc: str = "unipinrec-model-registry", gpus: int = 0,
                  default_config: "str | None" = None, image: "str | None" = None):
    """The pipeline function. Parameters of the returned function are the run's parameters.
    `image` is the project image every step runs on; a TrainJob's nodes run it too."""
    from components._image import PROJECT_IMAGE

    config_default = _default_config() if default_config is None else default_config

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="UniPinRec: validate raw events, build Feast features and point-in-time examples, "
                              "train the unified retrieval+ranking model, evaluate, gate against the deployed "
                              "model, index, package for TorchServe and deploy.")
    def unipinrec_pipeline(
        config_yaml: str = config_default,
        config_overrides: str = "",
        source: str = "synthetic",
        data_path: str = "",
        num_users: int = 0,
        num_items: int = 0,
        num_requests_per_user: int = 0,
        example_buckets: int = 1,
        seed: int = -1,
        epochs: float = 0.0,
        num_processes: int = 0,
        launcher: str = "",
        num_nodes: int = 0,
        keep_train_job: bool = False,
        feature_env: str = "cluster" if cluster else "local",
        gate_metrics: str = "retrieval.HR@10,ranking.*.auc",
        gate_tolerance: float = 0.01,
        force_promote: bool = False,
        deploy_mode: str = "kubernetes" if cluster else "local",
        deploy_dir: str = f"{REGISTRY_MOUNT}/deployment" if cluster else "",
        serving_feature_repo: str = "/opt/unipinrec/feature_repo" if cluster else "",
        registry_dir: str = REGISTRY_MOUNT if cluster else "",
        overlay_dir: str = "/opt/unipinrec/manifests/overlays/prod" if cluster else "",
    ):
        cfg = dict(config_yaml=config_yaml, config_overrides=config_overrides)  # every step that reads the config
        raw = ingest(**cfg, source=source, data_path=data_path, num_users=num_users,
                     num_items=num_items, num_requests_per_user=num_requests_per_user)
        check = validate_data(raw=raw.outputs["raw"])
        with dsl.If(check.outputs["passed"] == True, name="data-valid"):  # noqa: E712 (a pipeline condition)
            feats = build_features(raw=raw.outputs["raw"], **cfg, feature_env=feature_env)
            ids = bucket_ids(buckets=example_buckets)
            with dsl.ParallelFor(ids.output, name="example-buckets") as k:
                part = build_examples(raw=raw.outputs["raw"], feature_repo=feats.outputs["feature_repo"],
                                      **cfg, feature_env=feature_env, bucket=k, buckets=example_buckets)
            ex = merge_examples(parts=dsl.Collected(part.outputs["examples"]))
            model = train(examples=ex.outputs["examples"], **cfg, seed=seed, epochs=epochs,
                          num_processes=num_processes, launcher=launcher, num_nodes=num_nodes,
                          keep_job=keep_train_job, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                          image=image or PROJECT_IMAGE, registry_dir=REGISTRY_MOUNT if cluster else "",
                          registry_pvc=registry_pvc if cluster else "")
            ev = evaluate(model=model.outputs["model"], examples=ex.outputs["examples"])
            decision = gate(evaluation=ev.outputs["evaluation"], examples=ex.outputs["examples"],
                            deploy_dir=deploy_dir, metrics=gate_metrics, tolerance=gate_tolerance,
                            force=force_promote)
            with dsl.If(decision.outputs["Output"] == True, name="promoted"):  # noqa: E712
                index = build_index(model=model.outputs["model"], examples=ex.outputs["examples"])
                archive = package(model=model.outputs["model"], index=index.outputs["index"],
                                  deploy_mode=deploy_mode, deploy_dir=deploy_dir,
                                  serving_feature_repo=serving_feature_repo, feature_env=feature_env)
                release = deploy(archive=archive.outputs["archive"], model=model.outputs["model"],
                                 feature_repo=feats.outputs["feature_repo"], evaluation=ev.outputs["evaluation"],
                                 deploy_mode=deploy_mode, deploy_dir=deploy_dir, registry_dir=registry_dir,
                                 overlay_dir=overlay_dir)
        with dsl.Else(name="data-invalid"):
            stop = stop_run(reason=check.outputs["summary"])

        # Deterministic steps are cached (same inputs, same code -> same outputs); the gate and the
        # deploy step read and change the deployment, and a stop must always stop.
        for task in (decision, release, stop):
            task.set_caching_options(False)
        model.set_cpu_request("2").set_memory_request("4G").set_memory_limit("16G")
        if gpus > 0:
            model.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
        if cluster:
            from kfp import kubernetes

            for task in (feats, part, model, decision, release):
                kubernetes.mount_pvc(task, pvc_name=registry_pvc, mount_path=REGISTRY_MOUNT)
            # launcher trainjob: the TrainJob is owned by this pod and created in its namespace
            for env, path in (("UNIPINREC_POD_NAME", "metadata.name"), ("UNIPINREC_POD_UID", "metadata.uid"),
                              ("UNIPINREC_NAMESPACE", "metadata.namespace")):
                kubernetes.use_field_path_as_env(model, env_name=env, field_path=path)
            for task in (feats, part):
                task.set_env_variable("FEAST_REGISTRY_PATH", f"{REGISTRY_MOUNT}/feast/registry.db")
                kubernetes.use_secret_as_env(task, secret_name="feast-redis",
                                             secret_key_to_env={"password": "REDIS_PASSWORD"})
                task.set_env_variable("FEAST_REDIS", "feast-redis:6379,password=$(REDIS_PASSWORD)")
            # the NetworkPolicies admit only labelled pods: the feature steps reach Redis and the
            # feature server, the deploy step sends its smoke requests to the serving Service
            for task in (feats, part):
                kubernetes.add_pod_label(task, label_key="unipinrec.io/feature-client", label_value="true")
            kubernetes.add_pod_label(release, label_key="unipinrec.io/serving-client", label_value="true")

    return unipinrec_pipeline


unipinrec_pipeline = make_pipeline()
