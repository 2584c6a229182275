"""Video data for STOP, the reading path: video files on disk -> the clips CLIP sees.

STOP (CVPR 2025) adapts a frozen CLIP to video, so every model in this project eats the same thing: ``T`` frames of
a clip, each resized to CLIP's input resolution and normalised with CLIP's mean/std, as a float tensor
``[T, 3, R, R]`` (the paper's video ``x``, batched to ``[B, T, 3, R, R]``). In order:

1. Decoding with TorchCodec (FFmpeg underneath): only the sampled frames are decoded, by one seek per call.
2. Sampling ``T`` frames (TSN style): training picks one random frame in each of ``T`` equal segments, evaluation
   the segment centres, optionally ``K`` evenly offset temporal views.
3. Transforms (one set of random parameters per clip): training = random resized crop + horizontal flip (never for
   SSv2 or the synthetic set, where left and right are the label); evaluation = resize + centre crop, or the three
   squares along the long side (``three_crops``, X-CLIP's multi-view test).
4. ``VideoDataset``: items ``(video, label)`` for action recognition, ``(video, caption)`` for text-video
   retrieval. A broken video is reported with its path, replaced and counted, or with ``strict`` an error.
5. Layouts: ``build_dataset`` reads each of the ten benchmarks from its published folders and split files. Two are
   shown here as worked examples, UCF101 and MSR-VTT 1k-A; ``layouts.py`` reads the other eight the same way.
   ``protocols.py`` says how each is read, trained on and scored.
6. ``build_loader``: each item draws its frames, crop and flip from its own random stream (seed, epoch, item), so a
   resumed run continues exactly with any number of worker processes (``video_loader.py``).

Machinery a first reading may skip, all below this module: ``dataset_files.py`` (file readers, opening videos safely),
``video_loader.py`` (the loader's per-clip streams and worker errors) and ``layouts.py`` (the other eight layouts).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from loading import layouts
from loading.dataset_files import (
    LAYOUTS,
    NO_FLIP_MARKER,
    BrokenVideoError,
    BrokenVideoWarning,
    LoaderItems,
    SplitListing,
    VideoLoader,
    collate_or_failure,
    open_video,
    read_csv,
    read_json,
    read_lines,
    readable_class_name,
    require_ffmpeg,
    require_path,
    video_in,
)
from loading.errors import DataError
from loading.protocols import DATASETS, PROTOCOLS, RETRIEVAL_DATASETS
from loading.synthetic import ensure_synthetic

SPLITS = ("train", "test")

# OpenAI CLIP's pixel statistics (RGB, for pixel values scaled to [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Training crops keep at least this share of the frame area, so the moving object usually stays in view (the classic
# 0.08 is tuned for ImageNet).
CROP_AREA_RANGE = (0.4, 1.0)
# Stop replacing broken videos after this many in a row: the data is gone.
MAX_BROKEN_IN_A_ROW = 50


# --------------------------------------------------------------------------
# Reading video files: decoding, frame sampling, transforms
# --------------------------------------------------------------------------


def sample_indices(
    num_video_frames: int,
    num_frames: int,
    *,
    train: bool,
    views: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Frame indices to decode, long ``[views, num_frames]``.

    The video's frames are cut into ``num_frames`` segments of (near) equal length. Training takes one uniformly random
    frame per segment, a fresh draw each time; evaluation takes a fixed point per segment: its centre when
    ``views == 1``, else the points ``(k + 0.5) / views`` of the way through each segment for view ``k``, so the
    ``views`` clips are evenly offset in time. A video shorter than ``num_frames`` frames repeats frames.
    """
    if num_video_frames < 1:
        raise ValueError("a video needs at least one frame")
    if train and views != 1:
        raise ValueError("several temporal views are for evaluation only")
    segment_length = num_video_frames / num_frames
    segment_index = torch.arange(num_frames, dtype=torch.float64)  # [T]
    if train:
        starts = (segment_index * segment_length).floor()
        lengths = ((segment_index + 1) * segment_length).floor().clamp(min=starts + 1) - starts  # >= 1 frame
        positions = starts + (torch.rand(1, num_frames, generator=generator, dtype=torch.float64) * lengths).floor()
    else:
        position_in_segment = ((torch.arange(views, dtype=torch.float64) + 0.5) / views)[:, None]  # [K, 1]
        positions = (segment_index + position_in_segment) * segment_length  # [K, T]
    return positions.floor().long().clamp(0, num_video_frames - 1)


