"""Kinetics-400: CVDF's layout (and its class-folder arrangement) with real H.264 MP4 files, its quirks (ids that
start with `-`, rows whose video is gone, CVDF's replacements), and the multi-view test (temporal views x 3 crops)."""

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import data
import evaluate
import prepare
import stop
import train
from loading import dataset_files, layouts
from loading.protocols import PROTOCOLS
from plumbing import runtime
from stop import STOPConfig

RESOLUTION = 48  # model input size of the data tests: deliberately not 224
MEAN = torch.tensor(data.CLIP_MEAN)[:, None, None]
STD = torch.tensor(data.CLIP_STD)[:, None, None]
HEADER = "label,youtube_id,time_start,time_end,split,is_cc\n"
FOOTBALL = "passing American football (in game)"
CLASSES = ["abseiling", "air drumming", FOOTBALL]  # sorted: the class numbers

# (label, youtube_id, time_start, time_end, grey level of its video or None when it has none on disk)
TRAIN_ROWS = [
    ("abseiling", "-Yq7b_Tr1kE", 10, 20, 40),  # an id that starts with `-` and holds `_`
    ("air drumming", "aB3dE5gH7jK", 0, 10, 80),
    (FOOTBALL, "zz_9-Q0pXyW", 5, 15, 120),
    ("abseiling", "M1ss1ng_id0", 30, 40, None),  # gone from YouTube: no video
    ("air drumming", "R3placed_v1", 0, 10, 160),  # corrupted in train/, CVDF's replacement is good
]
VAL_ROWS = [
    ("air drumming", "-0Ab_cdEfGh", 12, 22, 200),
    ("abseiling", "Qx-7_val002", 1, 11, 230),
    (FOOTBALL, "P4ss1ng_val", 0, 10, None),
]
SPLIT_ROWS = {"train": TRAIN_ROWS, "val": VAL_ROWS}
ANNOTATIONS = PROTOCOLS["kinetics400"].annotations  # the CSVs' folder; the videos lie under the root itself
runner = CliRunner()


def file_name(video_id: str, start: int, end: int) -> str:
    return f"{video_id}_{start:06d}_{end:06d}.mp4"


def grey(level: int, frames: int = 8, side: int = 32) -> torch.Tensor:
    return torch.full((frames, 3, side, side), level, dtype=torch.uint8)


def levels_of(clip: torch.Tensor) -> torch.Tensor:
    """Normalised frames ``[..., 3, H, W]`` back to grey levels 0-255, per channel: ``[..., 3, H, W]``."""
    return (clip * STD + MEAN) * 255


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with dataset_files.single_threaded():
        yield


@pytest.fixture(scope="module")
def kinetics_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CVDF's layout after k400_extractor.sh: annotations/*.csv (labels with spaces quoted, as published),
    train/ and val/ with `<id>_<start>_<end>.mp4`, and replacement/replacement_for_corrupted_k400/."""
    root = tmp_path_factory.mktemp("k400")
    (root / ANNOTATIONS).mkdir()
    for split, rows in SPLIT_ROWS.items():
        lines = [f'"{label}",{video_id},{start},{end},{split},0\n' for label, video_id, start, end, _ in rows]
        (root / ANNOTATIONS / f"{split}.csv").write_text(HEADER + "".join(lines))
        for _, video_id, start, end, level in rows:
            if level is not None:
                dataset_files.write_video(root / split / file_name(video_id, start, end), grey(level), 30)
    replaced = root / "train" / file_name("R3placed_v1", 0, 10)
    (root / layouts.KINETICS_REPLACEMENTS).mkdir(parents=True)
    shutil.move(replaced, root / layouts.KINETICS_REPLACEMENTS / replaced.name)
    replaced.write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated by the download")
    return root


@pytest.fixture(scope="module")
def arranged_root(kinetics_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same clips in the class folders of CVDF's arrange_by_classes.py only: videos/<split>/<label>/."""
    root = tmp_path_factory.mktemp("k400-arranged")
    shutil.copytree(kinetics_root / ANNOTATIONS, root / ANNOTATIONS)
    for split, rows in SPLIT_ROWS.items():
        for label, video_id, start, end, level in rows:
            source = kinetics_root / split / file_name(video_id, start, end)
            if video_id == "R3placed_v1":
                source = kinetics_root / layouts.KINETICS_REPLACEMENTS / source.name  # the script links the replacement
            if level is not None:
                (root / "videos" / split / label).mkdir(parents=True, exist_ok=True)
                shutil.copy(source, root / "videos" / split / label / source.name)
    return root


