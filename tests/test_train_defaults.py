"""train.py's defaults as a run builds them: the optimiser, the batch, gradient clipping, the per-dataset schedule, the
options a default fills in (and only those: ``--lr 0`` is honoured), the worker count; and the batch sizes it refuses
with one ``error:`` line and nothing written."""

import contextlib
import inspect
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import error_lines, run, same_tensors, train_tiny
from typer.testing import CliRunner

import train
from loading import dataset_files, protocols
from plumbing import cli, runtime


def options(**given: Any) -> dict[str, Any]:
    """What a command hands ``run_config``: every option of ``train_options`` at its default, then ``given``."""
    parameters = inspect.signature(cli.train_options).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.name not in ("resume", "overwrite")}
    return {**defaults, **given}


def small_run(root: Path, clip: Path, out: Path, *extra: Any) -> list[Any]:
    """``train.py retrieve --dataset synthetic`` with the golden CLIP, at a CPU's size; every other option default."""
    common = ["--dataset", "synthetic", "--root", root, "--clip", clip, "--frames", 4, "--batch-size", 8]
    return ["retrieve", *common, "--workers", 0, "--epochs", 1, "--device", "cpu", "--out", out, *extra]


# --------------------------------------------------------------------------- #
# The defaults
# --------------------------------------------------------------------------- #


def test_default_batch_and_clipping_per_task():
    assert run_batch("retrieve", "msrvtt") == 128  # InfoNCE's negatives: the whole gathered batch
    assert run_batch("recognize", "ucf101") == 32
    assert run_batch("recognize", "synthetic") == run_batch("retrieve", "synthetic") == 32  # the CPU demo
    assert {f.name: f.default for f in fields(train.TrainConfig)}["grad_clip"] == 1.0
    config = train.run_config("retrieve", options(dataset="msrvtt"))
    assert (config.grad_clip, config.weight_decay, config.warmup) == (1.0, 0.2, 0.1)  # what the command gives


def run_batch(task: str, dataset: str) -> int:
    return train.run_config(task, options(dataset=dataset)).batch_size


class OneStepDone(Exception):
    """Raised after the first training step: what the tests here need of a run is built by then."""


def one_step(monkeypatch, args: list[Any]) -> tuple[train.Run, list[tuple[float, int, float, float]]]:
    """Run ``train.py`` until its first step is done; the ``Run`` it built and each ``clip_grad_norm_`` call's
    ``(max_norm, parameters, gradient norm before clipping, after)``."""
    built: list[train.Run] = []
    clipped: list[tuple[float, int, float, float]] = []
    build_run, clip_grad_norm = train.build_run, torch.nn.utils.clip_grad_norm_

    def recording_build_run(*build_args):
        run = build_run(*build_args)
        built.append(run)

        def stop_after_the_step() -> None:
            raise OneStepDone

        run.scheduler.step = stop_after_the_step  # after the optimiser's step, before any evaluation
        return run

    def recording_clip(parameters, max_norm, *clip_args, **clip_kwargs):
        parameters = list(parameters)
        total = clip_grad_norm(parameters, max_norm, *clip_args, **clip_kwargs)
        after = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None])
        )
        clipped.append((max_norm, len(parameters), total.item(), after.item()))
        return total

    monkeypatch.setattr(train, "build_run", recording_build_run)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    result = CliRunner().invoke(train.app, [str(a) for a in args])
    assert isinstance(result.exception, OneStepDone), result.stdout + result.stderr
    return built[0], clipped


def test_a_run_is_built_with_adamw_and_clips_at_1_by_default(synthetic_root, golden_clip, tmp_path, monkeypatch):
    run, clipped = one_step(monkeypatch, small_run(synthetic_root, golden_clip, tmp_path / "run"))
    optimizer = run.optimizer
    assert type(optimizer) is torch.optim.AdamW
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.98), 1e-6, 0.2)
    assert group["initial_lr"] == 1e-2  # the synthetic retrieval demo's rate, before the warm-up's factor
    trainable = list(run.model.trainable_parameters())  # STOP's prompters alone; CLIP is frozen
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert run.config.grad_clip == 1.0 and run.train_loader.batch_size == 8  # one process: the whole batch

    assert len(clipped) == 1  # the one step, clipped at 1.0 over every trainable parameter
    max_norm, count, _, after = clipped[0]
    assert max_norm == 1.0 and count == len(trainable) and after <= 1.0 + 1e-6


def test_grad_clip_limits_the_gradient_norm(synthetic_root, golden_clip, tmp_path, monkeypatch):
    """The first step's gradient norm is about 0.05 here, under the default 1.0: a limit of 1e-3 must bite."""
    _, clipped = one_step(monkeypatch, small_run(synthetic_root, golden_clip, tmp_path / "run", "--grad-clip", 1e-3))
    [(max_norm, _, before, after)] = clipped
    assert max_norm == 1e-3 and before > 1e-2 and after == pytest.approx(1e-3, rel=1e-3)


def test_grad_clip_0_turns_clipping_off(synthetic_root, golden_clip, tmp_path, monkeypatch):
    run, clipped = one_step(monkeypatch, small_run(synthetic_root, golden_clip, tmp_path / "run", "--grad-clip", 0))
    assert run.config.grad_clip == 0 and clipped == []


