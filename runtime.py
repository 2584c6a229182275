"""What every command of the project runs on: errors, device and precision, backbone and checkpoint, files, processes.

``train.py``, ``evaluate.py`` and ``explain.py`` share this module, and it imports none of them: a command reads top
to bottom as its own steps, calling the machinery below for what every run needs around the model.

- **Errors.** Bad input ends with one ``error:`` line and exit code 1, never a traceback (``reported_errors``).
- **Device and precision.** ``--device auto`` takes CUDA when present; ``--precision auto`` runs bf16 (or fp16)
  autocast on a GPU and fp32 on the CPU.
- **Backbone and checkpoint.** ``--clip`` names the frozen CLIP (or the small demo CLIP); a checkpoint holds only
  what trained, the run's flat configuration and the SHA256 of the CLIP it was trained on, and ``load_trained``
  rebuilds its model on that CLIP alone.
- **Files.** Every file is written through a temporary file and renamed (``atomic_save``), and an output folder is
  checked to be writable before any work starts (``check_writable``).
- **Datasets and texts.** Where a dataset lives (``synthetic`` is generated on first use), and the class texts that
  the frozen text tower encodes once.
- **Several processes.** Under ``torchrun`` each process joins a process group, takes its share of the data and
  gathers the others'; rank 0 alone prints and writes.

The name says what the module is: the run's environment, not a drawer of utilities.
"""

import contextlib
import hashlib
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import typer
from torch.utils.data import DataLoader, DistributedSampler

import clip_model
import data
from clip_model import CLIP, CLIPConfig, CLIPLoadError
from data import DataError
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
CAPTION_TOKENS = data.RETRIEVAL_PROTOCOLS["msrvtt"].words  # CLIP4Clip's max_words; --words and each dataset's own
TEMPLATES = {"ssv2": "a video of {}.", "synthetic": "a video of a shape {}."}
DEFAULT_TEMPLATE = "a video of a person {}."
RECOGNITION_FRAMES = 8  # frames per video when neither an option nor a checkpoint says; retrieval: the dataset's


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


class RunError(Exception):
    """Bad input to a command: its message is all the user sees."""


class RankError(RunError):
    """A failure this process met alone (its share of the data, joining the others): reported by it, not rank 0."""


EXPECTED_ERRORS = (RunError, CLIPLoadError, DataError, ValueError, OSError)


