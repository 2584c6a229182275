"""Tests for data.py: real encoded videos (MPEG-4 AVI, H.264 MP4, VP9 WebM) in each published layout, built in temporary
folders, read through the loaders; bad input and broken videos, met in the loader's worker processes too."""

import csv
import json
import math
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import error_lines, run
from torchcodec.decoders import VideoDecoder
from torchcodec.encoders import AudioEncoder

import data
import evaluate
from loading import dataset_files
from loading.protocols import PROTOCOLS, SYNTHETIC

UCF101, HMDB51, SSV2, MSRVTT = (PROTOCOLS[name] for name in ("ucf101", "hmdb51", "ssv2", "msrvtt"))
SIDE = 32  # test videos are tiny: SIDE x SIDE pixels (the ramp is wider)
RESOLUTION = 48  # model input size in these tests: deliberately not 224
MEAN = torch.tensor(data.CLIP_MEAN)[:, None, None]
STD = torch.tensor(data.CLIP_STD)[:, None, None]


def grey_video(levels: list[int], height: int = SIDE, width: int = SIDE) -> torch.Tensor:
    """Frame i is a flat grey of brightness levels[i]: uint8 [T, 3, H, W]."""
    return torch.tensor(levels, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, height, width).contiguous()


def ramp_video(num_frames: int = 12) -> torch.Tensor:
    """Still frames that brighten from left to right: a flip reverses them."""
    ramp = torch.linspace(0, 255, 2 * SIDE).round().to(torch.uint8)
    return ramp.expand(num_frames, 3, SIDE, 2 * SIDE).contiguous()


def left_darker_than_right(clip: torch.Tensor) -> bool:
    """clip [T, 3, R, R] normalised: is its left quarter darker than its right quarter?"""
    quarter = clip.shape[-1] // 4
    return bool(clip[..., :quarter].mean() < clip[..., -quarter:].mean())


