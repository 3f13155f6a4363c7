"""apply_liger_kernel: dispatch by model type, the explicit ``model_type`` override, the generic patch of an
unknown family (probe-verified layers, one warning), and the bad inputs: misspelled or unsupported family,
family mismatch, a model without an output head, bad flags, labels of the wrong shape, dtype or range."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _helpers import GEMMA_TYPES as GEMMAS
from _helpers import (
    SHAPE,
    VOCAB,
    assert_same_grads,
    batch,
    llama_config,
    loss_and_grads,
    perturbed,
    tiny_gemma,
    tiny_llama,
)
from _reference import rel_err
from torch import nn
from transformers import (
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.qwen3 import modeling_qwen3

from liger_align.models import (
    apply_liger_kernel,
    apply_liger_kernel_to_gemma,
    apply_liger_kernel_to_llama,
    supported_model_types,
)
from liger_align.models._layers import geglu_mlp_forward, gemma_rms_norm_forward, rms_norm_forward, swiglu_mlp_forward


def tiny(model_type: str) -> nn.Module:
    if model_type == "llama":
        return tiny_llama()
    if model_type in GEMMAS:
        return tiny_gemma(model_type)
    cls, config_cls = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "mistral": (MistralForCausalLM, MistralConfig),
                       "qwen3": (Qwen3ForCausalLM, Qwen3Config)}[model_type]
    return perturbed(cls(config_cls(**SHAPE, attn_implementation="eager"))).train()


def _liger_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("liger_align")]


def test_supported_model_types():
    assert set(supported_model_types()) >= {"llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text"}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text"])
def test_dispatch_takes_the_family_and_says_so(model_type, caplog):
    model = tiny(model_type)
    norm_fn, mlp_fn = ((gemma_rms_norm_forward, geglu_mlp_forward) if model_type.startswith("gemma")
                       else (rms_norm_forward, swiglu_mlp_forward))
    with caplog.at_level("INFO", logger="liger_align.models.apply"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported family: no warning
        handle = apply_liger_kernel(model)
    try:
        assert handle.family == model_type
        assert model.model.norm.forward.__func__ is norm_fn
        assert model.model.layers[0].mlp.forward.__func__ is mlp_fn
        assert f"{model_type}: {len(handle.patched)} patched" in caplog.text
        assert handle.summary().startswith(f"{model_type}: ")
    finally:
        handle.revert()
    assert "forward" not in vars(model.model.norm)


def test_model_type_override():
    model = tiny_llama()
    with apply_liger_kernel(model, model_type="llama") as handle:
        assert handle.family == "llama" and handle.patched
    with pytest.raises(ValueError, match=r"model_type='lama' is not supported \(did you mean 'llama'\?\); "
                                         r"supported: \['gemma', .*'llama'"):
        apply_liger_kernel(model, model_type="lama")
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported; supported"):
        apply_liger_kernel(model, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type=3 is not supported"):
        apply_liger_kernel(model, model_type=3)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("call", [
    lambda m: apply_liger_kernel_to_llama(model=m),
    lambda m: apply_liger_kernel(m, model_type="llama"),
])
def test_family_mismatch_names_both_families_and_patches_nothing(call):
    model = tiny("qwen2")
    rope = modeling_llama.apply_rotary_pos_emb
    with pytest.raises(ValueError, match=r"apply_liger_kernel_to_llama patches llama models.*got a qwen2 model "
                                         r"\(Qwen2ForCausalLM\).*apply_liger_kernel_to_qwen2"):
        call(model)
    assert modeling_llama.apply_rotary_pos_emb is rope
    assert all("forward" not in vars(m) for m in model.modules())


def test_gemma_patch_on_a_llama_model_is_refused():
    with pytest.raises(ValueError, match=r"apply_liger_kernel_to_gemma patches gemma models.*llama model"):
        apply_liger_kernel_to_gemma(model=tiny_llama())


def test_model_without_output_head():
    backbone = LlamaModel(llama_config())
    for call in (lambda: apply_liger_kernel(backbone), lambda: apply_liger_kernel_to_llama(model=backbone)):
        with pytest.raises(ValueError, match=r"model: LlamaModel has no output head.*fused_linear_cross_entropy=False"):
            call()
    assert all("forward" not in vars(m) for m in backbone.modules())
    with apply_liger_kernel(backbone, fused_linear_cross_entropy=False) as handle:  # the layers alone: fine
        assert handle.family == "llama" and backbone.norm.forward.__func__ is rms_norm_forward


def test_bad_flags_and_model():
    model = tiny_llama()
    with pytest.raises(TypeError, match="unknown flags"):
        apply_liger_kernel(model, layer_norms=True)
    with pytest.raises(TypeError, match="flags must be True or False"):
        apply_liger_kernel(model, rope="yes")
    with pytest.raises(TypeError, match="model must be a transformers nn.Module, got str"):
        apply_liger_kernel("meta-llama/Llama-3.2-1B")


def test_other_families_mlp_flags_are_ignored():
    model = tiny_gemma("gemma")
    with apply_liger_kernel(model, swiglu=False) as handle:  # Gemma has no SwiGLU: geglu still on
        assert model.model.layers[0].mlp.forward.__func__ is geglu_mlp_forward
    with apply_liger_kernel(model, geglu=False) as handle:
        assert not any("mlp" in p for p in handle.patched)


def test_unknown_family_generic_patch_one_warning_same_loss():
    ref = tiny("qwen3")
    model = copy.deepcopy(ref)
    ids, labels = batch()
    want, want_grads = loss_and_grads(ref, ids, labels)
    rng = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = apply_liger_kernel(model)
    assert torch.equal(torch.get_rng_state(), rng)  # the probes use their own generator
    (message,) = _liger_warnings(caught)
    assert "model_type='qwen3'" in message and "generic patch" in message
    assert "model.layers.*.mlp.forward x2" in message and "apply_rotary_pos_emb" in message
    assert "Qwen3ForCausalLM.forward" in message and "left unchanged" in message  # the fused loss: probe-proven
    assert handle.family == "generic"
    layer = model.model.layers[0]
    assert layer.mlp.forward.__func__ is swiglu_mlp_forward
    assert layer.input_layernorm.forward.__func__ is rms_norm_forward
    assert layer.self_attn.q_norm.forward.__func__ is rms_norm_forward  # q/k norms over head_dim too
    assert modeling_qwen3.apply_rotary_pos_emb is not modeling_qwen3.apply_rotary_pos_emb.original
    got, got_grads = loss_and_grads(model, ids, labels)
    assert got.logits is None  # the fused loss (tests/test_any_causal_lm.py covers more model types)
    assert rel_err(got.loss, want.loss) < 1e-5
    assert_same_grads(got_grads, want_grads, 1e-4)
    handle.revert()
    assert "forward" not in vars(layer.mlp) and "forward" not in vars(model)
    assert not hasattr(modeling_qwen3.apply_rotary_pos_emb, "original")


def test_generic_probe_tells_gemma_norms_from_llama_norms():
    """A Gemma model under an unknown model type: the probe picks the (1 + weight) forward and GeGLU."""
    ref = tiny_gemma("gemma2")
    model = copy.deepcopy(ref)
    model.config.model_type = "my_gemma"
    ids, labels = batch()
    want = ref(input_ids=ids, labels=labels).loss
    with pytest.warns(UserWarning, match="model_type='my_gemma'"):
        handle = apply_liger_kernel(model, fused_linear_cross_entropy=False)
    with handle:
        assert model.model.norm.forward.__func__ is gemma_rms_norm_forward
        assert model.model.layers[0].mlp.forward.__func__ is geglu_mlp_forward
        assert not any("fused loss" in s for s in handle.skipped)  # not asked for
        assert rel_err(model(input_ids=ids, labels=labels).loss, want) < 1e-5


class OddRMSNorm(nn.Module):
    """Named like an RMSNorm, but centres the row first (a LayerNorm without bias): no kernel computes it."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
        self.eps = 1e-6

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class OddMLP(nn.Module):
    """Gated SiLU MLP that adds a residual: the SwiGLU forward would drop it."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(dim, 8), nn.Linear(dim, 8), nn.Linear(8, dim)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return x + self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("OddConfig", (), {"model_type": "odd"})()
        self.norm, self.mlp = OddRMSNorm(12), OddMLP(12)


def test_generic_probe_refuses_modules_that_compute_something_else():
    model = OddModel()
    x = torch.randn(3, 12)
    want = model.mlp(model.norm(x))
    with pytest.warns(UserWarning, match=r"generic patch: 0 patched \(nothing\).*OddRMSNorm \(its forward differs.*"
                                         r"OddMLP \(its forward differs.*the model is left unchanged"):
        handle = apply_liger_kernel(model)
    assert handle.patched == [] and torch.equal(model.mlp(model.norm(x)), want)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_bad_labels_are_named(model_type):
    model = tiny(model_type)
    ids, labels = batch()
    with apply_liger_kernel(model):
        with pytest.raises(ValueError, match=r"labels must have shape \(B, T\) = \(2, 37\)"):
            model(input_ids=ids, labels=labels[:, :-1])
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            model(input_ids=ids, labels=labels.float())
        too_big = labels.clone()
        too_big[1, 3] = VOCAB  # e.g. a tokenizer with more tokens than the head has rows
        with pytest.raises(ValueError, match=r"labels must lie in \[0, V\) = \[0, 1003\)"):
            model(input_ids=ids, labels=too_big)
