"""The published layouts of eight of the ten datasets, and ``LISTERS``, their table, which ``data.LISTERS`` extends.

``data.py`` shows two layouts in full, UCF101 (recognition) and MSR-VTT (retrieval); the others are read here the
same way, each lister returning a ``SplitListing`` of video paths and targets: HMDB51, Something-Something v2 and
Kinetics-400 (recognition), and MSVD, LSMDC, ActivityNet Captions, DiDeMo and VATEX (retrieval, each read by its
protocol in ``protocols.PROTOCOLS``, as CLIP4Clip and the STOP authors read it).

It sits below ``data.py``, which imports it, and reads the files with ``dataset_files.py``'s readers.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from loading.dataset_files import (
    DataError,
    SplitListing,
    read_csv,
    read_json,
    read_lines,
    readable_class_name,
    require_path,
    video_in,
)
from loading.protocols import PROTOCOLS


class MissingVideosWarning(UserWarning):
    """Videos listed in a split that are not on disk (or, for retrieval, have no captions) were left out of it,
    counted and named once, when the split is listed."""


# --------------------------------------------------------------------------
# Recognition: HMDB51, Something-Something v2, Kinetics-400
# --------------------------------------------------------------------------

HMDB_SPLIT_CODES = {"train": "1", "test": "2"}


def list_hmdb51(root: Path, split: str, split_id: int) -> SplitListing:
    """HMDB51: one split file per class, ``<video name> <code>``, 1 = train, 2 = test, 0 = unused.
    Video names contain spaces, brackets and ``&``: only the last space separates."""
    video_dir = require_path(root / PROTOCOLS["hmdb51"].videos, "hmdb51", root)
    split_dir = require_path(root / PROTOCOLS["hmdb51"].annotations, "hmdb51", root)
    suffix = f"_test_split{split_id}.txt"
    split_files = sorted(split_dir.glob(f"*{suffix}"))
    if not split_files:
        require_path(split_dir / f"brush_hair{suffix}", "hmdb51", root)
    folder_names = [file.name[: -len(suffix)] for file in split_files]
    paths, labels = [], []
    for label, (folder, split_file) in enumerate(zip(folder_names, split_files)):
        for number, line in read_lines(split_file):
            if " " not in line:
                raise DataError(f"hmdb51: {split_file}, line {number}: expected '<video name> <code>', found {line!r}")
            name, code = line.rsplit(" ", 1)
            path = video_in(video_dir, f"{folder}/{name}", "hmdb51", f"{split_file}, line {number}")
            if code == HMDB_SPLIT_CODES[split]:
                paths.append(path)
                labels.append(label)
    return SplitListing(paths, labels, [readable_class_name(name) for name in folder_names])


def list_ssv2(root: Path, split: str) -> SplitListing:
    """Something-Something v2: class = labels.json[template without brackets].

    The class ids must be 0 to C-1, one per template, as in the published file (174 templates, 0 to 173). Any other
    numbering is refused rather than renumbered: a gap would make a target past the classifier's C outputs (an
    IndexError in training, wrong scores in evaluation), and renumbering would silently give classes numbers other
    than the file's own.
    """
    video_dir = require_path(root / PROTOCOLS["ssv2"].videos, "ssv2", root)
    label_file = require_path(root / PROTOCOLS["ssv2"].annotations / "labels.json", "ssv2", root)
    split_file = require_path(
        root / PROTOCOLS["ssv2"].annotations / ("train.json" if split == "train" else "validation.json"), "ssv2", root
    )
    labels_read = read_json(label_file, "ssv2")
    if not isinstance(labels_read, dict) or not all(str(label).isdigit() for label in labels_read.values()):
        raise DataError(f'ssv2: {label_file} should map each template to its class number: {{"<template>": "0", ...}}')
    label_of_template = {template: int(label) for template, label in labels_read.items()}
    ids = sorted(label_of_template.values())
    gap = next((position for position, label in enumerate(ids) if label != position), None)
    if gap is not None:  # at the first id out of sequence, one is given twice or one is missing
        fault = f"the class id {ids[gap]} is given twice" if ids[gap] < gap else f"no template has the class id {gap}"
        raise DataError(f"ssv2: {label_file}: {fault}, expected the ids 0 to {len(ids) - 1}, each once")
    classes = [template.lower() for template in sorted(label_of_template, key=label_of_template.get)]
    clips = read_json(split_file, "ssv2")
    if not isinstance(clips, list):
        raise DataError(f'ssv2: {split_file} should be a list of clips: [{{"id": "78687", "template": ...}}, ...]')
    paths, labels = [], []
    for number, clip in enumerate(clips, 1):
        if not isinstance(clip, dict) or not isinstance(clip.get("template"), str) or "id" not in clip:
            raise DataError(
                f"ssv2: {split_file}, clip {number}: expected an 'id' and a 'template', found {clip!r:.200}"
            )
        template = clip["template"].replace("[", "").replace("]", "")
        if template not in label_of_template:
            raise DataError(f"ssv2: template {template!r} of clip {clip['id']} ({split_file}) is not in {label_file}")
        paths.append(video_in(video_dir, f"{clip['id']}.webm", "ssv2", f"{split_file}, clip {number}"))
        labels.append(label_of_template[template])
    return SplitListing(paths, labels, classes)


KINETICS_FOLDERS = {"train": "train", "test": "val"}  # the papers' test split is the validation set
KINETICS_REPLACEMENTS = "replacement/replacement_for_corrupted_k400"
YOUTUBE_ID_LENGTH = 11


def _kinetics_rows(csv_file: Path, root: Path) -> list[tuple[str, str]]:
    """(youtube_id, label) of each row of a Kinetics annotation file, in file order."""
    rows = []
    for number, row in read_csv(csv_file, ("label", "youtube_id"), root, "kinetics400"):
        video_id, label = row["youtube_id"].strip(), row["label"].strip()
        if not video_id or not label:
            raise DataError(f"kinetics400: {csv_file}, line {number}: expected a youtube_id and a label")
        rows.append((video_id, label))
    return rows


def _videos_by_youtube_id(folder: Path, pattern: str) -> dict[str, Path]:
    """The ``.mp4`` files matching ``pattern`` under ``folder``, keyed by YouTube id: the first 11 characters of the
    file name, as CVDF's arrange_by_classes.py matches them (ids hold ``_`` and ``-``, so a name is never split on
    them)."""
    if not folder.is_dir():
        return {}
    return {path.name[:YOUTUBE_ID_LENGTH]: path for path in folder.glob(pattern)}


def list_kinetics400(root: Path, split: str, strict: bool) -> SplitListing:
    """Kinetics-400 as CVDF publishes it: ``annotations/<split>.csv`` gives each clip's YouTube id and label, the
    test split being ``val`` (where X-CLIP and ViFi-CLIP report top-1/top-5).

    Classes are the labels of train.csv and val.csv (whichever exist) in sorted order, ``abseiling`` first as in
    X-CLIP's and mmaction2's label lists, so both splits number them alike; the labels are already words ("air
    drumming") and are used as they are. A clip's video is looked up by YouTube id, first among CVDF's
    replacements for corrupted videos, then in ``ROOT/<split>/``, then in the class folders ``arrange_by_classes.py``
    makes, ``ROOT/videos/<split>/<label>/``. Ids may start with ``-`` (643 val clips do): they are ids like any other.
    Rows whose video is in none of these places (videos gone from YouTube before CVDF's copy: about 3% of train)
    are left out with one MissingVideosWarning that counts them; with ``strict`` they are a DataError instead.
    """
    folder = KINETICS_FOLDERS[split]
    csv_file = require_path(root / PROTOCOLS["kinetics400"].annotations / f"{folder}.csv", "kinetics400", root)
    rows = _kinetics_rows(csv_file, root)
    labels = {label for _, label in rows}
    for other in KINETICS_FOLDERS.values():
        other_file = root / PROTOCOLS["kinetics400"].annotations / f"{other}.csv"
        if other != folder and other_file.is_file():
            labels |= {label for _, label in _kinetics_rows(other_file, root)}
    label_of_name = {name: label for label, name in enumerate(sorted(labels))}
    videos = _videos_by_youtube_id(root / "videos" / folder, "*/*.mp4")
    videos.update(_videos_by_youtube_id(root / folder, "*.mp4"))  # later lookups win
    videos.update(_videos_by_youtube_id(root / KINETICS_REPLACEMENTS, "*.mp4"))
    missing = [video_id for video_id, _ in rows if video_id not in videos]
    if missing:
        message = (
            f"kinetics400: {len(missing):,} of the {len(rows):,} clips of {csv_file} have no video under {root} "
            f"({folder}/, videos/{folder}/<label>/ or {KINETICS_REPLACEMENTS}/): {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}"
        )
        if strict:
            raise DataError(f"{message}; without --strict they are left out with a warning")
        warnings.warn(f"{message}; left out of the {folder} split", MissingVideosWarning, stacklevel=4)
    found = [(videos[video_id], label_of_name[label]) for video_id, label in rows if video_id in videos]
    return SplitListing([path for path, _ in found], [label for _, label in found], sorted(labels))


# --------------------------------------------------------------------------
# Retrieval: MSVD, LSMDC, ActivityNet Captions, DiDeMo, VATEX
# --------------------------------------------------------------------------


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads a pickle as plain data: no class or function is ever looked up, so nothing in the file can run.

    A pickle calls code only through objects it names (``GLOBAL``, ``STACK_GLOBAL`` and the extension-registry
    opcodes, all resolved by ``find_class``) or persistent ids (``persistent_load``, which by default refuses).
    """

    def find_class(self, module: str, name: str) -> NoReturn:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only dicts, lists and strings are read")


def _read_caption_pickle(path: Path, dataset: str) -> dict[str, list[str]]:
    """MSVD's ``raw-captions.pkl``: {id: [caption, ...]}, each caption a list of words (joined with spaces)."""
    try:
        with path.open("rb") as file:
            loaded = _DataOnlyUnpickler(file).load()
    except OSError:
        raise
    except Exception as error:  # anything a malformed or crafted pickle raises
        raise DataError(f"{dataset}: {path} cannot be read as data: {type(error).__name__}: {error}") from None

    def caption(words: object) -> str | None:
        if isinstance(words, str):
            return words
        if isinstance(words, list) and all(isinstance(word, str) for word in words):
            return " ".join(words)
        return None

    captions = {}
    if isinstance(loaded, dict):
        for video_id, entries in loaded.items():
            joined = [caption(words) for words in entries] if isinstance(entries, list) else [None]
            if not isinstance(video_id, str) or None in joined:
                break
            captions[video_id] = joined
        else:
            return captions
    raise DataError(f"{dataset}: {path} should hold {{id: [[word, ...], ...]}}: a dict of lists of word lists")


def _read_ids(path: Path) -> list[str]:
    """One id per line; CRLF line ends and a missing final newline (MSVD's lists) are both fine."""
    return [line.strip() for _, line in read_lines(path)]


def _videos_by(video_dir: Path, key: Callable[[Path], str]) -> dict[str, Path]:
    """Every video file under ``video_dir``, at any depth (hidden files aside), by ``key`` of its path."""
    files = sorted(path for path in video_dir.rglob("*") if not path.name.startswith(".") and path.is_file())
    return {key(path): path for path in reversed(files)}  # the first in sorted order wins a clash


def _retrieval_listing(
    name: str,
    split: str,
    root: Path,
    list_file: Path,
    listed: list[str],
    pairs: list[tuple[str, str]],
    find_video: Callable[[str], Path | None],
    strict: bool,
) -> SplitListing:
    """The split's items from the ids ``list_file`` lists and their (id, caption) ``pairs``, in order.

    Listed ids without captions and videos not on disk are left out and named in one MissingVideosWarning, which
    says how the split shrank; with ``strict`` a missing video is a DataError instead. Training: one item per
    caption. Test: one item per caption too (a square text x video matrix), except for a multi-caption protocol,
    whose test set has one item per video and its captions in ``caption_groups``.
    """
    protocol = PROTOCOLS[name]
    video_dir = root / protocol.videos
    with_captions = {video_id for video_id, _ in pairs}
    no_captions = [video_id for video_id in dict.fromkeys(listed) if video_id not in with_captions]
    path_of = {video_id: find_video(video_id) for video_id in with_captions}
    missing = [video_id for video_id in dict.fromkeys(listed) if video_id in path_of and path_of[video_id] is None]
    kept = [(path_of[video_id], caption) for video_id, caption in pairs if path_of[video_id] is not None]
    if missing and strict:
        one = len(missing) == 1
        raise DataError(
            f"{name}: {_count(len(missing), f'{split} video')} listed in {list_file} {'is' if one else 'are'} not "
            f"under {video_dir}: {_some(missing)} (without --strict {'it is' if one else 'they are'} left out)"
        )
    if missing or no_captions:
        videos = len(dict.fromkeys(path for path, _ in kept))
        lost = [f"{len(missing)} not under {video_dir}: {_some(missing)}"] if missing else []
        lost += [f"{len(no_captions)} without captions: {_some(no_captions)}"] if no_captions else []
        lost_count = len(missing) + len(no_captions)
        # a video without captions never counted in the split, so only missing files change its counts
        counts_before = f" instead of {videos + len(missing)} and {len(pairs)}" if missing else ""
        warnings.warn(
            f"{name}: {lost_count} of the {len(dict.fromkeys(listed))} {split} videos listed in {list_file} "
            f"{'is' if lost_count == 1 else 'are'} left out ({'; '.join(lost)}): the {split} set has "
            f"{_count(videos, 'video')} and {_count(len(kept), 'caption')}{counts_before}"
            + ("; --strict makes a missing video an error" if missing else ""),
            MissingVideosWarning,
            stacklevel=5,
        )
    left_out = missing + no_captions
    if split == "test" and protocol.multi_caption:
        groups: dict[Path, list[str]] = {}
        for path, caption in kept:
            groups.setdefault(path, []).append(caption)
        paths, captions = list(groups), list(groups.values())
        return SplitListing(paths, list(range(len(paths))), caption_groups=captions, left_out=left_out)
    return SplitListing([path for path, _ in kept], [caption for _, caption in kept], left_out=left_out)


def _count(number: int, noun: str) -> str:
    """``number`` and ``noun``, in the plural unless it is 1: "1 video", "2 videos"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _some(ids: list[str], shown: int = 10) -> str:
    """The first ``shown`` ids, and how many more."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def _annotation_files(name: str, root: Path, split: str) -> list[Path]:
    protocol = PROTOCOLS[name]
    require_path(root / protocol.videos, name, root)
    return [require_path(root / protocol.annotations / file, name, root) for file in protocol.files[split]]


def _videos_by_id(name: str, root: Path) -> Callable[[str], Path | None]:
    """Id -> video file: the file whose name minus its last extension is the id (ids may contain dots)."""
    return _videos_by(root / PROTOCOLS[name].videos, lambda path: path.stem).get


def list_msvd(root: Path, split: str, strict: bool) -> SplitListing:
    """MSVD with CLIP4Clip's files: a list of ids per split, every video's captions in a pickle (read as data)."""
    list_file, caption_file = _annotation_files("msvd", root, split)
    listed = _read_ids(list_file)
    captions = _read_caption_pickle(caption_file, "msvd")
    pairs = [(video_id, caption) for video_id in listed for caption in captions.get(video_id, [])]
    return _retrieval_listing("msvd", split, root, list_file, listed, pairs, _videos_by_id("msvd", root), strict)


def list_lsmdc(root: Path, split: str, strict: bool) -> SplitListing:
    """LSMDC 2016: tab-separated ``CLIP_ID, 4 times, SENTENCE`` lines, one per sentence (ids repeat in training)."""
    (csv_file,) = _annotation_files("lsmdc", root, split)
    pairs = []
    for number, line in read_lines(csv_file):
        fields = line.split("\t", 5)
        if len(fields) != 6:
            raise DataError(f"lsmdc: {csv_file}, line {number}: expected 6 tab-separated fields, found {len(fields)}")
        pairs.append((fields[0], fields[5].strip()))
    listed = [video_id for video_id, _ in pairs]
    return _retrieval_listing("lsmdc", split, root, csv_file, listed, pairs, _videos_by_id("lsmdc", root), strict)


def _read_json_of(path: Path, dataset: str, expected_type: type, form: str) -> dict | list:
    loaded = read_json(path, dataset)
    if not isinstance(loaded, expected_type):
        raise DataError(f"{dataset}: {path} should hold {form}")
    return loaded


def list_activitynet(root: Path, split: str, strict: bool) -> SplitListing:
    """ActivityNet Captions, paragraph retrieval: a video's sentences joined into one caption; the test split is
    val_1. Keys are ``v_<youtube id>``, the video file is named by the id (exactly two characters stripped)."""
    ids_file, caption_file = _annotation_files("activitynet", root, split)
    listed = _read_json_of(ids_file, "activitynet", list, '["v_<youtube id>", ...]')
    for number, key in enumerate(listed, 1):
        if not isinstance(key, str):
            entry = f"entry {number}, {json.dumps(key):.100}"
            raise DataError(f'activitynet: {ids_file}: {entry}, is not a video id, expected "v_<youtube id>"')
    videos = _read_json_of(caption_file, "activitynet", dict, '{"v_<youtube id>": {"sentences": [...], ...}, ...}')
    pairs = []
    for key in listed:
        sentences = videos[key].get("sentences") if isinstance(videos.get(key), dict) else None
        if key in videos and not (isinstance(sentences, list) and all(isinstance(s, str) for s in sentences)):
            raise DataError(f'activitynet: {caption_file}: video {key!r} should have "sentences": [...]')
        if sentences:
            pairs.append((key, " ".join(sentence.strip() for sentence in sentences)))
    by_id = _videos_by_id("activitynet", root)
    return _retrieval_listing("activitynet", split, root, ids_file, listed, pairs, lambda key: by_id(key[2:]), strict)


def list_didemo(root: Path, split: str, strict: bool) -> SplitListing:
    """DiDeMo, paragraph retrieval: a video's descriptions joined in file order. Videos are named as listed (the
    Flickr file name with its extension, ``@`` included), or with a 4-character suffix more (``….3gp.mp4``)."""
    list_file, caption_file = _annotation_files("didemo", root, split)
    listed = _read_ids(list_file)
    moments = _read_json_of(caption_file, "didemo", list, '[{"video": ..., "description": ...}, ...]')
    descriptions: dict[str, list[str]] = {}
    for number, moment in enumerate(moments, 1):
        if not (isinstance(moment, dict) and isinstance(moment.get("video"), str)) or not isinstance(
            moment.get("description"), str
        ):
            raise DataError(f"didemo: {caption_file}, moment {number}: expected a 'video' and a 'description'")
        descriptions.setdefault(moment["video"], []).append(moment["description"].strip())
    pairs = [(entry, " ".join(descriptions[entry])) for entry in listed if entry in descriptions]
    video_dir = root / PROTOCOLS["didemo"].videos
    by_name, by_name_less_suffix = _videos_by(video_dir, lambda p: p.name), _videos_by(video_dir, lambda p: p.name[:-4])
    return _retrieval_listing(
        "didemo",
        split,
        root,
        list_file,
        listed,
        pairs,
        lambda entry: by_name.get(entry) or by_name_less_suffix.get(entry),
        strict,
    )


def list_vatex(root: Path, split: str, strict: bool) -> SplitListing:
    """VATEX with the HGR split files: ids per split, ``ref_captions.json`` {id: [caption, ...]} (10 English each)."""
    list_file, caption_file = _annotation_files("vatex", root, split)
    listed = _read_ids(list_file)
    captions = _read_json_of(caption_file, "vatex", dict, '{"<id>": ["caption", ...], ...}')
    pairs = []
    for video_id in listed:
        entries = captions.get(video_id, [])
        if not (isinstance(entries, list) and all(isinstance(caption, str) for caption in entries)):
            raise DataError(f"vatex: {caption_file}: the captions of {video_id!r} should be a list of strings")
        pairs += [(video_id, caption) for caption in entries]
    return _retrieval_listing("vatex", split, root, list_file, listed, pairs, _videos_by_id("vatex", root), strict)


# --------------------------------------------------------------------------
# The table build_dataset reads
# --------------------------------------------------------------------------

# dataset -> lister(root, split, split_id, strict). ``split_id`` picks UCF101's and HMDB51's split (1-3); ``strict``
# makes a listed video that is not on disk an error where the lister looks for it (Kinetics-400 and the retrieval
# sets); the others find it broken when it is loaded, where ``strict`` makes it an error too.
LISTERS: dict[str, Callable[[Path, str, int, bool], SplitListing]] = {
    "hmdb51": lambda root, split, split_id, strict: list_hmdb51(root, split, split_id),
    "ssv2": lambda root, split, split_id, strict: list_ssv2(root, split),
    "kinetics400": lambda root, split, split_id, strict: list_kinetics400(root, split, strict),
    "msvd": lambda root, split, split_id, strict: list_msvd(root, split, strict),
    "lsmdc": lambda root, split, split_id, strict: list_lsmdc(root, split, strict),
    "activitynet": lambda root, split, split_id, strict: list_activitynet(root, split, strict),
    "didemo": lambda root, split, split_id, strict: list_didemo(root, split, strict),
    "vatex": lambda root, split, split_id, strict: list_vatex(root, split, strict),
}
