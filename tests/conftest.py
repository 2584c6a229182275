"""Shared test fixtures: the reference material in ``../shared/golden``."""

import shutil
from pathlib import Path

import pytest

import clip_model

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GOLDEN = PROJECT_ROOT.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    """``../shared/golden`` beside the project; tests that need it skip in a user's clone without it."""
    if not (GOLDEN / "tiny_clip_state_dict.pt").is_file():
        pytest.skip(f"reference files not found at {GOLDEN} (they ship beside the project in CI only)")
    return GOLDEN


@pytest.fixture
def golden_clip(golden, tmp_path, monkeypatch) -> Path:
    """The tiny golden CLIP's file for --clip, with the BPE vocabulary in the download root as a user would have it."""
    cache = tmp_path / "cache"
    (cache / "clip").mkdir(parents=True)
    shutil.copy(golden / clip_model.VOCAB_FILE, cache / "clip" / clip_model.VOCAB_FILE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    clip_model._tokenizer.cache_clear()
    return golden / "tiny_clip_state_dict.pt"
