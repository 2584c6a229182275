"""STOP (stop.py): the invariants of ``docs/method.md``, each pinned by a real assertion.

Most tests use ``conftest.py``'s random CLIP (32 px, patch 8, so N = 16 patches; width 128 with 2 heads; 3 blocks),
built there so they always run; the golden 32-px checkpoint is used where a loaded checkpoint matters.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FRAMES,
    RANDOM_CLIP_CONFIG,
    as_if_trained,
    features,
    one_change_video,
    prompt_keys,
    random_videos,
    still_videos,
)
from torch.utils.checkpoint import checkpoint

import clip_model
import stop
from loading.errors import ConfigError
from stop import (
    PAPER_TRAINABLE_PARAMETERS,
    PROMPT_VARIANTS,
    STOPConfig,
    STOPModel,
    cls_attention_map,
    prompted_block,
)


@pytest.fixture(params=["random", "golden"])
def any_clip(request, random_clip_model) -> clip_model.CLIP:
    """The random CLIP, then the golden checkpoint (``tests/fixtures``)."""
    return random_clip_model if request.param == "random" else request.getfixturevalue("golden_clip_model")


def on(device: torch.device, clip: clip_model.CLIP) -> clip_model.CLIP:
    """``clip`` itself on the CPU, a copy of it on another device (the module-wide fixture stays on the CPU)."""
    return clip if device.type == "cpu" else copy.deepcopy(clip).to(device)


# --------------------------------------------------------------------------- #
# Construction, parameters, freezing
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"prompt": "dynamic"}, "'dynamic'"),
        ({"eta": 0}, "eta=0"),
        ({"rho": 0.0}, "rho=0.0"),
        ({"rho": 1.5}, "rho=1.5"),
        ({"prompt_layers": 0}, "prompt_layers=0"),
        ({"prompt_layers": 4}, "prompt_layers=4"),
        ({"alpha": 1.2}, "alpha=1.2"),
        ({"dropout": 1.0}, "dropout=1.0"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_value(random_clip_model, kwargs, named):
    with pytest.raises(ConfigError, match="expected") as error:
        STOPModel(random_clip_model, STOPConfig(**kwargs))
    assert named in str(error.value)


def test_trainable_parameters_per_variant(random_clip_model):
    counts = {
        prompt: STOPModel(random_clip_model, STOPConfig(prompt)).num_trainable_parameters()
        for prompt in PROMPT_VARIANTS
    }
    assert counts["none"] == 0
    # eta tokens per block
    assert counts["static"] == RANDOM_CLIP_CONFIG.vision_layers * 4 * RANDOM_CLIP_CONFIG.vision_width
    assert counts["stop"] == counts["spatial"] + counts["temporal"]
    assert (
        STOPModel(random_clip_model, STOPConfig(prompt_layers=1)).num_trainable_parameters()
        * RANDOM_CLIP_CONFIG.vision_layers
        == counts["stop"]
    )
    model = STOPModel(random_clip_model)
    assert f"trainable parameters={counts['stop']:,}" in repr(model)


def test_vit_b32_trainable_parameters_stay_below_the_papers():
    model = STOPModel(clip_model.random_clip(clip_model.VIT_B_32))
    count = model.num_trainable_parameters()
    print(f"\nSTOP trainable parameters, ViT-B/32: {count:,} (paper: {PAPER_TRAINABLE_PARAMETERS:,})")
    assert count < PAPER_TRAINABLE_PARAMETERS
    assert 0.1e6 < count / 12 < 0.2e6  # the spec's budget per block
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_clip_is_frozen_and_stays_in_eval_mode(random_clip_model):
    model = STOPModel(random_clip_model).train()
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert all(p.requires_grad for p in model.trainable_parameters())
    assert not any(module.training for module in model.clip.modules())
    assert all(module.training for module in model.prompters.modules())


def test_none_trains_nothing_and_is_frozen_clip4clip_meanp(random_clip_model):
    model = STOPModel(random_clip_model, STOPConfig("none", readout="mean"))
    video = random_videos(2)
    assert model.num_trainable_parameters() == 0 and model.trainable_state_dict() == {}
    expected = F.normalize(random_clip_model.encode_image(video.flatten(0, 1)).view(2, FRAMES, -1).mean(dim=1), dim=-1)
    video_features, details = features(model, video, return_details=True)
    assert details == []
    torch.testing.assert_close(video_features, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- #
# Steps 1 and 8 against independent computations
# --------------------------------------------------------------------------- #


def test_cls_attention_map_is_the_blocks_own_attention(random_clip_model):
    block = random_clip_model.visual.transformer.resblocks[1]
    normed = block.ln_1(torch.randn(6, 17, RANDOM_CLIP_CONFIG.vision_width))
    query, key, _ = block.attn.qkv(normed)  # [6, H, 17, Dh]
    probabilities = (query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])).softmax(dim=-1)
    attention = probabilities[:, :, 0, 1:].mean(dim=1)  # CLS row, patch columns, mean over heads
    low, high = attention.min(dim=-1, keepdim=True).values, attention.max(dim=-1, keepdim=True).values
    torch.testing.assert_close(cls_attention_map(block, normed), (attention - low) / (high - low))


def test_prompted_block_equals_explicit_per_frame_sequences(random_clip_model):
    """Step 8, batched with a key mask, against a loop building ``[frame tokens, p_{t-1}[:n], p_t[:n]]``."""
    block = random_clip_model.visual.transformer.resblocks[0]
    batch, frames, length, width, eta = 3, 4, 17, RANDOM_CLIP_CONFIG.vision_width, 4
    h = torch.randn(batch * frames, length, width)
    prompts = torch.randn(batch, frames - 1, eta, width)
    counts = torch.tensor([[0, 2, 4], [1, 0, 0], [0, 0, 0]])  # a video with no prompts among videos with some
    with torch.no_grad():
        result = prompted_block(block, h, block.ln_1(h), prompt_keys(block, prompts), counts).view(
            batch, frames, length, width
        )
        attn, heads = block.attn, block.attn.heads
        for video in range(batch):
            for t in range(frames):
                x = h.view(batch, frames, length, width)[video, t]
                left = prompts[video, t - 1, : counts[video, t - 1]] if t > 0 else prompts[video, 0, :0]
                right = prompts[video, t, : counts[video, t]] if t < frames - 1 else prompts[video, 0, :0]
                keys_in = torch.cat([block.ln_1(x), left, right])  # prompts are already in ln_1's output space
                q = F.linear(block.ln_1(x), attn.in_proj_weight[:width], attn.in_proj_bias[:width])
                k, v = F.linear(keys_in, attn.in_proj_weight[width:], attn.in_proj_bias[width:]).chunk(2, dim=-1)
                q, k, v = (y.view(len(y), heads, -1).transpose(0, 1) for y in (q, k, v))
                out = ((q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v  # [H, L, Dh]
                x = x + attn.out_proj(out.transpose(0, 1).flatten(1))
                expected = x + block.mlp(block.ln_2(x))
                torch.testing.assert_close(result[video, t], expected, rtol=1e-5, atol=1e-5)


def test_prompted_block_without_prompts_is_the_plain_block(random_clip_model):
    """Masked slots add nothing. Masked attention is another kernel than the plain one, so equal within 1e-6 (it
    is bit-identical on the 2-core CI CPU); with no slot at all (``spatial``) the plain block runs, bit for bit."""
    block = random_clip_model.visual.transformer.resblocks[0]
    h = torch.randn(8, 17, RANDOM_CLIP_CONFIG.vision_width)
    counts = torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad():
        kv = prompt_keys(block, torch.randn(2, 3, 4, RANDOM_CLIP_CONFIG.vision_width))
        result = prompted_block(block, h, block.ln_1(h), kv, counts)
        torch.testing.assert_close(result, block(h), rtol=0, atol=1e-6)
        no_slot = prompted_block(block, h, block.ln_1(h), kv[:, :, :0], counts)
        assert torch.equal(no_slot, block(h))


# --------------------------------------------------------------------------- #
# The spec's invariants
# --------------------------------------------------------------------------- #


def test_spatial_at_initialisation_equals_the_baseline_exactly(any_clip, device):
    """Bit-identical on the CPU: ``p^s`` is exactly zero at initialisation and the same kernels run. On CUDA within
    1e-6: the baseline and the prompted model may be given other kernels for the same shapes."""
    clip, video = on(device, any_clip), random_videos(2)
    same = torch.equal if device.type == "cpu" else lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-6)
    baseline = features(STOPModel(clip, STOPConfig("none")), video)
    spatial, details = features(STOPModel(clip, STOPConfig("spatial")).eval(), video, return_details=True)
    assert same(spatial, baseline)
    assert all(d.regions.any() for d in details)  # regions were chosen, and prompted with zeros
    assert same(features(STOPModel(clip, STOPConfig("spatial")).train(), video), baseline)


def test_identical_frames_get_no_temporal_prompts(random_clip_model, device):
    """``W^t`` is exactly 0 in exact arithmetic and on the CI CPU; a matrix product may round one row differently at
    two batch positions on other hardware, so the test allows ``W^t`` up to the dead zone ``tau``, where the count
    is 0 by definition. With every prompt slot masked the features equal the baseline's within 1e-6."""
    clip = on(device, random_clip_model)
    video = still_videos(2)
    baseline = features(STOPModel(clip, STOPConfig("none")), video)
    initial, details = features(STOPModel(clip, STOPConfig("stop")).eval(), video, return_details=True)
    assert all(d.counts.eq(0).all() and d.variation.le(stop.VARIATION_DEAD_ZONE).all() for d in details)
    torch.testing.assert_close(initial, baseline, rtol=0, atol=1e-6)
    # Replicate padding over time: with any weights, identical frames stay identical and get no prompts (in eval
    # mode here; in training mode, with dropout, in the next test).
    for prompt in ("stop", "temporal"):
        _, details = features(as_if_trained(STOPModel(clip, STOPConfig(prompt))), video, return_details=True)
        assert all(d.counts.eq(0).all() and d.variation.le(stop.VARIATION_DEAD_ZONE).all() for d in details)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        _, details = features(as_if_trained(STOPModel(clip, STOPConfig("stop"))), video, return_details=True)
    assert all(d.counts.eq(0).all() for d in details)


