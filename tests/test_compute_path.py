"""The compute path at GPU speed, checked on any device: no host sync, one graph, the frozen weights cast once.

A GPU waits on Python when the forward reads a value back (``int(counts.max())``), when ``torch.compile`` breaks the
graph, or when autocast casts every frozen weight again at each call. These tests pin the properties that rule
those out, on the CPU: the ``meta`` device has no values to read back, ``fullgraph=True`` refuses any graph break
(the ``aot_eager`` backend traces the backward pass too, without generating code), and the profiler lists the
casts autocast makes.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import FRAMES, RANDOM_CLIP_CONFIG, as_if_trained, random_videos
from torch.profiler import ProfilerActivity, profile

import clip_model
from plumbing import runtime
from stop import PROMPT_VARIANTS, STOPConfig, STOPModel


def test_patch_embedding_as_matmul_equals_the_convolution():
    """The CUDA path of ``VisionTransformer.embed``: a stride-P convolution as one matrix product of the patches."""
    generator = torch.Generator().manual_seed(0)
    images, kernel = torch.randn(3, 3, 48, 48, generator=generator), torch.randn(40, 3, 16, 16, generator=generator)
    expected = F.conv2d(images, kernel, stride=16).flatten(2).transpose(1, 2)  # [3, 9, 40]
    torch.testing.assert_close(clip_model.patch_embedding_as_matmul(images, kernel), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("prompt", PROMPT_VARIANTS)
def test_encode_video_runs_on_the_meta_device(prompt):
    """Tensors on ``meta`` have shapes but no values: any read-back to the host, or a shape that depends on the
    data (such as the largest prompt count of the batch), fails here."""
    model = STOPModel(clip_model.random_clip(RANDOM_CLIP_CONFIG), STOPConfig(prompt)).to("meta")
    video_features, details = model.encode_video(torch.empty(2, FRAMES, 3, 32, 32, device="meta"), return_details=True)
    assert video_features.device.type == "meta" and video_features.shape == (2, RANDOM_CLIP_CONFIG.embed_dim)
    assert all(block.counts.shape == (2, FRAMES - 1) for block in details)


@pytest.mark.parametrize(
    ("prompt", "grad_checkpoint"), [*((prompt, False) for prompt in PROMPT_VARIANTS), ("stop", True)]
)
def test_encode_video_compiles_to_one_graph_forward_and_backward(random_clip_model, prompt, grad_checkpoint):
    """``torch.compile(fullgraph=True)`` raises at the first graph break; the compiled forward and its gradients
    equal the eager ones (dropout off, so both draw nothing at random). Activation checkpointing wraps every
    variant's blocks alike, so it is checked on ``stop``, which runs every step."""
    torch._dynamo.reset()
    model = as_if_trained(
        STOPModel(copy.deepcopy(random_clip_model), STOPConfig(prompt, dropout=0.0), grad_checkpoint=grad_checkpoint)
    ).train()
    compiled = torch.compile(model.encode_video, fullgraph=True, backend="aot_eager")
    video = random_videos(2)
    outputs, gradients = [], []
    for encode in (model.encode_video, compiled):
        video_features = encode(video)
        outputs.append(video_features.detach())
        if prompt != "none":
            video_features.square().sum().backward()
            gradients.append([parameter.grad.clone() for parameter in model.trainable_parameters()])
            model.zero_grad(set_to_none=True)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    for compiled_gradient, eager_gradient in zip(*gradients):
        torch.testing.assert_close(compiled_gradient, eager_gradient, rtol=1e-5, atol=1e-6)


def test_convert_matmul_weights_keeps_norms_embeddings_and_temperature_in_fp32(random_clip_model):
    converted = clip_model.convert_matmul_weights(copy.deepcopy(random_clip_model), torch.bfloat16)
    low = {name for name, tensor in converted.state_dict().items() if tensor.dtype == torch.bfloat16}
    matmul_weights = {
        name
        for name in random_clip_model.state_dict()
        if name.endswith(("in_proj_weight", "in_proj_bias", "c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"))
        or name.endswith(("out_proj.weight", "out_proj.bias"))
        or name in ("visual.conv1.weight", "visual.proj", "text_projection")
    }
    assert low == matmul_weights
    assert converted.logit_scale.dtype == converted.visual.ln_pre.weight.dtype == torch.float32
    for name, tensor in converted.state_dict().items():  # the same values, rounded once
        torch.testing.assert_close(
            tensor.float(), random_clip_model.state_dict()[name].to(tensor.dtype).float(), rtol=0, atol=0
        )


def copies_of_frozen_weights(model: STOPModel, video: torch.Tensor) -> int:
    """How many times a bf16 autocast forward casts a tensor shaped like a block's attention in-projection."""
    shape = list(model.clip.visual.transformer.resblocks[0].attn.in_proj_weight.shape)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        with torch.no_grad(), torch.autocast(video.device.type, dtype=torch.bfloat16):
            model.encode_video(video)
    return sum(1 for event in profiler.events() if event.name == "aten::_to_copy" and event.input_shapes[:1] == [shape])


def test_bf16_runs_cast_the_frozen_weights_once_and_match_fp32(random_clip_model, device):
    """``runtime.build_model(..., precision="bf16")``: the frozen CLIP is cast once, not by autocast at every
    forward, and the prompt generators keep fp32 weights. Tolerances: bf16 keeps 8 bits of mantissa, and through 3
    random blocks with random prompt generators the features stay within cosine 0.97 of fp32, as those of autocast
    over fp32 weights do (it rounds the same weights to the same bf16 values, at each call), and within cosine 0.99
    of autocast over fp32 weights."""
    backbone = runtime.Backbone(copy.deepcopy(random_clip_model), "tiny", "", clip_model.byte_tokenize)
    reference = as_if_trained(runtime.build_model(backbone, STOPConfig("stop"), device))
    video = random_videos(2).to(device)
    # fp32 weights: cast again in every block
    assert copies_of_frozen_weights(reference, video) == RANDOM_CLIP_CONFIG.vision_layers

    backbone = runtime.Backbone(copy.deepcopy(random_clip_model), "tiny", "", clip_model.byte_tokenize)
    model = runtime.build_model(backbone, STOPConfig("stop"), device, precision="bf16").eval()
    model.load_trainable_state_dict(reference.trainable_state_dict())
    assert copies_of_frozen_weights(model, video) == 0
    assert all(parameter.dtype == torch.float32 for parameter in model.trainable_parameters())
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        converted = model.encode_video(video).float()
        autocast_only = reference.encode_video(video).float()
    with torch.no_grad():
        full_precision = reference.encode_video(video)
    assert ((converted * full_precision).sum(dim=-1) > 0.97).all()
    assert ((converted * autocast_only).sum(dim=-1) > 0.99).all()
