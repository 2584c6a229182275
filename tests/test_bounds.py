"""Every option and checkpoint field is checked before anything is allocated, with one line naming it; --resume
continues only on the run's own data; run.lock is never followed through a link."""

import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import error_lines, run, train_tiny

import data
import evaluate
import train
from loading.protocols import PROTOCOLS
from plumbing import runtime


@pytest.mark.parametrize(
    "option, value",
    [("--frames", 1000000), ("--eta", 10**9), ("--words", 1000), ("--batch-size", 10**6), ("--lr", 1e38),
     ("--lr", "inf"), ("--seed", 2**32)],
)  # fmt: skip
def test_absurd_options_are_refused_by_name(option, value, tmp_path):
    task = "retrieve" if option == "--words" else "recognize"
    code, output = run(train.app, task, option, value, "--out", tmp_path / "run")
    assert code == 2 and f"Invalid value for '{option}'" in output and "Traceback" not in output, output
    assert not (tmp_path / "run").exists()


def test_an_impossible_batch_is_refused_before_it_is_allocated(tiny_root, golden_clip, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.os, "sysconf", lambda name: 2**9)  # a machine of 512 pages of 512 bytes: 256 KiB

    def never(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(data, "build_dataset", never)
    code, output = train_one_epoch(tiny_root, golden_clip, tmp_path / "run")
    assert code == 1, output
    (line,) = error_lines(output)
    # 8 clips of 4 frames of 3 x 32 x 32 float32 pixels alone are 384 KiB, 0.375 MiB
    assert "--frames 4" in line and "more than the 0.2 MiB here" in line, line
    needed = float(line.split("needs at least ")[1].split(" MiB")[0])
    assert needed > 0.375, line
    code, output = run(evaluate.app, "recognize", "--dataset", "ucf101", "--root", tiny_root, "--clip", golden_clip,
                       "--frames", 4, "--batch-size", 8, "--out", tmp_path / "e.json")  # fmt: skip
    assert code == 1 and "--frames 4" in output and not (tmp_path / "e.json").exists(), output


@pytest.fixture(scope="module")
def checkpoint(tiny_root, tmp_path_factory, golden) -> Path:
    out = tmp_path_factory.mktemp("fields") / "run"
    code, output = train_one_epoch(tiny_root, golden / "tiny_clip_state_dict.pt", out)
    assert code == 0, output
    return out / "best.pt"


@pytest.mark.parametrize(
    "field, value",
    [("words", "32"), ("words", -1), ("words", 32.5), ("words", 2), ("batch_size", "8"), ("seed", -5),
     ("frames", True), ("frames", 100000), ("lr", 1e38), ("eta", 10**9)],
)  # fmt: skip
def test_an_edited_checkpoint_field_is_one_line(checkpoint, tiny_root, golden_clip, tmp_path, field, value):
    edited = torch.load(checkpoint, weights_only=True)
    edited["config"][field] = value
    torch.save(edited, tmp_path / "edited.pt")
    common = ["--dataset", "ucf101", "--root", tiny_root, "--clip", golden_clip, "--workers", 0]
    code, output = run(evaluate.app, "recognize", *common, "--checkpoint", tmp_path / "edited.pt")
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    assert str(tmp_path / "edited.pt") in line and field in line, line
    resumed = tmp_path / "run"
    resumed.mkdir()
    shutil.copy(tmp_path / "edited.pt", resumed / "last.pt")
    code, output = train_one_epoch(tiny_root, golden_clip, resumed, "--resume", "--epochs", 2)
    assert code == 1 and "Traceback" not in output and field in error_lines(output)[0], output


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with zipfile.ZipFile(tmp_path / "random.zip", "w") as archive:
        archive.writestr("data.pkl", b"\x80\x04random")
    for path in (tmp_path / "notes.txt", tmp_path / "random.zip"):
        code, output = run(evaluate.app, "recognize", "--checkpoint", path, "--out", tmp_path / "e.json")
        assert code == 1 and "weights_only" not in output and "Traceback" not in output, output
        (line,) = error_lines(output)
        assert f"{path}: cannot be read as a STOP checkpoint" in line, line
    code, output = run(evaluate.app, "recognize", "--checkpoint", tmp_path, "--out", tmp_path / "e.json")
    assert code == 1 and f"{tmp_path} is a folder" in output and "no such checkpoint" not in output, output


def test_resume_refuses_other_data_but_accepts_the_same_data_moved(tiny_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    assert train_one_epoch(tiny_root, golden_clip, out)[0] == 0
    other = tmp_path / "other"
    shutil.copytree(tiny_root, other)
    test_list = other / PROTOCOLS["ucf101"].annotations / "testlist01.txt"
    test_list.write_text("\n".join(test_list.read_text().splitlines()[:-1]) + "\n")  # other test videos
    before = (out / "last.pt").read_bytes()
    code, output = train_one_epoch(other, golden_clip, out, "--resume", "--epochs", 2)
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    assert "not the data the run started on" in line and "test videos" in line, line
    assert (out / "last.pt").read_bytes() == before and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    moved = tmp_path / "moved"
    shutil.copytree(tiny_root, moved)
    code, output = train_one_epoch(moved, golden_clip, out, "--resume", "--epochs", 2)
    assert code == 0, output


def test_run_lock_is_never_followed_through_a_link(tiny_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "outside.lock"
    os.symlink(target, out / "run.lock")
    code, output = train_one_epoch(tiny_root, golden_clip, out)
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    assert "run.lock is a symbolic link" in line, line
    assert not target.exists() and sorted(p.name for p in out.iterdir()) == ["run.lock"]


def train_one_epoch(root: Path, clip: Path, out: Path, *extra: object) -> tuple[int, str]:
    return train_tiny(root, clip, out, "--epochs", 1, *extra)
