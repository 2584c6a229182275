"""Running under ``torchrun``: the process group, each rank's share of the data, and gathering it back.

Machinery a learner may skip: in a single process every function here is a no-op or the identity. Under
``torchrun --nproc_per_node N`` each process joins a group (NCCL on GPUs, gloo on CPUs), takes its share of every
epoch and of the test set, and gathers what the others computed; rank 0 alone prints and writes.
"""

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import typer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import data
from data import DataError
from errors import EXPECTED_ERRORS, RankError, RunError, error_message

TIMEOUT_VARIABLE = "STOP_TIMEOUT_MINUTES"  # how long a collective (joining included) waits for every rank
DEFAULT_TIMEOUT_MINUTES = 10.0
T = TypeVar("T")


def world_size() -> int:
    """How many processes torchrun started (``WORLD_SIZE``): 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (``RANK``): 0 in a single process. Read from the environment, so still known once the
    process group is gone (``reported_errors`` runs after it)."""
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def in_group() -> bool:
    """Whether this process runs in a process group with others (``process_group`` joined one)."""
    return dist.is_available() and dist.is_initialized()


def echo(message: str) -> None:
    """``typer.echo`` on rank 0 only: every rank runs the same code and would print it once each."""
    if rank() == 0:
        typer.echo(message)


def collective_minutes() -> float:
    """``STOP_TIMEOUT_MINUTES``, checked: how long a collective waits for every rank before it fails."""
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(text)
    except ValueError:
        minutes = math.nan
    if not 0 < minutes < math.inf:
        raise RunError(f"{TIMEOUT_VARIABLE}={text!r}: expected a positive number of minutes")
    return minutes


def first_line(error: BaseException) -> str:
    """An error's first line without the ``[file.cc:123]`` source location that gloo puts in front."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0])


def lost_contact(error: RuntimeError) -> bool:
    """A collective that failed because of another process: NCCL and the stores raise ``DistError``; gloo raises a
    plain ``RuntimeError`` from its transport ("Connection closed by peer", "Timed out waiting ...")."""
    return world_size() > 1 and (isinstance(error, dist.DistError) or "gloo" in str(error))


@contextlib.contextmanager
def process_group(placed: torch.device) -> Iterator[None]:
    """Join torchrun's other processes when it started several (``WORLD_SIZE > 1``); do nothing otherwise.

    NCCL when ``placed`` (``runtime.resolve_device``) is CUDA (this process's GPU, ``LOCAL_RANK``, given as
    ``device_id`` so the communicator forms at once), gloo on the CPU. Every collective, joining included, gives up
    after ``STOP_TIMEOUT_MINUTES`` (default 10), so a rank that hangs or never arrives ends the job instead of
    stalling it.
    """
    if world_size() == 1:
        yield
        return
    timeout = timedelta(minutes=collective_minutes())
    if placed.type == "cuda":
        torch.cuda.set_device(placed)
    try:
        if placed.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=placed)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    except dist.DistError as error:
        raise RankError(
            f"rank {rank()}: the {world_size()} processes did not all join within {TIMEOUT_VARIABLE}="
            f"{collective_minutes():g} minutes (is every machine started, and MASTER_ADDR/MASTER_PORT or the "
            f"rendezvous endpoint reachable?): {first_line(error)}"
        ) from None
    try:
        yield
    finally:
        dist.destroy_process_group()


def on_rank_zero(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` run by rank 0 alone, its result (or its bad-input error) handed to every rank.

    For what must happen once: checking and reading the run folder, generating the synthetic data. The other ranks
    wait in the broadcast; when it fails, every rank raises the same ``RunError`` and rank 0 alone reports it.
    """
    if not in_group():
        return function(*args)
    outcome: list[Any] = [None]
    if rank() == 0:
        try:
            outcome = [(True, function(*args))]
        except EXPECTED_ERRORS as error:
            outcome = [(False, error_message(error))]
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise RunError(value)
    return value


@contextlib.contextmanager
def rank_local_errors() -> Iterator[None]:
    """Around the loops over this rank's share of the data: a ``DataError`` there (a broken video with ``--strict``)
    concerns this rank alone, so under torchrun it becomes a ``RankError`` that this rank reports, naming itself."""
    try:
        yield
    except DataError as error:
        if world_size() == 1:
            raise
        raise RankError(f"rank {rank()}: {error}") from None


