"""``--compile`` end to end on the CPU with inductor, the default backend: what it trains and evaluates is eager's.

``test_compute_path.py`` checks the compiled encoder alone (``aot_eager``: one graph, no generated code); here
the commands run compiled, with the C++ kernels inductor generates, on the 32-px golden CLIP: training equals
eager training, a compiled run killed after its first epoch and resumed equals one that was not, and an
evaluation whose last batch is smaller compiles one graph and scores what eager scores.

Inductor reorders float sums, so a compiled run is not bit-equal to an eager one; the tolerances (``PARAMETER_ATOL``,
``LOSS_RTOL``) say why they lie where they do. Dropout: by default inductor draws its masks with its own
generator (seeded from torch's, so a compiled run is still reproducible and resumable), which gives other masks
than eager's; ``torch._inductor.config.fallback_random = True`` makes the compiled graph call eager's random
operators. The tests comparing with eager set it (``eager_random``), so they keep dropout on and compare the same
masks; the resume test keeps inductor's own generator, the one a user's run draws from.

Inductor generates and builds C++ code for each graph, the slowest thing these tests do (its on-disk cache makes a
repeated graph cheap), so the data is tiny: 8 training and 8 test videos of 4 frames, batches of 4, and dynamo is
reset before each test so that its counts are the test's own.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import records, run, stop_tensors, train_tiny
from torch._dynamo.utils import counters

import evaluate
import train

# After the 2 AdamW steps of an epoch (lr 1e-3) compiled and eager parameters differ by float rounding alone: sums
# taken in another order, a few float32 steps (the order of 1e-7). A wrong graph, or other dropout masks, moves a
# parameter by the order of lr, as AdamW's first steps move each parameter by about lr. 1e-5 lies about two orders
# of magnitude from both.
PARAMETER_ATOL = 1e-5
# The epoch's mean loss: rounding moves it by a few float32 steps (relative, the order of 1e-7); other dropout masks
# change what every step computes and move it by more than ten times this tolerance.
LOSS_RTOL = 1e-6


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch (inductor's on-disk cache still serves graphs it has seen) and counts its
    own graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def eager_random() -> Iterator[None]:
    """The compiled graphs call eager's random operators, so dropout draws eager's masks."""
    with torch._inductor.config.patch(fallback_random=True):
        yield


def train_two_steps(root: Path, clip: Path, out: Path, *extra) -> tuple[int, str]:
    """``train_tiny`` for one epoch of two steps (batch 4 of the 8 training videos) on the CPU, unless ``extra``
    says otherwise."""
    return train_tiny(root, clip, out, "--device", "cpu", "--batch-size", 4, "--epochs", 1, *extra)


def compile_lines(output: str) -> list[str]:
    """The log's lines about compiling, each without its duration."""
    return [line.split(" in ")[0] for line in output.splitlines() if line.startswith(("compiling ", "compiled "))]


ONE_COMPILATION_PER_MODE = [
    "compiling the video encoder for training (torch.compile, once per run: its first batch waits for it)",
    "compiled the video encoder for training",
    "compiling the video encoder for evaluation (torch.compile, once per run: its first batch waits for it)",
    "compiled the video encoder for evaluation",
]


def assert_same_training(compiled: Path, eager: Path) -> None:
    """The runs' saved STOP tensors within ``PARAMETER_ATOL``, their losses within ``LOSS_RTOL``; everything else
    in metrics.jsonl (learning rate, top-1, top-5, direction) equal."""
    ours, theirs = stop_tensors(compiled / "last.pt"), stop_tensors(eager / "last.pt")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=PARAMETER_ATOL, msg=name)
    ours, theirs = records(compiled), records(eager)
    assert [r.keys() for r in ours] == [r.keys() for r in theirs]
    for mine, other in zip(ours, theirs, strict=True):
        assert mine.pop("train_loss") == pytest.approx(other.pop("train_loss"), rel=LOSS_RTOL, abs=0)
        assert mine == other


