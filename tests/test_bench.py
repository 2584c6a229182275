"""bench.py: small smoke runs of both commands; what they report, never how fast anything was."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

import bench
import clip_model

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_model_reports_every_row_against_the_baseline_and_full_fine_tuning(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    arguments = ["model", "--backbone", "tiny", "--frames", "3", "--warmup", "0", "--runs", "1", "--threads", "1"]
    result = CliRunner().invoke(
        bench.app, [*arguments, "--row", "stop", "--row", "stop --grad-checkpoint", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "| model | trainable params |" in result.output and "% of it." in result.output

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert list(rows) == ["none", "stop", "stop --grad-checkpoint", "full fine-tune"]
    visual = sum(p.numel() for p in clip_model.random_clip(bench.TINY).visual.parameters())
    assert rows["none"]["trainable_parameters"] == 0 and "train_ms_per_clip" not in rows["none"]
    assert rows["full fine-tune"]["trainable_parameters"] == visual
    assert 0 < rows["stop"]["trainable_parameters"] == rows["stop --grad-checkpoint"]["trainable_parameters"]
    assert rows["none"]["eval_x_none"] == 1.0 and rows["full fine-tune"]["train_x_full"] == 1.0
    assert "eval_ms_per_clip" not in rows["stop --grad-checkpoint"]  # its eval forward is STOP's
    for name in ("stop", "stop --grad-checkpoint", "full fine-tune"):
        assert rows[name]["train_ms_per_clip"] > 0 and rows[name]["train_memory_x_full"] > 0
        assert rows[name]["train_peak_bytes"] >= rows[name]["eval_peak_bytes"] > 0
    # each row measured in its own process: full fine-tuning holds a gradient and two AdamW moments per weight
    assert rows["full fine-tune"]["train_peak_bytes"] >= 3 * 4 * visual
    assert report["forward_flops"] > 0 and all(rate > 0 for rate in report["matmul_flops_per_s"])
    # the profiler's counts: STOP adds kernels to the baseline's forward and reads nothing back to the host
    assert rows["stop"]["eval_kernels"] > rows["none"]["eval_kernels"] > 0 and rows["stop"]["train_kernels"] > 0
    assert rows["stop"]["eval_host_syncs"] == rows["stop"]["train_host_syncs"] == 0
    assert [target["goal"] for target in report["targets"]] == ["<= 1.25", "<= 0.85", "<= 0.75", "<= 0.4", ">= 0.5"]
    assert report["setup"]["threads"] == 1 and report["setup"]["batch_size"] == 2


def test_model_benchmark_needs_no_video_decoder() -> None:
    """The GPU machine has no TorchCodec: ``bench.py model`` must import and run without it."""
    blocked = "import sys; sys.modules['torchcodec'] = None; sys.argv = ['bench.py', 'model', '--help']; import bench"
    finished = subprocess.run(
        [sys.executable, "-c", f"{blocked}; bench.app()"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert finished.returncode == 0, finished.stderr
    assert "--batch-size" in finished.stdout


def test_data_reads_raw_and_prepared_stand_ins(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    arguments = ["data", "--dataset", "ucf101", "--dataset", "ssv2", "--videos", "2", "--clips", "2", "--rounds", "1"]
    result = CliRunner().invoke(
        bench.app, [*arguments, "--max-seconds", "1", "--keep", str(tmp_path), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["datasets"]
    assert list(report) == ["ucf101", "ssv2"]
    assert report["ucf101"]["prepared"].startswith("AVI, mpeg4") and report["ssv2"]["prepared"].startswith("WEBM, vp8")
    for result in report.values():
        assert all(result[f"{kind}_clips_per_s"] > 0 for kind in ("raw_decode", "prepared_decode", "raw_pipeline"))
    assert (tmp_path / "ucf101/prepared/UCF-101/YoYo/v_YoYo_g01_c01.avi").is_file()


def test_unknown_choices_are_refused_by_name() -> None:
    result = CliRunner().invoke(bench.app, ["model", "--row", "everything"])
    assert result.exit_code == 2 and "'everything': expected one of" in result.output
    result = CliRunner().invoke(bench.app, ["data", "--dataset", "kinetics"])
    assert result.exit_code == 2 and "'kinetics'" in result.output


def test_camera_like_stand_in_moves_and_is_deterministic() -> None:
    video = bench.camera_like_video(4, 24, 32, seed=1)
    assert video.shape == (4, 3, 24, 32) and video.dtype == torch.uint8
    assert torch.equal(video, bench.camera_like_video(4, 24, 32, seed=1))
    assert (video[1].float() - video[0].float()).abs().mean() > 1  # the pan changes every frame


def test_data_writes_the_retrieval_stand_ins_in_their_layouts(tmp_path: Path) -> None:
    names = ["msvd", "lsmdc", "activitynet"]
    arguments = ["data", *[f"--dataset={name}" for name in names], "--videos", "2", "--clips", "1", "--rounds", "1"]
    out = tmp_path / "data.json"
    result = CliRunner().invoke(
        bench.app, [*arguments, "--max-seconds", "0.5", "--keep", str(tmp_path), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["datasets"]
    assert [report[name]["source"].split(",")[0] for name in names] == ["AVI", "MP4", "MP4"]
    assert [report[name]["frames_sampled"] for name in names] == [12, 12, 64]
    assert (tmp_path / "msvd/prepared/YouTubeClips/-clip1_5_15.avi").is_file()
    assert (tmp_path / "activitynet/prepared/videos/v_clip1.mp4").is_file()  # the video of key v_v_clip1
