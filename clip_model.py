"""CLIP from scratch: the frozen backbone STOP prompts.

STOP (CVPR 2025) adapts a *frozen* CLIP (Radford et al., 2021) to video. This
file is that CLIP, in plain PyTorch, loading OpenAI's released checkpoints
unchanged:

- ``VisionTransformer``: the image tower. A frame ``[3, R, R]`` is cut into a
  ``G x G`` grid of ``P x P`` patches (``N = G*G``), embedded by a strided
  convolution, prefixed by a learned CLS token, and passed through ``L``
  residual attention blocks. STOP inserts its prompts between these blocks,
  so each block is exposed on its own (``visual.transformer.resblocks``).
- ``TextTransformer`` parts (token embedding, causal blocks, ``ln_final``):
  the text tower, whose end-of-text token is the sentence feature.
- ``tokenize``: OpenAI's byte-level BPE, id for id (``clip_tokenizer.py``, as OpenAI's
  ``simple_tokenizer.py``).
- ``load``: a model name or file -> its tensors -> ``build_model``, which infers
  the architecture from the tensors' shapes. Finding, downloading and safely
  reading OpenAI's files (``ViT-B-32.pt`` ...) lives in ``clip_weights.py``.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention``.
Weights load in fp32; mixed precision is autocast's job, and ``convert_matmul_weights`` stores the frozen
matrix weights in the autocast dtype once, so that autocast does not cast them again at every forward.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loading.clip_tokenizer import Tokenizer as Tokenizer  # re-exported: the text side of CLIP's public names
from loading.clip_tokenizer import tokenize as tokenize
from loading.clip_weights import (
    MODEL_SHA256 as MODEL_SHA256,  # re-exported: runtime.py records the checksum of the weights
)
from loading.clip_weights import available_models, checkpoint_path, read_state_dict
from loading.clip_weights import file_sha256 as file_sha256  # re-exported, as MODEL_SHA256
from loading.errors import CLIPLoadError

# --------------------------------------------------------------------------- #
# Architecture
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class CLIPConfig:
    """Every shape of a ViT CLIP; ``from_state_dict`` reads them off the tensors."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> CLIPConfig:
        if "visual.proj" not in state_dict:
            if any(key.startswith(("visual.layer1", "visual.attnpool")) for key in state_dict):
                raise CLIPLoadError(
                    "this is a ResNet CLIP checkpoint; STOP prompts the patch tokens of a "
                    f"Vision Transformer, so use one of {available_models()}"
                )
            raise CLIPLoadError("no 'visual.proj' tensor: not a CLIP ViT checkpoint")

        def layers(prefix: str) -> int:
            return len({key.split(".")[prefix.count(".")] for key in state_dict if key.startswith(prefix)})

        patch_size = state_dict["visual.conv1.weight"].shape[-1]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        text_width = state_dict["ln_final.weight"].shape[0]
        return cls(
            embed_dim=state_dict["text_projection"].shape[1],
            image_resolution=patch_size * grid,
            vision_layers=layers("visual.transformer.resblocks."),
            vision_width=state_dict["visual.conv1.weight"].shape[0],
            vision_patch_size=patch_size,
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            transformer_width=text_width,
            transformer_heads=text_width // 64,
            transformer_layers=layers("transformer.resblocks."),
        )


