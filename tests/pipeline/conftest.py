"""The pipeline lives in the repository's `pipelines/` and `components/` packages (pytest's
`pythonpath` in pyproject.toml puts this checkout's first)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_config_text() -> str:
    from pipelines.pipeline import config_text

    return config_text(TINY_CONFIG)
