"""A new user's first hour: the README's commands run as written, and the commands say what they do.

The README's explain commands run on a miniature synthetic dataset (five training clips and one test clip per
class), so that the one epoch they train takes a few seconds.
"""

import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import evaluate
import train
from loading import protocols, synthetic
from plumbing import runtime

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = {"train.py": train.app, "evaluate.py": evaluate.app}
WIDE = {"COLUMNS": "400"}  # one option a line: nothing wrapped


def run(app, *args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args], env=WIDE)
    return result.exit_code, result.output


def readme_commands() -> list[list[str]]:
    """Every ``python train.py`` / ``python evaluate.py`` command in the README's bash blocks, as its arguments."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("#")[0]) for line in lines if re.match(r"python (train|evaluate)\.py ", line)]


def option(arguments: list[str], name: str, default: str | None = None) -> str | None:
    return arguments[arguments.index(name) + 1] if name in arguments else default


def test_each_training_command_of_the_readme_starts_its_own_run() -> None:
    """Followed in order, no command meets a run folder an earlier one made (only --overwrite may replace one)."""
    folders = []
    for arguments in readme_commands():
        if arguments[1] == "train.py" and "--overwrite" not in arguments and "--resume" not in arguments:
            task, dataset = arguments[2], option(arguments, "--dataset", "synthetic")
            folders.append(option(arguments, "--out", f"runs/{task}-{dataset}-{option(arguments, '--prompt', 'stop')}"))
    assert len(folders) > 10 and len(folders) == len(set(folders)), folders


@pytest.fixture()
def miniature(monkeypatch, tmp_path: Path) -> Path:
    """The working directory of a fresh clone, where ``data/synthetic`` is written on first use, in miniature."""
    for name, value in [
        ("SYNTHETIC_GROUPS", 5),
        ("SYNTHETIC_CLIPS_PER_GROUP", 1),
        ("SYNTHETIC_TEST_GROUPS", 1),
        ("SYNTHETIC_RETRIEVAL_TRAIN", 1),
        ("SYNTHETIC_RETRIEVAL_TEST", 1),
    ]:
        monkeypatch.setattr(synthetic, name, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # --threads is tested alone, below
    return tmp_path


def test_the_readme_explain_commands_run_as_written(miniature: Path) -> None:
    text = README.read_text()
    first_run = text[text.index("## First run") :]
    section = text[text.index("## What STOP looks at") :]
    blocks = [re.search(r"```bash\n(.*?)```", part, flags=re.S).group(1) for part in (first_run, section)]
    commands = [shlex.split(block.replace("\\\n", " ").splitlines()[0]) for block in blocks]  # the run, the picture
    assert [arguments[:3] for arguments in commands] == [
        ["python", "train.py", "recognize"],
        ["python", "evaluate.py", "explain"],
    ]
    commands[0] += ["--epochs", "1", "--workers", "0"]  # its 25 epochs teach the picture; one shows the commands work
    for arguments in commands:
        code, output = run(COMMANDS[arguments[1]], *arguments[2:])
        assert code == 0, output
    figure = Path(option(commands[1], "--out"))
    assert figure.read_bytes().startswith(b"\x89PNG")

    # without --out, the figure goes beside the checkpoint, not into the working directory
    code, output = run(evaluate.app, *[a for a in commands[1][2:] if a != "--out" and a != str(figure)])
    checkpoint = Path(option(commands[1], "--checkpoint"))
    assert code == 0 and f"figure written to {checkpoint.with_name(checkpoint.stem + '-explain.png')}" in output, output
    assert [path.name for path in miniature.glob("*.png")] == []


def test_evaluating_without_a_checkpoint_says_it_is_the_frozen_clip_zero_shot(tiny_root: Path, tmp_path: Path) -> None:
    options = ("--dataset", "ucf101", "--root", tiny_root, "--frames", 2, "--workers", 0, "--out", tmp_path / "e.json")
    code, output = run(evaluate.app, "recognize", *options)
    assert code == 0, output
    assert "no --checkpoint: this evaluates CLIP random-demo-clip zero-shot" in output, output
    assert "random, so the numbers are at chance" in output, output


def test_the_dataset_root_is_checked_before_any_clip_is_loaded(monkeypatch, tmp_path: Path) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("CLIP loaded before the dataset root was checked")

    monkeypatch.setattr(runtime, "load_backbone", no_download)
    nowhere = tmp_path / "nowhere"
    for app, extra in [(train.app, ("--out", tmp_path / "run")), (evaluate.app, ("--out", tmp_path / "e.json"))]:
        code, output = run(app, "recognize", "--dataset", "ucf101", "--root", nowhere, "--clip", "ViT-B/32", *extra)
        assert code == 1 and output.startswith(f"error: ucf101: {nowhere} not found"), output
    assert not (tmp_path / "run").exists()


def test_the_help_offers_only_what_each_command_accepts_and_states_the_defaults() -> None:
    output = run(train.app, "recognize", "--help")[1]
    assert "<static|spatial|temporal|stop>" in output, output
    assert "6/49" in output and "0.12244897959183673" not in output, output
    demo = protocols.SYNTHETIC["recognize"]
    for name, value in [("--frames", demo.frames), ("--batch-size", demo.batch), ("--epochs", demo.epochs)]:
        assert re.search(rf"{name} .*\b{value} \(synthetic\b", output), (name, output)
    assert re.search(r"--lr .*0\.01 \(synthetic\)", output) and "0.001 (ucf101, hmdb51, ssv2, kinetics400)" in output
    output = run(train.app, "retrieve", "--help")[1]
    assert re.search(rf"--frames .*\b{protocols.SYNTHETIC['retrieve'].frames} \(synthetic\b", output), output
    assert re.search(r"--lr .*0\.005 \(vatex\)", output), output
    output = run(evaluate.app, "recognize", "--help")[1]
    assert re.search(r"--prompt +<none>", output), output
    code, output = run(train.app, "recognize", "--prompt", "none")
    assert code == 2 and "'none' is not one of" in output, output


def test_threads_are_set_for_the_command_and_never_part_of_the_run(
    tiny_root: Path, golden_clip: Path, tmp_path
) -> None:
    before = torch.get_num_threads()
    try:
        code, output = run(evaluate.app, "recognize", "--dataset", "ucf101", "--threads", 1, "--root", tmp_path / "x")
        assert code == 1 and torch.get_num_threads() == 1, output
        options = ("--dataset", "ucf101", "--root", tiny_root, "--clip", golden_clip, "--frames", 2, "--batch-size", 8)
        out = ("--workers", 0, "--out", tmp_path / "run")
        code, output = run(train.app, "recognize", *options, *out, "--epochs", 1, "--threads", 1)
        assert code == 0, output
        code, output = run(train.app, "recognize", *options, *out, "--epochs", 2, "--threads", 2, "--resume")
        assert code == 0 and torch.get_num_threads() == 2, output
        assert "threads" not in torch.load(tmp_path / "run" / "last.pt", weights_only=False)["config"]
    finally:
        torch.set_num_threads(before)
