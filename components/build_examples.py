from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def build_examples(
    raw: Input[Dataset],
    feature_repo: Input[Artifact],
    examples: Output[Dataset],
    report: Output[HTML],
    stats: Output[Metrics],
    config_yaml: str,
    config_overrides: str = "",
    feature_env: str = "local",
):
    """Builds UnifiedExamples with histories read from Feast at each request_ts.

    Slates and splits come from the example builder; every history is replaced by the Feast
    point-in-time history, and the result must pass the `examples` contract.

    Args:
        raw: Validated RAW folder.
        feature_repo: Feast repo from build_features.
        examples: Output examples folder (train/, valid/, test/, items/, meta.json).
        report: Output HTML report of the examples contract.
        stats: Output metrics: examples per split, histories that differ from the builder's rule.
        config_yaml: ExperimentConfig YAML text (data.max_history, data.slate_size).
        config_overrides: Override lines for the config, `section.key=value` each (newline or `;` separated).
        feature_env: local | cluster.
    """
    import shutil
    import tempfile

    from unipinrec import steps

    with tempfile.TemporaryDirectory() as tmp:
        out = steps.build_examples(raw.path, feature_repo.path, examples.path,
                                   config_yaml=steps.with_overrides(config_yaml, config_overrides),
                                   env=feature_env, report_dir=tmp)
        shutil.copyfile(out["html"], report.path)
    for split, n in out["splits"].items():
        stats.log_metric(f"examples_{split}", n)
        examples.metadata[f"examples_{split}"] = n
    stats.log_metric("history_differs_from_builder", out["history_differs_from_builder"])
    steps.save_metrics(stats)
