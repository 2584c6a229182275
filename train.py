"""Train STOP's prompt modules on a frozen CLIP, for action recognition or text-video retrieval.

``python train.py recognize --dataset synthetic`` (no download: generated videos, a small random CLIP)
``python train.py recognize --dataset ucf101 --root /data/UCF101 --clip ViT-B/32``
``python train.py retrieve --dataset msrvtt --root /data/msrvtt --clip ViT-B/32``

Read top to bottom: the run's configuration (``TrainConfig``), what a run builds before its first step
(``build_run``: the model, the loaders, the optimiser), the loss (``batch_loss``), and ``train``, the loop. Only
STOP's parameters train (AdamW, cosine schedule with linear warm-up, gradient-norm clipping); CLIP stays frozen.
Recognition minimises cross-entropy over ``logit_scale * cos(video, class text)``; retrieval the symmetric InfoNCE
loss over the batch's video-caption pairs. After each epoch the test split is evaluated and the run folder written
(``runs.py``: ``last.pt``, ``best.pt`` when the metric improved, ``metrics.jsonl``).

``torchrun --nproc_per_node N train.py ...`` splits each batch of ``--batch-size`` over N processes
(``runtime.py``); DistributedDataParallel averages the gradients of STOP's parameters, and retrieval gathers
every process's features, so the loss and its gradients are those of one process with the whole batch.
"""

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import typer
from tqdm import tqdm

import data
import stop
from evaluate import evaluate_recognition, evaluate_retrieval, format_metrics
from loading import protocols
from loading.errors import ConfigError, RankError, RunError, is_number
from plumbing import cli, runs, runtime
from plumbing.runtime import VideoTower, all_gather_with_grad, autocast, echo
from stop import STOPConfig, STOPModel

ADAMW_BETAS, ADAMW_EPS = (0.9, 0.98), 1e-6  # CLIP's and the authors' (torch's defaults are (0.9, 0.999), 1e-8)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(STOPConfig):
    """A training run: STOP's hyper-parameters (``STOPConfig``'s fields) and the run's, every default filled in.

    Checkpoints store it flat (``asdict``); ``STOPConfig.from_dict`` reads STOP's part back. ``run_config`` fills in
    the defaults that depend on the task and dataset.
    """

    task: str  # "recognize" or "retrieve"
    dataset: str
    root: str | None = None  # None: data/synthetic for the synthetic dataset
    split_id: int = 1
    clip: str | None = None  # None: the small random demo CLIP
    frames: int
    words: int | None  # caption tokens, retrieval only
    batch_size: int  # the batch the loss sees, over every process
    epochs: int
    lr: float
    weight_decay: float = 0.2
    warmup: float = 0.1  # fraction of the steps
    grad_clip: float = 1.0  # largest gradient norm; 0: no clipping
    workers: int = 0
    device: str = "auto"
    precision: str = "auto"
    grad_checkpoint: bool = False
    compile: bool | None = None  # None: on with CUDA (runtime.VideoTower)
    seed: int = 0
    strict: bool = False
    out: str

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not is_number(value, 0):
                raise ConfigError(f"--{name.replace('_', '-')} {value}: expected a finite number >= 0")
        if self.lr > cli.MAX_LR:
            raise ConfigError(f"--lr {self.lr}: expected at most {cli.MAX_LR:g}")


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning rate's factor at ``step``: a linear warm-up from 0 to 1, then a cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Run:
    """What a run builds before its first step (``build_run``), and every step of the loop reads."""

    config: TrainConfig
    device: torch.device
    precision: str
    backbone: runtime.Backbone
    tokenize: Callable[[list[str]], torch.Tensor] | None  # captions to tokens, cut to --words (retrieval only)
    model: STOPModel
    tower: VideoTower  # model.encode_video as a module, compiled with --compile: what the evaluation calls
    encode: Callable[[torch.Tensor], torch.Tensor]  # the tower, or its DDP wrapper under torchrun
    train_set: data.VideoDataset
    test_set: data.VideoDataset
    train_loader: data.VideoLoader
    test_loader: data.VideoLoader
    class_features: torch.Tensor | None  # [C, E], recognition's class texts; None for retrieval
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


