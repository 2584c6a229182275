"""Benchmarks: what STOP costs over the frozen CLIP4Clip-meanP baseline, and how fast a dataset's clips are read.

``python bench.py model`` runs each row of ``ROWS`` on a random CLIP in a released shape (no download, no TorchCodec
or FFmpeg); ``python bench.py data`` reads a dataset (``--root``) against its copy made by ``python prepare.py``
(``--prepared``). Both print markdown tables and write JSON with ``--out``; the functions say what each number is.
"""

import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
import typer
from torch.utils.flop_counter import FlopCounterMode

import clip_model
from stop import PROMPT_VARIANTS, STOPConfig, STOPModel

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
TINY = clip_model.CLIPConfig(32, 32, 2, 64, 8, 77, 258, 64, 1, 2)  # tests/fixtures' tiny CLIP, for smoke runs
BACKBONES = {"ViT-B/32": clip_model.VIT_B_32, "ViT-B/16": clip_model.VIT_B_16, "ViT-L/14": clip_model.VIT_L_14}
BACKBONES["tiny"] = TINY
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MATMUL_SIZES = {"cpu": 2048, "cuda": 4096}  # the square products that measure the machine's matmul rate
MARKER = "benchmark"  # the key of every JSON written here: the only kind of file that --out may replace


@dataclass(frozen=True)
class Row:
    """A row of the model table: STOP from ``config`` (``STOPConfig``'s fields), or the image tower fine-tuned."""

    config: dict[str, Any]
    grad_checkpoint: bool = False
    full_finetune: bool = False


ROWS = {  # the frozen baseline and full fine-tuning are CLIP4Clip's meanP; the prompted rows, STOP's default cls
    **{name: Row(dict(prompt=name, readout="mean" if name == "none" else "cls")) for name in PROMPT_VARIANTS},
    "stop --readout mean": Row(dict(prompt="stop", readout="mean")),
    "stop --attention joint": Row(dict(prompt="stop", attention="joint")),
    "stop --grad-checkpoint": Row(dict(prompt="stop"), grad_checkpoint=True),
    "full fine-tune": Row(dict(prompt="none", readout="mean"), full_finetune=True),
}
BASELINE, FULL = "none", "full fine-tune"  # the rows every ratio is taken against


