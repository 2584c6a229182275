"""A dataset's files, below the reading path: machinery a first reading of ``data.py`` may skip.

- Split and caption files: ``DataError`` is the error of bad input; the readers here turn a missing file, a file that
  is not UTF-8, JSON or the expected CSV, or a line that does not parse into one DataError naming the file (and
  line). ``LAYOUTS`` shows each dataset's expected layout in those messages; ``SplitListing`` is what a lister
  returns.
- Videos: ``open_video`` refuses a file with no video stream and shrinks oversized frames while decoding;
  ``write_video`` encodes the synthetic clips and the tests' videos.
- The loader's workers (``VideoLoader``, what ``data.build_loader`` returns): each item draws its frames, crop and
  flip from its own random stream, so the draws do not depend on which worker loads it (``LoaderItems``), and a
  DataError met in a worker reaches the main process as the same error (``WorkerFailure``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import torchcodec
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info
from torchcodec import transforms as decoder_transforms
from torchcodec.decoders import VideoDecoder, get_container_metadata
from torchcodec.encoders import VideoEncoder

from loading.errors import DataError

LAYOUTS = {
    "ucf101": """\
ROOT/UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi
ROOT/ucfTrainTestlist/classInd.txt      "1 ApplyEyeMakeup"
ROOT/ucfTrainTestlist/trainlist01.txt   "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
ROOT/ucfTrainTestlist/testlist01.txt    "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi" (no label)""",
    "hmdb51": """\
ROOT/videos/brush_hair/<video name>.avi
ROOT/testTrainMulti_7030_splits/brush_hair_test_split1.txt   "<video name>.avi 1"  (1 train, 2 test, 0 unused)""",
    "ssv2": """\
ROOT/20bn-something-something-v2/<id>.webm
ROOT/labels/labels.json       {"Approaching something with your camera": "0", ...}
ROOT/labels/train.json        [{"id": "78687", "template": "Holding [something] next to [something]", ...}, ...]
ROOT/labels/validation.json   same form (the test split)""",
    "msrvtt": """\
ROOT/MSRVTT_Videos/video0.mp4 ... video9999.mp4
ROOT/msrvtt_data/MSRVTT_data.json           {"videos": [...], "sentences": [{"caption": ..., "video_id": ...}, ...]}
ROOT/msrvtt_data/MSRVTT_train.9k.csv        one column: video_id
ROOT/msrvtt_data/MSRVTT_JSFUSION_test.csv   key,vid_key,video_id,sentence""",
    "kinetics400": """\
