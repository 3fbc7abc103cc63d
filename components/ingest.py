from kfp import dsl
from kfp.dsl import Dataset, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def ingest(
    raw: Output[Dataset],
    config_yaml: str,
    config_overrides: str = "",
    source: str = "synthetic",
    data_path: str = "",
    num_users: int = 0,
    num_items: int = 0,
    num_requests_per_user: int = 0,
):
    """Writes the RAW dataset (events, items; oracle for synthetic data) in the unified format.

    Args:
        raw: Output RAW folder (meta.json, events/, items/[, oracle/]).
        config_yaml: ExperimentConfig YAML text; its `data` section sets sizes, seed, slate size.
        config_overrides: Override lines for the config, `section.key=value` each (newline or `;` separated).
        source: synthetic | movielens-1m | movielens-100k | raw (copy a RAW folder at data_path).
        data_path: Folder of the MovieLens files or of a RAW dataset; unused for synthetic.
        num_users: Synthetic users; 0 keeps the config's.
        num_items: Synthetic items; 0 keeps the config's.
        num_requests_per_user: Synthetic feed requests per user; 0 keeps the config's.
    """
    from unipinrec import steps

    meta = steps.ingest(raw.path, source=source, data_path=data_path,
                        config_yaml=steps.with_overrides(config_yaml, config_overrides),
                        num_users=num_users, num_items=num_items, num_requests_per_user=num_requests_per_user)
    for key in ("source", "num_users", "num_items", "num_events", "has_impressions"):
        if key in meta:
            raw.metadata[key] = meta[key]