def timed(function: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``function()`` takes, the device's queue drained before and after."""
    drain = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    drain()
    start = time.perf_counter()
    function()
    drain()
    return time.perf_counter() - start


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of ``a / b``, each pair measured in the same round."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def markdown_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """``rows`` as a markdown table; ``columns`` maps each row key to its header."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(row[key]) for key in columns) + " |" for row in rows])


def fmt(value: float | None, digits: int = 2, scale: float = 1) -> str:
    """``value / scale`` with ``digits`` decimals and thousands separated, ``—`` for no value."""
    return "—" if value is None else f"{value / scale:,.{digits}f}"


def check_out(out: Path | None) -> None:
    """Refuse an ``--out`` that exists and is not a JSON written here: checked before measuring and before writing."""
    if out is None or not (out.exists() or out.is_symlink()):
        return
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        content = json.loads(out.read_text()) if out.is_file() else None
        if isinstance(content, dict) and MARKER in content:
            return
    raise typer.BadParameter(f"{out} exists and is not a JSON of bench.py (no {MARKER!r} key)", param_hint="--out")


def machine() -> dict[str, Any]:
    """What the numbers are measured on, the load left by other processes included."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), cpu)
    gpu = {"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}
    return {"cpu": cpu, **gpu, "python": platform.python_version(), "torch": torch.__version__,
            "load average (1 min) at start": round(os.getloadavg()[0], 2)}  # fmt: skip


def report(title: str, table: str, notes: list[str], result: dict[str, Any], out: Path | None) -> None:
    """Print the setup (with the load at the end), the table and the notes; write ``result`` to ``out`` atomically."""
    result["setup"]["load average (1 min) at end"] = round(os.getloadavg()[0], 2)
    setup = ", ".join(f"{key}={value}" for key, value in result["setup"].items())
    typer.echo("\n\n".join([f"{title}\n{setup}", table, *notes]))
    if out is not None:
        check_out(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")  # NaN: a bug, never saved
            temporary.replace(out)
        finally:
            temporary.unlink(missing_ok=True)
        typer.echo(f"\nwrote {out}")


class Bench:
    """A row's model, optimiser, inputs and ``steps``, what it times (``setup``: the model command's options)."""

    def __init__(self, row: Row, clip: clip_model.CLIP, setup: dict[str, Any]):
        """Full fine-tuning trains ``clip`` itself: give that row a copy of its own. Under bf16/fp16 autocast the
        frozen CLIP keeps its matrix weights in that dtype, as training does; full fine-tuning keeps fp32 ones."""
        self.row, self.device, dtype = row, torch.device(setup["device"]), AUTOCAST_DTYPES[setup["autocast"]]
        if dtype is not None and not row.full_finetune:
            clip_model.convert_matmul_weights(clip, dtype)
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)
        self.model = STOPModel(clip, STOPConfig(**row.config), grad_checkpoint=row.grad_checkpoint).to(self.device)
        visual = self.model.clip.visual
        trained = visual.requires_grad_(True).parameters() if row.full_finetune else self.model.trainable_parameters()
        self.parameters = list(trained)
        generator, batch, classes = torch.Generator().manual_seed(setup["seed"]), setup["batch_size"], setup["classes"]
        shape = (batch, setup["frames"], 3, visual.input_resolution, visual.input_resolution)
        self.video = torch.randn(shape, generator=generator).to(self.device)  # [B, T, 3, R, R]
        features = torch.randn(classes, clip.config.embed_dim, generator=generator)
        self.class_features = F.normalize(features, dim=-1).to(self.device)  # [C, E], fixed like cached class texts
        self.labels = torch.randint(classes, (batch,), generator=generator).to(self.device)  # [B]
        self.steps = {} if row.grad_checkpoint else {"eval": self.eval_forward}  # a checkpointed eval forward is STOP's
        if self.parameters:
            self.steps["train"] = self.train_step
            lr = 1e-5 if row.full_finetune else 1e-3
            self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=0.2, fused=True)

    def eval_forward(self, return_details: bool = False) -> Any:
        self.model.eval()
        with torch.inference_mode(), self.autocast:
            return self.model.encode_video(self.video, return_details=return_details)

    def train_step(self) -> None:
        """Forward, backward and a (fused) AdamW step on the recognition loss, cross-entropy over ``logit_scale *
        cos(video, class)``. Fixed class features give the text tower no gradient, which favours full fine-tuning."""
        self.model.train()
        with self.autocast:
            logits = self.model.class_logits(self.video, self.class_features)  # [B, C]
        F.cross_entropy(logits.float(), self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def memory_in_own_process(name: str, setup: dict[str, Any]) -> dict[str, int]:
    """``memory-probe`` for one row in a fresh Python process, so no other row's peak is counted; every allocation
    above 64 KiB mapped on its own and unmapped when freed, so the resident peak is that of live tensors."""
    command = [sys.executable, str(Path(__file__).resolve()), "memory-probe", json.dumps([name, setup])]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if finished.returncode != 0:
        raise RuntimeError(f"memory probe of {name!r} failed:\n{finished.stderr.strip()[-2000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


@app.command("memory-probe", hidden=True)
def memory_probe(spec: str) -> None:
    """Internal: print as JSON one row's bytes (``spec``: its name and the setup): the model built, then the peaks
    above it of an eval forward and of training steps, what they add to the frozen CLIP that every row holds. CUDA:
    allocated bytes. CPU: Linux's resident size (``VmRSS``) and its high-water mark since a reset (``VmHWM``)."""
    name, setup = json.loads(spec)
    torch.set_num_threads(setup["threads"])
    device = torch.device(setup["device"])
    cuda = device.type == "cuda"

    def status(key: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    now = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: status("VmRSS:"))
    peak = (lambda: torch.cuda.max_memory_allocated(device)) if cuda else (lambda: status("VmHWM:"))
    warm = torch.randn(512, 512, device=device)
    (warm @ warm).relu().sum().item()  # start the thread pool and the math libraries before the baseline
    before = now()
    bench = Bench(ROWS[name], clip_model.random_clip(BACKBONES[setup["backbone"]], seed=setup["seed"]), setup)
    built = now()
    if cuda:  # building the model may have peaked higher than it stays: the peak starts over from here
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux 4.0 and later)
    bench.eval_forward()
    result = {"model_bytes": built - before, "eval_peak_bytes": peak() - built}  # eval first: peaks only grow
    if "train" in bench.steps:
        bench.train_step()
        bench.train_step()  # the second step has the optimiser state the first one created
        result["train_peak_bytes"] = peak() - built
    typer.echo(json.dumps(result))


