"""train.py and evaluate.py end to end on the synthetic data with the 32-px golden CLIP, and their bad input; each
command's help; a run on the demo CLIP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT, run, stop_tensors
from typer.testing import CliRunner

import clip_model
import data
import evaluate
import train
from loading import protocols
from plumbing import runtime


def quick(task: str, root: Path, clip: Path, out: Path, *extra: str, device: str = "auto") -> tuple[int, str]:
    return run(
        train.app,
        task,
        "--device",
        device,
        "--dataset",
        "synthetic",
        "--root",
        root,
        "--clip",
        clip,
        "--out",
        out,
        "--frames",
        4,
        "--batch-size",
        8,
        "--workers",
        0,
        "--epochs",
        1,
        *extra,
    )


def test_recognition_trains_resumes_exactly_and_evaluates(synthetic_root, golden_clip, tmp_path, monkeypatch, device):
    straight = tmp_path / "straight"
    code, output = quick("recognize", synthetic_root, golden_clip, straight, "--epochs", 2, device=device.type)
    assert code == 0, output
    assert "trainable" in output
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in records)

    interrupted = tmp_path / "interrupted"
    evaluations = []

    def interrupt_at_second_evaluation(*args):
        evaluations.append(args)
        if len(evaluations) == 2:
            raise KeyboardInterrupt  # Ctrl-C during epoch 2's evaluation: only epoch 1 was saved
        return evaluate.evaluate_recognition(*args)

    with monkeypatch.context() as patch:
        patch.setattr(train, "evaluate_recognition", interrupt_at_second_evaluation)
        code, output = quick("recognize", synthetic_root, golden_clip, interrupted, "--epochs", 2, device=device.type)
    assert code == 130 and "interrupted" in output
    assert len((interrupted / "metrics.jsonl").read_text().splitlines()) == 1
    code, output = quick(
        "recognize", synthetic_root, golden_clip, interrupted, "--epochs", 2, "--resume", device=device.type
    )
    assert code == 0, output
    assert "resuming" in output
    assert len((interrupted / "metrics.jsonl").read_text().splitlines()) == 2
    resumed, uninterrupted = stop_tensors(interrupted / "last.pt"), stop_tensors(straight / "last.pt")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    checkpoint = torch.load(straight / "best.pt", weights_only=True)
    assert checkpoint["clip"]["sha256"] == clip_model.file_sha256(golden_clip)
    assert checkpoint["config"]["prompt"] == "stop" and checkpoint["config"]["frames"] == 4
    assert (straight / "best.pt").stat().st_size < 5_000_000  # STOP's parameters only, not the backbone
    assert not any(p.name.endswith(".tmp") for p in straight.iterdir())

    code, output = run(
        evaluate.app,
        "recognize",
        "--dataset",
        "synthetic",
        "--root",
        synthetic_root,
        "--checkpoint",
        straight / "best.pt",
        "--device",
        device.type,
        "--workers",
        0,
        "--views",
        2,
    )
    assert code == 0, output
    result = json.loads((straight / "eval-recognize-synthetic-best-views2.json").read_text())
    assert result["views"] == 2 and result["frames"] == 4 and 0 <= result["top1"] <= result["top5"] <= 100


def test_retrieval_trains_and_evaluates(synthetic_root, golden_clip, tmp_path, device):
    out = tmp_path / "retrieval"
    code, output = quick("retrieve", synthetic_root, golden_clip, out, device=device.type)
    assert code == 0, output
    record = json.loads((out / "metrics.jsonl").read_text())
    assert set(record["text_to_video"]) == {"R@1", "R@5", "R@10", "MdR", "MnR"}

    code, output = run(
        evaluate.app,
        "retrieve",
        "--dataset",
        "synthetic",
        "--root",
        synthetic_root,
        "--checkpoint",
        out / "best.pt",
        "--device",
        device.type,
        "--workers",
        0,
        "--out",
        tmp_path / "r.json",
    )
    assert code == 0, output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["videos"] == len(
        data.build_dataset("msrvtt", synthetic_root / "msrvtt", "test", num_frames=4, resolution=32)
    )
    assert 1 <= result["video_to_text"]["MdR"] <= result["videos"]


def test_zero_shot_baseline_evaluates_without_a_checkpoint(synthetic_root, golden_clip, tmp_path, device):
    code, output = run(
        evaluate.app,
        "recognize",
        "--device",
        device.type,
        "--dataset",
        "synthetic",
        "--root",
        synthetic_root,
        "--clip",
        golden_clip,
        "--prompt",
        "none",
        "--frames",
        4,
        "--workers",
        0,
        "--out",
        tmp_path / "z.json",
    )
    assert code == 0, output
    assert json.loads((tmp_path / "z.json").read_text())["prompt"] == "none"


# --------------------------------------------------------------------------- #
# Bad input: one clear message, a non-zero exit, nothing overwritten
# --------------------------------------------------------------------------- #


def test_unknown_dataset_and_prompt_values():
    code, output = run(train.app, "recognize", "--dataset", "kinetics")
    assert code != 0 and "Invalid value for '--dataset'" in output
    code, output = run(evaluate.app, "retrieve", "--prompt", "dynamic")
    assert code != 0 and "Invalid value for '--prompt'" in output


def test_missing_root(tmp_path):
    code, output = run(train.app, "recognize", "--dataset", "ucf101", "--out", tmp_path / "run")
    assert code == 1 and "--root is required for --dataset ucf101" in output
    code, output = run(
        train.app, "recognize", "--dataset", "ucf101", "--root", tmp_path / "nowhere", "--out", tmp_path / "run2"
    )
    assert code == 1 and "nowhere" in output and "Traceback" not in output


def test_prompt_none_training_is_refused(synthetic_root, golden_clip, tmp_path):
    code, output = quick("recognize", synthetic_root, golden_clip, tmp_path / "none", "--prompt", "none")
    assert code != 0 and "Invalid value for '--prompt'" in output and "'none' is not one of" in output, output


def test_existing_run_is_never_overwritten(synthetic_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    code, output = quick("recognize", synthetic_root, golden_clip, out)
    assert code == 1 and "--resume" in output and "--overwrite" in output
    assert (out / "metrics.jsonl").read_text() == "precious\n"
    code, output = quick("recognize", synthetic_root, golden_clip, tmp_path / "fresh", "--resume")
    assert code == 1 and "nothing to resume" in output


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint at all")
    code, output = run(evaluate.app, "recognize", "--checkpoint", tmp_path / "best.pt")
    assert code == 1 and "best.pt: cannot be read as a STOP checkpoint" in output


def test_checkpoint_config_without_frames_is_one_error_line(tmp_path):
    clip = {"name": runtime.DEMO_CLIP_NAME, "sha256": runtime.load_backbone(None).sha256}  # passes the CLIP check
    torch.save({"stop": {}, "config": {"prompt": "none"}, "clip": clip}, tmp_path / "best.pt")
    code, output = run(evaluate.app, "recognize", "--checkpoint", tmp_path / "best.pt")
    assert code == 1 and "Traceback" not in output
    assert output.strip().splitlines() == [
        f"error: {tmp_path / 'best.pt'}: not a checkpoint written by train.py (its 'config' needs a positive "
        "'frames' and a 'prompt', its 'clip' a 'name' and a 'sha256')"
    ]


def test_checkpoint_of_another_clip_is_refused(synthetic_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    assert quick("recognize", synthetic_root, golden_clip, out)[0] == 0
    code, output = run(
        evaluate.app,
        "recognize",
        "--dataset",
        "synthetic",
        "--root",
        synthetic_root,
        "--checkpoint",
        out / "best.pt",
        "--clip",
        runtime.DEMO_CLIP_NAME,
    )
    assert code == 1 and "was trained on the CLIP" in output and "random-demo-clip" in output


def test_cuda_asked_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, wherever this runs
    code, output = run(evaluate.app, "recognize", "--device", "cuda", "--prompt", "none")
    assert code == 1 and "no CUDA GPU" in output


def test_a_saved_checkpoint_evaluates_to_its_metrics_and_explains(synthetic_root, golden, tmp_path):
    """Regression: a recognition checkpoint of this version (``tests/fixtures/README.md``), evaluated on the
    synthetic test set it was trained with, scores what its training run measured at the end of its epoch.

    (The retrieval checkpoint's features are pinned in ``test_stop.py``: its synthetic captions repeat, one per
    class, so its ranks among near-tied videos move with the thread count and say nothing about the code.)"""
    checkpoint, clip = golden / "stop_checkpoint_recognize.pt", golden / "tiny_clip_state_dict.pt"
    code, output = run(
        evaluate.app, "recognize", "--dataset", "synthetic", "--root", synthetic_root, "--checkpoint", checkpoint,
        "--clip", clip, "--device", "cpu", "--workers", 0, "--out", tmp_path / "saved.json",
    )  # fmt: skip
    assert code == 0, output
    result = json.loads((tmp_path / "saved.json").read_text())
    assert result["frames"] == 4 and result["prompt"] == "stop" and result["clip"] == str(clip)
    measured = torch.load(checkpoint, weights_only=True)["metrics"]
    assert {key: result[key] for key in measured} == pytest.approx(measured, abs=1e-9)

    video = synthetic_root / "ucf101" / protocols.PROTOCOLS["ucf101"].videos / "MovingLeft" / "v_MovingLeft_g01_c01.avi"
    code, output = run(
        evaluate.app, "explain", video, "--checkpoint", checkpoint, "--clip", clip,
        "--labels-from", "synthetic", "--root", synthetic_root, "--out", tmp_path / "saved.png",
    )  # fmt: skip
    assert code == 0, output
    assert "top-5 of 8 synthetic classes" in output and (tmp_path / "saved.png").is_file()


def test_a_demo_clip_checkpoint_is_evaluated_on_its_own_clip(tiny_root, tmp_path):
    out = tmp_path / "run"
    options = ("--dataset", "ucf101", "--root", tiny_root, "--frames", 2, "--batch-size", 8, "--workers", 0)
    code, output = run(train.app, "recognize", *options, "--epochs", 1, "--out", out)  # no --clip: the demo CLIP
    assert code == 0 and "randomly initialised" in output, output
    code, output = run(evaluate.app, "recognize", *options, "--checkpoint", out / "best.pt")
    assert code == 0 and "randomly initialised" not in output, output
    assert "CLIP: the checkpoint's, the small demo ViT-CLIP it was trained on" in output
    assert json.loads((out / "eval-recognize-ucf101-best.json").read_text())["clip"] == runtime.DEMO_CLIP_NAME


def test_each_command_has_its_own_task_options():
    wide = {"COLUMNS": "300"}  # one option a line: nothing wrapped or cut
    output = CliRunner().invoke(train.app, ["recognize", "--help"], env=wide).stdout
    assert "<ucf101|hmdb51|ssv2|kinetics400|synthetic>" in output, output
    assert not [name for name in protocols.RETRIEVAL_DATASETS if name in output]
    output = CliRunner().invoke(evaluate.app, ["retrieve", "--help"], env=wide).stdout
    assert "--words" in output and "<msrvtt|" in output, output
    assert not [option for option in ("--views", "--crops", "--split-id") if option in output]


def test_a_bug_in_the_training_step_keeps_its_traceback(tiny_root, golden_clip, tmp_path):
    """A shape bug planted in ``batch_loss`` is a ValueError from PyTorch, not bad input: the command must end with
    its traceback, naming the planted line, and never turn it into one ``error:`` line."""
    planted = (
        "import sys, torch.nn.functional as F, train\n"
        "def buggy(run, videos, targets):\n"
        "    return F.cross_entropy(torch.zeros(4, 3), torch.zeros(8, dtype=torch.long))  # the bug\n"
        "import torch\n"
        "train.batch_loss = buggy\n"
        "sys.argv = ['train.py', *sys.argv[1:]]\n"
        "train.app()\n"
    )
    options = ["recognize", "--dataset", "ucf101", "--root", tiny_root, "--clip", golden_clip, "--frames", 4]
    options += ["--batch-size", 8, "--workers", 0, "--epochs", 1, "--out", tmp_path / "run"]
    result = subprocess.run(
        [sys.executable, "-c", planted, *map(str, options)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "_TYPER_STANDARD_TRACEBACK": "1"},  # Python's own layout, not Rich's boxes
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback (most recent call last)" in result.stderr and "in buggy" in result.stderr, result.stderr
    assert "Expected input batch_size (4) to match target batch_size (8)" in result.stderr
    assert not any(line.startswith("error:") for line in result.stderr.splitlines()), result.stderr
