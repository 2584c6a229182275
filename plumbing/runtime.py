"""What every command runs on: device and precision, the frozen CLIP, ``--compile``, and torchrun.

Machinery a learner may skip; ``train.py``, ``evaluate.py`` and ``explain.py`` share it.

- **Device and precision.** ``--device auto`` takes CUDA when present; ``--precision auto`` runs bf16 (or fp16)
  autocast on a GPU and fp32 on the CPU.
- **Backbone.** ``--clip`` names the frozen CLIP (or the small demo CLIP), identified by the SHA256 of its weights.
- **``--compile``.** ``VideoTower``, the video encoder as a module, compiled once per run.
- **torchrun.** In a single process every function of the last part is a no-op or the identity. Under ``torchrun
  --nproc_per_node N`` each process joins a group (NCCL on GPUs, gloo on CPUs), takes its share of every epoch and
  of the test set, and gathers what the others computed; rank 0 alone prints and writes.
"""

import contextlib
import hashlib
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import typer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import clip_model
from clip_model import CLIP, CLIPConfig
from loading import dataset_files, protocols
from loading.errors import EXPECTED_ERRORS, DataError, RankError, RunError, error_message
from stop import STOPConfig, STOPModel

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


# --------------------------------------------------------------------------- #
# Device and precision
# --------------------------------------------------------------------------- #


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when present. Under torchrun each process on a machine takes its own GPU, ``LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked, but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if device == "cuda" and WORLD_SIZE > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise RankError(
                f"rank {RANK}: LOCAL_RANK {local_rank}, but this machine has {torch.cuda.device_count()} GPUs: "
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
        digest = hashlib.sha256()  # of its tensors: the demo CLIP has no file
        for key, tensor in sorted(clip.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return Backbone(clip, DEMO_CLIP_NAME, digest.hexdigest(), tokenize)
    path = clip_model.checkpoint_path(name)
    sha256 = clip_model.MODEL_SHA256.get(name) or clip_model.file_sha256(path)
    clip = clip_model.load(path)
    tokenize = partial(clip_model.tokenize, context_length=min(CAPTION_TOKENS, clip.context_length), truncate=True)
    return Backbone(clip, name, sha256, tokenize)


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


def check_batch_memory(model: STOPModel, frames: int, clips: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a batch of ``clips`` videos of ``frames`` frames that cannot fit: the
    float32 pixels of the batch, and the tokens of one block (each frame's patches and class token, and the ``eta``
    prompt slots of each gap), a lower bound of what the forward needs."""
    visual = model.clip.visual
    resolution, width = visual.input_resolution, visual.conv1.out_channels
    tokens = frames * ((resolution // visual.conv1.kernel_size[0]) ** 2 + 1) + (frames + 1) * model.config.eta
    needed = 4 * clips * (frames * 3 * resolution**2 + tokens * width)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # this machine's: batches are built here
    if device.type == "cuda":
        available = min(available, torch.cuda.get_device_properties(device).total_memory)
    if needed > available:
        raise RunError(
            f"--frames {frames} with a batch of {clips} clips and --eta {model.config.eta} needs at least "
            f"{needed / 2**20:,.1f} MiB for one batch, more than the {available / 2**20:,.1f} MiB here: lower --frames "
            "or --batch-size"
        )


# --------------------------------------------------------------------------- #
# Datasets and class texts
# --------------------------------------------------------------------------- #


class VideoTower(nn.Module):
    """``model.encode_video`` as a module whose parameters are the prompters' alone, compiled when asked.

    What DistributedDataParallel wraps (``distributed.data_parallel``) and what the loops call. With ``compile``,
    the encoder runs through ``torch.compile(fullgraph=True)``: one graph for training and one for evaluation, each
    compiled on its first batch (the log says so, and how long it took). A batch smaller than the first (the last
    one of an evaluation) is padded to the first's size with copies of its first video, in the first's memory layout
    (the loader's clips are not contiguous, and the graph's guards check strides as well as shapes), and the padding
    dropped after, so the graph is never compiled again for it.
    """

    def __init__(self, model: STOPModel, compile: bool | None = False):
        super().__init__()
        self.prompters = model.prompters  # the only submodule: CLIP stays out of DDP's view
        if compile is None:  # --compile not given: on with CUDA, off on the CPU (README, Performance)
            compile = model.clip.logit_scale.is_cuda
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
    return min(8, dataset_files.available_cores() // LOCAL_WORLD_SIZE)


def caption_tokenizer(backbone: Backbone, words: int) -> Callable[[list[str]], torch.Tensor]:
    """``backbone.tokenize`` cutting captions to ``words`` tokens (at most the text tower's context)."""
    return partial(backbone.tokenize, context_length=min(words, backbone.clip.context_length))


# --------------------------------------------------------------------------- #
# torchrun
# --------------------------------------------------------------------------- #

TIMEOUT_VARIABLE = "STOP_TIMEOUT_MINUTES"  # how long a collective (joining included) waits for every rank
DEFAULT_TIMEOUT_MINUTES = 10.0
T = TypeVar("T")
# How many processes torchrun started, and this one's rank: 1 and 0 without torchrun. Read from the environment once,
# so still known once the process group is gone (``cli.reported_errors`` runs after it).
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0")) if WORLD_SIZE > 1 else 0
LOCAL_WORLD_SIZE = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine


def in_group() -> bool:
    """Whether this process runs in a process group with others (``process_group`` joined one)."""
    return dist.is_available() and dist.is_initialized()


def echo(message: str) -> None:
    """``typer.echo`` on rank 0 only: every rank runs the same code and would print it once each."""
    if RANK == 0:
        typer.echo(message)


def collective_minutes() -> float:
    """``STOP_TIMEOUT_MINUTES``, checked: how long a collective waits for every rank before it fails."""
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(text)
    except ValueError:
        minutes = math.nan
    if not 0 < minutes < math.inf:
        raise RunError(f"{TIMEOUT_VARIABLE}={text!r}: expected a positive number of minutes")
    return minutes


def first_line(error: BaseException) -> str:
    """An error's first line without the ``[file.cc:123]`` source location that gloo puts in front."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0])


def lost_contact(error: RuntimeError) -> bool:
    """A collective that failed because of another process: NCCL and the stores raise ``DistError``; gloo raises a
    plain ``RuntimeError`` from its transport ("Connection closed by peer", "Timed out waiting ...")."""
    return WORLD_SIZE > 1 and (isinstance(error, dist.DistError) or "gloo" in str(error))


@contextlib.contextmanager
def process_group(placed: torch.device) -> Iterator[None]:
    """Join torchrun's other processes when it started several (``WORLD_SIZE > 1``); do nothing otherwise.

    NCCL when ``placed`` (``runtime.resolve_device``) is CUDA (this process's GPU, ``LOCAL_RANK``, given as
    ``device_id`` so the communicator forms at once), gloo on the CPU. Every collective, joining included, gives up
    after ``STOP_TIMEOUT_MINUTES`` (default 10), so a rank that hangs or never arrives ends the job instead of
    stalling it.
    """
    if WORLD_SIZE == 1:
        yield
        return
    timeout = timedelta(minutes=collective_minutes())
    if placed.type == "cuda":
        torch.cuda.set_device(placed)
    try:
        if placed.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=placed)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    except dist.DistError as error:
        raise RankError(
            f"rank {RANK}: the {WORLD_SIZE} processes did not all join within {TIMEOUT_VARIABLE}="
            f"{collective_minutes():g} minutes (is every machine started, and MASTER_ADDR/MASTER_PORT or the "
            f"rendezvous endpoint reachable?): {first_line(error)}"
        ) from None
    try:
        yield
    except RuntimeError as error:
        if not lost_contact(error):
            raise
        raise RankError(
            f"rank {RANK}: a collective operation with the other processes failed (one of them died, was stopped, "
            f"or did not answer within {TIMEOUT_VARIABLE}={collective_minutes():g} minutes; its own message or "
            f"torchrun's report names it): {first_line(error)}"
        ) from None
    finally:
        dist.destroy_process_group()


def on_rank_zero(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` run by rank 0 alone, its result (or its bad-input error) handed to every rank.

    For what must happen once: checking and reading the run folder, generating the synthetic data. The other ranks
    wait in the broadcast; when it fails, every rank raises the same ``RunError`` and rank 0 alone reports it.
    """
    if not in_group():
        return function(*args)
    outcome: list[Any] = [None]
    if RANK == 0:
        try:
            outcome = [(True, function(*args))]
        except EXPECTED_ERRORS as error:
            outcome = [(False, error_message(error))]
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise RunError(value)
    return value


@contextlib.contextmanager
def rank_local_errors() -> Iterator[None]:
    """Around the loops over this rank's share of the data: a ``DataError`` there (a broken video with ``--strict``)
    concerns this rank alone, so under torchrun it becomes a ``RankError`` that this rank reports, naming itself."""
    try:
        yield
    except DataError as error:
        if WORLD_SIZE == 1:
            raise
        raise RankError(f"rank {RANK}: {error}") from None


def shard(dataset: Dataset, *, train: bool, seed: int = 0) -> DistributedSampler | None:
    """This rank's share of ``dataset``: the order in which it reads it, one process being a world of one.

    Training: a permutation drawn from ``seed`` and the epoch (``set_epoch``) alone, the same on every rank, each
    taking its share, the remainder dropped so every rank runs the same number of steps; so the order of any epoch
    is known without replaying the ones before it (``--resume``). Evaluation: ``None`` in one process (in order);
    under torchrun in order and complete, a few items repeated so the shares are equal, which
    ``gather_in_dataset_order`` drops.
    """
    if train:
        return DistributedSampler(dataset, num_replicas=WORLD_SIZE, rank=RANK, shuffle=True, seed=seed, drop_last=True)
    if not in_group():
        return None
    return DistributedSampler(dataset, shuffle=False)


def gather_in_dataset_order(loader: DataLoader, *columns: torch.Tensor | list) -> tuple[torch.Tensor | list, ...]:
    """Every rank's rows, once each and in the order of ``loader.dataset``: what one process would have.

    ``columns`` hold one row per item this rank's ``loader`` yielded: tensors (rows along dim 0) or lists (captions).
    They travel with the dataset indices of this rank's sampler through ``all_gather_object``, which works on gloo
    and NCCL alike and, at the size of a test set's scores or features (MB), costs little; the repeats the sampler
    added are dropped (the first copy is kept) and the rows put back in order. One process: returned unchanged.
    """
    if not in_group():
        return columns
    shares: list[Any] = [None] * dist.get_world_size()
    local = [column.cpu() if isinstance(column, torch.Tensor) else column for column in columns]
    dist.all_gather_object(shares, (list(loader.sampler), local))
    first: dict[int, int] = {}  # dataset index -> its first position among all ranks' rows
    for position, index in enumerate(index for indices, _ in shares for index in indices):
        first.setdefault(index, position)
    order = [first[index] for index in range(len(loader.dataset))]
    gathered = []
    for number, column in enumerate(columns):
        if isinstance(column, torch.Tensor):
            gathered.append(torch.cat([rows[number] for _, rows in shares])[order].to(column.device))
        else:
            every = [row for _, rows in shares for row in rows[number]]
            gathered.append([every[position] for position in order])
    return tuple(gathered)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[b, ...]`` of every process, concatenated in rank order ``[W*b, ...]``; the gradient reaches this
    process's own rows (the others' are constants here, and get theirs in their own process). One process: ``x``."""
    if not in_group():
        return x
    shares = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(shares, x.detach().contiguous())
    shares[dist.get_rank()] = x
    return torch.cat(shares)


def summed_over_ranks(*values: float) -> list[float]:
    """Each value summed over every rank (losses, clip counts, broken videos); the values themselves in one process."""
    if not in_group():
        return list(values)
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, values)
    return [sum(share[i] for share in shares) for i in range(len(values))]


def broken_over_ranks(*datasets: Dataset) -> int:
    """The distinct broken videos met by every rank in ``datasets``: a video two ranks both met (a padded evaluation
    share, a training video drawn by another rank in another epoch) counts once."""
    if not in_group():
        return sum(dataset.broken_count() for dataset in datasets)
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, [dataset.broken_items() for dataset in datasets])
    return sum(len({item for share in shares for item in share[number]}) for number in range(len(datasets)))


def data_parallel(tower: nn.Module, device: torch.device) -> nn.Module:
    """``tower`` (``runtime.VideoTower``), under torchrun wrapped so that DDP averages the prompters' gradients.

    DDP averages gradients only for what runs through its ``forward``, and at the start broadcasts every parameter
    of the module it wraps from rank 0: the tower's are the prompters' alone, so the frozen CLIP, the same on every
    rank, is never sent. A compiled tower compiles its inner function, as PyTorch advises for DDP (compile the module
    DDP wraps, not the wrapper).

    Every gap carries eta prompt slots, real or masked, so a batch with no prompt (n_t = 0 everywhere) still runs the
    temporal prompters and gives them a zero gradient, in one process as here. Single-frame videos skip them:
    ``find_unused_parameters`` lets DDP finish such steps, and a parameter unused on every rank keeps no gradient, so
    AdamW skips it exactly as it does in one process.
    """
    if not in_group():
        return tower
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(tower, device_ids=device_ids, find_unused_parameters=True)
