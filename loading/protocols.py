"""Each benchmark's protocol in one table: frames, caption tokens, batch, epochs and learning rate, and their source.

What a researcher reproducing a number checks first, so every row names where it comes from
(``docs/fidelity.md`` gives the files). Every row names the two folders of its dataset's layout, written here
alone (``data.py``, ``layouts.py``, ``prepare.py`` and the synthetic writer read them). Retrieval rows also say
how the benchmark is read and scored: the files of its layout, whether its test set keeps every caption of a
video, and whether a video's sentences are joined into one paragraph. ``--frames``, ``--words``,
``--batch-size``, ``--epochs`` and ``--lr`` override a row; ``protocol`` picks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from loading.dataset_files import DataError

RECOGNITION_DATASETS = ("ucf101", "hmdb51", "ssv2", "kinetics400")
RETRIEVAL_DATASETS = ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo", "vatex")
DATASETS = ("ucf101", "hmdb51", "ssv2", "msrvtt", "kinetics400", "msvd", "lsmdc", "activitynet", "didemo", "vatex")


@dataclass(frozen=True)
class Protocol:
    """How a benchmark is trained on and tested.

    ``frames`` per video, ``words`` caption tokens (CLIP4Clip's ``max_words``, start and end tokens included;
    retrieval only), ``batch`` the batch the loss sees, ``epochs`` and ``lr`` AdamW's peak learning rate, ``source``
    where these values come from. The layout: ``annotations`` (the folder of split, label and caption files; for
    retrieval ``files[split]`` the ones read from it) and ``videos`` (the folder of video files);
    ``multi_caption``: the test set keeps every caption of a video (one item per video, ``caption_groups``);
    ``paragraph``: all sentences of a video are joined into one caption; ``first_seconds``: only the start of each
    video is sampled.
    """

    frames: int
    batch: int
    epochs: int
    lr: float
    source: str
    words: int | None = None
    annotations: str = ""
    videos: str = ""
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    multi_caption: bool = False
    paragraph: bool = False
    first_seconds: float | None = None


AUTHORS = "the STOP authors' scripts/{}.sh"
CLIP4CLIP = "CLIP4Clip's README (epochs, frames, words); lr 1e-3, the authors' rate for STOP's prompt modules"
OURS = "this project's: the authors' code has no recognition scripts, the paper gives no schedule"
DEMO = "this project's: a few hundred CPU steps, so a larger rate"

PROTOCOLS = {
    "ucf101": Protocol(8, 32, 10, 1e-3, OURS, annotations="ucfTrainTestlist", videos="UCF-101"),
    "hmdb51": Protocol(8, 32, 10, 1e-3, OURS, annotations="testTrainMulti_7030_splits", videos="videos"),
    "ssv2": Protocol(8, 32, 10, 1e-3, OURS, annotations="labels", videos="20bn-something-something-v2"),
    # Kinetics' videos sit in train/, val/, test/, replacement/ or videos/ under the root itself.
    "kinetics400": Protocol(8, 32, 10, 1e-3, OURS, annotations="annotations", videos="."),
    "msrvtt": Protocol(
        12, 128, 5, 1e-3, AUTHORS.format("msrvtt"), 32, "msrvtt_data", "MSRVTT_Videos",
        {"train": ("MSRVTT_train.9k.csv", "MSRVTT_data.json"), "test": ("MSRVTT_JSFUSION_test.csv",)},
    ),
    "msvd": Protocol(
        12, 128, 5, 1e-3, CLIP4CLIP, 32, "msvd_data", "YouTubeClips",
        {"train": ("train_list.txt", "raw-captions.pkl"), "test": ("test_list.txt", "raw-captions.pkl")},
        multi_caption=True,
    ),
    "lsmdc": Protocol(
        12, 128, 5, 1e-3, CLIP4CLIP, 32, "annotations", "videos",
        {"train": ("LSMDC16_annos_training.csv",), "test": ("LSMDC16_challenge_1000_publictect.csv",)},
    ),
    "activitynet": Protocol(
        64, 128, 10, 1e-3, AUTHORS.format("activitynet"), 64, "captions", "videos",
        {"train": ("train_ids.json", "train.json"), "test": ("val_ids.json", "val_1.json")},
        paragraph=True,
    ),
    # DiDeMo's moments lie in the first 30 s (longer videos were cut for annotation): the loaders read [0, 31] s.
    "didemo": Protocol(
        64, 128, 5, 1e-3, CLIP4CLIP, 64, "annotations", "videos",
        {"train": ("train_list.txt", "train_data.json"), "test": ("test_list.txt", "test_data.json")},
        paragraph=True, first_seconds=31.0,
    ),
    "vatex": Protocol(
        12, 128, 10, 5e-3, AUTHORS.format("vatex") + " (their batch is 512: --batch-size 512)", 32, "annotations",
        "videos", {"train": ("train_list.txt", "ref_captions.json"), "test": ("test_list.txt", "ref_captions.json")},
        multi_caption=True,
    ),
}  # fmt: skip
# The synthetic dataset is written in UCF101's layout (recognition) and MSR-VTT's (retrieval).
SYNTHETIC = {
    "recognize": replace(PROTOCOLS["ucf101"], epochs=25, lr=1e-2, source=DEMO),
    "retrieve": replace(PROTOCOLS["msrvtt"], batch=32, epochs=10, lr=1e-2, source=DEMO),
}


def protocol(dataset: str, task: str | None = None) -> Protocol:
    """``dataset``'s row; the synthetic dataset's for ``task`` (its retrieval half is in MSR-VTT's layout)."""
    if dataset == "synthetic":
        return SYNTHETIC[task or "retrieve"]
    if dataset not in PROTOCOLS or (task is not None and (dataset in RETRIEVAL_DATASETS) != (task == "retrieve")):
        kind = "retrieval" if task == "retrieve" else "recognition" if task else "known"
        names = RETRIEVAL_DATASETS if task == "retrieve" else RECOGNITION_DATASETS if task else DATASETS
        raise DataError(f"{dataset} is not a {kind} dataset; those are {', '.join(names)} and synthetic")
    return PROTOCOLS[dataset]