def read_frames(
    path: Path,
    num_frames: int,
    *,
    train: bool,
    views: int = 1,
    generator: torch.Generator | None = None,
    first_seconds: float | None = None,
) -> Tensor:
    """Decode the sampled frames of one video: uint8 ``[views * num_frames, 3, H, W]``, H and W within the
    MAX_DECODED_* bounds (see ``open_video``). With ``first_seconds``, only the frames of the video's first
    ``first_seconds`` seconds are sampled (DiDeMo, whose descriptions cover the first 30 s).

    The fast path trusts the container's frame count and seeks straight to the frames ("approximate" mode, no scan of
    the file). Headers lie: a truncated AVI still announces all its frames, and WebM has no count at all. If that fails,
    the file is scanned ("exact" mode) to count the frames really there and the indices are drawn again. Anything else
    raises BrokenVideoError.
    """
    try:
        for seek_mode in ("approximate", "exact"):
            decoder = open_video(path, seek_mode)
            frames, fps = decoder.metadata.num_frames, decoder.metadata.average_fps
            if frames and first_seconds is not None and fps:  # the frames of the first seconds only
                frames = max(1, min(frames, math.ceil(first_seconds * fps)))
            if not frames:
                continue  # no count in the header: scan the file
            indices = sample_indices(frames, num_frames, train=train, views=views, generator=generator)
            try:
                return decoder.get_frames_at(indices.flatten()).data
            except (RuntimeError, IndexError):
                if seek_mode == "exact":
                    raise
                # the header promised frames that are not there: count them
        raise BrokenVideoError(path, "no decodable frames")
    except (RuntimeError, ValueError, IndexError, OSError) as error:
        raise BrokenVideoError(path, f"{type(error).__name__}: {error}") from error


def build_transform(resolution: int, *, train: bool, hflip: bool = True, crops: int = 1) -> v2.Compose:
    """uint8 video ``[N, 3, H, W]`` -> float32 ``[N, 3, R, R]``, CLIP-normalised.

    One set of random parameters per call, so every frame of a clip gets the same crop and the same flip. Evaluation
    with ``crops=3`` stops before the centre crop: ``[N, 3, R, L]`` or ``[N, 3, L, R]``, the short side resized to R,
    for ``three_crops`` to cut.
    """
    if train:
        geometry = [v2.RandomResizedCrop(resolution, scale=CROP_AREA_RANGE, antialias=True)]
        if hflip:
            geometry.append(v2.RandomHorizontalFlip())
    else:
        geometry = [v2.Resize(resolution, antialias=True)]
        if crops == 1:
            geometry.append(v2.CenterCrop(resolution))
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])