@pytest.mark.parametrize("prompt", ["stop", "temporal"])
def test_identical_frames_get_no_temporal_prompts_while_training(random_clip_model, device, prompt):
    """In training mode with dropout 0.5, for several draws: ``P^s``'s dropout draws one mask per video
    (``stop.video_dropout``), so identical frames stay identical after spatial prompting and get no prompts."""
    clip = on(device, random_clip_model)
    video = still_videos(2)
    model = as_if_trained(STOPModel(clip, STOPConfig(prompt, dropout=0.5))).train()
    drawn = []
    for seed in range(4):
        torch.manual_seed(seed)
        video_features, details = features(model, video, return_details=True)
        assert all(d.counts.eq(0).all() and d.variation.le(stop.VARIATION_DEAD_ZONE).all() for d in details), seed
        drawn.append(video_features)
    if prompt == "stop":  # the dropout did act: each draw prompted the regions differently
        assert not torch.allclose(drawn[0], drawn[1])


def test_a_dropout_mask_per_frame_would_give_identical_frames_prompts(random_clip_model, monkeypatch):
    """Why ``video_dropout`` shares one mask across a video's frames: a mask per frame makes identical frames differ
    after spatial prompting, and the temporal prompter then prompts them."""
    monkeypatch.setattr(stop, "video_dropout", lambda x, batch, p, training: F.dropout(x, p, training))
    video = still_videos(2)
    model = as_if_trained(STOPModel(random_clip_model, STOPConfig("stop", dropout=0.5))).train()
    for seed in range(4):
        torch.manual_seed(seed)
        _, details = features(model, video, return_details=True)
        assert details[0].counts.gt(0).any(), seed


