"""Helper of ``test_distributed.py`` (not a test): one retrieval step's loss and STOP's gradients, as train.py has them.

``python tests/gathered_loss.py OUT`` in one process, or ``torchrun --nproc_per_node 2 tests/gathered_loss.py OUT``
(gloo, CPU), with the project root on ``PYTHONPATH``. Every process builds STOP on the 32-px golden CLIP with the
same weights (dropout 0, so a training-mode step is deterministic), wraps it as ``build_run`` does
(``runtime.data_parallel``), takes its share of step 0 of a fixed pool of 8 video-caption pairs through the
training sampler (``runtime.shard``: rank r's ``perm[r::W]``, so the ranks' shares together are one process's
batch of 4, in another order), and runs ``train.batch_loss`` and its backward pass twice: as written
(``gathered``), and with ``all_gather_with_grad`` made the identity (``local``: each rank's negatives its own share
alone). Rank r writes ``OUT/rank{r}.pt``: per run the loss as train.py logs it and each prompter parameter's
gradient after DDP's averaging.
"""

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

import train
from plumbing import runtime
from stop import STOPConfig

GOLDEN_CLIP = Path(__file__).resolve().parent / "fixtures" / "tiny_clip_state_dict.pt"
BATCH = 4  # the batch the loss sees, over every process
POOL = 8  # pairs in the "training set": two steps of BATCH, so the sampler's permutation matters
FRAMES = 4
CAPTIONS = [
    "a man is singing",
    "a cat plays with a ball",
    "a dog runs in the park",
    "a bird flies over the sea",
    "a red car drives down the road",
    "two people dance on a stage",
    "a child draws a house",
    "someone is cooking pasta",
]


def step(run: SimpleNamespace, videos: torch.Tensor, captions: list[str]) -> dict[str, Any]:
    """One forward and backward pass of ``train.batch_loss``: the loss as logged and the prompters' gradients."""
    run.model.zero_grad(set_to_none=True)
    loss = train.batch_loss(run, videos, captions)
    loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in run.model.prompters.named_parameters()}
    return {"loss": loss.item() / runtime.WORLD_SIZE, "gradients": gradients}


def main(out: Path) -> None:
    device = torch.device("cpu")
    with runtime.process_group(device):
        backbone = runtime.load_backbone(str(GOLDEN_CLIP))
        torch.manual_seed(0)  # the same prompters on every rank (DDP would broadcast rank 0's anyway)
        model = runtime.build_model(backbone, STOPConfig(dropout=0.0), device, "fp32")
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # weights as if trained: P^s's last layer is zero at initialisation
            for parameter in model.trainable_parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.train()
        run = SimpleNamespace(
            config=SimpleNamespace(task="retrieve"),
            model=model,
            encode=runtime.data_parallel(runtime.VideoTower(model), device),
            device=device,
            tokenize=runtime.caption_tokenizer(backbone, 32),
        )
        pool = torch.randn(POOL, FRAMES, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        sampler = runtime.shard(list(range(POOL)), train=True, seed=0)  # as build_run's training loader
        sampler.set_epoch(0)
        share = list(sampler)[: BATCH // runtime.WORLD_SIZE]  # this rank's step 0
        videos, captions = pool[share], [CAPTIONS[index] for index in share]

        result = {"share": share, "gathered": step(run, videos, captions)}
        gather = train.all_gather_with_grad
        train.all_gather_with_grad = lambda x: x  # each rank's InfoNCE over its own pairs alone
        try:
            result["local"] = step(run, videos, captions)
        finally:
            train.all_gather_with_grad = gather
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / f"rank{runtime.RANK}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