def three_crops(frames: Tensor, size: int) -> Tensor:
    """The 3-crop test of X-CLIP and ViFi-CLIP: ``[N, 3, H, W]`` frames whose short side is ``size`` ->
    ``[3, N, 3, size, size]``, the squares at the start, centre and end of the long side (left, centre, right of a
    landscape frame; top, centre, bottom of a portrait one), which together cover the whole frame."""
    height, width = frames.shape[-2:]
    long_side = max(height, width)
    offsets = (0, (long_side - size) // 2, long_side - size)
    if width >= height:
        return torch.stack([frames[..., :size, offset : offset + size] for offset in offsets])
    return torch.stack([frames[..., offset : offset + size, :size] for offset in offsets])


# --------------------------------------------------------------------------
# The dataset: a list of (video path, target) pairs
# --------------------------------------------------------------------------


class VideoDataset(Dataset):
    """Items ``(video, target)``: video float32 ``[T, 3, R, R]``, or ``[K, T, 3, R, R]`` with K > 1 views.

    Evaluation can take several views of a video, whose features are averaged: ``views`` temporal ones (evenly offset
    frames, ``sample_indices``) times ``crops`` spatial ones (1: the centre square; 3: ``three_crops``), K = views x
    crops, ordered view by view (item ``k`` is view ``k // crops``, crop ``k % crops``).

    ``target`` is a class index (recognition, names in ``.classes``) or a caption (retrieval). ``.paths[i]`` is item i's
    video file.

    A broken video is warned about with its path and replaced by the next item; ``broken_count()`` counts the distinct
    broken videos met, in this process and its DataLoader worker processes, however often each was tried.
    ``keep_alignment=True`` (the retrieval test set, where item i must stay the i-th ground-truth pair) keeps the target
    and returns a blank clip (CLIP's mean colour, zeros after normalisation) instead.

    A multi-caption retrieval test set (MSVD, VATEX) has one item per video, its target the item's index, and
    ``caption_groups[i]`` the captions of video i. ``first_seconds`` limits sampling to the start of each video
    (``read_frames``). ``left_out`` names the listed videos the split lost (missing files, no captions).
    """

    def __init__(
        self,
        paths: list[Path],
        targets: list[int] | list[str],
        *,
        num_frames: int,
        resolution: int,
        train: bool,
        views: int = 1,
        crops: int = 1,
        hflip: bool = True,
        strict: bool = False,
        classes: list[str] | None = None,
        keep_alignment: bool = False,
        caption_groups: list[list[str]] | None = None,
        first_seconds: float | None = None,
        left_out: list[str] | None = None,
    ):
        if len(paths) != len(targets):
            raise ValueError("one target per video")
        if train and views != 1:
            raise DataError("several temporal views (views > 1) are for evaluation only")
        if crops not in (1, 3):
            raise DataError(f"crops {crops}: expected 1 (the centre square) or 3 (left, centre and right squares)")
        if train and crops != 1:
            raise DataError("several spatial crops (crops 3) are for evaluation only")
        self.paths = paths
        self.targets = targets
        self.classes = classes
        self.num_frames = num_frames
        self.resolution = resolution
        self.train = train
        self.views = views
        self.crops = crops
        self.strict = strict
        self.keep_alignment = keep_alignment
        self.caption_groups = caption_groups
        self.first_seconds = first_seconds
        self.left_out = left_out or []
        self.transform = build_transform(resolution, train=train, hflip=hflip, crops=crops)
        # Which items' videos were found broken, bool [len(paths)] in shared memory: every process (main, DataLoader
        # workers, fork or spawn) only ever sets flags, so no lock is needed, and a video tried again (as a replacement,
        # in a later epoch) is still one video.
        self._broken = torch.zeros(len(paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def broken_count(self) -> int:
        """How many distinct broken videos were met since creation (or the last reset)."""
        return int(self._broken.sum())

    def broken_items(self) -> list[int]:
        """The items whose video was found broken, in order (to merge the findings of several ranks)."""
        return self._broken.nonzero().flatten().tolist()

    def reset_broken_count(self) -> None:
        self._broken.zero_()

    def __getitem__(self, index: int) -> tuple[Tensor, int | str]:
        attempts = min(len(self), MAX_BROKEN_IN_A_ROW)
        for attempt in range(attempts):
            item = (index + attempt) % len(self)
            try:
                frames = read_frames(
                    self.paths[item],
                    self.num_frames,
                    train=self.train,
                    views=self.views,
                    first_seconds=self.first_seconds,
                )
            except BrokenVideoError as error:
                self._report_broken(error, item=item, replacement=(item + 1) % len(self))
                if self.keep_alignment:
                    return self._blank_clip(), self.targets[index]
                continue
            clip = self.transform(tv_tensors.Video(frames)).as_subclass(Tensor)  # [V*T, 3, R, R], V temporal views
            if self.crops == 3:  # clip is uncropped: [V*T, 3, R, L] or [V*T, 3, L, R]
                crops = three_crops(clip, self.resolution)  # [3, V*T, 3, R, R]
                crops = crops.unflatten(1, (self.views, self.num_frames)).transpose(0, 1)  # [V, 3, T, 3, R, R]
                clip = crops.flatten(0, 1)  # [V*3, T, 3, R, R]
            elif self.views > 1:
                clip = clip.unflatten(0, (self.views, self.num_frames))  # [V, T, 3, R, R]
            return clip, self.targets[item]
        raise DataError(
            f"{attempts} videos in a row from {self.paths[index]} could not be decoded; "
            "check the video folder and that this FFmpeg can decode their codec"
        )

    def _report_broken(self, error: BrokenVideoError, *, item: int, replacement: int) -> None:
        if self.strict:
            raise error
        self._broken[item] = True
        action = "a blank clip instead" if self.keep_alignment else f"using item {replacement} instead"
        warnings.warn(f"{error}; {action}", BrokenVideoWarning, stacklevel=3)

    def _blank_clip(self) -> Tensor:
        shape = (self.num_frames, 3, self.resolution, self.resolution)
        views = self.views * self.crops
        return torch.zeros(shape if views == 1 else (views, *shape))


# --------------------------------------------------------------------------
# Two published layouts, as worked examples (the other eight are in layouts.py)
# --------------------------------------------------------------------------


def list_ucf101(root: Path, split: str, split_id: int) -> SplitListing:
    """UCF101: ``classInd.txt`` gives the classes (1-based); paths in the lists are matched case-insensitively
    (``HandStandPushups`` vs ``HandstandPushups``). A listed video missing on disk is reported as broken when it is
    loaded."""
    video_dir = require_path(root / PROTOCOLS["ucf101"].videos, "ucf101", root)
    list_dir = root / PROTOCOLS["ucf101"].annotations
    class_file = require_path(list_dir / "classInd.txt", "ucf101", root)
    folder_names = []
    for number, line in read_lines(class_file):
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            raise DataError(f"ucf101: {class_file}, line {number}: expected '<index> <ClassName>', found {line!r}")
        folder_names.append(fields[1])
    label_of_folder = {name.lower(): label for label, name in enumerate(folder_names)}
    split_file = require_path(list_dir / f"{split}list{split_id:02d}.txt", "ucf101", root)
    video_of_entry = {path.relative_to(video_dir).as_posix().lower(): path for path in video_dir.glob("*/*")}
    paths, labels = [], []
    for number, line in read_lines(split_file):
        entry = line.split()[0]  # a train line ends with its 1-based label; the folder says it too
        path = video_in(video_dir, entry, "ucf101", f"{split_file}, line {number}")
        folder = entry.split("/")[0].lower()
        if folder not in label_of_folder:
            raise DataError(f"ucf101: class {folder!r} of {entry} ({split_file}) is not in classInd.txt")
        paths.append(video_of_entry.get(entry.lower(), path))
        labels.append(label_of_folder[folder])
    return SplitListing(paths, labels, [readable_class_name(name) for name in folder_names])


def list_msrvtt(root: Path, split: str) -> SplitListing:
    """MSR-VTT with CLIP4Clip's split files. Train: every caption of the 9k videos, in MSRVTT_data.json order. Test: the
    1,000 JSFusion (video, sentence) rows in file order, so item i is the i-th ground-truth pair."""
    video_dir = require_path(root / PROTOCOLS["msrvtt"].videos, "msrvtt", root)
    data_dir = root / PROTOCOLS["msrvtt"].annotations
    if split == "test":
        test_file = data_dir / "MSRVTT_JSFUSION_test.csv"
        rows = read_csv(test_file, ("video_id", "sentence"), root, "msrvtt")
        paths = [video_in(video_dir, f"{row['video_id']}.mp4", "msrvtt", f"{test_file}, line {n}") for n, row in rows]
        return SplitListing(paths, [row["sentence"] for _, row in rows])
    train_file = data_dir / "MSRVTT_train.9k.csv"
    train_videos = set()  # the captions' video ids are taken only when listed here, so checking these is enough
    for number, row in read_csv(train_file, ("video_id",), root, "msrvtt"):
        video_in(video_dir, f"{row['video_id']}.mp4", "msrvtt", f"{train_file}, line {number}")
        train_videos.add(row["video_id"])
    data_file = require_path(data_dir / "MSRVTT_data.json", "msrvtt", root)
    sentences = read_json(data_file, "msrvtt")
    sentences = sentences.get("sentences") if isinstance(sentences, dict) else None
    well_formed = isinstance(sentences, list) and all(
        isinstance(s, dict) and isinstance(s.get("video_id"), str) and isinstance(s.get("caption"), str)
        for s in sentences
    )
    if not well_formed:
        raise DataError(
            f'msrvtt: {data_file} should hold {{"sentences": [{{"caption": ..., "video_id": ...}}, ...]}}, '
            "a 'caption' and a 'video_id' in each"
        )
    pairs = [(s["video_id"], s["caption"]) for s in sentences if s["video_id"] in train_videos]
    return SplitListing([video_dir / f"{video}.mp4" for video, _ in pairs], [caption for _, caption in pairs])


# --------------------------------------------------------------------------
# Datasets and loaders
# --------------------------------------------------------------------------

# Each dataset's lister: (root, split, split_id, strict) -> SplitListing. The two above, and layouts.py's eight.
LISTERS = {
    "ucf101": lambda root, split, split_id, strict: list_ucf101(root, split, split_id),
    "msrvtt": lambda root, split, split_id, strict: list_msrvtt(root, split),
    **layouts.LISTERS,
}


def dataset_location(dataset: str, root: Path | None, task: str) -> tuple[str, Path]:
    """``--dataset`` and ``--root`` as the loader's name and root: ``synthetic`` is generated on first use, in the
    UCF101 layout for recognition and the MSR-VTT layout for retrieval."""
    if dataset == "synthetic":
        base = ensure_synthetic(root or Path("data/synthetic"))
        return ("ucf101", base / "ucf101") if task == "recognize" else ("msrvtt", base / "msrvtt")
    if (dataset in RETRIEVAL_DATASETS) != (task == "retrieve"):
        raise DataError(f"--dataset {dataset} is not a {task} dataset")
    if root is None:
        raise DataError(f"--root is required for --dataset {dataset}: the folder holding it (see docs/datasets.md)")
    return dataset, require_path(Path(root), dataset, Path(root))  # checked before any CLIP is loaded or downloaded


def build_dataset(
    name: str,
    root: Path | str,
    split: str,
    *,
    num_frames: int,
    resolution: int,
    split_id: int = 1,
    views: int = 1,
    crops: int = 1,
    strict: bool = False,
) -> VideoDataset:
    """One of DATASETS read from its published layout under ``root``.

    ``split`` is "train" or "test" (the published test/validation split); ``split_id`` picks UCF101's and HMDB51's split
    1-3; ``resolution`` is the model's input size (``model.visual.input_resolution``); ``views`` temporal and ``crops``
    spatial views (evaluation only, see VideoDataset). Training flips clips left/right except for SSv2 and roots
    holding NO_FLIP_MARKER.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    if name in ("ucf101", "hmdb51") and split_id not in (1, 2, 3):
        raise DataError(f"{name} has splits 1, 2 and 3, not {split_id}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{name}: dataset root {root} not found.\nExpected layout (ROOT = {root}):\n{LAYOUTS[name]}")
    require_ffmpeg()
    listing = LISTERS[name](root, split, split_id, strict)
    if not listing.paths:
        raise DataError(f"{name}: the {split} split under {root} lists no videos")
    hflip = name != "ssv2" and not (root / NO_FLIP_MARKER).exists()  # left and right are SSv2's labels
    return VideoDataset(listing.paths, listing.targets, num_frames=num_frames, resolution=resolution,
                        train=split == "train", views=views, crops=crops, hflip=hflip, strict=strict,
                        classes=listing.classes, keep_alignment=name in RETRIEVAL_DATASETS and split == "test",
                        caption_groups=listing.caption_groups, first_seconds=PROTOCOLS[name].first_seconds,
                        left_out=listing.left_out)  # fmt: skip


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    seed: int = 0,
) -> VideoLoader:
    """A ``VideoLoader`` with ``workers`` processes kept alive across epochs, pinned memory when a GPU is there,
    each item's random draws a function of (``seed``, epoch, item) (see ``LoaderItems``), and the shuffle order
    (without a ``sampler``) drawn from ``seed``. ``loader.dataset`` is the ``LoaderItems`` around ``dataset``."""
    return VideoLoader(LoaderItems(dataset, seed), batch_size=batch_size, shuffle=shuffle and sampler is None,
                       sampler=sampler, num_workers=workers, collate_fn=collate_or_failure, drop_last=drop_last,
                       pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
