"""Evaluate STOP: action recognition (top-1/top-5) and text-video retrieval (R@K, MdR, MnR).

``python evaluate.py recognize --dataset ucf101 --root /data/UCF101 --checkpoint runs/x/best.pt``
``python evaluate.py retrieve --dataset msrvtt --root /data/msrvtt --checkpoint runs/x/best.pt``
``python evaluate.py recognize --dataset hmdb51 --root /data/HMDB51 --clip ViT-B/32 --prompt none`` (zero-shot)
``python evaluate.py explain VIDEO --checkpoint runs/x/best.pt`` (a picture of STOP's decisions: ``explain.py``)

In order: the metrics, the evaluation loops (which ``train.py`` also runs after each epoch), the commands.
Recognition scores a video against one text per class ("a video of a person {class}."), encoded once by the frozen
text tower; retrieval ranks the whole test set's videos for each caption and its captions for each video, as
CLIP4Clip reports them. Under ``torchrun`` each process evaluates its share and the scores or features are gathered
back in the dataset's order (``distributed.py``), so the metrics are those of one process.
"""

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer
from tqdm import tqdm

import data
import explain
import stop
from loading import protocols
from loading.errors import RunError
from plumbing import cli, runs, runtime
from plumbing.runs import atomic_save, check_output_file
from plumbing.runtime import (
    autocast,
    broken_over_ranks,
    gather_in_dataset_order,
    on_rank_zero,
    rank_local_errors,
    shard,
)
from stop import STOPConfig, STOPModel

# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


