"""Where OpenAI's CLIP weight files come from, and how they are read without running their code.

Machinery a learner may skip: ``clip_model.load`` needs only ``checkpoint_path`` (a name or path -> a local file)
and ``read_state_dict`` (a file -> its tensors), and the tokenizer only ``vocab_path``.

- ``checkpoint_path``: a known name (``available_models()``) is downloaded once into ``default_download_root()``,
  the folder OpenAI's ``clip.load`` uses, checked against the SHA256 in OpenAI's URL; processes that ask at the
  same time take turns on a lock on that folder. A path is used as it is.
- ``read_state_dict``: OpenAI's TorchScript archives are read as data by a restricted unpickler (nothing in them
  is compiled or run); plain state dicts go through ``torch.load(weights_only=True)``.
- ``vocab_path``: the BPE vocabulary shipped beside this file, downloaded and checked only where it is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import sys
import urllib.error
import urllib.request
import uuid
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from loading.errors import CLIPLoadError

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


def available_models() -> list[str]:
    """The names ``clip_model.load`` downloads: OpenAI's ViT checkpoints."""
    return list(MODEL_URLS)


def default_download_root() -> Path:
    """``$XDG_CACHE_HOME/clip``, else ``~/.cache/clip``: where OpenAI's ``clip.load`` looks."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "clip"


# --------------------------------------------------------------------------- #
# Download and verify
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


# --------------------------------------------------------------------------- #
# Read a checkpoint as data
# --------------------------------------------------------------------------- #


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
        if name.startswith(f"{prefix}/code/") and re.search(rb"\bdef\s+__setstate__\b", archive.read(name)):
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
