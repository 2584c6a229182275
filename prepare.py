"""Prepared copies: a dataset re-encoded once, small and quick to seek, for training to read.

Training STOP (CVPR 2025) decodes a few frames of every clip in every epoch. The published videos are long,
large and rarely keyframed (UCF101's AVIs every 300 frames, MSR-VTT's 15-second MP4s), so most of that time goes
to decoding frames that are never used. ``python prepare.py --dataset D --root RAW --out PREPARED`` writes a
copy in the same layout: 3 frames per second, as the authors' preprocessing (their ``preprocess/compress_video.py``)
keeps, short side 256 px and frequent keyframes, with the split and label files copied as they are. Training then
reads it through ``data.py`` like the original, with ``--root PREPARED``; ``python bench.py data`` measures how
much faster it decodes. The short side is 256 px, not the authors' 224, because training's random resized crop
takes 40-100% of the frame's area and resizes it to 224, so a 256-pixel source keeps more real pixels in the crop;
evaluation resizes the short side to 224 anyway.

A run can be killed and rerun: finished videos are kept, and no file is ever half written. ``prepare`` writes only
into its own output, outside its source: a new or empty folder, which it marks as the copy of that source with those
settings, or a folder it marked so before, which it resumes; one prepare at a time, which holds a lock on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import typer
from torchcodec.encoders import VideoEncoder
from torchvision.transforms import v2
from tqdm import tqdm

from loading.dataset_files import (
    LAYOUTS,
    NO_FLIP_MARKER,
    BrokenVideoError,
    available_cores,
    open_video,
    require_ffmpeg,
    require_path,
    single_threaded,
)
from loading.errors import DataError
from loading.protocols import DATASETS, PROTOCOLS
from plumbing.cli import reported_errors
from plumbing.runs import held_lock

# Codec, options and keyframe interval (frames) per container of a prepared copy, chosen by measured decoding
# speed in one thread (``python bench.py data``) at a quality within about 1 dB PSNR of a lossless 4:2:0 encode.
# AVI and MP4 both hold MPEG-4 Part 2, which decodes several times faster than H.264 at these sizes; quantiser
# held at 3 (like FFmpeg's ``-q:v 3``), a keyframe every 2 frames. WebM holds only VP8, VP9 and AV1: VP8 decodes
# fastest, and its keyframes cost so much more than its other frames that one every 16 frames (4 s of SSv2 at
# 4 fps, once per clip) decodes fastest.
PREPARED_CODECS: dict[str, tuple[str, dict[str, str], int]] = {
    ".avi": ("mpeg4", {"qmin": "3", "qmax": "3"}, 2),
    ".mp4": ("mpeg4", {"qmin": "3", "qmax": "3"}, 2),
    ".webm": ("libvpx", {"deadline": "1", "cpu-used": "8"}, 16),  # realtime speed
    # Containers of downloaded YouTube videos (MKV) and of DiDeMo's Flickr originals, kept so the copy keeps their
    # names: MPEG-4 Part 2 as above, except MPEG program streams, which hold only MPEG-1/2 video (not measured).
    ".mkv": ("mpeg4", {"qmin": "3", "qmax": "3"}, 2),
    ".mov": ("mpeg4", {"qmin": "3", "qmax": "3"}, 2),
    ".3gp": ("mpeg4", {"qmin": "3", "qmax": "3"}, 2),
    ".mpg": ("mpeg2video", {"qmin": "3", "qmax": "3"}, 2),
}
PREPARE_MARKER_FILE = "prepare.json"  # marks a prepared copy: its source root and settings
PREPARE_FAILURES_FILE = "prepare_failures.txt"
PREPARE_LOCK_FILE = "prepare.lock"  # held by the prepare writing the copy (``_claimed``)
PREPARE_CHUNK = 32  # source frames decoded at a time; only their resized copies are kept


@dataclass(frozen=True)
class PrepareSettings:
    """How a prepared copy is encoded; stored in its marker (``prepare.json``) so that a rerun cannot mix two.

    ``fps`` frames per second (the authors' preprocessing keeps 3), raised for a short video to give it ``min_frames``
    frames, never above the source's rate; ``short_side`` pixels at most (never upscaled); a keyframe every
    ``keyframe_interval`` frames (None: the container's choice in PREPARED_CODECS), so a seek decodes at most
    that many frames.
    """

    dataset: str
    fps: float = 3.0
    min_frames: int = 16
    short_side: int = 256
    keyframe_interval: int | None = None

    def __post_init__(self) -> None:
        """Refuse a setting no copy can be made with, named as the command's option, before anything is written."""
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise DataError(f"prepare: --fps {self.fps:g}: expected a finite number of frames per second above 0")
        if self.min_frames < 1:
            raise DataError(f"prepare: --min-frames {self.min_frames}: expected 1 or more")
        if self.short_side < 2:
            raise DataError(f"prepare: --short-side {self.short_side}: expected 2 pixels or more")
        if self.keyframe_interval is not None and self.keyframe_interval < 1:
            raise DataError(
                f"prepare: --keyframe-interval {self.keyframe_interval}: expected 1 frame or more "
                "(0 in the command: the container's choice)"
            )


@dataclass
class PrepareReport:
    """What a ``prepare_dataset`` run did: videos written now, found done, and broken sources with the reason."""

    written: int
    skipped: int
    failures: list[tuple[str, str]]


def _prepared_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Even (height, width) with the short side at most ``short_side``, aspect kept (yuv420p needs even sides)."""
    scale = min(1.0, short_side / min(height, width))
    return max(2, round(height * scale / 2) * 2), max(2, round(width * scale / 2) * 2)


def prepare_video(source: Path, target: Path, settings: PrepareSettings) -> None:
    """Re-encode ``source`` into ``target`` (same container): fewer frames per second, smaller, frequent keyframes.

    Frames are taken at a regular time grid (the frame shown at each instant, ``get_frames_played_at``), in
    chunks, resized with antialiasing, and encoded with the codec of PREPARED_CODECS for ``target``'s suffix.
    The file is written under a temporary name and renamed when complete, so ``target`` is never half written.
    Raises BrokenVideoError when ``source`` cannot be decoded.
    """
    suffix = target.suffix.lower()
    if suffix not in PREPARED_CODECS:
        raise DataError(f"prepare: no codec for {target.suffix!r} files; known: {sorted(PREPARED_CODECS)}")
    try:
        decoder = open_video(source, seek_mode="exact")  # one thread; a file with no video stream is named so
        metadata = decoder.metadata
        begin, end = metadata.begin_stream_seconds or 0.0, metadata.end_stream_seconds
        if not metadata.num_frames or end is None or end <= begin:
            raise BrokenVideoError(source, "no decodable frames")
        duration = end - begin
        source_fps = metadata.average_fps or settings.fps
        fps = min(source_fps, max(settings.fps, settings.min_frames / duration))
        count = max(1, math.floor(duration * fps))
        times = begin + (torch.arange(count, dtype=torch.float64) + 0.5) / fps  # [n] seconds, centres of slots
        size = _prepared_size(metadata.height, metadata.width, settings.short_side)
        chunks = []
        for first in range(0, count, PREPARE_CHUNK):
            frames = decoder.get_frames_played_at(times[first : first + PREPARE_CHUNK].tolist()).data
            if tuple(frames.shape[-2:]) != size:
                frames = v2.functional.resize(frames, list(size), antialias=True)
            chunks.append(frames)  # uint8 [chunk, 3, h, w]
    except (RuntimeError, ValueError, IndexError, OSError) as error:
        raise BrokenVideoError(source, f"{type(error).__name__}: {error}") from error
    codec, options, keyframe_interval = PREPARED_CODECS[suffix]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.partial{target.suffix}")  # the suffix picks the container
    try:
        VideoEncoder(torch.cat(chunks), frame_rate=fps).to_file(
            partial,
            codec=codec,
            pixel_format="yuv420p",
            extra_options={**options, "g": str(settings.keyframe_interval or keyframe_interval)},
        )
        os.replace(partial, target)
    except (RuntimeError, ValueError, OSError) as error:
        raise BrokenVideoError(source, f"re-encoding failed: {type(error).__name__}: {error}") from error
    finally:
        partial.unlink(missing_ok=True)


def _prepare_one(job: tuple[Path, Path, PrepareSettings]) -> str | None:
    """One video in a worker process (one thread): None when done, else why the source is broken."""
    source, target, settings = job
    with single_threaded():
        try:
            prepare_video(source, target, settings)
        except BrokenVideoError as error:
            return error.reason
    return None


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Initializer of ``prepare``'s worker processes: die with the parent, leaving no orphans behind however it ends.

    On Linux the kernel is asked (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill the worker when the parent dies,
    even by SIGKILL, when no cleanup of its own can run. Without it, a worker orphaned by a killed ``prepare`` waits
    forever for jobs (it holds the job pipe's write end too, so it never sees the end of it). A worker whose parent
    died before the request was made exits at once. Elsewhere only that check is made.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _check_claim(out: Path, wanted: dict) -> bool:
    """Whether ``out`` is already the copy ``wanted`` describes (False: a new or empty folder); refuse any other.

    ``prepare`` only ever writes into its own output: the marker (PREPARE_MARKER_FILE) it writes into a new or
    empty ``out`` records the source root and the settings, and a rerun resumes only a folder whose marker names
    the same. A folder with another marker, or holding anything without one (another dataset, someone's files), is
    refused, so none of its files is overwritten, deleted or counted as a video already done.
    """
    marker = out / PREPARE_MARKER_FILE
    if out.exists() and not out.is_dir():
        raise DataError(f"prepare: --out {out} is a file; expected a new or empty folder, or a copy to resume")
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            found = None
        if not isinstance(found, dict) or set(found) != set(wanted):
            raise DataError(
                f"prepare: --out {out} holds a {PREPARE_MARKER_FILE} that is no prepared copy's marker; "
                "choose another folder"
            )
        if found["source"] != wanted["source"]:
            raise DataError(
                f"prepare: --out {out} is a copy of {found['source']}, not of --root {wanted['source']}; "
                "use another --out, or that --root to resume it"
            )
        if found["settings"] != wanted["settings"]:
            raise DataError(
                f"prepare: --out {out} was prepared with other settings ({found['settings']}); asked for "
                f"{wanted['settings']}. Use another --out, or the same settings to resume it"
            )
        return True
    leftovers = {f".{PREPARE_MARKER_FILE}.partial", PREPARE_LOCK_FILE}  # all that a run killed while marking leaves
    if out.is_dir() and any(entry.name not in leftovers for entry in out.iterdir()):
        raise DataError(
            f"prepare: --out {out} is not empty and is no copy made by prepare (it has no {PREPARE_MARKER_FILE}); "
            "choose a new or empty folder"
        )
    return False


@contextlib.contextmanager
def _claimed(out: Path, root: Path, settings: PrepareSettings) -> Iterator[None]:
    """Own ``out`` while the body runs: it is checked (``_check_claim``), locked, checked again and marked.

    The lock (PREPARE_LOCK_FILE, ``plumbing.runs.held_lock`` as a run folder's) keeps two prepares out of one
    folder, so two runs with other settings cannot both write into a new ``out``: the second is refused, and a later
    one finds the first one's marker. Nothing is written into a folder refused by the first check.
    """
    wanted = {"source": str(root.resolve()), "settings": dataclasses.asdict(settings)}
    _check_claim(out, wanted)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / PREPARE_LOCK_FILE
    with held_lock(lock, f"prepare: --out {out} is in use by another prepare (it holds {lock})"):
        if not _check_claim(out, wanted):  # again, now that no other prepare can mark it
            partial = out / f".{PREPARE_MARKER_FILE}.partial"
            try:
                partial.write_text(json.dumps(wanted, indent=2) + "\n")
                os.replace(partial, out / PREPARE_MARKER_FILE)
            finally:
                partial.unlink(missing_ok=True)
        yield


def prepare_dataset(
    name: str,
    root: Path | str,
    out: Path | str,
    settings: PrepareSettings | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
) -> PrepareReport:
    """Write a prepared copy of dataset ``name`` from ``root`` to ``out``, in the same layout, for training to read.

    Every video under the layout's video folder (suffixes of PREPARED_CODECS) is re-encoded by
    ``prepare_video`` to the same relative path, name and container, so the split files, which are copied
    unchanged with the label files (and NO_FLIP_MARKER), find them. Resumable and idempotent: a video already
    in ``out`` is skipped, so a rerun only does what is left; ``out`` must be new, empty, or a copy of the same
    ``root`` with the same settings (``_claimed``). A broken source does not stop the run: it is
    listed in ``out/prepare_failures.txt`` (rewritten by each run) and in the report, and stays absent from the
    copy, where the loaders report it as they would in the original.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    settings = settings or PrepareSettings(name)
    if settings.dataset != name:
        raise DataError(f"prepare: settings are for {settings.dataset!r}, not {name!r}")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DataError(f"{name}: dataset root {root} not found.\nExpected layout (ROOT = {root}):\n{LAYOUTS[name]}")
    resolved_root, resolved_out = root.resolve(), out.resolve()
    if resolved_out == resolved_root:
        raise DataError(f"prepare: --out {out} is the dataset root itself; choose another folder")
    if resolved_out.is_relative_to(resolved_root):
        raise DataError(
            f"prepare: --out {out} is inside the dataset it copies (--root {root}); choose a folder outside it"
        )
    if resolved_root.is_relative_to(resolved_out):
        raise DataError(f"prepare: --out {out} holds the dataset it copies (--root {root}); choose a folder outside it")
    require_ffmpeg()
    video_dir = require_path(root / PROTOCOLS[name].videos, name, root)
    metadata_dir = require_path(root / PROTOCOLS[name].annotations, name, root)
    with _claimed(out, root, settings):
        shutil.copytree(metadata_dir, out / PROTOCOLS[name].annotations, dirs_exist_ok=True)
        if (root / NO_FLIP_MARKER).exists():
            shutil.copy2(root / NO_FLIP_MARKER, out / NO_FLIP_MARKER)
        sources = sorted(p for p in video_dir.rglob("*") if p.suffix.lower() in PREPARED_CODECS and p.is_file())
        jobs, skipped = [], 0
        for source in sources:
            target = out / source.relative_to(root)
            if target.exists():
                skipped += 1
            else:
                jobs.append((source, target, settings))

        failures = []
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
                outcomes = tqdm(
                    pool.map(_prepare_one, jobs, chunksize=4),
                    total=len(jobs),
                    desc=f"prepare {name}",
                    disable=not progress,
                )
                failures = [(job[0], reason) for job, reason in zip(jobs, outcomes) if reason is not None]
        else:
            for job in tqdm(jobs, desc=f"prepare {name}", disable=not progress):
                reason = _prepare_one(job)
                if reason is not None:
                    failures.append((job[0], reason))

        listed = [(source.relative_to(root).as_posix(), " ".join(reason.split())) for source, reason in failures]
        failures_file = out / PREPARE_FAILURES_FILE
        if listed:
            failures_file.write_text("".join(f"{path}\t{reason}\n" for path, reason in listed))
        else:
            failures_file.unlink(missing_ok=True)
        return PrepareReport(written=len(jobs) - len(failures), skipped=skipped, failures=listed)


app = typer.Typer(add_completion=False)


@app.command()
def prepare(
    dataset: Annotated[Literal[DATASETS], typer.Option(help="Which dataset.", show_default=False)],
    root: Annotated[
        Path, typer.Option(help="The dataset as published (layouts: docs/datasets.md).", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Where the prepared copy goes (same layout), outside --root: a new or empty folder, or this copy to "
            "resume; pass it as --root later.",
            show_default=False,
        ),
    ],
    fps: Annotated[
        float, typer.Option(help="Frames per second kept; 3 as in the authors' preprocessing.")
    ] = PrepareSettings.fps,
    min_frames: Annotated[
        int, typer.Option(help="Frames kept at least, in a short video.")
    ] = PrepareSettings.min_frames,
    short_side: Annotated[
        int,
        typer.Option(
            help="Pixels; never upscaled. 256, not 224: training's random resized crop takes 40-100% of the area "
            "and resizes it to 224, so a larger source keeps more real pixels; evaluation resizes to 224 anyway."
        ),
    ] = PrepareSettings.short_side,
    keyframe_interval: Annotated[int, typer.Option(help="Frames between keyframes; 0: the container's choice.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes; 0: one per core.")] = 0,
) -> None:
    """Re-encode a dataset's videos once into a small, seek-friendly copy; rerun to resume."""
    with reported_errors():
        if workers < 0:
            raise DataError(f"prepare: --workers {workers}: expected 0 (one per core) or more")
        settings = PrepareSettings(dataset, fps, min_frames, short_side, keyframe_interval or None)
        start = time.perf_counter()
        report = prepare_dataset(dataset, root, out, settings, workers=workers or available_cores())
        elapsed = time.perf_counter() - start
    typer.echo(
        f"{out}: {report.written} videos written, {report.skipped} already done, "
        f"{len(report.failures)} broken sources, in {elapsed:.1f} s"
    )
    if report.failures:
        typer.echo(f"broken sources (also in {out / PREPARE_FAILURES_FILE}):")
        for path, reason in report.failures:
            typer.echo(f"  {path}: {reason}")


if __name__ == "__main__":
    app()
