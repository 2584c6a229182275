"""Benchmarks: what STOP costs over the frozen CLIP4Clip-meanP baseline, and how fast clips reach the model.

STOP's claim (CVPR 2025) is that prompting a *frozen* CLIP adapts it to video for a fraction of full
fine-tuning's cost (its MSR-VTT table: 7.53 M trainable parameters against CLIP4Clip's 123.54 M).
``python bench.py model`` measures that claim on this project's code; ``python bench.py data`` measures the
input pipeline that feeds it. Both print markdown tables and write JSON with ``--out``.

``model``: a random-weight CLIP in a released shape (ViT-B/32, no download), ``--frames`` frames at its
resolution, ``--batch-size`` videos. Rows: the prompt variants of ``stop.PROMPT_VARIANTS``, STOP with
activation checkpointing, and full fine-tuning of CLIP4Clip-meanP. For each row:

- eval forward: ``encode_video`` under inference mode;
- training step: the video tower's forward and backward and an AdamW step (fused where PyTorch has it) on the
  recognition loss, cross-entropy over ``logit_scale * cos(video, class)`` against ``--classes`` fixed class
  text features (computed once, as training does). STOP updates its prompt modules; full fine-tuning updates
  the whole image tower (87.85 M parameters for ViT-B/32). The paper's 123.54 M for CLIP4Clip is all of CLIP
  but its input embeddings (token and patch embeddings, both positional embeddings); with fixed class features
  the text tower gets no gradient, so this step leaves its backward and optimiser state out, which favours
  full fine-tuning in the ratios;
- peak memory, each row in its own process (the resident high-water mark on the CPU, with glibc returning
  freed blocks at once so it follows live tensors; ``max_memory_allocated`` on CUDA): the peak above the
  built model, i.e. the activations, gradients and optimiser state that evaluating or training adds to the
  frozen CLIP every row holds (and, in a last column, the total with the model);
- the frozen baseline's achieved FLOP/s (FLOPs counted by ``torch.utils.flop_counter``) against the fp32
  (or autocast dtype) matrix-multiply rate measured in the same rounds;
- kernels and host syncs of one eval forward and one training step, counted by the torch profiler (GPU kernels
  on CUDA; on the CPU the aten operators that reach a kernel): a GPU waits on the host when a step launches many
  small kernels or reads a value back.

Under bf16/fp16 autocast the frozen CLIP of every row but full fine-tuning stores its matrix weights in that dtype,
as training does (``clip_model.convert_matmul_weights``); full fine-tuning keeps fp32 master weights. ``model``
needs neither TorchCodec nor FFmpeg.

Rows take turns within each round (the starting row rotates), so drift in the machine's speed hits them alike;
every ratio is the median over rounds of the two times measured in the same round.

``data``: writes stand-ins for the published clips of each dataset (``STANDINS``: container, codec, size, frame
rate, length and keyframe interval as published; the picture is a smooth texture panning like a camera), in the
dataset's own layout (docs/datasets.md), runs ``prepare.prepare_dataset`` on it, and reads both
through ``data.build_dataset``: decode + sample clips/s and decode + sample + transform clips/s in one thread
(one DataLoader worker), raw against prepared, side by side.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
import typer
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import clip_model
from stop import PROMPT_VARIANTS, STOPConfig, STOPModel

if TYPE_CHECKING:
    import data  # imported where the data command needs it: ``model`` runs without TorchCodec and FFmpeg

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])

# A CLIP small enough for a smoke run (the shapes of tests/fixtures' tiny model).
TINY = clip_model.CLIPConfig(32, 32, 2, 64, 8, 77, 258, 64, 1, 2)
BACKBONES = {
    "ViT-B/32": clip_model.VIT_B_32,
    "ViT-B/16": clip_model.VIT_B_16,
    "ViT-L/14": clip_model.VIT_L_14,
    "tiny": TINY,
}
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Row:
    """One line of the model table: a STOP variant, or full fine-tuning of the baseline."""

    prompt: str  # a STOP variant; "none" for the frozen baseline and for full fine-tuning
    grad_checkpoint: bool = False
    full_finetune: bool = False

    @property
    def trains(self) -> bool:
        return self.full_finetune or self.prompt != "none"

    @property
    def evaluates(self) -> bool:
        """Checkpointing changes nothing in inference: its eval forward is STOP's."""
        return not self.grad_checkpoint


ROWS = {
    **{variant: Row(variant) for variant in PROMPT_VARIANTS},
    "stop --grad-checkpoint": Row("stop", grad_checkpoint=True),
    "full fine-tune": Row("none", full_finetune=True),
}
BASELINE, FULL, CHECKPOINTED = "none", "full fine-tune", "stop --grad-checkpoint"