def build(root: Path, split: str, **options) -> data.VideoDataset:
    options = {"num_frames": 2, "resolution": RESOLUTION, **options}
    return data.build_dataset("kinetics400", root, split, **options)


def missing_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(warning.message) for warning in caught if warning.category is layouts.MissingVideosWarning]


# ---------------------------------------------------------------- the layout


@pytest.mark.parametrize("layout", ["cvdf", "class-folders"])
def test_clips_are_the_csv_rows_found_on_disk_with_their_labels(kinetics_root, arranged_root, layout) -> None:
    root = kinetics_root if layout == "cvdf" else arranged_root
    for split, csv_split, name in (("train", "train", "train"), ("test", "val", "val")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = build(root, split)
        present = [row for row in SPLIT_ROWS[csv_split] if row[4] is not None]
        assert dataset.classes == CLASSES
        assert len(dataset) == len(present)
        assert dataset.targets == [CLASSES.index(label) for label, *_ in present]
        assert [path.name for path in dataset.paths] == [file_name(*row[1:4]) for row in present]
        for index, (*_, level) in enumerate(present):  # each item is its own video: its grey level
            clip, label = dataset[index]
            assert clip.shape == (2, 3, RESOLUTION, RESOLUTION) and label == dataset.targets[index]
            assert (levels_of(clip).mean() - level).abs() < 4, (index, level)
        absent = [video_id for _, video_id, *_, level in SPLIT_ROWS[csv_split] if level is None]
        (message,) = missing_warnings(caught)  # listed once, one line
        assert f"1 of the {len(SPLIT_ROWS[csv_split])} clips of {root / ANNOTATIONS / f'{name}.csv'}" in message
        assert absent[0] in message and f"left out of the {name} split" in message and "\n" not in message


def test_cvdf_replacements_are_read_before_the_corrupted_originals(kinetics_root) -> None:
    with pytest.warns(layouts.MissingVideosWarning, match="M1ss1ng_id0") as caught:
        dataset = build(kinetics_root, "train")
    assert caught[0].filename == __file__  # it points at the line that built the dataset
    replaced = dataset.paths[3]
    assert replaced == kinetics_root / layouts.KINETICS_REPLACEMENTS / file_name("R3placed_v1", 0, 10)
    assert dataset.broken_count() == 0


def test_strict_makes_missing_videos_an_error(kinetics_root) -> None:
    with pytest.raises(data.DataError, match=r"kinetics400: 1 of the 3 clips of .*val\.csv .*P4ss1ng_val.*--strict"):
        build(kinetics_root, "test", strict=True)


def test_a_missing_annotation_file_names_it_with_the_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(data.DataError) as error:
        build(tmp_path, "test")
    assert str(tmp_path / ANNOTATIONS / "val.csv") in str(error.value)
    assert data.LAYOUTS["kinetics400"] in str(error.value)


def test_a_row_without_label_is_one_error_naming_file_and_line(kinetics_root, tmp_path: Path) -> None:
    root = Path(shutil.copytree(kinetics_root / ANNOTATIONS, tmp_path / ANNOTATIONS)).parent
    (root / ANNOTATIONS / "val.csv").write_text(HEADER + "abseiling,-0Ab_cdEfGh,1,11,val,0\n,Qx-7_val002,1,11,val,0\n")
    with pytest.raises(data.DataError, match=re.escape(f"{root / ANNOTATIONS / 'val.csv'}, line 3: expected a")):
        build(root, "test")


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ('"abseiling,aaaaaaaaaa1,0,10,x,0\n"air drumming",bbbbbbbbbb2,0,10,x,0\n', "runs on to line 3"),
        ("abseiling,aaaaaaaaaa1,0,10,x\n", "5 fields, expected 6"),
        ("abseiling,aaaaaaaaaa1,0,10,x,0,1\n", "7 fields, expected 6"),
    ],
    ids=["stray-quote", "a-field-short", "a-field-over"],
)
def test_a_row_that_does_not_parse_is_one_error_naming_file_and_line(
    kinetics_root, tmp_path: Path, rows: str, problem: str
) -> None:
    """A stray quote would merge two rows into one whose label holds a newline; a short row would lose its fields."""
    root = Path(shutil.copytree(kinetics_root / ANNOTATIONS, tmp_path / ANNOTATIONS)).parent
    (root / ANNOTATIONS / "val.csv").write_text(HEADER + rows)
    with pytest.raises(data.DataError) as error:
        build(root, "test")
    message = str(error.value)
    assert message.startswith(f"kinetics400: {root / ANNOTATIONS / 'val.csv'}, line 2: ") and problem in message
    assert "\n" not in message