def shard(dataset: data.VideoDataset, *, train: bool, seed: int = 0) -> DistributedSampler | None:
    """This rank's share of ``dataset``: the order in which it reads it, one process being a world of one.

    Training: a permutation drawn from ``seed`` and the epoch (``set_epoch``) alone, the same on every rank, each
    taking its share, the remainder dropped so every rank runs the same number of steps; so the order of any epoch
    is known without replaying the ones before it (``--resume``). Evaluation: ``None`` in one process (in order);
    under torchrun in order and complete, a few items repeated so the shares are equal, which
    ``gather_in_dataset_order`` drops.
    """
    if train:
        return DistributedSampler(
            dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=True
        )
    if not in_group():
        return None
    return DistributedSampler(dataset, shuffle=False)


def gather_in_dataset_order(loader: DataLoader, *columns: torch.Tensor | list) -> tuple[torch.Tensor | list, ...]:
    """Every rank's rows, once each and in the order of ``loader.dataset``: what one process would have.

    ``columns`` hold one row per item this rank's ``loader`` yielded: tensors (rows along dim 0) or lists (captions).
    They travel with the dataset indices of this rank's sampler through ``all_gather_object``, which works on gloo
    and NCCL alike and, at the size of a test set's scores or features (MB), costs little; the repeats the sampler
    added are dropped (the first copy is kept) and the rows put back in order. One process: returned unchanged.
    """
    if not in_group():
        return columns
    shares: list[Any] = [None] * dist.get_world_size()
    local = [column.cpu() if isinstance(column, torch.Tensor) else column for column in columns]
    dist.all_gather_object(shares, (list(loader.sampler), local))
    first: dict[int, int] = {}  # dataset index -> its first position among all ranks' rows
    for position, index in enumerate(index for indices, _ in shares for index in indices):
        first.setdefault(index, position)
    order = [first[index] for index in range(len(loader.dataset))]
    gathered = []
    for number, column in enumerate(columns):
        if isinstance(column, torch.Tensor):
            gathered.append(torch.cat([rows[number] for _, rows in shares])[order].to(column.device))
        else:
            every = [row for _, rows in shares for row in rows[number]]
            gathered.append([every[position] for position in order])
    return tuple(gathered)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[b, ...]`` of every process, concatenated in rank order ``[W*b, ...]``; the gradient reaches this
    process's own rows (the others' are constants here, and get theirs in their own process). One process: ``x``."""
    if not in_group():
        return x
    shares = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(shares, x.detach().contiguous())
    shares[dist.get_rank()] = x
    return torch.cat(shares)


def summed_over_ranks(*values: float) -> list[float]:
    """Each value summed over every rank (losses, clip counts, broken videos); the values themselves in one process."""
    if not in_group():
        return list(values)
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, values)
    return [sum(share[i] for share in shares) for i in range(len(values))]


def broken_over_ranks(*datasets: data.VideoDataset) -> int:
    """The distinct broken videos met by every rank in ``datasets``: a video two ranks both met (a padded evaluation
    share, a training video drawn by another rank in another epoch) counts once."""
    if not in_group():
        return sum(dataset.broken_count() for dataset in datasets)
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, [dataset.broken_items() for dataset in datasets])
    return sum(len({item for share in shares for item in share[number]}) for number in range(len(datasets)))


def data_parallel(tower: nn.Module, device: torch.device) -> nn.Module:
    """``tower`` (``runtime.VideoTower``), under torchrun wrapped so that DDP averages the prompters' gradients.

    DDP averages gradients only for what runs through its ``forward``, and at the start broadcasts every parameter
    of the module it wraps from rank 0: the tower's are the prompters' alone, so the frozen CLIP, the same on every
    rank, is never sent. A compiled tower compiles its inner function, as PyTorch advises for DDP (compile the module
    DDP wraps, not the wrapper).

    Every gap carries eta prompt slots, real or masked, so a batch with no prompt (n_t = 0 everywhere) still runs the
    temporal prompters and gives them a zero gradient, in one process as here. Single-frame videos skip them:
    ``find_unused_parameters`` lets DDP finish such steps, and a parameter unused on every rank keeps no gradient, so
    AdamW skips it exactly as it does in one process.
    """
    if not in_group():
        return tower
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(tower, device_ids=device_ids, find_unused_parameters=True)
