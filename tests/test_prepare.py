"""``prepare.py``: a re-encoded copy of a dataset in its own layout, resumable, with broken sources listed.

Real (tiny) videos in the published layouts, prepared into temporary folders and read back through the loaders.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchcodec.decoders import VideoDecoder
from typer.testing import CliRunner

import data
import prepare
from loading import dataset_files
from loading.protocols import PROTOCOLS

UCF101, SSV2, MSRVTT = (PROTOCOLS[name] for name in ("ucf101", "ssv2", "msrvtt"))
BROKEN = f"{UCF101.videos}/YoYo/v_YoYo_g09_c01.avi"  # ucf101_root's broken video, relative to the root
SOURCE_FPS = 10
SECONDS = 4  # 40 frames at 10 fps: prepared at 3 fps to 16 frames (min_frames)


def brightening(num_frames: int = SOURCE_FPS * SECONDS, height: int = 40, width: int = 60) -> torch.Tensor:
    """uint8 [T, 3, H, W]: flat grey frames, frame i at level 20 + 5 i, so a frame's time shows in its level."""
    levels = 20 + 5 * torch.arange(num_frames, dtype=torch.uint8)
    return levels[:, None, None, None].expand(-1, 3, height, width).contiguous()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with dataset_files.single_threaded():
        yield


@pytest.fixture()
def ucf101_root(tmp_path: Path) -> Path:
    """UCF101 layout, CRLF split files as published, one broken video, and the no-flip marker."""
    root = tmp_path / "raw"
    entries = ["YoYo/v_YoYo_g01_c01.avi", "YoYo/v_YoYo_g08_c01.avi", "HandstandPushups/v_HandStandPushups_g08_c01.avi"]
    for entry in entries:
        dataset_files.write_video(root / UCF101.videos / entry, brightening(), SOURCE_FPS)
    broken = root / BROKEN
    broken.write_bytes(b"RIFF....AVI not really a video")
    lists = root / UCF101.annotations
    lists.mkdir()
    (lists / "classInd.txt").write_bytes(b"1 YoYo\r\n2 HandstandPushups\r\n")
    train = [
        "YoYo/v_YoYo_g08_c01.avi 1",
        "YoYo/v_YoYo_g09_c01.avi 1",
        "HandStandPushups/v_HandStandPushups_g08_c01.avi 2",
    ]
    (lists / "trainlist01.txt").write_bytes("\r\n".join(train).encode() + b"\r\n")
    (lists / "testlist01.txt").write_bytes(b"YoYo/v_YoYo_g01_c01.avi\r\n")
    (root / data.NO_FLIP_MARKER).write_text("never flip\n")
    return root


