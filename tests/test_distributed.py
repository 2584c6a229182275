"""train.py and evaluate.py under ``torchrun --nproc_per_node 2`` (gloo, CPU) with the 32-px golden CLIP.

Evaluating under two processes must give one process's metrics (the test sets here have an odd size, so the
sampler pads and the padding must be dropped); a run must resume under torchrun exactly; and a rank that fails,
dies or never joins must end the job with one message per rank and no half-written checkpoint.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import PROJECT, same_tensors, stop_tensors
from torch.utils.data import DistributedSampler
from typer.testing import CliRunner

import data
import evaluate
from loading.protocols import PROTOCOLS
from plumbing import runs, runtime

TIMEOUT = 120  # seconds: a hung job fails the test instead of stalling the suite


@pytest.fixture(scope="module")
def odd_root(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic data with one test video fewer in each layout (127 and 63): two ranks' shares need padding."""
    root = tmp_path_factory.mktemp("odd") / "synthetic"
    shutil.copytree(synthetic_root, root)
    for listing in (
        root / "ucf101" / PROTOCOLS["ucf101"].annotations / "testlist01.txt",
        root / "msrvtt" / PROTOCOLS["msrvtt"].annotations / "MSRVTT_JSFUSION_test.csv",
    ):
        lines = listing.read_text().splitlines(keepends=True)
        listing.write_text("".join(lines[:-1]))
    return root


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> dict[str, str]:
    """The subprocesses' environment: an empty download root, as the shipped BPE vocabulary is all they need."""
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture
def in_process(environment, monkeypatch) -> Iterator[None]:
    """Commands run in this process (the single-process reference) read the same vocabulary, on one thread as each
    torchrun worker does (OMP_NUM_THREADS=1): on a busy machine a second thread can make them several times slower."""
    monkeypatch.setenv("XDG_CACHE_HOME", environment["XDG_CACHE_HOME"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun_command(script: str, *args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        script,
        *map(str, args),
    ]


def torchrun(environment: dict[str, str], script: str, *args) -> tuple[int, str]:
    done = subprocess.run(
        torchrun_command(script, *args),
        cwd=PROJECT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return done.returncode, done.stdout + done.stderr


def training(task: str, root: Path, golden: Path, out: Path, *extra) -> list:
    clip = golden / "tiny_clip_state_dict.pt"
    common = ["--dataset", "synthetic", "--root", root, "--clip", clip, "--frames", 4, "--batch-size", 8]
    return [task, *common, "--workers", 0, "--epochs", 1, "--out", out, *extra]


def evaluation(task: str, root: Path, checkpoint: Path, out: Path) -> list:
    common = ["--dataset", "synthetic", "--root", root, "--checkpoint", checkpoint, "--batch-size", 8]
    return [task, *common, "--workers", 0, "--out", out]


def worker_error_lines(output: str) -> list[str]:
    """Our workers' ``error:`` lines (tqdm's carriage returns may put one on the same line as a progress bar)."""
    return [line[line.index("error: ") :] for line in output.replace("\r", "\n").splitlines() if "error: " in line]


def no_traceback_of_ours(output: str) -> bool:
    """torchrun prints its own traceback when a worker fails; none may come from this project's files."""
    ours = ("train.py", "evaluate.py", "stop.py", "data.py", "plumbing/", "loading/")
    return not any(name in line and '", line' in line for line in output.splitlines() for name in ours)


def evaluate_in_one_process(args: list) -> dict:
    result = CliRunner().invoke(evaluate.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(Path(args[-1]).read_text())


def test_recognition_trains_and_evaluates_as_one_process(
    synthetic_root, odd_root, golden, environment, in_process, tmp_path
):
    run = tmp_path / "run"
    code, output = torchrun(environment, "train.py", *training("recognize", synthetic_root, golden, run))
    assert code == 0, output
    assert output.count("trainable parameters") == 1 and output.count("done: ") == 1  # rank 0 alone logs
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # and writes
    checkpoint = runs.read_checkpoint(run / "best.pt")
    assert checkpoint["epoch"] == 0 and checkpoint["config"]["frames"] == 4
    assert not any(path.name.endswith(".tmp") for path in run.iterdir())

    two = tmp_path / "two.json"
    code, output = torchrun(environment, "evaluate.py", *evaluation("recognize", odd_root, run / "best.pt", two))
    assert code == 0, output
    assert output.count("metrics written to") == 1
    one = evaluate_in_one_process(evaluation("recognize", odd_root, run / "best.pt", tmp_path / "one.json"))
    two = json.loads(two.read_text())
    assert two["videos"] == one["videos"] == 127
    assert {key: two[key] for key in ("top1", "top5", "direction")} == pytest.approx(
        {key: one[key] for key in ("top1", "top5", "direction")}, abs=1e-6
    )


def test_retrieval_trains_and_evaluates_as_one_process(
    synthetic_root, odd_root, golden, environment, in_process, tmp_path
):
    run = tmp_path / "retrieval"
    code, output = torchrun(environment, "train.py", *training("retrieve", synthetic_root, golden, run))
    assert code == 0, output
    assert set(runs.read_checkpoint(run / "best.pt")["metrics"]) == {"text_to_video", "video_to_text"}

    two = tmp_path / "two.json"
    code, output = torchrun(environment, "evaluate.py", *evaluation("retrieve", odd_root, run / "best.pt", two))
    assert code == 0, output
    one = evaluate_in_one_process(evaluation("retrieve", odd_root, run / "best.pt", tmp_path / "one.json"))
    two = json.loads(two.read_text())
    assert two["videos"] == one["videos"] == 63
    for direction in ("text_to_video", "video_to_text"):  # the same ranks, so the same R@K, MdR and MnR exactly
        assert two[direction] == one[direction]


def test_multi_caption_retrieval_evaluates_as_one_process(msvd_root, golden, environment, in_process, tmp_path):
    """MSVD's test set (3 videos, so the two shares are padded; 6 captions in groups of 2, 3 and 1), zero-shot."""
    clip = golden / "tiny_clip_state_dict.pt"
    common = ["--dataset", "msvd", "--root", msvd_root, "--clip", clip, "--prompt", "none", "--frames", 2]
    args = ["retrieve", *common, "--batch-size", 1, "--workers", 0, "--out"]
    code, output = torchrun(environment, "evaluate.py", *args, tmp_path / "two.json")
    assert code == 0, output
    one = evaluate_in_one_process([*args, tmp_path / "one.json"])
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["videos"] == one["videos"] == 3 and two["left_out_videos"] == 1
    for direction in ("text_to_video", "video_to_text"):
        assert two[direction] == one[direction]


def test_gathered_negatives_give_one_process_loss_and_gradients(environment, tmp_path):
    """Retrieval under torchrun: each rank's InfoNCE sees every rank's pairs (``all_gather_with_grad``) and is scaled
    by the number of processes, so after DDP's averaging two processes with half the batch each have the loss and
    STOP's gradients of one process with the whole batch (``tests/gathered_loss.py`` runs one training step).

    Tolerance: fp32, and the two runs differ only in how sums are split (matrix products over 2 videos instead of 4,
    the ranks' average of two gradients instead of one sum): a few units in the last place of the largest gradient
    (about 1e-2 here), measured 4e-9. Without the gathering the gradients move by about 6e-3."""
    helper = {
        **environment,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "tests/gathered_loss.py", tmp_path / "one"],
        cwd=PROJECT,
        env=helper,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    code, output = torchrun(helper, "tests/gathered_loss.py", tmp_path / "two")
    assert code == 0, output
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(one["share"]) == 4 and [len(two["share"]) for two in ranks] == [2, 2]
    assert sorted(ranks[0]["share"] + ranks[1]["share"]) == sorted(one["share"])  # the same pairs, in another order

    reference = one["gathered"]["gradients"]
    assert max(gradient.abs().max().item() for gradient in reference.values()) > 1e-3  # a real gradient to compare
    for two in ranks:
        assert two["gathered"]["loss"] == pytest.approx(one["gathered"]["loss"], rel=1e-6)
        assert two["gathered"]["gradients"].keys() == reference.keys()
        for name, gradient in two["gathered"]["gradients"].items():
            torch.testing.assert_close(gradient, reference[name], rtol=1e-5, atol=1e-7, msg=name)
        # Each rank's negatives its own share alone: another loss, and gradients far outside the tolerance.
        assert two["local"]["loss"] != pytest.approx(one["gathered"]["loss"], rel=1e-3)
        moved = max((two["local"]["gradients"][name] - reference[name]).abs().max().item() for name in reference)
        assert moved > 1e-4


# --------------------------------------------------------------------------- #
# Bad input, a dying rank, a rank that never joins
# --------------------------------------------------------------------------- #


def test_bad_input_met_by_every_rank_is_reported_once(synthetic_root, golden, environment, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    code, output = torchrun(environment, "train.py", *training("recognize", synthetic_root, golden, out))
    assert code != 0
    assert worker_error_lines(output) == [
        f"error: {out} already holds a run: choose another --out for a new run (another seed or settings), pass "
        "--resume to continue this one, or --overwrite to replace it"
    ]
    assert (out / "metrics.jsonl").read_text() == "precious\n"
    assert no_traceback_of_ours(output)


def test_a_broken_video_of_one_rank_ends_the_job(synthetic_root, golden, environment, tmp_path):
    """With --strict a broken video is an error; the one rank 1 reads first is broken, so rank 1 alone meets it."""
    root = tmp_path / "synthetic"
    shutil.copytree(synthetic_root, root)
    train_set = data.build_dataset("ucf101", root / "ucf101", "train", num_frames=4, resolution=32)
    share = DistributedSampler(train_set, num_replicas=2, rank=1, shuffle=True, seed=0, drop_last=True)
    share.set_epoch(0)
    broken = train_set.paths[next(iter(share))]
    broken.write_bytes(b"not a video")

    out = tmp_path / "run"
    code, output = torchrun(environment, "train.py", *training("recognize", root, golden, out, "--strict"))
    assert code != 0
    errors = worker_error_lines(output)  # rank 1's reason, and rank 0's lost contact unless torchrun stopped it
    reasons = [line for line in errors if not line.startswith("error: rank 0: a collective operation")]
    assert len(reasons) == 1 and reasons[0].startswith(f"error: rank 1: cannot decode video {broken}")
    assert not (out / "last.pt").exists() and not list(out.glob("*.tmp"))
    assert no_traceback_of_ours(output)


def worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of the process torchrun (``launcher``) started as ``rank``, read from Linux's /proc."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == launcher and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (ValueError, OSError, IndexError):
            continue  # not a process, or one that has just ended
    return None


def test_a_killed_rank_ends_the_job_and_the_run_resumes_exactly(synthetic_root, golden, environment, tmp_path):
    out = tmp_path / "run"
    args = training("recognize", synthetic_root, golden, out, "--epochs", 4)
    job = subprocess.Popen(
        torchrun_command("train.py", *args),
        cwd=PROJECT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "last.pt").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = worker_of_rank(job.pid, 1)
        assert (out / "last.pt").exists() and worker is not None, "the job ended before rank 1 could be killed"
        os.kill(worker, signal.SIGKILL)  # rank 1 dies mid-run, without a word
        output, _ = job.communicate(timeout=TIMEOUT)
    finally:
        job.kill()
    assert job.returncode != 0
    assert f"Signal 9 (SIGKILL) received by PID {worker}" in output, output  # torchrun's report names rank 1
    errors = worker_error_lines(output)  # rank 0's lost contact, unless torchrun stopped it first
    assert all(line.startswith("error: rank 0: a collective operation") for line in errors), output
    assert not list(out.glob("*.tmp"))
    assert runs.read_checkpoint(out / "last.pt")["epoch"] < 3  # whole: written to a temporary file, renamed
    assert no_traceback_of_ours(output)

    code, output = torchrun(environment, "train.py", *args, "--resume")
    assert code == 0, output
    assert output.count("resuming") == 1
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 4
    straight = tmp_path / "straight"
    code, output = torchrun(
        environment, "train.py", *training("recognize", synthetic_root, golden, straight, "--epochs", 4)
    )
    assert code == 0, output
    resumed, uninterrupted = stop_tensors(out / "last.pt"), stop_tensors(straight / "last.pt")
    assert resumed and same_tensors(resumed, uninterrupted)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rank_that_never_joins_ends_the_job(environment, tmp_path, monkeypatch):
    """Rank 0 of two started by hand, the way a second machine that never comes up leaves it: it gives up in time."""
    alone = {
        **environment,
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        runtime.TIMEOUT_VARIABLE: "0.05",  # 3 seconds
    }
    done = subprocess.run(
        [sys.executable, "train.py", "recognize", "--out", tmp_path / "run"],
        cwd=PROJECT,
        env=alone,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 1
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert worker_error_lines(done.stderr)[0].startswith("error: rank 0: the 2 processes did not all join within")
    assert len(worker_error_lines(done.stderr)) == 1 and not (tmp_path / "run").exists()

    monkeypatch.setattr(runtime, "WORLD_SIZE", 2)  # as under torchrun --nproc_per_node 2
    monkeypatch.setenv(runtime.TIMEOUT_VARIABLE, "soon")
    result = CliRunner().invoke(evaluate.app, ["recognize", "--device", "cpu"])
    assert (
        result.exit_code == 1 and "STOP_TIMEOUT_MINUTES='soon': expected a positive number of minutes" in result.output
    )