def build_run(config: TrainConfig, checkpoint: Mapping[str, Any] | None) -> Run:
    """Build the model, the loaders and the optimiser; a resumed run loads its state from ``checkpoint``."""
    device = runtime.resolve_device(config.device)
    if runtime.in_group() and (device.type == "cuda") != (torch.distributed.get_backend() == "nccl"):
        raise RunError(f"this run was trained with --device {config.device}: resume it with that --device")
    precision = runtime.resolve_precision(config.precision, device)
    name, location = runtime.on_rank_zero(data.dataset_location, config.dataset, config.root, config.task)
    torch.manual_seed(config.seed)  # the prompt modules' initialisation (a resumed run loads them instead)
    if checkpoint:
        last = Path(config.out) / "last.pt"
        model, backbone, _ = runs.load_trained(last, config.clip, device, precision, checkpoint)
    else:
        backbone = runtime.load_backbone(config.clip)
        model = runtime.build_model(
            backbone, STOPConfig.from_dict(asdict(config)), device, precision, config.grad_checkpoint
        )
    if model.num_trainable_parameters() == 0:
        raise RunError("--prompt none has nothing to train (CLIP is frozen); evaluate it with evaluate.py")
    per_process = config.batch_size // runtime.WORLD_SIZE  # run_config checked that it divides
    runtime.check_batch_memory(model, config.frames, per_process, device)
    frozen = sum(p.numel() for p in model.clip.parameters())
    trainable = model.num_trainable_parameters()
    echo(f"STOP --prompt {model.prompt}: {trainable:,} trainable parameters, CLIP's {frozen:,} frozen")

    train_set, test_set = (
        data.build_dataset(name, location, split, num_frames=config.frames, split_id=config.split_id,
                           resolution=model.clip.visual.input_resolution, strict=config.strict)
        for split in ("train", "test")
    )  # fmt: skip
    # The training order is the seed's and the epoch's alone (``shard``), so --resume can start any epoch exactly.
    train_loader = data.build_loader(train_set, batch_size=per_process, shuffle=True, workers=config.workers,
                                     drop_last=True, sampler=runtime.shard(train_set, train=True, seed=config.seed),
                                     seed=config.seed)  # fmt: skip
    test_loader = data.build_loader(test_set, batch_size=per_process, shuffle=False, workers=config.workers,
                                    sampler=runtime.shard(test_set, train=False))  # fmt: skip
    if checkpoint:
        runs.check_same_data(checkpoint, runs.data_identity(train_set, test_set), config.root)
    if len(train_loader) == 0:
        raise RunError(f"--batch-size {config.batch_size} is larger than the {len(train_set)} training videos")
    class_features = None
    if config.task == "recognize":
        with autocast(device, precision):  # once: the text tower is frozen
            prompts = stop.class_texts(config.dataset, train_set.classes)
            class_features = stop.text_features(model, backbone.tokenize, prompts, device)

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                  weight_decay=config.weight_decay)  # fmt: skip
    total_steps = config.epochs * len(train_loader)
    warmup_steps = max(1, round(config.warmup * total_steps))
    schedule = partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 alone needs loss scaling
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
    tokenize = runtime.caption_tokenizer(backbone, config.words) if config.task == "retrieve" else None
    tower = VideoTower(model, config.compile)
    encode = runtime.data_parallel(tower, device)
    return Run(config, device, precision, backbone, tokenize, model, tower, encode, train_set, test_set, train_loader,
               test_loader, class_features, optimizer, scheduler, scaler)  # fmt: skip


def batch_loss(run: Run, videos: torch.Tensor, targets: torch.Tensor | list[str]) -> torch.Tensor:
    """Cross-entropy over classes (recognition), or symmetric InfoNCE over the batch's pairs (retrieval).

    Under torchrun the retrieval batch is every process's (``all_gather_with_grad``): its negatives are the whole
    ``--batch-size``. DDP averages the processes' gradients, and each process's loss reaches the batch's features
    through its own share alone, so the loss is scaled by the number of processes to give one process's gradient.
    """
    model, device = run.model, run.device
    video_features = run.encode(videos)  # [b, E], this process's share of the batch
    if run.config.task == "recognize":
        return F.cross_entropy(model.similarity(video_features, run.class_features), targets.to(device))
    with torch.no_grad():
        caption_features = model.encode_text(run.tokenize(list(targets)).to(device))  # frozen text tower: [b, E]
    logits = model.similarity(all_gather_with_grad(video_features), all_gather_with_grad(caption_features))  # [B, B]
    labels = torch.arange(logits.shape[0], device=device)  # pair i on the diagonal
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2 * runtime.WORLD_SIZE


