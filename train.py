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
from dataclasses import asdict
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
    RankError,
    RootOption,
    RunError,
    SplitOption,
    StrictOption,
    WorkersOption,
    atomic_save,
    autocast,
    broken_over_ranks,
    build_model,
    caption_tokenizer,
    check_same_backbone,
    check_writable,
    class_prompts,
    dataset_location,
    default_frames,
    distributed,
    echo,
    evaluate_recognition,
    evaluate_retrieval,
    format_metrics,
    load_backbone,
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


def resumed_config(saved: dict[str, Any], requested: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """The saved run's configuration with the options ``--resume`` may change, and the folder it was resumed from
    (a moved run folder carries its old path in ``config["out"]``); options given that conflict are refused."""
    if requested["task"] != saved["task"]:
        raise RunError(f"--resume: {requested['out']} holds a {saved['task']} run, not {requested['task']}")
    conflicts = [
        f"--{name.replace('_', '-')} {requested[name]} (the run has {saved[name]})"
        for name in sorted(given - {"out", *RESUME_MAY_CHANGE})
        if requested[name] != saved[name]
    ]
    if conflicts:
        raise RunError(
            f"--resume: {', '.join(conflicts)}: a run continues with the options it started with; leave them out, "
            f"or start a new run in another --out (--resume may change {', '.join(RESUME_MAY_CHANGE)})"
        )
    config = {**saved, "out": requested["out"]}
    config.update({name: requested[name] for name in RESUME_MAY_CHANGE if name in given})
    return config


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


def batch_loss(model: STOPModel, encode, task: str, videos, targets, class_features, tokenize, device) -> torch.Tensor:
    """Cross-entropy over classes (recognition) or symmetric InfoNCE over the batch (retrieval).

    ``encode`` is ``model.encode_video``, or under torchrun its DistributedDataParallel wrapper; the negatives of
    InfoNCE are then the captions of this process's batch.
    """
    if task == "recognize":
        return F.cross_entropy(model.similarity(encode(videos), class_features), targets.to(device))
    with torch.no_grad():
        caption_features = model.encode_text(tokenize(list(targets)).to(device))  # frozen text tower
    logits = model.similarity(encode(videos), caption_features)  # [B, B], pair i on the diagonal
    labels = torch.arange(logits.shape[0], device=device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def train(config: dict[str, Any], resume: bool, overwrite: bool, given: set[str]) -> None:
    """``given``: the options given on the command line (not defaults), which ``--resume`` checks against the run."""
    out = Path(config["out"])
    checkpoint = on_rank_zero(open_run, out, resume, overwrite)
    if checkpoint:
        config = resumed_config(checkpoint["config"], config, given)
        if checkpoint["epoch"] + 1 >= config["epochs"]:
            echo(
                f"{out} has trained {checkpoint['epoch'] + 1} of --epochs {config['epochs']}: nothing left to do "
                "(pass a larger --epochs to train on)"
            )
            echo(f"done: {out / 'best.pt'} ({best_name(config['task'])} {checkpoint['best']:.2f})")
            return
    task, dataset = config["task"], config["dataset"]
    epochs, lr = DEFAULT_SCHEDULE[task, "synthetic" if dataset == "synthetic" else "real"]
    config = {**config, "epochs": config["epochs"] or epochs, "lr": config["lr"] or lr}
    device = resolve_device(config["device"])
    if distributed() and (device.type == "cuda") != (dist.get_backend() == "nccl"):
        raise RunError(f"this run was trained with --device {config['device']}: resume it with that --device")
    precision = resolve_precision(config["precision"], device)

    name, location = on_rank_zero(dataset_location, dataset, config["root"], task)
    torch.manual_seed(config["seed"])  # the prompt modules' initialisation
    backbone = load_backbone(config["clip"])
    if checkpoint:
        check_same_backbone(checkpoint, backbone, out / "last.pt")
    model = build_model(backbone, config, device, precision)
    if model.num_trainable_parameters() == 0:
        raise RunError("--prompt none has nothing to train (CLIP is frozen); evaluate it with evaluate.py")
    tokenize = caption_tokenizer(backbone, config.get("words") or data.retrieval_protocol("msrvtt").words)
    frozen = sum(p.numel() for p in model.clip.parameters())
    trainable = model.num_trainable_parameters()
    echo(f"STOP --prompt {model.prompt}: {trainable:,} trainable parameters, CLIP's {frozen:,} frozen")

    resolution = model.clip.visual.input_resolution
    splits = {
        split: data.build_dataset(
            name,
            location,
            split,
            num_frames=config["frames"],
            resolution=resolution,
            split_id=config["split_id"],
            strict=config["strict"],
        )
        for split in ("train", "test")
    }
    train_loader = data.build_loader(
        splits["train"],
        batch_size=config["batch_size"],
        shuffle=True,
        workers=config["workers"],
        drop_last=True,
        sampler=shard(splits["train"], train=True, seed=config["seed"]),
        seed=config["seed"],
    )
    test_loader = data.build_loader(
        splits["test"],
        batch_size=config["batch_size"],
        shuffle=False,
        workers=config["workers"],
        sampler=shard(splits["test"], train=False),
    )
    if len(train_loader) == 0:
        share = f" each of the {world_size()} processes gets" if distributed() else ""
        raise RunError(
            f"--batch-size {config['batch_size']} is larger than the {len(train_loader.sampler)} training videos{share}"
        )
    class_features = None
    if task == "recognize":
        with autocast(device, precision):
            prompts = class_prompts(dataset, splits["train"].classes)
            class_features = text_features(model, backbone.tokenize, prompts, device)  # once, frozen

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    total_steps = config["epochs"] * len(train_loader)
    schedule = cosine_with_warmup(total_steps, max(1, round(config["warmup"] * total_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start_epoch, best, best_epoch, records = 0, None, None, []
    if checkpoint:
        model.load_trainable_state_dict(checkpoint["stop"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best, best_epoch = checkpoint["epoch"] + 1, checkpoint["best"], checkpoint["best_epoch"]
        records = checkpoint["records"]
        echo(f"resuming {out} at epoch {start_epoch + 1} of {config['epochs']}")
    last_good = f"{out / 'last.pt'} (epoch {start_epoch})" if checkpoint else "none (no epoch finished)"
    encode = model.encode_video
    if distributed():
        # A batch whose temporal prompters insert no prompt (n_t = 0 everywhere) leaves their parameters without
        # gradient. find_unused_parameters lets DDP finish such steps; a parameter unused on every rank keeps no
        # gradient, so AdamW skips it exactly as it does in one process (a zero gradient would still move it).
        encode = DistributedDataParallel(
            VideoTower(model), device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True
        )

    with rank_local_errors():  # a broken video of this rank's share (--strict) is reported by it
        for epoch in range(start_epoch, config["epochs"]):
            # The shuffle order, each clip's frames and augmentation (data.LoaderItems), and dropout depend on the
            # seed and epoch only, never on the epochs before or the worker processes, so --resume continues
            # exactly. Under torchrun every rank shuffles alike (the sampler's seed) and drops out with its own seed.
            epoch_seed = config["seed"] + epoch + rank() * 2**32
            torch.manual_seed(epoch_seed)
            random.seed(epoch_seed)
            train_loader.set_epoch(epoch)
            model.train()
            running_loss, clips, started = 0.0, 0, time.perf_counter()
            progress = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config['epochs']}", disable=rank() != 0)
            for step, (videos, targets) in enumerate(progress):
                videos = videos.to(device, non_blocking=True)
                with autocast(device, precision):
                    loss = batch_loss(model, encode, task, videos, targets, class_features, tokenize, device)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_value = loss.item()
                if not math.isfinite(loss_value):  # diverged: stop before anything is saved from it
                    where = f"rank {rank()}: " if distributed() else ""
                    raise RankError(
                        f"{where}loss is not finite at epoch {epoch + 1}, step {step + 1}; last good checkpoint: "
                        f"{last_good}. Try a lower --lr"
                    )
                running_loss += loss_value * len(videos)
                clips += len(videos)
                progress.set_postfix(
                    loss=f"{loss_value:.3f}", clips_per_s=f"{clips / (time.perf_counter() - started):.1f}"
                )

            if task == "recognize":
                metrics = evaluate_recognition(
                    model, test_loader, class_features, device, precision, dataset == "synthetic"
                )
                score = metrics["top1"]
            else:
                metrics = evaluate_retrieval(model, test_loader, tokenize, device, precision)
                score = metrics["text_to_video"]["R@1"]
            running_loss, clips = summed_over_ranks(running_loss, clips)
            broken = broken_over_ranks(splits["train"], splits["test"])
            if best is None or score > best:
                best, best_epoch = score, epoch
            if rank() != 0:
                continue  # rank 0 writes the run folder
            record = {
                "epoch": epoch + 1,
                "train_loss": running_loss / clips,
                "lr": scheduler.get_last_lr()[0],
                "train_clips_per_second": clips / (time.perf_counter() - started),
                "broken_videos": int(broken),
                **metrics,
            }
            records = [*records, record]
            typer.echo(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}\n{format_metrics(metrics)}")
            if record["broken_videos"]:
                typer.echo(f"warning: {record['broken_videos']} broken videos were replaced by others (see warnings)")

            state = {
                "stop": model.trainable_state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best": best,
                "best_epoch": best_epoch,
                "metrics": metrics,
                "records": records,
                "rng": rng_states(),
                "config": config,
                "clip": {"name": backbone.name, "sha256": backbone.sha256},
            }
            if overwrite and epoch == 0:
                delete_replaced_run(out)
            save_epoch(out, state)
            last_good = f"{out / 'last.pt'} (epoch {epoch + 1})"
    echo(f"done: {out / 'best.pt'} ({best_name(task)} {best:.2f})")


def best_name(task: str) -> str:
    return "best top-1" if task == "recognize" else "best text-to-video R@1"


# --------------------------------------------------------------------------- #
# Commands
# --------------------------------------------------------------------------- #

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
STOP_DEFAULTS = asdict(STOPConfig())


def options(
    dataset: DatasetOption = "synthetic",
    root: RootOption = None,
    split_id: SplitOption = 1,
    clip: ClipOption = None,
    prompt: PromptOption = "stop",
    alpha: Annotated[float, typer.Option(help="W^s = alpha*A + (1-alpha)*M.")] = STOP_DEFAULTS["alpha"],
    beta: Annotated[float, typer.Option(help="Extra weight of region patches in W^t.")] = STOP_DEFAULTS["beta"],
    eta: Annotated[int, typer.Option(help="Most temporal prompts per gap: n_t = ceil(eta*W^t).")] = STOP_DEFAULTS[
        "eta"
    ],
    rho: Annotated[float, typer.Option(help="Fraction of patches that are regions.")] = STOP_DEFAULTS["rho"],
    reduced_dim: Annotated[int, typer.Option(help="d_r, width of the prompt modules.")] = STOP_DEFAULTS["reduced_dim"],
    prompt_layers: Annotated[int, typer.Option(min=0, help="Prompt the first k blocks; 0: all.")] = 0,
    dropout: Annotated[float, typer.Option(help="Dropout of the prompters.")] = STOP_DEFAULTS["dropout"],
    frames: Annotated[
        int | None, typer.Option(min=2, help="Frames per video; 8 recognition, the dataset's for retrieval (12 or 64).")
    ] = None,
    words: Annotated[
        int | None, typer.Option(min=3, help="Caption tokens, retrieval; default: the dataset's (32 or 64).")
    ] = None,
    batch_size: BatchOption = 32,
    epochs: Annotated[int | None, typer.Option(min=1, help="10 recognition, 5 retrieval; synthetic 25/10.")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate; default 1e-3, synthetic 1e-2.")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.2,
    warmup: Annotated[float, typer.Option(min=0, max=1, help="Fraction of the steps spent warming up.")] = 0.1,
    workers: WorkersOption = 4,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    grad_checkpoint: Annotated[bool, typer.Option(help="Recompute frozen blocks in backward.")] = False,
    seed: Annotated[int, typer.Option(help="Seeds initialisation, shuffling, augmentation, dropout.")] = 0,
    strict: StrictOption = False,
    out: Annotated[Path | None, typer.Option(help="Run folder; default runs/<task>-<dataset>-<prompt>.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out.")] = False,
) -> dict[str, Any]:
    """The options both commands take (their signature, shared through ``__signature__`` below)."""
    return dict(locals())


def run_config(task: str, options: dict[str, Any]) -> dict[str, Any]:
    """The run's configuration, saved in every checkpoint: the options with per-task defaults filled in."""
    dataset = options["dataset"]
    return {
        **options,
        "task": task,
        "prompt_layers": options["prompt_layers"] or None,
        "frames": options["frames"] or default_frames(task, dataset),
        "words": options["words"] or (data.retrieval_protocol(dataset).words if task == "retrieve" else None),
        "out": str(options["out"] or Path("runs") / f"{task}-{dataset}-{options['prompt']}"),
        "root": str(options["root"]) if options["root"] else None,
    }


def register(task: str, help: str) -> None:
    def command(context: typer.Context, **values: Any) -> None:
        with reported_errors(), process_group(values["device"]):
            resume, overwrite = values.pop("resume"), values.pop("overwrite")
            given = {name for name in values if context.get_parameter_source(name).name != "DEFAULT"}
            train(run_config(task, values), resume=resume, overwrite=overwrite, given=given)

    # Typer reads the options from here, and passes the click context (which options were given) as `context`.
    context = inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context, *inspect.signature(options).parameters.values()])
    app.command(task, help=help)(command)


register("recognize", "Action recognition: ucf101, hmdb51, ssv2, kinetics400, or synthetic (no download).")
register(
    "retrieve", "Text-video retrieval: msrvtt, msvd, lsmdc, activitynet, didemo, vatex, or synthetic (no download)."
)

if __name__ == "__main__":
    app()
