"""Explain STOP on one video: draw where in each frame it prompts (regions ``r``) and between which frames (``n_t``).

``python evaluate.py explain VIDEO --checkpoint RUN/best.pt [--block K | --all-blocks]
[--labels-from DATASET [--root DIR] | --caption TEXT] [--out FIGURE.png]``

STOP makes two decisions in every prompted block (``docs/method.md``). This module draws both, as
``STOPModel.encode_video(video, return_details=True)`` reports them, into one PNG:

- the sampled frames in a row, as the model sees them (resized, centre-cropped, CLIP's normalisation undone).
  Over each frame's ``G x G`` patch grid, the fused score ``W^s_t = alpha A_t + (1 - alpha) M_t`` (step 3:
  frozen CLS attention and learned dynamics, in [0, 1]) is a translucent heat map, and the regions ``r_t`` (its
  top ``ceil(rho N)`` patches, the only ones that get spatial prompts, step 4) are outlined;
- between frames t and t+1, a bar whose height is ``n_t = ceil(eta W^t_t)`` (step 6), the number of temporal
  prompts inserted in that gap, with the value written above it; a bar of full height is ``eta`` prompts;
- a header: the video's name, then either its top-5 classes with their probabilities (``--labels-from``) or its
  similarity to a caption (``--caption``), and a legend.

``--block K`` draws prompted block K (1 is the first; default the last); ``--all-blocks`` draws one row per block.
The picture is made with ``torchvision.utils`` (``make_grid``, ``draw_bounding_boxes``) and written by TorchCodec's
``PngEncoder`` (torchvision 0.29 deprecates its own PNG functions in favour of TorchCodec, which reads this
project's videos already); text is drawn with Pillow (torchvision's own dependency), whose built-in scalable font
needs no font file on the machine.

``evaluate.py`` adds the command to its app (``register``); this module needs only ``runtime.py``.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer
from PIL import ImageDraw, ImageFont
from torchcodec.encoders import PngEncoder
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, make_grid

import data
from loading import protocols
from loading.errors import RunError
from plumbing.cli import reported_errors
from plumbing.runs import load_trained
from plumbing.runtime import Backbone, resolve_device
from stop import PromptDetails, STOPModel, class_texts, text_features

TILE = 128  # pixels per side of a frame tile, rounded to a multiple of the patch grid
GAP = 40  # make_grid's padding: between tiles (where the bars stand) and around them
BAR_WIDTH = 14
BAR_HEADROOM = 20  # pixels kept above a bar of eta prompts for its value
FONT_SIZE = 14
LINE_HEIGHT = 20
HEADER_LINES = 3
HEADER_HEIGHT = HEADER_LINES * LINE_HEIGHT + 12
HEAT_OPACITY = 0.45
OUTLINE_WIDTH = 2
REGION_COLOUR = (0, 255, 0)  # pure green: not a colour of the heat map
BAR_COLOUR = (31, 119, 180)
BASELINE_COLOUR = (170, 170, 170)
TEXT_COLOUR = (20, 20, 20)
# The heat map: five stops of matplotlib's perceptually ordered "inferno", dark (0) to bright (1).
HEAT_STOPS = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]) / 255

LabelSource = Literal[(*protocols.RECOGNITION_DATASETS, "synthetic")]


@dataclass(frozen=True)
class Layout:
    """Where things go in the figure, in pixels: a header, then ``rows`` rows (blocks) of ``frames`` tiles.

    ``make_grid(padding=GAP)`` lays the tiles out, so tile (row, t) starts ``GAP + t (tile + GAP)`` from the left
    and ``HEADER_HEIGHT + GAP + row (tile + GAP)`` from the top; each patch is a ``patch x patch`` square of it.
    """

    frames: int  # T
    grid: int  # G, patches per side
    rows: int

    @property
    def patch(self) -> int:
        return max(1, round(TILE / self.grid))

    @property
    def tile(self) -> int:
        return self.patch * self.grid

    @property
    def width(self) -> int:
        return GAP + self.frames * (self.tile + GAP)

    @property
    def height(self) -> int:
        return HEADER_HEIGHT + GAP + self.rows * (self.tile + GAP)

    def tile_origin(self, row: int, frame: int) -> tuple[int, int]:
        """``(x, y)`` of the top-left pixel of frame ``frame``'s tile in row ``row``."""
        return GAP + frame * (self.tile + GAP), HEADER_HEIGHT + GAP + row * (self.tile + GAP)

    def gap_box(self, row: int, gap: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``, ends excluded: the space between the tiles of frames ``gap`` and ``gap + 1``."""
        x, y = self.tile_origin(row, gap)
        return x + self.tile, y, x + self.tile + GAP, y + self.tile

    def bar_box(self, row: int, gap: int, count: int, eta: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``, ends excluded: the bar of ``count`` of at most ``eta`` prompts, on the tiles' base."""
        x0, _, x1, bottom = self.gap_box(row, gap)
        left = (x0 + x1 - BAR_WIDTH) // 2
        return left, bottom - round(count / eta * (self.tile - BAR_HEADROOM)), left + BAR_WIDTH, bottom


# --------------------------------------------------------------------------- #
# Drawing
# --------------------------------------------------------------------------- #


def heat_colours(scores: torch.Tensor) -> torch.Tensor:
    """Scores ``[T, G, G]`` in [0, 1] -> RGB ``[T, 3, G, G]`` in [0, 1], linear between the ``HEAT_STOPS``."""
    position = scores.clamp(0, 1) * (len(HEAT_STOPS) - 1)
    low = position.floor().long().clamp(max=len(HEAT_STOPS) - 2)
    fraction = (position - low).unsqueeze(-1)  # [T, G, G, 1]
    colours = HEAT_STOPS[low] * (1 - fraction) + HEAT_STOPS[low + 1] * fraction  # [T, G, G, 3]
    return colours.permute(0, 3, 1, 2)


def draw_tiles(pictures: torch.Tensor, details: PromptDetails, layout: Layout) -> torch.Tensor:
    """Frames ``[T, 3, S, S]`` in [0, 1] -> uint8 tiles: ``W^s`` as a heat map over the patches, regions ``r`` outlined.

    ``details`` are one block's, for a batch of one video.
    """
    grid, patch = layout.grid, layout.patch
    heat = heat_colours(details.fused_score[0].cpu().view(-1, grid, grid))  # W^s: [T, 3, G, G]
    heat = heat.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)  # [T, 3, S, S]
    tiles = ((1 - HEAT_OPACITY) * pictures + HEAT_OPACITY * heat).mul(255).round().to(torch.uint8)
    outlined = []
    for tile, regions in zip(tiles, details.regions[0].cpu()):  # r_t: [N] bool
        index = regions.nonzero()[:, 0]  # [K_s]
        top, left = index // grid * patch, index % grid * patch
        boxes = torch.stack([left, top, left + patch - 1, top + patch - 1], dim=1)  # [K_s, 4], corners included
        drawn = draw_bounding_boxes(tile, boxes, colors=REGION_COLOUR, width=OUTLINE_WIDTH) if len(index) else tile
        outlined.append(drawn)
    return torch.stack(outlined)