def normalised(level: float) -> torch.Tensor:
    """A flat grey ``level`` after CLIP normalisation, per channel [3, 1, 1]."""
    return (level / 255 - MEAN) / STD


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests move tiny tensors: one thread is fastest, and immune to a busy CPU."""
    with dataset_files.single_threaded():
        yield


# ---------------------------------------------------------------- layouts


def test_the_protocol_rows_name_the_published_folders() -> None:
    """The one place the tests write folder names: as the datasets publish them (UCF101's, HMDB51's and
    Something-Something's archives, CLIP4Clip's MSR-VTT files, CVDF's Kinetics annotations), an independent reference
    for ``protocols.py``, which every other test reads them from. The synthetic set is in UCF101's and MSR-VTT's."""
    published = {
        "ucf101": ("ucfTrainTestlist", "UCF-101"),
        "hmdb51": ("testTrainMulti_7030_splits", "videos"),
        "ssv2": ("labels", "20bn-something-something-v2"),
        "msrvtt": ("msrvtt_data", "MSRVTT_Videos"),
        "kinetics400": ("annotations", "."),
    }
    assert {name: (PROTOCOLS[name].annotations, PROTOCOLS[name].videos) for name in published} == published
    for task, dataset in (("recognize", "ucf101"), ("retrieve", "msrvtt")):
        assert (SYNTHETIC[task].annotations, SYNTHETIC[task].videos) == published[dataset]


@pytest.fixture(scope="module")
def ucf101_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """UCF101 layout; the HandstandPushups lists say ``HandStandPushups``, CRLF line ends as published."""
    root = tmp_path_factory.mktemp("ucf101")
    folders = {"ApplyEyeMakeup": "ApplyEyeMakeup", "YoYo": "YoYo", "HandstandPushups": "HandStandPushups"}
    train, test = [], []
    for label, (folder, list_name) in enumerate(folders.items(), start=1):
        for group in (1, 8):
            file_name = f"v_{list_name}_g{group:02d}_c01.avi"
            dataset_files.write_video(root / UCF101.videos / folder / file_name, ramp_video(), 25)
            entry = f"{list_name}/{file_name}"
            (test if group == 1 else train).append(entry if group == 1 else f"{entry} {label}")
    lists = root / UCF101.annotations
    lists.mkdir()
    (lists / "classInd.txt").write_bytes(b"1 ApplyEyeMakeup\r\n2 YoYo\r\n3 HandstandPushups\r\n")
    (lists / "trainlist01.txt").write_bytes("\r\n".join(train).encode() + b"\r\n")
    (lists / "testlist01.txt").write_bytes("\r\n".join(test).encode() + b"\r\n")
    return root


HMDB_NAMES = {
    "brush_hair": ["Brush my hair (2) & more_u_nm_np1_ba_goo_0.avi", "[Hair] brushing_f_cm_np1_fr_med_1.avi"],
    "ride_bike": ["Ride & bike!_f_cm_np1_ri_med_0.avi", "bike ride (long) _u_cm_np1_le_goo_2.avi"],
}


@pytest.fixture(scope="module")
def hmdb51_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HMDB51 layout: names with spaces, brackets and ``&``; split lines end with a blank as published."""
    root = tmp_path_factory.mktemp("hmdb51")
    splits = root / HMDB51.annotations
    splits.mkdir()
    for folder, names in HMDB_NAMES.items():
        for name in names:
            dataset_files.write_video(root / HMDB51.videos / folder / name, grey_video([100] * 6), 30)
        split1 = f"{names[0]} 1 \n{names[1]} 2 \nunused clip_0.avi 0 \n"
        split2 = f"{names[0]} 2 \n{names[1]} 1 \n"
        (splits / f"{folder}_test_split1.txt").write_text(split1)
        (splits / f"{folder}_test_split2.txt").write_text(split2)
    return root


@pytest.fixture(scope="module")
def ssv2_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Something-Something v2 layout with VP9 WebM clips."""
    root = tmp_path_factory.mktemp("ssv2")
    for clip_id in ("101", "102", "103"):
        dataset_files.write_video(root / SSV2.videos / f"{clip_id}.webm", ramp_video(), 12)
    labels = {"Approaching something with your camera": "0", "Pushing something from left to right": "1"}
    train = [
        {
            "id": "101",
            "label": "pushing a cup from left to right",
            "template": "Pushing [something] from left to right",
        },
        {
            "id": "102",
            "label": "approaching a cup with your camera",
            "template": "Approaching [something] with your camera",
        },
    ]
    validation = [{"id": "103", "label": "pushing a pen", "template": "Pushing [something] from left to right"}]
    (root / SSV2.annotations).mkdir()
    for name, content in (("labels", labels), ("train", train), ("validation", validation)):
        (root / SSV2.annotations / f"{name}.json").write_text(json.dumps(content))
    return root


MSRVTT_SENTENCES = [
    ("video0", "a man, smiling, sings"),
    ("video1", 'a "quoted" caption'),
    ("video0", "someone is singing"),
    ("video2", "a cat plays"),
    ("video1", "a second caption for video1"),
]
JSFUSION_ROWS = [("video2", "a cat, on a sofa, plays"), ("video3", "a dog runs")]


@pytest.fixture(scope="module")
def msrvtt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MSR-VTT layout with H.264 MP4 videos; video k is a flat grey of level 40 + 40 k."""
    root = tmp_path_factory.mktemp("msrvtt")
    for number in range(4):
        dataset_files.write_video(root / MSRVTT.videos / f"video{number}.mp4", grey_video([40 + 40 * number] * 8), 30)
    annotations = root / MSRVTT.annotations
    annotations.mkdir()
    sentences = [{"caption": c, "video_id": v, "sen_id": i} for i, (v, c) in enumerate(MSRVTT_SENTENCES)]
    videos = [{"video_id": f"video{number}"} for number in range(4)]
    (annotations / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
    with (annotations / "MSRVTT_train.9k.csv").open("w", newline="") as file:
        csv.writer(file).writerows([["video_id"], ["video0"], ["video1"]])
    with (annotations / "MSRVTT_JSFUSION_test.csv").open("w", newline="") as file:
        rows = [[f"ret{i}", f"msr{v[5:]}", v, s] for i, (v, s) in enumerate(JSFUSION_ROWS)]
        csv.writer(file).writerows([["key", "vid_key", "video_id", "sentence"], *rows])
    return root


# ---------------------------------------------------------------- encoding and decoding


@pytest.mark.parametrize(("suffix", "codec"), [(".avi", "mpeg4"), (".mp4", "h264"), (".webm", "vp9")])
def test_write_video_encodes_real_files_of_each_codec(tmp_path: Path, suffix: str, codec: str) -> None:
    levels = [30, 80, 130, 180, 230, 130]
    path = tmp_path / f"clip{suffix}"
    dataset_files.write_video(path, grey_video(levels), fps=10)
    decoder = VideoDecoder(path, seek_mode="exact")
    assert decoder.metadata.codec == codec
    assert decoder.metadata.num_frames == len(levels)
    decoded = decoder.get_frames_at(list(range(len(levels)))).data.float()
    assert torch.allclose(decoded.mean(dim=(1, 2, 3)), torch.tensor(levels, dtype=torch.float), atol=4)


def test_sample_indices_evaluation_takes_segment_centres() -> None:
    expected = [math.floor((t + 0.5) * 100 / 8) for t in range(8)]  # 12.5 frames a segment
    assert data.sample_indices(100, 8, train=False).tolist() == [expected]


def test_sample_indices_training_draws_one_frame_in_each_segment() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([data.sample_indices(100, 8, train=True, generator=generator) for _ in range(400)])  # [400, 8]
    for t in range(8):  # segment t holds frames floor(12.5 t) ... floor(12.5 (t + 1)) - 1, and each gets drawn
        assert set(draws[:, t].tolist()) == set(range(math.floor(t * 12.5), math.floor((t + 1) * 12.5)))


def test_sample_indices_repeat_frames_of_a_short_video() -> None:
    assert data.sample_indices(3, 8, train=False).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    train = data.sample_indices(3, 8, train=True, generator=torch.Generator().manual_seed(1))
    assert train.min() >= 0 and train.max() <= 2 and (train.diff() >= 0).all()
    assert data.sample_indices(1, 4, train=True).tolist() == [[0, 0, 0, 0]]


def test_sample_indices_views_are_evenly_offset() -> None:
    assert data.sample_indices(90, 3, train=False, views=3).tolist() == [[5, 35, 65], [15, 45, 75], [25, 55, 85]]
    with pytest.raises(ValueError):
        data.sample_indices(90, 3, train=True, views=2)


@pytest.mark.parametrize("suffix", [".avi", ".mp4", ".webm"])
def test_read_frames_decodes_exactly_the_sampled_frames(tmp_path: Path, suffix: str) -> None:
    levels = [20 + 10 * i for i in range(20)]
    path = tmp_path / f"counter{suffix}"
    dataset_files.write_video(path, grey_video(levels), fps=10)
    frames = data.read_frames(path, 4, train=False)  # centres of 5-frame segments: 2, 7, 12, 17
    assert frames.shape == (4, 3, SIDE, SIDE) and frames.dtype == torch.uint8
    expected = torch.tensor([levels[i] for i in (2, 7, 12, 17)], dtype=torch.float)
    assert torch.allclose(frames.float().mean(dim=(1, 2, 3)), expected, atol=4)


def test_a_header_with_a_wrong_frame_count_is_recounted(tmp_path: Path) -> None:
    levels = [20 + 5 * i for i in range(40)]
    noise = torch.randint(-15, 16, (40, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(0))
    whole, truncated = tmp_path / "whole.avi", tmp_path / "truncated.avi"
    dataset_files.write_video(whole, (grey_video(levels) + noise).clamp(0, 255).to(torch.uint8), fps=10)
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    assert VideoDecoder(truncated, seek_mode="approximate").metadata.num_frames == 40  # the header's claim
    frames_there = VideoDecoder(truncated, seek_mode="exact").metadata.num_frames
    assert 0 < frames_there < 40
    means = data.read_frames(truncated, 8, train=False).float().mean(dim=(1, 2, 3))
    expected = [levels[index] for index in data.sample_indices(frames_there, 8, train=False)[0].tolist()]
    assert torch.allclose(means, torch.tensor(expected, dtype=torch.float), atol=4)


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    "height, width, decoded",
    [(1200, 2000, (720, 1200)), (400, 4000, (288, 2880))],
    ids=["short-side-capped", "long-side-capped"],
)
def test_large_frames_are_shrunk_while_decoding(tmp_path: Path, height: int, width: int, decoded: tuple) -> None:
    frames = torch.zeros(2, 3, height, width, dtype=torch.uint8)
    frames[..., width // 2 :] = 200  # dark left half, bright right half
    dataset_files.write_video(tmp_path / "large.avi", frames, fps=10)
    clip = data.read_frames(tmp_path / "large.avi", 2, train=False)
    assert tuple(clip.shape) == (2, 3, *decoded)  # aspect kept, within MAX_DECODED_SHORT_SIDE/LONG_SIDE
    assert min(decoded) <= dataset_files.MAX_DECODED_SHORT_SIDE and max(decoded) <= dataset_files.MAX_DECODED_LONG_SIDE
    quarter = decoded[1] // 4
    assert clip[..., :quarter].float().mean() < 5 and (clip[..., -quarter:].float().mean() - 200).abs() < 5


def test_evaluation_clip_is_normalised_with_clip_statistics(tmp_path: Path) -> None:
    path = tmp_path / "grey.mp4"
    dataset_files.write_video(path, grey_video([128] * 10), fps=10)
    dataset = data.VideoDataset([path], [0], num_frames=4, resolution=RESOLUTION, train=False)
    clip, label = dataset[0]
    assert clip.shape == (4, 3, RESOLUTION, RESOLUTION) and clip.dtype == torch.float32 and label == 0
    assert torch.allclose(clip, normalised(128).expand_as(clip), atol=0.05)


def test_training_clip_values_stay_in_the_normalised_pixel_range(ucf101_root: Path) -> None:
    dataset = data.build_dataset("ucf101", ucf101_root, "train", num_frames=8, resolution=RESOLUTION)
    clip, _ = dataset[0]
    assert clip.shape == (8, 3, RESOLUTION, RESOLUTION) and clip.dtype == torch.float32
    assert (clip >= normalised(0) - 1e-5).all() and (clip <= normalised(255) + 1e-5).all()


def test_all_frames_of_a_clip_get_the_same_crop_and_flip(ucf101_root: Path) -> None:
    dataset = data.build_dataset("ucf101", ucf101_root, "train", num_frames=8, resolution=RESOLUTION)
    torch.manual_seed(0)
    for _ in range(5):
        clip, _ = dataset[0]  # the source frames are identical, so the outputs must be too
        assert torch.allclose(clip, clip[:1].expand_as(clip), atol=0.05)


def test_ucf101_training_flips_some_clips(ucf101_root: Path) -> None:
    dataset = data.build_dataset("ucf101", ucf101_root, "train", num_frames=4, resolution=RESOLUTION)
    torch.manual_seed(0)
    orientations = {left_darker_than_right(dataset[0][0]) for _ in range(20)}
    assert orientations == {True, False}


def test_ssv2_is_never_flipped(ssv2_root: Path) -> None:
    dataset = data.build_dataset("ssv2", ssv2_root, "train", num_frames=4, resolution=RESOLUTION)
    torch.manual_seed(0)
    assert all(left_darker_than_right(dataset[index % 2][0]) for index in range(30))


def test_a_root_with_the_no_flip_marker_is_never_flipped(ucf101_root: Path, tmp_path: Path) -> None:
    marked = tmp_path / "ucf101"
    marked.mkdir()
    for folder in (UCF101.videos, UCF101.annotations):
        (marked / folder).symlink_to(ucf101_root / folder)
    (marked / data.NO_FLIP_MARKER).write_text("")
    dataset = data.build_dataset("ucf101", marked, "train", num_frames=4, resolution=RESOLUTION)
    torch.manual_seed(0)
    assert all(left_darker_than_right(dataset[0][0]) for _ in range(20))


def test_evaluation_views_are_different_moments(tmp_path: Path) -> None:
    levels = [20 + 10 * i for i in range(20)]
    path = tmp_path / "counter.avi"
    dataset_files.write_video(path, grey_video(levels), fps=10)
    dataset = data.VideoDataset([path], [3], num_frames=2, resolution=RESOLUTION, train=False, views=2)
    clip, _ = dataset[0]
    assert clip.shape == (2, 2, 3, RESOLUTION, RESOLUTION)
    for view, frame_indices in enumerate(data.sample_indices(20, 2, train=False, views=2).tolist()):
        for t, index in enumerate(frame_indices):
            assert torch.allclose(clip[view, t], normalised(levels[index]).expand(3, RESOLUTION, RESOLUTION), atol=0.1)
    with pytest.raises(data.DataError):
        data.VideoDataset([path], [3], num_frames=2, resolution=RESOLUTION, train=True, views=2)


# ---------------------------------------------------------------- split files and class names


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("ApplyEyeMakeup", "apply eye makeup"),
        ("YoYo", "yo yo"),
        ("PlayingDaf", "playing daf"),
        ("HandstandPushups", "handstand pushups"),
        ("TurningAnticlockwise", "turning anticlockwise"),
        ("brush_hair", "brush hair"),
        ("sword_exercise", "sword exercise"),
    ],
)
def test_readable_class_name(folder: str, name: str) -> None:
    assert dataset_files.readable_class_name(folder) == name


def test_ucf101_split_files_with_case_mismatches(ucf101_root: Path) -> None:
    train = data.build_dataset("ucf101", ucf101_root, "train", num_frames=4, resolution=RESOLUTION)
    test = data.build_dataset("ucf101", ucf101_root, "test", num_frames=4, resolution=RESOLUTION)
    assert train.classes == test.classes == ["apply eye makeup", "yo yo", "handstand pushups"]
    assert train.targets == test.targets == [0, 1, 2]
    assert all(path.is_file() for path in train.paths + test.paths)  # HandStandPushups found in HandstandPushups
    assert test.paths[2] == ucf101_root / UCF101.videos / "HandstandPushups" / "v_HandStandPushups_g01_c01.avi"
    clip, label = test[2]
    assert clip.shape == (4, 3, RESOLUTION, RESOLUTION) and label == 2


def test_hmdb51_split_files_with_spaces_brackets_and_ampersands(hmdb51_root: Path) -> None:
    train = data.build_dataset("hmdb51", hmdb51_root, "train", num_frames=4, resolution=RESOLUTION)
    test = data.build_dataset("hmdb51", hmdb51_root, "test", num_frames=4, resolution=RESOLUTION)
    assert train.classes == ["brush hair", "ride bike"]
    assert [path.name for path in train.paths] == [HMDB_NAMES["brush_hair"][0], HMDB_NAMES["ride_bike"][0]]
    assert [path.name for path in test.paths] == [HMDB_NAMES["brush_hair"][1], HMDB_NAMES["ride_bike"][1]]
    assert train.targets == test.targets == [0, 1]
    split2 = data.build_dataset("hmdb51", hmdb51_root, "train", num_frames=4, resolution=RESOLUTION, split_id=2)
    assert [path.name for path in split2.paths] == [HMDB_NAMES["brush_hair"][1], HMDB_NAMES["ride_bike"][1]]
    clip, label = test[1]
    assert clip.shape == (4, 3, RESOLUTION, RESOLUTION) and label == 1


def test_ssv2_labels_come_from_templates(ssv2_root: Path) -> None:
    train = data.build_dataset("ssv2", ssv2_root, "train", num_frames=4, resolution=RESOLUTION)
    test = data.build_dataset("ssv2", ssv2_root, "test", num_frames=4, resolution=RESOLUTION)
    assert train.classes == ["approaching something with your camera", "pushing something from left to right"]
    assert train.targets == [1, 0] and test.targets == [1]
    assert test.paths == [ssv2_root / SSV2.videos / "103.webm"]


def test_msrvtt_training_pairs_are_all_captions_of_the_training_videos(msrvtt_root: Path) -> None:
    train = data.build_dataset("msrvtt", msrvtt_root, "train", num_frames=4, resolution=RESOLUTION)
    expected = [(v, c) for v, c in MSRVTT_SENTENCES if v in ("video0", "video1")]
    assert [(path.stem, caption) for path, caption in zip(train.paths, train.targets)] == expected
    clip, caption = train[1]
    assert clip.shape == (4, 3, RESOLUTION, RESOLUTION) and caption == 'a "quoted" caption'


def test_msrvtt_test_set_is_the_jsfusion_rows_in_order(msrvtt_root: Path) -> None:
    test = data.build_dataset("msrvtt", msrvtt_root, "test", num_frames=4, resolution=RESOLUTION)
    assert [(path.stem, caption) for path, caption in zip(test.paths, test.targets)] == JSFUSION_ROWS
    for index, (video_id, sentence) in enumerate(JSFUSION_ROWS):
        clip, caption = test[index]
        level = 40 + 40 * int(video_id[5:])
        assert caption == sentence and torch.allclose(clip.mean(dim=(0, 2, 3)), normalised(level).flatten(), atol=0.05)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("ucf101", f"{UCF101.annotations}/classInd.txt"),
        ("hmdb51", HMDB51.annotations),
        ("ssv2", f"{SSV2.annotations}/labels.json"),
        ("msrvtt", f"{MSRVTT.annotations}/MSRVTT_train.9k.csv"),
    ],
)
def test_a_missing_split_file_is_named_with_the_expected_layout(tmp_path: Path, name: str, missing: str) -> None:
    (tmp_path / PROTOCOLS[name].videos).mkdir()
    with pytest.raises(data.DataError) as error:
        data.build_dataset(name, tmp_path, "train", num_frames=4, resolution=RESOLUTION)
    assert str(tmp_path / missing) in str(error.value) and data.LAYOUTS[name] in str(error.value)


