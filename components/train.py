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
    num_processes: int = 1,
):
    """Trains the unified model in one stage (loss = retrieval + alpha * ranking).

    Args:
        examples: Examples folder from build_examples.
        model: Output model folder (model.safetensors, config.yaml, items.parquet, meta.json, logs).
        metrics: Output metrics: steps, final losses, tokens/s, wall time.
        config_yaml: ExperimentConfig YAML text.
        config_overrides: Override lines for the config, `section.key=value` each (newline or `;` separated).
        seed: Training seed; -1 keeps the config's.
        epochs: Epochs; 0 keeps the config's.
        num_processes: DDP worker processes in this pod (torchrun); see docs/pipeline.md for multi-node jobs.
    """
    from unipinrec import steps

    summary = steps.train(examples.path, model.path, config_yaml=steps.with_overrides(config_yaml, config_overrides),
                          seed=seed, epochs=epochs, num_processes=num_processes)
    model.metadata["model_version"] = summary["model_version"]
    model.metadata["framework"] = "pytorch"
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    steps.save_metrics(metrics)
