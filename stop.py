"""STOP: integrated spatial-temporal dynamic prompting over a frozen CLIP (CVPR 2025, arXiv 2503.15973).

A frozen CLIP ViT reads a video's frames; STOP keeps every CLIP weight frozen and, in each prompted block ``l``,
trains two small prompt generators (``docs/method.md``). The video feature meets the text through one of two
readouts (``READOUTS``):

- ``cls`` (the default; Figure 2a): the video has one CLS token, CLIP's class embedding at position 0, which in
  every block attends to itself, to every frame's patches and to every real temporal prompt; the feature is that
  token's. With one frame and no prompt this is CLIP's image forward;
- ``mean`` (CLIP4Clip "meanP", the paper's baseline): every frame goes through the image tower with its own CLS and
  the video feature is the mean of the frame features.

Either way the feature is L2-normalised. ``attention`` (``ATTENTIONS``) says what a frame's patches attend to:
their own frame, the video CLS and the prompts beside them (``frame``), or every token of the video (``joint``,
Figure 2a taken literally: an ablation, with ``cls`` only). This file follows the method's steps in order:

1. ``cls_attention_map``: the frozen CLS attention ``A`` of each frame (with ``cls``, the video CLS's);
2. to 4. ``SpatialPrompter``: the temporal dynamics ``M`` (3-D conv ``N^s``) and ``A`` fused into ``W^s``, whose
   top patches are the regions ``r``; the prompter ``P^s`` adds ``r * W^s * p^s`` to those patch tokens (``h^s``);
5. to 7. ``TemporalPrompter``: the variation ``W^t`` of each gap between frames (conv ``N^t`` over the frame
   difference) sets how many prompt tokens ``n_t = ceil(eta W^t)`` the prompter ``P^t`` puts between them;
8. ``prompted_block`` (``mean``) and ``video_cls_block`` (``cls``): each frame attends to the prompts of the two
   gaps beside it, in the frozen block; the video CLS attends to all of them.

``BlockPrompter`` holds one block's generators and runs steps 1-8; ``STOPModel`` runs every block, for STOP and
for the ablation variants of ``PROMPT_VARIANTS``: ``none`` (the frozen CLIP), ``static`` (VPT-deep style
shared prompts), ``spatial`` (steps 1-4) and ``temporal`` (steps 5-8 with ``r = 0``). All ``B*T`` frames run as
one batch through every block (with ``cls``, slot 0 of every frame holds the video CLS), and videos with
different prompt counts share a batch through a key mask (never truncated, no Python loop over videos or frames).

The choices this file makes where the paper is silent, each with the function that implements it, are listed in
``docs/method.md`` ("Choices where the paper is silent"), and why identical frames get no temporal prompts is argued
there once ("Identical frames").
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_model import CLIP, ResidualAttentionBlock
from loading.errors import ConfigError, is_number

PROMPT_VARIANTS = ("none", "static", "spatial", "temporal", "stop")
READOUTS = ("mean", "cls")  # the video feature: the mean of per-frame CLS features, or one video CLS (Figure 2a)
ATTENTIONS = ("frame", "joint")  # patches attend within their frame (step 8), or to the whole video (Figure 2a)
PAPER_TRAINABLE_PARAMETERS = 7_530_000  # STOP's count for ViT-B/32 in the paper's MSR-VTT table
VARIATION_DEAD_ZONE = 1e-3  # tau: a gap whose W^t is at most this gets no prompt (float noise, not motion)


@dataclass(frozen=True)
class STOPConfig:
    """STOP's hyper-parameters: the paper's where it gives them, else the authors' code's, else the choice stated.

    ``prompt``: the variant, one of ``PROMPT_VARIANTS``. ``alpha``: ``W^s = alpha A + (1 - alpha) M`` weighs the
    frozen attention and the learned dynamics equally (paper silent). ``beta``: a region patch counts ``1 + beta``
    times in ``W^t`` (paper silent). ``eta``: at most ``eta`` prompts per gap. ``rho``: ``K_s = ceil(rho N)``
    regions per frame (``SpatialPrompter``). ``reduced_dim``: ``d_r``. ``prompt_layers``: prompt the first
    ``prompt_layers`` blocks, ``None`` for every block. ``dropout`` on the output of ``P^s`` and ``P^t`` (paper
    silent; VPT's prompt dropout). ``readout``: one of ``READOUTS``, ``"cls"`` by default (``docs/method.md``).
    ``attention``: one of ``ATTENTIONS``; ``"joint"`` needs ``readout="cls"``.
    """

    prompt: str = "stop"
    alpha: float = 0.5
    beta: float = 1.0
    eta: int = 4
    rho: float = 6 / 49  # the authors' 6 of ViT-B/32's 49 patches; the same fraction of any grid
    reduced_dim: int = 32
    prompt_layers: int | None = None
    dropout: float = 0.1
    readout: str = "cls"
    attention: str = "frame"

    def __post_init__(self) -> None:
        """Refuse a value of the wrong type or range (a checkpoint edited by hand, ``--beta inf``) with its name."""
        checks = [
            (self.prompt in PROMPT_VARIANTS, f"prompt={self.prompt!r}: expected one of {PROMPT_VARIANTS}"),
            (is_number(self.alpha, 0, 1), f"alpha={self.alpha!r}: expected a weight in [0, 1]"),
            (is_number(self.beta, 0), f"beta={self.beta!r}: expected a finite beta >= 0"),
            (is_number(self.eta, 1, 64, integer=True), f"eta={self.eta!r}: expected an integer in [1, 64]"),
            (is_number(self.rho, 0, 1) and self.rho > 0, f"rho={self.rho!r}: expected 0 < rho <= 1"),
            (
                is_number(self.reduced_dim, 1, integer=True),
                f"reduced_dim={self.reduced_dim!r}: expected an integer >= 1",
            ),
            (
                self.prompt_layers is None or is_number(self.prompt_layers, 1, integer=True),
                f"prompt_layers={self.prompt_layers!r}: expected an integer >= 1, or None for every block",
            ),
            (
                is_number(self.dropout, 0, 1) and self.dropout < 1,
                f"dropout={self.dropout!r}: expected 0 <= dropout < 1",
            ),
            (self.readout in READOUTS, f"readout={self.readout!r}: expected one of {READOUTS}"),
            (self.attention in ATTENTIONS, f"attention={self.attention!r}: expected one of {ATTENTIONS}"),
            (
                self.attention != "joint" or self.readout == "cls",
                f"attention={self.attention!r} with readout={self.readout!r}: expected readout='cls' (a joint "
                "attention has one video CLS to read)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> STOPConfig:
        """The fields of ``values`` that are STOP's (a checkpoint's run configuration holds training's too).

        A configuration without ``readout`` is read as ``"mean"`` and one without ``attention`` as ``"frame"``: a
        checkpoint that records neither was trained with those.
        """
        known = {field.name: values[field.name] for field in fields(cls) if field.name in values}
        return cls(**{"readout": "mean", "attention": "frame", **known})


@dataclass
class PromptDetails:
    """What one prompted block decided, detached, for inspection (``encode_video(..., return_details=True)``).

    Quantities a variant does not compute are zeros (``static``: ``counts = eta`` and ``variation = 1``).
    """

    attention: torch.Tensor  # A, step 1: [B, T, N] in [0, 1]
    dynamics: torch.Tensor  # M, step 2: [B, T, N] in (0, 1)
    fused_score: torch.Tensor  # W^s, step 3: [B, T, N]
    regions: torch.Tensor  # r, step 3: [B, T, N] bool, ceil(rho N) True per frame
    variation: torch.Tensor  # W^t, step 5: [B, T-1] in [0, 1)
    counts: torch.Tensor  # n_t, step 6: [B, T-1] int64 in 0..eta


# --------------------------------------------------------------------------- #
# The convolutions over frames
# --------------------------------------------------------------------------- #


def frame_conv(in_channels: int, out_channels: int, kernel: tuple[int, int, int]) -> nn.Conv3d:
    """A 3-D convolution over ``[T, G, G]`` that keeps the shape, padding by replicating edges.

    Replicating (rather than zero-padding) the first and last frame keeps a video of identical frames identical, for
    any weights (``docs/method.md``, "Identical frames").
    """
    padding = tuple(size // 2 for size in kernel)
    return nn.Conv3d(in_channels, out_channels, kernel, padding=padding, padding_mode="replicate")


# --------------------------------------------------------------------------- #
# Step 1: the frozen attention of each frame
# --------------------------------------------------------------------------- #


@torch.no_grad()
def cls_attention_map(block: ResidualAttentionBlock, normed: torch.Tensor, frames: int = 1) -> torch.Tensor:
    """Step 1, ``A_t``: the CLS query's attention to frame t's patches in ``block``, head-averaged, min-max scaled
    per frame.

    ``normed`` is ``ln_1(h)`` ``[B*T, 1+N, D]``; returns ``[B*T, N]`` in ``[0, 1]``. ``frames``: how many
    consecutive frames share one CLS. With 1 (``readout="mean"``) each frame's CLS attends over its own ``1+N``
    keys; with ``T`` (``readout="cls"``) the video CLS, held in slot 0 of every frame, attends over itself and
    every frame's patches, ``1+T*N`` keys, and ``A_t`` is the part of that one softmax on frame t. These are the
    block's own attention probabilities, computed without projecting any key: per head,
    ``q_cls . k_j = (W_k^T q_cls) . x_j + q_cls . b_k`` and the last term, equal for every key, cancels in the
    softmax. No gradient flows through ``A``.
    """
    attn = block.attn
    groups, width = normed.shape[0] // frames, normed.shape[-1]
    head_dim = width // attn.heads
    query_weight, key_weight, _ = attn.in_proj_weight.chunk(3)  # each [D, D]
    cls = normed[::frames, 0]  # the CLS of each group: [B*T/frames, D]
    query = F.linear(cls, query_weight, attn.in_proj_bias[:width]).view(-1, attn.heads, head_dim)
    folded = torch.einsum("bhc,hcd->bhd", query, key_weight.view(attn.heads, head_dim, width))  # [., H, D]
    tokens = normed.reshape(groups, -1, width)  # the group's frames one after the other: [., frames (1+N), D]
    logits = tokens @ folded.transpose(1, 2) * head_dim**-0.5  # [., frames (1+N), H]
    if frames > 1:  # keys: the CLS (of the first frame: the same token in every frame) and every frame's patches
        per_frame = logits.unflatten(1, (frames, -1))  # [., frames, 1+N, H]
        logits = torch.cat([per_frame[:, 0, :1], per_frame[:, :, 1:].flatten(1, 2)], dim=1)  # [., 1+frames N, H]
    attention = logits.float().softmax(dim=1)[:, 1:].mean(dim=-1).reshape(normed.shape[0], -1)  # [B*T, N]
    low, high = attention.aminmax(dim=-1, keepdim=True)
    return (attention - low) / (high - low).clamp_min(1e-12)


# --------------------------------------------------------------------------- #
# Steps 2-4: intra-frame spatial prompting
# --------------------------------------------------------------------------- #


def video_dropout(x: torch.Tensor, batch: int, p: float, training: bool) -> torch.Tensor:
    """Dropout of ``x`` ``[B*T, K, D]`` with one mask per video, shared by its ``T`` frames.

    One mask per video keeps a video of identical frames identical while training (``docs/method.md``, "Identical
    frames").
    """
    if not training or p == 0:
        return x
    keep = torch.empty(batch, 1, *x.shape[1:], device=x.device, dtype=x.dtype).bernoulli_(1 - p) / (1 - p)
    return (x.unflatten(0, (batch, -1)) * keep).flatten(0, 1)


class SpatialPromptNet(nn.Module):
    """``P^s`` (Figure 2b): Conv3d -> ReLU -> Conv3d -> Linear -> ReLU -> Linear(-> D) -> Dropout (one mask per
    video, ``video_dropout``).

    Its first convolution sees frames t-1, t, t+1 of the reduced tokens ``u``; the second has a temporal kernel of
    1. The last Linear starts at zero, so at initialisation ``p^s = 0`` and ``h^s = h`` exactly.
    """

    def __init__(self, width: int, reduced_dim: int, dropout: float):
        super().__init__()
        self.conv_in = frame_conv(reduced_dim, reduced_dim, (3, 3, 3))
        self.conv_out = frame_conv(reduced_dim, reduced_dim, (1, 3, 3))
        self.mlp = nn.Sequential(nn.Linear(reduced_dim, reduced_dim), nn.ReLU(), nn.Linear(reduced_dim, width))
        self.dropout = dropout
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, u: torch.Tensor, regions_index: torch.Tensor) -> torch.Tensor:
        """``u`` ``[B, d_r, T, G, G]`` and the regions' patch indices ``[B*T, K_s]`` -> ``p^s`` there.

        ``r p^s`` is zero off the regions, so the Linear layers run at the ``K_s`` regions only: ``N/K_s`` (8 for
        ViT-B/32) times less work and memory than projecting every patch to width ``D``. Returns ``[B*T, K_s, D]``.
        """
        features = self.conv_out(F.relu(self.conv_in(u)))  # [B, d_r, T, G, G]
        features = features.flatten(3).permute(0, 2, 3, 1).flatten(0, 1)  # [B*T, N, d_r]
        index = regions_index.unsqueeze(-1).expand(-1, -1, features.shape[-1])
        p_s = self.mlp(features.gather(1, index))  # [B*T, K_s, D]
        return video_dropout(p_s, u.shape[0], self.dropout, self.training)


class SpatialPrompter(nn.Module):
    """Steps 2-4 of one block: dynamics ``M`` (``N^s``), fusion ``W^s``, regions ``r``, prompts ``p^s`` (``P^s``).

    The reduced tokens ``u = ln_1(h)_patches @ W_u`` (``D -> d_r``) feed both ``N^s`` and ``P^s``.
    """

    def __init__(self, width: int, grid: int, reduced_dim: int, alpha: float, rho: float, dropout: float):
        super().__init__()
        self.grid = grid
        self.alpha = alpha
        # K_s = ceil(rho N) regions per frame, rounded to 6 decimals first: rho = 6/49 of 49 patches is 6, not 7
        self.num_regions = math.ceil(round(rho * grid * grid, 6))
        self.reduce = nn.Linear(width, reduced_dim)  # W_u
        self.dynamics_net = frame_conv(reduced_dim, 1, (3, 3, 3))  # N^s
        self.prompt_net = SpatialPromptNet(width, reduced_dim, dropout)  # P^s

    def forward(
        self, h: torch.Tensor, normed: torch.Tensor, A: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h``, ``normed = ln_1(h)`` ``[B*T, 1+N, D]``, ``A`` ``[B*T, N]`` -> ``(h^s, r, W^s, M)``."""
        reduced = self.reduce(normed)[:, 1:]  # [B*T, N, d_r]; reducing CLS too and dropping it after avoids a copy
        grids = reduced.reshape(batch, -1, self.grid, self.grid, reduced.shape[-1])  # [B, T, G, G, d_r]
        u = grids.permute(0, 4, 1, 2, 3)  # u: [B, d_r, T, G, G]

        M = torch.sigmoid(self.dynamics_net(u)).reshape(A.shape)  # step 2, M = sigmoid(N^s(u)): [B*T, N]
        W_s = self.alpha * A + (1 - self.alpha) * M  # step 3, W^s = alpha A + (1 - alpha) M: [B*T, N]
        top = W_s.detach().topk(self.num_regions, dim=-1).indices  # the regions' patch indices: [B*T, K_s]
        r = torch.zeros_like(W_s, dtype=torch.bool).scatter_(-1, top, True)  # step 3, r: [B*T, N]

        p_s = self.prompt_net(u, top)  # step 4, p^s at the regions: [B*T, K_s, D]
        # r W^s p^s at the regions, where r = 1; W^s keeps N^s trainable through the hard top-K: [B*T, K_s, D]
        prompts = W_s.gather(1, top).unsqueeze(-1) * p_s
        index = (top + 1).unsqueeze(-1).expand(-1, -1, h.shape[-1])  # + 1: CLS comes first
        h_s = h.scatter_add(1, index, prompts.to(h.dtype))  # h^s = h + r W^s p^s on patches: [B*T, 1+N, D]
        return h_s, r, W_s, M


# --------------------------------------------------------------------------- #
# Steps 5-7: inter-frame temporal prompting
# --------------------------------------------------------------------------- #


class TemporalPromptNet(nn.Module):
    """``P^t`` (Figure 2c) at width ``d_r``: Attention -> Conv3d -> ReLU -> Conv3d -> Linear (times ``W^t``) ->
    Dropout, over the reduced differences ``Delta`` ``[B, T-1, N, d_r]`` of each gap.

    - Attention: ``Delta`` plus a learned position embedding ``E``, one head over the ``N`` tokens of each gap, with
      a residual: every token sees the whole change, where content left and where it arrived;
    - Conv3d ``3x3x3`` over ``[T-1, G, G]`` (gaps t-1, t, t+1, edges replicated) -> ReLU -> Conv3d ``1x3x3``: each
      token sees where its neighbours gained and lost content, the direction of motion;
    - Linear: a learned map of a gap's ``N`` tokens to its ``eta`` candidates, then ``d_r -> D``; every candidate is
      scaled by ``W^t_t``, which trains ``N^t``;
    - Dropout.

    The position embedding, the two parameter-free LayerNorms and the initialisation are this project's choices
    (``docs/method.md``, "Choices where the paper is silent").
    """

    def __init__(self, width: int, grid: int, reduced_dim: int, eta: int, dropout: float):
        super().__init__()
        self.grid = grid
        self.position = nn.Parameter(0.02 * torch.randn(grid * grid, reduced_dim))  # E
        self.attention_norm = nn.LayerNorm(reduced_dim, elementwise_affine=False)
        self.attention_in = nn.Linear(reduced_dim, 3 * reduced_dim)
        self.attention_out = nn.Linear(reduced_dim, reduced_dim)
        self.conv_in = frame_conv(reduced_dim, reduced_dim, (3, 3, 3))
        self.conv_out = frame_conv(reduced_dim, reduced_dim, (1, 3, 3))
        self.candidates = nn.Parameter((grid * grid) ** -0.5 * torch.randn(eta, grid * grid))  # N -> eta
        self.out_norm = nn.LayerNorm(reduced_dim, elementwise_affine=False)
        self.out = nn.Linear(reduced_dim, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, delta: torch.Tensor, W_t: torch.Tensor) -> torch.Tensor:
        """``Delta`` ``[B, T-1, N, d_r]`` and ``W^t`` ``[B, T-1]`` -> ``p^t`` ``[B, T-1, eta, D]``."""
        x = delta + self.position  # [B, T-1, N, d_r]
        # one head per gap, pre-norm as in a transformer: query, key, value each [B, T-1, N, d_r]
        query, key, value = self.attention_in(self.attention_norm(x)).chunk(3, dim=-1)
        x = x + self.attention_out(F.scaled_dot_product_attention(query, key, value))
        volume = x.unflatten(2, (self.grid, self.grid)).permute(0, 4, 1, 2, 3)  # [B, d_r, T-1, G, G]
        volume = self.conv_out(F.relu(self.conv_in(volume)))
        candidates = self.candidates @ volume.flatten(3).permute(0, 2, 3, 1)  # [eta, N] @ [B, T-1, N, d_r]
        return self.dropout(self.out(self.out_norm(candidates)) * W_t[..., None, None])  # [B, T-1, eta, D]


class TemporalPrompter(nn.Module):
    """Steps 5-7 of one block: variation ``W^t`` (``N^t``), counts ``n_t``, and prompt candidates ``p^t`` (``P^t``).

    The frame difference ``Delta_t = ln_1(h^s)_{t+1} - ln_1(h^s)_t`` is taken after the bias-free reduction to
    ``d_r`` (the same thing, cheaper). ``N^t`` is a bias-free convolution with a temporal kernel of 1, so a
    ``Conv2d`` over each gap's ``G x G`` grid (``docs/method.md``, "Identical frames").
    """

    def __init__(self, width: int, grid: int, reduced_dim: int, beta: float, eta: int, dropout: float):
        super().__init__()
        self.grid = grid
        self.beta = beta
        self.eta = eta
        self.reduce = nn.Linear(width, reduced_dim, bias=False)
        self.variation_net = nn.Conv2d(reduced_dim, 1, 3, padding=1, bias=False)  # N^t
        self.prompt_net = TemporalPromptNet(width, grid, reduced_dim, eta, dropout)  # P^t

    def forward(
        self, normed: torch.Tensor, r: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ln_1(h^s)`` ``[B*T, 1+N, D]``, ``r`` ``[B*T, N]`` -> ``(p^t, n_t, W^t)``.

        Shapes: ``p^t`` ``[B, T-1, eta, D]``, ``n_t`` and ``W^t`` ``[B, T-1]``.
        """
        reduced = self.reduce(normed)[:, 1:].unflatten(0, (batch, -1))  # [B, T, N, d_r] (CLS reduced, then dropped)
        delta = reduced[:, 1:] - reduced[:, :-1]  # Delta: [B, T-1, N, d_r]
        grids = delta.flatten(0, 1).transpose(1, 2).unflatten(-1, (self.grid, self.grid))  # [B*(T-1), d_r, G, G]
        v = self.variation_net(grids).flatten(1).unflatten(0, (batch, -1))  # N^t(Delta): [B, T-1, N]
        v = v.abs().float()  # step 5, v = |N^t(Delta)|
        r = r.view(batch, -1, r.shape[-1])
        weight = 1 + self.beta * (r[:, 1:] | r[:, :-1]).float()  # 1 + beta r, r of frame t or t+1: [B, T-1, N]
        W_t = torch.tanh((weight * v).sum(-1) / weight.sum(-1))  # step 5, W^t: [B, T-1]
        # step 6, n_t = ceil(eta W^t) without gradient, and 0 where W^t <= tau: the dead zone keeps float noise, which
        # ceil would turn into a whole prompt, from ever becoming one (docs/method.md, "Identical frames")
        n_t = torch.where(W_t > VARIATION_DEAD_ZONE, torch.ceil(self.eta * W_t.detach()), 0).long()  # [B, T-1]
        p_t = self.prompt_net(delta, W_t)  # step 7: [B, T-1, eta, D]
        return p_t, n_t, W_t


# --------------------------------------------------------------------------- #
# Step 8: the prompts inserted between frames, in the frozen block
# --------------------------------------------------------------------------- #


def plain_block(block: ResidualAttentionBlock, h: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """``block(h)`` given ``normed = block.ln_1(h)``: the same operations, so bit-identical to it."""
    h = h + block.attn(normed)
    return h + block.mlp(block.ln_2(h))


def beside_each_frame(
    key: torch.Tensor, value: torch.Tensor, prompt_kv: torch.Tensor, n_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 8's keys: frame t's ``[slot 0, patches_t]`` ``[B*T, H, 1+N, Dh]`` followed by the prompts of gaps t-1
    and t, ``2 eta`` slots, and the key mask ``[B*T, 1, 1, 1+N+2 eta]`` (absent gaps and unreal slots masked)."""
    batch, gaps, slots, _ = prompt_kv.shape
    heads, head_dim = key.shape[1], key.shape[-1]
    prompt_kv = F.pad(prompt_kv, (0, 0, 0, 0, 1, 1))  # [B, T+1, eta, 2D]: an empty gap before and after the video
    beside = torch.cat([prompt_kv[:, :-1], prompt_kv[:, 1:]], dim=2)  # [B, T, 2 eta, 2D]: gaps t-1 and t of frame t
    beside = beside.reshape(batch * (gaps + 1), 2 * slots, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    key = torch.cat([key, beside[0]], dim=2)  # [B*T, H, 1+N+2 eta, Dh]
    value = torch.cat([value, beside[1]], dim=2)
    real = torch.arange(slots, device=n_t.device) < F.pad(n_t, (1, 1))[..., None]  # [B, T+1, eta]: slot < n_t
    real = torch.cat([real[:, :-1], real[:, 1:]], dim=-1).flatten(0, 1)  # [B*T, 2 eta]: gaps t-1 and t of frame t
    key_mask = F.pad(real, (key.shape[2] - 2 * slots, 0), value=True)[:, None, None, :]  # [B*T, 1, 1, 1+N+2 eta]
    return key, value, key_mask


def prompted_block(
    block: ResidualAttentionBlock, h: torch.Tensor, normed: torch.Tensor, prompt_kv: torch.Tensor, n_t: torch.Tensor
) -> torch.Tensor:
    """Step 8 in one block (``readout="mean"``): each frame attends to its own tokens and to the real prompts of the
    gaps beside it.

    ``h`` ``[B*T, 1+N, D]`` the frame tokens (``h^s``), ``normed = block.ln_1(h)``; ``prompt_kv``
    ``[B, T-1, eta, 2D]`` the keys and values of each gap's candidates (``p^t`` projected by the block's key and
    value weights, ``BlockPrompter.forward``), of which the first ``n_t`` ``[B, T-1]`` are real. Frame t's keys and
    values are ``[CLS_t, patches_t, p^t_{t-1}, p^t_t]``; absent gaps (left of the first frame, right of the last)
    and the slots at or past ``n_t`` are masked out. Prompts are keys and values only: they are not queries, skip
    the MLP and are dropped after the block.

    Every gap gets all ``eta`` slots whatever ``n_t`` is, and the key mask marks the real ones (``slot < n_t``): the
    same attention as keeping only the real prompts, with shapes that do not depend on the data (``docs/method.md``,
    "Prompt slots are masked, not cut"). Prompts with no slot (``spatial``, or single frames) run ``plain_block``,
    bit for bit.
    """
    if prompt_kv.shape[2] == 0:
        return plain_block(block, h, normed)
    attn = block.attn
    query, key, value = attn.qkv(normed)  # each [B*T, H, 1+N, Dh]
    key, value, key_mask = beside_each_frame(key, value, prompt_kv, n_t)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)  # [B*T, H, 1+N, Dh]
    h = h + attn.out_proj(out.transpose(1, 2).flatten(2))
    return h + block.mlp(block.ln_2(h))


# --------------------------------------------------------------------------- #
# Step 8 with one video CLS (Figure 2a)
# --------------------------------------------------------------------------- #


def to_video(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Frame layout ``[B*T, *, 1+N, C]`` (the video CLS in slot 0 of every frame) -> one sequence per video,
    ``[B, *, 1+T*N, C]``: the CLS once, then frame 1's patches, frame 2's, ..."""
    x = x.unflatten(0, (batch, -1))  # [B, T, *, 1+N, C]
    patches = x[..., 1:, :].movedim(1, -3).flatten(-3, -2)  # [B, *, T*N, C]
    return torch.cat([x[:, 0, ..., :1, :], patches], dim=-2)


def video_cls_block(
    block: ResidualAttentionBlock,
    h: torch.Tensor,
    normed: torch.Tensor,
    prompt_kv: torch.Tensor,
    n_t: torch.Tensor,
    joint: bool = False,
) -> torch.Tensor:
    """Step 8 in one block with one video CLS (``readout="cls"``), for any block, prompted or not.

    ``h`` ``[B*T, 1+N, D]`` holds the video CLS in slot 0 of every frame; ``normed``, ``prompt_kv``, ``n_t`` as in
    ``prompted_block`` (``prompt_kv`` with 0 slots in an unprompted block). The video CLS is a query over itself, every
    frame's patches and every real prompt of the video, ``1 + T*N + (T-1) eta`` keys (unreal slots masked).
    ``attention="frame"``: frame t's patches attend to ``[CLS, patches_t, p^t_{t-1}, p^t_t]`` as in step 8;
    ``attention="joint"`` (``joint``): they attend to the video CLS's keys too, so every token of the video is in
    one attention, Figure 2a taken literally. The residual, ``out_proj`` and MLP run on one sequence per video, the
    CLS once; it is then copied back into every frame's slot 0. Prompts are keys and values only, as in step 8.

    With one frame and no prompt slot this is the frozen block on that frame: CLIP's own image forward.
    """
    batch, gaps, slots, _ = prompt_kv.shape
    frames, attn = gaps + 1, block.attn
    query, key, value = attn.qkv(normed)  # each [B*T, H, 1+N, Dh]

    heads, head_dim = query.shape[1], query.shape[-1]
    video_kv = prompt_kv.reshape(batch, gaps * slots, 2, heads, head_dim).permute(2, 0, 3, 1, 4)  # [2, B, H, ., Dh]
    video_key = torch.cat([to_video(key, batch), video_kv[0]], dim=2)  # [B, H, 1+T*N+(T-1) eta, Dh]
    video_value = torch.cat([to_video(value, batch), video_kv[1]], dim=2)
    video_mask = None  # [B, 1, 1, 1+T*N+(T-1) eta]: every token, the real prompt slots (slot < n_t)
    if slots > 0:
        real = torch.arange(slots, device=n_t.device) < n_t[..., None]  # [B, T-1, eta]
        video_mask = F.pad(real.flatten(1), (video_key.shape[2] - gaps * slots, 0), value=True)[:, None, None, :]

    if joint:
        out = F.scaled_dot_product_attention(to_video(query, batch), video_key, video_value, attn_mask=video_mask)
    else:
        cls_query = query[::frames, :, :1]  # the video CLS, from the first frame: [B, H, 1, Dh]
        cls_out = F.scaled_dot_product_attention(cls_query, video_key, video_value, attn_mask=video_mask)
        frame_mask = None
        if slots > 0:
            key, value, frame_mask = beside_each_frame(key, value, prompt_kv, n_t)
        patches_out = F.scaled_dot_product_attention(query[:, :, 1:], key, value, attn_mask=frame_mask)
        patches_out = patches_out.unflatten(0, (batch, -1)).transpose(1, 2).flatten(2, 3)  # [B, H, T*N, Dh]
        out = torch.cat([cls_out, patches_out], dim=2)
    # out: [B, H, 1+T*N, Dh]
    x = to_video(h, batch)  # [B, 1+T*N, D]
    x = x + attn.out_proj(out.transpose(1, 2).flatten(2))
    x = x + block.mlp(block.ln_2(x))
    cls = x[:, None, :1].expand(batch, frames, 1, x.shape[-1])  # the CLS copied back into every frame: [B, T, 1, D]
    return torch.cat([cls, x[:, 1:].unflatten(1, (frames, -1))], dim=2).flatten(0, 1)  # [B*T, 1+N, D]


# --------------------------------------------------------------------------- #
# One prompted block, every variant: steps 1-8
# --------------------------------------------------------------------------- #


class BlockPrompter(nn.Module):
    """The trainable modules of one prompted block, and the block's forward pass with them (steps 1-8).

    ``static``: ``eta`` learned tokens, shared by every gap of every video, inserted as in step 8 with
    ``n_t = eta``; a frame's output then depends only on the frame and on how many gaps it has, so the video
    feature cannot see frame order. Like ``P^t``'s prompts they live in ``ln_1``'s output space.
    """

    def __init__(self, config: STOPConfig, width: int, grid: int):
        super().__init__()
        prompt, eta, reduced_dim, dropout = config.prompt, config.eta, config.reduced_dim, config.dropout
        self.eta = eta
        self.readout, self.attention = config.readout, config.attention
        self.spatial = (
            SpatialPrompter(width, grid, reduced_dim, config.alpha, config.rho, dropout)
            if prompt in ("spatial", "stop")
            else None
        )
        self.temporal = (
            TemporalPrompter(width, grid, reduced_dim, config.beta, eta, dropout)
            if prompt in ("temporal", "stop")
            else None
        )
        self.static = nn.Parameter(width**-0.5 * torch.randn(eta, width)) if prompt == "static" else None

    def forward(self, block: ResidualAttentionBlock, h: torch.Tensor, batch: int) -> tuple[torch.Tensor, PromptDetails]:
        """Frame tokens ``h`` ``[B*T, 1+N, D]`` entering ``block`` -> the tokens leaving it, and what was decided."""
        frames_total, length, width = h.shape
        frames, patches = frames_total // batch, length - 1
        normed = block.ln_1(h)
        zeros = h.new_zeros(batch * frames, patches, dtype=torch.float32)
        A, M, W_s, r = zeros, zeros, zeros, torch.zeros_like(zeros, dtype=torch.bool)
        if self.spatial is not None:
            A = cls_attention_map(block, normed, frames if self.readout == "cls" else 1)  # step 1: [B*T, N]
            h, r, W_s, M = self.spatial(h, normed, A, batch)  # steps 2-4: h becomes h^s
            normed = block.ln_1(h)

        W_t = h.new_zeros(batch, frames - 1, dtype=torch.float32)
        n_t = torch.zeros_like(W_t, dtype=torch.long)
        p_t = h.new_zeros(batch, frames - 1, 0, width)
        if self.temporal is not None and frames > 1:
            p_t, n_t, W_t = self.temporal(normed, r, batch)  # steps 5-7
        elif self.static is not None:
            p_t = self.static.expand(batch, frames - 1, -1, -1)
            n_t.fill_(self.eta)
            W_t.fill_(1.0)

        # step 8: the prompts are keys and values of the frozen attention. They already live in the space ln_1 maps
        # to, so the block's key and value weights project them as they are (docs/method.md, "Where prompts live").
        attn = block.attn
        prompt_kv = F.linear(p_t, attn.in_proj_weight[width:], attn.in_proj_bias[width:])  # [B, T-1, eta, 2D]
        if self.readout == "mean":
            h = prompted_block(block, h, normed, prompt_kv, n_t)
        else:
            h = video_cls_block(block, h, normed, prompt_kv, n_t, joint=self.attention == "joint")
        details = PromptDetails(
            *(x.detach().view(batch, frames, patches) for x in (A, M, W_s, r)), variation=W_t.detach(), counts=n_t
        )
        return h, details


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #


class STOPModel(nn.Module):
    """A frozen CLIP video encoder, prompted by STOP or one of its ablations (``STOPConfig.prompt``), read out by one
    video CLS or by the mean of frame features (``STOPConfig.readout``).

    ``grad_checkpoint``: recompute each block in the backward pass while training, to cut activation memory (how
    the model runs, not what it computes: not part of ``STOPConfig``).
    """

    def __init__(self, clip: CLIP, config: STOPConfig | None = None, *, grad_checkpoint: bool = False):
        super().__init__()
        config = config or STOPConfig()
        num_layers = len(clip.visual.transformer.resblocks)
        if config.prompt_layers is not None and config.prompt_layers > num_layers:
            raise ConfigError(
                f"prompt_layers={config.prompt_layers}: expected an integer in 1..{num_layers} (this CLIP's vision "
                "blocks)"
            )
        width = clip.visual.conv1.out_channels
        if config.reduced_dim > width:
            raise ConfigError(f"reduced_dim={config.reduced_dim}: expected at most this CLIP's width, {width}")
        self.clip = clip.requires_grad_(False).eval()
        self.config = config
        self.prompt = config.prompt
        self.grad_checkpoint = grad_checkpoint
        visual = clip.visual
        prompted = 0 if config.prompt == "none" else config.prompt_layers or num_layers
        self.prompters = nn.ModuleList(
            BlockPrompter(config, visual.conv1.out_channels, visual.grid_size) for _ in range(prompted)
        )

    def train(self, mode: bool = True) -> STOPModel:
        """Train the prompt generators; CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    def _unprompted(self, block: ResidualAttentionBlock, h: torch.Tensor, batch: int) -> torch.Tensor:
        """A block without prompt generators: CLIP's own block, or with a video CLS the same block with no prompt."""
        if self.config.readout == "mean":
            return block(h)
        no_prompt = h.new_zeros(batch, h.shape[0] // batch - 1, 0, 2 * h.shape[-1])  # keys and values: [B, T-1, 0, 2D]
        n_t = torch.zeros(no_prompt.shape[:2], dtype=torch.long, device=h.device)
        return video_cls_block(block, h, block.ln_1(h), no_prompt, n_t, joint=self.config.attention == "joint")

    def _run(self, function: Callable, *args):
        """``function(*args)``, recomputed in the backward pass when ``grad_checkpoint`` is on and training.

        A prompted block's whole step is one segment, its prompt generators included: only the tokens entering
        the block are kept. Keeping the generators' activations and recomputing only the frozen attention and
        MLP would also keep what their backward needs (``ln_1(h)``, ``h^s``, ``ln_1(h^s)``: four ``[B*T, 1+N, D]``
        tensors a block instead of one), a higher peak for a step barely shorter. The generators are small;
        recomputing them is cheap.
        """
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def encode_video(
        self, video: torch.Tensor, return_details: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[PromptDetails]]:
        """``video`` ``[B, T, 3, R, R]`` (CLIP-normalised) -> ``[B, E]``, L2-normalised.

        ``readout="cls"``: the video CLS enters as slot 0 of every frame (``visual.embed`` gives every frame the
        same one), goes through every block (``video_cls_block``, prompted or not) and the feature is
        ``ln_post(CLS) @ proj``. ``readout="mean"``: each frame's own CLS gives ``ln_post(CLS_t) @ proj``, and the
        video feature is their mean (meanP). With ``return_details`` also a list, one ``PromptDetails`` per
        prompted block.
        """
        visual = self.clip.visual
        resolution = visual.input_resolution
        if video.dim() != 5 or video.shape[2] != 3 or video.shape[3:] != (resolution, resolution):
            raise ValueError(f"video of shape {tuple(video.shape)}: expected [B, T, 3, {resolution}, {resolution}]")
        batch, frames = video.shape[:2]
        h = visual.embed(video.flatten(0, 1))  # [B*T, 1+N, D]
        details = []
        for index, block in enumerate(visual.transformer.resblocks):
            if index < len(self.prompters):
                h, block_details = self._run(self.prompters[index], block, h, batch)
                details.append(block_details)
            else:
                h = self._run(self._unprompted, block, h, batch)
        if self.config.readout == "cls":
            features = F.normalize(visual.head(h[::frames, 0]), dim=-1)  # the video CLS, from frame 1: [B, E]
        else:
            frame_features = visual.head(h[:, 0]).view(batch, frames, -1)  # [B, T, E]
            features = F.normalize(frame_features.mean(dim=1), dim=-1)  # [B, E]
        return (features, details) if return_details else features

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, context_length]`` -> ``[B, E]``, L2-normalised (frozen text tower)."""
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def similarity(self, video_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Normalised ``[Bv, E]`` and ``[Bt, E]`` -> ``[Bv, Bt]`` logits: ``logit_scale.exp() * cosine``."""
        return self.clip.logit_scale.exp() * video_features @ text_features.t()

    def class_logits(self, video: torch.Tensor, class_text_features: torch.Tensor) -> torch.Tensor:
        """``video`` ``[B, T, 3, R, R]`` and normalised ``[C, E]`` class text features -> ``[B, C]`` logits."""
        return self.similarity(self.encode_video(video), class_text_features)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that train: the prompt generators' (CLIP's are frozen)."""
        return self.prompters.parameters()

    def num_trainable_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.trainable_parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what trains (what a checkpoint stores), keyed as in ``state_dict()``."""
        return self.prompters.state_dict(prefix="prompters.")

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``trainable_state_dict()`` output; a state of another variant or shape raises ``ConfigError``."""
        if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise ConfigError(f"not a trainable state: expected a dict of tensors, got {type(state).__name__}")
        expected = self.trainable_state_dict()
        problems = [
            *(f"missing {key}" for key in sorted(expected.keys() - state.keys())),
            *(f"unexpected {key}" for key in sorted(state.keys() - expected.keys())),
            *(
                f"{key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
                for key in sorted(expected.keys() & state.keys())
                if state[key].shape != expected[key].shape
            ),
        ]
        if problems:
            listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ConfigError(f"not a trainable state of this STOPModel({self.extra_repr()}): {listed}")
        self.prompters.load_state_dict({key.removeprefix("prompters."): value for key, value in state.items()})

    def extra_repr(self) -> str:
        settings = ", ".join(f"{name}={value!r}" for name, value in asdict(self.config).items())
        return f"{settings}, trainable parameters={self.num_trainable_parameters():,}"

    def __repr__(self) -> str:
        """The settings, the trainable count and the prompt generators; CLIP in one line."""
        visual = self.clip.visual
        clip_summary = (
            f"frozen CLIP ViT (layers={len(visual.transformer.resblocks)}, width={visual.conv1.out_channels}, "
            f"patch={visual.patch_size}, resolution={visual.input_resolution}), "
            f"{sum(p.numel() for p in self.clip.parameters()):,} parameters"
        )
        prompters = textwrap.indent(repr(self.prompters), "  ").lstrip()
        return f"STOPModel(\n  {self.extra_repr()}\n  (clip): {clip_summary}\n  (prompters): {prompters}\n)"


# --------------------------------------------------------------------------- #
# The recognition classifier: each class name as a text, through the frozen text tower
# --------------------------------------------------------------------------- #

CLASS_TEMPLATES = {"ssv2": "a video of {}.", "synthetic": "a video of a shape {}."}  # SSv2's names hold "something"
DEFAULT_CLASS_TEMPLATE = "a video of a person {}."


def class_texts(dataset: str, classes: list[str]) -> list[str]:
    """The text of each class: ``"a video of a person apply eye makeup."`` for UCF101's ``ApplyEyeMakeup``."""
    return [CLASS_TEMPLATES.get(dataset, DEFAULT_CLASS_TEMPLATE).format(name) for name in classes]


@torch.no_grad()
def text_features(model: STOPModel, tokenize: Callable, texts: list[str], device: torch.device) -> torch.Tensor:
    """``[len(texts), E]``, L2-normalised, in batches of 256: the classifier's weights (one row per class), computed
    once since the text tower is frozen, or a test set's captions."""
    return torch.cat([model.encode_text(tokenize(texts[i : i + 256]).to(device)) for i in range(0, len(texts), 256)])
