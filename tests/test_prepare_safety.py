"""``prepare.py`` writes only into a copy it holds: never into its own source, never beside another prepare, never
through a symbolic link; and an audio-only source is named for what it is."""

import fcntl
import os
from pathlib import Path

import pytest
import torch
from torchcodec.encoders import AudioEncoder
from typer.testing import CliRunner

import prepare
from loading import dataset_files
from loading.errors import DataError
from loading.protocols import PROTOCOLS

UCF101 = PROTOCOLS["ucf101"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with dataset_files.single_threaded():
        yield


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    """UCF101 layout with two short videos of one class."""
    root = tmp_path / "raw"
    frames = torch.arange(20, 60, 5, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 24, 32).contiguous()
    for entry in ("YoYo/v_YoYo_g01_c01.avi", "YoYo/v_YoYo_g08_c01.avi"):
        dataset_files.write_video(root / UCF101.videos / entry, frames, 8)
    lists = root / UCF101.annotations
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 YoYo\n")
    (lists / "trainlist01.txt").write_text("YoYo/v_YoYo_g08_c01.avi 1\n")
    (lists / "testlist01.txt").write_text("YoYo/v_YoYo_g01_c01.avi\n")
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Every file and link under ``root`` (a link as its target), relative to it."""
    return {
        path.relative_to(root).as_posix(): os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        for path in root.rglob("*")
        if path.is_symlink() or path.is_file()
    }


def run_prepare(root: Path, out: Path, *options: str) -> tuple[int, str]:
    arguments = ["--dataset", "ucf101", "--root", str(root), "--out", str(out), "--workers", "1", *options]
    result = CliRunner().invoke(prepare.app, arguments)
    return result.exit_code, result.output


def test_a_second_prepare_into_the_same_folder_is_refused_while_the_first_holds_it(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    out.mkdir()
    with open(out / prepare.PREPARE_LOCK_FILE, "a+b") as held:  # another prepare at work, before it marked the copy
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, output = run_prepare(raw, out, "--fps", "3")
        assert code == 1 and output == f"error: prepare: --out {out} is in use by another prepare " + (
            f"(it holds {out / prepare.PREPARE_LOCK_FILE})\n"
        ), output
        assert sorted(path.name for path in out.iterdir()) == [prepare.PREPARE_LOCK_FILE]  # nothing written
    # the lock file a killed prepare leaves is taken over, and goes when the run ends
    code, output = run_prepare(raw, out, "--fps", "10")
    assert code == 0, output
    assert prepare.PREPARE_LOCK_FILE not in tree(out) and prepare.PREPARE_MARKER_FILE in tree(out)
    code, output = run_prepare(raw, out, "--fps", "3")  # the first one's marker now says 10 fps
    assert code == 1 and "other settings" in output, output


def test_the_lock_file_is_never_followed_through_a_symbolic_link(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    assert run_prepare(raw, out)[0] == 0  # a copy to resume
    elsewhere = tmp_path / "elsewhere" / "target"
    elsewhere.parent.mkdir()
    (out / prepare.PREPARE_LOCK_FILE).symlink_to(elsewhere)
    before = tree(out)
    code, output = run_prepare(raw, out)
    assert code == 1 and output.startswith("error: ") and len(output.splitlines()) == 1, output
    assert "symbolic link" in output and str(out / prepare.PREPARE_LOCK_FILE) in output, output
    assert not elsewhere.exists() and tree(out) == before


@pytest.mark.parametrize("inside", [f"{UCF101.annotations}/prepared", "prepared", f"{UCF101.videos}/YoYo/prepared"])
def test_an_out_inside_the_source_is_refused_before_anything_is_written(raw: Path, inside: str) -> None:
    before = tree(raw)
    code, output = run_prepare(raw, raw / inside)
    assert code == 1 and output.startswith("error: ") and len(output.splitlines()) == 1, output
    assert f"--out {raw / inside} is inside the dataset it copies" in output, output
    assert tree(raw) == before and not (raw / inside).exists()


def test_an_out_that_holds_the_source_is_refused(raw: Path, tmp_path: Path) -> None:
    before = tree(tmp_path)
    code, output = run_prepare(raw, tmp_path)
    assert code == 1 and f"--out {tmp_path} holds the dataset it copies" in output, output
    assert tree(tmp_path) == before


def test_an_audio_only_source_is_said_to_have_no_video_stream(raw: Path, tmp_path: Path) -> None:
    audio_only = raw / UCF101.videos / "YoYo" / "v_YoYo_g09_c01.avi"
    AudioEncoder(torch.zeros(1, 8000), sample_rate=8000).to_file(audio_only)  # half a second of silence
    with pytest.raises(dataset_files.BrokenVideoError) as error:
        prepare.prepare_video(audio_only, tmp_path / "out.avi", prepare.PrepareSettings("ucf101"))
    assert error.value.reason == "the file has no video stream"
    report = prepare.prepare_dataset("ucf101", raw, tmp_path / "prepared", progress=False)
    assert report.failures == [(f"{UCF101.videos}/YoYo/v_YoYo_g09_c01.avi", "the file has no video stream")]
    assert report.written == 2


def test_the_datasets_are_offered_in_the_help() -> None:
    output = CliRunner().invoke(prepare.app, ["--help"], env={"COLUMNS": "300"}).output  # nothing wrapped
    assert "<" + "|".join(prepare.DATASETS) + ">" in output, output
    with pytest.raises(DataError, match="unknown dataset"):
        prepare.prepare_dataset("ucf102", "raw", "out")