def error_message(error: Exception) -> str:
    """What the user reads after ``error:``; a file-system error names its path (``data.os_error_message``)."""
    return data.os_error_message(error) if isinstance(error, OSError) else str(error)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the project's expected failures into ``error: <message>`` and exit code 1, never a traceback.

    Under torchrun every rank runs the same setup and meets the same bad input, so rank 0 alone reports it. A
    ``RankError`` is reported by the rank that met it, and so is a collective that failed because another rank
    died, hung or never joined: each rank ends with at most one line.
    """
    try:
        yield
    except EXPECTED_ERRORS as error:
        if rank() == 0 or isinstance(error, RankError):
            typer.echo(f"error: {error_message(error)}", err=True)
        raise typer.Exit(1) from None
    except RuntimeError as error:
        if not lost_contact(error):
            raise
        typer.echo(
            f"error: rank {rank()}: a collective operation with the other processes failed (one of them died, was "
            f"stopped, or did not answer within {TIMEOUT_VARIABLE}={collective_minutes():g} minutes; its own message "
            f"or torchrun's report names it): {first_line(error)}",
            err=True,
        )
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        if rank() == 0:
            typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


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


def load_backbone(name: str | None) -> Backbone:
    """``--clip``: an OpenAI model name or a checkpoint path; none (or ``random-demo-clip``) gives the demo CLIP."""
    if name in (None, DEMO_CLIP_NAME):
        echo(
            f"no --clip given: using a small randomly initialised ViT-CLIP ({DEMO_CLIP.image_resolution} px, "
            f"{DEMO_CLIP.vision_layers} layers, width {DEMO_CLIP.vision_width}) sized for a CPU; "
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
    backbone = load_backbone(clip or checkpoint["clip"]["name"])
    check_same_backbone(checkpoint, backbone, path)
    config = checkpoint["config"]
    stop_config = STOPConfig.from_dict(config)
    model = build_model(backbone, stop_config, device, precision, config.get("grad_checkpoint", False))
    model.load_trainable_state_dict(checkpoint["stop"])
    return model, backbone, checkpoint


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def atomic_save(obj: Any, path: Path) -> None:
    """Write through a temporary file and rename: an interrupted save never leaves a half-written file, and a
    failed one (a full disk, ``path`` a folder) leaves no temporary file either."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        if isinstance(obj, str):
            temporary.write_text(obj)
        else:
            torch.save(obj, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_writable(folder: Path, option: str) -> None:
    """Create ``folder`` and write a scratch file in it, before any work: a read-only or missing location, or a file
    in the way, fails now with one line instead of after an epoch or a whole evaluation."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise RunError(f"{option}: cannot write in {folder}: {error.strerror or error}") from None


# --------------------------------------------------------------------------- #
# Datasets and class texts
# --------------------------------------------------------------------------- #


def dataset_location(dataset: str, root: Path | None, task: str) -> tuple[str, Path]:
    """The loader's name and root: ``synthetic`` is generated on first use in the UCF101 or MSR-VTT layout."""
    if dataset == "synthetic":
        base = ensure_synthetic(root or Path("data/synthetic"))
        return ("ucf101", base / "ucf101") if task == "recognize" else ("msrvtt", base / "msrvtt")
    if (dataset in data.RETRIEVAL_DATASETS) != (task == "retrieve"):
        raise RunError(f"--dataset {dataset} is not a {task} dataset")
    if root is None:
        raise RunError(
            f"--root is required for --dataset {dataset}: the folder holding it (see 'Dataset layouts' in README.md)"
        )
    return dataset, root


def default_frames(task: str, dataset: str) -> int:
    """Frames per video when none are given: 8 for recognition, the dataset's protocol's for retrieval (the
    synthetic set's are MSR-VTT's)."""
    return RECOGNITION_FRAMES if task == "recognize" else data.retrieval_protocol(dataset).frames


def caption_tokenizer(backbone: Backbone, words: int) -> Callable[[list[str]], torch.Tensor]:
    """``backbone.tokenize`` cutting captions to ``words`` tokens (at most the text tower's context)."""
    return partial(backbone.tokenize, context_length=min(words, backbone.clip.context_length))


def class_prompts(dataset: str, classes: list[str]) -> list[str]:
    return [TEMPLATES.get(dataset, DEFAULT_TEMPLATE).format(name) for name in classes]


@torch.no_grad()
def text_features(model: STOPModel, tokenize: Callable, texts: list[str], device: torch.device) -> torch.Tensor:
    """``[len(texts), E]``, L2-normalised, in batches of 256."""
    return torch.cat([model.encode_text(tokenize(texts[i : i + 256]).to(device)) for i in range(0, len(texts), 256)])


# --------------------------------------------------------------------------- #
# Several processes: torchrun
# --------------------------------------------------------------------------- #

TIMEOUT_VARIABLE = "STOP_TIMEOUT_MINUTES"  # how long a collective (joining included) waits for every rank
DEFAULT_TIMEOUT_MINUTES = 10.0
T = TypeVar("T")


def world_size() -> int:
    """How many processes torchrun started (``WORLD_SIZE``): 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (``RANK``): 0 in a single process. Read from the environment, so still known once the
    process group is gone (``reported_errors`` runs after it)."""
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def distributed() -> bool:
    """Whether this process runs in a process group with others (``process_group`` joined one)."""
    return dist.is_available() and dist.is_initialized()


def echo(message: str) -> None:
    """``typer.echo`` on rank 0 only: every rank runs the same code and would print it once each."""
    if rank() == 0:
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
    return world_size() > 1 and (isinstance(error, dist.DistError) or "gloo" in str(error))


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join torchrun's other processes when it started several (``WORLD_SIZE > 1``); do nothing otherwise.

    NCCL when ``--device`` resolves to CUDA (this process's GPU is ``LOCAL_RANK``, given as ``device_id`` so the
    communicator forms at once), gloo on the CPU. Every collective, joining included, gives up after
    ``STOP_TIMEOUT_MINUTES`` (default 10), so a rank that hangs or never arrives ends the job instead of stalling it.
    """
    if world_size() == 1:
        yield
        return
    placed = resolve_device(device)
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
            f"rank {rank()}: the {world_size()} processes did not all join within {TIMEOUT_VARIABLE}="
            f"{collective_minutes():g} minutes (is every machine started, and MASTER_ADDR/MASTER_PORT or the "
            f"rendezvous endpoint reachable?): {first_line(error)}"
        ) from None
    try:
        yield
    finally:
        dist.destroy_process_group()


def on_rank_zero(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` run by rank 0 alone, its result (or its bad-input error) handed to every rank.

    For what must happen once: checking and reading the run folder, generating the synthetic data. The other ranks
    wait in the broadcast; when it fails, every rank raises the same ``RunError`` and rank 0 alone reports it.
    """
    if not distributed():
        return function(*args)
    outcome: list[Any] = [None]
    if rank() == 0:
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
        if world_size() == 1:
            raise
        raise RankError(f"rank {rank()}: {error}") from None


def shard(dataset: data.VideoDataset, *, train: bool, seed: int = 0) -> DistributedSampler | None:
    """This rank's share of ``dataset``: the order in which it reads it, one process being a world of one.

    Training: a permutation drawn from ``seed`` and the epoch (``set_epoch``) alone, the same on every rank, each
    taking its share, the remainder dropped so every rank runs the same number of steps; so the order of any epoch
    is known without replaying the ones before it (``--resume``). Evaluation: ``None`` in one process (in order);
    under torchrun in order and complete, a few items repeated so the shares are equal, which
    ``gather_in_dataset_order`` drops.
    """
    if train:
        return DistributedSampler(
            dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=True
        )
    if not distributed():
        return None
    return DistributedSampler(dataset, shuffle=False)


def gather_in_dataset_order(loader: DataLoader, *columns: torch.Tensor | list) -> tuple[torch.Tensor | list, ...]:
    """Every rank's rows, once each and in the order of ``loader.dataset``: what one process would have.

    ``columns`` hold one row per item this rank's ``loader`` yielded: tensors (rows along dim 0) or lists (captions).
    They travel with the dataset indices of this rank's sampler through ``all_gather_object``, which works on gloo
    and NCCL alike and, at the size of a test set's scores or features (MB), costs little; the repeats the sampler
    added are dropped (the first copy is kept) and the rows put back in order. One process: returned unchanged.
    """
    if not distributed():
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


def summed_over_ranks(*values: float) -> list[float]:
    """Each value summed over every rank (losses, clip counts, broken videos); the values themselves in one process."""
    if not distributed():
        return list(values)
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, values)
    return [sum(share[i] for share in shares) for i in range(len(values))]


def broken_over_ranks(*datasets: data.VideoDataset) -> int:
    """The distinct broken videos met by every rank in ``datasets``: a video two ranks both met (a padded evaluation
    share, a training video drawn by another rank in another epoch) counts once."""
    if not distributed():
        return sum(dataset.broken_count() for dataset in datasets)
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, [dataset.broken_items() for dataset in datasets])
    return sum(len({item for share in shares for item in share[number]}) for number in range(len(datasets)))
