"""The synthetic writer replaces only what it wrote, and its folder is made like any other.

A miniature dataset (two clips per class) keeps each generation to a second or two; what is checked does not
depend on the dataset's size.
"""

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import synthetic as synthetic_command
from loading import dataset_files, synthetic
from loading.errors import DataError
from loading.protocols import PROTOCOLS


@pytest.fixture(autouse=True)
def miniature(monkeypatch):
    """Two UCF101 groups of one clip per class (one train, one test) and one MSR-VTT video per class and split."""
    for name, value in [
        ("SYNTHETIC_GROUPS", 2),
        ("SYNTHETIC_CLIPS_PER_GROUP", 1),
        ("SYNTHETIC_TEST_GROUPS", 1),
        ("SYNTHETIC_RETRIEVAL_TRAIN", 1),
        ("SYNTHETIC_RETRIEVAL_TEST", 1),
    ]:
        monkeypatch.setattr(synthetic, name, value)
    with dataset_files.single_threaded():
        yield


def files_under(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def test_the_marker_lists_every_file_written(tmp_path: Path) -> None:
    root = synthetic.ensure_synthetic(tmp_path / "synthetic", seed=0)
    lines = (root / "COMPLETE").read_text().splitlines()
    assert lines[0] == f"version {synthetic.SYNTHETIC_VERSION} seed 0"
    assert set(lines[1:]) == files_under(root) - {"COMPLETE"}
    assert len(lines[1:]) == 2 * (8 * 2 + 4)  # per layout: 16 videos, then 3 list files and the no-flip marker


def test_another_seed_leaves_a_run_saved_inside_the_dataset_alone(tmp_path: Path) -> None:
    root = synthetic.ensure_synthetic(tmp_path / "synthetic", seed=0)
    run = root / "ucf101" / "runs" / "seed0" / "best.pt"
    run.parent.mkdir(parents=True)
    run.write_bytes(b"the user's checkpoint")
    notes = root / "msrvtt" / PROTOCOLS["msrvtt"].videos / "notes.txt"  # even in a folder the generator fills
    notes.write_text("mine\n")
    before = files_under(root)

    with pytest.raises(DataError, match="ucf101/runs/seed0/best.pt") as refused:
        synthetic.ensure_synthetic(root, seed=1)
    assert str(notes.relative_to(root)) in str(refused.value)
    result = CliRunner().invoke(synthetic_command.app, ["--root", str(root), "--seed", "1"])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert files_under(root) == before and run.read_bytes() == b"the user's checkpoint"
    assert (root / "COMPLETE").read_text().startswith("version 1 seed 0\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["synthetic"]  # no scratch folder left either

    run.unlink()
    notes.unlink()
    synthetic.ensure_synthetic(root, seed=1)  # only its own files now: replaced
    assert (root / "COMPLETE").read_text().startswith(f"version {synthetic.SYNTHETIC_VERSION} seed 1\n")


def test_a_version_change_keeps_files_outside_the_generators_folders(tmp_path: Path) -> None:
    """A marker of one line, as written before manifests: the generator's folders are taken to be its own."""
    root = tmp_path / "synthetic"
    old_video = root / "ucf101" / PROTOCOLS["ucf101"].videos / "old.avi"
    run = root / "ucf101" / "runs" / "seed0" / "best.pt"
    for path in (old_video, run):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    (root / "COMPLETE").write_text(f"version {synthetic.SYNTHETIC_VERSION - 1} seed 0\n")
    with pytest.raises(DataError, match="ucf101/runs/seed0/best.pt"):
        synthetic.ensure_synthetic(root, seed=0)
    assert run.exists() and old_video.exists()
    run.unlink()
    synthetic.ensure_synthetic(root, seed=0)
    assert not old_video.exists() and old_video.parent.is_dir()


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_the_dataset_folder_follows_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        root = synthetic.ensure_synthetic(tmp_path / "synthetic", seed=0)
    finally:
        os.umask(previous)
    assert root.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (root / "ucf101").stat().st_mode & 0o777 == 0o777 & ~umask
