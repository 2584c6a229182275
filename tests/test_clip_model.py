"""clip_model.py against OpenAI's reference outputs, plus loading (clip_weights.py), shapes and every bad input."""

import hashlib
import http.server
import json
import multiprocessing
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import clip_model
from clip_model import CLIPConfig, CLIPLoadError
from loading import clip_tokenizer, clip_weights

TINY = CLIPConfig(16, 32, 2, 64, 16, 77, 49408, 64, 1, 1)
SHIPPED_VOCAB = clip_weights.PACKAGED_VOCAB  # OpenAI's vocabulary beside the code, whatever a test patches


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def tokenizer_cases(golden: Path) -> list[dict]:
    return json.loads((golden / "tokenizer_cases.json").read_text())["cases"]


def test_bpe_ids_match_openai_for_every_case(tokenizer_cases):
    tokenizer = clip_model.Tokenizer(clip_weights.PACKAGED_VOCAB)
    mismatches = [case["text"] for case in tokenizer_cases if tokenizer.encode(case["text"]) != case["bpe_ids"]]
    assert mismatches == []
    assert len(tokenizer_cases) >= 50


def test_decode_matches_openai(tokenizer_cases):
    tokenizer = clip_model.Tokenizer(clip_weights.PACKAGED_VOCAB)
    for case in tokenizer_cases:
        assert tokenizer.decode(case["bpe_ids"]) == case["decoded"], case["text"]


def test_tokenize_truncate_matches_clip_tokenize(tokenizer_cases):
    tokens = clip_model.tokenize([c["text"] for c in tokenizer_cases], truncate=True)
    expected = torch.tensor([c["tokenize_77_truncate"] for c in tokenizer_cases])
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, expected)


def test_tokenize_refuses_too_long_text_without_truncate(tokenizer_cases):
    long_text = max((c["text"] for c in tokenizer_cases), key=lambda t: len(t))
    with pytest.raises(ValueError, match="longer than the context length 77"):
        clip_model.tokenize(long_text)


@pytest.fixture
def no_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the vocabulary must be read without a download")

    monkeypatch.setattr(clip_weights.urllib.request, "urlopen", refuse)


@pytest.fixture
def fresh_tokenizer() -> Iterator[None]:
    """``tokenize`` looks for its vocabulary again, and the next test does too."""
    clip_tokenizer._tokenizer.cache_clear()
    yield
    clip_tokenizer._tokenizer.cache_clear()


