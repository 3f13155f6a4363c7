"""The patched causal-LM forward's head call: hooked heads keep the fused loss (no logits), a LoRA-wrapped
head falls back to the logits with one warning and the right loss, and bad labels are named."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _helpers import VOCAB, assert_same_grads, batch, loss_and_grads, tiny_llama
from _reference import rel_err

from liger_align.models import _causal_lm, apply_liger_kernel


def test_hooked_head_still_fused():
    """A head with forward hooks (as ZeRO-3 and FSDP units install) runs the fused loss inside its own call."""
    model = tiny_llama().train()
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels).loss
    calls = []
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    head.register_forward_hook(lambda module, args, out: calls.append(type(out).__name__))
    with apply_liger_kernel(model):
        out = model(input_ids=ids, labels=labels)
    assert out.logits is None and calls == ["pre", "tuple"]  # the hook saw (loss, logps), not logits
    assert rel_err(out.loss, want) < 1e-5
    assert "forward" not in vars(head)  # the routed forward is removed again


def test_lora_head_falls_back_to_logits_with_one_warning():
    peft = pytest.importorskip("peft")
    base = tiny_llama().train()
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj", "lm_head"])
    torch.manual_seed(3)
    ref = peft.get_peft_model(copy.deepcopy(base), lora)
    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(base), lora)
    ids, labels = batch()
    want, want_grads = loss_and_grads(ref, ids, labels)
    _causal_lm._WARNED_ADAPTED_HEAD.clear()
    with apply_liger_kernel(model):
        with pytest.warns(UserWarning, match="lm_head carries a PEFT adapter"):
            got, got_grads = loss_and_grads(model, ids, labels)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            loss_and_grads(model, ids, labels)
    assert got.logits is None and rel_err(got.loss, want.loss) < 1e-5
    assert any("lm_head.lora_A" in n for n in got_grads), "the head's adapter was not trained"
    assert_same_grads(got_grads, want_grads, 1e-4)


def test_bad_labels_are_named():
    model = tiny_llama().train()
    ids, labels = batch()
    with apply_liger_kernel(model):
        with pytest.raises(ValueError, match=r"labels must have shape \(B, T\)"):
            model(input_ids=ids, labels=labels[:, :-1])
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            model(input_ids=ids, labels=labels.float())
        bad = labels.clone()
        bad[0, -1] = VOCAB + 4
        with pytest.raises(ValueError, match=r"labels must lie in \[0, V\)"):
            model(input_ids=ids, labels=bad)


def test_model_without_head_is_named():
    model = tiny_llama().train()
    ids, labels = batch()
    with apply_liger_kernel(model):
        model.lm_head = None
        with pytest.raises(ValueError, match="has no output head"):
            model(input_ids=ids, labels=labels)
