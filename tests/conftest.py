"""What the tests share: the reference material in ``tests/fixtures``, the devices the model tests run on, the
CLIPs, videos and helpers of the model tests, the datasets the commands run on, and the helpers that run a command
and read what it wrote.

Names say what a thing is: ``golden`` and ``golden_clip`` are paths (the fixtures folder, the golden CLIP's file),
``golden_clip_model`` and ``random_clip_model`` are CLIP models. The helpers are plain functions: a test file imports
them with ``from conftest import run, error_lines``.
"""

import json
from dataclasses import astuple
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import clip_model
import train
from loading.protocols import PROTOCOLS
from stop import PromptDetails, STOPModel

PROJECT = Path(__file__).resolve().parent.parent
FIXTURES = PROJECT / "tests" / "fixtures"


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


# --------------------------------------------------------------------------- #
# The model tests' CLIPs and videos, and what they do with a STOP model
# --------------------------------------------------------------------------- #

# The random CLIP the model tests run on, built here so that they always run: 32 px, patch 8 (N = 16 patches), width
# 128 with 2 heads, 3 blocks.
RANDOM_CLIP_CONFIG = clip_model.CLIPConfig(
    embed_dim=32,
    image_resolution=32,
    vision_layers=3,
    vision_width=128,
    vision_patch_size=8,
    context_length=16,
    vocab_size=100,
    transformer_width=32,
    transformer_heads=1,
    transformer_layers=1,
)
FRAMES = 8  # frames per video in the model tests


@pytest.fixture(scope="module")
def random_clip_model() -> clip_model.CLIP:
    """The random CLIP of ``RANDOM_CLIP_CONFIG`` (seed 0), one per test module."""
    return clip_model.random_clip(RANDOM_CLIP_CONFIG, seed=0)


@pytest.fixture(scope="module")
def golden_clip_model(golden) -> clip_model.CLIP:
    """The golden CLIP (the model in ``golden_clip``'s file), loaded once per test module."""
    return clip_model.load(golden / "tiny_clip_state_dict.pt")


