"""The pipeline lives in the repository's `pipelines/` and `components/` folders (not in the
installed package): put the repository root on sys.path for these tests."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_config_text() -> str:
    from pipelines.pipeline import config_text

    return config_text(TINY_CONFIG)