def fitted(draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont, text: str, width: int) -> str:
    """``text``, cut short with an ellipsis if it is wider than ``width`` pixels.

    The cut keeps the longest beginning that fits with the ellipsis, found by bisection over its length (a line
    grows wider with every character): ``log2(len(text)) + 2`` measurements at most, however long the text.
    """
    if draw.textlength(text, font=font) <= width:
        return text
    fits, too_wide = 0, len(text)  # text[:too_wide] + "…" is too wide; text[:fits] + "…" fits, or fits is 0
    while too_wide - fits > 1:
        middle = (fits + too_wide) // 2
        if draw.textlength(text[:middle] + "…", font=font) <= width:
            fits = middle
        else:
            too_wide = middle
    return text[:fits] + "…"


def render(frames: torch.Tensor, rows: list[tuple[int, PromptDetails]], eta: int, header: list[str]) -> torch.Tensor:
    """The figure, uint8 ``[3, H, W]`` (``Layout`` gives its geometry).

    ``frames`` ``[T, 3, R, R]`` in [0, 1]: what the model saw. ``rows``: one ``(block number, PromptDetails for a
    batch of one video)`` per figure row. ``eta``: the most prompts a gap can get. ``header``: ``HEADER_LINES``
    lines of text.
    """
    num_frames, patches = rows[0][1].fused_score.shape[1:]
    layout = Layout(num_frames, math.isqrt(patches), len(rows))
    upscale = layout.tile >= frames.shape[-1]
    interpolation = InterpolationMode.NEAREST_EXACT if upscale else InterpolationMode.BILINEAR
    pictures = TF.resize(frames, [layout.tile, layout.tile], interpolation=interpolation, antialias=True)
    tiles = torch.cat([draw_tiles(pictures, details, layout) for _, details in rows])  # [rows * T, 3, S, S]
    body = make_grid(tiles, nrow=num_frames, padding=GAP, pad_value=255)  # [3, H - HEADER_HEIGHT, W]
    canvas = torch.cat([torch.full((3, HEADER_HEIGHT, layout.width), 255, dtype=torch.uint8), body], dim=1)
    counts = [details.counts[0].tolist() for _, details in rows]  # n_t per row: [T - 1] each
    for row, row_counts in enumerate(counts):
        for gap, count in enumerate(row_counts):
            x0, y0, x1, y1 = layout.bar_box(row, gap, count, eta)
            canvas[:, y1, x0 - 3 : x1 + 3] = torch.tensor(BASELINE_COLOUR)[:, None]
            canvas[:, y0:y1, x0:x1] = torch.tensor(BAR_COLOUR)[:, None, None]

    image = TF.to_pil_image(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=FONT_SIZE)
    for line_number, line in enumerate(header):
        text = fitted(draw, font, line, layout.width - 2 * GAP)
        draw.text((GAP, 8 + line_number * LINE_HEIGHT), text, fill=TEXT_COLOUR, font=font)
    for row, ((block, _), row_counts) in enumerate(zip(rows, counts)):
        x, y = layout.tile_origin(row, 0)
        draw.text((x, y - LINE_HEIGHT), f"block {block}", fill=TEXT_COLOUR, font=font)
        for gap, count in enumerate(row_counts):
            x0, y0, x1, _ = layout.bar_box(row, gap, count, eta)
            value = str(count)
            left = (x0 + x1 - draw.textlength(value, font=font)) / 2
            draw.text((left, y0 - FONT_SIZE - 4), value, fill=TEXT_COLOUR, font=font)
    return TF.pil_to_tensor(image)


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