def test_a_change_between_frames_3_and_4_is_prompted_at_that_gap_only(any_clip, device):
    """In the first prompted block; deeper blocks see frames 3-4 changed by those prompts, as they should."""
    any_clip = on(device, any_clip)
    expected = torch.tensor([[False, False, True, False, False, False, False]])
    for model in (
        STOPModel(any_clip, STOPConfig("stop")).eval(),
        as_if_trained(STOPModel(any_clip, STOPConfig("temporal"))),
    ):
        _, details = features(model, one_change_video(), return_details=True)
        assert torch.equal(details[0].counts > 0, expected)
        assert torch.equal(details[0].variation > stop.VARIATION_DEAD_ZONE, expected)
    model = STOPModel(any_clip, STOPConfig("stop", prompt_layers=1)).eval()
    _, details = features(model, one_change_video(), return_details=True)
    assert len(details) == 1 and torch.equal(details[0].counts > 0, expected)


def test_prompt_count_grows_with_the_change(random_clip_model):
    model = STOPModel(random_clip_model, STOPConfig("stop")).eval()
    variations, counts = [], []
    for scale in (0.0, 0.01, 0.1, 0.3, 1.0, 3.0):
        _, details = features(model, one_change_video(scale=scale), return_details=True)
        variations.append(details[0].variation[0, 2].item())
        counts.append(details[0].counts[0, 2].item())
    assert variations[0] == 0 and counts[0] == 0
    assert all(a < b for a, b in zip(variations, variations[1:])), variations
    assert all(a <= b for a, b in zip(counts, counts[1:])) and counts[-1] > counts[1], counts
    # n_t = ceil(eta W^t) above the dead zone tau, 0 within it
    assert all(n == (math.ceil(4 * w) if w > stop.VARIATION_DEAD_ZONE else 0) for n, w in zip(counts, variations))