def test_shipped_vocabulary_is_used_offline(no_network, fresh_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert clip_weights.PACKAGED_VOCAB == Path(clip_weights.__file__).resolve().parent / clip_weights.VOCAB_FILE
    assert clip_weights.vocab_path() == clip_weights.PACKAGED_VOCAB
    assert clip_model.tokenize("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing cached


def test_vocabulary_found_in_download_root_without_network(no_network, tmp_path, monkeypatch):
    monkeypatch.setattr(clip_weights, "PACKAGED_VOCAB", tmp_path / "package" / clip_weights.VOCAB_FILE)  # absent
    shutil.copy(SHIPPED_VOCAB, tmp_path / clip_weights.VOCAB_FILE)
    assert clip_weights.vocab_path(tmp_path) == tmp_path / clip_weights.VOCAB_FILE


def test_missing_shipped_vocabulary_is_downloaded_to_the_cache(fresh_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(clip_weights, "PACKAGED_VOCAB", tmp_path / "package" / clip_weights.VOCAB_FILE)  # absent
    monkeypatch.setattr(clip_weights, "VOCAB_URL", SHIPPED_VOCAB.as_uri())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tokens = clip_model.tokenize("a photo of a cat")
    cached = tmp_path / "cache" / "clip" / clip_weights.VOCAB_FILE
    assert cached.read_bytes() == SHIPPED_VOCAB.read_bytes()
    assert tokens[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_corrupted_shipped_vocabulary_is_replaced_by_a_verified_download(tmp_path, monkeypatch):
    corrupted = tmp_path / "package" / clip_weights.VOCAB_FILE
    corrupted.parent.mkdir()
    corrupted.write_bytes(SHIPPED_VOCAB.read_bytes()[:-100])  # a truncated copy
    monkeypatch.setattr(clip_weights, "PACKAGED_VOCAB", corrupted)
    monkeypatch.setattr(clip_weights, "VOCAB_URL", SHIPPED_VOCAB.as_uri())
    with pytest.warns(UserWarning, match=f"{corrupted} does not match its SHA256"):
        path = clip_weights.vocab_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / clip_weights.VOCAB_FILE
    assert clip_weights.file_sha256(path) == clip_weights.VOCAB_SHA256


def test_missing_vocabulary_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(clip_weights, "PACKAGED_VOCAB", tmp_path / "package" / clip_weights.VOCAB_FILE)  # absent
    monkeypatch.setattr(clip_weights, "VOCAB_URL", (tmp_path / "unreachable" / "vocab.gz").as_uri())
    with pytest.raises(CLIPLoadError, match=f"place the file at {tmp_path / clip_weights.VOCAB_FILE}"):
        clip_weights.vocab_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- #
# The tiny reference model, both formats
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def reference(golden: Path) -> dict:
    return torch.load(golden / "tiny_clip_reference_outputs.pt")


@pytest.mark.parametrize("file_name", ["tiny_clip_state_dict.pt", "tiny_clip_jit.pt"])
def test_tiny_model_reproduces_openai_outputs(golden, reference, file_name, device):
    """OpenAI's CPU outputs, to 1e-5 on the CPU (features and logits are of order 1).

    On CUDA, cuDNN runs the patch-embedding convolution in TF32 (10-bit mantissa) by default: rounding its
    inputs and weights to TF32 on the CPU moves these outputs by less than 1e-4, so the tolerance there is 1e-3.
    """
    atol = 1e-5 if device.type == "cpu" else 1e-3
    model = clip_model.load(golden / file_name, device=device)
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == device.type for p in model.parameters())
    images, texts = reference["images"].to(device), reference["texts"].to(device)
    with torch.no_grad():
        image_features = model.encode_image(images)
        text_features = model.encode_text(texts)
        logits_per_image, logits_per_text = model(images, texts)
    for ours, key in [
        (image_features, "image_features"),
        (text_features, "text_features"),
        (logits_per_image, "logits_per_image"),
        (logits_per_text, "logits_per_text"),
    ]:
        torch.testing.assert_close(ours.cpu(), reference[key], rtol=0, atol=atol, msg=key)
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]
    inferred = model.config
    for field, value in reference["config"].items():
        assert getattr(inferred, field) == value, field
    assert model.visual.input_resolution == reference["config"]["image_resolution"]


# --------------------------------------------------------------------------- #
# Architecture inferred from the tensors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "config, parameters",
    [
        (clip_model.VIT_B_32, 151_277_313),
        (clip_model.VIT_B_16, 149_620_737),
        (clip_model.VIT_L_14, 427_616_513),
        (clip_model.VIT_L_14_336, 427_944_193),
    ],
    ids=["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"],
)
def test_architecture_read_off_released_shapes(config, parameters):
    with torch.device("meta"):  # the real shapes, no memory
        model = clip_model.CLIP(config)
    assert CLIPConfig.from_state_dict(model.state_dict()) == config
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_state_dict_round_trip_in_openai_layout(tmp_path):
    model = clip_model.random_clip(TINY, seed=3)
    half = {key: value.half() if value.ndim >= 2 else value for key, value in model.state_dict().items()}
    torch.save(half, tmp_path / "tiny.pt")
    loaded = clip_model.load(tmp_path / "tiny.pt")
    assert loaded.config == TINY
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, half[key].float()), key


def test_torchscript_archive_round_trip(tmp_path, golden):
    archive = torch.jit.load(golden / "tiny_clip_jit.pt", map_location="cpu")
    torch.jit.save(archive, tmp_path / "copy.pt")
    from_archive = clip_model.load(tmp_path / "copy.pt").state_dict()
    from_plain = clip_model.load(golden / "tiny_clip_state_dict.pt").state_dict()
    assert from_archive.keys() == from_plain.keys()
    assert all(torch.equal(from_archive[k], from_plain[k]) for k in from_plain)


def test_torchscript_archive_is_read_as_data_exactly_as_torch_jit_load_reads_it(golden):
    with pytest.warns(FutureWarning):  # torch.jit.load's deprecation notice
        expected = torch.jit.load(golden / "tiny_clip_jit.pt", map_location="cpu").state_dict()
    read = clip_weights.read_state_dict(golden / "tiny_clip_jit.pt")
    assert list(read) == list(expected)
    for key, value in expected.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape, key
        assert (read[key].double() - value.double()).abs().max() == 0, key


