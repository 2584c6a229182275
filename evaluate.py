"""Evaluate STOP: action recognition (top-1/top-5) and text-video retrieval (R@K, MdR, MnR).

``python evaluate.py recognize --dataset ucf101 --root /data/UCF101 --checkpoint runs/x/best.pt``
``python evaluate.py retrieve --dataset msrvtt --root /data/msrvtt --checkpoint runs/x/best.pt``
``python evaluate.py recognize --dataset hmdb51 --root /data/HMDB51 --clip ViT-B/32 --prompt none`` (zero-shot)
``python evaluate.py recognize --dataset kinetics400 --root /data/k400 --checkpoint runs/x/best.pt --views 4 --crops 3``
(the multi-view test of X-CLIP and ViFi-CLIP: 4 temporal clips x 3 spatial crops, their features averaged)

Recognition scores a video against one text per class ("a video of a person {class}."), computed once by the
frozen text tower; retrieval ranks the whole test set's videos for each caption and captions for each video,
as CLIP4Clip reports them. This file also holds what ``train.py`` shares with it: loading the backbone and a
checkpoint, the metrics, turning bad input into one clear message, and running as several processes.

``torchrun --nproc_per_node N evaluate.py recognize ...`` splits the test set over N processes (a
``DistributedSampler``), gathers every video's scores or features back in the dataset's order without the
sampler's padding, and computes the metrics on the whole set, so they are those of one process.
"""

import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
import torch.distributed as dist
import typer
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import clip_model
import data
from clip_model import CLIP, CLIPConfig, CLIPLoadError
from data import DataError
from stop import PROMPT_VARIANTS, STOPConfig, STOPModel
from synthetic import ensure_synthetic

Dataset = Literal[(*data.DATASETS, "synthetic")]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Prompt = Literal[PROMPT_VARIANTS]

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
CAPTION_TOKENS = 32  # CLIP4Clip's max_words
TEMPLATES = {"ssv2": "a video of {}.", "synthetic": "a video of a shape {}."}
DEFAULT_TEMPLATE = "a video of a person {}."


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
# Device, precision, backbone, checkpoint
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


def check_same_backbone(checkpoint: dict[str, Any], backbone: Backbone, path: Path) -> None:
    trained_on = checkpoint["clip"]
    if trained_on["sha256"] != backbone.sha256:
        raise RunError(
            f"{path} was trained on the CLIP {trained_on['name']!r} (SHA256 {trained_on['sha256'][:12]}…), but "
            f"--clip {backbone.name!r} is another one (SHA256 {backbone.sha256[:12]}…): its prompts fit only the "
            "CLIP they were trained with"
        )


def build_model(backbone: Backbone, config: dict[str, Any], device: torch.device, precision: str = "fp32") -> STOPModel:
    """The STOP model of ``config`` on ``device``. Under bf16/fp16 autocast the frozen CLIP's matrix weights are
    stored in that dtype once (``clip_model.convert_matmul_weights``); the prompt generators keep fp32 weights."""
    model = STOPModel(backbone.clip, STOPConfig.from_dict(config), grad_checkpoint=config.get("grad_checkpoint", False))
    compute_dtype = PRECISION_DTYPES.get(precision)
    if compute_dtype is not None:
        clip_model.convert_matmul_weights(model.clip, compute_dtype)
    return model.to(device)


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