@pytest.fixture
def layouts(ucf101_root, hmdb51_root, ssv2_root, msrvtt_root, tmp_path) -> dict[str, Path]:
    """Copies of the four layouts, to spoil one file of."""
    roots = {"ucf101": ucf101_root, "hmdb51": hmdb51_root, "ssv2": ssv2_root, "msrvtt": msrvtt_root}
    return {name: Path(shutil.copytree(root, tmp_path / name)) for name, root in roots.items()}


SSV2_CLIP = '"template": "Pushing [something] from left to right"'


def ssv2_labels(*ids: int) -> bytes:
    """A labels.json that numbers the two templates of ``ssv2_root`` with ``ids``."""
    templates = ("Approaching something with your camera", "Pushing something from left to right")
    return json.dumps({template: str(label) for template, label in zip(templates, ids)}).encode()


@pytest.mark.parametrize(
    ("name", "split", "file", "content", "where"),
    [
        ("ucf101", "train", "trainlist01.txt", "YoYo/v_YoYo_g08_c01.avi 2\n../../escape.avi 2\n", 2),
        ("ucf101", "test", "testlist01.txt", "\n/etc/passwd\n", 2),
        ("hmdb51", "train", "brush_hair_test_split1.txt", "../../../x.avi 1 \n", 1),
        ("ssv2", "train", "train.json", f'[{{"id": "101", {SSV2_CLIP}}}, {{"id": "../../x", {SSV2_CLIP}}}]', 2),
        ("msrvtt", "train", "MSRVTT_train.9k.csv", "video_id\nvideo0\n../../../x\n", 3),
        ("msrvtt", "test", "MSRVTT_JSFUSION_test.csv", "key,vid_key,video_id,sentence\nr,m,/tmp/x,hi\n", 2),
    ],
    ids=["ucf101-dotdot", "ucf101-absolute", "hmdb51-dotdot", "ssv2-dotdot", "msrvtt-train-dotdot", "msrvtt-absolute"],
)
def test_a_video_id_outside_the_root_is_refused_with_its_file_and_line(
    layouts: dict[str, Path], name: str, split: str, file: str, content: str, where: int
) -> None:
    """``file`` is in the dataset's annotation folder."""
    path = layouts[name] / PROTOCOLS[name].annotations / file
    path.write_text(content)
    line = "clip" if file.endswith(".json") else "line"
    with pytest.raises(data.DataError, match=rf"{re.escape(str(path))}, {line} {where}: .* is outside"):
        data.build_dataset(name, layouts[name], split, num_frames=2, resolution=RESOLUTION)