class _QuickGELUFunction(torch.autograd.Function):
    """``x * sigmoid(1.702 x)`` keeping only ``x`` for the backward pass, which recomputes the sigmoid.

    Autograd through the three plain operations keeps both ``x`` and ``sigmoid(1.702 x)``: two tensors the size
    of the MLP's hidden activation ``[B, L, 4D]``, the widest of a block. One is enough: recomputing the sigmoid
    in the backward pass costs little beside the memory it saves (``docs/performance.md``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (1.702 * x).sigmoid_().mul_(x)  # one new tensor, where x * torch.sigmoid(1.702 * x) makes three

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        gate = (1.702 * x).sigmoid_()  # s
        return grad * gate * (1 + 1.702 * x * (1 - gate))  # d/dx x s(1.702 x) = s (1 + 1.702 x (1 - s))


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``; its weights expect it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuickGELUFunction.apply(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (OpenAI's key names)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values of ``x [B, L, D]``, each ``[B, heads, L, D/heads]``."""
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``x [B, L, D]``; ``attn_mask`` boolean, True where attending is allowed, broadcast to ``[B, h, L, L]``."""
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # [B, h, L, Dh]
        return self.out_proj(out.transpose(1, 2).flatten(2))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, is_causal=is_causal)
        return x


def patch_embedding_as_matmul(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``conv2d(images, kernel, stride=P)`` as patch tokens, by one matrix product: ``[B, 3, R, R]`` -> ``[B, N, D]``.

    ``kernel`` is ``[D, 3, P, P]``; the grid is ``G = R / P`` and ``N = G * G``, in the convolution's row-major order.
    """
    batch, channels, resolution = images.shape[:3]
    patch = kernel.shape[-1]
    grid = resolution // patch
    # [B, 3, G, P, G, P] -> [B, G, G, 3, P, P] -> [B, N, 3 P P], each patch's pixels in the kernel's order
    pixels = images.reshape(batch, channels, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
    return F.linear(pixels.reshape(batch, grid * grid, -1), kernel.flatten(1))


class VisionTransformer(nn.Module):
    """CLIP's image tower: patches + CLS -> ``L`` blocks -> ``ln_post(CLS) @ proj``."""

    def __init__(self, resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = resolution
        self.patch_size = patch_size
        self.grid_size = resolution // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, R, R]`` -> the tokens entering block 0, ``[B, 1+N, D]`` (CLS first).

        The patch embedding ``conv1`` is a ``P x P`` convolution with stride ``P``: each output is one patch's
        ``3 P P`` pixels times the kernel. On CUDA it is computed as exactly that, one matrix product of the
        cut-out patches with the flattened kernel, which runs at matmul speed where cuDNN's strided convolution
        does not. On the CPU the convolution is the faster of the two and sums in the order of OpenAI's
        reference, so it stays.
        """
        if images.device.type == "cuda":
            patches = patch_embedding_as_matmul(images, self.conv1.weight)  # [B, N, D]
        else:
            patches = self.conv1(images).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # [B, 1, D]
        tokens = torch.cat([cls, patches], dim=1) + self.positional_embedding.to(patches.dtype)
        return self.ln_pre(tokens)

    def head(self, cls_token: torch.Tensor) -> torch.Tensor:
        """CLS token after the last block ``[..., D]`` -> image feature ``[..., E]``."""
        return self.ln_post(cls_token) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.embed(images))[:, 0])


class CLIP(nn.Module):
    """The two towers and the learned temperature ``logit_scale`` (stored as its log)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.context_length = config.context_length
        self.visual = VisionTransformer(
            config.image_resolution,
            config.vision_patch_size,
            config.vision_width,
            config.vision_layers,
            config.vision_width // 64,  # heads: OpenAI's convention, 64 channels each
            config.embed_dim,
        )
        self.transformer = Transformer(config.transformer_width, config.transformer_layers, config.transformer_heads)
        self.token_embedding = nn.Embedding(config.vocab_size, config.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.transformer_width))
        self.ln_final = nn.LayerNorm(config.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(config.transformer_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())
        self._initialize_parameters()

    def _initialize_parameters(self) -> None:
        """OpenAI's initialisation, so a randomly built CLIP behaves like an untrained one."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            width, layers = tower.width, len(tower.resblocks)
            proj_std, attn_std, fc_std = (width**-0.5) * ((2 * layers) ** -0.5), width**-0.5, (2 * width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, R, R]`` (CLIP-normalised) -> ``[B, E]``, not normalised."""
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, context_length]`` -> ``[B, E]``: the end-of-text token's feature."""
        # [B, C, D]; C may be shorter than context_length: under the causal mask, padding after EOT changes nothing
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x, is_causal=True))
        end_of_text = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # EOT has the largest id
        return end_of_text @ self.text_projection

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image [B_i, B_t], logits_per_text [B_t, B_i])``: scaled cosine similarities."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_model(state_dict: dict[str, torch.Tensor]) -> CLIP:
    """A fp32 CLIP shaped by, and holding, ``state_dict`` (OpenAI's key layout)."""
    config = CLIPConfig.from_state_dict(state_dict)
    model = CLIP(config)
    extra = ("input_resolution", "context_length", "vocab_size")  # constants TorchScript archives carry
    weights = {key: value.float() for key, value in state_dict.items() if key not in extra}
    missing, unexpected = (
        sorted(model.state_dict().keys() - weights.keys()),
        sorted(weights.keys() - model.state_dict().keys()),
    )
    if missing or unexpected:
        raise CLIPLoadError(f"the tensors do not form a CLIP ViT: missing {missing[:4]}, unexpected {unexpected[:4]}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CLIPLoadError(f"the tensors do not form a CLIP ViT: {' '.join(str(error).split())}") from None
    return model.eval()


def load(
    name_or_path: str | os.PathLike, device: str | torch.device = "cpu", download_root: str | os.PathLike | None = None
) -> CLIP:
    """A CLIP ViT from a known name (``clip_weights.available_models()``) or a checkpoint path, fp32, in eval mode."""
    path = checkpoint_path(name_or_path, download_root)
    state_dict = read_state_dict(path)  # its errors name the file
    try:
        model = build_model(state_dict)
    except CLIPLoadError as error:
        raise CLIPLoadError(f"{path}: {error}") from None
    return model.to(device)


def convert_matmul_weights(model: CLIP, dtype: torch.dtype) -> CLIP:
    """Store the weights of ``model``'s matrix products in ``dtype`` (bf16 or fp16), once; returns ``model``.

    Under autocast a matrix product casts an fp32 weight to the low precision at every call, and it caches the
    cast only for weights that train: a frozen CLIP would be cast again at every forward, one copy kernel per
    weight and call. So, as OpenAI's own ``convert_weights`` does for fp16,
    the linear layers, the patch embedding, the attention in-projections and the two output projections are kept
    in ``dtype``; LayerNorms, embeddings and ``logit_scale`` stay fp32 (autocast runs LayerNorm in fp32 anyway,
    and ``exp(logit_scale)`` in bf16 would be off by up to 2 %).
    """
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.to(dtype)
        elif isinstance(module, SelfAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.to(dtype)
            module.in_proj_bias.data = module.in_proj_bias.data.to(dtype)
    for projection in (model.visual.proj, model.text_projection):
        projection.data = projection.data.to(dtype)
    return model


def random_clip(config: CLIPConfig, seed: int = 0) -> CLIP:
    """A randomly initialised CLIP with ``config``'s shapes: for tests, benchmarks and the synthetic demo."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(config).eval()


def byte_tokenize(texts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """Tokens for a randomly initialised CLIP with a 258-entry vocabulary (the demo's), which needs no BPE file.

    The text in lower case with its whitespace collapsed, as UTF-8 bytes: the ids 0-255; ``<sot>`` is 256 and
    ``<eot>`` 257, the largest id, so ``encode_text`` finds it by ``argmax`` exactly as with BPE. Too long a text
    is truncated and still ends with ``<eot>``.
    """
    texts = [texts] if isinstance(texts, str) else texts
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [256, *" ".join(text.lower().split()).encode("utf-8")][: context_length - 1] + [257]
        result[row, : len(ids)] = torch.tensor(ids)
    return result


# The shapes of OpenAI's released ViTs, for random stand-ins in tests and benchmarks (``load`` reads shapes
# off the checkpoint, never from here).
VIT_B_32 = CLIPConfig(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)
VIT_B_16 = CLIPConfig(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
VIT_L_14 = CLIPConfig(768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12)
VIT_L_14_336 = CLIPConfig(768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12)