def random_videos(batch: int, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    """``[batch, frames, 3, 32, 32]`` of standard normal pixels: every frame differs from the next."""
    return torch.randn(batch, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def still_videos(batch: int, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    """``[batch, frames, 3, 32, 32]``: each video one random image, repeated."""
    return random_videos(batch, frames=1, seed=seed).expand(-1, frames, -1, -1, -1).contiguous()


def one_change_video(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """``[1, 8, 3, 32, 32]``: frames 1-3 show one image, frames 4-8 another (1-based): one change, at gap 3."""
    first, second = random_videos(2, frames=1, seed=seed)[:, 0]
    return torch.stack([first] * 3 + [first + scale * (second - first)] * 5)[None]


def as_if_trained(model: STOPModel, scale: float = 0.2, seed: int = 0) -> STOPModel:
    """Every trainable tensor redrawn at random (zero-initialised layers included), in eval mode: prompts are
    non-zero and counts vary."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def features(model: STOPModel, video: torch.Tensor, **kwargs):
    """``model.encode_video(video)`` without gradients on the model's device, brought back to the CPU (details
    too)."""
    with torch.no_grad():
        result = model.encode_video(video.to(model.clip.logit_scale.device), **kwargs)
    if not kwargs.get("return_details"):
        return result.cpu()
    video_features, details = result
    return video_features.cpu(), [PromptDetails(*(value.cpu() for value in astuple(block))) for block in details]


# MSVD as CLIP4Clip publishes it, in miniature: ids with `-` and `_`, CRLF lists (train and val without a final
# newline), captions as word lists in a pickle. Test video `zzLq_missing_1_4` has captions but no file.
MSVD_CAPTIONS = {
    "-4wsuPCjDBc_5_15": [["a", "man", "sings"], ["someone", "is", "singing"]],
    "bQJQGoJF7_k_0_8": [["a", "cat", "plays"]],
    "bQJQGoJF7_k_10_18": [["a", "dog", "runs"], ["the", "dog", "is", "running"], ["a", "dog", "outside"]],
    "mv89psg6zh4_33_46": [["a", "bird", "flies"]],
    "zzLq_missing_1_4": [["nobody", "sees", "this"], ["no", "video"]],
    "zzrZ0X0v5yk_2_9": [["a", "car", "drives"], ["a", "red", "car"]],
}
MSVD_SPLITS = {
    "train": ["-4wsuPCjDBc_5_15", "bQJQGoJF7_k_0_8"],
    "val": ["mv89psg6zh4_33_46"],
    "test": ["bQJQGoJF7_k_10_18", "mv89psg6zh4_33_46", "zzLq_missing_1_4", "zzrZ0X0v5yk_2_9"],
}


def msvd_level(video_id: str) -> int:
    """The flat grey of an MSVD test video, different for each (its identity in a decoded clip)."""
    return 40 + 30 * sorted(MSVD_CAPTIONS).index(video_id)


@pytest.fixture(scope="session")
def msvd_root(tmp_path_factory) -> Path:
    import pickle

    from loading import dataset_files

    root = tmp_path_factory.mktemp("msvd")
    for video_id in MSVD_CAPTIONS:
        if video_id != "zzLq_missing_1_4":
            frames = torch.full((4, 3, 32, 32), msvd_level(video_id), dtype=torch.uint8)
            dataset_files.write_video(root / PROTOCOLS["msvd"].videos / f"{video_id}.avi", frames, 10)
    annotations = root / PROTOCOLS["msvd"].annotations
    annotations.mkdir()
    for split, ids in MSVD_SPLITS.items():
        ending = b"\r\n" if split == "test" else b""
        (annotations / f"{split}_list.txt").write_bytes("\r\n".join(ids).encode() + ending)
    (annotations / "raw-captions.pkl").write_bytes(pickle.dumps(MSVD_CAPTIONS))
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The synthetic dataset as ``synthetic.py`` writes it (UCF101 and MSR-VTT layouts), written once per session."""
    from loading import synthetic

    return synthetic.ensure_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """UCF101 layout, 8 classes x (1 training + 1 test) synthetic clips of 16 frames: runs of one or two steps."""
    import data
    from loading import dataset_files, synthetic

    root = tmp_path_factory.mktemp("tiny")
    generator = torch.Generator().manual_seed(0)
    lines = {"train": [], "test": []}
    for label, name in enumerate(synthetic.SYNTHETIC_CLASSES):
        for split in ("train", "test"):
            entry = f"{name}/v_{name}_g{1 if split == 'test' else 5:02d}_c01.avi"
            frames, _, _ = synthetic.render_synthetic_clip(label, generator)
            dataset_files.write_video(root / PROTOCOLS["ucf101"].videos / entry, frames, synthetic.SYNTHETIC_FPS)
            lines[split].append(entry if split == "test" else f"{entry} {label + 1}")
    lists = root / PROTOCOLS["ucf101"].annotations
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(synthetic.SYNTHETIC_CLASSES)))
    (lists / "trainlist01.txt").write_text("\n".join(lines["train"]) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(lines["test"]) + "\n")
    (root / data.NO_FLIP_MARKER).write_text("never flip\n")
    return root


# --------------------------------------------------------------------------- #
# Running a command and reading what it wrote
# --------------------------------------------------------------------------- #


def run(app: typer.Typer, *args: object) -> tuple[int, str]:
    """``app`` run in this process on ``args`` (each through ``str``): its exit code and its stdout then stderr."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout + result.stderr


def error_lines(output: str) -> list[str]:
    """The ``error:`` lines of a command's output."""
    return [line for line in output.splitlines() if line.startswith("error:")]


def train_tiny(root: Path, clip: Path | str, out: Path, *extra: object) -> tuple[int, str]:
    """``train.py recognize`` on ``tiny_root``: two epochs of one step each (batch 8), on one process without
    workers, unless ``extra`` says otherwise (a repeated option's last value wins)."""
    options = ["--dataset", "ucf101", "--root", root, "--clip", clip, "--out", out, "--frames", 4]
    return run(train.app, "recognize", *options, "--batch-size", 8, "--workers", 0, "--epochs", 2, *extra)


def stop_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The STOP parameters a checkpoint holds."""
    return torch.load(path, weights_only=True)["stop"]


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def records(out: Path) -> list[dict]:
    """A run folder's metrics.jsonl without the timing, which differs from run to run."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train_clips_per_second"} for line in lines]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Each file of ``folder`` by name, with its bytes."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def prompt_keys(block: torch.nn.Module, prompts: torch.Tensor) -> torch.Tensor:
    """Prompts ``[B, T-1, eta, D]`` as step 8 receives them: their keys and values ``[B, T-1, eta, 2D]`` under the
    block's own projection, as ``stop.BlockPrompter.forward`` makes them (prompts live in ``ln_1``'s output space)."""
    width = prompts.shape[-1]
    return torch.nn.functional.linear(prompts, block.attn.in_proj_weight[width:], block.attn.in_proj_bias[width:])