# --------------------------------------------------------------------------- #
# Datasets
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
    """Frames per video when none are given: 8 for recognition, the dataset's protocol's for retrieval."""
    return 8 if task == "recognize" else data.retrieval_protocol(dataset).frames


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
# Metrics
# --------------------------------------------------------------------------- #


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percentage of videos whose label is among the ``k`` highest scores, ``logits [N, C]``."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [N, k]
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def direction_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of videos scored above the time-reversed partner of their class.

    The synthetic classes come in pairs ``(2k, 2k+1)``, each the other played backwards ("moving left" and
    "moving right"), so a model blind to frame order (``none``, ``static``) stays at 50 here.
    """
    rows = torch.arange(len(labels))
    return 100.0 * (logits[rows, labels] > logits[rows, labels ^ 1]).float().mean().item()


def ranks_of_matches(similarity: torch.Tensor) -> torch.Tensor:
    """1-based rank of the true match ``i`` in row ``i`` of ``similarity [N, N]``.

    Rank = 1 + the number of candidates scored strictly higher: a tie counts in the true match's favour, as
    CLIP4Clip's sort-then-find does.
    """
    return 1 + (similarity > similarity.diagonal()[:, None]).sum(dim=1)


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 (percent), median rank MdR and mean rank MnR, CLIP4Clip's definitions."""
    ranks = ranks.double()
    metrics = {f"R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    metrics["MdR"] = float(torch.floor(torch.quantile(ranks - 1, 0.5)) + 1)
    metrics["MnR"] = ranks.mean().item()
    return metrics


def retrieval_metrics(similarity: torch.Tensor) -> dict[str, dict[str, float]]:
    """``similarity [N_text, N_video]`` with text ``i`` describing video ``i``: both directions."""
    return {
        "text_to_video": rank_metrics(ranks_of_matches(similarity)),
        "video_to_text": rank_metrics(ranks_of_matches(similarity.t())),
    }


def multi_caption_retrieval_metrics(similarity: torch.Tensor, video_of_caption: torch.Tensor) -> dict[str, dict]:
    """CLIP4Clip's multi-sentence protocol (MSVD, VATEX): ``similarity [N_caption, N_video]``, caption ``c``
    describing video ``video_of_caption[c]`` (long ``[N_caption]``; every video has at least one caption).

    Text-to-video: every caption is a query, ranked by its video's place among all ``N_video`` videos. Video-to-text:
    video ``k`` scores the caption group of video ``j`` by its best caption, ``G[k, j] = max_{c: video c = j} s[c, k]``,
    and the rank of its own group among the ``N_video`` groups counts (not a rank among all captions). Ties count in
    the true match's favour, and MdR and MnR are CLIP4Clip's, as in ``retrieval_metrics``, which this equals when
    every video has one caption.
    """
    own_video_score = similarity.gather(1, video_of_caption[:, None])  # [N_caption, 1]
    caption_ranks = 1 + (similarity > own_video_score).sum(dim=1)  # [N_caption]
    num_videos = similarity.shape[1]
    group_scores = torch.full((num_videos, num_videos), -math.inf, dtype=similarity.dtype, device=similarity.device)
    group_scores.scatter_reduce_(1, video_of_caption.expand(num_videos, -1), similarity.t(), "amax")  # G [N_v, N_v]
    return {
        "text_to_video": rank_metrics(caption_ranks),
        "video_to_text": rank_metrics(ranks_of_matches(group_scores)),
    }


# --------------------------------------------------------------------------- #
# Evaluation loops
# --------------------------------------------------------------------------- #


def encode_videos(model: STOPModel, videos: torch.Tensor) -> torch.Tensor:
    """``[B, T, 3, R, R]`` or, with K views (temporal x spatial), ``[B, K, T, 3, R, R]`` -> ``[B, E]``: the views'
    features averaged, then L2-normalised again."""
    if videos.ndim == 5:
        return model.encode_video(videos)
    batch, views = videos.shape[:2]
    features = model.encode_video(videos.flatten(0, 1)).view(batch, views, -1).mean(dim=1)
    return torch.nn.functional.normalize(features, dim=-1)


@torch.no_grad()
def evaluate_recognition(model, loader, class_features, device, precision, reversed_pairs=False) -> dict[str, float]:
    """Top-1/top-5; with ``reversed_pairs`` (the synthetic classes) also the direction accuracy."""
    model.eval()
    logits, labels = [], []
    for videos, batch_labels in tqdm(loader, desc="evaluate", leave=False, disable=rank() != 0):
        with autocast(device, precision):
            features = encode_videos(model, videos.to(device, non_blocking=True))
            logits.append(model.similarity(features, class_features).float().cpu())
        labels.append(batch_labels)
    logits, labels = gather_in_dataset_order(loader, torch.cat(logits), torch.cat(labels))
    metrics = topk_accuracy(logits, labels)
    if reversed_pairs:
        metrics["direction"] = direction_accuracy(logits, labels)
    return metrics


@torch.no_grad()
def evaluate_retrieval(model, loader, tokenize, device, precision) -> dict[str, dict[str, float]]:
    """The whole test set's ``[N_text, N_video]`` similarity; under torchrun every rank gathers all of it.

    One (video, caption) pair per item (MSR-VTT, LSMDC, the paragraphs of ActivityNet and DiDeMo): a square matrix,
    ``retrieval_metrics``. A multi-caption test set (MSVD, VATEX: ``caption_groups`` on the dataset, one item per
    video) encodes each video once and all its captions: ``multi_caption_retrieval_metrics``.
    """
    model.eval()
    video_features, targets = [], []
    for videos, batch_targets in tqdm(loader, desc="evaluate", leave=False, disable=rank() != 0):
        with autocast(device, precision):
            video_features.append(encode_videos(model, videos.to(device, non_blocking=True)).float())
        targets.extend(batch_targets)
    video_features, targets = gather_in_dataset_order(loader, torch.cat(video_features), targets)
    caption_groups = loader.dataset.dataset.caption_groups
    captions = targets if caption_groups is None else [caption for group in caption_groups for caption in group]
    with autocast(device, precision):
        caption_features = text_features(model, tokenize, captions, device).float()
    similarity = caption_features @ video_features.t()  # [N_text, N_video]
    if caption_groups is None:
        return retrieval_metrics(similarity)
    video_of_caption = torch.repeat_interleave(torch.tensor([len(group) for group in caption_groups]))
    return multi_caption_retrieval_metrics(similarity, video_of_caption.to(similarity.device))


def format_metrics(metrics: dict[str, Any]) -> str:
    """A markdown table: one row per direction for retrieval, one row for recognition."""
    if "text_to_video" in metrics:
        names = list(metrics["text_to_video"])
        rows = [f"| {d} | " + " | ".join(f"{metrics[d][n]:.1f}" for n in names) + " |" for d in metrics]
        return "\n".join([f"| direction | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|", *rows])
    names = {"top1": "top-1", "top5": "top-5", "direction": "direction (vs reversed class)"}
    header = "| " + " | ".join(names[key] for key in metrics) + " |"
    return "\n".join(
        [header, "|---" * len(metrics) + "|", "| " + " | ".join(f"{v:.2f}" for v in metrics.values()) + " |"]
    )


# --------------------------------------------------------------------------- #
# Commands
# --------------------------------------------------------------------------- #

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

DatasetOption = Annotated[Dataset, typer.Option(help="Which dataset; synthetic is generated on first use.")]
RootOption = Annotated[Path | None, typer.Option(help="Dataset folder in its published layout.")]
CheckpointOption = Annotated[Path | None, typer.Option(help="best.pt or last.pt of a train.py run.")]
ClipOption = Annotated[
    str | None, typer.Option(help="CLIP name (ViT-B/32, ...) or path; default: the checkpoint's, else the demo CLIP.")
]
PromptOption = Annotated[Prompt, typer.Option(help="Ablation row: which prompt modules STOP trains.")]
FramesOption = Annotated[
    int | None, typer.Option(min=1, help="Frames per video; default: the checkpoint's, else 8 / the dataset's.")
]
WordsOption = Annotated[
    int | None,
    typer.Option(min=3, help="Caption tokens (retrieval); default: the checkpoint's, else the dataset's (32 or 64)."),
]
ViewsOption = Annotated[int, typer.Option(min=1, help="Temporal views averaged per video.")]
CropsOption = Annotated[
    int, typer.Option(help="Spatial views: 1 (centre square) or 3 (squares along the long side, X-CLIP's test).")
]
SplitOption = Annotated[int, typer.Option(min=1, max=3, help="Official split (UCF101, HMDB51).")]
BatchOption = Annotated[int, typer.Option(min=1)]
WorkersOption = Annotated[int, typer.Option(min=0, help="DataLoader worker processes.")]
DeviceOption = Annotated[Device, typer.Option(help="auto: CUDA when present.")]
PrecisionOption = Annotated[Precision, typer.Option(help="auto: bf16/fp16 autocast on CUDA, fp32 on the CPU.")]
StrictOption = Annotated[bool, typer.Option(help="A broken video is an error instead of a warning.")]
OutOption = Annotated[Path | None, typer.Option(help="Metrics JSON; default: beside the checkpoint, else runs/.")]


def options(
    dataset: DatasetOption = "synthetic",
    root: RootOption = None,
    checkpoint: CheckpointOption = None,
    clip: ClipOption = None,
    prompt: Annotated[
        Prompt | None,
        typer.Option(
            help="Without --checkpoint only: 'none' (zero-shot CLIP4Clip, the default); a checkpoint has its own."
        ),
    ] = None,
    frames: FramesOption = None,
    words: WordsOption = None,
    views: ViewsOption = 1,
    crops: CropsOption = 1,
    split_id: SplitOption = 1,
    batch_size: BatchOption = 32,
    workers: WorkersOption = 4,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    strict: StrictOption = False,
    out: OutOption = None,
) -> dict[str, Any]:
    """The options both commands take (their signature, shared through ``__signature__`` below)."""
    return dict(locals())


def check_output_file(out: Path) -> None:
    """``--out``: a file name whose folder can be written, checked before the evaluation runs."""
    if out.is_dir():
        raise RunError(f"--out {out} is a folder; give the JSON file to write, such as {out / 'eval.json'}")
    check_writable(out.parent, "--out")


def run_evaluation(task: str, options: dict[str, Any]) -> None:
    if options["crops"] not in (1, 3):
        raise RunError(f"--crops {options['crops']}: expected 1 (the centre square) or 3 (left, centre, right squares)")
    device = resolve_device(options["device"])
    precision = resolve_precision(options["precision"], device)
    checkpoint_file, dataset, frames = options["checkpoint"], options["dataset"], options["frames"]
    out = (
        options["out"] or (checkpoint_file.parent if checkpoint_file else Path("runs")) / f"eval-{task}-{dataset}.json"
    )
    if checkpoint_file is not None and options["prompt"] is not None:
        raise RunError(
            f"--prompt {options['prompt']} and --checkpoint: a checkpoint is evaluated with the prompt modules "
            "it trained (its own --prompt); leave --prompt out"
        )
    on_rank_zero(check_output_file, out)
    if checkpoint_file is not None:
        checkpoint = read_checkpoint(checkpoint_file)
        backbone = load_backbone(options["clip"] or checkpoint["clip"]["name"])
        check_same_backbone(checkpoint, backbone, checkpoint_file)
        model = build_model(backbone, checkpoint["config"], device, precision)
        model.load_trainable_state_dict(checkpoint["stop"])
        frames = frames if frames is not None else checkpoint["config"]["frames"]
        words = options["words"] or checkpoint["config"].get("words")
    else:
        if options["prompt"] not in (None, "none"):
            raise RunError(
                f"--prompt {options['prompt']} without --checkpoint would evaluate untrained prompts; "
                "pass --checkpoint RUN/best.pt, or --prompt none for zero-shot CLIP4Clip"
            )
        backbone = load_backbone(options["clip"])
        model = build_model(backbone, {"prompt": "none"}, device, precision)
        frames = frames if frames is not None else default_frames(task, dataset)
        words = options["words"]
    name, location = on_rank_zero(dataset_location, dataset, options["root"], task)
    resolution = model.clip.visual.input_resolution
    test_set = data.build_dataset(
        name,
        location,
        "test",
        num_frames=frames,
        resolution=resolution,
        split_id=options["split_id"],
        views=options["views"],
        crops=options["crops"],
        strict=options["strict"],
    )
    loader = data.build_loader(
        test_set,
        batch_size=options["batch_size"],
        shuffle=False,
        workers=options["workers"],
        sampler=shard(test_set, train=False),
    )
    with rank_local_errors():
        if task == "recognize":
            with autocast(device, precision):
                prompts = class_prompts(dataset, test_set.classes)
                class_features = text_features(model, backbone.tokenize, prompts, device)
            metrics = evaluate_recognition(model, loader, class_features, device, precision, dataset == "synthetic")
        else:
            words = words or data.retrieval_protocol(dataset).words
            metrics = evaluate_retrieval(model, loader, caption_tokenizer(backbone, words), device, precision)
    broken = broken_over_ranks(test_set)
    if rank() != 0:
        return  # rank 0 writes and prints the result
    result = {
        "task": task,
        "dataset": dataset,
        "split_id": options["split_id"],
        "frames": frames,
        "views": options["views"],
        "crops": options["crops"],
        "prompt": model.prompt,
        "checkpoint": str(checkpoint_file) if checkpoint_file else None,
        "clip": backbone.name,
        "videos": len(test_set),
        "left_out_videos": len(test_set.left_out),
        "words": words if task == "retrieve" else None,
        "broken_videos": int(broken),
        **metrics,
    }
    atomic_save(json.dumps(result, indent=2) + "\n", out)
    typer.echo(format_metrics(metrics))
    typer.echo(f"metrics written to {out}")


def register(task: str, help: str) -> None:
    def command(**given: Any) -> None:
        with reported_errors(), process_group(given["device"]):
            run_evaluation(task, given)

    command.__signature__ = inspect.signature(options)  # Typer reads the options from here
    app.command(task, help=help)(command)


register("recognize", "Top-1 / top-5 action recognition on a dataset's test split.")
register(
    "retrieve",
    "Text-to-video and video-to-text R@1/5/10, MdR, MnR on the whole test set (MSR-VTT: 1k-A; MSVD and VATEX: "
    "every caption, CLIP4Clip's multi-sentence protocol).",
)

import explain  # noqa: E402  (the explain command is in explain.py)

explain.register(app)

if __name__ == "__main__":
    app()
