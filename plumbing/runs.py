"""The run folder and the checkpoint format: ``RunFolder`` and its lock (``held_lock``), ``atomic_save``, ``save_epoch``
and ``repair_run_folder``; ``checkpoint_state``, read back by ``read_checkpoint`` and ``load_trained``.

Machinery a learner may skip. The rules a run folder keeps (one owner, nothing half-written, nothing replaced by
accident, kills repaired, ``--resume`` and ``--overwrite``) are in ``docs/running.md`` ("The run folder").
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from loading.errors import ConfigError, RunError, is_number
from plumbing import cli, runtime
from plumbing.runtime import Backbone, build_model, echo, load_backbone, on_rank_zero
from stop import STOPConfig, STOPModel

try:
    import fcntl  # POSIX file locks
except ImportError:  # Windows: no lock, the other rules still hold
    fcntl = None

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # what a run writes, each through a temporary_name of it
LOCK_FILE = "run.lock"
EVALUATION_MARKER = "stop_evaluation"  # the key that marks a JSON file as evaluate.py's result (its format version)
# What --resume may change; anything else given must match the saved run. --clip may name the same weights
# elsewhere (their SHA256 is checked), --root the same dataset elsewhere (check_same_data), --epochs extends the
# run; the others
# change how the run computes, not what.
RESUME_MAY_CHANGE = ("epochs", "workers", "device", "compile", "strict", "root", "clip")
Config = TypeVar("Config")


def temporary_name(name: str) -> str:
    """A temporary file's name for ``name``, unique to this write: two commands writing one file never share it."""
    return f"{name}.{secrets.token_hex(6)}.tmp"


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` (text, or anything ``torch.save`` takes) through a temporary file and a rename: an interrupted
    save never leaves a half-written file, and a failed one (a full disk, ``path`` a folder) leaves no temporary
    file either. The temporary file's name is unique (``temporary_name``) and created anew, never an existing file
    or link. The checkpoint is serialised in memory first, so a full disk is the ``OSError`` of the write, named
    after ``path`` (a failed write(2) names no file of its own)."""
    temporary = path.with_name(temporary_name(path.name))
    if isinstance(obj, str):
        payload = obj.encode()
    else:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = buffer.getvalue()
    try:
        with open(temporary, "xb") as file:
            file.write(payload)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
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


def is_evaluation_result(path: Path) -> bool:
    """Whether ``path`` holds a result of ``evaluate.py``: a JSON object with ``EVALUATION_MARKER``."""
    try:
        with open(path, "rb") as file:
            result = json.loads(file.read(1 << 20))  # a result is a few kB; anything larger is something else
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and EVALUATION_MARKER in result


def check_output_file(out: Path) -> None:
    """``--out``: a file name whose folder can be written, and nothing there yet but an earlier evaluation result
    (never a checkpoint, or any other file), checked before the evaluation runs."""
    if out.is_dir():
        raise RunError(f"--out {out} is a folder; give the JSON file to write, such as {out / 'eval.json'}")
    if (out.exists() or out.is_symlink()) and not is_evaluation_result(out):
        raise RunError(
            f"--out {out} exists and is not an evaluation result of evaluate.py (a JSON file with the key "
            f"'{EVALUATION_MARKER}'): it is left alone; choose another --out"
        )
    check_writable(out.parent, "--out")


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


# --------------------------------------------------------------------------- #
# Opening a run folder
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def held_lock(lock: Path, in_use: str) -> Iterator[None]:
    """Hold the file ``lock`` exclusively while the body runs, or refuse at once with the message ``in_use``: another
    process owns the folder. Never through a symbolic link (a file outside the folder); the file goes when the body
    ends. For run folders (``RunFolder.open``) and ``prepare.py``'s copies."""
    if fcntl is None:
        yield
        return
    while True:
        try:  # held open, and locked, for the whole body
            handle = os.fdopen(os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), "r+b")
        except OSError:
            if not lock.is_symlink():
                raise
            raise RunError(
                f"{lock} is a symbolic link: a lock is its own file, never followed; remove the link"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunError(in_use) from None
        if lock.exists() and os.stat(lock, follow_symlinks=False).st_ino == os.fstat(handle.fileno()).st_ino:
            break  # the lock file was not removed by its previous owner between our open and our lock
        handle.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held, so that no one locks the old file after us
        handle.close()


def read_run(out: Path) -> dict[str, Any]:
    """``last.pt`` of a run to resume, checked to hold what ``--resume`` reads."""
    checkpoint = read_checkpoint(out / "last.pt")
    needed = {"records", "best_epoch", "best", "epoch", "optimizer", "scheduler", "scaler"}
    missing = sorted(needed - checkpoint.keys()) + [f"config['{key}']" for key in ("task", "out", "epochs")
                                                       if key not in checkpoint["config"]]  # fmt: skip
    if missing:
        raise RunError(
            f"{out / 'last.pt'} cannot be resumed: it lacks {', '.join(missing)} (a checkpoint written by train.py "
            "holds them); evaluate it with evaluate.py, or start a new run"
        )
    return checkpoint


class RunFolder:
    """The run folder ``--out``, owned for the whole run (``with RunFolder(...) as folder``), and where its run
    stands: ``config`` (a resumed run's own, with what ``--resume`` may change), ``first_epoch``, ``best`` and
    ``best_epoch`` so far, ``records`` (one metric record per epoch) and ``checkpoint`` (``last.pt`` when resumed,
    else ``None``). ``save`` writes an epoch.

    Rank 0 alone checks, locks, reads, repairs and writes; every rank receives the checkpoint (``on_rank_zero``).
    """

    def __init__(self, config: Any, resume: bool, overwrite: bool, given: set[str]):
        if resume and overwrite:
            raise RunError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
        self.out, self.resume, self.overwrite, self.given = Path(config.out), resume, overwrite, given
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"--out {self.out} is a file; the run folder must be a folder")
        self.config, self.first_epoch, self.best, self.best_epoch, self.records = config, 0, -math.inf, -1, []
        self.checkpoint: dict[str, Any] | None = None
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> RunFolder:
        with self.stack:
            self.checkpoint = on_rank_zero(self.open)
            if self.checkpoint is not None:
                self.continue_from(self.checkpoint)
            self.stack = self.stack.pop_all()  # held until __exit__
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stack.close()

    def open(self) -> dict[str, Any] | None:
        """Lock the folder (``run.lock``: another process is writing it), check that it may be written as asked, and
        read (and repair) a run to resume.

        An existing run is touched only with ``--resume`` (continue it) or ``--overwrite`` (start it afresh), and any
        other non-empty folder never: only a run's own files are ever replaced.
        """
        out = self.out
        created = [folder for folder in (out, *out.parents) if not folder.exists()]  # innermost first
        check_writable(out, "--out")
        self.stack.callback(remove_empty, created)  # a run that writes nothing leaves no empty folder behind
        lock = out / LOCK_FILE
        in_use = f"{out} is in use by another run (it holds {lock}): wait for it to end, or choose another --out"
        self.stack.enter_context(held_lock(lock, in_use))
        has_run = (out / "metrics.jsonl").is_file() or (out / "last.pt").is_file()
        if self.resume and not (out / "last.pt").is_file():
            raise RunError(f"--resume: {out / 'last.pt'} does not exist; nothing to resume")
        if has_run and not (self.resume or self.overwrite):
            raise RunError(
                f"{out} already holds a run: choose another --out for a new run (another seed or settings), pass "
                "--resume to continue this one, or --overwrite to replace it"
            )
        # a killed save's temporary files: temporary_name's, or a plain <name>.tmp of a run killed while saving
        temporary = rf"({'|'.join(re.escape(name) for name in RUN_FILES)})(\.[0-9a-f]{{12}})?\.tmp"
        entries = list(out.iterdir())
        leftovers = [path for path in entries if re.fullmatch(temporary, path.name)]
        if not has_run and any(path.name not in {*RUN_FILES, LOCK_FILE} and path not in leftovers for path in entries):
            raise RunError(
                f"{out} is not empty and holds no run (no metrics.jsonl or last.pt): its files are left alone; "
                "choose a new or empty folder for --out"
            )
        for path in leftovers:  # ours to remove, since we hold the lock
            path.unlink(missing_ok=True)
        if not self.resume:
            return None
        checkpoint = read_run(out)
        repair_run_folder(out, checkpoint)
        return checkpoint

    def continue_from(self, checkpoint: Mapping[str, Any]) -> None:
        """Where a resumed run stands: its ``last.pt``'s configuration (``resumed_config``), epoch, best and
        records."""
        self.config = resumed_config(checkpoint["config"], self.config, self.given)
        self.first_epoch = checkpoint["epoch"] + 1
        self.best, self.best_epoch, self.records = checkpoint["best"], checkpoint["best_epoch"], checkpoint["records"]
        epochs = self.config.epochs
        if self.first_epoch < epochs:
            echo(f"resuming {self.out} at epoch {self.first_epoch + 1} of {epochs}")
        else:
            echo(f"{self.out} has trained {self.first_epoch} of --epochs {epochs}: nothing left to do (pass a larger "
                 "--epochs to train on)")  # fmt: skip

    def save(self, epoch: int, score: float, record: dict[str, Any], metrics: dict[str, Any], **training: Any) -> None:
        """After ``epoch``: keep its score if it is the best so far, and (rank 0) write ``last.pt``, ``best.pt``
        when it is the best, and ``metrics.jsonl`` (``save_epoch``). ``training``: what ``checkpoint_state``
        stores of the run (``model``, ``optimizer``, ``scheduler``, ``scaler``, ``backbone``)."""
        if score > self.best:
            self.best, self.best_epoch = score, epoch
        self.records = [*self.records, {**record, **metrics}]
        if runtime.RANK != 0:
            return
        if self.overwrite and epoch == self.first_epoch:
            delete_replaced_run(self.out)  # only now: a new run that failed in its first epoch replaced nothing
        state = checkpoint_state(self.config, epoch, self.best, self.best_epoch, metrics, self.records, **training)
        save_epoch(self.out, state)


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders``, innermost first, up to the first that is not empty (or is gone)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def resumed_config(saved: Mapping[str, Any], requested: Config, given: set[str]) -> Config:
    """The saved run's configuration with the options ``--resume`` may change, and the folder it was resumed from
    (a moved run folder carries its old path in ``config["out"]``); options given that conflict are refused."""
    if requested.task != saved["task"]:
        raise RunError(f"--resume: {requested.out} holds a {saved['task']} run, not {requested.task}")
    options = asdict(requested)
    conflicts = [
        f"--{name.replace('_', '-')} {options[name]} (the run has {saved.get(name)})"
        for name in sorted(given - {"out", *RESUME_MAY_CHANGE})
        if options[name] != saved.get(name, options[name])
    ]
    if conflicts:
        raise RunError(
            f"--resume: {', '.join(conflicts)}: a run continues with the options it started with; leave them out, "
            f"or start a new run in another --out (--resume may change {', '.join(RESUME_MAY_CHANGE)})"
        )
    changed = {name: options[name] for name in RESUME_MAY_CHANGE if name in given}
    known = {field.name for field in fields(requested)}
    return type(requested)(**{key: value for key, value in {**saved, "out": requested.out, **changed}.items()
                              if key in known})  # fmt: skip


# --------------------------------------------------------------------------- #
# Writing and repairing it
# --------------------------------------------------------------------------- #


def checkpoint_state(
    config: Any,
    epoch: int,
    best: float,
    best_epoch: int,
    metrics: dict[str, Any],
    records: list[dict[str, Any]],
    *,
    model: STOPModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    backbone: Backbone,
    data: dict[str, Any],
) -> dict[str, Any]:
    """What ``last.pt`` (and ``best.pt``) hold: STOP's parameters alone, never the frozen backbone, with what
    ``--resume`` needs to continue exactly and the run's configuration (``train.TrainConfig``), flat, that
    ``evaluate.py`` reads back (``read_checkpoint``, ``load_trained``)."""
    return {
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
        "config": asdict(config),
        "clip": {"name": backbone.name, "sha256": backbone.sha256},
        "data": data,
    }


def data_identity(train_set: Any, test_set: Any) -> dict[str, Any]:
    """What identifies the data a run trains and is scored on (``data.VideoDataset``s), stored in its checkpoints:
    the class list (recognition; ``None`` for retrieval), the number of videos of each split, and a SHA256 of the
    test set's video file names and targets (labels, captions), which stay the same in a dataset moved elsewhere."""
    digest = hashlib.sha256()
    for path, target in zip(test_set.paths, test_set.targets, strict=True):
        digest.update(json.dumps([Path(path).name, target]).encode())
    return {"classes": test_set.classes, "train_videos": len(train_set), "test_videos": len(test_set),
            "test_items": digest.hexdigest()}  # fmt: skip


def check_same_data(checkpoint: Mapping[str, Any], identity: dict[str, Any], root: str | None) -> None:
    """``--resume``: refuse data other than the run's (another ``--root`` may only hold the same dataset moved), so
    that ``metrics.jsonl`` never mixes two test sets. A checkpoint from before ``data`` was stored is not checked."""
    saved = checkpoint.get("data")
    if not isinstance(saved, dict):
        return
    names = {"classes": "class list", "train_videos": "training videos", "test_videos": "test videos",
             "test_items": "test videos' files and targets"}  # fmt: skip
    changed = [names[key] for key in names if saved.get(key) != identity[key]]
    if changed:
        raise RunError(
            f"--resume: the data in {root or 'the default root'} is not the data the run started on (other "
            f"{', '.join(changed)}): a run trains and is scored on one dataset; resume it on its own data, or start "
            "a new run in another --out"
        )


def delete_replaced_run(out: Path) -> None:
    """``--overwrite``, just before the new run's first ``save_epoch``, which replaces the earlier run's
    ``last.pt``, ``best.pt`` and ``metrics.jsonl``: delete its evaluations (``eval-*.json``), nothing else. Until
    then the earlier run stays whole, so a new run that fails in its first epoch loses nothing."""
    for path in out.glob("eval-*.json"):
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


# --------------------------------------------------------------------------- #
# Reading a checkpoint back
# --------------------------------------------------------------------------- #


def one_of(value: Any, choices: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of ``choices``, of its type too (``1`` is not ``True``)."""
    return any(value is choice or (type(value) is type(choice) and value == choice) for choice in choices)


def text_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


# A checkpoint's run configuration outside STOPConfig (whose own checks cover its fields): each field, when
# present, must be what train.py writes, within the options' bounds (cli.py), before anything is built from it.
CHECKPOINT_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": (lambda value: one_of(value, ("recognize", "retrieve")), "'recognize' or 'retrieve'"),
    "dataset": (lambda value: isinstance(value, str), "a dataset name"),
    "root": (text_or_none, "a path or null"),
    "split_id": (lambda value: is_number(value, 1, 3, integer=True), "an integer in [1, 3]"),
    "clip": (text_or_none, "a CLIP name or path, or null"),
    "frames": (lambda value: is_number(value, 1, cli.MAX_FRAMES, integer=True), f"an integer in [1, {cli.MAX_FRAMES}]"),
    "words": (lambda value: value is None or is_number(value, 3, cli.MAX_WORDS, integer=True),
              f"an integer in [3, {cli.MAX_WORDS}] or null"),
    "batch_size": (lambda value: is_number(value, 1, cli.MAX_BATCH, integer=True),
                   f"an integer in [1, {cli.MAX_BATCH}]"),
    "epochs": (lambda value: is_number(value, 1, integer=True), "an integer >= 1"),
    "lr": (lambda value: is_number(value, 0, cli.MAX_LR), f"a number in [0, {cli.MAX_LR:g}]"),
    "weight_decay": (lambda value: is_number(value, 0), "a finite number >= 0"),
    "warmup": (lambda value: is_number(value, 0, 1), "a number in [0, 1]"),
    "grad_clip": (lambda value: is_number(value, 0), "a finite number >= 0"),
    "workers": (lambda value: is_number(value, 0, integer=True), "an integer >= 0"),
    "device": (lambda value: one_of(value, ("auto", "cpu", "cuda")), "'auto', 'cpu' or 'cuda'"),
    "precision": (lambda value: one_of(value, ("auto", "fp32", "bf16", "fp16")), "'auto', 'fp32', 'bf16' or 'fp16'"),
    "grad_checkpoint": (lambda value: one_of(value, (True, False)), "true or false"),
    "compile": (lambda value: one_of(value, (True, False, None)), "true, false or null"),
    "seed": (lambda value: is_number(value, 0, cli.MAX_SEED, integer=True), f"an integer in [0, {cli.MAX_SEED}]"),
    "strict": (lambda value: one_of(value, (True, False)), "true or false"),
    "out": (lambda value: isinstance(value, str), "a path"),
}  # fmt: skip


def read_checkpoint_and_sha256(path: Path) -> tuple[dict[str, Any], str]:
    """A checkpoint written by ``train.py``, every field of its configuration checked, and the SHA256 of the bytes
    it was read from (what an evaluation records). Anything else is one line naming ``path`` and what is wrong."""
    if path.is_dir():
        raise RunError(f"{path} is a folder, not a checkpoint: give a file in it, such as {path / 'best.pt'}")
    if not path.is_file():
        raise RunError(f"{path}: no such checkpoint")
    payload = path.read_bytes()
    try:
        checkpoint = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception:  # PyTorch's own message advises weights_only=False, which would run the file's code
        raise RunError(f"{path}: cannot be read as a STOP checkpoint (not a file torch.save wrote, or truncated "
                       "or corrupt)") from None  # fmt: skip
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
    for name, (valid, expected) in CHECKPOINT_FIELDS.items():
        if name in config and not valid(config[name]):
            raise ConfigError(f"{path}: its config field {name}={config[name]!r}: expected {expected}")
    for name in ("epoch", "best_epoch"):
        if name in checkpoint and not is_number(checkpoint[name], 0, integer=True):
            raise ConfigError(f"{path}: its field {name}={checkpoint[name]!r}: expected an integer >= 0")
    try:
        STOPConfig.from_dict(config)
    except ConfigError as error:
        raise ConfigError(f"{path}: its config field {error}") from None
    return checkpoint, hashlib.sha256(payload).hexdigest()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``train.py``, checked (``read_checkpoint_and_sha256``)."""
    return read_checkpoint_and_sha256(path)[0]


def check_same_backbone(checkpoint: Mapping[str, Any], backbone: Backbone, path: Path) -> None:
    trained_on = checkpoint["clip"]
    if trained_on["sha256"] != backbone.sha256:
        raise RunError(
            f"{path} was trained on the CLIP {trained_on['name']!r} (SHA256 {trained_on['sha256'][:12]}…), but "
            f"--clip {backbone.name!r} is another one (SHA256 {backbone.sha256[:12]}…): its prompts fit only the "
            "CLIP they were trained with"
        )


def load_trained(
    path: Path,
    clip: str | None,
    device: torch.device,
    precision: str = "fp32",
    checkpoint: Mapping[str, Any] | None = None,
) -> tuple[STOPModel, Backbone, Mapping[str, Any]]:
    """The model a ``train.py`` checkpoint holds, its prompts loaded, on the CLIP it was trained on, with that
    backbone and the checkpoint itself.

    ``clip``: where that CLIP is (``--clip``: the same weights elsewhere, checked by SHA256); ``None``: the name the
    checkpoint records. ``checkpoint``: ``path`` already read by ``read_checkpoint`` (under torchrun rank 0 alone
    reads a run folder, which other machines may not have). The configuration is the checkpoint's flat dict, read
    by ``STOPConfig.from_dict``.
    """
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path)
    backbone = load_backbone(clip or checkpoint["clip"]["name"], trained_on=clip is None)
    check_same_backbone(checkpoint, backbone, path)
    config = checkpoint["config"]
    stop_config = STOPConfig.from_dict(config)
    model = build_model(backbone, stop_config, device, precision, config.get("grad_checkpoint", False))
    model.load_trainable_state_dict(checkpoint["stop"])
    return model, backbone, checkpoint
