"""What every command builds before its first step: device and precision, the frozen CLIP, a trained checkpoint.

``train.py``, ``evaluate.py`` and ``explain.py`` share this module, and it imports none of them.

- **Device and precision.** ``--device auto`` takes CUDA when present; ``--precision auto`` runs bf16 (or fp16)
  autocast on a GPU and fp32 on the CPU.
- **Backbone and checkpoint.** ``--clip`` names the frozen CLIP (or the small demo CLIP); a checkpoint holds only
  what trained, the run's flat configuration and the SHA256 of the CLIP it was trained on, and ``load_trained``
  rebuilds its model on that CLIP alone.
- **Datasets and texts.** Where a dataset lives (``synthetic`` is generated on first use), and the class texts that
  the frozen text tower encodes once.
"""

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

import clip_model
import dataset_files
import protocols
from clip_model import CLIP, CLIPConfig
from distributed import echo, rank, world_size
from errors import RankError, RunError
from stop import STOPConfig, STOPModel
from synthetic import ensure_synthetic

# A CLIP small enough to train on a laptop CPU in minutes, randomly initialised: the synthetic demo's backbone.
DEMO_CLIP = CLIPConfig(
    embed_dim=128,
    image_resolution=64,
    vision_layers=4,
    vision_width=128,
    vision_patch_size=16,
    context_length=32,
    vocab_size=258,  # UTF-8 bytes + <sot> + <eot>: clip_model.byte_tokenize, no BPE file needed
    transformer_width=128,
    transformer_heads=2,
    transformer_layers=2,
)
DEMO_CLIP_NAME = "random-demo-clip"
CAPTION_TOKENS = protocols.PROTOCOLS["msrvtt"].words  # CLIP4Clip's max_words; --words and each dataset's own
TEMPLATES = {"ssv2": "a video of {}.", "synthetic": "a video of a shape {}."}
DEFAULT_TEMPLATE = "a video of a person {}."


