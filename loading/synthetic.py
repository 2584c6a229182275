"""The synthetic dataset: STOP's claim in miniature, generated on a CPU with no download.

STOP (CVPR 2025) adds temporal prompts to a frozen CLIP so that it sees how a video changes over time. This
module writes a small dataset whose classes differ only in temporal order: a coloured shape moving left versus
right, up versus down, growing versus shrinking, turning clockwise versus anticlockwise, each class its partner
played backwards. A model that averages its frames cannot tell the partners apart; STOP can.

The videos are real MPEG-4 AVI and H.264 MP4 files in the UCF101 and MSR-VTT layouts, so ``data.py`` reads
them exactly as it reads the published benchmarks (``--dataset synthetic`` is the ``ucf101`` or ``msrvtt``
loader on ``root/ucf101`` or ``root/msrvtt``). ``python train.py recognize --dataset synthetic`` generates it
on first use through ``ensure_synthetic`` (``data.dataset_location``); ``python synthetic.py`` generates it alone.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shutil
from pathlib import Path

import torch
import typer
from torch import Tensor

from loading.dataset_files import NO_FLIP_MARKER, require_ffmpeg, single_threaded, write_video
from loading.errors import DataError, error_message
from loading.protocols import PROTOCOLS

UCF101, MSRVTT = PROTOCOLS["ucf101"], PROTOCOLS["msrvtt"]  # the layouts written, their folders

# Pairs (2k, 2k+1): class 2k+1 is class 2k played backwards.
SYNTHETIC_CLASSES = (
    "MovingLeft", "MovingRight",
    "MovingUp", "MovingDown",
    "Growing", "Shrinking",
    "TurningClockwise", "TurningAnticlockwise",
)  # fmt: skip
SYNTHETIC_SIZE = 64  # pixels, square frames
SYNTHETIC_FRAMES = 16
SYNTHETIC_FPS = 8
SYNTHETIC_GROUPS, SYNTHETIC_CLIPS_PER_GROUP, SYNTHETIC_TEST_GROUPS = 16, 4, 4  # UCF101: 48 train + 16 test per class
SYNTHETIC_RETRIEVAL_TRAIN, SYNTHETIC_RETRIEVAL_TEST = 32, 8  # MSR-VTT: videos per class
SYNTHETIC_VERSION = 1  # bump when the generator changes: old folders are rebuilt

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40),
    "magenta": (210, 50, 200), "cyan": (40, 200, 210), "orange": (240, 140, 30), "white": (240, 240, 240),
}  # fmt: skip
SHAPES = ("square", "triangle", "bar")  # none looks the same after a small turn
PHRASES = {
    "MovingLeft": ("moves to the left", "slides left", "travels from right to left"),
    "MovingRight": ("moves to the right", "slides right", "travels from left to right"),
    "MovingUp": ("moves up", "rises", "travels from bottom to top"),
    "MovingDown": ("moves down", "falls", "travels from top to bottom"),
    "Growing": ("grows", "gets bigger", "expands"),
    "Shrinking": ("shrinks", "gets smaller", "contracts"),
    "TurningClockwise": ("turns clockwise", "rotates clockwise", "spins clockwise"),
    "TurningAnticlockwise": ("turns anticlockwise", "rotates counterclockwise", "spins anticlockwise"),
}


def _uniform(generator: torch.Generator, low: float, high: float, size: tuple[int, ...] = ()) -> Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def _shape_alpha(shape: str, centre_x: Tensor, centre_y: Tensor, size: Tensor, angle: Tensor) -> Tensor:
    """Coverage in [0, 1] of a shape per frame, ``[T, 1, S, S]``; inputs are ``[T]``.

    Pixels are mapped into the shape's own frame (rotated by ``angle``, which turns clockwise on screen as it grows, y
    pointing down); a signed distance to the outline gives one pixel of anti-aliased edge.
    """
    grid = torch.arange(SYNTHETIC_SIZE, dtype=torch.float32) + 0.5
    dx = grid[None, None, :] - centre_x[:, None, None]  # [T, 1, S]
    dy = grid[None, :, None] - centre_y[:, None, None]  # [T, S, 1]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # [T, S, S]
    half = size[:, None, None] / 2
    if shape == "square":
        distance = torch.maximum(u.abs(), v.abs()) - half
    elif shape == "bar":
        distance = torch.maximum(u.abs() - half, v.abs() - half / 3)
    else:  # triangle: three half-planes at the inradius
        normals = torch.tensor([math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6])
        sides = u[..., None] * normals.cos() + v[..., None] * normals.sin()  # [T, S, S, 3]
        distance = sides.amax(-1) - half * 2 / 3
    return (0.5 - distance).clamp(0, 1)[:, None]


def render_synthetic_clip(class_index: int, generator: torch.Generator) -> tuple[Tensor, str, str]:
    """One synthetic video: (uint8 ``[16, 3, 64, 64]``, colour name, shape name).

    Only the forward class of each pair (MovingLeft, MovingUp, Growing, TurningClockwise) is drawn; its partner is the
    same draw played backwards, so the two classes are exact time reversals of each other in distribution, and shape,
    colour, position and the set of frames are alike: only the order of the frames tells them apart.
    """
    t = torch.linspace(0, 1, SYNTHETIC_FRAMES)  # [T], time in the clip
    colour = list(COLOURS)[int(torch.randint(len(COLOURS), (), generator=generator))]
    shape = SHAPES[int(torch.randint(len(SHAPES), (), generator=generator))]
    position = _uniform(generator, 18, 46, (2,))
    size = _uniform(generator, 11, 17).expand(SYNTHETIC_FRAMES)
    angle = _uniform(generator, 0, 2 * math.pi).expand(SYNTHETIC_FRAMES)
    centre_x, centre_y = position[0].expand(SYNTHETIC_FRAMES), position[1].expand(SYNTHETIC_FRAMES)
    pair = class_index // 2
    if pair == 0:  # to the left: x falls
        start, distance = _uniform(generator, 38, 50), _uniform(generator, 18, 28)
        centre_x = start - distance * t
    elif pair == 1:  # up: y falls (image rows grow downwards)
        start, distance = _uniform(generator, 38, 50), _uniform(generator, 18, 28)
        centre_y = start - distance * t
    elif pair == 2:  # growing
        small, large = _uniform(generator, 5, 9), _uniform(generator, 20, 28)
        size = small + (large - small) * t
    else:  # clockwise, at most 20 degrees a frame so a square cannot alias
        degrees_per_frame = _uniform(generator, 8, 20)
        angle = angle + torch.deg2rad(degrees_per_frame) * torch.arange(SYNTHETIC_FRAMES)
    # Background: a plain grey-ish tone with a faint static texture.
    base = _uniform(generator, 20, 100) + _uniform(generator, -12, 12, (3, 1, 1))
    texture = torch.nn.functional.interpolate(
        _uniform(generator, -10, 10, (1, 1, 8, 8)), size=(SYNTHETIC_SIZE, SYNTHETIC_SIZE), mode="bilinear"
    )[0]  # [1, S, S]
    background = (base + texture)[None]  # [1, 3, S, S]
    alpha = _shape_alpha(shape, centre_x, centre_y, size, angle)  # [T, 1, S, S]
    foreground = torch.tensor(COLOURS[colour], dtype=torch.float32)[None, :, None, None]
    frames = (background * (1 - alpha) + foreground * alpha).round().clamp(0, 255).to(torch.uint8)
    if class_index % 2:
        frames = frames.flip(0)
    return frames, colour, shape


def _write_synthetic_ucf101(root: Path, generator: torch.Generator) -> None:
    """UCF101 layout: groups 1-4 are the test split, 5-16 the training split."""
    (root / UCF101.annotations).mkdir(parents=True)
    train_lines, test_lines = [], []
    for label, name in enumerate(SYNTHETIC_CLASSES):
        for group in range(1, SYNTHETIC_GROUPS + 1):
            for clip in range(1, SYNTHETIC_CLIPS_PER_GROUP + 1):
                entry = f"{name}/v_{name}_g{group:02d}_c{clip:02d}.avi"
                write_video(root / UCF101.videos / entry, render_synthetic_clip(label, generator)[0], SYNTHETIC_FPS)
                if group <= SYNTHETIC_TEST_GROUPS:
                    test_lines.append(entry)
                else:
                    train_lines.append(f"{entry} {label + 1}")
    class_lines = [f"{label + 1} {name}" for label, name in enumerate(SYNTHETIC_CLASSES)]
    for file_name, lines in (
        ("classInd.txt", class_lines),
        ("trainlist01.txt", train_lines),
        ("testlist01.txt", test_lines),
    ):
        (root / UCF101.annotations / file_name).write_text("\n".join(lines) + "\n")


def _write_synthetic_msrvtt(root: Path, generator: torch.Generator) -> None:
    """MSR-VTT layout: three captions per video; the test file pairs each test video with one."""
    (root / MSRVTT.annotations).mkdir(parents=True)
    videos, sentences, train_ids, test_rows = [], [], [], []
    per_class = SYNTHETIC_RETRIEVAL_TRAIN + SYNTHETIC_RETRIEVAL_TEST
    for number in range(per_class * len(SYNTHETIC_CLASSES)):
        class_name = SYNTHETIC_CLASSES[number % len(SYNTHETIC_CLASSES)]
        video_id = f"video{number}"
        frames, colour, shape = render_synthetic_clip(number % len(SYNTHETIC_CLASSES), generator)
        write_video(root / MSRVTT.videos / f"{video_id}.mp4", frames, SYNTHETIC_FPS)
        captions = [f"a {colour} {shape} {phrase}" for phrase in PHRASES[class_name]]
        in_test = number >= SYNTHETIC_RETRIEVAL_TRAIN * len(SYNTHETIC_CLASSES)
        videos.append({"video_id": video_id, "id": number, "split": "test" if in_test else "train"})
        sentences += [
            {"caption": c, "video_id": video_id, "sen_id": len(sentences) + i} for i, c in enumerate(captions)
        ]
        if in_test:
            chosen = captions[int(torch.randint(len(captions), (), generator=generator))]
            test_rows.append([f"ret{len(test_rows)}", f"msr{number}", video_id, chosen])
        else:
            train_ids.append([video_id])
    (root / MSRVTT.annotations / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
    for file_name, header, rows in (
        ("MSRVTT_train.9k.csv", ["video_id"], train_ids),
        ("MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"], test_rows),
    ):
        with (root / MSRVTT.annotations / file_name).open("w", newline="") as file:
            csv.writer(file).writerows([header, *rows])


# Where a marker without a manifest (written before manifests) says the generator wrote: its folders and files.
SYNTHETIC_FOLDERS = ("ucf101/UCF-101/", "ucf101/ucfTrainTestlist/", "msrvtt/MSRVTT_Videos/", "msrvtt/msrvtt_data/")
SYNTHETIC_FILES = {"COMPLETE", f"ucf101/{NO_FLIP_MARKER}", f"msrvtt/{NO_FLIP_MARKER}"}


def _holds_synthetic(root: Path) -> bool:
    """Whether ``root`` holds a dataset ensure_synthetic wrote (of any version or seed): its marker."""
    marker = root / "COMPLETE"
    return marker.is_file() and marker.read_text().startswith("version ")


def _foreign_files(root: Path) -> list[str]:
    """The files (and links) under a synthetic ``root`` that ensure_synthetic did not write, relative to ``root``.

    Its own are the marker and what the marker's manifest lists (its lines after the first). A marker of one line
    was written before manifests: then every file in the generator's folders (SYNTHETIC_FOLDERS) counts as its own.
    """
    listed = (root / "COMPLETE").read_text().splitlines()[1:]
    found = sorted(
        path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_symlink() or not path.is_dir()
    )
    if listed:
        own = {"COMPLETE", *listed}
        return [name for name in found if name not in own]
    return [name for name in found if name not in SYNTHETIC_FILES and not name.startswith(SYNTHETIC_FOLDERS)]


def ensure_synthetic(root: Path = Path("data/synthetic"), seed: int = 0) -> Path:
    """Create the synthetic dataset under ``root`` once and return ``root``.

    ``root/ucf101`` (UCF101 layout, 8 classes x (48 train + 16 test) clips) and ``root/msrvtt`` (MSR-VTT layout, 256
    train videos x 3 captions, 64 test pairs): 64x64 px, 16 frames at 8 fps, real MPEG-4 AVI and H.264 MP4 files. It is
    built in a scratch folder beside ``root`` and renamed into place with a marker file written last, so an interrupted
    run is never mistaken for a finished one; the marker's first line names the version and seed, the others list
    every file written (the manifest). Only what this function wrote is ever replaced (a synthetic dataset of another
    version or seed, or an empty folder): any other ``root``, or one holding a file the manifest does not list (a run
    saved inside it), is refused with a DataError, and so is one where nothing can be written.
    """
    root = Path(root)
    marker = root / "COMPLETE"
    stamp = f"version {SYNTHETIC_VERSION} seed {seed}\n"
    try:
        if marker.is_file() and marker.read_text().startswith(stamp):
            return root
        if root.exists() and not root.is_dir():
            raise DataError(f"synthetic: {root} is a file; --root must be a folder for the generated dataset")
        if root.is_dir() and any(root.iterdir()):
            if not _holds_synthetic(root):
                raise DataError(
                    f"synthetic: {root} is not empty and holds no synthetic dataset (no COMPLETE marker); its files "
                    "are left alone: choose a new or empty folder for the generated data"
                )
            foreign = _foreign_files(root)
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise DataError(
                    f"synthetic: {root} holds files the generator did not write ({shown}); replacing its dataset "
                    "would delete them: move them out of it, or choose another --root"
                )
        require_ffmpeg()
        root.parent.mkdir(parents=True, exist_ok=True)
        scratch = root.parent / f".{root.name}-{os.getpid()}-{secrets.token_hex(4)}"
        scratch.mkdir()  # its mode follows the umask, as the folder it becomes should
    except OSError as error:
        raise DataError(f"synthetic: cannot create the dataset at {root}: {error_message(error)}") from None
    retired = scratch.with_name(scratch.name + "-old")
    typer.echo(f"writing the synthetic dataset to {root} (once, about 20 s on 2 cores)")
    try:
        with single_threaded():
            generator = torch.Generator().manual_seed(seed)
            _write_synthetic_ucf101(scratch / "ucf101", generator)
            _write_synthetic_msrvtt(scratch / "msrvtt", generator)
        for layout in ("ucf101", "msrvtt"):
            (scratch / layout / NO_FLIP_MARKER).write_text("Left and right are part of the labels: never flip.\n")
        manifest = sorted(path.relative_to(scratch).as_posix() for path in scratch.rglob("*") if path.is_file())
        (scratch / "COMPLETE").write_text(stamp + "".join(f"{name}\n" for name in manifest))
        if root.exists():
            os.replace(root, retired)  # an empty folder, or this function's data of another version or seed
        os.replace(scratch, root)
    except OSError as error:
        raise DataError(f"synthetic: cannot write the dataset at {root}: {error_message(error)}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return root
