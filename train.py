"""Train STOP's prompt modules on a frozen CLIP, for action recognition or text-video retrieval.

``python train.py recognize --dataset synthetic`` (no download: generated videos, a small random CLIP)
``python train.py recognize --dataset ucf101 --root /data/UCF101 --clip ViT-B/32``
``python train.py retrieve --dataset msrvtt --root /data/msrvtt --clip ViT-B/32``

Only STOP's parameters train (AdamW, cosine schedule with linear warm-up); CLIP stays frozen. Recognition
minimises cross-entropy over ``logit_scale * cos(video, class text)``; retrieval the symmetric InfoNCE loss over
the batch's video-caption pairs. After each epoch the test split is evaluated, a line is appended to
``metrics.jsonl``, and ``last.pt`` (and ``best.pt`` when the metric improved) are written to the run folder:
STOP's parameters, the optimiser and scheduler, RNG states and the configuration, never the frozen backbone.

``torchrun --nproc_per_node N train.py recognize ...`` trains on N processes (GPUs, or CPU processes with gloo):
each takes its share of every epoch (``DistributedSampler``, reshuffled per epoch), DistributedDataParallel averages
the gradients of STOP's parameters only, and rank 0 alone prints, draws progress bars and writes the run folder.
``--batch-size`` is per process. The test split is evaluated by all of them and gathered, as in ``evaluate.py``.
"""

import inspect
import json
import math
import random
import shutil
import time
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
    RunError,
    SplitOption,
    StrictOption,
    WorkersOption,
    atomic_save,
    autocast,
    broken_over_ranks,
    build_model,
    check_same_backbone,
    class_prompts,
    dataset_location,
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
from stop import STOPModel

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


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing run unless ``--resume`` (continue it) or ``--overwrite`` (start it afresh)."""
    if resume and not (out / "last.pt").is_file():
        raise RunError(f"--resume: {out / 'last.pt'} does not exist; nothing to resume")
    if not resume and not overwrite and out.exists() and any(out.iterdir()):
        raise RunError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")


def open_run(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the run folder and, with ``--resume``, read its ``last.pt``."""
    check_run_folder(out, resume, overwrite)
    return read_checkpoint(out / "last.pt") if resume else None


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


def train(config: dict[str, Any], resume: bool, overwrite: bool) -> None:
    out = Path(config["out"])
    checkpoint = on_rank_zero(open_run, out, resume, overwrite)
    if checkpoint:  # the saved configuration, with --epochs able to extend the run
        config = {**checkpoint["config"], "epochs": config["epochs"] or checkpoint["config"]["epochs"]}
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
    start_epoch, best = 0, None
    if rank() == 0:
        if overwrite and not resume:
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    if checkpoint:
        model.load_trainable_state_dict(checkpoint["stop"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best = checkpoint["epoch"] + 1, checkpoint["best"]
        echo(f"resuming {out} at epoch {start_epoch + 1} of {config['epochs']}")
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
            # The shuffle order, augmentation and dropout depend on the seed and epoch only, so --resume continues
            # exactly. Under torchrun every rank shuffles alike (the sampler's seed) but augments with its own seed.
            epoch_seed = config["seed"] + epoch + rank() * 2**32
            torch.manual_seed(epoch_seed)
            random.seed(epoch_seed)
            train_loader.generator.manual_seed(epoch_seed)
            if distributed():
                train_loader.sampler.set_epoch(epoch)
            model.train()
            running_loss, clips, started = 0.0, 0, time.perf_counter()
            progress = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config['epochs']}", disable=rank() != 0)
            for videos, targets in progress:
                videos = videos.to(device, non_blocking=True)
                with autocast(device, precision):
                    loss = batch_loss(model, encode, task, videos, targets, class_features, backbone.tokenize, device)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                running_loss += loss.item() * len(videos)
                clips += len(videos)
                progress.set_postfix(
                    loss=f"{loss.item():.3f}", clips_per_s=f"{clips / (time.perf_counter() - started):.1f}"
                )

            if task == "recognize":
                metrics = evaluate_recognition(
                    model, test_loader, class_features, device, precision, dataset == "synthetic"
                )
                score = metrics["top1"]
            else:
                metrics = evaluate_retrieval(model, test_loader, backbone.tokenize, device, precision)
                score = metrics["text_to_video"]["R@1"]
            running_loss, clips = summed_over_ranks(running_loss, clips)
            broken = broken_over_ranks(splits["train"], splits["test"])
            improved = best is None or score > best
            best = score if improved else best
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
            with open(out / "metrics.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
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
                "metrics": metrics,
                "rng": rng_states(),
                "config": config,
                "clip": {"name": backbone.name, "sha256": backbone.sha256},
            }
            atomic_save(state, out / "last.pt")
            if improved:
                atomic_save(state, out / "best.pt")
    echo(f"done: {out / 'best.pt'} (best {'top-1' if task == 'recognize' else 'text-to-video R@1'} {best:.2f})")


# --------------------------------------------------------------------------- #
# Commands
# --------------------------------------------------------------------------- #

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
STOP_DEFAULTS = {name: p.default for name, p in inspect.signature(STOPModel).parameters.items()}


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
    frames: Annotated[int | None, typer.Option(min=2, help="Frames per video; 8 recognition, 12 retrieval.")] = None,
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
        "frames": options["frames"] or (8 if task == "recognize" else 12),
        "out": str(options["out"] or Path("runs") / f"{task}-{dataset}-{options['prompt']}"),
        "root": str(options["root"]) if options["root"] else None,
    }


def register(task: str, help: str) -> None:
    def command(**given: Any) -> None:
        with reported_errors(), process_group(given["device"]):
            resume, overwrite = given.pop("resume"), given.pop("overwrite")
            train(run_config(task, given), resume=resume, overwrite=overwrite)

    command.__signature__ = inspect.signature(options)  # Typer reads the options from here
    app.command(task, help=help)(command)


register("recognize", "Action recognition: ucf101, hmdb51, ssv2, or synthetic (no download).")
register("retrieve", "Text-video retrieval: msrvtt, or synthetic (no download).")

if __name__ == "__main__":
    app()
