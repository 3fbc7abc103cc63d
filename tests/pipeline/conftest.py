"""The pipeline lives in the repository's `pipelines/` and `components/` packages (pytest's
`pythonpath` in pyproject.toml puts this checkout's first)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_config_text() -> str:
    from pipelines.pipeline import config_text

    return config_text(TINY_CONFIG)


@pytest.fixture(scope="session")
def local_ir(tmp_path_factory):
    """The compiled local pipeline, once per session: `doc` (its IR) and `tasks` (every DAG task by
    name, those inside conditions and loops too). Read it; do not change it."""
    from pipelines.run import compile_pipeline

    doc = next(yaml.safe_load_all(compile_pipeline(tmp_path_factory.mktemp("ir") / "p.yaml").read_text()))
    tasks = dict(doc["root"]["dag"]["tasks"])
    for comp in doc["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return SimpleNamespace(doc=doc, tasks=tasks)