@pytest.mark.parametrize(
    ("name", "split", "file", "content", "message"),
    [
        ("msrvtt", "test", "MSRVTT_JSFUSION_test.csv", b"key,vid_key,video_id,sentence\nr,m,v,caf\xe9\n",
         "is not UTF-8 text"),
        ("msrvtt", "train", "MSRVTT_data.json", b'{"sentences": [', "is not valid JSON: .* at line 1"),
        ("msrvtt", "train", "MSRVTT_data.json", b'{"videos": []}', "should hold"),
        ("ssv2", "train", "labels.json", b'{"Approaching": 0,}', "is not valid JSON"),
        ("ssv2", "train", "train.json", b'[{"label": "no id, no template"}]', "clip 1: expected an 'id' and"),
        ("ssv2", "train", "labels.json", ssv2_labels(0, 7),
         ": no template has the class id 1, expected the ids 0 to 1, each once"),
        ("ssv2", "test", "labels.json", ssv2_labels(0, 0),
         ": the class id 0 is given twice, expected the ids 0 to 1, each once"),
        ("ucf101", "train", "classInd.txt", b"1 ApplyEyeMakeup\r\n2\r\n", "line 2: expected '<index>"),
    ],
    ids=["csv-not-utf8", "json-malformed", "json-no-sentences", "labels-malformed", "clip-no-id", "labels-gap",
         "labels-twice", "classind-no-name"],
)  # fmt: skip
def test_a_malformed_dataset_file_is_one_error_naming_it(
    layouts: dict[str, Path], name: str, split: str, file: str, content: bytes, message: str
) -> None:
    """``file`` is in the dataset's annotation folder."""
    path = layouts[name] / PROTOCOLS[name].annotations / file
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=rf"{name}: {re.escape(str(path))}.*{message}"):
        data.build_dataset(name, layouts[name], split, num_frames=2, resolution=RESOLUTION)