def test_a_change_within_the_dead_zone_gets_no_prompt(random_clip_model):
    """Step 6's dead zone: float noise between frames (here a change of 1e-6 of the image) gives ``0 < W^t <= tau``
    and no prompt, where ``ceil(eta W^t)`` alone would insert one."""
    _, details = features(
        STOPModel(random_clip_model, STOPConfig("stop")).eval(), one_change_video(scale=1e-6), return_details=True
    )
    variation = details[0].variation[0, 2].item()
    assert 0 < variation <= stop.VARIATION_DEAD_ZONE and math.ceil(4 * variation) == 1
    assert details[0].counts.eq(0).all()


def test_reversal_changes_stop_but_not_the_baseline_or_static(random_clip_model):
    video = random_videos(3)
    reversed_video = video.flip(1)
    for model in (
        STOPModel(random_clip_model, STOPConfig("none")),
        as_if_trained(STOPModel(random_clip_model, STOPConfig("static"))),
    ):
        torch.testing.assert_close(features(model, reversed_video), features(model, video), rtol=0, atol=1e-6)
    # At initialisation only P^t's small prompts see the order (still far above the 1e-7 of rounding).
    for model, least in (
        (STOPModel(random_clip_model, STOPConfig("stop")).eval(), 1e-5),
        (as_if_trained(STOPModel(random_clip_model, STOPConfig("stop"))), 0.05),
    ):
        change = (features(model, reversed_video) - features(model, video)).norm(dim=-1)
        assert (change > least).all(), change


def test_a_mixed_batch_gives_each_video_its_own_feature(random_clip_model):
    """Videos with different prompt counts share a batch through the key mask: nothing truncated or leaked."""
    still = still_videos(1, seed=1)
    batch = torch.cat([still, random_videos(1, seed=2), one_change_video(seed=3)])
    model = as_if_trained(STOPModel(random_clip_model, STOPConfig("stop")))
    together, details = features(model, batch, return_details=True)
    totals = details[0].counts.sum(dim=1)
    assert totals[0] == 0 and totals[1] > totals[2] > 0, totals
    for index in range(3):
        alone, alone_details = features(model, batch[index : index + 1], return_details=True)
        torch.testing.assert_close(together[index : index + 1], alone, rtol=0, atol=1e-5)
        for mixed, single in zip(details, alone_details):
            assert torch.equal(mixed.counts[index : index + 1], single.counts)
            assert torch.equal(mixed.regions[index : index + 1], single.regions)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def test_only_stop_parameters_train_and_clip_stays_bit_identical(random_clip_model, device):
    model = as_if_trained(STOPModel(on(device, random_clip_model), STOPConfig("stop"))).train()
    before = {name: tensor.clone() for name, tensor in model.clip.state_dict().items()}
    trainable_before = [p.detach().clone() for p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.2)
    text = F.normalize(torch.randn(2, RANDOM_CLIP_CONFIG.embed_dim), dim=-1).to(device)
    loss = F.cross_entropy(model.class_logits(random_videos(2).to(device), text), torch.tensor([0, 1], device=device))
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.clip.state_dict().items())
    named = dict(model.prompters.named_parameters())
    no_gradient = [name for name, p in named.items() if p.grad is None or not p.grad.any()]
    assert no_gradient == [], no_gradient  # N^s through r W^s, N^t through the W^t scaling, everything else
    assert all(not torch.equal(a, b) for a, b in zip(trainable_before, model.trainable_parameters()))


