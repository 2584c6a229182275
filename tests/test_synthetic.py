"""Tests for synthetic.py: the generated clips' motion and time reversal, and the dataset written in the UCF101
and MSR-VTT layouts, read back through data.py's loaders."""

import re
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

import data
from loading import dataset_files, synthetic
from loading.protocols import PROTOCOLS

RESOLUTION = 48  # model input size in these tests: deliberately not 224


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests move tiny tensors: one thread is fastest, and immune to a busy CPU."""
    with dataset_files.single_threaded():
        yield


@pytest.mark.parametrize("pair", range(4))
def test_synthetic_partner_classes_are_time_reversals(pair: int) -> None:
    forward, colour, shape = synthetic.render_synthetic_clip(2 * pair, torch.Generator().manual_seed(pair))
    backward, colour_b, shape_b = synthetic.render_synthetic_clip(2 * pair + 1, torch.Generator().manual_seed(pair))
    assert forward.shape == (synthetic.SYNTHETIC_FRAMES, 3, synthetic.SYNTHETIC_SIZE, synthetic.SYNTHETIC_SIZE)
    assert forward.dtype == torch.uint8 and (colour, shape) == (colour_b, shape_b)
    assert torch.equal(backward, forward.flip(0))
    assert not torch.equal(forward, backward)  # something happens over time


def _moving_centroid(frames: torch.Tensor) -> torch.Tensor:
    """Centre (x, y) of the pixels that differ from the clip's median frame, per frame: [T, 2]."""
    moving = (frames.float() - frames.float().median(dim=0).values).abs().sum(1) > 60  # [T, H, W]
    rows, columns = torch.meshgrid(torch.arange(frames.shape[2]), torch.arange(frames.shape[3]), indexing="ij")
    weight = moving.float().sum(dim=(1, 2))
    return torch.stack([(moving * columns).sum(dim=(1, 2)) / weight, (moving * rows).sum(dim=(1, 2)) / weight], 1)


def test_synthetic_motions_go_the_way_their_names_say() -> None:
    for seed in range(5):
        left, _, _ = synthetic.render_synthetic_clip(0, torch.Generator().manual_seed(seed))
        up, _, _ = synthetic.render_synthetic_clip(2, torch.Generator().manual_seed(seed))
        growing, _, _ = synthetic.render_synthetic_clip(4, torch.Generator().manual_seed(seed))
        assert _moving_centroid(left)[-1, 0] < _moving_centroid(left)[0, 0] - 10
        assert _moving_centroid(up)[-1, 1] < _moving_centroid(up)[0, 1] - 10
        changed = (growing.float() - growing[:1].float()).abs().sum(1) > 60  # [T, H, W] vs the first frame
        assert changed[-1].sum() > changed[1].sum() > 0


def test_synthetic_turning_is_clockwise_on_screen() -> None:
    """A horizontal bar turned by a small positive angle dips on its right (y points down)."""
    centre = torch.tensor([32.0])
    bar = synthetic._shape_alpha("bar", centre, centre, torch.tensor([40.0]), torch.tensor([0.3]))[0, 0]  # [S, S]
    assert bar[32 + 5, 32 + 16] > 0.5 and bar[32 - 5, 32 + 16] == 0
    assert bar[32 - 5, 32 - 16] > 0.5 and bar[32 + 5, 32 - 16] == 0


def test_ensure_synthetic_builds_both_layouts_once(tmp_path: Path) -> None:
    root = tmp_path / "synthetic"
    old_video = root / "ucf101" / PROTOCOLS["ucf101"].videos / "old.avi"  # an older generator's data: replaced
    old_video.parent.mkdir(parents=True)
    old_video.write_bytes(b"")
    (root / "COMPLETE").write_text(f"version {synthetic.SYNTHETIC_VERSION - 1} seed 0\n")
    assert synthetic.ensure_synthetic(root, seed=0) == root
    assert not old_video.exists()
    marker_time = (root / "COMPLETE").stat().st_mtime_ns
    assert synthetic.ensure_synthetic(root, seed=0) == root and (root / "COMPLETE").stat().st_mtime_ns == marker_time
    assert [path.name for path in tmp_path.iterdir()] == ["synthetic"]  # no scratch folder left behind

    train = data.build_dataset("ucf101", root / "ucf101", "train", num_frames=8, resolution=RESOLUTION)
    test = data.build_dataset("ucf101", root / "ucf101", "test", num_frames=8, resolution=RESOLUTION)
    assert train.classes[:2] == ["moving left", "moving right"] and train.classes[-1] == "turning anticlockwise"
    assert len(train) == 8 * 48 and len(test) == 8 * 16
    assert sorted(train.targets) == sorted(list(range(8)) * 48)
    assert not any(isinstance(step, v2.RandomHorizontalFlip) for step in train.transform.transforms)
    clip, label = train[0]
    assert clip.shape == (8, 3, RESOLUTION, RESOLUTION) and label == 0

    retrieval_train = data.build_dataset("msrvtt", root / "msrvtt", "train", num_frames=8, resolution=RESOLUTION)
    retrieval_test = data.build_dataset("msrvtt", root / "msrvtt", "test", num_frames=8, resolution=RESOLUTION)
    assert len(retrieval_train) == 256 * 3 and len(retrieval_test) == 64
    assert len(set(retrieval_test.paths)) == 64 and not set(retrieval_test.paths) & set(retrieval_train.paths)
    assert re.fullmatch(r"a \w+ (square|triangle|bar) moves to the left", retrieval_train.targets[0])
    clip, caption = retrieval_test[0]
    assert clip.shape == (8, 3, RESOLUTION, RESOLUTION) and caption == retrieval_test.targets[0]
