"""Nothing lost, nothing half-written, no traceback: run folders, --resume, --overwrite, errors from the loaders.

The runs here train on a UCF101 layout of 16 synthetic clips (one per class for training, one for testing) with
the 32-px golden CLIP: a step or two an epoch, so a test can afford several runs, kills and resumes.
"""

import builtins
import errno
import inspect
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import data
import evaluate
import prepare
import synthetic as synthetic_command
import train
from loading import dataset_files, protocols
from plumbing import cli, runs, runtime

runner = CliRunner()


def run(app, *args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout + result.stderr


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def train_tiny(root: Path, clip: Path, out: Path, *extra) -> tuple[int, str]:
    """Two epochs of one step each (batch 8), on one process without workers unless ``extra`` says otherwise."""
    options = ["--dataset", "ucf101", "--root", root, "--clip", clip, "--out", out, "--frames", 4]
    return run(train.app, "recognize", *options, "--batch-size", 8, "--workers", 0, "--epochs", 2, *extra)


def stop_tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["stop"]


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def records(out: Path) -> list[dict]:
    """metrics.jsonl without the timing, which differs from run to run."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train_clips_per_second"} for line in lines]


# --------------------------------------------------------------------------- #
# 1. Nothing deleted that the program did not create
# --------------------------------------------------------------------------- #


def test_synthetic_root_holding_other_files_is_refused_and_kept(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "thesis.txt").write_text("x\n")
    code, output = run(synthetic_command.app, "--root", root)
    assert code == 1 and len(error_lines(output)) == 1 and str(root) in output, output
    code, output = run(train.app, "recognize", "--dataset", "synthetic", "--root", root, "--out", tmp_path / "run")
    assert code == 1 and "holds no synthetic dataset" in output, output
    assert (root / "thesis.txt").read_text() == "x\n"
    assert sorted(p.name for p in root.iterdir()) == ["thesis.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no scratch folder left


def test_overwrite_replaces_a_run_and_nothing_else(tiny_root, golden_clip, tmp_path, monkeypatch):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("x\n")
    code, output = train_tiny(tiny_root, golden_clip, notes, "--overwrite")
    assert code == 1 and len(error_lines(output)) == 1 and "holds no run" in output, output
    assert sorted(p.name for p in notes.iterdir()) == ["thesis.txt"]

    run_folder = tmp_path / "run"
    run_folder.mkdir()
    old_run = {
        "metrics.jsonl": b'{"epoch": 1, "top1": 99.0}\n{"epoch": 2, "top1": 99.0}\n',
        "last.pt": b"old last",
        "best.pt": b"old best",
        "eval-recognize-ucf101.json": b"{}",  # an evaluation of the run being replaced
    }
    for name, content in old_run.items():
        (run_folder / name).write_bytes(content)
    (run_folder / "plot.png").write_bytes(b"mine")

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # the new run dies in its first epoch: the old one is still whole
        patch.setattr(train, "evaluate_recognition", interrupted)
        code, output = train_tiny(tiny_root, golden_clip, run_folder, "--overwrite", "--epochs", 1)
    assert code == 130, output
    assert all((run_folder / name).read_bytes() == content for name, content in old_run.items())

    code, output = train_tiny(tiny_root, golden_clip, run_folder, "--overwrite", "--epochs", 1)
    assert code == 0, output
    assert [r["epoch"] for r in records(run_folder)] == [1] and records(run_folder)[0]["top1"] != 99.0
    assert sorted(p.name for p in run_folder.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl", "plot.png"]
    assert torch.load(run_folder / "best.pt", weights_only=True)["epoch"] == 0

    # Replaced again (another seed), killed between the new last.pt and best.pt: the old best.pt is also from
    # epoch 1, and --resume must still see that it belongs to the replaced run.
    saves, real_save = [], runs.atomic_save

    def dying_at_best_pt(obj, path):
        saves.append(path.name)
        if path.name == "best.pt":
            raise KeyboardInterrupt
        real_save(obj, path)

    with monkeypatch.context() as patch:
        patch.setattr(runs, "atomic_save", dying_at_best_pt)
        code, output = train_tiny(tiny_root, golden_clip, run_folder, "--overwrite", "--epochs", 1, "--seed", 1)
    assert code == 130 and saves == ["last.pt", "best.pt"], output
    assert not same_tensors(stop_tensors(run_folder / "best.pt"), stop_tensors(run_folder / "last.pt"))
    code, output = train_tiny(tiny_root, golden_clip, run_folder, "--resume", "--epochs", 1, "--seed", 1)
    assert code == 0 and "nothing left to do" in output, output
    assert same_tensors(stop_tensors(run_folder / "best.pt"), stop_tensors(run_folder / "last.pt"))


# --------------------------------------------------------------------------- #
# 2 and 9. --resume: exact with worker processes, in the folder it was resumed from, conflicting options refused
# --------------------------------------------------------------------------- #


def test_resume_with_workers_is_exact_and_refuses_conflicting_options(tiny_root, golden_clip, tmp_path, monkeypatch):
    """A run killed in epoch 2 and resumed, both with two worker processes, ends as one run without any: a clip's
    random draws depend on (seed, epoch, clip) only, not on the worker or what it drew in earlier epochs."""
    two_workers = ("--workers", 2, "--batch-size", 4)  # two steps an epoch, one batch per worker
    straight = tmp_path / "straight"
    code, output = train_tiny(tiny_root, golden_clip, straight, "--batch-size", 4)
    assert code == 0, output

    killed, moved = tmp_path / "killed", tmp_path / "moved"
    evaluations = []

    def interrupt_at_second_evaluation(*args):
        evaluations.append(args)
        if len(evaluations) == 2:
            raise KeyboardInterrupt  # Ctrl-C in epoch 2's evaluation: the workers' epoch-2 draws are lost
        return evaluate.evaluate_recognition(*args)

    with monkeypatch.context() as patch:
        patch.setattr(train, "evaluate_recognition", interrupt_at_second_evaluation)
        code, output = train_tiny(tiny_root, golden_clip, killed, *two_workers)
    assert code == 130, output
    shutil.move(killed, moved)  # the saved configuration still names `killed`
    code, output = train_tiny(tiny_root, golden_clip, moved, *two_workers, "--resume")
    assert code == 0 and "resuming" in output, output
    assert not killed.exists()
    assert same_tensors(stop_tensors(moved / "last.pt"), stop_tensors(straight / "last.pt"))
    assert records(moved) == records(straight)

    # The run is finished: resuming it trains nothing and says so, never "resuming at epoch 3 of 2".
    before = (moved / "last.pt").read_bytes()
    code, output = train_tiny(tiny_root, golden_clip, moved, *two_workers, "--resume", "--workers", 1)
    assert code == 0 and "nothing left to do" in output and "resuming" not in output, output
    code, output = train_tiny(tiny_root, golden_clip, moved, *two_workers, "--resume", "--batch-size", 2, "--lr", 0.5)
    assert code == 1 and len(error_lines(output)) == 1, output
    assert "--batch-size 2 (the run has 4)" in output and "--lr 0.5 (the run has 0.001)" in output
    code, output = run(train.app, "retrieve", "--out", moved, "--resume")
    assert code == 1 and "holds a recognize run" in output, output
    code, output = train_tiny(tiny_root, golden_clip, moved, "--resume", "--overwrite")
    assert code == 1 and "pass one of them" in output, output
    assert (moved / "last.pt").read_bytes() == before


# --------------------------------------------------------------------------- #
# 3. Every kill point while saving an epoch leaves last.pt, best.pt and metrics.jsonl consistent after --resume
# --------------------------------------------------------------------------- #


class Killed(KeyboardInterrupt):
    """Raised in place of the n-th save: the process dies there (the save itself never starts)."""


def test_a_kill_at_any_save_is_repaired_by_resume(tiny_root, golden_clip, tmp_path, monkeypatch):
    epochs_started = []
    set_epoch = data.VideoLoader.set_epoch

    def record_epoch(loader, epoch):
        epochs_started.append(epoch)
        set_epoch(loader, epoch)

    def improving_scores(*args):
        """Every epoch beats the one before, so every epoch writes best.pt (the real scores may tie)."""
        return {"top1": 10.0 * (epochs_started[-1] + 1), "top5": 100.0}

    monkeypatch.setattr(data.VideoLoader, "set_epoch", record_epoch)
    monkeypatch.setattr(train, "evaluate_recognition", improving_scores)
    straight = tmp_path / "straight"
    assert train_tiny(tiny_root, golden_clip, straight)[0] == 0
    saves = []
    real_save = runs.atomic_save

    # Epoch 2's saves are the 4th (last.pt), 5th (best.pt) and 6th (metrics.jsonl): die at each in turn.
    for kill_at in (4, 5, 6):
        out = tmp_path / f"killed-at-{kill_at}"

        def dying_save(obj, path, kill_at=kill_at):
            saves.append(path.name)
            if len(saves) == kill_at:
                raise Killed
            real_save(obj, path)

        saves.clear()
        with monkeypatch.context() as patch:
            patch.setattr(runs, "atomic_save", dying_save)
            code, output = train_tiny(tiny_root, golden_clip, out)
        assert code == 130 and saves[3:] == ["last.pt", "best.pt", "metrics.jsonl"][: kill_at - 3], (kill_at, saves)
        code, output = train_tiny(tiny_root, golden_clip, out, "--resume")
        assert code == 0, (kill_at, output)
        assert records(out) == records(straight), kill_at
        assert [r["top1"] for r in records(out)] == [10.0, 20.0]
        best = torch.load(out / "best.pt", weights_only=True)
        assert best["epoch"] == 1 and best["best"] == 20.0, kill_at
        assert same_tensors(best["stop"], stop_tensors(straight / "best.pt")), kill_at
        assert same_tensors(stop_tensors(out / "last.pt"), stop_tensors(straight / "last.pt")), kill_at
        assert not any(p.suffix == ".tmp" for p in out.iterdir())


# --------------------------------------------------------------------------- #
# 8. A diverging run stops with one line and keeps its last good checkpoint
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("prompt", ["static", "stop"])
def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tiny_root, golden_clip, tmp_path, prompt):
    """``static`` reaches the loss at once; ``stop``, the default, meets NaN first in ``n_t = ceil(eta W^t)`` and
    in the prompt mask, which must carry it to the loss too."""
    out = tmp_path / "run"
    code, output = train_tiny(tiny_root, golden_clip, out, "--lr", 1e12, "--prompt", prompt, "--epochs", 3)
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    finished = len(records(out)) if (out / "metrics.jsonl").exists() else 0
    assert f"loss is not finite at epoch {finished + 1}, step " in line
    if finished:
        assert f"last good checkpoint: {out / 'last.pt'} (epoch {finished})" in line
        saved = torch.load(out / "last.pt", weights_only=True)
        assert saved["epoch"] + 1 == finished and all(t.isfinite().all() for t in saved["stop"].values())
    else:
        assert "last good checkpoint: none" in line and not (out / "last.pt").exists()


# --------------------------------------------------------------------------- #
# 4. An error in a DataLoader worker is the same one line as without workers
# --------------------------------------------------------------------------- #


def test_data_errors_survive_pickling(tmp_path):
    broken = dataset_files.BrokenVideoError(tmp_path / "a.avi", "no decodable frames")
    copy = pickle.loads(pickle.dumps(broken))
    assert type(copy) is dataset_files.BrokenVideoError and str(copy) == str(broken)
    assert (copy.path, copy.reason) == (broken.path, broken.reason)
    assert str(pickle.loads(pickle.dumps(data.DataError("bad\nlayout")))) == "bad\nlayout"


def test_strict_error_in_a_worker_is_one_line(tiny_root, golden_clip, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(tiny_root, root)
    victim = root / "UCF-101" / "MovingUp" / "v_MovingUp_g01_c01.avi"  # the third test video
    victim.write_bytes(b"not a video")
    lines = {}
    for workers in (0, 2):
        code, output = run(
            evaluate.app, "recognize", "--dataset", "ucf101", "--root", root, "--clip", golden_clip,
            "--frames", 2, "--batch-size", 2, "--workers", workers, "--strict", "--out", tmp_path / "e.json",
        )  # fmt: skip
        assert code == 1 and "Traceback" not in output and "Caught" not in output, output
        (lines[workers],) = error_lines(output)
    assert lines[0] == lines[2] and lines[0].startswith(f"error: cannot decode video {victim}")


# --------------------------------------------------------------------------- #
# 5. File-system errors: one line naming the path, found before any work, nothing half-written
# --------------------------------------------------------------------------- #


def test_unwritable_outputs_are_refused_before_any_work(tiny_root, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x\n")
    for out, expected in ((a_file, "is a file"), (a_file / "run", f"cannot write in {a_file / 'run'}")):
        code, output = train_tiny(tiny_root, "no-such-clip", out)  # would fail later, loading the CLIP
        assert code == 1 and len(error_lines(output)) == 1 and expected in output, output
    evaluate_options = ("recognize", "--dataset", "ucf101", "--root", tiny_root, "--clip", "no-such-clip")
    folder = tmp_path / "folder"
    folder.mkdir()
    for out, expected in ((folder, "is a folder"), (a_file / "e.json", f"cannot write in {a_file}")):
        code, output = run(evaluate.app, *evaluate_options, "--out", out)
        assert code == 1 and len(error_lines(output)) == 1 and expected in output, output
    assert list(folder.iterdir()) == [] and not (tmp_path / "folder.tmp").exists()
    for app, command in (
        (synthetic_command.app, ("--root", a_file / "synthetic")),
        (prepare.app, ("--dataset", "ucf101", "--root", tiny_root, "--out", a_file / "prepared")),
    ):
        code, output = run(app, *command)
        assert code == 1 and len(error_lines(output)) == 1 and str(a_file) in output, output
        assert "Traceback" not in output


@pytest.fixture
def read_only(tmp_path) -> Iterator[Path]:
    """A folder this process may not write in: one made read-only, or ``/sys`` for root, whom no permission bit
    stops (sysfs refuses new entries to everyone)."""
    if os.geteuid() == 0:
        yield Path("/sys")
        return
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    yield folder
    folder.chmod(0o700)


def test_read_only_outputs_are_refused(tiny_root, read_only):
    code, output = train_tiny(tiny_root, "no-such-clip", read_only / "run")
    assert code == 1 and "--out: cannot write in" in output, output
    code, output = run(synthetic_command.app, "--root", read_only / "synthetic")
    assert code == 1 and str(read_only) in output and "Traceback" not in output, output


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "result.json"
    target.mkdir()
    (target / "inside").write_text("x")  # os.replace cannot put a file over a non-empty folder
    with pytest.raises(OSError):
        runs.atomic_save("{}\n", target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


# --------------------------------------------------------------------------- #
# 13 and 16. evaluate's options; no pointer to a file the project does not have
# --------------------------------------------------------------------------- #


def test_evaluate_refuses_bad_frames_and_prompt_with_checkpoint(tmp_path):
    for frames in (0, -2):
        code, output = run(evaluate.app, "recognize", "--frames", frames)
        assert code == 2 and "Invalid value for '--frames'" in output, output
    code, output = run(evaluate.app, "recognize", "--checkpoint", tmp_path / "best.pt", "--prompt", "stop")
    assert code == 1 and error_lines(output) and "leave --prompt out" in output, output


def test_help_and_docstrings_point_at_files_the_project_has():
    """No file sends a reader outside the repository (a user's clone has no ../shared), and every docs/ page that a
    file names exists."""
    code, output = run(prepare.app, "--help")
    assert code == 0 and "docs/datasets.md" in " ".join(output.split())
    project = Path(__file__).resolve().parent.parent
    files = [*project.glob("*.py"), *project.glob("*.md"), *project.glob("docs/*.md"), *project.glob("tests/*.py")]
    for path in files:
        text = path.read_text() if path.name != "test_run_safety.py" else ""  # this test names what it looks for
        assert "../shared" not in text and "STOP_SPEC" not in text and "DATASETS.md" not in text, path
        for page in re.findall(r"docs/[\w-]+\.(?:md|png)", text):
            assert (project / page).is_file(), (path, page)


# --------------------------------------------------------------------------- #
# Issue 20, item 1. Two runs on one --out: the second is refused at once; nothing is left behind
# --------------------------------------------------------------------------- #

PROJECT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_run_folder_in_use_is_refused_at_once(tiny_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    code, output = train_tiny(tiny_root, golden_clip, out, "--epochs", 1)
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]  # no run.lock left
    before = snapshot(out)
    with runs.locked(out):  # another process's run, still going
        for extra in (("--resume", "--epochs", 2), ("--overwrite",)):
            code, output = train_tiny(tiny_root, golden_clip, out, *extra)
            assert code == 1 and "Traceback" not in output, output
            (line,) = error_lines(output)
            assert f"{out} is in use by another run" in line
        assert snapshot(out) == {**before, runs.LOCK_FILE: b""}  # the other run's lock file is still there

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with runs.locked(fresh):  # a new run that has not written anything yet
        code, output = train_tiny(tiny_root, golden_clip, fresh)
        assert code == 1 and len(error_lines(output)) == 1 and f"{fresh} is in use" in output, output
        assert sorted(p.name for p in fresh.iterdir()) == [runs.LOCK_FILE]

    # A run that fails before its first save removes the folders it created for --out, and only those.
    code, output = train_tiny(tiny_root, "no-such-clip", tmp_path / "new" / "run")
    assert code == 1 and len(error_lines(output)) == 1, output
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    code, output = train_tiny(tiny_root, "no-such-clip", kept)
    assert code == 1 and kept.is_dir() and list(kept.iterdir()) == [], output


def test_two_runs_started_together_on_one_folder(tiny_root, golden_clip, tmp_path):
    """Two real processes on one --out at the same time: one trains, the other says in one line that the folder is
    taken (by the lock, or, had the first already finished, by its run) and writes nothing."""
    out = tmp_path / "run"
    command = [
        sys.executable, "train.py", "recognize", "--dataset", "ucf101", "--root", str(tiny_root), "--clip",
        str(golden_clip), "--out", str(out), "--frames", "4", "--batch-size", "8", "--workers", "0", "--epochs", "3",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    processes = []
    for log in logs:
        with open(log, "wb") as sink:
            processes.append(subprocess.Popen(command, cwd=PROJECT, env=environment, stdout=sink, stderr=sink))
    try:
        codes = [process.wait(timeout=600) for process in processes]
    finally:
        for process in processes:
            process.kill()
    outputs = [log.read_text() for log in logs]
    assert sorted(codes) == [0, 1], outputs
    refused = outputs[codes.index(1)]
    (line,) = [line for line in refused.splitlines() if line.strip()]
    assert line.startswith("error: ") and str(out) in line, refused
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
    assert [r["epoch"] for r in records(out)] == [1, 2, 3]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


# --------------------------------------------------------------------------- #
# Issue 20, item 3. --overwrite deletes only its own files
# --------------------------------------------------------------------------- #


def test_overwrite_keeps_the_users_tmp_files(tiny_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    assert train_tiny(tiny_root, golden_clip, out, "--epochs", 1)[0] == 0
    mine = {"notes.tmp": b"my notes\n", "data.tmp": b"\x00\x01"}
    for name, content in {**mine, "eval-recognize-ucf101.json": b"{}", "eval-retrieve-msrvtt.json": b"{}"}.items():
        (out / name).write_bytes(content)
    code, output = train_tiny(tiny_root, golden_clip, out, "--overwrite", "--epochs", 1, "--seed", 1)
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == sorted(["best.pt", "last.pt", "metrics.jsonl", *mine])
    assert all((out / name).read_bytes() == content for name, content in mine.items())
    code, output = train_tiny(tiny_root, golden_clip, out, "--resume", "--epochs", 1)
    assert code == 0 and all((out / name).read_bytes() == content for name, content in mine.items()), output


# --------------------------------------------------------------------------- #
# Issue 20, item 5. A full disk while saving: one line naming the file, no .tmp, --resume repairs
# --------------------------------------------------------------------------- #


class FullDisk:
    """A file on a disk that fills up: half of what is written lands, then write(2) fails, naming no file."""

    def __init__(self, file):
        self.file = file

    def write(self, payload: bytes) -> int:
        self.file.write(payload[: len(payload) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "FullDisk":
        return self

    def __exit__(self, *exception) -> None:
        self.close()


def test_a_full_disk_while_saving_is_one_line_and_resume_repairs(tiny_root, golden_clip, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_open, temporary_files = builtins.open, []

    def disk_full_after_the_first_save(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, str | os.PathLike) and Path(file).parent == out and str(file).endswith(".tmp"):
            temporary_files.append(Path(file).name)
            if len(temporary_files) > 1:  # epoch 1's last.pt lands, its best.pt does not
                return FullDisk(handle)
        return handle

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", disk_full_after_the_first_save)
        code, output = train_tiny(tiny_root, golden_clip, out)
    assert code == 1 and "Traceback" not in output and temporary_files == ["last.pt.tmp", "best.pt.tmp"], output
    (line,) = error_lines(output)
    assert line == f"error: {out / 'best.pt'}: {os.strerror(errno.ENOSPC)}"
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]  # no best.pt.tmp, no run.lock
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["epoch"] == 0

    code, output = train_tiny(tiny_root, golden_clip, out, "--resume")  # space is back
    assert code == 0 and "resuming" in output, output
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
    without_timing = {k: v for k, v in saved["records"][0].items() if k != "train_clips_per_second"}
    assert [r["epoch"] for r in records(out)] == [1, 2] and records(out)[0] == without_timing
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and torch.load(out / "best.pt", weights_only=True)["epoch"] == last["best_epoch"]


# --------------------------------------------------------------------------- #
# Issue 20, item 6. SIGTERM: a stale temporary file blocks nothing; a killed run exits 130, its folder consistent
# --------------------------------------------------------------------------- #


def test_a_stale_temporary_file_blocks_nothing(tiny_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt.tmp").write_bytes(b"PK\x03\x04" + bytes(100))  # a kill during the first save
    code, output = train_tiny(tiny_root, golden_clip, out)
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]

    partial = (out / "last.pt").read_bytes()[:1000]  # a kill during a later save
    (out / "last.pt.tmp").write_bytes(partial)
    code, output = train_tiny(tiny_root, golden_clip, out, "--resume", "--epochs", 3)
    assert code == 0 and "resuming" in output, output
    assert [r["epoch"] for r in records(out)] == [1, 2, 3] and not (out / "last.pt.tmp").exists()

    (out / "last.pt.tmp").write_bytes(partial)
    code, output = train_tiny(tiny_root, golden_clip, out, "--overwrite", "--epochs", 1)
    assert code == 0 and [r["epoch"] for r in records(out)] == [1], output
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]


def test_sigterm_mid_run_exits_130_and_leaves_the_folder_consistent(tiny_root, golden_clip, tmp_path):
    out, log = tmp_path / "run", tmp_path / "train.log"
    command = [
        sys.executable, "train.py", "recognize", "--dataset", "ucf101", "--root", str(tiny_root), "--clip",
        str(golden_clip), "--out", str(out), "--frames", "4", "--batch-size", "8", "--workers", "0",
        "--epochs", "100000",
    ]  # fmt: skip
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command, cwd=PROJECT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=sink, stderr=sink
        )
    try:
        while process.poll() is None and not (out / "last.pt").exists():  # the first epoch is saved: mid-run
            time.sleep(0.05)
        assert process.poll() is None, log.read_text()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=300)
    finally:
        process.kill()
    output = log.read_text()
    assert code == 130 and "Traceback" not in output, output
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    assert lines[-1] == "interrupted" and lines.count("interrupted") == 1, output
    names = sorted(p.name for p in out.iterdir())
    assert names in (["best.pt", "last.pt", "metrics.jsonl"], ["best.pt", "last.pt"], ["last.pt"]), names
    last = torch.load(out / "last.pt", weights_only=True)
    assert [r["epoch"] for r in last["records"]] == list(range(1, last["epoch"] + 2))
    code, output = train_tiny(tiny_root, golden_clip, out, "--resume", "--epochs", last["epoch"] + 2)
    assert code == 0 and [r["epoch"] for r in records(out)] == list(range(1, last["epoch"] + 3)), output


# --------------------------------------------------------------------------- #
# Issue 20, item 9. --lr 0 is honoured; a default fills in only an option not given
# --------------------------------------------------------------------------- #


def test_lr_zero_is_honoured(tiny_root, golden_clip, tmp_path, monkeypatch):
    initial, build_run = {}, train.build_run

    def remembering_the_initial_prompts(config, checkpoint):
        built = build_run(config, checkpoint)
        initial.update({k: v.detach().clone() for k, v in built.model.trainable_state_dict().items()})
        return built

    monkeypatch.setattr(train, "build_run", remembering_the_initial_prompts)
    out = tmp_path / "run"
    code, output = train_tiny(tiny_root, golden_clip, out, "--lr", 0, "--epochs", 1)
    assert code == 0, output
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["config"]["lr"] == 0.0 and saved["config"]["epochs"] == 1
    assert initial and same_tensors(saved["stop"], initial)  # AdamW's step, weight decay included, is lr times


def test_run_config_fills_in_only_the_options_not_given(monkeypatch):
    parameters = inspect.signature(cli.train_options).parameters
    options = {name: p.default for name, p in parameters.items() if name not in ("resume", "overwrite")}
    none_default = sorted(name for name, value in options.items() if value is None)
    defaults_of_the_dataset = ["frames", "words", "batch_size", "epochs", "lr"]
    assert none_default == sorted(["root", "clip", *defaults_of_the_dataset, "workers", "compile", "out"])
    monkeypatch.setattr(dataset_files, "available_cores", lambda: 3)
    options["dataset"] = "ucf101"
    config = train.run_config("recognize", options)
    expected = {"root": None, "clip": None, "frames": 8, "words": None, "batch_size": 32, "epochs": 10, "lr": 1e-3,
                "workers": 3, "out": str(Path("runs") / "recognize-ucf101-stop")}  # fmt: skip
    assert {name: getattr(config, name) for name in expected} == expected  # the spec's defaults, README's table
    for name, falsy in {"frames": 0, "words": 0, "batch_size": 0, "epochs": 0, "lr": 0.0, "workers": 0}.items():
        assert getattr(train.run_config("recognize", {**options, name: falsy}), name) == falsy, name
    assert train.run_config("recognize", {**options, "clip": ""}).clip == ""


# --------------------------------------------------------------------------- #
# Issue 20, item 10. A malformed checkpoint or last.pt is one error line, never a traceback
# --------------------------------------------------------------------------- #


def test_malformed_checkpoints_are_one_line(golden, golden_clip, tiny_root, tmp_path):
    good = torch.load(golden / "stop_checkpoint_recognize.pt", weights_only=True)  # what train.py writes
    malformed = {
        "alpha": ({**good, "config": {**good["config"], "alpha": "0.5"}}, "alpha='0.5'"),
        "rho": ({**good, "config": {**good["config"], "rho": [0.1]}}, "rho=[0.1]"),
        "stop": ({**good, "stop": []}, "expected a dict of tensors, got list"),
        # Linear(64, 10**9) would be 256 GB: refused before anything is allocated
        "reduced_dim": ({**good, "config": {**good["config"], "reduced_dim": 10**9}}, "reduced_dim=1000000000"),
    }
    for name, (checkpoint, expected) in malformed.items():
        path = tmp_path / f"{name}.pt"
        torch.save(checkpoint, path)
        code, output = run(
            evaluate.app, "recognize", "--dataset", "ucf101", "--root", tiny_root, "--checkpoint", path,
            "--clip", golden_clip, "--workers", 0, "--out", tmp_path / f"{name}.json",
        )  # fmt: skip
        assert code == 1 and "Traceback" not in output, (name, output)
        (line,) = error_lines(output)
        assert expected in line and "allocate" not in line, (name, line)
        assert not (tmp_path / f"{name}.json").exists()


def test_last_pt_without_its_task_is_one_line(tiny_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    assert train_tiny(tiny_root, golden_clip, out, "--epochs", 1)[0] == 0
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    del checkpoint["config"]["task"]
    torch.save(checkpoint, out / "last.pt")
    before = snapshot(out)
    code, output = train_tiny(tiny_root, golden_clip, out, "--resume")
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    assert f"{out / 'last.pt'} cannot be resumed: it lacks config['task']" in line
    assert snapshot(out) == before


# --------------------------------------------------------------------------- #
# Issue 20, low items
# --------------------------------------------------------------------------- #


def test_non_finite_hyper_parameters_are_refused_up_front(tiny_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    for option, value, named in (("--beta", "inf", "beta=inf"), ("--lr", "nan", "--lr nan")):
        code, output = train_tiny(tiny_root, golden_clip, out, option, value)
        assert code == 1 and "Try a lower" not in output, output
        (line,) = error_lines(output)
        assert named in line and not out.exists(), line


def test_a_seed_out_of_range_is_a_usage_error(tiny_root, golden_clip, tmp_path):
    code, output = train_tiny(tiny_root, golden_clip, tmp_path / "run", "--seed", 99999999999999999999)
    assert code == 2 and "Invalid value for '--seed'" in output, output
    assert not (tmp_path / "run").exists()


def test_an_offline_clip_download_leaves_no_run_folder(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing downloaded yet

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "runs" / "recognize-ucf101-stop"  # the default --out, whose runs/ does not exist yet
    code, output = train_tiny(tiny_root, "ViT-B/32", out)
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    assert "could not download" in line
    assert not (tmp_path / "runs").exists()


def test_evaluate_refuses_a_checkpoint_of_the_other_task(golden, golden_clip, tmp_path):
    checkpoint = golden / "stop_checkpoint_recognize.pt"
    code, output = run(
        evaluate.app, "retrieve", "--dataset", "msrvtt", "--root", tmp_path, "--checkpoint", checkpoint, "--clip",
        golden_clip, "--out", tmp_path / "e.json",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    assert f"{checkpoint} is a recognize checkpoint" in line and not (tmp_path / "e.json").exists()


def test_a_demo_clip_checkpoint_is_evaluated_on_its_own_clip(tiny_root, tmp_path):
    out = tmp_path / "run"
    options = ("--dataset", "ucf101", "--root", tiny_root, "--frames", 2, "--batch-size", 8, "--workers", 0)
    code, output = run(train.app, "recognize", *options, "--epochs", 1, "--out", out)  # no --clip: the demo CLIP
    assert code == 0 and "randomly initialised" in output, output
    code, output = run(evaluate.app, "recognize", *options, "--checkpoint", out / "best.pt")
    assert code == 0 and "randomly initialised" not in output, output
    assert "CLIP: the checkpoint's, the small demo ViT-CLIP it was trained on" in output
    assert json.loads((out / "eval-recognize-ucf101.json").read_text())["clip"] == runtime.DEMO_CLIP_NAME


def test_each_command_has_its_own_task_options():
    wide = {"COLUMNS": "300"}  # one option a line: nothing wrapped or cut
    output = runner.invoke(train.app, ["recognize", "--help"], env=wide).stdout
    assert "<ucf101|hmdb51|ssv2|kinetics400|synthetic>" in output, output
    assert not [name for name in protocols.RETRIEVAL_DATASETS if name in output]
    output = runner.invoke(evaluate.app, ["retrieve", "--help"], env=wide).stdout
    assert "--words" in output and "<msrvtt|" in output, output
    assert not [option for option in ("--views", "--crops", "--split-id") if option in output]


def test_default_workers_fit_the_machine(monkeypatch):
    assert runtime.default_workers() <= dataset_files.available_cores()
    for cores in (1, 2, 64):
        monkeypatch.setattr(dataset_files, "available_cores", lambda cores=cores: cores)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert runtime.default_workers() == min(8, cores)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes on this machine share its cores
        assert 2 * runtime.default_workers() <= cores
