from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def deploy(
    archive: Input[Artifact],
    model: Input[Model],
    feature_repo: Input[Artifact],
    evaluation: Input[Artifact],
    deploy_mode: str = "local",
    deploy_dir: str = "",
    registry_dir: str = "",
    overlay_dir: str = "",
) -> str:
    """Deploys the promoted model.

    local: records it in deploy_dir and, when a TorchServe runs on that folder, registers the
    new archive through the management API, makes it the default and unregisters the old one
    after draining (no request dropped). kubernetes: publishes the archive to the model
    registry and rolls the TorchServe Deployment out with rollback (unipinrec.deploy).

    Args:
        archive: Model store folder with unipinrec.mar.
        model: The model folder (kept in deploy_dir for the next gate).
        feature_repo: The Feast repo the server reads histories from (local mode).
        evaluation: The evaluation artifact (recorded beside the deployment).
        deploy_mode: local | kubernetes | none.
        deploy_dir: Local deployment folder (model store, current.json, history.jsonl).
        registry_dir: Kubernetes mode: the model registry (a mounted volume or bucket URL).
        overlay_dir: Kubernetes mode: the kustomize overlay to apply, e.g. manifests/overlays/prod.

    Returns:
        A one-line summary of what was deployed.
    """
    import json
    import os

    from unipinrec import steps

    with open(os.path.join(evaluation.path, "evaluation.json")) as f:
        evaluation_dict = json.load(f)
    out = steps.deploy(os.path.join(archive.path, "unipinrec.mar"), model.path, mode=deploy_mode,
                       deploy_dir=deploy_dir, feature_repo=feature_repo.path, evaluation=evaluation_dict,
                       registry_dir=registry_dir, overlay_dir=overlay_dir)
    print(out["message"])
    return out["message"]