def test_activation_checkpointing_gives_the_same_gradients(random_clip_model, monkeypatch):
    calls = []
    monkeypatch.setattr(stop, "checkpoint", lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))
    video, text = random_videos(2), F.normalize(torch.randn(2, RANDOM_CLIP_CONFIG.embed_dim), dim=-1)
    gradients = []
    for grad_checkpoint in (False, True):
        model = as_if_trained(STOPModel(random_clip_model, STOPConfig("stop"), grad_checkpoint=grad_checkpoint)).train()
        torch.manual_seed(0)  # the same dropout masks; checkpointing replays them in the recomputation
        F.cross_entropy(model.class_logits(video, text), torch.tensor([0, 1])).backward()
        gradients.append([p.grad for p in model.trainable_parameters()])
    assert len(calls) == RANDOM_CLIP_CONFIG.vision_layers  # one recomputed segment per block, only when asked
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain)


def test_bfloat16_autocast_forward_and_backward(random_clip_model, device):
    """With the mean readout; ``test_readout.py`` checks the video CLS."""
    model = as_if_trained(STOPModel(on(device, random_clip_model), STOPConfig("stop", readout="mean"))).train()
    video, text = random_videos(2), F.normalize(torch.randn(2, RANDOM_CLIP_CONFIG.embed_dim), dim=-1).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model.class_logits(video.to(device), text), torch.tensor([0, 1], device=device))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.trainable_parameters())
    with torch.autocast(device.type, dtype=torch.bfloat16):
        low_precision = features(model.eval(), video).float()
    cosine = (low_precision * features(model, video)).sum(dim=-1)
    assert (cosine > 0.98).all(), cosine


def blob_videos(count: int, generator: torch.Generator, frames: int = FRAMES, step: int = 2) -> torch.Tensor:
    """``[count, T, 3, 32, 32]``: a bright Gaussian blob moving right by ``step`` px a frame, random start and row."""
    start = torch.randint(4, 32 - 4 - step * (frames - 1) + 1, (count,), generator=generator).float()
    row = torch.randint(6, 32 - 6, (count,), generator=generator).float()
    column = start[:, None] + step * torch.arange(frames)  # [count, T]
    pixels = torch.arange(32).float()
    rows = (pixels - row[:, None]) ** 2  # [count, H]
    columns = (pixels - column[:, :, None]) ** 2  # [count, T, W]
    blob = torch.exp(-(rows[:, None, :, None] + columns[:, :, None, :]) / (2 * 2.5**2))  # [count, T, H, W]
    return (-1.5 + 3.5 * blob)[:, :, None].expand(-1, -1, 3, -1, -1).contiguous()