@pytest.mark.parametrize(
    ("prompt", "readout", "attention"),
    [("stop", "mean", "frame"), ("temporal", "mean", "frame"), ("stop", "cls", "frame"), ("stop", "cls", "joint")],
    ids=["stop-mean", "temporal-mean", "stop-cls-frame", "stop-cls-joint"],
)
def test_compiled_training_equals_eager(tiny_root, golden_clip, tmp_path, eager_random, prompt, readout, attention):
    """One epoch with ``--compile`` against ``--no-compile``, same seed, dropout on (0.1) and drawing eager's masks
    in both (``eager_random``): the saved prompts and the epoch's metrics agree within the stated tolerances, and
    each mode compiled once. For both readouts and both attentions: the video CLS and the joint attention are other
    graphs than meanP's (``stop.video_cls_block``), compiled whole as well (``fullgraph=True``)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    options = ("--prompt", prompt, "--readout", readout, "--attention", attention)
    code, output = train_two_steps(tiny_root, golden_clip, eager, *options, "--no-compile")
    assert code == 0 and compile_lines(output) == [], output
    code, output = train_two_steps(tiny_root, golden_clip, compiled, *options, "--compile")
    assert code == 0, output
    assert compile_lines(output) == ONE_COMPILATION_PER_MODE, output
    assert counters["stats"]["unique_graphs"] == 2  # training's and evaluation's, nothing recompiled
    saved = torch.load(compiled / "last.pt", weights_only=True)["config"]
    assert (saved["prompt"], saved["readout"], saved["attention"]) == (prompt, readout, attention)
    assert_same_training(compiled, eager)


def test_compiled_run_resumed_equals_uninterrupted(tiny_root, golden_clip, tmp_path, monkeypatch):
    """A compiled run killed in epoch 2 (only epoch 1 saved) and resumed with ``--compile`` ends as the compiled run
    that was not killed: exactly, dropout on and drawn by inductor's own generator, which ``train.train`` seeds at
    each epoch as it seeds eager's."""
    two_epochs = ("--epochs", 2, "--compile")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    code, output = train_two_steps(tiny_root, golden_clip, straight, *two_epochs)
    assert code == 0, output

    evaluations = []

    def interrupt_at_second_evaluation(*args):
        evaluations.append(args)
        if len(evaluations) == 2:
            raise KeyboardInterrupt  # Ctrl-C in epoch 2's evaluation: only epoch 1 was saved
        return evaluate.evaluate_recognition(*args)

    with monkeypatch.context() as patch:
        patch.setattr(train, "evaluate_recognition", interrupt_at_second_evaluation)
        code, output = train_two_steps(tiny_root, golden_clip, killed, *two_epochs)
    assert code == 130 and len(records(killed)) == 1, output
    code, output = train_two_steps(tiny_root, golden_clip, killed, *two_epochs, "--resume")
    assert code == 0 and "resuming" in output, output
    assert compile_lines(output) == ONE_COMPILATION_PER_MODE, output  # the new process compiles again

    resumed, uninterrupted = stop_tensors(killed / "last.pt"), stop_tensors(straight / "last.pt")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
    assert records(killed) == records(straight)


def test_compiled_evaluation_with_a_smaller_last_batch_compiles_once(synthetic_root, golden, tmp_path):
    """The shipped recognition checkpoint on its 128 synthetic test videos in batches of 48 (48, 48, 32): the last
    batch is padded to 48, so dynamo captures one graph, and the metrics are the eager ones its training run
    measured (``test_cli.py`` checks that eager evaluation reproduces them). Top-1, top-5 and direction count
    videos, and no video's scores are within float noise of a tie here, so they are equal, not close."""
    checkpoint, clip = golden / "stop_checkpoint_recognize.pt", golden / "tiny_clip_state_dict.pt"
    code, output = run(
        evaluate.app, "recognize", "--dataset", "synthetic", "--root", synthetic_root, "--checkpoint", checkpoint,
        "--clip", clip, "--device", "cpu", "--workers", 0, "--batch-size", 48, "--compile",
        "--out", tmp_path / "compiled.json",
    )  # fmt: skip
    assert code == 0, output
    assert compile_lines(output) == ONE_COMPILATION_PER_MODE[2:], output
    assert counters["stats"]["unique_graphs"] == 1
    result = json.loads((tmp_path / "compiled.json").read_text())
    assert result["videos"] == 128 and result["videos"] % 48 != 0
    measured = torch.load(checkpoint, weights_only=True)["metrics"]
    assert {key: result[key] for key in measured} == measured
