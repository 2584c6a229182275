"""Shared test fixtures: the reference material in ``../shared/golden``."""

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GOLDEN = PROJECT_ROOT.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    """``../shared/golden`` beside the project; tests that need it skip in a user's clone without it."""
    if not (GOLDEN / "tiny_clip_state_dict.pt").is_file():
        pytest.skip(f"reference files not found at {GOLDEN} (they ship beside the project in CI only)")
    return GOLDEN
