"""Train STOP's prompt modules on a frozen CLIP, for action recognition or text-video retrieval.

``python train.py recognize --dataset synthetic`` (no download: generated videos, a small random CLIP)
``python train.py recognize --dataset ucf101 --root /data/UCF101 --clip ViT-B/32``
``python train.py retrieve --dataset msrvtt --root /data/msrvtt --clip ViT-B/32``

Only STOP's parameters train (AdamW, cosine schedule with linear warm-up); CLIP stays frozen. Recognition
minimises cross-entropy over ``logit_scale * cos(video, class text)``; retrieval the symmetric InfoNCE loss over
the batch's video-caption pairs. After each epoch the test split is evaluated and the run folder written:
``last.pt``, ``best.pt`` when the metric improved (STOP's parameters, the optimiser and scheduler, RNG states, the
configuration and every epoch's metrics, never the frozen backbone), then ``metrics.jsonl``, in that order so that
``--resume`` can repair what a kill left unwritten (``save_epoch``). A loss that is no longer finite stops the run.

``torchrun --nproc_per_node N train.py recognize ...`` trains on N processes (GPUs, or CPU processes with gloo):
each takes its share of every epoch (``DistributedSampler``, reshuffled per epoch), DistributedDataParallel averages
the gradients of STOP's parameters only, and rank 0 alone prints, draws progress bars and writes the run folder.
``--batch-size`` is per process. The test split is evaluated by all of them and gathered, as in ``evaluate.py``.
"""

import inspect
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import typer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from evaluate import (
    BatchOption,
    ClipOption,
    DatasetOption,
    DeviceOption,
    PrecisionOption,
    PromptOption,
    RootOption,
    SplitOption,
    StrictOption,
    WorkersOption,
    evaluate_recognition,
    evaluate_retrieval,
    format_metrics,
)
from runtime import (
    CAPTION_TOKENS,
    RECOGNITION_FRAMES,
    Backbone,
    RankError,
    RunError,
    atomic_save,
    autocast,
    broken_over_ranks,
    build_model,
    caption_tokenizer,
    check_writable,
    class_prompts,
    dataset_location,
    default_frames,
    distributed,
    echo,
    load_backbone,
    load_trained,
    on_rank_zero,
    process_group,
    rank,
    rank_local_errors,
    read_checkpoint,
    reported_errors,
    resolve_device,
    resolve_precision,
    shard,
    summed_over_ranks,
    text_features,
    world_size,
)
from stop import STOPConfig, STOPModel