def test_an_annotation_file_with_a_byte_order_mark_reads_as_without(kinetics_root, tmp_path: Path) -> None:
    root = Path(shutil.copytree(kinetics_root, tmp_path / "k400"))
    val = root / ANNOTATIONS / "val.csv"
    val.write_bytes(b"\xef\xbb\xbf" + val.read_bytes())
    with pytest.warns(layouts.MissingVideosWarning, match="P4ss1ng_val"):
        dataset = build(root, "test")
    assert dataset.classes == CLASSES and dataset.targets == [CLASSES.index("air drumming"), CLASSES.index("abseiling")]


# ---------------------------------------------------------------- three crops and several views


def banded_video(bands: tuple[int, int, int], portrait: bool, frames: int = 8, step: int = 0) -> torch.Tensor:
    """Three 32-px squares side by side (or stacked), flat greys ``bands`` brightened by ``step`` every frame."""
    time_offset = step * torch.arange(frames)[:, None, None, None, None]  # [T, 1, 1, 1, 1]
    squares = torch.tensor(bands)[None, :, None, None, None] + time_offset  # [T, 3 bands, 1, 1, 1]
    squares = squares.expand(frames, 3, 3, 32, 32)  # [T, band, C, 32, 32]
    video = torch.cat(squares.unbind(1), dim=-2 if portrait else -1)  # [T, C, 96, 32] or [T, C, 32, 96]
    return video.to(torch.uint8).contiguous()