def nan_last(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with NaN as ``-inf``, so that a NaN candidate ranks below every number (``topk`` takes NaN as the
    largest, and every comparison with NaN is false)."""
    return scores.masked_fill(scores.isnan(), -math.inf)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percentage of videos whose label is among the ``k`` highest scores, ``logits [N, C]``; a NaN score ranks
    last, so a label scored NaN is never a hit."""
    label_is_nan = logits.gather(1, labels[:, None]).isnan()  # [N, 1]
    ranked = nan_last(logits).topk(min(max(ks), logits.shape[1]), dim=1).indices  # [N, k]
    hits = (ranked == labels[:, None]) & ~label_is_nan
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def ranks_among(scores: torch.Tensor, true_scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's true score ``true_scores [N]`` among its row of ``scores [N, M]``: 1 + the number
    of candidates scored strictly higher, so a tie counts in the true match's favour, as CLIP4Clip's sort-then-find
    does. A NaN score ranks last: a NaN candidate below every number, a NaN true score at rank ``M``."""
    ranks = 1 + (nan_last(scores) > nan_last(true_scores)[:, None]).sum(dim=1)
    return ranks.masked_fill(true_scores.isnan(), scores.shape[1])


def direction_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of videos scored above the time-reversed partner of their class.

    The synthetic classes come in pairs ``(2k, 2k+1)``, each the other played backwards ("moving left" and
    "moving right"), so a model blind to frame order (``none``, ``static``) stays at 50 here.
    """
    rows = torch.arange(len(labels))
    logits = nan_last(logits)
    return 100.0 * (logits[rows, labels] > logits[rows, labels ^ 1]).float().mean().item()


def ranks_of_matches(similarity: torch.Tensor) -> torch.Tensor:
    """1-based rank of the true match ``i`` in row ``i`` of ``similarity [N, N]`` (``ranks_among``)."""
    return ranks_among(similarity, similarity.diagonal())


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 (percent), median rank MdR and mean rank MnR of 1-based ``ranks``, CLIP4Clip's definitions.

    MdR is ``np.median`` of the ranks, as CLIP4Clip computes it: the middle rank, or the mean of the two middle ranks
    when the count is even (so a half rank is possible).
    """
    ranks = ranks.double()
    metrics = {f"R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    ordered, count = ranks.sort().values, ranks.numel()
    metrics["MdR"] = ((ordered[(count - 1) // 2] + ordered[count // 2]) / 2).item()  # one middle, or two averaged
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
    every video has one caption. A NaN score ranks last (``ranks_among``).
    """
    caption_ranks = ranks_among(similarity, similarity.gather(1, video_of_caption[:, None])[:, 0])  # [N_caption]
    similarity = nan_last(similarity)  # a group's best caption is a number when it has one
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


def encode_videos(encode: Callable[[torch.Tensor], torch.Tensor], videos: torch.Tensor) -> torch.Tensor:
    """``[B, T, 3, R, R]`` or, with K views (temporal x spatial), ``[B, K, T, 3, R, R]`` -> ``[B, E]``: the views'
    features averaged, then L2-normalised again. ``encode``: ``model.encode_video``, or a ``VideoTower`` of it."""
    if videos.ndim == 5:
        return encode(videos)
    batch, views = videos.shape[:2]
    features = encode(videos.flatten(0, 1)).view(batch, views, -1).mean(dim=1)
    return torch.nn.functional.normalize(features, dim=-1)


def check_finite(scores: torch.Tensor, source: str) -> None:
    """Nothing non-finite is scored: a model whose features give NaN or infinite scores (a diverged run) is an
    error naming ``source``, the model evaluated, instead of a rank computed from NaN."""
    finite = scores.isfinite().all(dim=1)
    if not finite.all():
        raise RunError(
            f"{source} gives video features or scores that are not finite (NaN or infinite) for "
            f"{int((~finite).sum())} of its {len(finite)} test videos: nothing is scored"
        )


@torch.no_grad()
def evaluate_recognition(
    model, loader, class_features, device, precision, reversed_pairs=False, encode=None, source="the model"
) -> dict[str, float]:
    """Top-1/top-5; with ``reversed_pairs`` (the synthetic classes) also the direction accuracy. ``source`` names
    the model in the error when its scores are not finite (``check_finite``)."""
    model.eval()
    encode = encode or model.encode_video
    logits, labels = [], []
    for videos, batch_labels in tqdm(loader, desc="evaluate", leave=False, disable=runtime.RANK != 0):
        with autocast(device, precision):
            features = encode_videos(encode, videos.to(device, non_blocking=True))
            logits.append(model.similarity(features, class_features).float().cpu())
        labels.append(batch_labels)
    logits, labels = gather_in_dataset_order(loader, torch.cat(logits), torch.cat(labels))
    check_finite(logits, source)
    metrics = topk_accuracy(logits, labels)
    if reversed_pairs:
        metrics["direction"] = direction_accuracy(logits, labels)
    return metrics


@torch.no_grad()
def evaluate_retrieval(
    model, loader, tokenize, device, precision, encode=None, source="the model"
) -> dict[str, dict[str, float]]:
    """The whole test set's ``[N_text, N_video]`` similarity; under torchrun every rank gathers all of it.

    One (video, caption) pair per item (MSR-VTT, LSMDC, the paragraphs of ActivityNet and DiDeMo): a square matrix,
    ``retrieval_metrics``. A multi-caption test set (MSVD, VATEX: ``caption_groups`` on the dataset, one item per
    video) encodes each video once and all its captions: ``multi_caption_retrieval_metrics``. Non-finite
    similarities are an error naming ``source`` (``check_finite``).
    """
    model.eval()
    encode = encode or model.encode_video
    video_features, targets = [], []
    for videos, batch_targets in tqdm(loader, desc="evaluate", leave=False, disable=runtime.RANK != 0):
        with autocast(device, precision):
            video_features.append(encode_videos(encode, videos.to(device, non_blocking=True)).float())
        targets.extend(batch_targets)
    video_features, targets = gather_in_dataset_order(loader, torch.cat(video_features), targets)
    caption_groups = loader.dataset.dataset.caption_groups
    captions = targets if caption_groups is None else [caption for group in caption_groups for caption in group]
    with autocast(device, precision):
        caption_features = stop.text_features(model, tokenize, captions, device).float()
    similarity = caption_features @ video_features.t()  # [N_text, N_video]
    check_finite(similarity.t(), source)  # a row per video
    if caption_groups is None:
        return retrieval_metrics(similarity)
    video_of_caption = torch.repeat_interleave(torch.tensor([len(group) for group in caption_groups]))
    return multi_caption_retrieval_metrics(similarity, video_of_caption.to(similarity.device))


def format_metrics(metrics: dict[str, Any]) -> str:
    """A markdown table: one row per direction for retrieval, one row for recognition."""
    if "text_to_video" in metrics:
        names = list(metrics["text_to_video"])
        rows = [f"| {d} | " + " | ".join(f"{metrics[d][n]:.1f}" for n in names) + " |" for d in metrics]
        return "\n".join([f"| ranking | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|", *rows])
    names = {"top1": "top-1", "top5": "top-5", "direction": "direction (vs reversed class)"}
    header = "| " + " | ".join(names[key] for key in metrics) + " |"
    return "\n".join(
        [header, "|---" * len(metrics) + "|", "| " + " | ".join(f"{v:.2f}" for v in metrics.values()) + " |"]
    )


# --------------------------------------------------------------------------- #
# Commands
# --------------------------------------------------------------------------- #


def evaluated_model(
    task: str, options: cli.EvaluationOptions, device: torch.device, precision: str
) -> tuple[STOPModel, runtime.Backbone, int, int | None, dict[str, Any]]:
    """The model to evaluate, its backbone, the frames per video, the caption tokens (``None``: the dataset's) and
    what the result records of the checkpoint (its path, epoch and SHA256): a checkpoint's, or zero-shot
    CLIP4Clip's."""
    if options.checkpoint is not None:
        checkpoint, sha256 = runs.read_checkpoint_and_sha256(options.checkpoint)
        config = checkpoint["config"]
        if config.get("task", task) != task:  # refused before its CLIP is loaded (or downloaded)
            raise RunError(
                f"{options.checkpoint} is a {config['task']} checkpoint: evaluate it with "
                f"'evaluate.py {config['task']}', or give a {task} checkpoint"
            )
        model, backbone, _ = runs.load_trained(options.checkpoint, options.clip, device, precision, checkpoint)
        epoch = checkpoint["epoch"] + 1 if "epoch" in checkpoint else None  # as metrics.jsonl counts them
        measured = {"checkpoint": str(options.checkpoint), "checkpoint_epoch": epoch, "checkpoint_sha256": sha256}
        return model, backbone, options.frames or config["frames"], options.words or config.get("words"), measured
    if options.prompt not in (None, "none"):
        raise RunError(
            f"--prompt {options.prompt} without --checkpoint would evaluate untrained prompts; "
            "pass --checkpoint RUN/best.pt, or --prompt none for zero-shot CLIP4Clip"
        )
    backbone = runtime.load_backbone(options.clip)
    zero_shot = STOPConfig(prompt="none", readout="mean")  # the frozen CLIP4Clip meanP baseline
    model = runtime.build_model(backbone, zero_shot, device, precision)
    note = f"no --checkpoint: this evaluates CLIP {backbone.name} zero-shot, frozen and with no prompts (--prompt none)"
    if options.clip is None:
        note += "; the demo CLIP's weights are random, so the numbers are at chance: a trained run needs --checkpoint"
    runtime.echo(note)
    measured = {"checkpoint": None, "checkpoint_epoch": None, "checkpoint_sha256": None}
    return model, backbone, options.frames or protocols.protocol(options.dataset, task).frames, options.words, measured


def default_out(task: str, options: cli.EvaluationOptions) -> Path:
    """``eval-<task>-<dataset>-<checkpoint's stem>[-views<V>][-crops<C>][-split<S>].json`` beside the checkpoint
    (``zero-shot`` in ``runs/`` without one): evaluations of other checkpoints or settings never share a file."""
    if options.checkpoint is not None:
        folder, model = options.checkpoint.parent, options.checkpoint.stem
    else:
        clip = re.sub(r"[^A-Za-z0-9]+", "", options.clip or "")  # ViT-B/32: ViTB32
        folder, model = Path("runs"), f"zero-shot-{clip}" if clip else "zero-shot"
    settings = [f"-{name}{value}" for name, value in (("views", options.views), ("crops", options.crops),
                                                      ("split", options.split_id)) if value != 1]  # fmt: skip
    return folder / f"eval-{task}-{options.dataset}-{model}{''.join(settings)}.json"


def run_evaluation(task: str, options: cli.EvaluationOptions) -> None:
    """Build the model and the test loader, evaluate, and write (rank 0) the metrics JSON.

    The JSON replaces only an earlier evaluation result (``runs.check_output_file``), checked before the evaluation
    and again just before it is written."""
    device = runtime.resolve_device(options.device)
    precision = runtime.resolve_precision(options.precision, device)
    dataset = options.dataset
    out = options.out or default_out(task, options)
    on_rank_zero(check_output_file, out)
    name, location = on_rank_zero(data.dataset_location, dataset, options.root, task)  # before any CLIP download
    model, backbone, frames, words, measured = evaluated_model(task, options, device, precision)
    if measured["checkpoint"] is None:
        source = f"zero-shot CLIP {backbone.name}"
    else:
        source = f"{measured['checkpoint']} (epoch {measured['checkpoint_epoch']})"
    per_process = max(1, options.batch_size // runtime.WORLD_SIZE)  # --batch-size is over every process
    runtime.check_batch_memory(model, frames, per_process * options.views * options.crops, device)

    test_set = data.build_dataset(name, location, "test", num_frames=frames, split_id=options.split_id,
                                  resolution=model.clip.visual.input_resolution, views=options.views,
                                  crops=options.crops, strict=options.strict)  # fmt: skip
    workers = runtime.default_workers() if options.workers is None else options.workers
    loader = data.build_loader(test_set, batch_size=per_process, shuffle=False, workers=workers,
                               sampler=shard(test_set, train=False))  # fmt: skip
    tower = runtime.VideoTower(model, options.compile)
    with rank_local_errors():
        if task == "recognize":
            with autocast(device, precision):
                prompts = stop.class_texts(dataset, test_set.classes)
                class_features = stop.text_features(model, backbone.tokenize, prompts, device)
            reversed_pairs = dataset == "synthetic"
            metrics = evaluate_recognition(model, loader, class_features, device, precision, reversed_pairs, tower,
                                           source)  # fmt: skip
        else:
            words = words or protocols.protocol(dataset).words
            tokenize = runtime.caption_tokenizer(backbone, words)
            metrics = evaluate_retrieval(model, loader, tokenize, device, precision, tower, source)
    broken = broken_over_ranks(test_set)
    if runtime.RANK != 0:
        return  # rank 0 writes and prints the result
    result = {runs.EVALUATION_MARKER: 1, "task": task, "dataset": dataset, "split_id": options.split_id,
              "frames": frames, "views": options.views, "crops": options.crops, "prompt": model.prompt, **measured,
              "clip": backbone.name, "videos": len(test_set), "left_out_videos": len(test_set.left_out),
              "words": words if task == "retrieve" else None, "broken_videos": int(broken), **metrics}  # fmt: skip
    check_output_file(out)  # still no other kind of file there (another command may have written one meanwhile)
    atomic_save(json.dumps(result, indent=2) + "\n", out)
    typer.echo(format_metrics(metrics))
    typer.echo(f"metrics written to {out}")


def run_command(task: str, values: dict[str, Any], given: set[str]) -> None:
    run_evaluation(task, cli.EvaluationOptions(**values))


app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
cli.add_command(app, "recognize", "Top-1 / top-5 action recognition on a dataset's test split.",
                cli.EvaluationOptions, run_command)  # fmt: skip
cli.add_command(app, "retrieve", "Text-to-video and video-to-text R@1/5/10, MdR, MnR on the whole test set (MSR-VTT: "
                "1k-A; MSVD and VATEX: every caption, CLIP4Clip's multi-sentence protocol).",
                cli.EvaluationOptions, run_command)  # fmt: skip
app.command("explain", help=explain.__doc__.split("\n")[0])(explain.command)  # its drawing is explain.py's

if __name__ == "__main__":
    app()
