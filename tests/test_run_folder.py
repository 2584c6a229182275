"""A run folder has one owner and survives being stopped: ``--overwrite`` replaces a run and nothing else,
``--resume`` continues exactly where a run stopped, a second run on the folder is refused at once, a kill, a full disk
or a SIGTERM while saving leaves a folder that ``--resume`` completes, and a diverging run keeps its last good
checkpoint.

The runs here train on ``tiny_root`` (16 synthetic clips in a UCF101 layout: one per class for training, one for
testing) with the 32-px golden CLIP: a step or two an epoch, so a test can afford several runs, kills and resumes.
"""

import builtins
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT, error_lines, records, run, same_tensors, snapshot, stop_tensors, train_tiny

import data
import evaluate
import train
from plumbing import runs

# --------------------------------------------------------------------------- #
# --overwrite replaces a run and nothing else
# --------------------------------------------------------------------------- #


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
# --resume: exact with worker processes, in the folder it was moved to; conflicting options refused
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
# One run a folder: a second one is refused at once and leaves nothing behind
# --------------------------------------------------------------------------- #


def test_a_run_folder_in_use_is_refused_at_once(tiny_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    code, output = train_tiny(tiny_root, golden_clip, out, "--epochs", 1)
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]  # no run.lock left
    before = snapshot(out)
    with runs.held_lock(out / runs.LOCK_FILE, "held"):  # another process's run, still going
        for extra in (("--resume", "--epochs", 2), ("--overwrite",)):
            code, output = train_tiny(tiny_root, golden_clip, out, *extra)
            assert code == 1 and "Traceback" not in output, output
            (line,) = error_lines(output)
            assert f"{out} is in use by another run" in line
        assert snapshot(out) == {**before, runs.LOCK_FILE: b""}  # the other run's lock file is still there

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with runs.held_lock(fresh / runs.LOCK_FILE, "held"):  # a new run that has not written anything yet
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
# A kill at any save leaves last.pt, best.pt and metrics.jsonl consistent after --resume
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


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "result.json"
    target.mkdir()
    (target / "inside").write_text("x")  # os.replace cannot put a file over a non-empty folder
    with pytest.raises(OSError):
        runs.atomic_save("{}\n", target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


# --------------------------------------------------------------------------- #
# A full disk while saving: one line naming the file, no .tmp, --resume repairs
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
    written = [re.sub(r"\.[0-9a-f]{12}\.tmp$", ".tmp", name) for name in temporary_files]  # names made unique
    assert code == 1 and "Traceback" not in output and written == ["last.pt.tmp", "best.pt.tmp"], output
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
# SIGTERM: a stale temporary file blocks nothing; a killed run exits 130, its folder consistent
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
# A diverging run stops with one line and keeps its last good checkpoint
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("prompt", ["static", "stop"])
def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(
    tiny_root, golden_clip, tmp_path, prompt, monkeypatch
):
    """``static`` reaches the loss at once; ``stop``, the default, meets NaN first in ``n_t = ceil(eta W^t)`` and
    in the prompt mask, which must carry it to the loss too. The learning rate explodes after the first step (the
    options refuse a rate that large)."""
    monkeypatch.setattr(train, "lr_factor", lambda step, total_steps, warmup_steps: 1.0 if step == 0 else 1e14)
    out = tmp_path / "run"
    code, output = train_tiny(tiny_root, golden_clip, out, "--lr", 1e-2, "--prompt", prompt, "--epochs", 3)
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    finished = len(records(out)) if (out / "metrics.jsonl").exists() else 0
    assert f"epoch {finished + 1}" in line and "not finite" in line, line
    if finished:
        assert f"last good checkpoint: {out / 'last.pt'} (epoch {finished})" in line
        saved = torch.load(out / "last.pt", weights_only=True)
        assert saved["epoch"] + 1 == finished and all(t.isfinite().all() for t in saved["stop"].values())
    else:
        assert "last good checkpoint: none" in line and not (out / "last.pt").exists()
