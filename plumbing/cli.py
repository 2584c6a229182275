"""The commands' options and their error line: what ``train.py`` and ``evaluate.py`` declare for Typer.

Machinery a learner may skip. Each command's options are the parameters of one function (``train_options``) or
dataclass (``EvaluationOptions``), declared once here and shared by its ``recognize`` and ``retrieve`` commands;
``add_command`` gives each command the options of its task alone (``retrieve`` has no ``--views``) and only its
task's datasets. A command ends in one of three ways: done, one ``error:`` line with exit code 1 (bad input:
``errors.EXPECTED_ERRORS``), or ``interrupted`` with exit code 130 (Ctrl-C or SIGTERM, the run folder left
consistent).
"""

import contextlib
import copy
import inspect
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import torch
import typer

from loading import protocols
from loading.dataset_files import available_cores
from loading.errors import EXPECTED_ERRORS, RankError, RunError, error_message
from plumbing import runtime
from plumbing.runtime import process_group, resolve_device
from stop import ATTENTIONS, PROMPT_VARIANTS, READOUTS, STOPConfig

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
TrainedPrompt = Literal[tuple(variant for variant in PROMPT_VARIANTS if variant != "none")]  # none trains nothing
TASK_DATASETS = {
    "recognize": Literal[(*protocols.RECOGNITION_DATASETS, "synthetic")],
    "retrieve": Literal[(*protocols.RETRIEVAL_DATASETS, "synthetic")],
}
# Upper bounds of the options, far above any benchmark's (protocols.py) and checked before anything is allocated;
# a checkpoint's fields are held to the same (runs.read_checkpoint). 77: CLIP's text context.
MAX_FRAMES, MAX_ETA, MAX_WORDS, MAX_BATCH, MAX_LR, MAX_SEED = 256, 64, 77, 4096, 10.0, 2**32 - 1
RECOGNITION_ONLY = ("split_id", "views", "crops")  # options that mean nothing to retrieval
RETRIEVAL_ONLY = ("words",)
PROTOCOL_FIELDS = {"frames": "frames", "words": "words", "batch_size": "batch", "epochs": "epochs", "lr": "lr"}

DatasetOption = Annotated[str, typer.Option(help="Which dataset; synthetic is generated on first use.")]
RootOption = Annotated[Path | None, typer.Option(help="Dataset folder in its published layout.")]
ClipOption = Annotated[
    str | None, typer.Option(help="CLIP name (ViT-B/32, ...) or path; default: the checkpoint's, else the demo CLIP.")
]
PromptOption = Annotated[TrainedPrompt, typer.Option(help="Ablation row: which prompt modules STOP trains.")]
SplitOption = Annotated[int, typer.Option(min=1, max=3, help="Official split (UCF101, HMDB51).")]
WordsOption = Annotated[
    int | None,
    typer.Option(min=3, max=MAX_WORDS, help="Caption tokens; default: the checkpoint's, else the dataset's:"),
]
WorkersOption = Annotated[
    int | None, typer.Option(min=0, help="DataLoader worker processes; default: this machine's cores, at most 8.")
]
DeviceOption = Annotated[Device, typer.Option(help="auto: CUDA when present.")]
PrecisionOption = Annotated[Precision, typer.Option(help="auto: bf16/fp16 autocast on CUDA, fp32 on the CPU.")]
StrictOption = Annotated[bool, typer.Option(help="A broken video is an error instead of a warning.")]
ThreadsOption = Annotated[
    int, typer.Option(min=0, help="torch threads; 0: this machine's cores shared by its torchrun processes.")
]
CompileOption = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile", help="torch.compile the video encoder; default: on with CUDA, off on the CPU."
    ),
]


def train_options(
    dataset: DatasetOption = "synthetic",
    root: RootOption = None,
    split_id: SplitOption = 1,
    clip: ClipOption = None,
    prompt: PromptOption = STOPConfig.prompt,
    alpha: Annotated[float, typer.Option(help="W^s = alpha*A + (1-alpha)*M.")] = STOPConfig.alpha,
    beta: Annotated[float, typer.Option(help="Extra weight of region patches in W^t.")] = STOPConfig.beta,
    eta: Annotated[
        int, typer.Option(min=1, max=MAX_ETA, help="Most temporal prompts per gap: n_t = ceil(eta*W^t).")
    ] = STOPConfig.eta,
    rho: Annotated[
        float, typer.Option(help="Fraction of patches that are regions.", show_default=f"6/49 = {6 / 49:.4f}...")
    ] = STOPConfig.rho,
    reduced_dim: Annotated[int, typer.Option(help="d_r, width of the prompt modules.")] = STOPConfig.reduced_dim,
    prompt_layers: Annotated[int, typer.Option(min=0, help="Prompt the first k blocks; 0: all.")] = 0,
    dropout: Annotated[float, typer.Option(help="Dropout of the prompters.")] = STOPConfig.dropout,
    readout: Annotated[
        Literal[READOUTS], typer.Option(help="Video feature: cls (one video CLS, Figure 2a) or mean (of frame CLS).")
    ] = STOPConfig.readout,
    attention: Annotated[
        Literal[ATTENTIONS],
        typer.Option(help="frame: patches attend to their frame; joint: to the whole video (needs --readout cls)."),
    ] = STOPConfig.attention,
    frames: Annotated[
        int | None, typer.Option(min=2, max=MAX_FRAMES, help="Frames per video; default: the dataset's:")
    ] = None,
    words: WordsOption = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_BATCH, help="The batch the loss sees, over all processes; default: the dataset's:"),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Default: the dataset's (protocols.py):")] = None,
    lr: Annotated[
        float | None, typer.Option(min=0, max=MAX_LR, help="AdamW peak learning rate; default: the dataset's:")
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.2,
    warmup: Annotated[float, typer.Option(min=0, max=1, help="Fraction of the steps spent warming up.")] = 0.1,
    grad_clip: Annotated[float, typer.Option(min=0, help="Clip the gradient norm to this; 0: no clipping.")] = 1.0,
    workers: WorkersOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    grad_checkpoint: Annotated[bool, typer.Option(help="Recompute frozen blocks in backward.")] = False,
    compile: CompileOption = None,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seeds initialisation, shuffling, augmentation, dropout.")
    ] = 0,
    strict: StrictOption = False,
    out: Annotated[Path | None, typer.Option(help="Run folder; default runs/<task>-<dataset>-<prompt>.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out.")] = False,
) -> None:
    """Never called: the options of ``train.py``'s commands, which Typer reads from this signature. ``None`` (and
    ``--prompt-layers 0``) is filled in by ``train.run_config``."""