@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_three_crops_are_the_squares_along_the_long_side(tmp_path: Path, portrait: bool) -> None:
    path = tmp_path / "bands.mp4"
    bands = (30, 130, 220)
    dataset_files.write_video(path, banded_video(bands, portrait), fps=30)
    dataset = data.VideoDataset([path], [0], num_frames=2, resolution=RESOLUTION, train=False, crops=3)
    clip, _ = dataset[0]
    assert clip.shape == (3, 2, 3, RESOLUTION, RESOLUTION)
    # short side 32 -> 48, long side 96 -> 144: the crops are its thirds; their middles are one flat grey each
    middle = slice(RESOLUTION // 4, 3 * RESOLUTION // 4)
    for crop, level in zip(clip, bands):
        assert (levels_of(crop)[..., middle, middle] - level).abs().max() < 6, level


def test_views_times_crops_are_ordered_view_by_view(tmp_path: Path) -> None:
    path = tmp_path / "brightening-bands.mp4"
    bands, step = (20, 100, 180), 8
    dataset_files.write_video(path, banded_video(bands, portrait=False, step=step), fps=30)
    dataset = data.VideoDataset([path], [0], num_frames=2, resolution=RESOLUTION, train=False, views=2, crops=3)
    clip, _ = dataset[0]
    assert clip.shape == (6, 2, 3, RESOLUTION, RESOLUTION)
    frame_of = data.sample_indices(8, 2, train=False, views=2)  # [view, t]: [[1, 5], [3, 7]]
    middle = slice(RESOLUTION // 4, 3 * RESOLUTION // 4)
    for k in range(6):
        view, crop = divmod(k, 3)
        for t in range(2):
            expected = bands[crop] + step * int(frame_of[view, t])
            assert (levels_of(clip[k, t])[..., middle, middle].mean() - expected).abs() < 4, (k, t)


def test_crops_other_than_one_or_three_and_training_crops_are_refused(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="crops 2: expected 1"):
        data.VideoDataset([tmp_path / "x.mp4"], [0], num_frames=2, resolution=RESOLUTION, train=False, crops=2)
    with pytest.raises(data.DataError, match="evaluation only"):
        data.VideoDataset([tmp_path / "x.mp4"], [0], num_frames=2, resolution=RESOLUTION, train=True, crops=3)
    result = runner.invoke(
        evaluate.app, ["recognize", "--dataset", "kinetics400", "--root", str(tmp_path), "--crops", "2"]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --crops 2: expected 1 (the centre square) or 3 (left, centre, right squares)"
    ]


def test_multi_view_scores_are_those_of_the_averaged_view_features(golden_clip, tmp_path: Path) -> None:
    """X-CLIP's multi-view test: each video's feature is the mean of its views' (2 clips x 3 crops), normalised."""
    cpu = torch.device("cpu")
    backbone = runtime.load_backbone(str(golden_clip))
    torch.manual_seed(0)
    model = runtime.build_model(backbone, STOPConfig("stop"), cpu).eval()
    resolution = model.clip.visual.input_resolution
    paths = [tmp_path / f"video{index}.mp4" for index in range(4)]
    for path, (bands, step) in zip(
        paths, [((20, 100, 180), 8), ((180, 100, 20), 8), ((60, 200, 140), 4), ((120, 30, 220), 3)]
    ):
        dataset_files.write_video(path, banded_video(bands, portrait=False, step=step), fps=30)  # every view differs
    labels = [0, 1, 2, 1]
    test = data.VideoDataset(paths, labels, num_frames=2, resolution=resolution, train=False, views=2, crops=3)
    prompts = stop.class_texts("kinetics400", CLASSES)
    assert prompts[2] == f"a video of a person {FOOTBALL}."
    class_features = stop.text_features(model, backbone.tokenize, prompts, cpu)  # [3, E]
    loader = data.build_loader(test, batch_size=2, shuffle=False, workers=0)
    metrics = evaluate.evaluate_recognition(model, loader, class_features, cpu, "fp32")

    ranks = []
    with torch.no_grad():
        for clip, label in (test[index] for index in range(len(test))):
            views = torch.cat([model.encode_video(view[None]) for view in clip])  # [6, E], one view at a time
            assert (torch.cdist(views, views) + torch.eye(6)).min() > 1e-3  # six different views
            feature = views.mean(dim=0) / views.mean(dim=0).norm()  # [E]
            assert torch.allclose(evaluate.encode_videos(model.encode_video, clip[None])[0], feature, atol=1e-5)
            logits = model.similarity(feature[None], class_features)[0]  # [3]
            ranks.append(1 + int((logits > logits[label]).sum()))
    expected = {f"top{k}": 100 * sum(rank <= k for rank in ranks) / len(ranks) for k in (1, 5)}
    assert metrics == pytest.approx(expected)


# ---------------------------------------------------------------- commands


@pytest.mark.filterwarnings("ignore::loading.layouts.MissingVideosWarning")  # its text: test_clips_are_the_csv_rows...
def test_train_evaluate_and_explain_on_a_kinetics_layout(kinetics_root, golden_clip, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["--dataset", "kinetics400", "--root", kinetics_root, "--device", "cpu", "--workers", 0]
    arguments = ["recognize", *common, "--clip", golden_clip, "--frames", 2, "--batch-size", 2, "--epochs", 1]
    result = runner.invoke(train.app, [str(a) for a in [*arguments, "--out", out]])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= record["top1"] <= record["top5"] <= 100 and record["broken_videos"] == 0

    evaluation = ["recognize", *common, "--checkpoint", out / "best.pt", "--views", 2, "--crops", 3]
    result = runner.invoke(evaluate.app, [str(a) for a in evaluation])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval-recognize-kinetics400-best-views2-crops3.json").read_text())
    assert (report["videos"], report["views"], report["crops"], report["broken_videos"]) == (2, 2, 3, 0)
    assert 0 <= report["top1"] <= report["top5"] == 100  # three classes: each label is in the top five

    video = kinetics_root / "val" / file_name("-0Ab_cdEfGh", 12, 22)
    explained = ["explain", video, "--checkpoint", out / "best.pt", "--labels-from", "kinetics400", "--out"]
    result = runner.invoke(evaluate.app, [str(a) for a in [*explained, tmp_path / "explain.png"]])
    assert result.exit_code == 0, result.output
    assert "top-3 of 3 kinetics400 classes: " in result.output and FOOTBALL in result.output


def test_prepare_copies_the_layout_for_the_same_listing(kinetics_root, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    report = prepare.prepare_dataset("kinetics400", kinetics_root, out, workers=1, progress=False)
    assert [path for path, _ in report.failures] == [f"train/{file_name('R3placed_v1', 0, 10)}"]  # the corrupted one
    assert report.written == 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", layouts.MissingVideosWarning)
        for split in ("train", "test"):
            raw, prepared = build(kinetics_root, split), build(out, split)
            assert [p.relative_to(out) for p in prepared.paths] == [p.relative_to(kinetics_root) for p in raw.paths]
            assert (prepared.targets, prepared.classes) == (raw.targets, raw.classes)
