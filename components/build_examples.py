from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def build_examples(
    raw: Input[Dataset],
    feature_repo: Input[Artifact],
    examples: Output[Dataset],
    stats: Output[Metrics],
    config_yaml: str,
    config_overrides: str = "",
    feature_env: str = "local",
    bucket: int = 0,
    buckets: int = 1,
):
    """Builds the UnifiedExamples of one user-hash bucket, histories read from Feast at each request_ts.

    One pod of the parallel example build (the pipeline's ParallelFor over buckets): slates and
    splits come from the example builder restricted to the bucket's users, every history is
    replaced by the Feast point-in-time history. merge_examples assembles the buckets.

    Args:
        raw: Validated RAW folder.
        feature_repo: Feast repo from build_features.
        examples: Output folder: this bucket's part (train/, valid/, test/, items/, meta.json).
        stats: Output metrics: examples per split, histories that differ from the builder's rule.
        config_yaml: ExperimentConfig YAML text (data.max_history, data.slate_size).
        config_overrides: Override lines for the config, `section.key=value` each (newline or `;` separated).
        feature_env: local | cluster.
        bucket: This pod's bucket, 0..buckets-1.
        buckets: How many user-hash buckets the build is split into.
    """
    from unipinrec import steps

    out = steps.build_examples(raw.path, feature_repo.path, examples.path,
                               config_yaml=steps.with_overrides(config_yaml, config_overrides),
                               env=feature_env, bucket=bucket, buckets=buckets)
    for split, n in out["splits"].items():
        stats.log_metric(f"examples_{split}", n)
    stats.log_metric("history_differs_from_builder", out["history_differs_from_builder"])
    steps.save_metrics(stats)