class _Trap(torch.nn.Module):
    """A module whose ``__setstate__``, compiled into the archive, creates the file named in its state on loading."""

    def __init__(self, path: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.path = path

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.path = state[1]
        self.training = state[2]
        self.weight = torch.from_file(state[1], shared=True, size=3, dtype=torch.float32)  # creates the file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_archive_whose_setstate_has_a_side_effect_is_refused_without_running_it(tmp_path):
    evidence = tmp_path / "setstate_ran"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(_Trap(str(evidence))), tmp_path / "trap.pt")
    with pytest.raises(CLIPLoadError, match=r"trap.pt: refused as a TorchScript archive: .*defines __setstate__"):
        clip_model.load(tmp_path / "trap.pt")
    assert not evidence.exists()
    with pytest.warns(FutureWarning):
        torch.jit.load(tmp_path / "trap.pt")  # what a plain TorchScript load does
    assert evidence.exists()  # so the trap is real


def test_archive_that_refers_to_another_global_is_refused_before_calling_it(golden, tmp_path):
    evidence = tmp_path / "opened"
    payload = f"cbuiltins\nopen\n(V{evidence}\nVw\ntR.".encode()  # protocol 0: builtins.open(evidence, "w")
    with zipfile.ZipFile(golden / "tiny_clip_jit.pt") as source, zipfile.ZipFile(tmp_path / "evil.pt", "w") as evil:
        for entry in source.namelist():
            evil.writestr(entry, payload if entry.endswith("/data.pkl") else source.read(entry))
    with pytest.raises(CLIPLoadError, match=r"evil.pt: refused as a TorchScript archive: it refers to builtins.open"):
        clip_model.load(tmp_path / "evil.pt")
    assert not evidence.exists()


def test_random_clip_is_reproducible_from_its_seed():
    first, second = clip_model.random_clip(TINY, seed=7), clip_model.random_clip(TINY, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert not torch.equal(first.visual.proj, clip_model.random_clip(TINY, seed=8).visual.proj)


# --------------------------------------------------------------------------- #
# Download
# --------------------------------------------------------------------------- #


def _serve_as_known_model(monkeypatch, source: Path, sha256: str) -> None:
    monkeypatch.setitem(clip_weights.MODEL_URLS, "ViT-B/32", source.as_uri())
    monkeypatch.setitem(clip_weights.MODEL_SHA256, "ViT-B/32", sha256)


def test_known_name_is_downloaded_verified_and_reused(golden, tmp_path, monkeypatch):
    source = golden / "tiny_clip_jit.pt"
    _serve_as_known_model(monkeypatch, source, hashlib.sha256(source.read_bytes()).hexdigest())
    cache = tmp_path / "cache"
    model = clip_model.load("ViT-B/32", download_root=cache)
    assert [p.name for p in cache.iterdir()] == ["ViT-B-32.pt"]
    assert model.config.image_resolution == 32

    monkeypatch.setitem(clip_weights.MODEL_URLS, "ViT-B/32", (tmp_path / "gone.pt").as_uri())
    assert clip_model.load("ViT-B/32", download_root=cache).config == model.config  # no second download


class _SlowFileServer(http.server.ThreadingHTTPServer):
    """Serves ``payload`` on 127.0.0.1 in 16 slow pieces and counts the requests."""

    def __init__(self, payload: bytes):
        self.payload, self.requests = payload, 0
        super().__init__(("127.0.0.1", 0), _SlowFileHandler)


class _SlowFileHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.payload)))
        self.end_headers()
        piece = len(self.server.payload) // 16
        for start in range(0, len(self.server.payload), piece):
            self.wfile.write(self.server.payload[start : start + piece])
            self.wfile.flush()
            time.sleep(0.02)

    def log_message(self, *args) -> None:
        pass