def test_lr_zero_is_honoured(tiny_root, golden_clip, tmp_path, monkeypatch):
    initial, build_run = {}, train.build_run

    def remembering_the_initial_prompts(config, checkpoint):
        built = build_run(config, checkpoint)
        initial.update({k: v.detach().clone() for k, v in built.model.trainable_state_dict().items()})
        return built

    monkeypatch.setattr(train, "build_run", remembering_the_initial_prompts)
    out = tmp_path / "run"
    code, output = train_tiny(tiny_root, golden_clip, out, "--lr", 0, "--epochs", 1)
    assert code == 0, output
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["config"]["lr"] == 0.0 and saved["config"]["epochs"] == 1
    assert initial and same_tensors(saved["stop"], initial)  # AdamW's step, weight decay included, is lr times


def test_run_config_fills_in_only_the_options_not_given(monkeypatch):
    parameters = inspect.signature(cli.train_options).parameters
    options = {name: p.default for name, p in parameters.items() if name not in ("resume", "overwrite")}
    none_default = sorted(name for name, value in options.items() if value is None)
    defaults_of_the_dataset = ["frames", "words", "batch_size", "epochs", "lr"]
    assert none_default == sorted(["root", "clip", *defaults_of_the_dataset, "workers", "compile", "out"])
    monkeypatch.setattr(dataset_files, "available_cores", lambda: 3)
    options["dataset"] = "ucf101"
    config = train.run_config("recognize", options)
    expected = {"root": None, "clip": None, "frames": 8, "words": None, "batch_size": 32, "epochs": 10, "lr": 1e-3,
                "workers": 3, "out": str(Path("runs") / "recognize-ucf101-stop")}  # fmt: skip
    assert {name: getattr(config, name) for name in expected} == expected  # the spec's defaults, README's table
    for name, falsy in {"frames": 0, "words": 0, "batch_size": 0, "epochs": 0, "lr": 0.0, "workers": 0}.items():
        assert getattr(train.run_config("recognize", {**options, name: falsy}), name) == falsy, name
    assert train.run_config("recognize", {**options, "clip": ""}).clip == ""


def test_default_workers_fit_the_machine(monkeypatch):
    assert runtime.default_workers() <= dataset_files.available_cores()
    for cores in (1, 2, 64):
        monkeypatch.setattr(dataset_files, "available_cores", lambda cores=cores: cores)
        monkeypatch.setattr(runtime, "LOCAL_WORLD_SIZE", 1)
        assert runtime.default_workers() == min(8, cores)
        monkeypatch.setattr(runtime, "LOCAL_WORLD_SIZE", 2)  # two torchrun processes on this machine share its cores
        assert 2 * runtime.default_workers() <= cores


# --------------------------------------------------------------------------- #
# Batch sizes refused: one error line, no run folder
# --------------------------------------------------------------------------- #


def test_a_batch_not_divisible_by_the_processes_is_refused(synthetic_root, golden_clip, tmp_path, monkeypatch):
    def never_built(*args):
        raise AssertionError("a run was built")

    monkeypatch.setattr(runtime, "WORLD_SIZE", 2)  # as under torchrun --nproc_per_node 2, without joining a group
    monkeypatch.setattr(cli, "process_group", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(train, "build_run", never_built)
    out = tmp_path / "run"
    code, output = run(train.app, *small_run(synthetic_root, golden_clip, out, "--batch-size", 3))
    assert code == 1
    assert output.strip().splitlines() == ["error: --batch-size 3: expected a multiple of the 2 processes"]
    assert not out.exists()


def test_a_batch_larger_than_the_training_set_is_refused(synthetic_root, golden_clip, tmp_path):
    out = tmp_path / "run"
    code, output = run(train.app, *small_run(synthetic_root, golden_clip, out, "--batch-size", 1000))
    assert code == 1 and "Traceback" not in output
    assert len(error_lines(output)) == 1 and output.strip().splitlines()[-1] == error_lines(output)[0]
    assert error_lines(output)[0].startswith("error: --batch-size 1000 is larger than the ")
    assert error_lines(output)[0].endswith(" training videos")
    assert not out.exists()


# --------------------------------------------------------------------------- #
# The per-dataset schedule
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("task", "dataset", "epochs", "lr", "batch"),
    [
        ("retrieve", "msrvtt", 5, 1e-3, 128),
        ("retrieve", "activitynet", 10, 1e-3, 128),
        ("retrieve", "vatex", 10, 5e-3, 128),
        ("retrieve", "msvd", 5, 1e-3, 128),
        ("retrieve", "lsmdc", 5, 1e-3, 128),
        ("retrieve", "didemo", 5, 1e-3, 128),
        ("recognize", "ucf101", 10, 1e-3, 32),
        ("recognize", "synthetic", 25, 1e-2, 32),
        ("retrieve", "synthetic", 10, 1e-2, 32),
    ],
)
def test_the_schedule_per_dataset(task, dataset, epochs, lr, batch):
    """protocols.py's table (README's Defaults, docs/fidelity.md): what a run gets when none of the three is given;
    each row names its source."""
    config = train.run_config(task, options(dataset=dataset))
    assert (config.epochs, config.lr, config.batch_size) == (epochs, lr, batch)
    assert protocols.protocol(dataset, task).source