@dataclass(frozen=True)
class EvaluationOptions:
    """The options of ``evaluate.py``'s ``recognize`` and ``retrieve``: Typer reads them from this signature."""

    dataset: DatasetOption = "synthetic"
    root: RootOption = None
    checkpoint: Annotated[Path | None, typer.Option(help="best.pt or last.pt of a train.py run.")] = None
    clip: ClipOption = None
    prompt: Annotated[
        Literal["none"] | None,
        typer.Option(help="Without --checkpoint only: 'none' (zero-shot CLIP4Clip); a checkpoint has its own."),
    ] = None
    frames: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_FRAMES, help="Frames per video; default: the checkpoint's, else the dataset's:"),
    ] = None
    words: WordsOption = None
    views: Annotated[int, typer.Option(min=1, help="Temporal views averaged per video.")] = 1
    crops: Annotated[
        int, typer.Option(help="Spatial views: 1 (centre square) or 3 (squares along the long side, X-CLIP's test).")
    ] = 1
    split_id: SplitOption = 1
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="Videos per forward, over all processes (each takes its share).")
    ] = 32
    workers: WorkersOption = None
    device: DeviceOption = "auto"
    precision: PrecisionOption = "auto"
    compile: CompileOption = None
    strict: StrictOption = False
    out: Annotated[Path | None, typer.Option(help="Metrics JSON; default: beside the checkpoint, else runs/.")] = None

    def __post_init__(self) -> None:
        if self.crops not in (1, 3):
            raise RunError(f"--crops {self.crops}: expected 1 (the centre square) or 3 (left, centre, right squares)")
        if self.checkpoint is not None and self.prompt is not None:
            raise RunError(
                f"--prompt {self.prompt} and --checkpoint: a checkpoint is evaluated with the prompt modules "
                "it trained (its own --prompt); leave --prompt out"
            )


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the project's expected failures into ``error: <message>`` and exit code 1, never a traceback.

    Anything else is a bug and keeps its traceback. Under torchrun every rank runs the same setup and meets the
    same bad input, so rank 0 alone reports it; a ``RankError`` (this rank's share of the data, a collective that
    failed because another rank died: ``runtime.process_group``) is reported by the rank that met it. SIGTERM ends
    a command as Ctrl-C does.
    """
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    except EXPECTED_ERRORS as error:
        if runtime.RANK == 0 or isinstance(error, RankError):
            typer.echo(f"error: {error_message(error)}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        if runtime.RANK == 0:
            typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_command(app: typer.Typer, task: str, help: str, options: Callable, run: Callable[..., None]) -> None:
    """Add ``task`` to ``app``, with ``options``'s parameters for its task, calling ``run(task, values, given)``
    inside ``reported_errors`` and, under torchrun, the process group; ``given`` names the options typed on the
    command line (``--resume`` checks them against the run). ``--threads`` is every command's, applied here and
    never passed on: a run may change it."""
    left_out = RETRIEVAL_ONLY if task == "recognize" else RECOGNITION_ONLY
    parameters = inspect.signature(options).parameters.values()
    defaults = {parameter.name: parameter.default for parameter in parameters if parameter.name in left_out}
    datasets = protocols.RECOGNITION_DATASETS if task == "recognize" else protocols.RETRIEVAL_DATASETS
    rows = {"synthetic": protocols.SYNTHETIC[task]} | {name: protocols.PROTOCOLS[name] for name in datasets}
    declared = []
    for parameter in parameters:
        if parameter.name in left_out:
            continue
        if parameter.name == "dataset":  # only the task's datasets
            option = get_args(parameter.annotation)[1]
            parameter = parameter.replace(annotation=Annotated[TASK_DATASETS[task], option])
        elif parameter.name in PROTOCOL_FIELDS and parameter.default is None:  # the dataset's default, for each one
            names_of: dict[float, list[str]] = {}  # "25 (synthetic); 10 (ucf101, hmdb51, ssv2, kinetics400)"
            for name, row in rows.items():
                names_of.setdefault(getattr(row, PROTOCOL_FIELDS[parameter.name]), []).append(name)
            kind, option = get_args(parameter.annotation)
            option = copy.copy(option)
            option.help += " " + "; ".join(f"{value:g} ({', '.join(names)})" for value, names in names_of.items()) + "."
            parameter = parameter.replace(annotation=Annotated[kind, option])
        declared.append(parameter)

    def command(context: typer.Context, threads: int, **values: Any) -> None:
        with reported_errors(), process_group(resolve_device(values["device"])):
            torch.set_num_threads(threads or max(1, available_cores() // runtime.LOCAL_WORLD_SIZE))
            given = {name for name in values if context.get_parameter_source(name).name != "DEFAULT"}
            run(task, {**values, **defaults}, given)

    context = inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    threads = inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=ThreadsOption)
    command.__signature__ = inspect.Signature([context, *declared, threads])
    app.command(task, help=help)(command)
