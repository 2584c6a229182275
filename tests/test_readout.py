"""The video feature's readout (``STOPConfig.readout``) and the block's attention (``STOPConfig.attention``).

``mean`` is CLIP4Clip meanP (every frame its own CLS; pinned by ``test_stop.py``, its regression checkpoints
included); ``cls`` is Figure 2a's one video CLS; ``joint`` puts every token of a video into one attention. Most
tests use ``conftest.py``'s random CLIP (N = 16 patches, width 128, 2 heads, 3 blocks), as ``test_stop.py`` does;
the golden 32-px checkpoint is used against OpenAI's reference outputs. A compiled epoch of each readout and
attention against an eager one is in ``test_compile.py``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FRAMES,
    RANDOM_CLIP_CONFIG,
    as_if_trained,
    error_lines,
    features,
    one_change_video,
    prompt_keys,
    random_videos,
    still_videos,
    train_tiny,
)

import clip_model
import stop
from loading.errors import ConfigError
from plumbing import runs
from stop import PROMPT_VARIANTS, STOPConfig, STOPModel, video_cls_block

# (readout, attention): every valid combination
LAYOUTS = [("mean", "frame"), ("cls", "frame"), ("cls", "joint")]
CLS_LAYOUTS = [layout for layout in LAYOUTS if layout[0] == "cls"]


def model_of(clip: clip_model.CLIP, prompt: str, layout: tuple[str, str], **kwargs) -> STOPModel:
    readout, attention = layout
    return STOPModel(clip, STOPConfig(prompt, readout=readout, attention=attention, **kwargs))


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"readout": "max"}, "readout='max'"),
        ({"attention": "global"}, "attention='global'"),
        ({"readout": "mean", "attention": "joint"}, "attention='joint' with readout='mean'"),
    ],
)
def test_bad_readout_or_attention_raises_naming_the_value(kwargs, named):
    with pytest.raises(ConfigError, match="expected") as error:
        STOPConfig(**kwargs)
    assert named in str(error.value)


def test_old_checkpoints_read_as_mean():
    old = {"prompt": "stop", "eta": 2, "lr": 1e-3}  # a checkpoint's flat run configuration, from before readout
    assert STOPConfig.from_dict(old) == STOPConfig("stop", eta=2, readout="mean", attention="frame")
    assert STOPConfig.from_dict({**old, "readout": "cls"}).readout == "cls"
    joint = STOPConfig.from_dict({**old, "readout": "cls", "attention": "joint"})
    assert (joint.readout, joint.attention) == ("cls", "joint")
    with pytest.raises(ConfigError, match="attention='joint' with readout='mean'"):
        STOPConfig.from_dict({**old, "attention": "joint"})


# --------------------------------------------------------------------------- #
# The frozen CLIP: one frame is CLIP's image forward; frame order cannot matter
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_one_frame_without_prompts_is_clips_image_feature(golden, golden_clip_model, layout):
    """Against the outputs of OpenAI's ``clip`` package on the same weights (``tests/fixtures``)."""
    reference = torch.load(golden / "tiny_clip_reference_outputs.pt")
    model = model_of(golden_clip_model, "none", layout)
    video_features = features(model, reference["images"][:, None])  # [3, 1, 3, 32, 32]: three one-frame videos
    torch.testing.assert_close(video_features, F.normalize(reference["image_features"], dim=-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_none_is_blind_to_frame_order_and_differs_from_the_mean(random_clip_model, layout):
    video = random_videos(2)
    model = model_of(random_clip_model, "none", layout)
    original = features(model, video)
    for order in (torch.tensor([3, 0, 7, 5, 1, 6, 4, 2]), torch.arange(FRAMES).flip(0)):
        torch.testing.assert_close(features(model, video[:, order]), original, rtol=0, atol=1e-6)
    mean = features(STOPModel(random_clip_model, STOPConfig("none", readout="mean")), video)
    assert ((original - mean).norm(dim=-1) > 1e-2).all()  # one video CLS is another feature than meanP's


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reversal_cannot_change_the_baseline(random_clip_model, layout):
    video = random_videos(3)
    model = model_of(random_clip_model, "none", layout)
    torch.testing.assert_close(features(model, video.flip(1)), features(model, video), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_reversal_changes_trained_stop(random_clip_model, layout):
    video = random_videos(3)
    model = as_if_trained(model_of(random_clip_model, "stop", layout))
    assert ((features(model, video.flip(1)) - features(model, video)).norm(dim=-1) > 0.05).all()


def test_joint_attention_differs_from_frame_attention(random_clip_model):
    """With several frames a patch attends to other frames' patches only in ``joint``; with one, they agree."""
    video = random_videos(2)
    frame, joint = (model_of(random_clip_model, "none", layout) for layout in CLS_LAYOUTS)
    assert ((features(frame, video) - features(joint, video)).norm(dim=-1) > 1e-2).all()
    torch.testing.assert_close(features(frame, video[:, :1]), features(joint, video[:, :1]), rtol=0, atol=1e-6)
    for prompt in ("stop", "temporal"):
        frame, joint = (as_if_trained(model_of(random_clip_model, prompt, layout)) for layout in CLS_LAYOUTS)
        assert ((features(frame, video) - features(joint, video)).norm(dim=-1) > 1e-2).all()


# --------------------------------------------------------------------------- #
# The video CLS block against an explicit computation
# --------------------------------------------------------------------------- #


def explicit_video_block(block, h, prompts, counts, joint):
    """One video at a time, the video's tokens listed out: ``[CLS, patches_1, ..., patches_T]`` plus the real
    prompts ``p_t[:n_t]`` of every gap as keys; frame t's patches see ``[CLS, patches_t, p_{t-1}, p_t]`` (or, joint,
    every key of the video)."""
    batch, gaps, _, width = prompts.shape
    frames = gaps + 1
    attn, heads = block.attn, block.attn.heads

    def attend(queries_in, keys_in):  # [Lq, D], [Lk, D] (both after ln_1) -> [Lq, D] after out_proj
        q = F.linear(queries_in, attn.in_proj_weight[:width], attn.in_proj_bias[:width])
        k, v = F.linear(keys_in, attn.in_proj_weight[width:], attn.in_proj_bias[width:]).chunk(2, dim=-1)
        q, k, v = (y.view(len(y), heads, -1).transpose(0, 1) for y in (q, k, v))
        out = ((q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v  # [H, Lq, Dh]
        return attn.out_proj(out.transpose(0, 1).flatten(1))

    results = []
    for video in range(batch):
        x = h.view(batch, frames, -1, width)[video]  # [T, 1+N, D]
        cls, patches = x[0, :1], list(x[:, 1:])
        real = [prompts[video, t, : counts[video, t]] for t in range(gaps)]
        tokens = torch.cat([cls, *patches])  # [1+T*N, D]
        normed = block.ln_1(tokens)
        every_key = torch.cat([normed, *real])
        if joint:
            out = attend(normed, every_key)
        else:
            out = [attend(normed[:1], every_key)]
            for t in range(frames):
                beside = ([real[t - 1]] if t > 0 else []) + ([real[t]] if t < gaps else [])
                own = block.ln_1(patches[t])
                out.append(attend(own, torch.cat([normed[:1], own, *beside])))
            out = torch.cat(out)
        tokens = tokens + out
        tokens = tokens + block.mlp(block.ln_2(tokens))
        per_frame = tokens[1:].view(frames, -1, width)
        results.append(torch.cat([tokens[:1].expand(frames, 1, width), per_frame], dim=1))
    return torch.cat(results)


@pytest.mark.parametrize("joint", [False, True])
def test_video_cls_block_equals_explicit_sequences(random_clip_model, joint):
    block = random_clip_model.visual.transformer.resblocks[0]
    batch, frames, length, width, eta = 3, 4, 17, RANDOM_CLIP_CONFIG.vision_width, 4
    h = torch.randn(batch, frames, length, width)
    h[:, :, 0] = h[:, :1, 0]  # one video CLS, in slot 0 of every frame
    h = h.flatten(0, 1)
    prompts = torch.randn(batch, frames - 1, eta, width)
    counts = torch.tensor([[0, 2, 4], [1, 0, 0], [0, 0, 0]])  # a video with no prompts among videos with some
    kv = prompt_keys(block, prompts)
    with torch.no_grad():
        result = video_cls_block(block, h, block.ln_1(h), kv, counts, joint=joint)
        expected = explicit_video_block(block, h, prompts, counts, joint)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
        no_slot = video_cls_block(block, h, block.ln_1(h), kv[:, :, :0], counts, joint=joint)
        masked = video_cls_block(
            block, h, block.ln_1(h), prompt_keys(block, prompts), torch.zeros_like(counts), joint=joint
        )
        torch.testing.assert_close(masked, no_slot, rtol=0, atol=1e-6)  # masked slots add nothing


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_attention_map_is_the_video_cls_attention(random_clip_model, layout):
    """Step 1 with a video CLS: one softmax over the CLS and every frame's patches in the first block (before any
    prompt), its part on frame t, head-averaged, min-max scaled per frame."""
    video = random_videos(2)
    _, details = features(model_of(random_clip_model, "stop", layout).eval(), video, return_details=True)
    block = random_clip_model.visual.transformer.resblocks[0]
    with torch.no_grad():
        tokens = random_clip_model.visual.embed(video.flatten(0, 1)).view(2, FRAMES, 17, -1)
        sequence = torch.cat([tokens[:, 0, :1], tokens[:, :, 1:].flatten(1, 2)], dim=1)  # [B, 1+T*N, D]
        query, key, _ = block.attn.qkv(block.ln_1(sequence))  # [B, H, 1+T*N, Dh]
    probabilities = (query[:, :, :1] @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])).softmax(dim=-1)
    attention = probabilities[:, :, 0, 1:].mean(dim=1).view(2, FRAMES, 16)  # [B, T, N]
    low, high = attention.amin(dim=-1, keepdim=True), attention.amax(dim=-1, keepdim=True)
    torch.testing.assert_close(details[0].attention, (attention - low) / (high - low))


# --------------------------------------------------------------------------- #
# STOP's invariants with a video CLS
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_spatial_at_initialisation_equals_the_baseline_exactly(random_clip_model, layout):
    video = random_videos(2)
    baseline = features(model_of(random_clip_model, "none", layout), video)
    for mode in (True, False):
        assert torch.equal(features(model_of(random_clip_model, "spatial", layout).train(mode), video), baseline)


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_identical_frames_get_no_temporal_prompts(random_clip_model, layout):
    """At initialisation, with any weights, and while training with dropout: ``n_t = 0`` at every gap of every
    block, so STOP at initialisation gives the baseline's feature."""
    video = still_videos(2)
    baseline = features(model_of(random_clip_model, "none", layout), video)
    initial, details = features(model_of(random_clip_model, "stop", layout).eval(), video, return_details=True)
    assert all(d.counts.eq(0).all() and d.variation.le(stop.VARIATION_DEAD_ZONE).all() for d in details)
    torch.testing.assert_close(initial, baseline, rtol=0, atol=1e-6)
    for prompt in ("stop", "temporal"):
        model = as_if_trained(model_of(random_clip_model, prompt, layout, dropout=0.5))
        for mode in (False, True):
            model.train(mode)
            for seed in range(2):
                torch.manual_seed(seed)
                _, details = features(model, video, return_details=True)
                assert all(d.counts.eq(0).all() and d.variation.le(stop.VARIATION_DEAD_ZONE).all() for d in details)


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_a_change_between_frames_3_and_4_is_prompted_at_that_gap_only(random_clip_model, layout):
    video = one_change_video()
    _, details = features(model_of(random_clip_model, "stop", layout).eval(), video, return_details=True)
    assert torch.equal(details[0].counts > 0, torch.tensor([[False, False, True, False, False, False, False]]))


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_prompt_generators_get_a_gradient_through_the_video_cls(random_clip_model, layout):
    """The video feature is the CLS alone, so every gradient reaches the prompts through it; CLIP gets none."""
    model = as_if_trained(model_of(random_clip_model, "stop", layout)).train()
    text = F.normalize(torch.randn(2, RANDOM_CLIP_CONFIG.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    F.cross_entropy(model.class_logits(random_videos(2), text), torch.tensor([0, 1])).backward()
    assert all(p.grad is None for p in model.clip.parameters())
    named = dict(model.prompters.named_parameters())
    no_gradient = [name for name, p in named.items() if p.grad is None or not p.grad.any()]
    assert no_gradient == [], no_gradient


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_one_optimiser_step_from_initialisation_changes_the_video_feature(random_clip_model, layout):
    """From the zero start (``P^s``'s last Linear), every tensor that starts at zero receives a gradient through
    the video CLS, and one step moves the feature."""
    model = model_of(random_clip_model, "stop", layout, dropout=0.0).train()
    zero_started = [parameter for parameter in model.trainable_parameters() if not parameter.any()]
    video = random_videos(2)
    before = features(model, video)
    text = F.normalize(torch.randn(2, RANDOM_CLIP_CONFIG.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    F.cross_entropy(model.class_logits(video, text), torch.tensor([0, 1])).backward()
    assert len(zero_started) == 2 * RANDOM_CLIP_CONFIG.vision_layers  # weight and bias of P^s's last Linear, each block
    assert all(parameter.grad.any() for parameter in zero_started)
    optimizer.step()
    assert ((features(model, video) - before).norm(dim=-1) > 1e-4).all()


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_a_mixed_batch_gives_each_video_its_own_feature(random_clip_model, layout):
    batch = torch.cat([still_videos(1, seed=1), random_videos(1, seed=2), random_videos(1, seed=3)])
    model = as_if_trained(model_of(random_clip_model, "stop", layout))
    together, details = features(model, batch, return_details=True)
    assert details[0].counts[0].eq(0).all() and details[0].counts[1:].gt(0).any()
    for index in range(3):
        alone, alone_details = features(model, batch[index : index + 1], return_details=True)
        torch.testing.assert_close(together[index : index + 1], alone, rtol=0, atol=1e-5)
        assert torch.equal(details[0].counts[index : index + 1], alone_details[0].counts)


@pytest.mark.parametrize("prompt", PROMPT_VARIANTS)
@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_every_variant_runs_with_either_depth(random_clip_model, prompt, layout):
    for prompt_layers in (None, 1):
        model = as_if_trained(model_of(random_clip_model, prompt, layout, prompt_layers=prompt_layers))
        video_features, details = features(model, random_videos(2), return_details=True)
        assert video_features.shape == (2, RANDOM_CLIP_CONFIG.embed_dim) and torch.isfinite(video_features).all()
        assert len(details) == (0 if prompt == "none" else prompt_layers or RANDOM_CLIP_CONFIG.vision_layers)
        one_frame = features(model, random_videos(2, frames=1))
        assert one_frame.shape == (2, RANDOM_CLIP_CONFIG.embed_dim)


@pytest.mark.parametrize("layout", CLS_LAYOUTS)
def test_bfloat16_autocast_forward_and_backward(random_clip_model, layout):
    """Prompt weights of a trained model's size (0.05): bf16 keeps the same regions and counts, and the feature.

    With the 0.2 of ``as_if_trained`` the prompts are large enough that bf16 rounding moves a region in a deeper
    block; one video CLS then moves more than a mean of eight frame features does."""
    model = as_if_trained(model_of(random_clip_model, "stop", layout), scale=0.05).train()
    video, text = random_videos(2), F.normalize(torch.randn(2, RANDOM_CLIP_CONFIG.embed_dim), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model.class_logits(video, text), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.trainable_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = features(model.eval(), video).float()
    cosine = (low_precision * features(model, video)).sum(dim=-1)
    assert (cosine > 0.98).all(), cosine


def test_the_readout_is_a_saved_choice_of_the_run(tiny_root, golden_clip, tmp_path):
    """``--attention joint`` needs ``--readout cls``: one line and nothing written. A run records its readout and
    attention; ``--resume`` refuses another one, and ``evaluate.py`` builds the model the checkpoint names."""
    out = tmp_path / "run"
    code, output = train_tiny(tiny_root, golden_clip, out, "--readout", "mean", "--attention", "joint")
    assert code == 1 and error_lines(output) == [line for line in output.splitlines() if line.strip()][-1:], output
    assert "attention='joint' with readout='mean'" in output and not out.exists()
    code, output = train_tiny(tiny_root, golden_clip, out, "--readout", "cls", "--attention", "joint", "--epochs", 1)
    assert code == 0, output
    saved = torch.load(out / "last.pt", weights_only=True)["config"]
    assert (saved["readout"], saved["attention"]) == ("cls", "joint")
    code, output = train_tiny(tiny_root, golden_clip, out, "--readout", "mean", "--resume")
    assert code == 1 and "--readout mean (the run has cls)" in output, output
    assert len(torch.load(out / "last.pt", weights_only=True)["records"]) == 1  # the run is untouched
    model, _, _ = runs.load_trained(out / "best.pt", str(golden_clip), torch.device("cpu"))
    assert (model.config.readout, model.config.attention) == ("cls", "joint")