@app.callback()
def main() -> None:
    """Benchmarks of STOP against the frozen baseline and full fine-tuning, and of the input pipeline."""


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``function()`` takes, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of ``a / b``, each pair measured in the same round."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def markdown_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """``rows`` as a markdown table; ``columns`` maps each row key to its header."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[key]) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def available_cores() -> int:
    """The cores this process may run on (its affinity, where ``os.cpu_count`` would report the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine(decoder: bool = False) -> dict[str, Any]:
    """What the numbers were measured on, the load left by other processes included (``decoder``: and TorchCodec's
    and FFmpeg's versions)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {
        "cpu": cpu,
        "cores available": available_cores(),
        "load average (1 min) at start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if decoder:
        import torchcodec

        info.update(torchcodec=torchcodec.__version__, FFmpeg=torchcodec.ffmpeg_major_version)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(title: str, setup: dict[str, Any], table: str, notes: list[str], result: dict, out: Path | None) -> None:
    """Print the setup, the table and the notes; write ``result`` (whose ``"setup"`` is ``setup``) to ``out``.

    The load average at the end shows whether other processes started competing for the cores during the run.
    """
    if hasattr(os, "getloadavg"):
        setup["load average (1 min) at end"] = round(os.getloadavg()[0], 2)
    typer.echo(f"{title}\n" + ", ".join(f"{key}={value}" for key, value in setup.items()) + "\n")
    typer.echo(table)
    for note in notes:
        typer.echo(f"\n{note}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"\nwrote {out}")


# --------------------------------------------------------------------------- #
# model: the rows, built and run
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ModelSetup:
    """Everything a measurement needs; a memory probe gets it as JSON on its command line."""

    backbone: str
    frames: int
    batch_size: int
    classes: int
    device: str
    autocast: str
    threads: int
    seed: int


class Bench:
    """A row's model, its optimiser and the inputs, with its eval forward and its training step."""

    def __init__(self, row: Row, clip: clip_model.CLIP, setup: ModelSetup):
        """Full fine-tuning trains ``clip`` itself: give that row a copy of its own."""
        device = torch.device(setup.device)
        self.dtype = AUTOCAST_DTYPES[setup.autocast]
        if row.full_finetune:
            self.model = STOPModel(clip, STOPConfig("none")).to(device)
            parameters = list(self.model.clip.visual.requires_grad_(True).parameters())  # fp32 master weights
        else:
            if self.dtype is not None:  # as train.py and evaluate.py keep a frozen CLIP under autocast
                clip_model.convert_matmul_weights(clip, self.dtype)
            self.model = STOPModel(clip, STOPConfig(row.prompt), grad_checkpoint=row.grad_checkpoint).to(device)
            parameters = list(self.model.trainable_parameters())
        self.parameters = parameters
        self.device = device
        generator = torch.Generator().manual_seed(setup.seed)
        resolution = clip.visual.input_resolution
        shape = (setup.batch_size, setup.frames, 3, resolution, resolution)
        self.video = torch.randn(shape, generator=generator).to(device)  # [B, T, 3, R, R]
        features = torch.randn(setup.classes, clip.config.embed_dim, generator=generator)
        self.class_features = F.normalize(features, dim=-1).to(device)  # [C, E], fixed like cached class texts
        self.labels = torch.randint(setup.classes, (setup.batch_size,), generator=generator).to(device)  # [B]
        fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
        lr = 1e-5 if row.full_finetune else 1e-3
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.2, **fused) if parameters else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def eval_forward(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            self.model.encode_video(self.video)

    def train_step(self) -> None:
        self.model.train()
        with self.autocast():
            logits = self.model.class_logits(self.video, self.class_features)  # [B, C]
        F.cross_entropy(logits.float(), self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def prompts_per_gap(self) -> float:
        """Temporal prompts a gap between frames gets, averaged over gaps, videos and prompted blocks."""
        if not self.model.prompters:
            return 0.0
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            _, details = self.model.encode_video(self.video, return_details=True)
        return torch.stack([block.counts.float().mean() for block in details]).mean().item()


def build_clip(setup: ModelSetup) -> clip_model.CLIP:
    return clip_model.random_clip(BACKBONES[setup.backbone], seed=setup.seed).to(setup.device)


def forward_flops(bench: Bench) -> int:
    """FLOPs of one eval forward (matrix products, convolutions and attention; elementwise work is not counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        bench.eval_forward()
    return counter.get_total_flops()


def kernels_and_syncs(function: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """The kernels one call of ``function`` runs, and how often it reads a value back to the host (profiler counts).

    On CUDA the kernels are the GPU's (copies and fills included). On the CPU they are the operators that reach a
    kernel: aten operators with no aten operator below them, shape and view operators included, since each is a
    dispatch the host pays for while a GPU would wait. A read-back is ``aten::_local_scalar_dense``, what
    ``.item()``, ``int(tensor)`` and ``if tensor:`` run outside the optimiser: on a GPU each one drains the queue.
    """
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]
    with profile(activities=activities) as profiler:
        function()
        synchronize(device)
    events = profiler.events()
    if device.type == "cuda":
        kernels = sum(1 for event in events if event.device_type == torch.autograd.DeviceType.CUDA)
    else:
        kernels = sum(
            1
            for event in events
            if event.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in event.cpu_children)
        )
    return kernels, sum(1 for event in events if event.name == "aten::_local_scalar_dense" and not in_optimizer(event))


def in_optimizer(event: Any) -> bool:
    """Whether a profiler event ran inside ``optimizer.step()``: on the CPU, fused AdamW reads each parameter's step
    count (a CPU tensor) with ``.item()``, which is no device sync; on CUDA the counts stay on the GPU."""
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


def matmul_seconds(size: int, device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """The fastest of ``repeats`` ``[size, size] @ [size, size]`` products: the machine's matmul rate, here."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    return min(timed(lambda: a @ b, device) for _ in range(repeats))


def current_rss() -> int:
    """Resident bytes of this process now (Linux ``/proc``; elsewhere the peak so far)."""
    with contextlib.suppress(OSError):
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak_rss()


def peak_rss() -> int:
    """The largest resident size this process has had, in bytes.

    Linux: ``VmHWM``, the high-water mark of this program's own memory. ``ru_maxrss`` would be wrong in a
    probe: the kernel carries the parent's peak over ``fork`` and ``exec`` into it. Elsewhere ``ru_maxrss``
    (KiB on Linux, bytes on macOS).
    """
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak(device: torch.device) -> None:
    """Start the peak over from the present (``/proc/self/clear_refs`` resets ``VmHWM``, Linux 4.0 and later)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as file:
            file.write("5")


def measure_memory(row: Row, setup: ModelSetup) -> dict[str, int]:
    """Bytes: the model built (``model_bytes``), then the peaks of an eval forward and of training steps above it.

    The peaks above the built model are what evaluating or training adds to holding the model: activations,
    gradients, optimiser state. Every row holds the same frozen CLIP, so ``model_bytes`` + peak is the total.
    """
    torch.set_num_threads(setup.threads)
    device = torch.device(setup.device)
    cuda = device.type == "cuda"

    def now() -> int:
        return torch.cuda.memory_allocated(device) if cuda else current_rss()

    def peak() -> int:
        return torch.cuda.max_memory_allocated(device) if cuda else peak_rss()

    warm = torch.randn(512, 512, device=device)
    (warm @ warm).relu().sum().item()  # start the thread pool and the math libraries before the baseline
    before = now()
    bench = Bench(row, build_clip(setup), setup)
    built = now()
    reset_peak(device)  # building the model may have peaked higher than it stays
    bench.eval_forward()
    result = {"model_bytes": built - before, "eval_peak_bytes": peak() - built}  # eval first: peaks only grow
    if row.trains:
        for _ in range(2):  # the second step has the optimiser state the first one created
            bench.train_step()
        result["train_peak_bytes"] = peak() - built
    return result


def memory_in_own_process(name: str, setup: ModelSetup) -> dict[str, int]:
    """``measure_memory`` for one row in a fresh Python process, so no other row's peak is counted."""
    spec = json.dumps({"row": name, "setup": asdict(setup)})
    command = [sys.executable, str(Path(__file__).resolve()), "memory-probe", spec]
    # Every allocation above 64 KiB mapped on its own and unmapped when freed, so the resident peak is the peak of
    # live tensors, not of what glibc's heap kept after frees.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if finished.returncode != 0:
        raise RuntimeError(f"memory probe of {name!r} failed:\n{finished.stderr.strip()[-2000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


@app.command("memory-probe", hidden=True)
def memory_probe(spec: str) -> None:
    """Internal: measure one row's peak memory in this process and print it as JSON."""
    parsed = json.loads(spec)
    typer.echo(json.dumps(measure_memory(ROWS[parsed["row"]], ModelSetup(**parsed["setup"]))))


def check_choice(option: str, value: str, allowed) -> None:
    if value not in allowed:
        raise typer.BadParameter(f"{value!r}: expected one of {list(allowed)}", param_hint=option)


def megabytes(count: int | None) -> str:
    return "—" if count is None else f"{count / 2**20:,.0f}"


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def targets_met(rows: dict[str, dict[str, Any]], flops_fraction: float) -> list[dict[str, Any]]:
    """Issue 6's targets against this run's ratios."""
    stop, checkpointed = rows.get("stop", {}), rows.get(CHECKPOINTED, {})
    checks = [
        ("STOP eval forward / frozen baseline's", stop.get("eval_x_none"), "<=", 1.25),
        ("STOP training step / full fine-tune's", stop.get("train_x_full"), "<=", 0.85),
        ("STOP peak training memory / full fine-tune's (above the model)", stop.get("train_memory_x_full"), "<=", 0.75),
        ("... with --grad-checkpoint", checkpointed.get("train_memory_x_full"), "<=", 0.4),
        ("frozen baseline forward FLOP/s / measured matmul FLOP/s", flops_fraction, ">=", 0.5),
    ]
    return [
        {
            "target": name,
            "measured": None if value is None else round(value, 3),
            "goal": f"{sign} {goal}",
            "met": None if value is None else (value <= goal if sign == "<=" else value >= goal),
        }
        for name, value, sign, goal in checks
    ]


@app.command("model")
def model_command(
    backbone: Annotated[str, typer.Option(help=f"random weights shaped as one of {list(BACKBONES)}")] = "ViT-B/32",
    frames: Annotated[int, typer.Option(min=2)] = 12,
    batch_size: Annotated[int, typer.Option(min=0, help="videos per step; 0: 2 on the CPU, 16 on CUDA")] = 0,
    classes: Annotated[int, typer.Option(min=2, help="class text features the recognition loss scores")] = 101,
    rows: Annotated[list[str] | None, typer.Option("--row", help=f"repeatable, of {list(ROWS)}; default all")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="uncounted rounds first")] = 1,
    runs: Annotated[int, typer.Option(min=1, help="counted rounds; medians are reported")] = 5,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cuda" if torch.cuda.is_available() else "cpu",
    autocast: Annotated[str, typer.Option(help=f"one of {list(AUTOCAST_DTYPES)}; auto: bf16 on CUDA")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="torch threads; 0: the cores available")] = 0,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile each row's encode_video as one graph (fullgraph=True)")
    ] = False,
    memory: Annotated[bool, typer.Option(help="measure peak memory, one process per row")] = True,
    seed: int = 0,
    out: Annotated[Path | None, typer.Option(help="write the results here as JSON")] = None,
) -> None:
    """Eval forward, training step and peak memory of every variant, the frozen baseline and full fine-tuning."""
    names = rows or list(ROWS)
    for name in names:
        check_choice("--row", name, ROWS)
    check_choice("--backbone", backbone, BACKBONES)
    check_choice("--autocast", autocast, [*AUTOCAST_DTYPES, "auto"])
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device here", param_hint="--device")
    names = list(dict.fromkeys([BASELINE, *names, FULL]))  # the references every ratio is taken against
    if autocast == "auto":
        autocast = "bf16" if device == "cuda" else "none"
    setup = ModelSetup(
        backbone=backbone,
        frames=frames,
        batch_size=batch_size or (16 if device == "cuda" else 2),
        classes=classes,
        device=device,
        autocast=autocast,
        threads=threads or available_cores(),
        seed=seed,
    )
    torch.set_num_threads(setup.threads)
    target = torch.device(device)
    info = machine()

    clip = build_clip(setup)
    benches = {name: Bench(ROWS[name], copy.deepcopy(clip) if name == FULL else clip, setup) for name in names}
    if compile:
        for bench in benches.values():
            bench.model.encode_video = torch.compile(bench.model.encode_video, fullgraph=True)
    flops = forward_flops(benches[BASELINE])
    matmul_dtype = AUTOCAST_DTYPES[autocast] or torch.float32
    matmul_size = 4096 if target.type == "cuda" else 2048

    eval_seconds: dict[str, list[float]] = {name: [] for name in names if ROWS[name].evaluates}
    train_seconds: dict[str, list[float]] = {name: [] for name in names if ROWS[name].trains}
    matmul_rates: list[float] = []
    for round_index in range(warmup + runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            bench = benches[name]
            for seconds, function in ((eval_seconds, bench.eval_forward), (train_seconds, bench.train_step)):
                if name in seconds:
                    elapsed = timed(function, target)
                    if round_index >= warmup:
                        seconds[name].append(elapsed)
        if round_index >= warmup:
            matmul_rates.append(2 * matmul_size**3 / matmul_seconds(matmul_size, target, matmul_dtype))

    launches = {
        name: {
            kind: kernels_and_syncs(function, target)
            for kind, function in (("eval", benches[name].eval_forward), ("train", benches[name].train_step))
            if name in (eval_seconds if kind == "eval" else train_seconds)
        }
        for name in names
    }
    memory_bytes = {name: memory_in_own_process(name, setup) for name in names} if memory else {}
    achieved = [flops / seconds for seconds in eval_seconds[BASELINE]]  # FLOP/s of each counted round
    flops_fraction = median_ratio(achieved, matmul_rates)

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        row, bench = ROWS[name], benches[name]
        measured = memory_bytes.get(name, {})
        trainable = sum(parameter.numel() for parameter in bench.parameters)
        result: dict[str, Any] = {"trainable_parameters": trainable}
        for kind, (kernels, syncs) in launches[name].items():
            result[f"{kind}_kernels"], result[f"{kind}_host_syncs"] = kernels, syncs
        if name in eval_seconds:
            result["eval_ms_per_clip"] = 1000 * statistics.median(eval_seconds[name]) / setup.batch_size
            result["eval_x_none"] = median_ratio(eval_seconds[name], eval_seconds[BASELINE])
        if name in train_seconds:
            result["train_ms_per_clip"] = 1000 * statistics.median(train_seconds[name]) / setup.batch_size
            result["train_x_full"] = median_ratio(train_seconds[name], train_seconds[FULL])
        result.update(measured)
        full = memory_bytes.get(FULL, {})
        if "train_peak_bytes" in measured and full.get("train_peak_bytes"):
            result["train_memory_x_full"] = measured["train_peak_bytes"] / full["train_peak_bytes"]
            total = measured["model_bytes"] + measured["train_peak_bytes"]
            result["train_total_memory_x_full"] = total / (full["model_bytes"] + full["train_peak_bytes"])
        if not row.full_finetune and row.evaluates:
            result["prompts_per_gap"] = bench.prompts_per_gap()
        result["seconds"] = {"eval": eval_seconds.get(name), "train": train_seconds.get(name)}
        results[name] = result

    shown = [
        {
            "row": name,
            "trainable": f"{result['trainable_parameters']:,}",
            "eval": fmt(result.get("eval_ms_per_clip"), 0),
            "eval_x": fmt(result.get("eval_x_none")),
            "train": fmt(result.get("train_ms_per_clip"), 0),
            "train_x": fmt(result.get("train_x_full")),
            "eval_mem": megabytes(result.get("eval_peak_bytes")),
            "train_mem": megabytes(result.get("train_peak_bytes")),
            "mem_x": fmt(result.get("train_memory_x_full")),
            "total_x": fmt(result.get("train_total_memory_x_full")),
            "prompts": fmt(result.get("prompts_per_gap")),
            "kernels": " / ".join(str(result.get(f"{kind}_kernels", "—")) for kind in ("eval", "train")),
            "syncs": " / ".join(str(result.get(f"{kind}_host_syncs", "—")) for kind in ("eval", "train")),
        }
        for name, result in results.items()
    ]
    columns = {
        "row": "model",
        "trainable": "trainable params",
        "eval": "eval forward ms/clip",
        "eval_x": "x none",
        "train": "train step ms/clip",
        "train_x": "x full FT",
        "eval_mem": "eval peak MiB",
        "train_mem": "train peak MiB",
        "mem_x": "x full FT",
        "total_x": "x full FT, model included",
        "prompts": "prompts/gap",
        "kernels": "kernels eval / train",
        "syncs": "host syncs eval / train",
    }
    baseline_flops = statistics.median(achieved)
    targets = targets_met(results, flops_fraction)
    notes = [
        f"Frozen baseline forward: {flops / setup.batch_size / 1e9:.1f} GFLOP per clip at "
        f"{baseline_flops / 1e9:.1f} GFLOP/s; measured {matmul_size}x{matmul_size} matmul rate "
        f"{statistics.median(matmul_rates) / 1e9:.1f} GFLOP/s ({str(matmul_dtype).removeprefix('torch.')}): "
        f"{100 * flops_fraction:.0f}% of it.",
        markdown_table(
            [
                {**t, "measured": fmt(t["measured"], 3), "met": {None: "—", True: "yes", False: "no"}[t["met"]]}
                for t in targets
            ],
            {"target": "target", "goal": "goal", "measured": "measured", "met": "met"},
        ),
    ]
    setup_shown = {**asdict(setup), "warmup": warmup, "runs": runs, "compile": compile, **info}
    result_json = {
        "benchmark": "model",
        "setup": setup_shown,
        "forward_flops": flops,
        "matmul_flops_per_s": matmul_rates,
        "baseline_flops_fraction": flops_fraction,
        "rows": results,
        "targets": targets,
    }
    if memory:
        model_size = megabytes(memory_bytes[BASELINE]["model_bytes"])
        notes.insert(
            1,
            f"Peak memory is above the built model (the same frozen CLIP in every row: {model_size} MiB); "
            "the last memory column adds it back.",
        )
    report("bench.py model", setup_shown, markdown_table(shown, columns), notes, result_json, out)


# --------------------------------------------------------------------------- #
# data: raw against prepared clips, per worker
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Standin:
    """What one dataset's published clips are like, to write look-alikes of them."""

    suffix: str
    codec: str
    options: dict[str, str]
    width: int
    height: int
    fps: int
    seconds: float
    frames: int  # sampled per clip: 8 for recognition, the dataset's default for retrieval (protocols.PROTOCOLS)
    described: str
    loop_seconds: float | None = None  # long stand-ins: this much panning, repeated (memory), else all of it


STANDINS = {
    "ucf101": Standin(".avi", "mpeg4", {"g": "300"}, 320, 240, 25, 7.0, 8, "AVI, MPEG-4 Part 2, 320x240, 25 fps, 7 s"),
    "hmdb51": Standin(".avi", "mpeg4", {"g": "300"}, 320, 240, 30, 4.0, 8, "AVI, MPEG-4 Part 2, 320x240, 30 fps, 4 s"),
    "ssv2": Standin(
        ".webm",
        "libvpx-vp9",
        {"deadline": "1", "cpu-used": "8"},
        428,
        240,
        12,
        4.0,
        8,
        "WebM, VP9, 428x240, 12 fps, 4 s",
    ),
    "msrvtt": Standin(".mp4", "libx264", {}, 320, 240, 30, 15.0, 12, "MP4, H.264, 320x240, 30 fps, 15 s"),
    "kinetics400": Standin(".mp4", "libx264", {}, 640, 360, 30, 10.0, 8, "MP4, H.264, 640x360, 30 fps, 10 s"),
    "msvd": Standin(".avi", "mpeg4", {"g": "300"}, 320, 240, 30, 10.0, 12, "AVI, MPEG-4 Part 2, 320x240, 30 fps, 10 s"),
    "lsmdc": Standin(".mp4", "libx264", {}, 640, 272, 24, 4.0, 12, "MP4, H.264, 640x272, 24 fps, 4 s"),
    "activitynet": Standin(
        ".mp4", "libx264", {}, 320, 240, 30, 120.0, 64, "MP4, H.264, 320x240, 30 fps, 120 s", loop_seconds=10.0
    ),
}
# The AVI stand-ins get a keyframe every 300 frames, XviD's default maximum (UCF101 and HMDB51 are XviD); H.264
# and VP9 keep their encoders' defaults (x264: 250). Kinetics clips are 10 s cuts of YouTube videos that CVDF keeps
# at their own resolution (up to 720p, cvdfoundation/kinetics-dataset issue 8): 360p stands for them. ActivityNet's
# videos last 2.3-745 s, about 2 minutes on average: its stand-in is 2 minutes (10 s of panning played 12 times, so
# that the frames fit in memory), sampled at 64 frames.


def camera_like_video(num_frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]``: a smooth shaded texture panning sideways 2 px a frame, with light sensor noise."""
    generator = torch.Generator().manual_seed(seed)
    texture = F.interpolate(
        torch.rand(1, 3, height // 8, width // 4, generator=generator) * 200, size=(height, 2 * width), mode="bicubic"
    )[0]  # [3, H, 2W]
    texture = texture + 40 * torch.sin(torch.arange(height) / 40)[:, None]  # shading down the frame
    columns = (torch.arange(width)[None, :] + 2 * torch.arange(num_frames)[:, None]) % (2 * width)  # [T, W]
    frames = texture[:, :, columns].permute(2, 0, 1, 3)  # [3, H, T, W] -> [T, 3, H, W]
    noise = 3 * torch.randn(frames.shape, generator=generator)
    return (frames + noise).clamp(0, 255).to(torch.uint8)


def write_standin_dataset(name: str, root: Path, videos: int, max_seconds: float | None) -> None:
    """``videos`` look-alike clips of dataset ``name`` in its published layout, all in the training split."""
    from torchcodec.encoders import VideoEncoder

    spec = STANDINS[name]
    seconds = min(spec.seconds, max_seconds or spec.seconds)
    names = [f"clip{index}" for index in range(videos)]
    relative = {
        "ucf101": [f"UCF-101/YoYo/v_YoYo_g{index + 1:02d}_c01.avi" for index in range(videos)],
        "hmdb51": [f"videos/brush_hair/{clip} (brushing)_f_cm_np1_ba_med_0.avi" for clip in names],
        "ssv2": [f"20bn-something-something-v2/{index + 1}.webm" for index in range(videos)],
        "msrvtt": [f"MSRVTT_Videos/video{index}.mp4" for index in range(videos)],
        "kinetics400": [f"train/-kinetics{index:02d}_000000_000010.mp4" for index in range(videos)],
        "msvd": [f"YouTubeClips/-{clip}_5_15.avi" for clip in names],
        "lsmdc": [f"videos/1004_Juno/1004_Juno_00.00.{index:02d}.849-00.00.35.458.mp4" for index in range(videos)],
        "activitynet": [f"videos/v_{clip}.mp4" for clip in names],
    }[name]
    for index, path in enumerate(relative):
        total = round(spec.fps * seconds)
        frames = camera_like_video(
            min(total, round(spec.fps * (spec.loop_seconds or seconds))), spec.height, spec.width, seed=index
        )
        frames = frames.repeat(math.ceil(total / len(frames)), 1, 1, 1)[:total]  # [total, 3, H, W]
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        encoder = VideoEncoder(frames, frame_rate=spec.fps)
        encoder.to_file(root / path, codec=spec.codec, pixel_format="yuv420p", extra_options=spec.options or None)
    if name == "ucf101":
        (root / "ucfTrainTestlist").mkdir()
        (root / "ucfTrainTestlist/classInd.txt").write_text("1 YoYo\n")
        (root / "ucfTrainTestlist/trainlist01.txt").write_text("".join(f"{p[8:]} 1\n" for p in relative))
        (root / "ucfTrainTestlist/testlist01.txt").write_text(f"{relative[0][8:]}\n")
    elif name == "hmdb51":
        (root / "testTrainMulti_7030_splits").mkdir()
        lines = "".join(f"{Path(p).name} 1 \n" for p in relative)
        (root / "testTrainMulti_7030_splits/brush_hair_test_split1.txt").write_text(lines)
    elif name == "ssv2":
        (root / "labels").mkdir()
        template = "Pushing something from left to right"
        clips = [
            {"id": str(index + 1), "template": template.replace("something", "[something]")} for index in range(videos)
        ]
        (root / "labels/labels.json").write_text(json.dumps({template: "0"}))
        (root / "labels/train.json").write_text(json.dumps(clips))
        (root / "labels/validation.json").write_text(json.dumps(clips[:1]))
    elif name == "kinetics400":
        (root / "annotations").mkdir()
        header = "label,youtube_id,time_start,time_end,split,is_cc\n"
        rows = [f"abseiling,{Path(p).name[:11]},0,10,train,0\n" for p in relative]
        (root / "annotations/train.csv").write_text(header + "".join(rows))
        (root / "annotations/val.csv").write_text(header + rows[0])
    elif name == "msvd":
        (root / "msvd_data").mkdir()
        ids = [Path(path).stem for path in relative]
        (root / "msvd_data/train_list.txt").write_text("\r\n".join(ids))
        (root / "msvd_data/test_list.txt").write_text(ids[0])
        (root / "msvd_data/raw-captions.pkl").write_bytes(pickle.dumps({v: [["a", "camera", "pans"]] for v in ids}))
    elif name == "lsmdc":
        (root / "annotations").mkdir()
        lines = [f"{Path(path).stem}\t" + "\t".join(["00.00.00.000"] * 4) + "\tSOMEONE pans.\n" for path in relative]
        (root / "annotations/LSMDC16_annos_training.csv").write_text("".join(lines))
        (root / "annotations/LSMDC16_challenge_1000_publictect.csv").write_text(lines[0])
    elif name == "activitynet":
        (root / "captions").mkdir()
        keys = [f"v_{Path(path).stem}" for path in relative]  # the video of key v_<id> is named <id>: v_v_clip0
        captions = {key: {"duration": seconds, "sentences": ["A camera pans.", " It keeps panning."]} for key in keys}
        for file_name, content in (
            ("train", captions),
            ("val_1", captions),
            ("train_ids", keys),
            ("val_ids", keys[:1]),
        ):
            (root / f"captions/{file_name}.json").write_text(json.dumps(content))
    else:
        (root / "msrvtt_data").mkdir()
        ids = [f"video{index}" for index in range(videos)]
        sentences = [{"caption": "a camera pans", "video_id": video, "sen_id": i} for i, video in enumerate(ids)]
        (root / "msrvtt_data/MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
        (root / "msrvtt_data/MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"{v}\n" for v in ids))
        (root / "msrvtt_data/MSRVTT_JSFUSION_test.csv").write_text(
            f"key,vid_key,video_id,sentence\nret0,msr0,{ids[0]},a\n"
        )


def clips_per_second(dataset: data.VideoDataset, clips: int, decode_only: bool) -> float:
    """Clips per second through ``read_frames`` (decode + sample) or ``dataset[i]`` (+ transform)."""
    import data

    start = time.perf_counter()
    for index in range(clips):
        item = index % len(dataset)
        if decode_only:
            data.read_frames(dataset.paths[item], dataset.num_frames, train=True)
        else:
            dataset[item]
    return clips / (time.perf_counter() - start)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def describe(path: Path) -> str:
    """``"AVI, mpeg4, 320x240, 4 fps"``: a video file's container, codec, size and frame rate."""
    from torchcodec.decoders import VideoDecoder

    metadata = VideoDecoder(path).metadata
    size = f"{metadata.width}x{metadata.height}"
    return f"{path.suffix[1:].upper()}, {metadata.codec}, {size}, {metadata.average_fps:.3g} fps"


def measure_dataset(
    name: str, folder: Path, videos: int, clips: int, rounds: int, max_seconds: float | None, resolution: int
) -> dict[str, Any]:
    """Stand-ins of ``name`` under ``folder/raw``, prepared into ``folder/prepared``, both read side by side."""
    import data
    import prepare

    spec = STANDINS[name]
    roots = {"raw": folder / "raw", "prepared": folder / "prepared"}
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)
    write_standin_dataset(name, roots["raw"], videos, max_seconds)
    start = time.perf_counter()
    prepared = prepare.prepare_dataset(name, roots["raw"], roots["prepared"], progress=False)
    prepare_seconds = (time.perf_counter() - start) / videos
    if prepared.failures:
        raise RuntimeError(f"prepare failed on the stand-ins of {name}: {prepared.failures}")
    loaded = {
        kind: data.build_dataset(name, root, "train", num_frames=spec.frames, resolution=resolution)
        for kind, root in roots.items()
    }
    rates: dict[str, list[float]] = {}
    for round_index in range(rounds + 1):  # the first round warms up
        for stage in ("decode", "pipeline"):
            for kind, dataset in loaded.items():
                rate = clips_per_second(dataset, clips, decode_only=stage == "decode")
                if round_index:
                    rates.setdefault(f"{kind}_{stage}", []).append(rate)
    return {
        "source": spec.described,
        "prepared": describe(loaded["prepared"].paths[0]),
        "frames_sampled": spec.frames,
        **{f"{key}_clips_per_s": statistics.median(values) for key, values in rates.items()},
        "decode_x": median_ratio(rates["prepared_decode"], rates["raw_decode"]),
        "pipeline_x": median_ratio(rates["prepared_pipeline"], rates["raw_pipeline"]),
        **{
            f"{kind}_kib_per_video": folder_bytes(root / prepare.VIDEO_FOLDERS[name]) / videos / 1024
            for kind, root in roots.items()
        },
        "prepare_seconds_per_video": prepare_seconds,
        "rates": rates,
    }


@app.command("data")
def data_command(
    datasets: Annotated[list[str] | None, typer.Option("--dataset", help="repeatable; default all")] = None,
    videos: Annotated[int, typer.Option(min=1, help="stand-in clips per dataset")] = 4,
    clips: Annotated[int, typer.Option(min=1, help="clips read per measurement")] = 24,
    rounds: Annotated[int, typer.Option(min=1, help="counted rounds; medians are reported")] = 5,
    max_seconds: Annotated[float | None, typer.Option(help="cap the stand-ins' length (smoke runs)")] = None,
    resolution: Annotated[int, typer.Option(min=8, help="model input size")] = 224,
    keep: Annotated[Path | None, typer.Option(help="build the stand-ins here and keep them")] = None,
    out: Annotated[Path | None, typer.Option(help="write the results here as JSON")] = None,
) -> None:
    """Decode (+ sample + transform) clips/s per worker: each dataset's stand-ins raw against prepared."""
    names = datasets or list(STANDINS)
    for name in names:
        check_choice("--dataset", name, STANDINS)
    import prepare
    from loading import dataset_files

    info = machine(decoder=True)
    with contextlib.ExitStack() as stack:
        folder = keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stop-bench-data-")))
        stack.enter_context(dataset_files.single_threaded())  # as in a DataLoader worker
        results = {
            name: measure_dataset(name, folder / name, videos, clips, rounds, max_seconds, resolution) for name in names
        }
    shown = [
        {
            "dataset": f"{name} ({result['frames_sampled']} frames)",
            "source": result["source"],
            "prepared": result["prepared"],
            **{key: f"{result[f'{key}_clips_per_s']:.0f}" for key in ("raw_decode", "prepared_decode")},
            **{key: f"{result[f'{key}_clips_per_s']:.0f}" for key in ("raw_pipeline", "prepared_pipeline")},
            "decode_x": f"{result['decode_x']:.1f}",
            "pipeline_x": f"{result['pipeline_x']:.1f}",
            "size": f"{result['raw_kib_per_video']:.0f} / {result['prepared_kib_per_video']:.0f}",
        }
        for name, result in results.items()
    ]
    columns = {
        "dataset": "dataset (frames sampled)",
        "source": "stand-in clip",
        "prepared": "prepared clip",
        "raw_decode": "decode clips/s raw",
        "prepared_decode": "prepared",
        "decode_x": "x",
        "raw_pipeline": "+ transform clips/s raw",
        "prepared_pipeline": "prepared",
        "pipeline_x": "x",
        "size": "KiB per clip raw / prepared",
    }
    settings = asdict(prepare.PrepareSettings("each"))
    setup = {"videos": videos, "clips": clips, "rounds": rounds, "max_seconds": max_seconds, "threads": 1, **info}
    notes = [
        "Training sampling (one random frame per segment); transform = random resized crop + flip to "
        f"{resolution} px + normalise. prepare settings: {settings}."
    ]
    result_json = {"benchmark": "data", "setup": setup, "prepare_settings": settings, "datasets": results}
    report("bench.py data", setup, markdown_table(shown, columns), notes, result_json, out)


if __name__ == "__main__":
    app()
