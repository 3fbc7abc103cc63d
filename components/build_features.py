from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def build_features(
    raw: Input[Dataset],
    feature_repo: Output[Artifact],
    stats: Output[Metrics],
    config_yaml: str,
    config_overrides: str = "",
    feature_env: str = "local",
):
    """Builds the Feast feature store: sources from RAW, `feast apply`, materialize.

    Args:
        raw: Validated RAW folder.
        feature_repo: Output Feast repo (definitions, Parquet sources, registry, local online store).
        stats: Output metrics: history rows, users, items, seconds per stage.
        config_yaml: ExperimentConfig YAML text; data.max_history is the history length L.
        config_overrides: Override lines for the config, `section.key=value` each (newline or `;` separated).
        feature_env: local (SQLite online store) | cluster (Redis; see feature_repo/environments).
    """
    from unipinrec import steps

    meta = steps.build_features(raw.path, feature_repo.path,
                                config_yaml=steps.with_overrides(config_yaml, config_overrides), env=feature_env)
    for key, value in meta["sources"].items():
        stats.log_metric(key, value)
    for key, value in meta["seconds"].items():
        stats.log_metric(f"seconds_{key}", round(value, 3))
    steps.save_metrics(stats)
    feature_repo.metadata["feature_service"] = meta["feature_service"]
    feature_repo.metadata["env"] = feature_env
