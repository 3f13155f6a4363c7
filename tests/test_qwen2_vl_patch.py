"""Qwen2-VL / Qwen2.5-VL patches: a tiny model patched vs unpatched (fp32, two images of different grids),
the fused-loss forward, M-RoPE and vision RoPE through the RoPE kernel, revert, dispatch, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import skip_unless_path
from _reference import rel_err
from conftest import HAS_CUDA
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl

from liger_align.kernels.layers.rope import rope
from liger_align.models import apply_liger_kernel
from liger_align.models._vision_layers import LigerLayerNorm, layer_norm_forward, make_vision_rope_function
from liger_align.models.qwen2_vl import (
    apply_liger_kernel_to_qwen2_5_vl,
    apply_liger_kernel_to_qwen2_vl,
    vision_language_forward,
)

VOCAB = 1003
VISION_START, VISION_END, IMAGE, VIDEO = 998, 999, 1000, 1001
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
VISION = dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END)
GRIDS = ((1, 4, 6), (1, 8, 4))  # two images of different grids: 6 and 8 image tokens after the 2x2 merge


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # the default init has tiny weights and unit norms; make every layer matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_qwen2_vl(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    config = Qwen2VLConfig(text_config=dict(TEXT),
                           vision_config=dict(VISION, embed_dim=32, hidden_size=64, mlp_ratio=2), **TOKENS)
    torch.manual_seed(seed)
    return _perturb(Qwen2VLForConditionalGeneration(config), seed + 1)


def tiny_qwen2_5_vl(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    vision = dict(VISION, hidden_size=32, out_hidden_size=64, intermediate_size=48, hidden_act="silu",
                  window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=dict(TEXT), vision_config=vision, **TOKENS)
    torch.manual_seed(seed)
    return _perturb(Qwen2_5_VLForConditionalGeneration(config), seed + 1)


def batch(grids=GRIDS, *, seed: int = 0, merge: int = 2) -> dict[str, torch.Tensor]:
    """One image per row: ``[text..., <vs>, <image> x n, <ve>, text...]`` right-padded; labels on the answer."""
    gen = torch.Generator().manual_seed(seed)
    rows, label_rows = [], []
    for i, (t, h, w) in enumerate(grids):
        prompt = torch.randint(3, 990, (3 + 2 * i,), generator=gen).tolist()
        answer = torch.randint(3, 990, (9 - 2 * i,), generator=gen).tolist() + [2]
        image = [VISION_START] + [IMAGE] * (t * h * w // merge**2) + [VISION_END]
        rows.append(prompt + image + answer)
        label_rows.append([-100] * (len(prompt) + len(image)) + answer)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), torch.tensor(lab), 1
    patches = sum(t * h * w for t, h, w in grids)
    return {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=gen),
        "image_grid_thw": torch.tensor(grids), "mm_token_type_ids": (ids == IMAGE).long(),
    }


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want, tol=1e-4):
    assert got.keys() == want.keys() and got
    for name in want:
        assert rel_err(got[name], want[name]) < tol, name


def test_qwen2_vl_instance_patch_matches_unpatched_and_reverts():
    ref = tiny_qwen2_vl().train()
    model = copy.deepcopy(ref)
    inputs = batch()
    want, want_grads = loss_and_grads(ref, inputs)  # before patching: RoPE is patched module-wide
    assert any(n.startswith("model.visual.patch_embed") for n in want_grads)
    assert any(n.startswith("model.visual.merger") for n in want_grads)
    handle = apply_liger_kernel_to_qwen2_vl(model=model)
    assert all(handle.states[f].startswith("patched") for f in handle.states), handle.states
    assert "5 LayerNorm" in handle.states["layer_norm"]  # 2 blocks x (norm1, norm2) + the merger's ln_q
    assert model.model.visual.merger.ln_q.forward.__func__ is layer_norm_forward
    assert model.forward.__func__ is vision_language_forward
    assert modeling_qwen2_vl.apply_rotary_pos_emb_vision.original is not None
    got, got_grads = loss_and_grads(model, inputs)
    assert got.logits is None and want.logits is not None
    assert rel_err(got.loss, want.loss) < 1e-5
    assert_same_grads(got_grads, want_grads)

    patched = [m for m in model.modules() if "forward" in vars(m)]
    handle.revert()
    assert all(s in ("reverted", "off") for s in handle.states.values())
    assert not any("forward" in vars(m) for m in patched)
    assert not hasattr(modeling_qwen2_vl.apply_rotary_pos_emb, "original")
    assert not hasattr(modeling_qwen2_vl.apply_rotary_pos_emb_vision, "original")
    again, _ = loss_and_grads(model, inputs)
    assert again.logits is not None and rel_err(again.loss, want.loss) < 1e-6


def test_qwen2_vl_class_patch_and_revert():
    ref = tiny_qwen2_vl(seed=3).train()
    inputs = batch(seed=1)
    want, want_grads = loss_and_grads(ref, inputs)
    original_forwards = {c: c.forward for c in (modeling_qwen2_vl.Qwen2VLRMSNorm, modeling_qwen2_vl.Qwen2MLP,
                                                Qwen2VLForConditionalGeneration)}
    with apply_liger_kernel_to_qwen2_vl() as handle:
        assert handle.states["layer_norm"].startswith("patched: LayerNorm of the models built from now on")
        assert handle.states["rms_norm"] == "patched: Qwen2VLRMSNorm.forward"
        assert handle.summary().startswith("qwen2_vl: ")
        model = tiny_qwen2_vl(seed=3).train()  # built while patched: its LayerNorms are LigerLayerNorm
        assert isinstance(model.model.visual.blocks[0].norm1, LigerLayerNorm)
        assert Qwen2VLForConditionalGeneration.forward is vision_language_forward
        got, got_grads = loss_and_grads(model, inputs)
        assert got.logits is None
        assert rel_err(got.loss, want.loss) < 1e-5
        assert_same_grads(got_grads, want_grads)
    assert modeling_qwen2_vl.LayerNorm is torch.nn.LayerNorm
    assert all(c.forward is f for c, f in original_forwards.items())
    after, after_grads = loss_and_grads(model, inputs)  # LigerLayerNorm falls back to nn.LayerNorm's forward
    assert after.logits is not None and rel_err(after.loss, want.loss) < 1e-5
    assert_same_grads(after_grads, want_grads)


def test_qwen2_5_vl_patch_with_gradient_checkpointing():
    ref = tiny_qwen2_5_vl().train()
    model = copy.deepcopy(ref)
    inputs = batch(seed=2)
    want, want_grads = loss_and_grads(ref, inputs)
    model.gradient_checkpointing_enable()
    with apply_liger_kernel_to_qwen2_5_vl(model=model) as handle:
        assert handle.states["layer_norm"].startswith("not present")
        assert "RMSNorm" in handle.states["rms_norm"]
        # the vision blocks' MLPs are gated SiLU MLPs too: 2 decoder + 2 vision
        assert handle.states["swiglu"].startswith("patched: 4 ")
        assert any(p.startswith("model.visual.blocks.0.norm1") for p in handle.patched)
        got, got_grads = loss_and_grads(model, inputs)
        assert rel_err(got.loss, want.loss) < 1e-5
        assert_same_grads(got_grads, want_grads)
    assert not any("forward" in vars(m) for m in model.modules())
    assert not hasattr(modeling_qwen2_5_vl.apply_rotary_pos_emb, "original")


def test_text_only_batch_eval_logits_and_logprob_targets():
    ref = tiny_qwen2_vl(seed=5)
    model = copy.deepcopy(ref)
    inputs = {k: batch(seed=4)[k] for k in ("input_ids", "attention_mask", "labels")}
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] >= 998, 7)  # no image at all
    ref.train()
    want, want_grads = loss_and_grads(ref, inputs)
    ref.eval()
    with torch.no_grad():
        want_logits = ref(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    with apply_liger_kernel_to_qwen2_vl(model=model):
        model.train()
        got, got_grads = loss_and_grads(model, inputs)  # a text-only batch to a vision patch still works
        assert rel_err(got.loss, want.loss) < 1e-5
        assert_same_grads(got_grads, want_grads)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            assert rel_err(out.logits, want_logits) < 1e-5
            targets = inputs["labels"]
            logps = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          logprob_targets=targets).logps
    by_hand = torch.log_softmax(want_logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    by_hand = by_hand * (targets != -100)
    assert out.logps is None and logps.shape == targets.shape
    assert rel_err(logps, by_hand) < 1e-5


def test_dispatch_by_model_type_and_flags():
    model = tiny_qwen2_vl()
    with apply_liger_kernel(model, layer_norm=False, fused_linear_cross_entropy=False) as handle:
        assert handle.states["layer_norm"] == "off"
        assert handle.states["fused_linear_cross_entropy"] == "off"
        assert handle.states["rms_norm"].startswith("patched")
        assert "forward" not in vars(model) and "forward" not in vars(model.model.visual.blocks[0].norm1)
    with apply_liger_kernel(tiny_qwen2_5_vl()) as handle:
        assert handle.states["swiglu"].startswith("patched")


def test_bad_inputs_are_clear_errors():
    model = tiny_qwen2_vl().train()
    apply_liger_kernel_to_qwen2_vl(model=model, rope=False)
    good = batch()
    two_grids_one_image = dict(good, image_grid_thw=torch.tensor([[1, 4, 6], [1, 8, 4], [1, 2, 2]]),
                               pixel_values=torch.randn(24 + 32 + 4, 1176))
    with pytest.raises(ValueError, match=r"input_ids holds 14 image placeholder tokens .* 3 image\(s\) needing .* 15"):
        model(**two_grids_one_image)
    with pytest.raises(ValueError, match=r"pixel_values has 50 patch rows .* sum\(t \* h \* w\) = 56.*inconsistent"):
        model(**dict(good, pixel_values=good["pixel_values"][:50]))
    with pytest.raises(ValueError, match=r"pixel_values must have shape .* 1176"):
        model(**dict(good, pixel_values=good["pixel_values"][:, :100]))
    with pytest.raises(ValueError, match="image_grid_thw was given without pixel_values"):
        model(**dict(good, pixel_values=None))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match=r"Qwen2-VL models .* LlamaForCausalLM with model_type 'llama'"):
        apply_liger_kernel_to_qwen2_vl(model=llama)
    assert not any("forward" in vars(m) for m in llama.modules())


def test_unsupported_vision_language_model_warns_with_what_was_patched():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           deepstack_visual_indexes=[0]))
    model = Qwen3VLForConditionalGeneration(config)
    with pytest.warns(UserWarning, match=r"no kernel family for model_type='qwen3_vl'.*qwen2_vl.*patched"):
        handle = apply_liger_kernel(model)
    assert handle.family == "generic"
    handle.revert()


@pytest.mark.slow
@pytest.mark.interpreter
def test_mrope_and_vision_rope_run_the_rope_kernel():
    """Per-token M-RoPE cos/sin (B, T, D) of a two-image batch, and the vision tower's (N, D) tables, through
    the Triton kernel (on CUDA, else the interpreter on CPU): values and gradients as Hugging Face's functions."""
    device = "cuda" if HAS_CUDA else "cpu"
    skip_unless_path(device, "triton")
    model = tiny_qwen2_vl().to(device)
    inputs = {k: v.to(device) for k, v in batch().items()}
    position_ids, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"],
                                                 attention_mask=inputs["attention_mask"])
    assert not torch.equal(position_ids[1], position_ids[2])  # height and width positions differ on image tokens
    b, t = inputs["input_ids"].shape
    x = torch.randn(b, t, 64, device=device)
    cos, sin = model.model.language_model.rotary_emb(x, position_ids)
    assert cos.shape == (b, t, 16)
    q = torch.randn(b, 4, t, 16, device=device, requires_grad=True)
    k = torch.randn(b, 2, t, 16, device=device, requires_grad=True)
    want_q, want_k = modeling_qwen2_vl.apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rope(q, k, cos, sin, impl="triton")
    assert rel_err(got_q, want_q) < 1e-6 and rel_err(got_k, want_k) < 1e-6
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    want_g = torch.autograd.grad((want_q, want_k), (q, k), (gq, gk))
    got_g = torch.autograd.grad((got_q, got_k), (q, k), (gq, gk))
    assert all(rel_err(a, e) < 1e-6 for a, e in zip(got_g, want_g))

    visual = model.model.visual
    grid = inputs["image_grid_thw"]
    n = int(grid.prod(-1).sum())
    from transformers.vision_utils import get_vision_position_ids
    vision_pos = get_vision_position_ids(grid, visual.spatial_merge_size)
    vcos, vsin = visual.rotary_pos_emb(torch.randn(n, 32, device=device), vision_pos)
    assert vcos.shape == (n, 8)
    qkv = torch.randn(n, 3, 4, 8, device=device, requires_grad=True)  # the vision attention's strided q/k views
    vq, vk, _ = qkv.unbind(1)
    original = modeling_qwen2_vl.apply_rotary_pos_emb_vision
    want_vq, want_vk = original(vq, vk, vcos, vsin)
    got_vq, got_vk = make_vision_rope_function(original)(vq, vk, vcos, vsin)
    assert rel_err(got_vq, want_vq) < 1e-6 and rel_err(got_vk, want_vk) < 1e-6
    g = torch.randn(2, n, 4, 8, device=device)
    (want_grad,) = torch.autograd.grad((want_vq, want_vk), (qkv,), tuple(g))
    (got_grad,) = torch.autograd.grad((got_vq, got_vk), (qkv,), tuple(g))
    assert rel_err(got_grad, want_grad) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("build", [tiny_qwen2_vl, tiny_qwen2_5_vl])
def test_gpu_patched_matches_unpatched(build):
    """On CUDA every patched piece runs its Triton kernel: fp32 loss and gradients as the unpatched model's."""
    ref = build().cuda().train()
    model = copy.deepcopy(ref)
    inputs = {k: v.cuda() for k, v in batch().items()}
    want, want_grads = loss_and_grads(ref, inputs)
    with apply_liger_kernel(model):
        got, got_grads = loss_and_grads(model, inputs)
    assert rel_err(got.loss, want.loss) < 1e-5
    assert_same_grads(got_grads, want_grads, tol=1e-3)  # TF32-free fp32, different summation orders
