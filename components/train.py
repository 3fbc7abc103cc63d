from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def train(
    examples: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    config_yaml: str,
    config_overrides: str = "",
    seed: int = -1,
    epochs: float = 0.0,
    num_processes: int = 0,
    launcher: str = "",
    num_nodes: int = 0,
    keep_job: bool = False,
    run_id: str = "",
    image: str = "",
    registry_dir: str = "",
    registry_pvc: str = "",
):
    """Trains the unified model in one stage (loss = retrieval + alpha * ranking), here or as a TrainJob.

    Args:
        examples: Examples folder from build_examples.
        model: Output model folder (model.safetensors, config.yaml, items.parquet, meta.json, logs).
        metrics: Output metrics: steps, final losses, tokens/s, wall time.
        config_yaml: ExperimentConfig YAML text.
        config_overrides: Override lines for the config, `section.key=value` each (newline or `;` separated).
        seed: Training seed; -1 keeps the config's.
        epochs: Epochs; 0 keeps the config's.
        num_processes: DDP processes per node; 0 keeps the config's train.procs_per_node.
        launcher: local | torchrun | trainjob (a Kubeflow Trainer TrainJob, docs/pipeline.md); "" keeps the config's.
        num_nodes: TrainJob nodes; 0 keeps the config's.
        keep_job: Keep the TrainJob and its registry work folder after the step (also train.keep_job).
        run_id: The pipeline run's id (names the TrainJob and labels it).
        image: The project image the pipeline was compiled with (the TrainJob's nodes run it).
        registry_dir: Where this step mounts the model-registry PVC (cluster mode).
        registry_pvc: The model-registry PVC the TrainJob's nodes mount.
    """
    import signal
    import sys
    import threading

    from unipinrec import steps
    from unipinrec.training_launch import ClusterContext

    # a cancelled run stops this pod with SIGTERM: exit through the launcher's cleanup (the TrainJob is deleted)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster = ClusterContext.from_env(image=image, registry_dir=registry_dir, pvc=registry_pvc, run_id=run_id) \
        if registry_dir else None
    summary = steps.train(examples.path, model.path, config_yaml=steps.with_overrides(config_yaml, config_overrides), seed=seed, epochs=epochs,
                          num_processes=num_processes, launcher=launcher, num_nodes=num_nodes, keep_job=keep_job,
                          cluster=cluster)
    model.metadata["model_version"] = summary["model_version"]
    model.metadata["framework"] = "pytorch"
    model.metadata["launcher"] = summary["launcher"]
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    steps.save_metrics(metrics)