def write_png(figure: torch.Tensor, out: Path) -> None:
    """Write the uint8 ``[3, H, W]`` figure to ``out`` whole or not at all.

    It is encoded into a temporary file beside ``out`` and renamed over it (``os.replace``, atomic on one file
    system), so a write that fails (a full disk) leaves an earlier ``out`` as it was, and the temporary is deleted.
    """
    partial = out.with_name(f".{out.stem}.partial.png")
    try:
        PngEncoder(figure).to_file(partial, compression_level=9)
        os.replace(partial, out)
    except (OSError, RuntimeError) as error:
        raise RunError(f"--out {out}: cannot write it: {error}") from None
    finally:
        partial.unlink(missing_ok=True)


def describe_scores(
    model: STOPModel,
    backbone: Backbone,
    features: torch.Tensor,
    config: dict[str, Any],
    labels_from: str | None,
    root: Path | None,
    caption: str | None,
    device: torch.device,
) -> str:
    """The header's second line: the video's top-5 classes of ``labels_from``, or its similarity to ``caption``.

    ``features`` ``[1, E]`` is the video's feature; the class probabilities are the softmax of ``class_logits``
    (computed as ``similarity`` of this feature, which is what ``class_logits`` does, without a second forward).
    """
    if caption is not None:
        caption_features = text_features(model, backbone.tokenize, [caption], device)  # [1, E]
        cosine, logit = (features @ caption_features.t()).item(), model.similarity(features, caption_features).item()
        return f'cosine similarity {cosine:.3f} (logit {logit:.2f}) to "{caption}"'
    if labels_from is None:
        return "no --labels-from DATASET (top-5 classes) or --caption TEXT (similarity) was given"
    own_root = config.get("root") if labels_from == config.get("dataset") else None
    dataset_root = root or (Path(own_root) if own_root else None)
    if dataset_root is None and labels_from != "synthetic":
        raise RunError(f"--labels-from {labels_from} needs --root, the folder holding that dataset")
    name, location = data.dataset_location(labels_from, dataset_root, "recognize")
    resolution = model.clip.visual.input_resolution
    classes = data.build_dataset(name, location, "test", num_frames=config["frames"], resolution=resolution).classes
    prompts = class_texts(labels_from, classes)  # the texts training used
    class_features = text_features(model, backbone.tokenize, prompts, device)  # [C, E]
    probabilities = model.similarity(features, class_features)[0].softmax(dim=0)  # [C]
    top = probabilities.topk(min(5, len(classes)))
    ranked = "  ·  ".join(f"{classes[i]} {100 * p:.1f}%" for p, i in zip(top.values.tolist(), top.indices.tolist()))
    return f"top-{len(top.indices)} of {len(classes)} {labels_from} classes: {ranked}"