ROOT/annotations/train.csv   "label,youtube_id,time_start,time_end,split,is_cc"   (val.csv alike: the test split)
ROOT/train/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4      (CVDF's k400_extractor.sh; val/ alike)
  or ROOT/videos/train/<label>/<the same name>.mp4                (CVDF's arrange_by_classes.py)
ROOT/replacement/replacement_for_corrupted_k400/<the same name>.mp4   (optional: CVDF's replacements, read first)""",
    "msvd": """\
ROOT/YouTubeClips/<id>.avi                        e.g. -4wsuPCjDBc_5_15.avi
ROOT/msvd_data/{train,val,test}_list.txt          one id per line
ROOT/msvd_data/raw-captions.pkl                   {id: [[word, ...], ...]}""",
    "lsmdc": """\
ROOT/videos/**/<CLIP_ID>.avi                      any depth, e.g. 3086_UGLY_TRUTH_00.23.23.000-00.23.28.886.avi
ROOT/annotations/LSMDC16_annos_training.csv       CLIP_ID<tab>4 times<tab>SENTENCE
ROOT/annotations/LSMDC16_challenge_1000_publictect.csv   the same form (the 1,000-clip test)""",
    "activitynet": """\
ROOT/videos/**/<ytid>.mp4                         any depth and container; key v_<ytid> -> <ytid>
ROOT/captions/{train,val_1}.json                  {"v_<ytid>": {"duration": ..., "sentences": [...]}}
ROOT/captions/{train_ids,val_ids}.json            ["v_<ytid>", ...]  (val_1 is the test split)""",
    "didemo": """\
ROOT/videos/**/<name as listed>                   e.g. 54153313@N00_5138457779_cd6d1b0637.mov (or .mov.mp4)
ROOT/annotations/{train,test}_list.txt            one video file name per line
ROOT/annotations/{train,test}_data.json           [{"video": <file name>, "description": ..., "times": ...}, ...]""",
    "vatex": """\
ROOT/videos/**/<id>.mp4                           any depth and container
ROOT/annotations/{train,test}_list.txt            one id per line
ROOT/annotations/ref_captions.json                {id: [caption, ...]}""",
}


NO_FLIP_MARKER = "no_horizontal_flip.txt"  # a dataset root holding this file is never flipped left/right in training


@dataclass
class SplitListing:
    """What a split file says: video paths and targets, plus class names for recognition."""

    paths: list[Path]
    targets: list[int] | list[str]
    classes: list[str] | None = None
    caption_groups: list[list[str]] | None = None  # multi-caption test sets: the captions of each video
    left_out: list[str] = dataclasses.field(default_factory=list)  # listed videos the split lost


def require_path(path: Path, dataset: str, root: Path) -> Path:
    """``path`` itself, or a DataError naming it and showing the expected layout."""
    if not path.exists():
        raise DataError(f"{dataset}: {path} not found.\nExpected layout (ROOT = {root}):\n{LAYOUTS[dataset]}")
    return path


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the non-empty lines, without line ends or trailing blanks (names may contain spaces)."""
    text = path.read_text(encoding="utf-8", errors="surrogateescape")  # odd bytes in names round-trip to the path
    return [(number, line.rstrip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_json(path: Path, dataset: str) -> object:
    """The JSON in ``path``, or one DataError naming the file and what is wrong with it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{dataset}: {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{dataset}: {path} is not valid JSON: {error.msg} at line {error.lineno}") from None


def read_csv(path: Path, columns: tuple[str, ...], root: Path, dataset: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a csv file of ``dataset``, which must have a header naming ``columns`` (a UTF-8
    byte-order mark before it is fine), then one row per line with a value for each field of the header.

    A row that does not parse is a DataError naming the file and line: one with a field too many or too few, or one
    that runs on over several lines (a stray ``"`` opens a quoted field that swallows the line end and the next
    row, so that rows would merge and a label would hold a newline).
    """
    rows = []
    try:
        with require_path(path, dataset, root).open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = next(reader, [])
            if not set(columns) <= set(header):
                raise DataError(f"{dataset}: {path} should start with the header {','.join(columns)}")
            last_line = reader.line_num
            for fields in reader:
                number, last_line = last_line + 1, reader.line_num
                if not fields:
                    continue  # a blank line
                if last_line != number:
                    raise DataError(
                        f"{dataset}: {path}, line {number}: the row runs on to line {last_line} (a stray '\"'?), "
                        "expected one row per line"
                    )
                if len(fields) != len(header):
                    raise DataError(
                        f"{dataset}: {path}, line {number}: {len(fields)} fields, expected {len(header)} "
                        f"({','.join(header)})"
                    )
                rows.append((number, dict(zip(header, fields))))
    except UnicodeDecodeError as error:
        raise DataError(f"{dataset}: {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except csv.Error as error:
        raise DataError(f"{dataset}: {path}, line {reader.line_num}: {error}") from None
    return rows


def video_in(video_dir: Path, entry: str, dataset: str, where: str) -> Path:
    """``video_dir / entry``, or a DataError naming ``where`` (file and line) when ``entry``, a video id read from a
    dataset file, would leave the dataset's video folder (an absolute path, a ``..`` part)."""
    relative = PurePosixPath(entry)
    if relative.is_absolute() or ".." in relative.parts:
        raise DataError(f"{dataset}: {where}: the video {entry!r} is outside {video_dir}; ids must stay inside it")
    return video_dir / entry


def readable_class_name(folder_name: str) -> str:
    """Folder name -> words for a text prompt: 'ApplyEyeMakeup' -> 'apply eye makeup', 'YoYo' -> 'yo yo',
    'brush_hair' -> 'brush hair'."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", folder_name.replace("_", " "))
    return " ".join(words.lower().split())


# --------------------------------------------------------------------------
# Opening a video safely: a file with no video stream, or frames too large to hold
# --------------------------------------------------------------------------


class BrokenVideoError(DataError):
    """A video file that cannot be decoded (missing, empty, truncated, not a video)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot decode video {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        return BrokenVideoError, (self.path, self.reason)  # rebuilt from both arguments, not the message


class BrokenVideoWarning(UserWarning):
    """A broken video was skipped and replaced by another sample."""


# Frames larger than this are shrunk by the decoder itself (aspect kept), so a huge video cannot blow up memory
# (one 8000 x 8000 frame is 192 MB of uint8): short side at most 720 px, long side at most 2880 px. That is well
# above every input CLIP takes (224 or 336 px), even after a training crop of 40% of the area, and leaves the
# usual sizes (UCF101's 320 x 240, 720p) decoded as they are.
MAX_DECODED_SHORT_SIDE = 720
MAX_DECODED_LONG_SIDE = 2880


def open_video(path: Path, seek_mode: str) -> VideoDecoder:
    """A one-thread decoder for ``path`` that shrinks frames beyond the MAX_DECODED_* bounds while decoding
    (TorchCodec's ``Resize`` decoder transform, antialiased), so no oversized frame is ever held in memory."""
    try:
        decoder = VideoDecoder(path, seek_mode=seek_mode, num_ffmpeg_threads=1)
    except ValueError:  # TorchCodec asks for a bug report when a file has no video stream (audio only): say so
        if get_container_metadata(path).best_video_stream_index is None:
            raise BrokenVideoError(path, "the file has no video stream") from None
        raise
    height, width = decoder.metadata.height or 1, decoder.metadata.width or 1
    scale = min(MAX_DECODED_SHORT_SIDE / min(height, width), MAX_DECODED_LONG_SIDE / max(height, width))
    if scale >= 1:
        return decoder
    size = [max(1, round(height * scale)), max(1, round(width * scale))]  # aspect kept
    return VideoDecoder(path, seek_mode=seek_mode, num_ffmpeg_threads=1, transforms=[decoder_transforms.Resize(size)])


# --------------------------------------------------------------------------
# Writing videos, and the CPU they are read on: for synthetic.py, prepare.py and the tests
# --------------------------------------------------------------------------

FFMPEG_MISSING = """\
TorchCodec could not load FFmpeg's libraries, which it needs to read and write
video. Install FFmpeg (major version 4 to 8) and run again:
  Debian/Ubuntu:  sudo apt-get install ffmpeg
  macOS:          brew install ffmpeg
  conda:          conda install -c conda-forge ffmpeg"""


def require_ffmpeg() -> None:
    """Raise DataError with install instructions when FFmpeg's libraries are missing."""
    if torchcodec.ffmpeg_major_version is None:
        raise DataError(FFMPEG_MISSING)


# Codec per container: what the benchmarks use (UCF101/HMDB51, MSR-VTT, SSv2).
CODECS = {
    ".avi": ("mpeg4", {}),  # MPEG-4 Part 2, FFmpeg's built-in encoder
    ".mp4": ("libx264", {}),  # H.264
    ".webm": ("libvpx-vp9", {"deadline": 1, "cpu-used": 8}),  # VP9, realtime speed
}


def write_video(path: Path | str, frames: Tensor, fps: float) -> None:
    """Encode ``frames`` (uint8 ``[T, 3, H, W]``, RGB, even H and W) to a real video file.

    The codec follows the suffix: ``.avi`` MPEG-4 Part 2, ``.mp4`` H.264, ``.webm`` VP9.
    """
    require_ffmpeg()
    path = Path(path)
    if path.suffix not in CODECS:
        raise ValueError(f"write_video: unknown suffix {path.suffix!r}; use one of {sorted(CODECS)}")
    codec, options = CODECS[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    VideoEncoder(frames, frame_rate=fps).to_file(
        path, codec=codec, pixel_format="yuv420p", extra_options=options or None
    )


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run small tensor work on one thread, as DataLoader workers do: with a busy CPU, waiting for a second thread costs
    more than the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def available_cores() -> int:
    """The cores this process may run on (its affinity, where ``os.cpu_count`` would report the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --------------------------------------------------------------------------
# The loader's workers: each item's own random stream, and a DataError carried back whole
# --------------------------------------------------------------------------


@dataclass
class WorkerFailure:
    """A DataError met in a DataLoader worker, carried to the main process in place of a batch.

    PyTorch would send only the error's type and traceback text and rebuild it from that text, so the user would
    read "Caught DataError in DataLoader worker process 0. Original Traceback ..." (or a RuntimeError, for a
    BrokenVideoError, whose constructor takes two arguments). The error itself pickles, so it travels as it is.
    """

    error: DataError


class LoaderItems(Dataset):
    """``dataset`` as ``VideoLoader`` reads it: item ``i`` of epoch ``e`` draws from its own random stream.

    Each item seeds torch's random number generator with a 64-bit hash of ``(seed, e, i)`` (frame sampling and the
    crop and flip use it), inside ``torch.random.fork_rng`` so the calling process's own stream is untouched. The
    draws are then the same whichever worker process (or the main one, with no workers) loads the item, whatever
    that worker loaded before it in earlier epochs, and however many workers there are: ``--resume``, which starts
    fresh workers, continues exactly. ``epoch`` lives in shared memory: persistent workers see ``set_epoch``.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int | str] | WorkerFailure:
        try:
            with torch.random.fork_rng(devices=[]):
                digest = hashlib.sha256(f"{self.seed}/{int(self.epoch)}/{index}".encode()).digest()
                torch.manual_seed(int.from_bytes(digest[:8], "little"))  # unrelated streams for distinct triples
                return self.dataset[index]
        except DataError as error:
            if get_worker_info() is None:
                raise  # no workers: it reaches the caller as it is anyway
            return WorkerFailure(error)


def collate_or_failure(items: list) -> object:
    """``default_collate``, or the batch's first ``WorkerFailure`` (to be raised by ``VideoLoader``)."""
    failures = [item for item in items if isinstance(item, WorkerFailure)]
    return failures[0] if failures else default_collate(items)


class VideoLoader(DataLoader):
    """A DataLoader over ``LoaderItems``: raises a worker's DataError in the main process as the same error (one
    ``error:`` line, as with no workers), and ``set_epoch`` gives the sampler and the items' random draws the epoch."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch.fill_(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        for batch in super().__iter__():
            if isinstance(batch, WorkerFailure):
                raise batch.error
            yield batch