def evaluate_epoch(run: Run, folder: runs.RunFolder, epoch: int) -> tuple[dict[str, Any], float]:
    """The test split's metrics, and the score that picks ``best.pt``: top-1, or text-to-video R@1.

    A model that gives non-finite scores, or holds non-finite parameters, has diverged: the run stops before the
    epoch is saved, naming the last good checkpoint."""
    model, loader, device, precision = run.model, run.test_loader, run.device, run.precision
    source = f"the model of epoch {epoch + 1} (not saved; last good checkpoint: {last_good(folder, epoch)})"
    if not all(tensor.isfinite().all() for tensor in model.trainable_state_dict().values()):
        raise RunError(f"{source} holds parameters that are not finite (NaN or infinite). Try a lower --lr")
    if run.config.task == "recognize":
        reversed_pairs = run.config.dataset == "synthetic"
        metrics = evaluate_recognition(model, loader, run.class_features, device, precision, reversed_pairs,
                                       run.tower, source)  # fmt: skip
        return metrics, metrics["top1"]
    metrics = evaluate_retrieval(model, loader, run.tokenize, device, precision, run.tower, source)
    return metrics, metrics["text_to_video"]["R@1"]


def train(task: str, options: dict[str, Any], given: set[str]) -> None:
    """Train as the command's ``options`` say (``run_config``): own (or resume) the run folder, then per epoch
    train, evaluate and save. ``given``: the options typed on the command line, which ``--resume`` checks."""
    resume, overwrite = options.pop("resume"), options.pop("overwrite")
    with runs.RunFolder(run_config(task, options), resume, overwrite, given - {"resume", "overwrite"}) as folder:
        config = folder.config  # a resumed run's own
        run = build_run(config, folder.checkpoint) if folder.first_epoch < config.epochs else None
        for epoch in range(folder.first_epoch, config.epochs):
            epoch_seed = config.seed + epoch + runtime.RANK * 2**32  # dropout's: epoch and rank alone, for --resume
            torch.manual_seed(epoch_seed)
            random.seed(epoch_seed)
            run.train_loader.set_epoch(epoch)
            run.model.train()
            log = EpochLog(epoch, config, run.train_loader)
            with runtime.rank_local_errors():  # a broken video of this rank's share (--strict) is reported by it
                for videos, targets in log.progress:
                    with runtime.autocast(run.device, run.precision):
                        loss = batch_loss(run, videos.to(run.device, non_blocking=True), targets)  # forward
                    run.optimizer.zero_grad(set_to_none=True)
                    run.scaler.scale(loss).backward()  # backward
                    if config.grad_clip:  # clip
                        run.scaler.unscale_(run.optimizer)
                        torch.nn.utils.clip_grad_norm_(run.model.trainable_parameters(), config.grad_clip)
                    run.scaler.step(run.optimizer)  # step
                    run.scaler.update()
                    run.scheduler.step()
                    log.step(loss.item(), len(videos), folder)
                metrics, score = evaluate_epoch(run, folder, epoch)  # evaluate
            record = log.record(run, metrics)
            folder.save(epoch, score, record, metrics, model=run.model, optimizer=run.optimizer,
                        scheduler=run.scheduler, scaler=run.scaler, backbone=run.backbone,
                        data=runs.data_identity(run.train_set, run.test_set))  # fmt: skip
        best_name = "top-1" if config.task == "recognize" else "text-to-video R@1"
        echo(f"done: {folder.out / 'best.pt'} (best {best_name} {folder.best:.2f})")