def test_a_missing_root_and_unknown_names_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match=re.escape(str(tmp_path / "nowhere"))) as error:
        data.build_dataset("ucf101", tmp_path / "nowhere", "train", num_frames=4, resolution=RESOLUTION)
    assert f"{UCF101.annotations}/classInd.txt" in str(error.value)
    with pytest.raises(data.DataError, match="ucf101, hmdb51, ssv2, msrvtt"):
        data.build_dataset("kinetics", tmp_path, "train", num_frames=4, resolution=RESOLUTION)
    with pytest.raises(data.DataError, match="train"):
        data.build_dataset("ucf101", tmp_path, "val", num_frames=4, resolution=RESOLUTION)


def test_missing_ffmpeg_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, ucf101_root: Path) -> None:
    monkeypatch.setattr(dataset_files.torchcodec, "ffmpeg_major_version", None)
    with pytest.raises(data.DataError, match="apt-get install ffmpeg") as error:
        data.build_dataset("ucf101", ucf101_root, "train", num_frames=4, resolution=RESOLUTION)
    assert "brew install ffmpeg" in str(error.value) and "conda" in str(error.value)


@pytest.fixture
def videos_with_broken_ones(tmp_path: Path) -> tuple[list[Path], set[int]]:
    """Six videos (flat grey 30, 60, ... 180); items 1 (empty), 2 (random bytes), 4 (truncated MP4) are broken."""
    paths = [tmp_path / f"clip{index}.avi" for index in range(6)]
    for index, path in enumerate(paths):
        dataset_files.write_video(path, grey_video([30 * (index + 1)] * 6), fps=10)
    paths[1].write_bytes(b"")
    paths[2].write_bytes(bytes(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0)).tolist()))
    paths[4] = tmp_path / "clip4.mp4"
    dataset_files.write_video(paths[4], grey_video([150] * 6), fps=10)
    paths[4].write_bytes(paths[4].read_bytes()[:300])
    return paths, {1, 2, 4}