def explain_video(
    video: Path,
    checkpoint: Path,
    clip: str | None,
    block: int | None,
    all_blocks: bool,
    labels_from: str | None,
    root: Path | None,
    caption: str | None,
    out: Path,
) -> None:
    """Run the checkpoint's STOP model on ``video`` and write the figure to ``out`` (see the module docstring)."""
    if labels_from is not None and caption is not None:
        raise RunError("--labels-from and --caption were both given: the header shows one of them")
    if block is not None and all_blocks:
        raise RunError("--block and --all-blocks were both given: draw one block or all of them")
    if out.suffix.lower() != ".png":
        raise RunError(f"--out {out}: the figure is a PNG, so name it *.png")
    if not out.parent.is_dir():
        raise RunError(f"--out {out}: the folder {out.parent} does not exist")
    if not video.is_file():
        raise RunError(f"{video}: no such video file")

    device = resolve_device("auto")
    model, backbone, saved = load_trained(checkpoint, clip, device)
    config = saved["config"]
    model.eval()
    prompted = len(model.prompters)
    if prompted == 0:
        raise RunError(f"{checkpoint} is --prompt none: no block is prompted, so there is nothing to draw")
    if block is not None and not 1 <= block <= prompted:
        raise RunError(f"--block {block}: {checkpoint} prompts blocks 1 to {prompted}")
    blocks = list(range(1, prompted + 1)) if all_blocks else [block or prompted]

    resolution = model.clip.visual.input_resolution
    frames = data.read_frames(video, config["frames"], train=False)  # uint8 [T, 3, H, W]
    clip_input = data.build_transform(resolution, train=False)(tv_tensors.Video(frames)).as_subclass(torch.Tensor)
    with torch.no_grad():
        features, details = model.encode_video(clip_input[None].to(device), return_details=True)  # [1, E]
    scores = describe_scores(model, backbone, features, config, labels_from, root, caption, device)

    patches = details[0].fused_score.shape[-1]
    regions = int(details[0].regions[0, 0].sum())
    eta = model.config.eta
    shown = f"blocks 1-{prompted}" if all_blocks else f"block {blocks[0]} of {prompted} prompted"
    header = [
        f"{video.name}  ·  STOP --prompt {model.prompt}, {frames.shape[0]} frames, {shown}  ·  CLIP {backbone.name}",
        scores,
        f"heat: fused score W^s, dark 0 to bright 1  ·  green: regions r, the top {regions} of {patches} patches  ·  "
        f"bars: temporal prompts n_t between two frames, 0 to {eta}",
    ]
    mean, std = (torch.tensor(values)[:, None, None] for values in (data.CLIP_MEAN, data.CLIP_STD))
    pictures = (clip_input * std + mean).clamp(0, 1)  # [T, 3, R, R]: what the model saw, unnormalised
    figure = render(pictures, [(number, details[number - 1]) for number in blocks], eta, header)
    write_png(figure, out)
    for line in header[:2]:
        typer.echo(line)
    for number in blocks:
        typer.echo(f"block {number}: temporal prompts per gap n_t = {details[number - 1].counts[0].tolist()}")
    typer.echo(f"figure written to {out} ({figure.shape[2]}x{figure.shape[1]} px)")


def command(
    video: Annotated[Path, typer.Argument(help="The video file to explain.", show_default=False)],
    checkpoint: Annotated[
        Path, typer.Option(help="best.pt or last.pt of a train.py run: the prompts to explain.", show_default=False)
    ],
    clip: Annotated[str | None, typer.Option(help="CLIP name or path; default: the checkpoint's.")] = None,
    block: Annotated[int | None, typer.Option(help="Prompted block to draw, 1 = the first; default: the last.")] = None,
    all_blocks: Annotated[bool, typer.Option("--all-blocks", help="Draw one row per prompted block.")] = False,
    labels_from: Annotated[
        LabelSource | None, typer.Option(help="Show the video's top-5 classes of this dataset.")
    ] = None,
    root: Annotated[
        Path | None, typer.Option(help="Folder of --labels-from; default: the checkpoint's, for its own dataset.")
    ] = None,
    caption: Annotated[str | None, typer.Option(help="Show the video's similarity to this text.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="The PNG to write; its folder must exist. Default: CHECKPOINT-explain.png beside it."),
    ] = None,
) -> None:
    out = out or checkpoint.with_name(f"{checkpoint.stem}-explain.png")  # runs/x/best.pt: runs/x/best-explain.png
    with reported_errors():
        explain_video(video, checkpoint, clip, block, all_blocks, labels_from, root, caption, out)
