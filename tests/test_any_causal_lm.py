"""The fused loss for model types without a family: eight causal LMs the registry does not name get the fused
loss through the probe-checked generic forward (logits never built in training, loss and every gradient equal
transformers' in fp32), keep their own forward for evaluation, MoE router losses and logit scales included;
a forward the probe cannot prove is left alone with the reason; revert restores transformers' forward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _helpers import VOCAB, assert_same_grads, batch, grads, perturbed
from _reference import rel_err
from transformers import AutoConfig, AutoModelForCausalLM

from liger_align.models import apply_liger_kernel, supported_model_types

_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
#: model type -> config overrides that make its particular head or loss matter
UNREGISTERED = {
    "qwen3": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, output_router_logits=True,
                      router_aux_loss_coef=0.05),
    "olmo2": {},
    "phi3": {"pad_token_id": 0},
    "granite": {"logits_scaling": 4.0, "residual_multiplier": 0.5},
    "stablelm": {},
    "starcoder2": {},
    "cohere": {"logit_scale": 0.5},
}


def tiny(model_type: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **_SHAPE, **UNREGISTERED[model_type])
    config._attn_implementation = "eager"
    return perturbed(AutoModelForCausalLM.from_config(config)).train()


def patched(model: torch.nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic patch's one warning is tested in test_apply
        return apply_liger_kernel(model)


def head_outputs_seen(model: torch.nn.Module) -> list:
    """Every output of the model's lm_head call (a ``(B, T, V)`` tensor would be materialised logits)."""
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: seen.append(out))
    return seen


def test_the_registry_does_not_name_them():
    assert not set(UNREGISTERED) & set(supported_model_types())


@pytest.mark.parametrize("model_type", sorted(UNREGISTERED))
def test_fused_loss_without_logits_equals_transformers(model_type):
    torch.manual_seed(0)
    ref = tiny(model_type)
    model = copy.deepcopy(ref)
    ids, labels = batch()
    want = ref(input_ids=ids, labels=labels)
    want.loss.backward()
    handle = patched(model)
    assert f"{type(model).__name__}.forward" in handle.patched, handle.summary()
    seen = head_outputs_seen(model)
    got = model(input_ids=ids, labels=labels)
    got.loss.backward()
    assert got.logits is None
    assert not any(isinstance(o, torch.Tensor) and o.shape[-1] == VOCAB for o in seen)
    assert rel_err(got.loss, want.loss) < 1e-5
    assert_same_grads(grads(model), grads(ref), 1e-4)
    if model_type == "qwen3_moe":  # the router's load-balancing loss is in the loss and reported
        assert rel_err(got.aux_loss, want.aux_loss) < 1e-5 and type(got).__name__ == "LigerMoeCausalLMOutputWithPast"

    model.eval()  # evaluation: the model's own forward, logits and all
    with torch.no_grad():
        evaluated, own = model(input_ids=ids, labels=labels), ref.eval()(input_ids=ids, labels=labels)
    assert rel_err(evaluated.logits, own.logits) < 1e-5 and rel_err(evaluated.loss, own.loss) < 1e-5
    handle.revert()
    assert "forward" not in vars(model)


def test_logprob_targets_num_items_and_tuples():
    torch.manual_seed(1)
    model = tiny("qwen3")
    ids, labels = batch()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    with patched(model):
        out = model(input_ids=ids, logprob_targets=labels)
        want = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        assert rel_err(out.logps, want * (labels != -100)) < 1e-5 and out.logits is None
        items = torch.tensor(50)
        summed = model(input_ids=ids, labels=labels, num_items_in_batch=items).loss
        mean = model(input_ids=ids, labels=labels).loss
        n_valid = (labels[:, 1:] != -100).sum()
        assert rel_err(summed * items, mean * n_valid) < 1e-5
        as_tuple = model(ids, None, labels=labels, return_dict=False)
        assert isinstance(as_tuple, tuple) and rel_err(as_tuple[0], mean) < 1e-6


def test_deep_copy_trains_its_own_weights():
    torch.manual_seed(2)
    model = tiny("olmo2")
    handle = patched(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(3.0)
    ids, labels = batch()
    assert rel_err(twin(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss) > 1e-3
    handle.revert()


def test_a_forward_the_probe_cannot_prove_keeps_its_logits():
    torch.manual_seed(3)
    model = tiny("qwen3")
    own = type(model).forward

    def scaled_forward(self, *args, **kwargs):  # e.g. a model that rescales its logits in forward, undeclared
        out = own(self, *args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    odd = type("OddQwen3ForCausalLM", (type(model),), {"forward": scaled_forward})
    model.__class__ = odd
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = apply_liger_kernel(model)
    (message,) = [str(w.message) for w in caught if str(w.message).startswith("liger_align")]
    assert "OddQwen3ForCausalLM.forward computes other logits than its lm_head" in message
    assert "the logits are still built" in message
    assert "forward" not in vars(model) and not any(p.endswith("ForCausalLM.forward") for p in handle.patched)
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None
    handle.revert()


def test_meta_parameters_are_not_probed():
    config = AutoConfig.for_model("qwen3", **_SHAPE)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    handle = patched(model)
    assert any("sharded or meta parameters" in s and "fused loss" in s for s in handle.skipped)
    assert "forward" not in vars(model)
