"""Shared test fixtures: the reference material in ``tests/fixtures`` and the devices the model tests run on."""

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def golden() -> Path:
    """``tests/fixtures``: the tiny CLIP in OpenAI's two formats, its reference outputs and the tokenizer cases.

    They ship with the project (``tests/fixtures/README.md`` says how they were made), so no test skips for them.
    """
    return FIXTURES


@pytest.fixture
def golden_clip(golden, tmp_path, monkeypatch) -> Path:
    """The tiny golden CLIP's file for --clip, with an empty download root: the shipped vocabulary is all it needs."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return golden / "tiny_clip_state_dict.pt"


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Each device a model test runs on: the CPU, then the GPU, skipped where PyTorch sees none."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    return torch.device(request.param)
