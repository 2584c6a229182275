"""Benchmarks: what STOP costs over the frozen CLIP4Clip-meanP baseline.

``python bench.py model``: one eval forward pass (``encode_video``) of a random-weight CLIP in the released
shapes (ViT-B/32, 12 frames, 224 px by default) for every prompt variant, measured side by side in one process
(the variants take turns within each round, so drift in the machine's speed hits them alike). Prints a markdown
table and writes it as JSON with ``--out``: median time per clip; the ratio to ``none``, the median over rounds
of the two times measured in the same round; trainable parameters; temporal prompts per gap. The frames are
random noise, which changes more from one frame to the next than footage does, so STOP draws more prompts.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

import clip_model
from stop import PROMPT_VARIANTS, STOPModel

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])

BACKBONES = {"ViT-B/32": clip_model.VIT_B_32, "ViT-B/16": clip_model.VIT_B_16, "ViT-L/14": clip_model.VIT_L_14}
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@app.callback()
def main() -> None:
    """Benchmarks of STOP against the frozen baseline; one command per measurement."""


def available_cores() -> int:
    """The cores this process may run on (the cgroup's, where ``os.cpu_count`` would report the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: STOPModel, video: torch.Tensor, autocast: torch.dtype | None) -> float:
    """Seconds for one ``encode_video`` under inference mode (and autocast if asked)."""
    device = video.device
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        synchronize(device)
        start = time.perf_counter()
        model.encode_video(video)
        synchronize(device)
        return time.perf_counter() - start


def mean_prompts_per_gap(model: STOPModel, video: torch.Tensor, autocast: torch.dtype | None) -> float:
    """Temporal prompts a gap between frames gets, averaged over gaps, videos and prompted blocks."""
    if not model.prompters:
        return 0.0
    with torch.inference_mode(), torch.autocast(video.device.type, dtype=autocast, enabled=autocast is not None):
        _, details = model.encode_video(video, return_details=True)
    return torch.stack([block.counts.float().mean() for block in details]).mean().item()


def markdown_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """``rows`` as a markdown table; ``columns`` maps each row key to its header."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[key]) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


@app.command("model")
def model_command(
    backbone: Annotated[str, typer.Option(help=f"random weights shaped as one of {list(BACKBONES)}")] = "ViT-B/32",
    frames: Annotated[int, typer.Option(min=1)] = 12,
    batch_size: Annotated[int, typer.Option(min=1, help="videos per forward pass")] = 2,
    variants: Annotated[list[str] | None, typer.Option("--variant", help="repeatable; default: all")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="uncounted rounds first")] = 2,
    runs: Annotated[int, typer.Option(min=1, help="counted rounds; the median is reported")] = 5,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cuda" if torch.cuda.is_available() else "cpu",
    autocast: Annotated[str, typer.Option(help=f"one of {list(AUTOCAST_DTYPES)}")] = "none",
    threads: Annotated[int, typer.Option(min=0, help="torch threads; 0: the cores available")] = 0,
    seed: int = 0,
    out: Annotated[Path | None, typer.Option(help="write the results here as JSON")] = None,
) -> None:
    """Eval forward time of every prompt variant against the frozen baseline (none), side by side."""
    variants = variants or list(PROMPT_VARIANTS)
    for name, value, allowed in (
        ("--backbone", backbone, BACKBONES),
        ("--autocast", autocast, AUTOCAST_DTYPES),
        *(("--variant", variant, PROMPT_VARIANTS) for variant in variants),
    ):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r}: expected one of {list(allowed)}", param_hint=name)
    if "none" not in variants:
        variants = ["none", *variants]  # the reference every ratio is taken against
    threads = threads or available_cores()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    target = torch.device(device)
    dtype = AUTOCAST_DTYPES[autocast]

    clip = clip_model.random_clip(BACKBONES[backbone], seed=seed).to(target)
    models = {variant: STOPModel(clip, variant).to(target).eval() for variant in variants}
    resolution = clip.visual.input_resolution
    video = torch.randn(batch_size, frames, 3, resolution, resolution, device=target)

    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_index in range(warmup + runs):
        for variant, model in models.items():
            elapsed = time_forward(model, video, dtype)
            if round_index >= warmup:
                seconds[variant].append(elapsed)

    rows = [
        {
            "variant": variant,
            "trainable_parameters": model.num_trainable_parameters(),
            "median_ms_per_clip": round(1000 * statistics.median(seconds[variant]) / batch_size, 1),
            "ratio_to_none": round(statistics.median(a / b for a, b in zip(seconds[variant], seconds["none"])), 3),
            "mean_prompts_per_gap": round(mean_prompts_per_gap(model, video, dtype), 2),
            "seconds_per_forward": [round(s, 4) for s in seconds[variant]],
        }
        for variant, model in models.items()
    ]
    setup = {
        "backbone": f"{backbone} (random weights)",
        "frames": frames,
        "resolution": resolution,
        "batch_size": batch_size,
        "device": str(target),
        "autocast": autocast,
        "threads": threads,
        "warmup": warmup,
        "runs": runs,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    typer.echo(", ".join(f"{key}={value}" for key, value in setup.items()))
    columns = {
        "variant": "prompt",
        "trainable_parameters": "trainable params",
        "median_ms_per_clip": "forward ms / clip (median)",
        "ratio_to_none": "x none",
        "mean_prompts_per_gap": "prompts / gap",
    }
    shown = [{**row, "trainable_parameters": f"{row['trainable_parameters']:,}"} for row in rows]
    typer.echo(markdown_table(shown, columns))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": "model", "setup": setup, "results": rows}, indent=2) + "\n")
        typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
