"""The model's one fused forward (liger_align.models.fused_forward): handlers by trigger, the SFT handler asked
last, the class's signature kept (HF Trainer reads it), trigger keywords left out of the model's own forward,
revert per handler, a deep copy that dispatches on its own state."""

from __future__ import annotations

import copy
import inspect

import torch
from _helpers import tiny_llama

from liger_align.models.fused_forward import fused_state, install_handler


def _tagged(tag: str):
    return lambda lm, args, kwargs: (tag, lm)


def test_dispatch_order_signature_and_revert():
    model = tiny_llama(seed=0)
    own = inspect.signature(type(model).forward)
    ids = torch.randint(0, 100, (1, 5))
    sft = install_handler(model, "sft", lambda lm, kw: kw.get("labels") is not None, _tagged("sft"), last=True)
    head = install_handler(model, "head", lambda lm, kw: kw.get("liger_head") is not None, _tagged("head"))
    assert list(inspect.signature(model.forward).parameters) == list(own.parameters)[1:]
    assert model(ids, labels=ids) == ("sft", model)
    assert model(ids, labels=ids, liger_head=print) == ("head", model)  # asked before the SFT handler
    logits = model(ids, liger_head=None, logprob_targets=None).logits  # triggers off: the model's own forward
    assert logits.shape == (1, 5, model.config.vocab_size)

    twin = copy.deepcopy(model)
    assert twin(ids, labels=ids) == ("sft", twin) and fused_state(twin) is not fused_state(model)

    head.revert()
    assert model(ids, labels=ids, liger_head=print) == ("sft", model)
    sft.revert()
    assert "forward" not in vars(model) and fused_state(model) is None
    assert model(ids).logits.shape == logits.shape


def test_an_instance_forward_set_before_stays_the_fallback():
    model = tiny_llama(seed=1)
    calls = []
    previous = model.forward

    def recorded(*args, **kwargs):
        calls.append(1)
        return previous(*args, **kwargs)

    model.forward = recorded
    handle = install_handler(model, "head", lambda lm, kw: kw.get("liger_head") is not None, _tagged("head"))
    model(torch.randint(0, 100, (1, 4)))
    assert calls == [1]
    handle.revert()
    assert model.forward is recorded