def time_rows(benches: dict[str, Bench], dtype: torch.dtype, warmup: int, runs: int) -> dict[str, Any]:
    """Seconds of each row's ``steps`` (``eval``, ``train``) and the matmul FLOP/s (``matmul``) in each counted round.
    Rows take turns, the first one rotating, so drift in the machine's speed hits them alike."""
    names, device = list(benches), benches[BASELINE].device
    seconds = {kind: {name: [] for name in names if kind in benches[name].steps} for kind in ("eval", "train")}
    size, matmul = MATMUL_SIZES[device.type], []
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for round_index in range(warmup + runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for kind, function in benches[name].steps.items():
                seconds[kind][name].append(timed(function, device))
        matmul.append(2 * size**3 / min(timed(lambda: a @ b, device) for _ in range(3)))
    counted = {kind: {name: times[warmup:] for name, times in rows.items()} for kind, rows in seconds.items()}
    return counted | {"matmul": matmul[warmup:]}


def row_results(benches: dict[str, Bench], seconds: dict[str, Any], memory: dict[str, dict], batch_size: int) -> dict:
    """Each row's JSON: trainable parameters, ms per clip and ratios (each the median over rounds of two times
    measured in the same round), memory, and temporal prompts per gap between frames."""
    results: dict[str, dict[str, Any]] = {}
    full = memory.get(FULL, {})
    for name, bench in benches.items():
        result: dict[str, Any] = {"trainable_parameters": sum(parameter.numel() for parameter in bench.parameters)}
        for kind in bench.steps:
            reference, ratio = (BASELINE, "eval_x_none") if kind == "eval" else (FULL, "train_x_full")
            result[f"{kind}_ms_per_clip"] = 1000 * statistics.median(seconds[kind][name]) / batch_size
            result[ratio] = median_ratio(seconds[kind][name], seconds[kind][reference])
        result.update(measured := memory.get(name, {}))
        if "train_peak_bytes" in measured and full.get("train_peak_bytes"):
            result["train_memory_x_full"] = measured["train_peak_bytes"] / full["train_peak_bytes"]
            total = measured["model_bytes"] + measured["train_peak_bytes"]
            result["train_total_memory_x_full"] = total / (full["model_bytes"] + full["train_peak_bytes"])
        if "eval" in bench.steps and not bench.row.full_finetune:  # averaged over gaps, videos and prompted blocks
            counts = [block.counts.float().mean().item() for block in bench.eval_forward(return_details=True)[1]]
            result["prompts_per_gap"] = sum(counts) / max(1, len(counts))
        results[name] = {**result, "seconds": {kind: seconds[kind].get(name) for kind in ("eval", "train")}}
    return results


def model_table(results: dict[str, dict[str, Any]]) -> str:
    """The rows as a markdown table, ``—`` where a row has no such measurement."""
    columns = {  # result key: header, digits, scale (2**20: bytes shown as MiB)
        "trainable_parameters": ("trainable params", 0, 1), "eval_ms_per_clip": ("eval forward ms/clip", 0, 1),
        "eval_x_none": ("x none", 2, 1), "train_ms_per_clip": ("train step ms/clip", 0, 1),
        "train_x_full": ("x full FT", 2, 1), "eval_peak_bytes": ("eval peak MiB", 0, 2**20),
        "train_peak_bytes": ("train peak MiB", 0, 2**20), "train_memory_x_full": ("x full FT", 2, 1),
        "train_total_memory_x_full": ("x full FT, model included", 2, 1), "prompts_per_gap": ("prompts/gap", 2, 1),
    }  # fmt: skip
    shown = []
    for name, result in results.items():
        cells = {key: fmt(result.get(key), digits, scale) for key, (_, digits, scale) in columns.items()}
        shown.append({"row": name, **cells})
    headers = {"row": "model", **{key: header for key, (header, _, _) in columns.items()}}
    return markdown_table(shown, headers)


@app.command("model")
def model_command(
    backbone: Annotated[Literal[tuple(BACKBONES)], typer.Option(help="random weights in this shape")] = "ViT-B/32",
    frames: Annotated[int, typer.Option(min=2)] = 12,
    batch_size: Annotated[int, typer.Option(min=0, help="videos per step; 0: 2 on the CPU, 16 on CUDA")] = 0,
    classes: Annotated[int, typer.Option(min=2, help="class text features the recognition loss scores")] = 101,
    rows: Annotated[list[str] | None, typer.Option("--row", help=f"repeatable, of {list(ROWS)}; default all")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="uncounted rounds first")] = 1,
    runs: Annotated[int, typer.Option(min=1, help="counted rounds; medians are reported")] = 5,
    device: Annotated[Literal["cpu", "cuda"], typer.Option()] = "cuda" if torch.cuda.is_available() else "cpu",
    autocast: Annotated[Literal["auto", "none", "bf16", "fp16"], typer.Option(help="auto: bf16 on CUDA")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="torch threads; 0: PyTorch's default")] = 0,
    compile: Annotated[bool, typer.Option("--compile", help="encode_video through torch.compile, fullgraph")] = False,
    memory: Annotated[bool, typer.Option(help="measure peak memory (Linux or CUDA), one process per row")] = True,
    seed: int = 0,
    out: Annotated[Path | None, typer.Option(help="write the results here as JSON")] = None,
) -> None:
    """Eval forward, training step and peak memory of every variant, the frozen baseline and full fine-tuning."""
    if unknown := [name for name in rows or [] if name not in ROWS]:
        raise typer.BadParameter(f"{unknown[0]!r}: expected one of {list(ROWS)}", param_hint="--row")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device here", param_hint="--device")
    check_out(out)
    names = list(dict.fromkeys([BASELINE, *(rows or ROWS), FULL]))  # with the rows every ratio is taken against
    autocast = ("bf16" if device == "cuda" else "none") if autocast == "auto" else autocast
    setup = dict(backbone=backbone, frames=frames, batch_size=batch_size or (16 if device == "cuda" else 2),
                 classes=classes, device=device, autocast=autocast, threads=threads or torch.get_num_threads(),
                 seed=seed, warmup=warmup, runs=runs, compile=compile, **machine())  # fmt: skip
    torch.set_num_threads(setup["threads"])
    clip = clip_model.random_clip(BACKBONES[backbone], seed=seed).to(device)
    benches = {name: Bench(ROWS[name], copy.deepcopy(clip) if name == FULL else clip, setup) for name in names}
    if compile:
        for bench in benches.values():
            bench.model.encode_video = torch.compile(bench.model.encode_video, fullgraph=True)
    with FlopCounterMode(display=False) as counter:  # matrix products, convolutions and attention
        benches[BASELINE].eval_forward()
    flops, matmul_dtype = counter.get_total_flops(), AUTOCAST_DTYPES[autocast] or torch.float32
    seconds = time_rows(benches, matmul_dtype, warmup, runs)
    memory_bytes = {name: memory_in_own_process(name, setup) for name in names} if memory else {}
    results = row_results(benches, seconds, memory_bytes, setup["batch_size"])

    achieved = [flops / elapsed for elapsed in seconds["eval"][BASELINE]]  # FLOP/s of each counted round
    flops_fraction = median_ratio(achieved, seconds["matmul"])
    size, dtype_name = MATMUL_SIZES[device], str(matmul_dtype).removeprefix("torch.")
    notes = [
        f"Frozen baseline forward: {flops / setup['batch_size'] / 1e9:.1f} GFLOP per clip at "
        f"{statistics.median(achieved) / 1e9:.1f} GFLOP/s; measured {size}x{size} matmul rate "
        f"{statistics.median(seconds['matmul']) / 1e9:.1f} GFLOP/s ({dtype_name}): {100 * flops_fraction:.0f}% of it."
    ]
    if memory:
        model_size = fmt(memory_bytes[BASELINE]["model_bytes"], 0, 2**20)
        notes.append(f"Peak memory is above the built model (the same frozen CLIP in every row: {model_size} MiB); "
                     "the last memory column adds it back.")  # fmt: skip
    result = {MARKER: "model", "setup": setup, "forward_flops": flops, "matmul_flops_per_s": seconds["matmul"],
              "baseline_flops_fraction": flops_fraction, "rows": results}  # fmt: skip
    report("bench.py model", model_table(results), notes, result, out)


