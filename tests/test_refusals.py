"""Bad input is refused with one ``error:`` line naming the file or value, before any work, and nothing is written
or left behind: a folder that holds something else, an output that cannot be written, a bad option, a malformed or
mismatched checkpoint, a CLIP that cannot be downloaded.

The runs here use ``tiny_root`` (16 synthetic clips in a UCF101 layout) and the 32-px golden CLIP.
"""

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import error_lines, run, snapshot, train_tiny

import evaluate
import prepare
import synthetic as synthetic_command
import train

# --------------------------------------------------------------------------- #
# A folder that holds something else is refused and kept
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


# --------------------------------------------------------------------------- #
# Outputs that cannot be written: refused before any work
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


# --------------------------------------------------------------------------- #
# Options
# --------------------------------------------------------------------------- #


def test_evaluate_refuses_bad_frames_and_prompt_with_checkpoint(tmp_path):
    for frames in (0, -2):
        code, output = run(evaluate.app, "recognize", "--frames", frames)
        assert code == 2 and "Invalid value for '--frames'" in output, output
    code, output = run(evaluate.app, "recognize", "--checkpoint", tmp_path / "best.pt", "--prompt", "none")
    assert code == 1 and error_lines(output) and "leave --prompt out" in output, output


def test_non_finite_hyper_parameters_are_refused_up_front(tiny_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    code, output = train_tiny(tiny_root, golden_clip, out, "--beta", "inf")
    assert code == 1 and "Try a lower" not in output, output
    (line,) = error_lines(output)
    assert "beta=inf" in line and not out.exists(), line
    code, output = train_tiny(tiny_root, golden_clip, out, "--lr", "nan")  # outside --lr's range, as --help states it
    assert code == 2 and "Invalid value for '--lr'" in output and not out.exists(), output


def test_a_seed_out_of_range_is_a_usage_error(tiny_root, golden_clip, tmp_path):
    code, output = train_tiny(tiny_root, golden_clip, tmp_path / "run", "--seed", 99999999999999999999)
    assert code == 2 and "Invalid value for '--seed'" in output, output
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- #
# Checkpoints: malformed, or of the other task
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


def test_evaluate_refuses_a_checkpoint_of_the_other_task(golden, golden_clip, tmp_path):
    checkpoint = golden / "stop_checkpoint_recognize.pt"
    code, output = run(
        evaluate.app, "retrieve", "--dataset", "msrvtt", "--root", tmp_path, "--checkpoint", checkpoint, "--clip",
        golden_clip, "--out", tmp_path / "e.json",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    assert f"{checkpoint} is a recognize checkpoint" in line and not (tmp_path / "e.json").exists()


# --------------------------------------------------------------------------- #
# A CLIP that cannot be downloaded
# --------------------------------------------------------------------------- #


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
