"""``evaluate.py explain``: the figure's pixels show where STOP put its regions and how many prompts each gap got.

The video is made here: a static texture of flat grey blocks with a static white bar in the top-left, and a white
bar that jumps between two rows of the bottom-right quadrant; frames 1-2 and 4-5 are repeats. The model is STOP
on the golden 32-px CLIP with one prompted block, ``alpha = 0`` (``W^s = M``, the learned dynamics only) and a
dynamics network ``N^s`` set by hand to what training could make of it: the temporal Laplacian
``2 u_t - u_{t-1} - u_{t+1}`` of the feature "white bar here". Its regions must then sit where the video changes
(never on the static bar, which a content detector would pick instead: the control case). ``P^s`` keeps its
initialisation (zero output), so a gap between two identical frames gets ``n_t = 0``: STOP's invariant.
"""

import re
from pathlib import Path

import pytest
import torch
from conftest import run
from PIL import Image, ImageDraw, ImageFont
from torchcodec.decoders import decode_png
from torchvision import tv_tensors

import clip_model
import data
import evaluate
import explain
import stop
from loading import dataset_files
from loading.protocols import PROTOCOLS
from plumbing import runs
from stop import STOPConfig, STOPModel

SIZE = 64  # video pixels; the golden CLIP sees 32 (4 x 4 patches of 8)
BAR_ROWS = {"top": 40, "bottom": 56}  # the moving bar's first video row: patch rows 2 and 3 of the model's grid
POSITIONS = ["top", "bottom", "bottom", "top", "bottom", "bottom", "top", "bottom"]  # frames 0-7
REPEATED_GAPS = [1, 4]  # gap t lies between frames t and t+1
CORNER_PATCHES = {2 * 4 + 2, 2 * 4 + 3, 3 * 4 + 2, 3 * 4 + 3}  # the bottom-right quadrant of the 4 x 4 grid


def draw_frame(background: torch.Tensor, position: str | None) -> torch.Tensor:
    """uint8 ``[3, 64, 64]``: the background with the moving bar at ``position`` (none: no bar)."""
    frame = background.clone()
    if position is not None:
        top = BAR_ROWS[position]
        frame[:, top : top + 8, 40:64] = 240  # 8-pixel aligned and flat, so H.264 repeats a frame exactly
    return frame


@pytest.fixture
def background() -> torch.Tensor:
    levels = torch.randint(2, 12, (8, 8), generator=torch.Generator().manual_seed(0)) * 16  # flat 8 x 8 blocks
    background = levels.repeat_interleave(8, 0).repeat_interleave(8, 1).expand(3, SIZE, SIZE).clone()
    background[:, 8:16, 0:24] = 240  # the static bar, in the top-left
    return background.to(torch.uint8)


@pytest.fixture
def corner_video(tmp_path, background) -> Path:
    path = tmp_path / "corner.mp4"
    dataset_files.write_video(path, torch.stack([draw_frame(background, p) for p in POSITIONS]), fps=8)
    return path


def write_checkpoint(path: Path, clip_file: Path, background: torch.Tensor, temporal_kernel: list[float]) -> None:
    """A checkpoint as train.py writes it, whose ``N^s`` applies ``temporal_kernel`` to the feature "white bar here".

    The feature is the mean difference, in block 1's ``ln_1`` space, between the bar's patches with and without
    the bar, from clean (never encoded) frames.
    """
    torch.manual_seed(0)
    clip = clip_model.load(clip_file)
    config = dict(task="recognize", dataset="ucf101", root=None, prompt="stop", alpha=0.0, prompt_layers=1, frames=8)
    model = STOPModel(clip, STOPConfig("stop", alpha=0.0, prompt_layers=1))
    clean = torch.stack([draw_frame(background, p) for p in ("top", "bottom", None)])
    pixels = data.build_transform(32, train=False)(tv_tensors.Video(clean)).as_subclass(torch.Tensor)
    block = clip.visual.transformer.resblocks[0]
    with torch.no_grad():
        tokens = block.ln_1(clip.visual.embed(pixels))[:, 1:]  # [3, N, D]
        bar = torch.cat([tokens[0, [10, 11]] - tokens[2, [10, 11]], tokens[1, [14, 15]] - tokens[2, [14, 15]]])
        feature = bar.mean(dim=0)  # [D]
        spatial = model.prompters[0].spatial
        spatial.reduce.weight.zero_()
        spatial.reduce.bias.zero_()
        spatial.reduce.weight[0] = feature / feature.norm()
        spatial.dynamics_net.weight.zero_()  # N^s
        spatial.dynamics_net.bias.zero_()
        spatial.dynamics_net.weight[0, 0, :, 1, 1] = 4 * torch.tensor(temporal_kernel)  # centre tap, t-1, t, t+1
    checkpoint = {
        "stop": model.trainable_state_dict(),
        "config": config,
        "clip": {"name": str(clip_file), "sha256": clip_model.file_sha256(clip_file)},
    }
    torch.save(checkpoint, path)


