"""MSVD, LSMDC, ActivityNet Captions, DiDeMo and VATEX in their published layouts, quirks included, built from real
video files in temporary folders; and ``train.py`` / ``evaluate.py retrieve`` on them."""

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import MSVD_CAPTIONS, MSVD_SPLITS, msvd_level
from typer.testing import CliRunner

import data
import evaluate
import prepare
import train
from loading import dataset_files, layouts, protocols
from plumbing import runs, runtime
from stop import STOPConfig

MSVD, LSMDC, ACTIVITYNET, DIDEMO, VATEX = (
    protocols.PROTOCOLS[name] for name in ("msvd", "lsmdc", "activitynet", "didemo", "vatex")
)
SIDE = 32
RESOLUTION = 32


def grey(levels: list[int]) -> torch.Tensor:
    """Frame i a flat grey of brightness levels[i]: uint8 [T, 3, SIDE, SIDE]."""
    return torch.tensor(levels, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, SIDE, SIDE).contiguous()


def mean_level(clip: torch.Tensor) -> float:
    """The grey level of a normalised clip [T, 3, R, R], undoing CLIP's normalisation."""
    mean, std = torch.tensor(data.CLIP_MEAN), torch.tensor(data.CLIP_STD)
    return float(((clip.mean(dim=(0, 2, 3)) * std + mean) * 255).mean())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with dataset_files.single_threaded():
        yield


def build(name: str, root: Path, split: str, **options) -> data.VideoDataset:
    return data.build_dataset(name, root, split, num_frames=2, resolution=RESOLUTION, **options)


# ---------------------------------------------------------------- MSVD


def test_msvd_training_takes_every_caption_of_the_crlf_listed_videos(msvd_root: Path) -> None:
    train_set = build("msvd", msvd_root, "train")
    expected = [(v, " ".join(words)) for v in MSVD_SPLITS["train"] for words in MSVD_CAPTIONS[v]]
    assert [(path.stem, caption) for path, caption in zip(train_set.paths, train_set.targets)] == expected
    assert train_set.paths[0].name == "-4wsuPCjDBc_5_15.avi" and train_set.caption_groups is None


def test_msvd_test_groups_captions_by_video_and_leaves_out_the_missing_one(msvd_root: Path) -> None:
    with pytest.warns(layouts.MissingVideosWarning) as caught:
        test_set = build("msvd", msvd_root, "test")
    assert len(caught) == 1  # listed once
    assert caught[0].filename == __file__  # it points at the line that built the dataset
    message = str(caught[0].message)
    assert "zzLq_missing_1_4" in message and str(msvd_root / MSVD.videos) in message
    assert "the test set has 3 videos and 6 captions instead of 4 and 8" in message and "--strict" in message
    present = [v for v in MSVD_SPLITS["test"] if v != "zzLq_missing_1_4"]
    assert [path.stem for path in test_set.paths] == present and test_set.targets == [0, 1, 2]
    assert test_set.caption_groups == [[" ".join(words) for words in MSVD_CAPTIONS[v]] for v in present]
    assert test_set.left_out == ["zzLq_missing_1_4"] and test_set.keep_alignment
    for index, video_id in enumerate(present):  # item i is video i, its target its index
        clip, target = test_set[index]
        assert target == index and abs(mean_level(clip) - msvd_level(video_id)) < 3


def test_msvd_strict_makes_a_missing_video_an_error(msvd_root: Path) -> None:
    expected = r"msvd: 1 test video listed in .* is not under .*: zzLq_missing_1_4 \(without --strict it is left out\)"
    with pytest.raises(data.DataError, match=expected):
        build("msvd", msvd_root, "test", strict=True)
    assert len(build("msvd", msvd_root, "train", strict=True)) == 3  # nothing missing there