def test_broken_videos_are_warned_about_replaced_and_counted(videos_with_broken_ones) -> None:
    paths, broken = videos_with_broken_ones
    dataset = data.VideoDataset(paths, list(range(6)), num_frames=2, resolution=RESOLUTION, train=False)
    with pytest.warns(dataset_files.BrokenVideoWarning) as caught:
        items = [dataset[index] for index in range(6)]
    assert [label for _, label in items] == [0, 3, 3, 3, 5, 5]  # each broken item replaced by the next good one
    for (clip, label), index in zip(items, range(6)):
        assert torch.allclose(clip.mean(dim=(0, 2, 3)), normalised(30 * (label + 1)).flatten(), atol=0.05), index
    warned = " ".join(str(warning.message) for warning in caught)
    assert all(str(paths[index]) in warned for index in broken)
    assert dataset.broken_count() == 3  # item 1 meets videos 1 and 2, item 2 meets 2 again, item 4 meets 4
    assert dataset.broken_items() == sorted(broken)
    with pytest.warns(dataset_files.BrokenVideoWarning):
        [dataset[index] for index in range(6)]  # a second epoch meets the same three videos
    assert dataset.broken_count() == 3
    dataset.reset_broken_count()
    assert dataset.broken_count() == 0


def test_strict_mode_makes_a_broken_video_an_error(videos_with_broken_ones) -> None:
    paths, _ = videos_with_broken_ones
    dataset = data.VideoDataset(paths, list(range(6)), num_frames=2, resolution=RESOLUTION, train=True, strict=True)
    assert dataset[0][1] == 0
    with pytest.raises(data.DataError, match=re.escape(str(paths[1]))):
        dataset[1]