# (epochs, learning rate) when not given. Real datasets: the spec's training defaults. The synthetic demo is a
# few hundred steps on a CPU, so it takes a larger rate to learn in minutes.
DEFAULT_SCHEDULE = {
    ("recognize", "synthetic"): (25, 1e-2),
    ("retrieve", "synthetic"): (10, 1e-2),
    ("recognize", "real"): (10, 1e-3),
    ("retrieve", "real"): (5, 1e-3),
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run: ``train.py``'s options with every default filled in, saved in each checkpoint.

    Checkpoints store it flat (``asdict``), STOP's hyper-parameters among the rest: ``STOPConfig.from_dict`` reads
    those back. The fields without a default are set per task and dataset (``run_config``): ``frames`` from
    ``default_frames``, ``epochs`` and ``lr`` from ``DEFAULT_SCHEDULE``, ``out`` from the task, dataset and prompt.
    """

    dataset: str = "synthetic"
    root: str | None = None  # None: data/synthetic for the synthetic dataset, required for the others
    split_id: int = 1
    clip: str | None = None  # None: the small random demo CLIP
    prompt: str = STOPConfig.prompt
    alpha: float = STOPConfig.alpha
    beta: float = STOPConfig.beta
    eta: int = STOPConfig.eta
    rho: float = STOPConfig.rho
    reduced_dim: int = STOPConfig.reduced_dim
    prompt_layers: int | None = STOPConfig.prompt_layers
    dropout: float = STOPConfig.dropout
    frames: int
    words: int | None = None  # caption tokens, retrieval only (None: recognition)
    batch_size: int = 32  # per process
    epochs: int
    lr: float
    weight_decay: float = 0.2
    warmup: float = 0.1  # fraction of the steps
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"
    grad_checkpoint: bool = False
    seed: int = 0
    strict: bool = False
    out: str
    task: str  # "recognize" or "retrieve"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """A checkpoint's ``config``; a field it lacks (``grad_checkpoint`` before it existed) takes its default."""
        return cls(**{field.name: values[field.name] for field in fields(cls) if field.name in values})

    def stop_config(self) -> STOPConfig:
        return STOPConfig.from_dict(asdict(self))


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """Learning-rate factor: linear warm-up from 0 to 1, then a cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def holds_run(out: Path) -> bool:
    return (out / "metrics.jsonl").is_file() or (out / "last.pt").is_file()


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing run unless ``--resume`` (continue it) or ``--overwrite`` (start it afresh), and
    any other non-empty folder in every case: only a run's own files are ever replaced."""
    if resume and overwrite:
        raise RunError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; the run folder must be a folder")
    if resume:
        if not (out / "last.pt").is_file():
            raise RunError(f"--resume: {out / 'last.pt'} does not exist; nothing to resume")
        return
    if not out.exists() or not any(out.iterdir()):
        return
    if not holds_run(out):
        raise RunError(
            f"{out} is not empty and holds no run (no metrics.jsonl or last.pt): its files are left alone; "
            "choose a new or empty folder for --out"
        )
    if not overwrite:
        raise RunError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")


def delete_replaced_run(out: Path) -> None:
    """``--overwrite``, just before the new run's first ``save_epoch``, which replaces the earlier run's
    ``last.pt``, ``best.pt`` and ``metrics.jsonl``: delete its evaluations and temporary files, nothing else. Until
    then the earlier run stays whole, so a new run that fails in its first epoch loses nothing."""
    for path in [*out.glob("eval-*.json"), *out.glob("*.tmp")]:
        path.unlink(missing_ok=True)


def metrics_lines(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def save_epoch(out: Path, state: dict[str, Any]) -> None:
    """Write the run folder after an epoch, so that a kill at any point leaves it consistent or repairable.

    ``last.pt`` goes first and is the commit point: it holds everything, every epoch's metric record included.
    Then ``best.pt`` when this epoch is the best so far (the same state) and ``metrics.jsonl`` (all records), each
    written whole through a temporary file. A kill before ``last.pt`` is renamed loses the epoch, which
    ``--resume`` runs again exactly; a kill after it leaves ``best.pt`` or ``metrics.jsonl`` one epoch behind, and
    ``repair_run_folder`` brings them up to date from ``last.pt`` when the run is resumed.
    """
    atomic_save(state, out / "last.pt")
    if state["best_epoch"] == state["epoch"]:
        atomic_save(state, out / "best.pt")
    atomic_save(metrics_lines(state["records"]), out / "metrics.jsonl")


def holds_state(path: Path, state: dict[str, Any]) -> bool:
    """Whether the checkpoint at ``path`` is ``state``: the same epoch and STOP tensors (not merely the same epoch
    number: ``best.pt`` may still be the replaced run's, after ``--overwrite``)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        same_tensors = saved["stop"].keys() == state["stop"].keys() and all(
            torch.equal(saved["stop"][name], tensor) for name, tensor in state["stop"].items()
        )
        return saved["epoch"] == state["epoch"] and same_tensors
    except Exception:  # missing, truncated, not a checkpoint: rewritten from last.pt all the same
        return False


def repair_run_folder(out: Path, checkpoint: dict[str, Any]) -> None:
    """Finish what ``save_epoch`` had not when the run was killed: ``best.pt`` and ``metrics.jsonl`` as ``last.pt``
    says they are."""
    if checkpoint["best_epoch"] == checkpoint["epoch"] and not holds_state(out / "best.pt", checkpoint):
        atomic_save(checkpoint, out / "best.pt")
    lines = metrics_lines(checkpoint["records"])
    metrics = out / "metrics.jsonl"
    if not metrics.is_file() or metrics.read_text() != lines:
        atomic_save(lines, metrics)


def open_run(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the run folder and that it can be written; with ``--resume``, read its ``last.pt`` and repair the
    folder from it."""
    check_run_folder(out, resume, overwrite)
    check_writable(out, "--out")
    if not resume:
        return None
    checkpoint = read_checkpoint(out / "last.pt")
    if not {"records", "best_epoch"} <= checkpoint.keys():
        raise RunError(f"{out / 'last.pt'} was written by an older train.py: it can be evaluated, not resumed")
    repair_run_folder(out, checkpoint)
    return checkpoint


# What --resume may change; anything else given must match the saved run. --clip may name the same weights
# elsewhere (their SHA256 is checked), --root the same dataset elsewhere, --epochs extends the run.
RESUME_MAY_CHANGE = ("epochs", "workers", "device", "strict", "root", "clip")


def resumed_config(saved: Mapping[str, Any], requested: TrainConfig, given: set[str]) -> TrainConfig:
    """The saved run's configuration with the options ``--resume`` may change, and the folder it was resumed from
    (a moved run folder carries its old path in ``config["out"]``); options given that conflict are refused."""
    if requested.task != saved["task"]:
        raise RunError(f"--resume: {requested.out} holds a {saved['task']} run, not {requested.task}")
    options = asdict(requested)
    conflicts = [
        f"--{name.replace('_', '-')} {options[name]} (the run has {saved[name]})"
        for name in sorted(given - {"out", *RESUME_MAY_CHANGE})
        if options[name] != saved[name]
    ]
    if conflicts:
        raise RunError(
            f"--resume: {', '.join(conflicts)}: a run continues with the options it started with; leave them out, "
            f"or start a new run in another --out (--resume may change {', '.join(RESUME_MAY_CHANGE)})"
        )
    changed = {name: options[name] for name in RESUME_MAY_CHANGE if name in given}
    return TrainConfig.from_dict({**saved, "out": requested.out, **changed})


class VideoTower(nn.Module):
    """What DistributedDataParallel wraps: STOP's video encoder as a ``forward``, STOP's prompters as its parameters.

    DDP averages gradients only for what runs through its ``forward``, and at the start broadcasts every parameter
    of the module it wraps from rank 0. Registering ``model.prompters`` as the only submodule, and calling the model
    through a bound method, keeps both to what trains: the frozen CLIP, the same on every rank, is never sent.
    """

    def __init__(self, model: STOPModel):
        super().__init__()
        self.prompters = model.prompters
        self.encode_video = model.encode_video  # a method, not a submodule: CLIP stays out of DDP's view

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.encode_video(videos)


# --------------------------------------------------------------------------- #
# The steps of a run
# --------------------------------------------------------------------------- #


@dataclass
class Run:
    """What a run builds before its first step (``start_run``), and every step of the loop reads."""

    config: TrainConfig
    out: Path
    device: torch.device
    precision: str
    backbone: Backbone
    tokenize: Callable[[list[str]], torch.Tensor]  # captions to tokens, cut to --words (retrieval)
    model: STOPModel
    encode: Callable[[torch.Tensor], torch.Tensor]  # model.encode_video, or its DDP wrapper under torchrun
    train_set: data.VideoDataset
    test_set: data.VideoDataset
    train_loader: data.VideoLoader
    test_loader: data.VideoLoader
    class_features: torch.Tensor | None  # [C, E], recognition's class texts; None for retrieval
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


def batch_loss(run: Run, videos: torch.Tensor, targets: torch.Tensor | list[str]) -> torch.Tensor:
    """Cross-entropy over classes (recognition) or symmetric InfoNCE over the batch (retrieval).

    ``run.encode`` is ``model.encode_video``, or under torchrun its DistributedDataParallel wrapper; the negatives
    of InfoNCE are then the captions of this process's batch.
    """
    model, device = run.model, run.device
    if run.config.task == "recognize":
        return F.cross_entropy(model.similarity(run.encode(videos), run.class_features), targets.to(device))
    with torch.no_grad():
        caption_features = model.encode_text(run.tokenize(list(targets)).to(device))  # frozen text tower
    logits = model.similarity(run.encode(videos), caption_features)  # [B, B], pair i on the diagonal
    labels = torch.arange(logits.shape[0], device=device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def start_run(config: TrainConfig, checkpoint: Mapping[str, Any] | None) -> Run:
    """Place the run, build its model and loaders and its optimiser; a resumed run loads its state from
    ``checkpoint`` (``last.pt``, read by rank 0 and handed to every rank)."""
    out = Path(config.out)
    device = resolve_device(config.device)
    if distributed() and (device.type == "cuda") != (dist.get_backend() == "nccl"):
        raise RunError(f"this run was trained with --device {config.device}: resume it with that --device")
    precision = resolve_precision(config.precision, device)
    name, location = on_rank_zero(dataset_location, config.dataset, config.root, config.task)

    torch.manual_seed(config.seed)  # the prompt modules' initialisation (a resumed run loads them instead)
    if checkpoint:
        model, backbone, _ = load_trained(out / "last.pt", config.clip, device, precision, checkpoint)
    else:
        backbone = load_backbone(config.clip)
        model = build_model(backbone, config.stop_config(), device, precision, config.grad_checkpoint)
    if model.num_trainable_parameters() == 0:
        raise RunError("--prompt none has nothing to train (CLIP is frozen); evaluate it with evaluate.py")
    tokenize = caption_tokenizer(backbone, config.words or CAPTION_TOKENS)
    frozen = sum(p.numel() for p in model.clip.parameters())
    trainable = model.num_trainable_parameters()
    echo(f"STOP --prompt {model.prompt}: {trainable:,} trainable parameters, CLIP's {frozen:,} frozen")

    train_set, test_set = (
        data.build_dataset(
            name,
            location,
            split,
            num_frames=config.frames,
            resolution=model.clip.visual.input_resolution,
            split_id=config.split_id,
            strict=config.strict,
        )
        for split in ("train", "test")
    )
    # The training order is the seed's and the epoch's alone (``shard``), so --resume can start any epoch exactly.
    train_loader = data.build_loader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        workers=config.workers,
        drop_last=True,
        sampler=shard(train_set, train=True, seed=config.seed),
        seed=config.seed,
    )
    test_loader = data.build_loader(
        test_set,
        batch_size=config.batch_size,
        shuffle=False,
        workers=config.workers,
        sampler=shard(test_set, train=False),
    )
    if len(train_loader) == 0:
        share = f" each of the {world_size()} processes gets" if distributed() else ""
        raise RunError(
            f"--batch-size {config.batch_size} is larger than the {len(train_loader.sampler)} training videos{share}"
        )
    class_features = None
    if config.task == "recognize":
        with autocast(device, precision):  # once: the text tower is frozen
            prompts = class_prompts(config.dataset, train_set.classes)
            class_features = text_features(model, backbone.tokenize, prompts, device)

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * len(train_loader)
    schedule = cosine_with_warmup(total_steps, max(1, round(config.warmup * total_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 alone needs loss scaling
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])

    encode = model.encode_video
    if distributed():
        # Every gap carries eta prompt slots, real or masked, so a batch with no prompt (n_t = 0 everywhere) still
        # runs the temporal prompters and gives them a zero gradient, in one process as here. Single-frame videos skip
        # them: find_unused_parameters lets DDP finish such steps, and a parameter unused on every rank keeps no
        # gradient, so AdamW skips it exactly as it does in one process.
        encode = DistributedDataParallel(
            VideoTower(model), device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True
        )
    return Run(
        config, out, device, precision, backbone, tokenize, model, encode, train_set, test_set, train_loader,
        test_loader, class_features, optimizer, scheduler, scaler,
    )  # fmt: skip


def train_one_epoch(run: Run, epoch: int, last_good: str) -> tuple[float, int]:
    """One pass over this rank's share of the training set: the summed loss over its clips, and their number.

    A loss that is no longer finite stops the run before anything is saved from it, naming ``last_good``.
    """
    config = run.config
    # The shuffle order, each clip's frames and augmentation (data.LoaderItems), and dropout depend on the seed and
    # epoch only, never on the epochs before or the worker processes, so --resume continues exactly. Under torchrun
    # every rank shuffles alike (the sampler's seed) and drops out with its own seed.
    epoch_seed = config.seed + epoch + rank() * 2**32
    torch.manual_seed(epoch_seed)
    random.seed(epoch_seed)
    run.train_loader.set_epoch(epoch)
    run.model.train()
    running_loss, clips, started = 0.0, 0, time.perf_counter()
    progress = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=rank() != 0)
    for step, (videos, targets) in enumerate(progress):
        videos = videos.to(run.device, non_blocking=True)
        with autocast(run.device, run.precision):
            loss = batch_loss(run, videos, targets)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            where = f"rank {rank()}: " if distributed() else ""
            raise RankError(
                f"{where}loss is not finite at epoch {epoch + 1}, step {step + 1}; last good checkpoint: "
                f"{last_good}. Try a lower --lr"
            )
        running_loss += loss_value * len(videos)
        clips += len(videos)
        progress.set_postfix(loss=f"{loss_value:.3f}", clips_per_s=f"{clips / (time.perf_counter() - started):.1f}")
    return running_loss, clips


def evaluate_epoch(run: Run) -> tuple[dict[str, Any], float]:
    """The test split's metrics, and the score that picks ``best.pt``: top-1, or text-to-video R@1."""
    model, loader, device, precision = run.model, run.test_loader, run.device, run.precision
    if run.config.task == "recognize":
        reversed_pairs = run.config.dataset == "synthetic"
        metrics = evaluate_recognition(model, loader, run.class_features, device, precision, reversed_pairs)
        return metrics, metrics["top1"]
    metrics = evaluate_retrieval(model, loader, run.tokenize, device, precision)
    return metrics, metrics["text_to_video"]["R@1"]


def checkpoint_state(run: Run, epoch: int, best: float, best_epoch: int, metrics, records) -> dict[str, Any]:
    """What ``last.pt`` (and ``best.pt``) hold: STOP's parameters alone, never the frozen backbone, with what
    ``--resume`` needs to continue exactly and the configuration, flat, that ``evaluate.py`` reads back."""
    return {
        "stop": run.model.trainable_state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "best": best,
        "best_epoch": best_epoch,
        "metrics": metrics,
        "records": records,
        "rng": rng_states(),
        "config": asdict(run.config),
        "clip": {"name": run.backbone.name, "sha256": run.backbone.sha256},
    }


def train(config: TrainConfig, resume: bool, overwrite: bool, given: set[str]) -> None:
    """Train as ``config`` says: open (or resume) the run, then per epoch train, evaluate, and save.

    ``given``: the options given on the command line (not defaults), which ``--resume`` checks against the run.
    """
    out = Path(config.out)
    # Open the run folder: rank 0 alone checks it, and with --resume reads last.pt and repairs best.pt and
    # metrics.jsonl from it (a kill may have left them one epoch behind); every rank receives the checkpoint.
    checkpoint = on_rank_zero(open_run, out, resume, overwrite)
    if checkpoint:
        config = resumed_config(checkpoint["config"], config, given)
        if checkpoint["epoch"] + 1 >= config.epochs:
            echo(
                f"{out} has trained {checkpoint['epoch'] + 1} of --epochs {config.epochs}: nothing left to do "
                "(pass a larger --epochs to train on)"
            )
            echo(f"done: {out / 'best.pt'} ({best_name(config.task)} {checkpoint['best']:.2f})")
            return

    run = start_run(config, checkpoint)
    first_epoch, best, best_epoch, records = 0, None, None, []
    last_good = "none (no epoch finished)"  # named by the error line of a loss that is no longer finite
    if checkpoint:
        first_epoch, best, best_epoch = checkpoint["epoch"] + 1, checkpoint["best"], checkpoint["best_epoch"]
        records = checkpoint["records"]
        last_good = f"{out / 'last.pt'} (epoch {first_epoch})"
        echo(f"resuming {out} at epoch {first_epoch + 1} of {config.epochs}")

    with rank_local_errors():  # a broken video of this rank's share (--strict) is reported by it
        for epoch in range(first_epoch, config.epochs):
            started = time.perf_counter()
            running_loss, clips = train_one_epoch(run, epoch, last_good)
            metrics, score = evaluate_epoch(run)
            # Every rank takes part in these two collectives; then rank 0 alone logs and writes the run folder.
            running_loss, clips = summed_over_ranks(running_loss, clips)
            broken = broken_over_ranks(run.train_set, run.test_set)
            if best is None or score > best:
                best, best_epoch = score, epoch
            if rank() != 0:
                continue
            record = {
                "epoch": epoch + 1,
                "train_loss": running_loss / clips,
                "lr": run.scheduler.get_last_lr()[0],
                "train_clips_per_second": clips / (time.perf_counter() - started),  # the evaluation's time included
                "broken_videos": int(broken),
                **metrics,
            }
            records = [*records, record]
            typer.echo(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}\n{format_metrics(metrics)}")
            if record["broken_videos"]:
                typer.echo(f"warning: {record['broken_videos']} broken videos were replaced by others (see warnings)")
            if overwrite and epoch == 0:
                delete_replaced_run(out)  # only now: a new run that failed in its first epoch replaced nothing
            save_epoch(out, checkpoint_state(run, epoch, best, best_epoch, metrics, records))
            last_good = f"{out / 'last.pt'} (epoch {epoch + 1})"
    echo(f"done: {out / 'best.pt'} ({best_name(config.task)} {best:.2f})")


def best_name(task: str) -> str:
    return "best top-1" if task == "recognize" else "best text-to-video R@1"


# --------------------------------------------------------------------------- #
# Commands
# --------------------------------------------------------------------------- #

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
FRAMES_HELP = f"Frames per video; {RECOGNITION_FRAMES} recognition, the dataset's for retrieval (12 or 64)."
EPOCHS_HELP = "{} recognition, {} retrieval; synthetic {}/{}.".format(
    *(DEFAULT_SCHEDULE[task, kind][0] for kind in ("real", "synthetic") for task in ("recognize", "retrieve"))
)
LR_HELP = "AdamW learning rate; default {}, synthetic {}.".format(
    *(f"{DEFAULT_SCHEDULE['recognize', kind][1]:.0e}".replace("e-0", "e-") for kind in ("real", "synthetic"))
)


def options(
    dataset: DatasetOption = TrainConfig.dataset,
    root: RootOption = None,
    split_id: SplitOption = TrainConfig.split_id,
    clip: ClipOption = TrainConfig.clip,
    prompt: PromptOption = STOPConfig.prompt,
    alpha: Annotated[float, typer.Option(help="W^s = alpha*A + (1-alpha)*M.")] = STOPConfig.alpha,
    beta: Annotated[float, typer.Option(help="Extra weight of region patches in W^t.")] = STOPConfig.beta,
    eta: Annotated[int, typer.Option(help="Most temporal prompts per gap: n_t = ceil(eta*W^t).")] = STOPConfig.eta,
    rho: Annotated[float, typer.Option(help="Fraction of patches that are regions.")] = STOPConfig.rho,
    reduced_dim: Annotated[int, typer.Option(help="d_r, width of the prompt modules.")] = STOPConfig.reduced_dim,
    prompt_layers: Annotated[int, typer.Option(min=0, help="Prompt the first k blocks; 0: all.")] = 0,
    dropout: Annotated[float, typer.Option(help="Dropout of the prompters.")] = STOPConfig.dropout,
    frames: Annotated[int | None, typer.Option(min=2, help=FRAMES_HELP)] = None,
    words: Annotated[
        int | None, typer.Option(min=3, help="Caption tokens, retrieval; default: the dataset's (32 or 64).")
    ] = None,
    batch_size: BatchOption = TrainConfig.batch_size,
    epochs: Annotated[int | None, typer.Option(min=1, help=EPOCHS_HELP)] = None,
    lr: Annotated[float | None, typer.Option(help=LR_HELP)] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = TrainConfig.weight_decay,
    warmup: Annotated[
        float, typer.Option(min=0, max=1, help="Fraction of the steps spent warming up.")
    ] = TrainConfig.warmup,
    workers: WorkersOption = TrainConfig.workers,
    device: DeviceOption = TrainConfig.device,
    precision: PrecisionOption = TrainConfig.precision,
    grad_checkpoint: Annotated[
        bool, typer.Option(help="Recompute frozen blocks in backward.")
    ] = TrainConfig.grad_checkpoint,
    seed: Annotated[
        int, typer.Option(help="Seeds initialisation, shuffling, augmentation, dropout.")
    ] = TrainConfig.seed,
    strict: StrictOption = TrainConfig.strict,
    out: Annotated[Path | None, typer.Option(help="Run folder; default runs/<task>-<dataset>-<prompt>.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out.")] = False,
) -> None:
    """Never called: the options of both commands, which Typer reads from this signature (``register``). Each
    default is ``TrainConfig``'s or ``STOPConfig``'s; ``None`` (and ``--prompt-layers 0``) is filled in by
    ``run_config``."""


def run_config(task: str, options: dict[str, Any]) -> TrainConfig:
    """The run's configuration: the options with the per-task defaults filled in."""
    dataset = options["dataset"]
    default_epochs, default_lr = DEFAULT_SCHEDULE[task, "synthetic" if dataset == "synthetic" else "real"]
    return TrainConfig(
        **{
            **options,
            "prompt_layers": options["prompt_layers"] or None,
            "frames": options["frames"] or default_frames(task, dataset),
            "words": options["words"] or (data.retrieval_protocol(dataset).words if task == "retrieve" else None),
            "epochs": options["epochs"] or default_epochs,
            "lr": options["lr"] or default_lr,
            "out": str(options["out"] or Path("runs") / f"{task}-{dataset}-{options['prompt']}"),
            "root": str(options["root"]) if options["root"] else None,
        },
        task=task,
    )


def register(task: str, help: str) -> None:
    def command(context: typer.Context, **values: Any) -> None:
        with reported_errors(), process_group(values["device"]):
            resume, overwrite = values.pop("resume"), values.pop("overwrite")
            given = {name for name in values if context.get_parameter_source(name).name != "DEFAULT"}
            train(run_config(task, values), resume=resume, overwrite=overwrite, given=given)

    # Typer reads the options from here, and passes the click context (which options were given) as ``context``.
    context = inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context, *inspect.signature(options).parameters.values()])
    app.command(task, help=help)(command)


register("recognize", "Action recognition: ucf101, hmdb51, ssv2, kinetics400, or synthetic (no download).")
register(
    "retrieve", "Text-video retrieval: msrvtt, msvd, lsmdc, activitynet, didemo, vatex, or synthetic (no download)."
)

if __name__ == "__main__":
    app()
