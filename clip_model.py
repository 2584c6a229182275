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
- ``Tokenizer`` / ``tokenize``: OpenAI's byte-level BPE, id for id, over OpenAI's vocabulary
  shipped beside this file.
- ``load``: reads TorchScript archives (OpenAI's ``ViT-B-32.pt`` ...) as data,
  running none of their code, or plain state dicts, infers the architecture
  from the tensors' shapes, downloads known models with a SHA256 check.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention``.
Weights load in fp32; mixed precision is autocast's job, and ``convert_matmul_weights`` stores the frozen
matrix weights in the autocast dtype once, so that autocast does not cast them again at every forward.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import html
import io
import os
import pickle
import re as stdlib_re
import sys
import urllib.error
import urllib.request
import uuid
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

try:
    import fcntl  # POSIX file locks, for concurrent downloads
except ImportError:  # Windows: downloads still land atomically, but may be repeated
    fcntl = None

_OPENAI_MODELS = "https://openaipublic.azureedge.net/clip/models"
# The SHA256 of each file is part of OpenAI's published URL.
MODEL_SHA256 = {
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L/14@336px": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}
MODEL_FILES = {name: name.replace("/", "-").replace("@", "-") + ".pt" for name in MODEL_SHA256}  # "ViT-B-32.pt"
MODEL_URLS = {name: f"{_OPENAI_MODELS}/{sha}/{MODEL_FILES[name]}" for name, sha in MODEL_SHA256.items()}
RESNET_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_URL = f"https://github.com/openai/CLIP/raw/main/clip/{VOCAB_FILE}"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
PACKAGED_VOCAB = Path(__file__).resolve().parent / VOCAB_FILE  # shipped beside this file, as in OpenAI's package


class CLIPLoadError(Exception):
    """A checkpoint or vocabulary that cannot be found, fetched or read."""


def available_models() -> list[str]:
    """The names ``load`` downloads: OpenAI's ViT checkpoints."""
    return list(MODEL_URLS)


def default_download_root() -> Path:
    """``$XDG_CACHE_HOME/clip``, else ``~/.cache/clip``: where OpenAI's ``clip.load`` looks."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "clip"


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

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64  # OpenAI's convention: 64 channels per head

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
    of the MLP's hidden activation ``[B, L, 4D]``, the widest of a block. One is enough: for a ViT-B/32 video
    batch of 2 x 12 frames that is 169 MiB less at the training peak, for the same step time (measured).
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
        does not (1.7 ms a call for ViT-B/32 at batch 16 x 12 frames in bf16 on an H100). On the CPU the
        convolution is the faster of the two (88 against 104 ms for 24 frames of ViT-B/32, measured on 2 cores)
        and sums in the order of OpenAI's reference, so it stays.
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
            config.vision_heads,
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


# --------------------------------------------------------------------------- #
# Checkpoints: download, verify, read
# --------------------------------------------------------------------------- #


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``target`` once, however many processes ask at the same time; only a verified file lands.

    Under torchrun every rank asks for the same files on first use. An exclusive ``flock`` on the download folder
    itself (a lock on its directory descriptor: no lock file is left behind) lets one process download while the
    others wait, then find the verified file and reuse it. The download goes to a temporary file of its own in the
    same folder and is renamed onto ``target`` (atomic on one file system), so ``target`` is never half written,
    even where ``flock`` is not available (no ``fcntl``) or not honoured (some network file systems).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _folder_locked(target.parent):
        if target.is_file():
            if file_sha256(target) == sha256:
                return target
            warnings.warn(f"{target} does not match its SHA256 checksum; downloading it again", stacklevel=3)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
        try:
            try:
                with urllib.request.urlopen(url, timeout=60) as source, open(partial, "xb") as sink:
                    total = int(source.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as progress:
                        for chunk in iter(lambda: source.read(1 << 20), b""):
                            sink.write(chunk)
                            progress.update(len(chunk))
            except (urllib.error.URLError, OSError) as error:
                raise CLIPLoadError(
                    f"could not download {url} ({getattr(error, 'reason', error)}). "
                    f"Without network access, place the file at {target} (SHA256 {sha256})."
                ) from None
            if file_sha256(partial) != sha256:
                raise CLIPLoadError(f"{url} downloaded, but its SHA256 is not {sha256}; nothing was kept. Try again.")
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (shared by processes, released at exit or death); no-op without it."""
    if fcntl is None:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def checkpoint_path(name_or_path: str | os.PathLike, download_root: str | os.PathLike | None = None) -> Path:
    """The local file for a model name (downloaded and verified if needed) or a path."""
    name = str(name_or_path)
    if name in MODEL_URLS:
        root = Path(download_root) if download_root else default_download_root()
        return _download(MODEL_URLS[name], root / MODEL_FILES[name], MODEL_SHA256[name])
    if name in RESNET_MODELS:
        raise CLIPLoadError(
            f"{name} is a ResNet CLIP; STOP prompts the patch tokens of a Vision Transformer, "
            f"so use one of {available_models()}"
        )
    path = Path(name).expanduser()
    if not path.is_file():
        raise CLIPLoadError(f"{name}: no such file, and not a known model name; known: {available_models()}")
    return path


# TorchScript archives (OpenAI's released ``.pt`` files) are zip files laid out as ``NAME/data.pkl`` (the module
# tree, pickled), ``NAME/data/KEY`` (one raw storage per KEY), ``NAME/code/`` (the TorchScript source) and
# ``NAME/constants.pkl``. ``torch.jit.load`` would compile and run that source (a module's ``__setstate__`` runs while
# loading), so it is never called: ``data.pkl`` is unpickled as data by a restricted unpickler that knows only what
# a tree of modules holding tensors needs, and the tensors are cut out of the raw storages. Nothing is executed.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptModuleRecord:
    """A pickled TorchScript module (a ``__torch__.*`` class) as plain data: its attributes, no methods, no code.

    The pickle creates it empty (``NEWOBJ``) and hands it its attributes (``BUILD``): parameters and buffers
    (tensors), submodules (records), flags such as ``training``.
    """

    def __init__(self) -> None:
        self.attributes: dict[str, object] = {}

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not all(isinstance(name, str) for name in state):
            raise pickle.UnpicklingError(
                f"a module's pickled state is a {type(state).__name__}, not its named attributes "
                "(a custom __getstate__, which only running the archive's code could undo)"
            )
        self.attributes = state


def _rebuild_tensor(
    storage: torch.Tensor,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: dict,
    metadata: object = None,
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2``'s arguments -> a view of ``storage`` (1-D, already typed), checked."""
    shape_ok = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
    if not (shape_ok and all(type(n) is int for n in (offset, *size, *stride))):
        raise pickle.UnpicklingError(f"a tensor record with a malformed shape: size {size!r}, stride {stride!r}")
    if not isinstance(storage, torch.Tensor) or backward_hooks or metadata:
        raise pickle.UnpicklingError("a tensor record with something other than a storage, or with hooks")
    return storage.as_strided(size, stride, offset)  # raises when the view reaches past the storage


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's ``data.pkl``, admitting only the globals a tree of modules of tensors uses.

    ``__torch__.*`` classes become ``_ScriptModuleRecord``s, ``torch.*Storage`` names their dtype, a tensor is
    ``torch._utils._rebuild_tensor_v2`` over a storage record (``persistent_load``), its (empty) hooks a
    ``collections.OrderedDict``. Any other global ends unpickling before it is looked up.
    """

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptModuleRecord
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CLIP checkpoint has no use for")

    def persistent_load(self, record: object) -> torch.Tensor:
        """``("storage", dtype, key, location, numel)`` -> the raw bytes of ``NAME/data/KEY`` as a 1-D tensor."""
        if not (
            isinstance(record, tuple)
            and len(record) == 5
            and record[0] == "storage"
            and isinstance(record[1], torch.dtype)
            and isinstance(record[2], str)
            and type(record[4]) is int
            and record[4] >= 0
        ):
            raise pickle.UnpicklingError(f"an unknown storage record {record!r:.100}")
        _, dtype, key, _location, numel = record
        if key not in self.storages:
            name = f"{self.prefix}/data/{key}"
            try:
                entry = self.archive.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"the storage {name} is missing") from None
            if entry.file_size != numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"the storage {name} holds {entry.file_size} bytes, not {numel} {dtype}")
            raw = bytearray(entry.file_size)
            with self.archive.open(entry) as file:  # checks the CRC at the end
                if file.readinto(raw) != len(raw):
                    raise pickle.UnpicklingError(f"the storage {name} is truncated")
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        storage = self.storages[key]
        if storage.dtype != dtype:
            raise pickle.UnpicklingError(f"the storage {key} is read as both {storage.dtype} and {dtype}")
        return storage


def _read_torchscript_archive(archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, keyed as ``module.state_dict()`` keys them.

    OpenAI's archives were made by ``torch.jit.trace``, whose modules hold tensors only as parameters and buffers
    (a traced computation's other tensors are constants in ``constants.pkl``), so every tensor attribute in the
    module tree is one entry of the state dict.
    """
    pickles = [name for name in archive.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise pickle.UnpicklingError(f"expected one NAME/data.pkl in the archive, found {pickles[:4]}")
    prefix = pickles[0].removesuffix("/data.pkl")
    names = set(archive.namelist())
    byteorder_file = f"{prefix}/byteorder"  # absent in older archives, which are little-endian
    byteorder = archive.read(byteorder_file).decode(errors="replace") if byteorder_file in names else "little"
    if byteorder != sys.byteorder:
        raise pickle.UnpicklingError(f"its tensors are {byteorder!r}-endian, this machine is {sys.byteorder}-endian")
    for name in archive.namelist():
        if name.startswith(f"{prefix}/code/") and stdlib_re.search(rb"\bdef\s+__setstate__\b", archive.read(name)):
            raise pickle.UnpicklingError(
                f"{name} defines __setstate__: its modules are rebuilt by running the archive's code, "
                "which this loader never does (OpenAI's archives have none)"
            )
    root = _ArchiveUnpickler(archive, prefix).load()
    if not isinstance(root, _ScriptModuleRecord):
        raise pickle.UnpicklingError(f"data.pkl holds a {type(root).__name__}, not a module")
    state_dict: dict[str, torch.Tensor] = {}
    pending, seen = [("", root)], set()
    while pending:  # depth first over the module tree, as nn.Module.state_dict walks it
        key_prefix, module = pending.pop()
        if id(module) in seen:
            raise pickle.UnpicklingError("a module appears twice in the module tree")
        seen.add(id(module))
        submodules = []
        for name, value in getattr(module, "attributes", {}).items():  # a module never BUILT has none
            if isinstance(value, torch.Tensor):
                state_dict[key_prefix + name] = value
            elif isinstance(value, _ScriptModuleRecord):
                submodules.append((f"{key_prefix}{name}.", value))
        pending.extend(reversed(submodules))
    return state_dict


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a TorchScript archive (OpenAI's format, read as data) or of a plain ``torch.save``-d state dict.

    Neither path runs code from the file: the archive goes through ``_ArchiveUnpickler``, a state dict through
    ``torch.load(weights_only=True)``. Errors name ``path``.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            is_torchscript = any(entry.endswith("/constants.pkl") for entry in archive.namelist())
            if is_torchscript:
                state_dict = _read_torchscript_archive(archive)
    except pickle.UnpicklingError as error:
        raise CLIPLoadError(f"{path}: refused as a TorchScript archive: {error}") from None
    except (zipfile.BadZipFile, OSError):
        is_torchscript = False  # a legacy (non-zip) torch.save file, or a damaged one: torch.load decides
    except Exception as error:  # a damaged archive: bad CRC, a storage too small for its tensors, ...
        raise CLIPLoadError(f"{path}: cannot be read as a CLIP checkpoint (truncated or corrupt?): {error}") from None
    if not is_torchscript:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CLIPLoadError(
                f"{path}: cannot be read as a CLIP checkpoint (truncated or corrupt?): {error}"
            ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CLIPLoadError(f"{path}: holds a {type(state_dict).__name__}, not a state dict of tensors")
    return state_dict


def load(
    name_or_path: str | os.PathLike, device: str | torch.device = "cpu", download_root: str | os.PathLike | None = None
) -> CLIP:
    """A CLIP ViT from a known name (see ``available_models``) or a checkpoint path, fp32, in eval mode."""
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
    cast only for weights that train: a frozen CLIP would be cast again at every forward (1,385 copy kernels in
    one ViT-B/32 STOP training step, measured on an H100). So, as OpenAI's own ``convert_weights`` does for fp16,
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


# The shapes of OpenAI's released ViTs, for random stand-ins in tests and benchmarks (``load`` reads shapes
# off the checkpoint, never from here).
VIT_B_32 = CLIPConfig(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)
VIT_B_16 = CLIPConfig(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
VIT_L_14 = CLIPConfig(768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12)
VIT_L_14_336 = CLIPConfig(768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12)


# --------------------------------------------------------------------------- #
# Tokenizer: byte-level BPE, as OpenAI's
# --------------------------------------------------------------------------- #


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """Each byte as a printable character: printable Latin-1 maps to itself, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _clean(text: str) -> str:
    """ftfy fixes, HTML entities unescaped (twice, as OpenAI does), whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return stdlib_re.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    """Byte-level BPE over a 49,152-entry vocabulary, giving OpenAI's ids exactly."""

    SPECIALS = ("<|startoftext|>", "<|endoftext|>")
    PATTERN = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )

    def __init__(self, vocab_path: str | os.PathLike):
        with gzip.open(vocab_path, "rt", encoding="utf-8") as file:
            merges = [tuple(line.split()) for line in file.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(self.SPECIALS)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.sot_token, self.eot_token = (self.encoder[s] for s in self.SPECIALS)
        self._cache = {s: s for s in self.SPECIALS}

    def _bpe(self, word: str) -> str:
        """Merge the symbols of one pre-token, lowest-ranked pair first; space-separated result."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = " ".join(symbols)
        return self._cache[word]

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.PATTERN.findall(_clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(piece).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")


def vocab_path(download_root: str | os.PathLike | None = None) -> Path:
    """The BPE vocabulary: the copy shipped beside this file, so tokenising needs no network.

    Where that copy is absent or fails its SHA256, the one in ``download_root`` (default
    ``default_download_root()``) is used, fetched from OpenAI and verified when absent there too.
    """
    if PACKAGED_VOCAB.is_file():
        if file_sha256(PACKAGED_VOCAB) == VOCAB_SHA256:
            return PACKAGED_VOCAB
        warnings.warn(f"{PACKAGED_VOCAB} does not match its SHA256 checksum; using the download root", stacklevel=2)
    root = Path(download_root) if download_root else default_download_root()
    return _download(VOCAB_URL, root / VOCAB_FILE, VOCAB_SHA256)


@lru_cache
def _tokenizer(download_root: str | None) -> Tokenizer:
    return Tokenizer(vocab_path(download_root))


def tokenize(
    texts: str | list[str], context_length: int = 77, truncate: bool = False, download_root: str | None = None
) -> torch.Tensor:
    """``[len(texts), context_length]`` int64: ``<sot> ids <eot>`` then zeros, as ``clip.tokenize``.

    A text too long for ``context_length`` raises ``ValueError`` unless ``truncate``, which keeps the
    first ``context_length`` ids and ends them with ``<eot>``.
    """
    tokenizer = _tokenizer(download_root)
    texts = [texts] if isinstance(texts, str) else texts
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tokenizer.sot_token, *tokenizer.encode(text), tokenizer.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"{text!r} is {len(ids)} tokens, longer than the context length {context_length}")
            ids = [*ids[: context_length - 1], tokenizer.eot_token]
        result[row, : len(ids)] = torch.tensor(ids)
    return result


def byte_tokenize(texts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """Tokens for a randomly initialised CLIP with a 258-entry vocabulary, which needs no BPE file.

    UTF-8 bytes are the ids 0-255, ``<sot>`` is 256 and ``<eot>`` 257, the largest id, so ``encode_text``
    finds it by ``argmax`` exactly as with BPE. Too long a text is truncated and still ends with ``<eot>``.
    """
    texts = [texts] if isinstance(texts, str) else texts
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [256, *_clean(text).encode("utf-8")][: context_length - 1] + [257]
        result[row, : len(ids)] = torch.tensor(ids)
    return result