def test_strict_mode_says_an_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "audio_only.mp4"
    AudioEncoder(torch.zeros(1, 16000), sample_rate=16000).to_file(path)  # one second of silence, AAC
    dataset = data.VideoDataset([path], [0], num_frames=2, resolution=RESOLUTION, train=True, strict=True)
    with pytest.raises(dataset_files.BrokenVideoError) as error:
        dataset[0]
    assert str(error.value) == f"cannot decode video {path}: the file has no video stream"


def test_broken_count_is_shared_by_loader_workers(videos_with_broken_ones) -> None:
    paths, _ = videos_with_broken_ones
    dataset = data.VideoDataset(paths, list(range(6)), num_frames=2, resolution=RESOLUTION, train=True)
    loader = data.build_loader(dataset, batch_size=2, shuffle=True, workers=2, seed=0)
    assert loader.persistent_workers and loader.num_workers == 2
    batches = list(loader)  # the warnings are printed by the worker processes
    assert [tuple(batch[0].shape) for batch in batches] == [(2, 2, 3, RESOLUTION, RESOLUTION)] * 3
    assert sorted(torch.cat([labels for _, labels in batches]).tolist()) == [0, 3, 3, 3, 5, 5]
    assert dataset.broken_count() == 3  # distinct videos, whichever worker met them and however often