class EpochLog:
    """An epoch's progress bar and its record in ``metrics.jsonl``: the mean loss of its clips (retrieval's loss
    unscaled, see ``batch_loss``), the learning rate, clips/s and the broken videos met, summed over every rank."""

    def __init__(self, epoch: int, config: TrainConfig, loader: data.VideoLoader):
        self.epoch, self.started, self.steps, self.loss_sum, self.clips = epoch, time.perf_counter(), 0, 0.0, 0
        self.scale = runtime.WORLD_SIZE if config.task == "retrieve" else 1  # batch_loss's scaling, undone
        self.progress = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=runtime.RANK != 0)

    def step(self, loss: float, clips: int, folder: runs.RunFolder) -> None:
        self.steps += 1
        loss /= self.scale
        if not math.isfinite(loss):
            raise_not_finite(folder, self.epoch, self.steps)
        self.loss_sum, self.clips = self.loss_sum + loss * clips, self.clips + clips
        rate = self.clips / (time.perf_counter() - self.started)
        self.progress.set_postfix(loss=f"{loss:.3f}", clips_per_s=f"{rate:.1f}")

    def record(self, run: Run, metrics: dict[str, Any]) -> dict[str, Any]:
        loss_sum, clips = runtime.summed_over_ranks(self.loss_sum, self.clips)
        broken = int(runtime.broken_over_ranks(run.train_set, run.test_set))
        echo(f"epoch {self.epoch + 1}: loss {loss_sum / clips:.4f}\n{format_metrics(metrics)}")
        if broken:
            echo(f"warning: {broken} broken videos were replaced by others (see warnings)")
        seconds = time.perf_counter() - self.started
        return {"epoch": self.epoch + 1, "train_loss": loss_sum / clips, "lr": run.scheduler.get_last_lr()[0],
                "train_clips_per_second": clips / seconds, "broken_videos": broken}  # fmt: skip


def last_good(folder: runs.RunFolder, epoch: int) -> str:
    """The checkpoint a run that fails in ``epoch`` keeps: ``last.pt`` of the epoch before, which was saved only
    because its model gave finite scores (``evaluate_epoch``)."""
    return f"{folder.out / 'last.pt'} (epoch {epoch})" if epoch > 0 else "none (no epoch finished)"


def raise_not_finite(folder: runs.RunFolder, epoch: int, step: int) -> None:
    """A loss that is no longer finite stops the run before anything is saved from it, naming the last good epoch."""
    where = f"rank {runtime.RANK}: " if runtime.in_group() else ""
    raise RankError(f"{where}loss is not finite at epoch {epoch + 1}, step {step}; last good checkpoint: "
                    f"{last_good(folder, epoch)}. Try a lower --lr")  # fmt: skip


def run_config(task: str, options: dict[str, Any]) -> TrainConfig:
    """The run's configuration: the options given, and for those not given the task's and dataset's defaults."""
    dataset = options["dataset"]
    row = protocols.SYNTHETIC[task] if dataset == "synthetic" else protocols.PROTOCOLS[dataset]  # a task's dataset
    given = {name: value for name, value in options.items() if value is not None}
    defaults = {
        "frames": row.frames,
        "words": row.words,
        "batch_size": row.batch,
        "epochs": row.epochs,
        "lr": row.lr,
        "workers": runtime.default_workers(),
        "out": str(Path("runs") / f"{task}-{dataset}-{options['prompt']}"),
    }
    paths = {name: str(given[name]) for name in ("root", "out") if name in given}  # stored as text in checkpoints
    given |= {"task": task, "prompt_layers": options["prompt_layers"] or None, **paths}
    config = TrainConfig(**{**defaults, **given})
    if config.batch_size % runtime.WORLD_SIZE:
        raise RunError(f"--batch-size {config.batch_size}: expected a multiple of the {runtime.WORLD_SIZE} processes")
    return config


app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
cli.add_command(app, "recognize", "Action recognition: ucf101, hmdb51, ssv2, kinetics400, or synthetic (no download).",
                cli.train_options, train)  # fmt: skip
cli.add_command(app, "retrieve", "Text-video retrieval: msrvtt, msvd, lsmdc, activitynet, didemo, vatex, or synthetic.",
                cli.train_options, train)  # fmt: skip

if __name__ == "__main__":
    app()
