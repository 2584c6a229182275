"""bench.py: small smoke runs of both commands; what they report and what they leave alone, never how fast."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

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
    assert report["setup"]["threads"] == 1 and report["setup"]["batch_size"] == 2


def test_rows_are_stop_configs() -> None:
    """Every row builds: a new STOPConfig field needs only a new Row."""
    for row in bench.ROWS.values():
        bench.STOPConfig(**row.config)
    assert bench.ROWS["full fine-tune"].config["prompt"] == "none" and bench.ROWS["full fine-tune"].full_finetune


def test_model_benchmark_needs_no_video_decoder() -> None:
    """The GPU machine has no TorchCodec: ``bench.py model`` must import and run without it."""
    blocked = "import sys; sys.modules['torchcodec'] = None; sys.argv = ['bench.py', 'model', '--help']; import bench"
    finished = subprocess.run(
        [sys.executable, "-c", f"{blocked}; bench.app()"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert finished.returncode == 0, finished.stderr
    assert "--batch-size" in finished.stdout


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` (and every folder, as size -1) with its size and content hash."""
    return {
        str(path.relative_to(root)): (-1, "")
        if path.is_dir()
        else (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(root.rglob("*"))
    }


def test_data_reads_raw_and_prepared_side_by_side_and_writes_nothing_else(tiny_root: Path, tmp_path: Path) -> None:
    import prepare

    prepared = tmp_path / "prepared"
    assert not prepare.prepare_dataset("ucf101", tiny_root, prepared, progress=False).failures
    before = {root: snapshot(root) for root in (tiny_root, prepared)}
    out = tmp_path / "results" / "data.json"
    out.parent.mkdir()
    out.write_text(json.dumps({bench.MARKER: "data"}))  # an earlier result of its own: replaced
    arguments = [
        "data",
        "--dataset",
        "ucf101",
        "--root",
        str(tiny_root),
        "--prepared",
        str(prepared),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(
        bench.app, [*arguments, "--clips", "2", "--rounds", "1", "--frames", "4", "--resolution", "32"]
    )
    assert result.exit_code == 0, result.output
    assert "| dataset (frames sampled) | clip | prepared clip |" in result.output
    assert {root: snapshot(root) for root in (tiny_root, prepared)} == before
    assert sorted(path.name for path in out.parent.iterdir()) == ["data.json"]  # no temporary file left

    report = json.loads(out.read_text())
    assert report[bench.MARKER] == "data" and report["frames_sampled"] == 4
    for key in ("raw_decode", "prepared_decode", "raw_pipeline", "prepared_pipeline"):
        [rate] = report["rates"][key]  # one round: its own median
        assert report[f"{key}_clips_per_s"] == rate > 0
    assert report["decode_x"] > 0 and report["pipeline_x"] > 0
    assert report["files"]["raw"].startswith("AVI, ") and report["files"]["prepared"].startswith("AVI, ")


def test_data_without_a_prepared_copy_reports_the_raw_dataset(tiny_root: Path) -> None:
    arguments = ["data", "--dataset", "ucf101", "--root", str(tiny_root), "--clips", "1", "--rounds", "1"]
    result = CliRunner().invoke(bench.app, [*arguments, "--frames", "2", "--resolution", "16"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| ucf101 (2 frames)"))
    assert row.split(" | ")[2] == "—" and row.split(" | ")[-1] == "— |"  # no prepared clip, no ratio


def test_out_refuses_a_file_that_is_not_a_bench_result(tmp_path: Path) -> None:
    out = tmp_path / "notes.json"
    out.write_text('{"mine": 1}\n')
    for command in (["model", "--backbone", "tiny"], ["data", "--dataset", "ucf101", "--root", str(tmp_path)]):
        result = CliRunner().invoke(bench.app, [*command, "--out", str(out)])
        assert result.exit_code == 2 and "is not a JSON of bench.py" in result.output, result.output
        assert out.read_text() == '{"mine": 1}\n'


def test_bad_input_is_refused_by_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench.app, ["model", "--row", "everything"])
    assert result.exit_code == 2 and "'everything': expected one of" in result.output
    result = CliRunner().invoke(bench.app, ["data", "--dataset", "kinetics"])
    assert result.exit_code == 1 and result.output.startswith("error: kinetics is not a recognition dataset")
    missing = tmp_path / "UCF101"
    result = CliRunner().invoke(bench.app, ["data", "--dataset", "ucf101", "--root", str(missing)])
    assert result.exit_code == 1 and result.output.startswith(f"error: ucf101: {missing} not found")
    assert not missing.exists()