def test_concurrent_first_downloads_all_succeed_and_fetch_the_file_once(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    payload = torch.randint(0, 256, (1 << 18,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    payload = payload.numpy().tobytes()
    sha256 = hashlib.sha256(payload).hexdigest()
    server = _SlowFileServer(payload)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = tmp_path / "cache" / "ViT-B-32.pt"
    url = f"http://127.0.0.1:{server.server_address[1]}/ViT-B-32.pt"
    try:
        processes = [
            multiprocessing.get_context("fork").Process(target=clip_weights._download, args=(url, target, sha256))
            for _ in range(4)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    assert [path.name for path in target.parent.iterdir()] == [target.name]  # no temporary file left
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha256
    assert server.requests == 1  # one process downloaded, the others waited for it


def test_loading_names_stay_importable_from_clip_model():
    """runtime.py and users reach these through ``clip_model``; they are ``clip_weights``' own objects."""
    assert clip_model.CLIPLoadError is clip_weights.CLIPLoadError
    assert clip_model.MODEL_SHA256 is clip_weights.MODEL_SHA256
    assert clip_model.checkpoint_path is clip_weights.checkpoint_path
    assert clip_model.file_sha256 is clip_weights.file_sha256


def test_default_download_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert clip_weights.default_download_root() == tmp_path / "clip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert clip_weights.default_download_root() == Path.home() / ".cache" / "clip"


def test_checksum_mismatch_keeps_nothing(golden, tmp_path, monkeypatch):
    _serve_as_known_model(monkeypatch, golden / "tiny_clip_jit.pt", "0" * 64)
    with pytest.raises(CLIPLoadError, match="SHA256"):
        clip_model.load("ViT-B/32", download_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_no_network_names_the_file_and_where_to_place_it(tmp_path, monkeypatch):
    _serve_as_known_model(monkeypatch, tmp_path / "unreachable.pt", "1" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(CLIPLoadError, match=f"place the file at {cache / 'ViT-B-32.pt'}"):
        clip_model.load("ViT-B/32", download_root=cache)
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_unknown_name_lists_the_known_models():
    with pytest.raises(CLIPLoadError, match=r"ViT-B/32.*ViT-B/16.*ViT-L/14.*ViT-L/14@336px"):
        clip_model.load("ViT-H/99")


def test_missing_file(tmp_path):
    with pytest.raises(CLIPLoadError, match="no such file"):
        clip_model.load(tmp_path / "absent.pt")


@pytest.mark.parametrize("file_name", ["tiny_clip_state_dict.pt", "tiny_clip_jit.pt"])
def test_truncated_checkpoint(golden, tmp_path, file_name):
    data = (golden / file_name).read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CLIPLoadError, match="cut.pt: cannot be read as a CLIP checkpoint"):
        clip_model.load(tmp_path / "cut.pt")


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "noise.pt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CLIPLoadError, match="noise.pt: cannot be read"):
        clip_model.load(tmp_path / "noise.pt")


def test_state_dict_with_missing_tensors(tmp_path):
    state = clip_model.random_clip(TINY).state_dict()
    del state["visual.ln_post.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CLIPLoadError, match="partial.pt: the tensors do not form a CLIP ViT.*ln_post"):
        clip_model.load(tmp_path / "partial.pt")


def test_resnet_is_refused_by_name_and_by_contents(tmp_path):
    with pytest.raises(CLIPLoadError, match="ResNet CLIP; STOP prompts the patch tokens"):
        clip_model.load("RN50")
    torch.save(
        {"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "visual.attnpool.k_proj.weight": torch.zeros(1)},
        tmp_path / "rn.pt",
    )
    with pytest.raises(CLIPLoadError, match="ResNet CLIP checkpoint"):
        clip_model.load(tmp_path / "rn.pt")


def test_text_feature_is_unchanged_by_a_shorter_context(golden, device):
    """Under the causal mask nothing after EOT reaches it: 32-token captions give the 77-token features.

    Only the summation order of the attention kernels differs with the length: 1e-6 on the CPU, 1e-5 on CUDA,
    whose kernels pick their blocking by sequence length (features of order 1).
    """
    atol = 1e-6 if device.type == "cpu" else 1e-5
    model = clip_model.load(golden / "tiny_clip_state_dict.pt", device=device)
    texts = ["a man is playing a guitar on stage", "a red square moves to the left"]
    with torch.no_grad():
        full = model.encode_text(clip_model.tokenize(texts).to(device))
        short = model.encode_text(clip_model.tokenize(texts, context_length=32).to(device))
    torch.testing.assert_close(short, full, rtol=0, atol=atol)


def test_byte_tokenize_ends_every_row_with_the_largest_id():
    tokens = clip_model.byte_tokenize(["ab", "é" * 40], context_length=8)
    assert tokens[0].tolist() == [256, 97, 98, 257, 0, 0, 0, 0]
    assert tokens[1, 0] == 256 and tokens[1, -1] == 257 and (tokens[1].argmax() == 7)


def test_quick_gelu_values_and_gradients_match_the_plain_formula():
    """The fused QuickGELU (one saved tensor) is ``x * sigmoid(1.702 x)``, forward and backward, in float64."""
    x = torch.linspace(-6, 6, 97, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(clip_model.QuickGELU(), (x,))
    plain = x * torch.sigmoid(1.702 * x)
    fused = clip_model.QuickGELU()(x)
    assert torch.equal(fused, plain)
    (plain_grad,) = torch.autograd.grad(plain.sum(), x)
    (fused_grad,) = torch.autograd.grad(fused.sum(), x)
    torch.testing.assert_close(fused_grad, plain_grad)