class WritesAFile:
    """Unpickling this calls ``open(target, "w")``: a pickle that would run code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")


def copy_with_captions(msvd_root: Path, tmp_path: Path, content: bytes) -> Path:
    root = tmp_path / "msvd"
    (root / MSVD.annotations).mkdir(parents=True)
    (root / MSVD.videos).symlink_to(msvd_root / MSVD.videos)
    for split in MSVD_SPLITS:
        list_file = Path(MSVD.annotations, f"{split}_list.txt")
        (root / list_file).write_bytes((msvd_root / list_file).read_bytes())
    (root / MSVD.annotations / "raw-captions.pkl").write_bytes(content)
    return root


def test_a_crafted_caption_pickle_runs_nothing(msvd_root: Path, tmp_path: Path) -> None:
    witness = tmp_path / "written-by-the-pickle"
    crafted = pickle.dumps({"-4wsuPCjDBc_5_15": [["a", "man"]], "payload": WritesAFile(witness)})
    pickle.loads(pickle.dumps(WritesAFile(tmp_path / "proof"))).close()
    assert (tmp_path / "proof").exists()  # what an ordinary unpickler does with it
    root = copy_with_captions(msvd_root, tmp_path, crafted)
    with pytest.raises(data.DataError) as error:
        build("msvd", root, "train")
    assert not witness.exists()
    assert str(root / MSVD.annotations / "raw-captions.pkl") in str(error.value) and "it refers to io.open" in str(
        error.value
    )


@pytest.mark.parametrize(
    "content",
    [{"-4wsuPCjDBc_5_15": [("a", "tuple")]}, {"-4wsuPCjDBc_5_15": [["a", 3]]}, ["not", "a", "dict"], {1: [["a"]]}],
    ids=["tuple", "number", "list", "number-key"],
)
def test_a_caption_pickle_of_other_types_is_one_error(msvd_root: Path, tmp_path: Path, content: object) -> None:
    root = copy_with_captions(msvd_root, tmp_path, pickle.dumps(content))
    with pytest.raises(data.DataError, match=re.escape(f"msvd: {root / MSVD.annotations / 'raw-captions.pkl'}")):
        build("msvd", root, "train")


# ---------------------------------------------------------------- LSMDC

LSMDC_TRAIN = [
    ("1004_Juno_00.00.32.849-00.00.35.458", "SOMEONE walks in."),
    ("1004_Juno_00.00.32.849-00.00.35.458", "She carries a jug."),
    ("1012_Unbreakable_00.05.16.065-00.05.21.941", "He looks up, startled."),
]
LSMDC_TEST = [
    ("3086_UGLY_TRUTH_00.23.23.000-00.23.28.886", "SOMEONE stands below, hands on her hips."),
    ("3086_UGLY_TRUTH_00.23.29.000-00.23.31.500", 'She says "no".'),
]


@pytest.fixture(scope="module")
def lsmdc_root(tmp_path_factory) -> Path:
    """LSMDC: clip ids with dots and hyphens, AVI files in one folder per movie, tab-separated CSVs."""
    root = tmp_path_factory.mktemp("lsmdc")
    for number, clip_id in enumerate(dict.fromkeys(clip for clip, _ in LSMDC_TRAIN + LSMDC_TEST)):
        movie = clip_id.rsplit("_", 1)[0]
        dataset_files.write_video(root / LSMDC.videos / movie / f"{clip_id}.avi", grey([60 + 40 * number] * 3), 24)
    (root / LSMDC.annotations).mkdir()
    for file_name, rows in (
        ("LSMDC16_annos_training.csv", LSMDC_TRAIN),
        ("LSMDC16_challenge_1000_publictect.csv", LSMDC_TEST),
    ):
        times = "\t".join(["00.23.23.000", "00.23.28.886"] * 2)
        (root / LSMDC.annotations / file_name).write_text("".join(f"{c}\t{times}\t{s}\n" for c, s in rows))
    return root


def test_lsmdc_ids_with_dots_find_their_videos_in_movie_folders(lsmdc_root: Path) -> None:
    train_set, test_set = build("lsmdc", lsmdc_root, "train"), build("lsmdc", lsmdc_root, "test")
    assert [(path.stem, caption) for path, caption in zip(train_set.paths, train_set.targets)] == LSMDC_TRAIN
    assert [(path.stem, caption) for path, caption in zip(test_set.paths, test_set.targets)] == LSMDC_TEST
    assert test_set.paths[0].parent.name == "3086_UGLY_TRUTH" and test_set.caption_groups is None
    clip, caption = test_set[1]
    assert caption == 'She says "no".' and abs(mean_level(clip) - (60 + 40 * 3)) < 3


def test_lsmdc_a_line_without_six_fields_is_named(lsmdc_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "lsmdc"
    (root / LSMDC.annotations).mkdir(parents=True)
    (root / LSMDC.videos).symlink_to(lsmdc_root / LSMDC.videos)
    bad = root / LSMDC.annotations / "LSMDC16_challenge_1000_publictect.csv"
    bad.write_text("3086_UGLY_TRUTH_00.23.23.000-00.23.28.886\tno times\n")
    with pytest.raises(data.DataError, match=rf"lsmdc: {re.escape(str(bad))}, line 1: expected 6 tab-separated"):
        build("lsmdc", root, "test")


# ---------------------------------------------------------------- ActivityNet Captions


@pytest.fixture(scope="module")
def activitynet_root(tmp_path_factory) -> Path:
    """ActivityNet Captions: `v_` keys (one YouTube id itself starts with `v_`), sentences with a leading space, an
    id listed in train_ids.json without captions (as 15 are), MP4 videos named by the YouTube id."""
    root = tmp_path_factory.mktemp("activitynet")
    videos = {"v_QOlSCBRmfWY": 50, "v_v_UmAH95xls": 110, "v_ehGHCYKzyZ8": 170, "v_jTMdMnbW9OI": 230}
    for key, level in videos.items():
        dataset_files.write_video(root / ACTIVITYNET.videos / f"{key[2:]}.mp4", grey([level] * 4), 10)
    train = {
        "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.8, 19.9], [17.4, 60.8]],
                          "sentences": ["A young woman is seen standing.", " She then dances."]},
        "v_v_UmAH95xls": {"duration": 12.0, "timestamps": [[0, 12]], "sentences": [" A man rides a bike."]},
    }  # fmt: skip
    val = {
        "v_ehGHCYKzyZ8": {"duration": 30.0, "timestamps": [[0, 9], [9, 30]], "sentences": ["A dog.", " It runs."]},
        "v_jTMdMnbW9OI": {"duration": 745.5, "timestamps": [[0, 745]], "sentences": ["People play polo."]},
    }
    (root / ACTIVITYNET.annotations).mkdir()
    for name, content in (
        ("train.json", train),
        ("val_1.json", val),
        ("train_ids.json", ["v_QOlSCBRmfWY", "v_no_captions", "v_v_UmAH95xls"]),
        ("val_ids.json", ["v_ehGHCYKzyZ8", "v_jTMdMnbW9OI"]),
    ):
        (root / ACTIVITYNET.annotations / name).write_text(json.dumps(content))
    return root


def test_activitynet_paragraphs_and_v_v_keys(activitynet_root: Path) -> None:
    with pytest.warns(layouts.MissingVideosWarning, match=r"1 without captions: v_no_captions"):
        train_set = build("activitynet", activitynet_root, "train")
    assert [path.name for path in train_set.paths] == ["QOlSCBRmfWY.mp4", "v_UmAH95xls.mp4"]
    assert train_set.targets == ["A young woman is seen standing. She then dances.", "A man rides a bike."]
    assert train_set.left_out == ["v_no_captions"]
    test_set = build("activitynet", activitynet_root, "test")  # val_1
    assert test_set.targets == ["A dog. It runs.", "People play polo."] and test_set.caption_groups is None
    clip, caption = test_set[1]
    assert caption == "People play polo." and abs(mean_level(clip) - 230) < 3
    protocol = protocols.protocol("activitynet")
    assert (protocol.words, protocol.frames, protocol.paragraph) == (64, 64, True)


@pytest.mark.parametrize("bad", [42, ["v_jTMdMnbW9OI"]], ids=["number", "list"])
def test_activitynet_an_id_that_is_not_a_string_is_one_error_naming_it(
    activitynet_root: Path, tmp_path: Path, bad: object
) -> None:
    root = tmp_path / "activitynet"
    shutil.copytree(activitynet_root / ACTIVITYNET.annotations, root / ACTIVITYNET.annotations)
    (root / ACTIVITYNET.videos).symlink_to(activitynet_root / ACTIVITYNET.videos)
    ids_file = root / ACTIVITYNET.annotations / "val_ids.json"
    ids_file.write_text(json.dumps(["v_ehGHCYKzyZ8", bad]))
    with pytest.raises(data.DataError) as error:
        build("activitynet", root, "test")
    message = str(error.value)
    assert message.startswith(f"activitynet: {ids_file}: entry 2, {json.dumps(bad)}, is not a video id, expected ")
    assert '"v_<youtube id>"' in message and "\n" not in message


@pytest.mark.parametrize("lost", ["no captions", "no video"])
def test_activitynet_one_video_left_out_is_told_in_the_singular(activitynet_root: Path, tmp_path: Path, lost) -> None:
    """Only the videos whose files are missing change the counts the split would have had."""
    root = tmp_path / "activitynet"
    shutil.copytree(activitynet_root / ACTIVITYNET.annotations, root / ACTIVITYNET.annotations)
    (root / ACTIVITYNET.videos).symlink_to(activitynet_root / ACTIVITYNET.videos)
    ids_file = root / ACTIVITYNET.annotations / "val_ids.json"
    ids_file.write_text(json.dumps(["v_jTMdMnbW9OI", "v_gone"]))
    if lost == "no video":
        captions = json.loads((root / ACTIVITYNET.annotations / "val_1.json").read_text())
        captions["v_gone"] = {"duration": 10.0, "timestamps": [[0, 10]], "sentences": ["Nobody is there."]}
        (root / ACTIVITYNET.annotations / "val_1.json").write_text(json.dumps(captions))
    with pytest.warns(layouts.MissingVideosWarning) as caught:
        build("activitynet", root, "test")
    (warning,) = caught
    if lost == "no captions":
        why, counts_before = "1 without captions: v_gone", ""
    else:
        why = f"1 not under {root / ACTIVITYNET.videos}: v_gone"
        counts_before = " instead of 2 and 2; --strict makes a missing video an error"
    assert str(warning.message) == (
        f"activitynet: 1 of the 2 test videos listed in {ids_file} is left out ({why}): "
        f"the test set has 1 video and 1 caption{counts_before}"
    )


# ---------------------------------------------------------------- DiDeMo

DIDEMO_MOV = "54153313@N00_5138457779_cd6d1b0637.mov"
DIDEMO_3GP = "10015567@N08_3655084291_d755b7a3d5.3gp"
DIDEMO_MPG = "96092914@N00_2469553693_7e2b1a7bf0.mpg"  # listed, described, not on disk
DIDEMO_LONG = "23380546@N00_5187003393_2ec1b3c7b5.mp4"  # 40 s at 1 fps: only its first 31 s are sampled


@pytest.fixture(scope="module")
def didemo_root(tmp_path_factory) -> Path:
    """DiDeMo: Flickr file names with `@` and their extension; one saved as `<name>.mp4` (LM's AWS script), one
    missing; a 40-second video whose frame i has grey level 20 + 5 i."""
    root = tmp_path_factory.mktemp("didemo")
    videos = root / DIDEMO.videos
    dataset_files.write_video(videos / "clip.mp4", grey([70] * 4), 10)
    (videos / "clip.mp4").rename(videos / DIDEMO_MOV)  # MOV and MP4 are one family
    dataset_files.write_video(videos / f"{DIDEMO_3GP}.mp4", grey([140] * 4), 10)
    dataset_files.write_video(videos / DIDEMO_LONG, grey([20 + 5 * i for i in range(40)]), 1)
    moments = [
        {"annotation_id": 1, "video": DIDEMO_MOV, "description": "a girl waves", "times": [[0, 0], [0, 1]]},
        {"annotation_id": 2, "video": DIDEMO_3GP, "description": " the camera pans", "times": [[2, 3]]},
        {"annotation_id": 3, "video": DIDEMO_MOV, "description": "she smiles ", "times": [[4, 5]]},
        {"annotation_id": 4, "video": DIDEMO_MPG, "description": "nobody sees this", "times": [[1, 1]]},
        {"annotation_id": 5, "video": DIDEMO_LONG, "description": "it gets brighter", "times": [[0, 5]]},
    ]
    annotations = root / DIDEMO.annotations
    annotations.mkdir()
    for split in ("train", "test"):
        (annotations / f"{split}_data.json").write_text(json.dumps(moments))
    (annotations / "train_list.txt").write_text(f"{DIDEMO_LONG}\n")
    (annotations / "test_list.txt").write_text(f"{DIDEMO_MOV}\n{DIDEMO_MPG}\n{DIDEMO_3GP}\n")
    return root


def test_didemo_names_with_at_signs_and_extensions_and_joined_descriptions(didemo_root: Path) -> None:
    with pytest.warns(layouts.MissingVideosWarning, match=re.escape(DIDEMO_MPG)):
        test_set = build("didemo", didemo_root, "test")
    assert [path.name for path in test_set.paths] == [DIDEMO_MOV, f"{DIDEMO_3GP}.mp4"]
    assert test_set.targets == ["a girl waves she smiles", "the camera pans"]
    assert test_set.left_out == [DIDEMO_MPG]
    assert [round(mean_level(test_set[index][0])) for index in range(2)] == pytest.approx([70, 140], abs=3)


def test_didemo_samples_only_the_first_31_seconds(didemo_root: Path) -> None:
    train_set = build("didemo", didemo_root, "train")
    assert train_set.paths == [didemo_root / DIDEMO.videos / DIDEMO_LONG] and train_set.first_seconds == 31
    frames = data.read_frames(train_set.paths[0], 4, train=False, first_seconds=train_set.first_seconds)
    # 31 frames (1 fps) in 4 segments of 7.75: centres 3, 11, 19, 27 (the whole 40 would give 5, 15, 25, 35)
    assert frames.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([20 + 5 * i for i in (3, 11, 19, 27)], abs=3)


# ---------------------------------------------------------------- VATEX

VATEX_CAPTIONS = {
    "Ptf_2VRj-V0_000122_000132": ["A man plays a guitar.", "Someone strums.", "A guitarist performs."],
    "-0ifG6oNDQ4_000035_000045": ["A woman cooks.", "Food is fried."],
    "zzNA0Ff5Ka4_000010_000020": ["Kids play football."],  # its video is missing
    "vJdLpY3CkIM_000001_000011": ["A cat sleeps.", "The cat is asleep.", "A cat naps."],
}


@pytest.fixture(scope="module")
def vatex_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vatex")
    for number, video_id in enumerate(VATEX_CAPTIONS):
        if not video_id.startswith("zz"):
            dataset_files.write_video(root / VATEX.videos / f"{video_id}.mp4", grey([50 + 50 * number] * 4), 10)
    annotations = root / VATEX.annotations
    annotations.mkdir()
    (annotations / "ref_captions.json").write_text(json.dumps(VATEX_CAPTIONS))
    (annotations / "train_list.txt").write_text("Ptf_2VRj-V0_000122_000132\n")
    (annotations / "test_list.txt").write_text("\n".join(list(VATEX_CAPTIONS)[1:]) + "\n")
    return root


def test_vatex_multi_caption_test_set_without_its_missing_video(vatex_root: Path) -> None:
    train_set = build("vatex", vatex_root, "train")
    assert train_set.targets == VATEX_CAPTIONS["Ptf_2VRj-V0_000122_000132"]
    expected = "the test set has 2 videos and 5 captions instead of 3 and 6"
    with pytest.warns(layouts.MissingVideosWarning, match=expected):
        test_set = build("vatex", vatex_root, "test")
    assert [path.stem for path in test_set.paths] == ["-0ifG6oNDQ4_000035_000045", "vJdLpY3CkIM_000001_000011"]
    assert test_set.caption_groups == [VATEX_CAPTIONS[path.stem] for path in test_set.paths]
    with pytest.raises(data.DataError, match="zzNA0Ff5Ka4_000010_000020"):
        build("vatex", vatex_root, "test", strict=True)


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("msvd", "raw-captions.pkl"),
        ("lsmdc", "LSMDC16_annos_training.csv"),
        ("activitynet", "train_ids.json"),
        ("didemo", "train_list.txt"),
        ("vatex", "train_list.txt"),
    ],
)
def test_a_missing_annotation_file_is_named_with_the_layout(tmp_path: Path, name: str, missing: str) -> None:
    """``missing`` is in the dataset's annotation folder."""
    protocol = protocols.PROTOCOLS[name]
    (tmp_path / protocol.videos).mkdir()
    if name == "msvd":
        (tmp_path / protocol.annotations).mkdir()
        (tmp_path / protocol.annotations / "train_list.txt").write_text("x\n")
    with pytest.raises(data.DataError) as error:
        build(name, tmp_path, "train")
    assert str(tmp_path / protocol.annotations / missing) in str(error.value) and data.LAYOUTS[name] in str(error.value)


# ---------------------------------------------------------------- train.py and evaluate.py


def invoke(app, *args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_msvd_trains_and_evaluates_from_its_checkpoint(msvd_root: Path, golden_clip: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--dataset", "msvd", "--root", msvd_root, "--frames", 2, "--batch-size", 2, "--workers", 0]
    invoke(train.app, "retrieve", *common, "--clip", golden_clip, "--epochs", 1, "--out", run)
    config = runs.read_checkpoint(run / "best.pt")["config"]
    assert (config["words"], config["frames"]) == (32, 2)
    invoke(evaluate.app, "retrieve", *common, "--checkpoint", run / "best.pt", "--out", tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert (result["videos"], result["left_out_videos"], result["words"]) == (3, 1, 32)
    assert result["text_to_video"]["R@5"] == result["video_to_text"]["R@5"] == 100.0  # 3 videos: every rank <= 3


def test_msvd_zero_shot_metrics_match_a_loop_over_caption_groups(msvd_root: Path, golden_clip: Path, tmp_path):
    out = tmp_path / "eval.json"
    options = ["--dataset", "msvd", "--root", msvd_root, "--frames", 2, "--workers", 0, "--batch-size", 2]
    invoke(evaluate.app, "retrieve", *options, "--clip", golden_clip, "--prompt", "none", "--out", out)
    result = json.loads(out.read_text())

    # The same model and clips, scored by explicit loops over the caption groups.
    backbone = runtime.load_backbone(str(golden_clip))
    model = runtime.build_model(backbone, STOPConfig("none"), torch.device("cpu"))
    test_set = data.build_dataset(
        "msvd", msvd_root, "test", num_frames=2, resolution=model.clip.visual.input_resolution
    )
    with torch.no_grad():
        videos = model.encode_video(torch.stack([test_set[i][0] for i in range(len(test_set))]))  # [3, E]
        groups = [model.encode_text(backbone.tokenize(group)) for group in test_set.caption_groups]  # [n_j, E] each
    scores = [group @ videos.t() for group in groups]  # [n_j, 3]: caption of video j against every video
    t2v = [1 + int((row > row[j]).sum()) for j, group in enumerate(scores) for row in group]
    v2t = []
    for k in range(len(videos)):
        best = [float(group[:, k].max()) for group in scores]  # video k against each group's best caption
        v2t.append(1 + sum(score > best[k] for score in best))
    for direction, ranks in (("text_to_video", t2v), ("video_to_text", v2t)):
        assert result[direction]["R@1"] == pytest.approx(100 * sum(r == 1 for r in ranks) / len(ranks))
        assert result[direction]["MnR"] == pytest.approx(sum(ranks) / len(ranks))
    assert len(t2v) == 6


def test_activitynet_evaluates_paragraphs_with_64_words_and_frames(activitynet_root: Path, golden_clip, tmp_path):
    out = tmp_path / "eval.json"
    options = ["--dataset", "activitynet", "--root", activitynet_root, "--workers", 0, "--prompt", "none"]
    invoke(evaluate.app, "retrieve", *options, "--clip", golden_clip, "--out", out)
    result = json.loads(out.read_text())
    assert (result["frames"], result["words"], result["videos"]) == (64, 64, 2)


def test_a_retrieval_dataset_is_refused_for_recognition(msvd_root: Path, tmp_path: Path) -> None:
    out = ["--root", str(msvd_root), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(train.app, ["recognize", "--dataset", "msvd", *out])
    assert result.exit_code == 2 and "'msvd' is not one of" in " ".join(result.output.split())
    result = CliRunner().invoke(train.app, ["retrieve", "--dataset", "ucf101", *out])
    assert result.exit_code == 2 and "'ucf101' is not one of" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_a_prepared_didemo_copy_keeps_names_extensions_and_items(didemo_root: Path, tmp_path: Path) -> None:
    report = prepare.prepare_dataset("didemo", didemo_root, tmp_path / "prepared", progress=False)
    assert (report.written, report.failures) == (3, [])
    with pytest.warns(layouts.MissingVideosWarning):
        original, prepared = build("didemo", didemo_root, "test"), build("didemo", tmp_path / "prepared", "test")
    assert [path.relative_to(tmp_path / "prepared") for path in prepared.paths] == [
        path.relative_to(didemo_root) for path in original.paths
    ]
    assert prepared.targets == original.targets
    assert (tmp_path / "prepared" / DIDEMO.annotations / "test_data.json").is_file()
    assert abs(mean_level(prepared[0][0]) - 70) < 3  # the MOV, re-encoded into a MOV


def test_strict_evaluation_of_msvd_ends_with_one_error_line(msvd_root: Path, golden_clip: Path, tmp_path) -> None:
    arguments = ["retrieve", "--dataset", "msvd", "--root", str(msvd_root), "--clip", str(golden_clip), "--strict"]
    result = CliRunner().invoke(evaluate.app, [*arguments, "--prompt", "none", "--out", str(tmp_path / "eval.json")])
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        len(lines) == 1
        and lines[0].startswith("error: msvd: 1 test video listed in ")
        and "zzLq_missing_1_4" in lines[0]
    )