def coloured(picture: torch.Tensor, colour: tuple[int, int, int]) -> torch.Tensor:
    """``[3, H, W]`` uint8 -> ``[H, W]`` bool: pixels of exactly ``colour``."""
    return (picture == torch.tensor(colour, dtype=torch.uint8)[:, None, None]).all(dim=0)


@pytest.mark.parametrize(
    ("detector", "kernel"), [("temporal laplacian", [-1.0, 2.0, -1.0]), ("static content", [0.0, 1.0, 0.0])]
)
def test_regions_sit_where_the_video_changes_and_repeated_frames_get_no_prompts(
    golden_clip, tmp_path, background, corner_video, detector, kernel
):
    decoded = data.read_frames(corner_video, 8, train=False)
    assert all(torch.equal(decoded[gap], decoded[gap + 1]) for gap in REPEATED_GAPS), "the codec changed a repeat"
    checkpoint = tmp_path / "best.pt"
    write_checkpoint(checkpoint, golden_clip, background, kernel)
    out = tmp_path / "explain.png"

    code, output = run(evaluate.app, "explain", corner_video, "--checkpoint", checkpoint, "--out", out)

    assert code == 0, output
    picture = decode_png(out)  # [3, H, W]
    layout = explain.Layout(frames=8, grid=4, rows=1)
    assert picture.shape == (3, layout.height, layout.width)
    outlines = coloured(picture, explain.REGION_COLOUR)
    bars = coloured(picture, explain.BAR_COLOUR)
    half = layout.tile // 2
    in_corner, elsewhere = [], []
    for frame in range(8):
        x, y = layout.tile_origin(0, frame)
        tile = outlines[y : y + layout.tile, x : x + layout.tile]
        in_corner.append(int(tile[half:, half:].sum()))
        elsewhere.append(int(tile.sum()) - in_corner[-1])
    if detector == "temporal laplacian":
        assert min(in_corner) > 0 and max(elsewhere) == 0, (in_corner, elsewhere)
    else:  # the pixel check can fail: a detector of the bar's look, not of change, outlines the static bar too
        assert max(elsewhere) > 0, (in_corner, elsewhere)

    for gap in range(7):
        x0, y0, x1, y1 = layout.gap_box(0, gap)
        bar_pixels = int(bars[y0:y1, x0:x1].sum())
        assert (bar_pixels == 0) == (gap in REPEATED_GAPS), (gap, bar_pixels)


def test_header_shows_top_classes_or_caption_similarity(golden_clip, tmp_path, background, corner_video):
    root = tmp_path / "ucf"
    lists = root / PROTOCOLS["ucf101"].annotations
    lists.mkdir(parents=True)
    classes = ["ApplyEyeMakeup", "BlowDryHair", "CuttingInKitchen", "Drumming", "Fencing", "GolfSwing"]
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (lists / "testlist01.txt").write_text(f"{classes[0]}/v_{classes[0]}_g01_c01.avi\n")
    (root / PROTOCOLS["ucf101"].videos / classes[0]).mkdir(parents=True)
    checkpoint = tmp_path / "best.pt"
    write_checkpoint(checkpoint, golden_clip, background, [-1.0, 2.0, -1.0])

    code, output = run(
        evaluate.app, "explain", corner_video, "--checkpoint", checkpoint, "--labels-from", "ucf101", "--root", root,
        "--out", tmp_path / "l.png",
    )  # fmt: skip

    assert code == 0, output
    model, backbone, _ = runs.load_trained(checkpoint, str(golden_clip), torch.device("cpu"))
    names = [dataset_files.readable_class_name(c) for c in classes]
    texts = stop.text_features(model, backbone.tokenize, stop.class_texts("ucf101", names), torch.device("cpu"))
    video = data.build_transform(32, train=False)(tv_tensors.Video(data.read_frames(corner_video, 8, train=False)))
    with torch.no_grad():
        probabilities = model.class_logits(video.as_subclass(torch.Tensor)[None], texts)[0].softmax(dim=0)
    top = probabilities.topk(5)
    expected = "  ·  ".join(f"{names[i]} {100 * p:.1f}%" for p, i in zip(top.values.tolist(), top.indices.tolist()))
    assert f"top-5 of 6 ucf101 classes: {expected}" in output.splitlines()

    code, output = run(
        evaluate.app, "explain", corner_video, "--checkpoint", checkpoint, "--caption", "a bar jumps",
        "--out", tmp_path / "a.png",
    )  # fmt: skip
    assert code == 0, output
    assert re.search(r'cosine similarity -?\d\.\d{3} \(logit -?\d+\.\d{2}\) to "a bar jumps"', output), output


