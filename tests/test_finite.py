"""Nothing non-finite is scored or saved: NaN ranks last, a diverged model is an error naming it, never a result."""

import math

import pytest
import torch
from conftest import error_lines, run, train_tiny

import evaluate
import train

NAN = math.nan


def test_a_nan_score_ranks_last():
    similarity = torch.tensor([[NAN, 0.5, 0.2], [0.1, 0.9, NAN], [0.3, 0.4, 0.8]])
    # Row 0's match is NaN: last of 3. Row 1's NaN candidate is behind its match. Row 2: first.
    assert evaluate.ranks_of_matches(similarity).tolist() == [3, 1, 1]
    everything_nan = evaluate.retrieval_metrics(torch.full((4, 4), NAN))["text_to_video"]
    assert (everything_nan["R@1"], everything_nan["MdR"]) == (0.0, 4.0)  # every query last, none first
    logits = torch.tensor([[NAN, 0.1, 0.2], [0.3, NAN, 0.1], [NAN, NAN, NAN]])
    assert evaluate.topk_accuracy(logits, torch.tensor([0, 0, 1]), ks=(1,))["top1"] == pytest.approx(100 / 3)  # row 1
    captions = torch.tensor([[NAN, 0.2], [0.1, 0.3], [0.6, 0.5]])  # [caption, video]; caption 0 describes video 0
    metrics = evaluate.multi_caption_retrieval_metrics(captions, torch.tensor([0, 1, 1]))
    assert metrics["text_to_video"]["MnR"] == (2 + 1 + 2) / 3  # caption 0 scores NaN: last of the 2 videos
    # Video 0 scores its own group by the best number among its captions (none: -inf), so video 1's (0.6) wins.
    assert metrics["video_to_text"]["R@1"] == 50.0


def diverging_after_first_epoch(step: int, total_steps: int, warmup_steps: int) -> float:
    """The schedule of a run whose learning rate explodes after its first step (each epoch is one step here)."""
    return 1.0 if step == 0 else 1e8


def test_a_diverged_epoch_is_not_saved_and_the_last_good_one_is_named(tiny_root, golden_clip, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "lr_factor", diverging_after_first_epoch)
    out = tmp_path / "run"
    code, output = train_tiny(tiny_root, golden_clip, out, "--lr", 1e-2, "--epochs", 3)
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    assert "epoch 2" in line and "not finite" in line, line
    assert f"last good checkpoint: {out / 'last.pt'} (epoch 1)" in line, line
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and all(t.isfinite().all() for t in last["stop"].values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_evaluating_a_nan_checkpoint_is_an_error_naming_it(tiny_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    assert train_tiny(tiny_root, golden_clip, out, "--epochs", 1)[0] == 0
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    checkpoint["stop"] = {name: torch.full_like(t, NAN) if t.is_floating_point() else t
                          for name, t in checkpoint["stop"].items()}  # fmt: skip
    torch.save(checkpoint, out / "diverged.pt")
    common = ["--dataset", "ucf101", "--root", tiny_root, "--clip", golden_clip, "--workers", 0]
    code, output = run(evaluate.app, "recognize", *common, "--checkpoint", out / "diverged.pt", "--out", out / "e.json")
    assert code == 1 and "Traceback" not in output, output
    (line,) = error_lines(output)
    assert f"{out / 'diverged.pt'} (epoch 1)" in line and "not finite" in line, line
    assert not (out / "e.json").exists()
