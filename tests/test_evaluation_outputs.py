"""evaluate.py writes only its own results: never over a checkpoint or another file, one file per checkpoint and
setting, each naming the epoch and SHA256 of what it measured, through a temporary file no other writer shares."""

import hashlib
import json
from pathlib import Path

import pytest
from conftest import error_lines, run

import evaluate
import train
from plumbing import runs


@pytest.fixture(scope="module")
def tiny_run(tiny_root, tmp_path_factory, golden) -> Path:
    """Two epochs of a tiny run: best.pt and last.pt."""
    out = tmp_path_factory.mktemp("evaluated") / "run"
    options = ["--dataset", "ucf101", "--root", tiny_root, "--clip", golden / "tiny_clip_state_dict.pt", "--out", out]
    code, output = run(train.app, "recognize", *options, "--frames", 4, "--batch-size", 8, "--workers", 0,
                       "--epochs", 2)  # fmt: skip
    assert code == 0, output
    return out


def evaluate_tiny(root: Path, clip: Path, checkpoint: Path, *extra) -> tuple[int, str]:
    common = ["--dataset", "ucf101", "--root", root, "--clip", clip, "--workers", 0, "--batch-size", 8]
    return run(evaluate.app, "recognize", *common, "--checkpoint", checkpoint, *extra)


def test_out_never_replaces_a_checkpoint_or_another_file(tiny_root, golden_clip, tiny_run, tmp_path):
    best = tiny_run / "best.pt"
    before = best.read_bytes()
    code, output = evaluate_tiny(tiny_root, golden_clip, best, "--out", best)
    assert code == 1 and len(error_lines(output)) == 1 and "not an evaluation result" in output, output
    assert best.read_bytes() == before
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    code, output = evaluate_tiny(tiny_root, golden_clip, best, "--out", notes)
    assert code == 1 and notes.read_text() == '{"mine": 1}\n', output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]
    code, output = evaluate_tiny(tiny_root, golden_clip, best, "--out", tmp_path / "e.json")  # a new file
    assert code == 0, output
    code, output = evaluate_tiny(tiny_root, golden_clip, best, "--out", tmp_path / "e.json")  # its own result
    assert code == 0, output


def test_each_checkpoint_and_setting_has_its_own_result_with_epoch_and_sha256(tiny_root, golden_clip, tiny_run):
    for checkpoint, extra in (("best.pt", ()), ("last.pt", ()), ("last.pt", ("--views", 2, "--crops", 3))):
        code, output = evaluate_tiny(tiny_root, golden_clip, tiny_run / checkpoint, *extra)
        assert code == 0, output
    names = sorted(p.name for p in tiny_run.glob("eval-*.json"))
    expected = ["eval-recognize-ucf101-best.json", "eval-recognize-ucf101-last-views2-crops3.json",
                "eval-recognize-ucf101-last.json"]  # fmt: skip
    assert names == expected
    for name, epoch_file in (("best", "best.pt"), ("last", "last.pt")):
        result = json.loads((tiny_run / f"eval-recognize-ucf101-{name}.json").read_text())
        saved_epoch = runs.read_checkpoint(tiny_run / epoch_file)["epoch"] + 1
        assert result["checkpoint_epoch"] == saved_epoch
        assert result["checkpoint_sha256"] == hashlib.sha256((tiny_run / epoch_file).read_bytes()).hexdigest()


def test_temporary_files_are_never_shared(tmp_path):
    target = tmp_path / "eval.json"
    other_writer = tmp_path / "eval.json.tmp"  # another command's temporary file, under the name once fixed
    other_writer.write_text("theirs\n")
    runs.atomic_save('{"stop_evaluation": 1}\n', target)
    assert other_writer.read_text() == "theirs\n" and json.loads(target.read_text()) == {"stop_evaluation": 1}
    assert runs.temporary_name("eval.json") != runs.temporary_name("eval.json")


def test_a_run_folder_cleans_only_its_own_temporary_files(tiny_root, golden_clip, tiny_run):
    leftovers = [tiny_run / runs.temporary_name("last.pt"), tiny_run / "last.pt.tmp"]
    for path in leftovers:
        path.write_bytes(b"killed save")
    (tiny_run / "notes.json.tmp").write_text("mine\n")
    options = ["--dataset", "ucf101", "--root", tiny_root, "--clip", golden_clip, "--out", tiny_run]
    code, output = run(train.app, "recognize", *options, "--workers", 0, "--resume")
    assert code == 0 and "nothing left to do" in output, output
    assert not any(path.exists() for path in leftovers) and (tiny_run / "notes.json.tmp").read_text() == "mine\n"