def relative_files(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def test_the_copy_keeps_the_layout_the_split_files_and_what_the_loader_lists(ucf101_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    report = prepare.prepare_dataset("ucf101", ucf101_root, out, workers=2, progress=False)
    assert (report.written, report.skipped) == (3, 0)
    raw_files = relative_files(ucf101_root) - {BROKEN}
    assert relative_files(out) == raw_files | {prepare.PREPARE_MARKER_FILE, prepare.PREPARE_FAILURES_FILE}
    for name in ("classInd.txt", "trainlist01.txt", "testlist01.txt"):
        assert (out / UCF101.annotations / name).read_bytes() == (ucf101_root / UCF101.annotations / name).read_bytes()
    for split in ("train", "test"):
        raw = data.build_dataset("ucf101", ucf101_root, split, num_frames=4, resolution=32)
        prepared = data.build_dataset("ucf101", out, split, num_frames=4, resolution=32)
        assert [p.relative_to(out) for p in prepared.paths] == [p.relative_to(ucf101_root) for p in raw.paths]
        assert (prepared.targets, prepared.classes) == (raw.targets, raw.classes)
    assert (out / data.NO_FLIP_MARKER).read_text() == "never flip\n"  # training on the copy never flips either


def test_prepared_frames_are_the_source_at_a_lower_rate_and_size(ucf101_root: Path, tmp_path: Path) -> None:
    settings = prepare.PrepareSettings("ucf101", fps=2.0, min_frames=6, short_side=20)
    prepare.prepare_dataset("ucf101", ucf101_root, tmp_path / "prepared", settings, progress=False)
    decoder = VideoDecoder(tmp_path / "prepared" / UCF101.videos / "YoYo/v_YoYo_g01_c01.avi")
    metadata = decoder.metadata
    assert metadata.codec == "mpeg4"
    assert (metadata.height, metadata.width) == (20, 30)  # short side 40 -> 20, aspect kept, even sides
    frames = decoder.get_frames_in_range(0, metadata.num_frames).data  # [n, 3, 20, 30]
    assert frames.shape[0] == 8  # 4 s at 2 fps (more than min_frames)
    # frame k shows the source at (k + 0.5) / 2 s, i.e. source frame 5 k + 2 at 10 fps, level 20 + 5 (5 k + 2)
    expected = 20 + 5 * (5 * torch.arange(8) + 2)
    assert (frames.float().mean(dim=(1, 2, 3)) - expected).abs().max() < 4


def test_a_short_video_keeps_min_frames_and_never_more_than_its_own(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    dataset_files.write_video(root / MSRVTT.videos / "video0.mp4", brightening(12), 6)  # 2 s at 6 fps
    dataset_files.write_video(root / MSRVTT.videos / "video1.mp4", brightening(20), 10)  # 2 s at 10 fps
    (root / MSRVTT.annotations).mkdir()
    (root / MSRVTT.annotations / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
    settings = prepare.PrepareSettings("msrvtt", fps=1.0, min_frames=16)
    prepare.prepare_dataset("msrvtt", root, tmp_path / "prepared", settings, progress=False)
    counts = [VideoDecoder(tmp_path / "prepared" / MSRVTT.videos / f"video{i}.mp4").metadata.num_frames for i in (0, 1)]
    assert counts == [12, 16]  # 16 asked for: capped at the source's own 6 fps, else raised from 1 fps to 8


def test_each_container_keeps_its_name_and_gets_a_codec_it_holds(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    dataset_files.write_video(root / SSV2.videos / "7.webm", brightening(24), 12)
    (root / SSV2.annotations).mkdir()
    dataset_files.write_video(tmp_path / "mp4" / MSRVTT.videos / "video3.mp4", brightening(), SOURCE_FPS)
    (tmp_path / "mp4" / MSRVTT.annotations).mkdir()
    prepare.prepare_dataset("ssv2", root, tmp_path / "ssv2", progress=False)
    prepare.prepare_dataset("msrvtt", tmp_path / "mp4", tmp_path / "msrvtt", progress=False)
    assert VideoDecoder(tmp_path / "ssv2" / SSV2.videos / "7.webm").metadata.codec == "vp8"
    assert VideoDecoder(tmp_path / "msrvtt" / MSRVTT.videos / "video3.mp4").metadata.codec == "mpeg4"


def test_a_rerun_skips_what_is_done_and_redoes_what_is_missing_or_partial(ucf101_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare.prepare_dataset("ucf101", ucf101_root, out, progress=False)
    done = out / UCF101.videos / "YoYo/v_YoYo_g08_c01.avi"
    os.utime(done, (1, 1))  # a rewrite would change it
    missing = out / UCF101.videos / "YoYo/v_YoYo_g01_c01.avi"
    missing.unlink()
    partial = missing.with_name(f".{missing.stem}.partial.avi")
    partial.write_bytes(b"half a video from an interrupted run")
    report = prepare.prepare_dataset("ucf101", ucf101_root, out, progress=False)
    assert (report.written, report.skipped) == (1, 2)
    assert done.stat().st_mtime == 1
    assert VideoDecoder(missing).metadata.num_frames == 16
    assert not partial.exists()


def test_a_broken_source_is_listed_and_the_rest_is_prepared(ucf101_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    report = prepare.prepare_dataset("ucf101", ucf101_root, out, progress=False)
    assert [path for path, _ in report.failures] == [BROKEN]
    listed = (out / prepare.PREPARE_FAILURES_FILE).read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [BROKEN]
    assert report.written == 3
    # still listed on a rerun; once the source is repaired, prepared and no longer listed
    assert len(prepare.prepare_dataset("ucf101", ucf101_root, out, progress=False).failures) == 1
    dataset_files.write_video(ucf101_root / BROKEN, brightening(), SOURCE_FPS)
    report = prepare.prepare_dataset("ucf101", ucf101_root, out, progress=False)
    assert (report.written, report.failures) == (1, [])
    assert not (out / prepare.PREPARE_FAILURES_FILE).exists()


def test_other_settings_for_the_same_copy_are_refused(ucf101_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare.prepare_dataset("ucf101", ucf101_root, out, progress=False)
    with pytest.raises(data.DataError, match="was prepared with other settings"):
        prepare.prepare_dataset("ucf101", ucf101_root, out, prepare.PrepareSettings("ucf101", fps=2.0), progress=False)
    with pytest.raises(data.DataError, match="dataset root itself"):
        prepare.prepare_dataset("ucf101", ucf101_root, ucf101_root, progress=False)


def test_the_command_reports_broken_sources_and_bad_input_in_one_message(ucf101_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "prepared"
    result = runner.invoke(
        prepare.app, ["--dataset", "ucf101", "--root", str(ucf101_root), "--out", str(out), "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "3 videos written, 0 already done, 1 broken sources" in result.output
    assert BROKEN in result.output
    result = runner.invoke(prepare.app, ["--dataset", "hmdb51", "--root", str(ucf101_root), "--out", str(out)])
    assert result.exit_code == 1
    assert "videos not found" in result.output and "Expected layout" in result.output
    assert "Traceback" not in result.output


def file_contents(root: Path) -> dict[str, bytes]:
    return {path: (root / path).read_bytes() for path in relative_files(root)}


def run_prepare(root: Path, out: Path, *options: str) -> tuple[int, str]:
    arguments = ["--dataset", "ucf101", "--root", str(root), "--out", str(out), "--workers", "1", *options]
    result = CliRunner().invoke(prepare.app, arguments)
    return result.exit_code, result.output


def test_an_out_folder_that_is_not_this_copy_is_refused_and_left_as_it_was(ucf101_root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_dataset"  # another dataset's folder: its own split files, failures list and videos
    dataset_files.write_video(other / UCF101.videos / "YoYo/v_YoYo_g01_c01.avi", brightening(8), SOURCE_FPS)
    (other / UCF101.annotations).mkdir()
    (other / UCF101.annotations / "classInd.txt").write_text("1 YoYo\n")
    (other / prepare.PREPARE_FAILURES_FILE).write_text("the user's own notes\n")
    before = file_contents(other)
    code, output = run_prepare(ucf101_root, other)
    assert code == 1
    assert output.startswith("error: ") and len(output.strip().splitlines()) == 1 and str(other) in output, output
    assert file_contents(other) == before

    # a copy of another source, or with other settings, is not resumed either
    copy = tmp_path / "copy"
    assert run_prepare(ucf101_root, copy)[0] == 0
    before = file_contents(copy)
    second_source = tmp_path / "raw2"
    shutil.copytree(ucf101_root, second_source)
    for root, options in [(second_source, ()), (ucf101_root, ("--short-side", "128"))]:
        code, output = run_prepare(root, copy, *options)
        assert code == 1
        assert output.startswith("error: ") and len(output.strip().splitlines()) == 1 and str(copy) in output, output
        assert file_contents(copy) == before

    # its own copy is resumed, and a new or empty folder is started
    code, output = run_prepare(ucf101_root, copy)
    assert code == 0 and "0 videos written, 3 already done" in output, output
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new/nested"):
        code, output = run_prepare(ucf101_root, out)
        assert code == 0 and "3 videos written" in output, output
        assert (out / prepare.PREPARE_MARKER_FILE).is_file()


@pytest.mark.parametrize(
    "option",
    [
        ("--fps", "nan"),
        ("--fps", "inf"),
        ("--fps", "0"),
        ("--fps", "-3"),
        ("--min-frames", "0"),
        ("--short-side", "1"),
        ("--keyframe-interval", "-1"),
        ("--workers", "-1"),
    ],
)
def test_an_impossible_number_is_refused_before_anything_is_written(
    ucf101_root: Path, tmp_path: Path, option: tuple[str, str]
) -> None:
    out = tmp_path / "prepared"
    code, output = run_prepare(ucf101_root, out, *option)
    assert code == 1
    assert output.startswith(f"error: prepare: {option[0]} {option[1]}: expected "), output
    assert len(output.strip().splitlines()) == 1, output
    assert not out.exists()


def test_the_command_defaults_to_the_authors_3_fps_and_a_256_pixel_short_side(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    video = root / UCF101.videos / "YoYo/v_YoYo_g01_c01.avi"
    dataset_files.write_video(video, brightening(70, 300, 400), SOURCE_FPS)  # 7 s
    (root / UCF101.annotations).mkdir()
    assert run_prepare(root, tmp_path / "prepared")[0] == 0
    metadata = VideoDecoder(tmp_path / "prepared" / UCF101.videos / "YoYo/v_YoYo_g01_c01.avi").metadata
    assert (metadata.num_frames, metadata.average_fps) == (21, 3)  # 7 s at 3 fps, above min_frames
    assert (metadata.height, metadata.width) == (256, 342)


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc/PID/stat: state and parent follow the name)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(parent) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with prepare through Linux's prctl")
def test_killing_prepare_leaves_no_worker_processes_behind(tmp_path: Path) -> None:
    source = tmp_path / "raw" / UCF101.videos / "YoYo" / "v_YoYo_g01_c01.avi"
    dataset_files.write_video(source, brightening(), SOURCE_FPS)
    for group in range(2, 400):  # enough work to kill the run in the middle of it
        os.link(source, source.with_name(f"v_YoYo_g{group:02d}_c01.avi"))
    (tmp_path / "raw" / UCF101.annotations).mkdir()
    (tmp_path / "raw" / UCF101.annotations / "classInd.txt").write_text("1 YoYo\n")
    command = ["prepare.py", "--dataset", "ucf101", "--root", tmp_path / "raw", "--out", tmp_path / "out"]
    run = subprocess.Popen(
        [sys.executable, *map(str, command), "--workers", "2"],
        cwd=Path(data.__file__).parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            workers = _children(run.pid)
        assert len(workers) == 2 and run.poll() is None
        run.kill()
        run.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in workers if _alive(pid)] == []
    finally:
        run.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)  # this test's own orphans, should the assertion above have failed
