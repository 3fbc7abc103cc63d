from kfp import dsl

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def stop_run(reason: str):
    """Fails the run on purpose, with the reason in the log (used when the data is invalid).

    Args:
        reason: What went wrong (the validation summary); printed and raised.
    """
    print(reason)
    raise RuntimeError("data validation failed; nothing was trained or deployed. See the validate-data report.\n"
                       + reason)
