"""``VideoLoader``, the DataLoader that ``data.build_loader`` returns, and what makes it differ from a plain one.

Two things, both for worker processes: each item draws its frames, crop and flip from its own random stream, so the
draws do not depend on which worker loads it (``LoaderItems``); and a DataError met in a worker reaches the main
process as the same error, not as PyTorch's re-wrapped traceback text (``WorkerFailure``). This module needs only
``DataError`` from ``dataset_files.py``, so ``data.py`` imports it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from dataset_files import DataError


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit seed of item ``index``'s random draws in ``epoch``: unrelated streams for distinct triples."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass
class WorkerFailure:
    """A DataError met in a DataLoader worker, carried to the main process in place of a batch.

    PyTorch would send only the error's type and traceback text and rebuild it from that text, so the user would
    read "Caught DataError in DataLoader worker process 0. Original Traceback ..." (or a RuntimeError, for a
    BrokenVideoError, whose constructor takes two arguments). The error itself pickles, so it travels as it is.
    """

    error: DataError


class LoaderItems(Dataset):
    """``dataset`` as ``VideoLoader`` reads it: item ``i`` of epoch ``e`` draws from its own random stream.

    Each item seeds torch's random number generator with ``item_seed(seed, e, i)`` (frame sampling and the
    crop and flip use it), inside ``torch.random.fork_rng`` so the calling process's own stream is untouched. The
    draws are then the same whichever worker process (or the main one, with no workers) loads the item, whatever
    that worker loaded before it in earlier epochs, and however many workers there are: ``--resume``, which starts
    fresh workers, continues exactly. ``epoch`` lives in shared memory: persistent workers see ``set_epoch``.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int | str] | WorkerFailure:
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, int(self.epoch), index))
                return self.dataset[index]
        except DataError as error:
            if get_worker_info() is None:
                raise  # no workers: it reaches the caller as it is anyway
            return WorkerFailure(error)


def collate_or_failure(items: list) -> object:
    """``default_collate``, or the batch's first ``WorkerFailure`` (to be raised by ``VideoLoader``)."""
    failures = [item for item in items if isinstance(item, WorkerFailure)]
    return failures[0] if failures else default_collate(items)


class VideoLoader(DataLoader):
    """A DataLoader over ``LoaderItems``: raises a worker's DataError in the main process as the same error (one
    ``error:`` line, as with no workers), and ``set_epoch`` gives the sampler and the items' random draws the epoch."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch.fill_(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        for batch in super().__iter__():
            if isinstance(batch, WorkerFailure):
                raise batch.error
            yield batch
