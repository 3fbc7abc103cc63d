from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def package(
    model: Input[Model],
    index: Input[Artifact],
    archive: Output[Artifact],
    deploy_mode: str = "local",
    deploy_dir: str = "",
    serving_feature_repo: str = "",
    feature_env: str = "local",
):
    """Packs the TorchServe archive unipinrec.mar: weights, item index, item table, serving config.

    Args:
        model: Model folder.
        index: Index folder built for this model.
        archive: Output model store folder holding unipinrec.mar.
        deploy_mode: local | kubernetes | none; local servers read Feast from deploy_dir/features/current.
        deploy_dir: The local deployment folder.
        serving_feature_repo: Feast repo path as the server sees it (overrides the local default).
        feature_env: local | cluster: the feature_store.yaml the server uses.
    """
    from unipinrec import steps

    repo = steps.serving_feature_repo(deploy_mode, deploy_dir, serving_feature_repo)
    out = steps.package(model.path, index.path, archive.path, feature_repo=repo, feature_env=feature_env)
    archive.metadata["mar"] = out["mar"]
    archive.metadata["bytes"] = out["bytes"]
    archive.metadata["model_version"] = model.metadata.get("model_version", "")