def test_every_prompted_block_gets_a_row(golden_clip, tmp_path, background, corner_video):
    checkpoint = tmp_path / "best.pt"
    write_checkpoint(checkpoint, golden_clip, background, [-1.0, 2.0, -1.0])
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"]["prompt_layers"] = 2  # block 2's prompters: their initialisation
    torch.manual_seed(0)
    two_blocks = STOPModel(clip_model.load(golden_clip), STOPConfig("stop", alpha=0.0, prompt_layers=2))
    saved["stop"] = {**two_blocks.trainable_state_dict(), **saved["stop"]}
    torch.save(saved, checkpoint)
    out = tmp_path / "all.png"

    code, output = run(evaluate.app, "explain", corner_video, "--checkpoint", checkpoint, "--all-blocks", "--out", out)

    assert code == 0, output
    assert "block 1: temporal prompts" in output and "block 2: temporal prompts" in output
    layout = explain.Layout(frames=8, grid=4, rows=2)
    assert decode_png(out).shape == (3, layout.height, layout.width)


def test_bad_input_gets_one_clear_message(golden_clip, tmp_path, background, corner_video):
    checkpoint = tmp_path / "best.pt"
    write_checkpoint(checkpoint, golden_clip, background, [-1.0, 2.0, -1.0])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    other_clip = tmp_path / "other.pt"
    saved = torch.load(checkpoint, weights_only=True)
    saved["clip"]["sha256"] = "0" * 64
    torch.save(saved, other_clip)
    out = ["--out", tmp_path / "x.png"]
    cases = [
        ([broken, "--checkpoint", checkpoint, *out], "cannot decode video"),
        ([corner_video, "--checkpoint", other_clip, *out], "was trained on the CLIP"),
        ([corner_video, "--checkpoint", checkpoint, "--block", 2, *out], "prompts blocks 1 to 1"),
        ([corner_video, "--checkpoint", checkpoint, "--block", 0, *out], "prompts blocks 1 to 1"),
        ([corner_video, "--checkpoint", checkpoint, "--out", tmp_path / "missing" / "x.png"], "does not exist"),
        ([tmp_path / "nothing.mp4", "--checkpoint", checkpoint, *out], "no such video"),
        ([corner_video, "--checkpoint", checkpoint, "--labels-from", "hmdb51", *out], "--root"),
        ([corner_video, "--checkpoint", checkpoint, "--labels-from", "ucf101", "--caption", "x", *out], "both given"),
    ]
    for args, message in cases:
        code, output = run(evaluate.app, "explain", *args)
        assert code == 1, output
        assert output.startswith("error: ") and message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "x.png").exists()


def test_a_failed_write_keeps_the_earlier_figure_and_leaves_no_temporary_file(
    golden_clip, tmp_path, background, corner_video, monkeypatch
):
    checkpoint = tmp_path / "best.pt"
    write_checkpoint(checkpoint, golden_clip, background, [-1.0, 2.0, -1.0])
    out = tmp_path / "figures" / "explain.png"
    out.parent.mkdir()
    code, output = run(evaluate.app, "explain", corner_video, "--checkpoint", checkpoint, "--out", out)
    assert code == 0, output
    earlier = out.read_bytes()
    encoder = explain.PngEncoder

    class FullDisk:
        """The PNG encoder on a disk that fills up halfway through the file."""

        def __init__(self, figure: torch.Tensor) -> None:
            self.png = encoder(figure).to_tensor()

        def to_file(self, dest: Path, **options) -> None:
            Path(dest).write_bytes(self.png[: len(self.png) // 2].numpy().tobytes())
            raise RuntimeError("No space left on device")

    monkeypatch.setattr(explain, "PngEncoder", FullDisk)
    code, output = run(evaluate.app, "explain", corner_video, "--checkpoint", checkpoint, "--out", out)
    assert code == 1
    assert output.startswith("error: ") and str(out) in output and len(output.strip().splitlines()) == 1, output
    assert out.read_bytes() == earlier
    assert [path.name for path in out.parent.iterdir()] == ["explain.png"]


def test_a_long_caption_is_cut_to_the_width_in_few_measurements():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = ImageFont.load_default(size=explain.FONT_SIZE)
    measure = draw.textlength
    calls = 0

    def counted(text: str, **options) -> float:
        nonlocal calls
        calls += 1
        assert calls <= 20, "too many measurements"
        return measure(text, **options)

    draw.textlength = counted
    caption = " ".join(f"word{i}" for i in range(10_000))
    width = explain.Layout(frames=8, grid=4, rows=1).width - 2 * explain.GAP

    text = explain.fitted(draw, font, caption, width)

    assert text.endswith("…") and caption.startswith(text[:-1])
    assert measure(text, font=font) <= width < measure(caption[: len(text)] + "…", font=font)  # the longest that fits
    assert explain.fitted(draw, font, "a bar jumps", width) == "a bar jumps"