# --------------------------------------------------------------------------- #
# Device and precision
# --------------------------------------------------------------------------- #


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when present. Under torchrun each process on a machine takes its own GPU, ``LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked, but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if device == "cuda" and world_size() > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise RankError(
                f"rank {rank()}: LOCAL_RANK {local_rank}, but this machine has {torch.cuda.device_count()} GPUs: "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank)
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 (or fp16) autocast on a GPU, fp32 on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise RunError("--precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    return precision


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # autocast's dtype; fp32 runs without autocast


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISION_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# --------------------------------------------------------------------------- #
# Backbone and checkpoint
# --------------------------------------------------------------------------- #


@dataclass
class Backbone:
    """The frozen CLIP, what identifies it in a checkpoint, and the tokenizer its text tower reads."""

    clip: CLIP
    name: str
    sha256: str
    tokenize: Callable[[list[str]], torch.Tensor]


def tensors_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_backbone(name: str | None, trained_on: bool = False) -> Backbone:
    """``--clip``: an OpenAI model name or a checkpoint path; none (or ``random-demo-clip``) gives the demo CLIP.

    ``trained_on``: the CLIP a checkpoint names, which the message then says (rather than that none was given)."""
    if name in (None, DEMO_CLIP_NAME):
        size = f"{DEMO_CLIP.image_resolution} px, {DEMO_CLIP.vision_layers} layers, width {DEMO_CLIP.vision_width}"
        if trained_on:
            echo(f"CLIP: the checkpoint's, the small demo ViT-CLIP it was trained on ({size}; nothing downloaded)")
        else:
            echo(
                f"no --clip given: using a small randomly initialised ViT-CLIP ({size}) sized for a CPU; "
                "its text tower reads UTF-8 bytes, so nothing is downloaded"
            )
        clip = clip_model.random_clip(DEMO_CLIP, seed=0)
        # Random towers give nearly parallel features (cosines above 0.9); at the initial temperature 1/0.07 their
        # differences vanish in the softmax. Use a trained CLIP's scale instead: OpenAI's models sit at the cap, 100.
        clip.logit_scale.data.fill_(math.log(100))
        tokenize = partial(clip_model.byte_tokenize, context_length=DEMO_CLIP.context_length)
        return Backbone(clip, DEMO_CLIP_NAME, tensors_sha256(clip), tokenize)
    path = clip_model.checkpoint_path(name)
    sha256 = clip_model.MODEL_SHA256.get(name) or clip_model.file_sha256(path)
    clip = clip_model.load(path)
    tokenize = partial(clip_model.tokenize, context_length=min(CAPTION_TOKENS, clip.context_length), truncate=True)
    return Backbone(clip, name, sha256, tokenize)


def read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RunError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RunError(f"{path}: cannot be read as a STOP checkpoint (truncated or corrupt?): {error}") from None
    if not isinstance(checkpoint, dict) or not {"stop", "config", "clip"} <= checkpoint.keys():
        raise RunError(f"{path}: not a checkpoint written by train.py (expected the keys 'stop', 'config', 'clip')")
    config, clip = checkpoint["config"], checkpoint["clip"]
    frames = config.get("frames") if isinstance(config, dict) else None
    if not (isinstance(frames, int) and frames > 0 and isinstance(config.get("prompt"), str)) or not (
        isinstance(clip, dict) and {"name", "sha256"} <= clip.keys()
    ):
        raise RunError(
            f"{path}: not a checkpoint written by train.py (its 'config' needs a positive 'frames' and a 'prompt', "
            "its 'clip' a 'name' and a 'sha256')"
        )
    return checkpoint


def check_same_backbone(checkpoint: Mapping[str, Any], backbone: Backbone, path: Path) -> None:
    trained_on = checkpoint["clip"]
    if trained_on["sha256"] != backbone.sha256:
        raise RunError(
            f"{path} was trained on the CLIP {trained_on['name']!r} (SHA256 {trained_on['sha256'][:12]}…), but "
            f"--clip {backbone.name!r} is another one (SHA256 {backbone.sha256[:12]}…): its prompts fit only the "
            "CLIP they were trained with"
        )


def build_model(
    backbone: Backbone,
    config: STOPConfig,
    device: torch.device,
    precision: str = "fp32",
    grad_checkpoint: bool = False,
) -> STOPModel:
    """The STOP model of ``config`` on ``device``. Under bf16/fp16 autocast the frozen CLIP's matrix weights are
    stored in that dtype once (``clip_model.convert_matmul_weights``); the prompt generators keep fp32 weights."""
    model = STOPModel(backbone.clip, config, grad_checkpoint=grad_checkpoint)
    compute_dtype = PRECISION_DTYPES.get(precision)
    if compute_dtype is not None:
        clip_model.convert_matmul_weights(model.clip, compute_dtype)
    return model.to(device)


def load_trained(
    path: Path,
    clip: str | None,
    device: torch.device,
    precision: str = "fp32",
    checkpoint: Mapping[str, Any] | None = None,
) -> tuple[STOPModel, Backbone, Mapping[str, Any]]:
    """The model a ``train.py`` checkpoint holds, its prompts loaded, on the CLIP it was trained on, with that
    backbone and the checkpoint itself.

    ``clip``: where that CLIP is (``--clip``: the same weights elsewhere, checked by SHA256); ``None``: the name the
    checkpoint records. ``checkpoint``: ``path`` already read by ``read_checkpoint`` (under torchrun rank 0 alone
    reads a run folder, which other machines may not have). The configuration is the checkpoint's flat dict, read
    by ``STOPConfig.from_dict``.
    """
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path)
    backbone = load_backbone(clip or checkpoint["clip"]["name"], trained_on=clip is None)
    check_same_backbone(checkpoint, backbone, path)
    config = checkpoint["config"]
    stop_config = STOPConfig.from_dict(config)
    model = build_model(backbone, stop_config, device, precision, config.get("grad_checkpoint", False))
    model.load_trainable_state_dict(checkpoint["stop"])
    return model, backbone, checkpoint


# --------------------------------------------------------------------------- #
# Datasets and class texts
# --------------------------------------------------------------------------- #


