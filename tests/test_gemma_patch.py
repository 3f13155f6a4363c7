"""Gemma, Gemma 2 (final-logit soft-capping on) and Gemma 3 text: tiny models of odd sizes (vocab 1003,
hidden 48, head_dim 16 != hidden / heads), patched vs unpatched losses, gradients and logits, class and
instance patches, reverting, bf16, and the Triton kernels (interpreter) inside the model."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import GEMMA_SOFTCAP as SOFTCAP
from _helpers import VOCAB, assert_same_grads, batch, gemma_families, loss_and_grads, skip_unless_path, tiny_gemma
from _reference import rel_err
from transformers import GemmaConfig, GemmaForCausalLM

from liger_align.models import (
    apply_liger_kernel,
    apply_liger_kernel_to_gemma,
    apply_liger_kernel_to_gemma2,
)
from liger_align.models._causal_lm import causal_lm_forward
from liger_align.models._layers import geglu_mlp_forward, gemma_rms_norm_forward

FAMILIES = gemma_families()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_instance_patch_matches_unpatched_loss_and_gradients(model_type):
    ref = tiny_gemma(model_type)
    model = copy.deepcopy(ref)
    ids, labels = batch()
    want, want_grads = loss_and_grads(ref, ids, labels)  # before patching: RoPE is patched module-wide
    handle = FAMILIES[model_type][5](model=model)
    per_layer = FAMILIES[model_type][6]
    assert handle.family == model_type
    assert sum(p.endswith("norm.forward") for p in handle.patched) == per_layer * 2 + 1
    assert sum(p.endswith("mlp.forward") for p in handle.patched) == 2
    got, got_grads = loss_and_grads(model, ids, labels)
    assert got.logits is None and want.logits is not None
    assert rel_err(got.loss, want.loss) < 1e-5
    assert_same_grads(got_grads, want_grads, 1e-4)
    layer = model.model.layers[0]
    assert layer.mlp.forward.__func__ is geglu_mlp_forward
    assert layer.input_layernorm.forward.__func__ is gemma_rms_norm_forward
    handle.revert()
    assert "forward" not in vars(layer.mlp) and "forward" not in vars(model)


def test_softcapping_is_inside_the_fused_loss():
    ref = tiny_gemma("gemma2")
    model = copy.deepcopy(ref)
    ids, labels = batch()
    with torch.no_grad():
        hidden = ref.model(input_ids=ids).last_hidden_state
        raw = ref.lm_head(hidden).double()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    capped = SOFTCAP * torch.tanh(raw / SOFTCAP)
    by_hand = torch.nn.functional.cross_entropy(capped.reshape(-1, VOCAB), shifted)
    uncapped = torch.nn.functional.cross_entropy(raw.reshape(-1, VOCAB), shifted)
    assert rel_err(uncapped, by_hand) > 1e-2  # the cap changes the loss: the comparison below can fail
    with apply_liger_kernel_to_gemma2(model=model):
        got = model(input_ids=ids, labels=labels)
    assert got.logits is None and rel_err(got.loss, by_hand) < 1e-5


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_eval_logits_equal(model_type):
    ref = tiny_gemma(model_type).eval()
    model = copy.deepcopy(ref)
    ids, labels = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, labels=labels)
        with apply_liger_kernel(model) as handle:
            assert handle.family == model_type
            got = model(input_ids=ids, labels=labels)
    assert got.logits.shape == (2, 37, VOCAB)
    assert rel_err(got.logits, want.logits) < 1e-5 and rel_err(got.loss, want.loss) < 1e-5


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_class_patch_and_revert(model_type):
    cls, _, _, modeling, prefix, patch, _ = FAMILIES[model_type]
    norm_cls, mlp_cls = getattr(modeling, f"{prefix}RMSNorm"), getattr(modeling, f"{prefix}MLP")
    originals = (norm_cls.forward, mlp_cls.forward, cls.forward, modeling.apply_rotary_pos_emb)
    ref = tiny_gemma(model_type)
    ids, labels = batch()
    want = ref(input_ids=ids, labels=labels).loss
    model = copy.deepcopy(ref)  # built before the patch: the class patch covers it too
    with patch() as handle:
        assert handle.family == model_type
        assert norm_cls.forward is gemma_rms_norm_forward and mlp_cls.forward is geglu_mlp_forward
        assert cls.forward is causal_lm_forward and modeling.apply_rotary_pos_emb is not originals[3]
        out = model(input_ids=ids, labels=labels)
        assert out.logits is None and rel_err(out.loss, want) < 1e-5
    assert (norm_cls.forward, mlp_cls.forward, cls.forward, modeling.apply_rotary_pos_emb) == originals
    assert model(input_ids=ids, labels=labels).logits is not None


def test_geglu_flag_off_and_other_activation():
    with apply_liger_kernel_to_gemma(geglu=False, rope=False, fused_linear_cross_entropy=False) as handle:
        assert handle.patched == ["GemmaRMSNorm.forward"]
    model = tiny_gemma("gemma2", hidden_activation="gelu")  # exact GELU: not the GeGLU kernel's function
    with pytest.warns(UserWarning, match="activation other than tanh-approximate GELU; the GeGLU kernel"):
        handle = apply_liger_kernel_to_gemma2(model=model)
    assert not any("mlp" in p for p in handle.patched) and "Gemma2MLP" in handle.skipped[0]
    handle.revert()


@pytest.mark.parametrize("model_type", ["gemma", "gemma2"])
def test_bf16_loss_close(model_type):
    ref = tiny_gemma(model_type)
    model = copy.deepcopy(ref).to(torch.bfloat16)
    ids, labels = batch()
    want = ref(input_ids=ids, labels=labels).loss  # fp32 reference
    with apply_liger_kernel(model):
        got = model(input_ids=ids, labels=labels)
        got.loss.backward()
    assert got.loss.dtype == torch.float32 and rel_err(got.loss, want) < 2e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.interpreter
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_triton_interpreter_whole_model(model_type, monkeypatch):
    """The Triton kernels (interpreter on CPU) inside the model: same loss and gradients, each kernel used."""
    skip_unless_path("cpu", "triton")
    from liger_align.kernels.layers.geglu import GeGLUFunction
    from liger_align.kernels.layers.rms_norm import RMSNormFunction
    from liger_align.kernels.layers.rope import RoPEFunction

    launches: dict[str, int] = {}
    for fn in (GeGLUFunction, RMSNormFunction, RoPEFunction):
        def counting(*args, _fn=fn, _apply=fn.apply):
            launches[_fn.__name__] = launches.get(_fn.__name__, 0) + 1
            return _apply(*args)
        monkeypatch.setattr(fn, "apply", counting)
    ref = tiny_gemma(model_type, num_hidden_layers=1)
    model = copy.deepcopy(ref)
    ids, labels = batch(1, 13)
    want, want_grads = loss_and_grads(ref, ids, labels)
    with apply_liger_kernel(model):
        got, got_grads = loss_and_grads(model, ids, labels)
    norms = FAMILIES[model_type][6] + 1
    assert launches == {"GeGLUFunction": 1, "RMSNormFunction": norms, "RoPEFunction": 1}
    assert rel_err(got.loss, want.loss) < 1e-5
    assert_same_grads(got_grads, want_grads, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_whole_model(model_type, dtype):
    ref = tiny_gemma(model_type).to("cuda", dtype)
    model = copy.deepcopy(ref)
    ids, labels = (t.cuda() for t in batch(4, 257))
    want, want_grads = loss_and_grads(ref, ids, labels)
    with apply_liger_kernel(model):
        got, got_grads = loss_and_grads(model, ids, labels)
    loss_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 1e-1)
    assert got.logits is None
    assert rel_err(got.loss, want.loss) < loss_tol
    assert_same_grads(got_grads, want_grads, grad_tol)


@pytest.mark.gpu
def test_gpu_gemma_2b_shape_bf16():
    """The benchmark's Gemma-2B shape (vocab 256000, hidden 2048, MQA, head_dim 256), 2 layers, bf16 on CUDA."""
    config = GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    ref = GemmaForCausalLM(config).to("cuda", torch.bfloat16).train()
    model = copy.deepcopy(ref)
    ids = torch.randint(0, 256000, (2, 512), device="cuda")
    labels = ids.clone()
    labels[:, :100] = -100
    want, want_grads = loss_and_grads(ref, ids, labels)
    handle = apply_liger_kernel(model)
    assert handle.family == "gemma" and len(handle.patched) == 9
    got, got_grads = loss_and_grads(model, ids, labels)
    handle.revert()
    assert got.logits is None and rel_err(got.loss, want.loss) < 2e-2
    assert_same_grads(got_grads, want_grads, 1e-1)