def read_rates(loaded: dict[str, Any], clips: int, rounds: int) -> dict[str, list[float]]:
    """Clips/s of each ``data.VideoDataset`` per counted round and ``<kind>_<stage>``: ``decode`` (``read_frames``:
    decode + sample), ``pipeline`` (``dataset[i]``: + transform). The kinds take turns on the same clips."""
    import data  # here, not at the top: ``bench.py model`` runs without TorchCodec and FFmpeg

    rates: dict[str, list[float]] = {}
    for round_index in range(rounds + 1):  # the first round warms up
        for stage in ("decode", "pipeline"):
            for kind, videos in loaded.items():
                start = time.perf_counter()
                for item in [index * len(videos) // clips for index in range(clips)]:
                    if stage == "decode":
                        data.read_frames(videos.paths[item], videos.num_frames, train=True,
                                         first_seconds=videos.first_seconds)  # fmt: skip
                    else:
                        videos[item]
                if round_index:
                    rates.setdefault(f"{kind}_{stage}", []).append(clips / (time.perf_counter() - start))
    return rates


@app.command("data")
def data_command(
    dataset: Annotated[str, typer.Option(help="of docs/datasets.md, or synthetic (made on first use)")] = "synthetic",
    root: Annotated[Path | None, typer.Option(help="the dataset in its published layout; only read")] = None,
    prepared: Annotated[Path | None, typer.Option(help="a copy of --root made by prepare.py; only read")] = None,
    clips: Annotated[int, typer.Option(min=1, help="clips read per measurement, spread over the split")] = 24,
    frames: Annotated[int | None, typer.Option(min=1, help="frames sampled per clip; default: the dataset's")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="counted rounds after one warm-up; medians are reported")] = 5,
    resolution: Annotated[int, typer.Option(min=8, help="model input size")] = 224,
    out: Annotated[Path | None, typer.Option(help="write the results here as JSON")] = None,
) -> None:
    """Decode (+ transform) clips/s of a training split in one thread (one DataLoader worker), raw and prepared."""
    check_out(out)
    import torchcodec

    import data
    from loading import dataset_files, protocols
    from loading.errors import DataError
    from plumbing.cli import reported_errors

    with reported_errors():
        task = "retrieve" if dataset in protocols.RETRIEVAL_DATASETS else "recognize"
        num_frames = frames or protocols.protocol(dataset, task).frames
        name, raw_root = data.dataset_location(dataset, root, task)
        roots = {"raw": raw_root, **({"prepared": prepared} if prepared else {})}
        loaded = {kind: data.build_dataset(name, folder, "train", num_frames=num_frames, resolution=resolution)
                  for kind, folder in roots.items()}  # fmt: skip
        if prepared and len(loaded["prepared"]) != len(loaded["raw"]):
            counts = f"{len(loaded['prepared'])} training videos, --root {raw_root} {len(loaded['raw'])}"
            raise DataError(f"--prepared {prepared} lists {counts}: expected a copy of --root made by prepare.py")
        with dataset_files.single_threaded():
            rates = read_rates(loaded, clips, rounds)
        files = {}
        for kind, videos in loaded.items():  # the first clip's container, codec, size and frame rate
            metadata = dataset_files.open_video(videos.paths[0], "approximate").metadata
            size = f"{metadata.width}x{metadata.height}, {metadata.average_fps:.3g} fps"
            files[kind] = f"{videos.paths[0].suffix[1:].upper()}, {metadata.codec}, {size}"
    result: dict[str, Any] = {f"{key}_clips_per_s": statistics.median(values) for key, values in rates.items()}
    shown = {"dataset": f"{dataset} ({num_frames} frames)", "raw": files["raw"], "prepared": files.get("prepared", "—")}
    columns = {"dataset": "dataset (frames sampled)", "raw": "clip", "prepared": "prepared clip"}
    for stage, header in (("decode", "decode clips/s raw"), ("pipeline", "+ transform clips/s raw")):
        if prepared:
            result[f"{stage}_x"] = median_ratio(rates[f"prepared_{stage}"], rates[f"raw_{stage}"])
        shown |= {f"{kind}_{stage}": fmt(result.get(f"{kind}_{stage}_clips_per_s"), 0) for kind in ("raw", "prepared")}
        shown[f"{stage}_x"] = fmt(result.get(f"{stage}_x"), 1)
        columns |= {f"raw_{stage}": header, f"prepared_{stage}": "prepared", f"{stage}_x": "x"}
    setup = {"dataset": dataset, "root": str(raw_root), "prepared": prepared and str(prepared), "clips": clips}
    setup |= {"rounds": rounds, "frames": num_frames, "resolution": resolution, "threads": 1, **machine()}
    setup |= {"cores available": dataset_files.available_cores(), "torchcodec": torchcodec.__version__}
    notes = [f"Training sampling (one random frame per segment); transform = random resized crop + flip to {resolution}"
             " px + normalise. A prepared copy: python prepare.py --dataset D --root RAW --out PREPARED."]  # fmt: skip
    result |= {"frames_sampled": num_frames, "files": files, "rates": rates}
    report("bench.py data", markdown_table([shown], columns), notes, {MARKER: "data", "setup": setup, **result}, out)


if __name__ == "__main__":
    app()