def test_data_errors_survive_pickling(tmp_path):
    broken = dataset_files.BrokenVideoError(tmp_path / "a.avi", "no decodable frames")
    copy = pickle.loads(pickle.dumps(broken))
    assert type(copy) is dataset_files.BrokenVideoError and str(copy) == str(broken)
    assert (copy.path, copy.reason) == (broken.path, broken.reason)
    assert str(pickle.loads(pickle.dumps(data.DataError("bad\nlayout")))) == "bad\nlayout"


def test_strict_error_in_a_worker_is_one_line(tiny_root, golden_clip, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(tiny_root, root)
    victim = root / UCF101.videos / "MovingUp" / "v_MovingUp_g01_c01.avi"  # the third test video
    victim.write_bytes(b"not a video")
    lines = {}
    for workers in (0, 2):
        code, output = run(
            evaluate.app, "recognize", "--dataset", "ucf101", "--root", root, "--clip", golden_clip,
            "--frames", 2, "--batch-size", 2, "--workers", workers, "--strict", "--out", tmp_path / "e.json",
        )  # fmt: skip
        assert code == 1 and "Traceback" not in output and "Caught" not in output, output
        (lines[workers],) = error_lines(output)
    assert lines[0] == lines[2] and lines[0].startswith(f"error: cannot decode video {victim}")


def test_loader_shuffle_order_follows_the_seed(videos_with_broken_ones) -> None:
    paths, _ = videos_with_broken_ones
    dataset = data.VideoDataset(paths, list(range(6)), num_frames=2, resolution=RESOLUTION, train=True)

    def order(seed: int) -> list[list[int]]:
        return list(data.build_loader(dataset, batch_size=2, shuffle=True, workers=0, seed=seed).batch_sampler)

    assert order(0) == order(0) != order(1)


def test_a_broken_retrieval_test_video_keeps_its_caption(videos_with_broken_ones) -> None:
    paths, _ = videos_with_broken_ones
    captions = [f"caption {index}" for index in range(6)]
    dataset = data.VideoDataset(paths, captions, num_frames=2, resolution=RESOLUTION, train=False, keep_alignment=True)
    with pytest.warns(dataset_files.BrokenVideoWarning, match=re.escape(str(paths[2]))):
        clip, caption = dataset[2]
    assert caption == "caption 2" and torch.equal(clip, torch.zeros(2, 3, RESOLUTION, RESOLUTION))
    assert dataset.broken_count() == 1


def test_a_short_video_repeats_frames(tmp_path: Path) -> None:
    path = tmp_path / "short.webm"
    dataset_files.write_video(path, grey_video([40, 140, 240]), fps=10)
    dataset = data.VideoDataset([path], [0], num_frames=8, resolution=RESOLUTION, train=False)
    clip, _ = dataset[0]
    levels = [[40, 140, 240][index] for index in data.sample_indices(3, 8, train=False)[0].tolist()]
    expected = torch.stack([normalised(level).flatten() for level in levels])  # [8, 3]
    assert torch.allclose(clip.mean(dim=(2, 3)), expected, atol=0.06)