def train_direction(clip: clip_model.CLIP, prompt: str, steps: int = 40) -> tuple[STOPModel, torch.Tensor]:
    """A few dozen AdamW steps on "moves right" (0) versus "moves left" (1); the class texts are random unit vectors."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = STOPModel(clip, STOPConfig(prompt)).train()
    class_features = F.normalize(torch.randn(2, clip.config.embed_dim, generator=generator), dim=-1)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        right = blob_videos(16, generator)
        left = torch.rand(16, generator=generator) < 0.5
        videos = torch.where(left[:, None, None, None, None], right.flip(1), right)
        loss = F.cross_entropy(model.class_logits(videos, class_features), left.long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), class_features


def test_stop_learns_motion_direction_while_static_stays_at_chance(random_clip_model):
    """The paper's claim in miniature. The held-out set pairs each video with its reversal, so a model blind
    to frame order gives both the same feature and scores exactly 0.5."""
    right = blob_videos(32, torch.Generator().manual_seed(1234))
    videos, labels = torch.cat([right, right.flip(1)]), torch.cat([torch.zeros(32), torch.ones(32)]).long()
    accuracy = {}
    for prompt in ("stop", "static"):
        model, class_features = train_direction(random_clip_model, prompt)
        with torch.no_grad():
            accuracy[prompt] = (model.class_logits(videos, class_features).argmax(-1) == labels).float().mean().item()
        if prompt == "static":
            torch.testing.assert_close(features(model, right.flip(1)), features(model, right), rtol=0, atol=1e-6)
    baseline = STOPModel(random_clip_model, STOPConfig("none"))
    with torch.no_grad():
        accuracy["none"] = (baseline.class_logits(videos, class_features).argmax(-1) == labels).float().mean().item()
    assert accuracy["stop"] >= 0.9, accuracy
    assert accuracy["static"] <= 0.6 and accuracy["none"] <= 0.6, accuracy


# --------------------------------------------------------------------------- #
# Interface
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("prompt", PROMPT_VARIANTS)
def test_details_per_prompted_block(random_clip_model, prompt):
    model = STOPModel(random_clip_model, STOPConfig(prompt, prompt_layers=2)).eval()
    video_features, details = features(model, random_videos(2), return_details=True)
    assert video_features.shape == (2, RANDOM_CLIP_CONFIG.embed_dim)
    torch.testing.assert_close(video_features.norm(dim=-1), torch.ones(2))
    assert len(details) == (0 if prompt == "none" else 2)
    for block in details:
        assert block.regions.shape == block.fused_score.shape == block.attention.shape == (2, FRAMES, 16)
        assert block.counts.shape == block.variation.shape == (2, FRAMES - 1) and block.counts.dtype == torch.long
        assert block.regions.dtype == torch.bool
        assert block.counts.min() >= 0 and block.counts.max() <= 4
        if prompt in ("spatial", "stop"):
            assert block.regions.sum(dim=-1).eq(math.ceil(16 / 8)).all()  # K_s = ceil(rho N)
            top = block.fused_score.topk(2, dim=-1).indices
            assert torch.equal(block.regions, torch.zeros_like(block.regions).scatter(-1, top, True))
        else:
            assert not block.regions.any()
        if prompt == "static":
            assert block.counts.eq(4).all()
        if prompt in ("temporal", "stop"):
            noise = block.variation <= stop.VARIATION_DEAD_ZONE
            assert torch.equal(block.counts, torch.ceil(4 * block.variation).long().masked_fill(noise, 0))


@pytest.mark.parametrize("task", ["recognize", "retrieve"])
def test_a_saved_checkpoint_computes_what_it_did(golden, golden_clip_model, task):
    """Regression: checkpoints of this version (one epoch on the synthetic data, the tiny CLIP; see
    ``tests/fixtures/README.md``) load and give, on a fixed video, the features, regions and prompt counts that
    the code which trained them computed."""
    saved = torch.load(golden / f"stop_checkpoint_{task}.pt", weights_only=True)
    reference = torch.load(golden / "stop_checkpoint_outputs.pt", weights_only=True)
    model = STOPModel(golden_clip_model, STOPConfig.from_dict(saved["config"]))
    model.load_trainable_state_dict(saved["stop"])
    video_features, details = features(model.eval(), reference["video"], return_details=True)
    expected = reference[task]
    torch.testing.assert_close(video_features, expected["features"], rtol=0, atol=1e-6)
    assert torch.equal(torch.stack([block.counts for block in details]), expected["counts"])
    assert torch.equal(torch.stack([block.regions for block in details]), expected["regions"])
    torch.testing.assert_close(torch.stack([block.variation for block in details]), expected["variation"])


@pytest.mark.parametrize(("width", "patch"), [(192, 4), (64, 16)])  # 3 heads on an 8x8 grid; 1 head on 2x2
def test_any_vit_shape(width, patch):
    config = clip_model.CLIPConfig(32, 32, 2, width, patch, 16, 100, 32, 1, 1)
    model = as_if_trained(STOPModel(clip_model.random_clip(config), STOPConfig("stop")))
    video_features, details = features(model, random_videos(2, frames=4), return_details=True)
    patches = (32 // patch) ** 2
    assert video_features.shape == (2, 32) and details[0].regions.shape == (2, 4, patches)
    assert details[0].regions.sum(dim=-1).eq(math.ceil(patches / 8)).all()


def test_region_count_is_ceil_rho_n():
    """``K_s = ceil(rho N)``, rounded first so that float error in ``rho N`` never adds a region."""

    def regions(rho: float, grid: int) -> int:
        return stop.SpatialPrompter(width=64, grid=grid, reduced_dim=8, alpha=0.5, rho=rho, dropout=0.0).num_regions

    assert STOPConfig().rho == 6 / 49
    assert regions(6 / 49, 7) == 6  # ViT-B/32's 7x7 grid: the authors' 6 regions
    assert regions(6 / 49, 14) == 24  # ViT-B/16's 14x14 grid
    assert regions(6 / 49, 4) == 2  # the tiny CLIP's 4x4 grid: ceil(1.96)
    assert regions(0.1, 7) == 5  # ceil(4.9)
    assert 0.07 * 100 > 7 and regions(0.07, 10) == 7  # 7.000000000000001 is 7 regions, not 8


def test_default_regions_per_frame_on_a_7x7_and_a_4x4_grid(random_clip_model):
    """The default ``STOPConfig`` marks 6 regions per frame on ViT-B/32's 7x7 grid (56 px, patch 8 here) and
    ``ceil(6/49 * 16) = 2`` on the tiny CLIP's 4x4 grid."""
    grid7 = clip_model.random_clip(clip_model.CLIPConfig(32, 56, 1, 64, 8, 16, 100, 32, 1, 1))
    videos56 = torch.randn(2, 3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    for model, video, regions in (
        (STOPModel(grid7), videos56, 6),
        (STOPModel(random_clip_model), random_videos(2, frames=3), 2),
    ):
        _, details = features(as_if_trained(model), video, return_details=True)
        patches = model.clip.visual.grid_size**2
        assert all(d.regions.shape[-1] == patches and d.regions.sum(dim=-1).eq(regions).all() for d in details)


def test_single_frame_videos_work(random_clip_model):
    video_features, details = features(
        STOPModel(random_clip_model).eval(), random_videos(2, frames=1), return_details=True
    )
    assert video_features.shape == (2, RANDOM_CLIP_CONFIG.embed_dim) and details[0].counts.shape == (2, 0)


def test_wrong_video_shape_raises(random_clip_model):
    with pytest.raises(ValueError, match=r"expected \[B, T, 3, 32, 32\]"):
        STOPModel(random_clip_model).encode_video(torch.randn(2, 3, 32, 32))


def test_text_similarity_and_class_logits(random_clip_model):
    model = STOPModel(random_clip_model).eval()
    tokens = torch.randint(1, RANDOM_CLIP_CONFIG.vocab_size, (3, RANDOM_CLIP_CONFIG.context_length))
    text = model.encode_text(tokens)
    torch.testing.assert_close(text, F.normalize(random_clip_model.encode_text(tokens), dim=-1))
    video = random_videos(2)
    with torch.no_grad():
        logits = model.class_logits(video, text)
        expected = random_clip_model.logit_scale.exp() * model.encode_video(video) @ text.t()
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(
        model.similarity(text[:2], text), random_clip_model.logit_scale.exp() * text[:2] @ text.t()
    )


def test_trainable_state_round_trips_and_refuses_another_variant_or_shape(random_clip_model):
    source = as_if_trained(STOPModel(random_clip_model, STOPConfig("stop")))
    target = STOPModel(random_clip_model, STOPConfig("stop")).eval()
    target.load_trainable_state_dict(source.trainable_state_dict())
    video = random_videos(2)
    assert torch.equal(features(target, video), features(source, video))
    assert all(key.startswith("prompters.") for key in source.trainable_state_dict())

    with pytest.raises(ConfigError, match="missing prompters.0.temporal"):
        target.load_trainable_state_dict(STOPModel(random_clip_model, STOPConfig("spatial")).trainable_state_dict())
    with pytest.raises(ConfigError, match="unexpected prompters.1.static"):
        one_block = STOPModel(random_clip_model, STOPConfig("static", prompt_layers=1))
        one_block.load_trainable_state_dict(STOPModel(random_clip_model, STOPConfig("static")).trainable_state_dict())
    with pytest.raises(ConfigError, match=r"candidates has shape \(2, 16\), expected \(4, 16\)"):
        target.load_trainable_state_dict(STOPModel(random_clip_model, STOPConfig("stop", eta=2)).trainable_state_dict())
    other_width = clip_model.random_clip(clip_model.CLIPConfig(32, 32, 3, 64, 8, 16, 100, 32, 1, 1))
    with pytest.raises(ConfigError, match="expected"):
        target.load_trainable_state_dict(STOPModel(other_width, STOPConfig("stop")).trainable_state_dict())
    STOPModel(random_clip_model, STOPConfig("none")).load_trainable_state_dict({})