def dataset_location(dataset: str, root: Path | None, task: str) -> tuple[str, Path]:
    """The loader's name and root: ``synthetic`` is generated on first use in the UCF101 or MSR-VTT layout."""
    if dataset == "synthetic":
        base = ensure_synthetic(root or Path("data/synthetic"))
        return ("ucf101", base / "ucf101") if task == "recognize" else ("msrvtt", base / "msrvtt")
    if (dataset in protocols.RETRIEVAL_DATASETS) != (task == "retrieve"):
        raise RunError(f"--dataset {dataset} is not a {task} dataset")
    if root is None:
        raise RunError(f"--root is required for --dataset {dataset}: the folder holding it (see docs/datasets.md)")
    return dataset, root


def default_frames(task: str, dataset: str) -> int:
    """Frames per video when neither an option nor a checkpoint says: the dataset's protocol's."""
    return protocols.protocol(dataset, task).frames


def resolve_compile(compile: bool | None, device: torch.device) -> bool:
    """``--compile`` not given: on with CUDA, off on the CPU (README, Performance: what each costs and brings)."""
    return device.type == "cuda" if compile is None else compile


class VideoTower(nn.Module):
    """``model.encode_video`` as a module whose parameters are the prompters' alone, compiled when asked.

    What DistributedDataParallel wraps (``distributed.data_parallel``) and what the loops call. With ``compile``,
    the encoder runs through ``torch.compile(fullgraph=True)``: one graph for training and one for evaluation, each
    compiled on its first batch (the log says so, and how long it took). A batch smaller than the first (the last
    one of an evaluation) is padded to the first's size with copies of its first video, in the first's memory layout
    (the loader's clips are not contiguous, and the graph's guards check strides as well as shapes), and the padding
    dropped after, so the graph is never compiled again for it.
    """

    def __init__(self, model: STOPModel, compile: bool = False):
        super().__init__()
        self.prompters = model.prompters  # the only submodule: CLIP stays out of DDP's view
        self.compiled = compile
        self.encode_video = torch.compile(model.encode_video, fullgraph=True) if compile else model.encode_video
        # The compiled batch's shape and strides, per grad mode (training, evaluation)
        self.first_batches: dict[bool, tuple[torch.Size, tuple[int, ...]]] = {}

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self.encode_video(videos)
        training, batch = torch.is_grad_enabled(), len(videos)
        if training in self.first_batches:
            shape, strides = self.first_batches[training]
            if batch < shape[0]:
                padded = videos.new_empty_strided(shape, strides)
                padded[:batch], padded[batch:] = videos, videos[:1]
                videos = padded
            return self.encode_video(videos)[:batch]
        mode = "training" if training else "evaluation"
        echo(f"compiling the video encoder for {mode} (torch.compile, once per run: its first batch waits for it)")
        started = time.perf_counter()
        features = self.encode_video(videos)
        echo(f"compiled the video encoder for {mode} in {time.perf_counter() - started:.0f} s")
        # its strides as a padded batch can have them: its own, unless they overlap (an expanded tensor)
        self.first_batches[training] = (videos.shape, torch.empty_like(videos, device="meta").stride())
        return features


def default_workers() -> int:
    """DataLoader workers when ``--workers`` is not given: this machine's cores shared by its torchrun processes,
    at most 8 (more rarely pays for a clip of 8-12 frames, and each holds a decoder)."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, dataset_files.available_cores() // processes)


def caption_tokenizer(backbone: Backbone, words: int) -> Callable[[list[str]], torch.Tensor]:
    """``backbone.tokenize`` cutting captions to ``words`` tokens (at most the text tower's context)."""
    return partial(backbone.tokenize, context_length=min(words, backbone.clip.context_length))


def class_prompts(dataset: str, classes: list[str]) -> list[str]:
    return [TEMPLATES.get(dataset, DEFAULT_TEMPLATE).format(name) for name in classes]


@torch.no_grad()
def text_features(model: STOPModel, tokenize: Callable, texts: list[str], device: torch.device) -> torch.Tensor:
    """``[len(texts), E]``, L2-normalised, in batches of 256."""
    return torch.cat([model.encode_text(tokenize(texts[i : i + 256]).to(device)) for i in range(0, len(texts), 256)])
