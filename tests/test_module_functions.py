"""Transformers' module-level RoPE function in both of its forms — the plain function (transformers 5.17, or no
``kernels`` package) and the hub-kernel ``Func`` module that transformers >= 5.2x builds when ``kernels`` is
importable — is patched by the family patch and by the generic one, gives transformers' loss and gradients, and
revert puts back the very object the module held."""

from __future__ import annotations

import copy
import inspect
import warnings
from inspect import Parameter, Signature

import pytest
import torch
from _helpers import assert_same_grads, batch, loss_and_grads, tiny_llama
from _reference import rel_err
from test_apply import tiny
from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.qwen3 import modeling_qwen3

from liger_align.models import apply_liger_kernel, apply_liger_kernel_to_llama
from liger_align.models._layers import make_rope_function
from liger_align.models._module_functions import parameter_names, plain_function


def _plain(modeling) -> object:
    """The plain ``apply_rotary_pos_emb`` of ``modeling``, whatever form the module holds now."""
    fn = plain_function(modeling.apply_rotary_pos_emb)
    assert inspect.isfunction(fn) and fn.__name__ == "apply_rotary_pos_emb"
    return fn


@pytest.fixture
def fresh_registry(monkeypatch):
    """The patch registry emptied for one test (and restored after): a handle that an earlier test left alive
    (a trainer not yet garbage-collected) would otherwise count the module function as patched already."""
    from liger_align.models import _handle

    monkeypatch.setattr(_handle, "_REGISTRY", {})


def _patch_matches_transformers(ref: nn.Module, patch, modeling) -> None:
    """Patch a copy of ``ref`` with ``patch(model)``: RoPE replaced with the plain original kept, the loss and every
    gradient those of ``ref``; revert puts back the very object ``modeling`` held."""
    held = modeling.apply_rotary_pos_emb
    model = copy.deepcopy(ref)
    ids, labels = batch()
    want, want_grads = loss_and_grads(ref, ids, labels)
    handle = patch(model)
    assert not any("RoPE" in s for s in handle.skipped), handle.skipped
    assert modeling.apply_rotary_pos_emb is not held and modeling.apply_rotary_pos_emb.original is _plain(modeling)
    got, got_grads = loss_and_grads(model, ids, labels)
    assert rel_err(got.loss, want.loss) < 1e-5
    assert_same_grads(got_grads, want_grads, 1e-4)
    handle.revert()
    assert modeling.apply_rotary_pos_emb is held


def _hand_made_wrapper(func):
    """A stand-in of the same contract as the ``kernels`` package's ``Func``: an ``nn.Module`` whose
    ``forward(*args, **kwargs)`` calls the closed-over ``func`` and carries its signature."""

    class Func(nn.Module):
        def forward(self, *args, **kwargs):
            return func(*args, **kwargs)

    sig = inspect.signature(func)
    Func.forward.__signature__ = Signature([Parameter("self", Parameter.POSITIONAL_OR_KEYWORD),
                                            *sig.parameters.values()])
    return Func()


def wrapped_like_transformers(func):
    """``func`` wrapped the way transformers wraps it where ``kernels`` is importable (its own decorator), or by
    hand with the same contract where the installed transformers leaves functions plain."""
    try:
        from transformers.integrations import use_kernel_forward_from_hub
    except ImportError:
        use_kernel_forward_from_hub = None
    wrapped = use_kernel_forward_from_hub("rotary_pos_emb")(func) if use_kernel_forward_from_hub else func
    return wrapped if isinstance(wrapped, nn.Module) else _hand_made_wrapper(func)


@pytest.fixture(params=["plain", "wrapped"])
def rope_form(request, monkeypatch, fresh_registry):
    """Puts the plain or the wrapped RoPE into llama's and qwen3's modeling modules for one test."""
    for modeling in (modeling_llama, modeling_qwen3):
        plain = _plain(modeling)
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb",
                            plain if request.param == "plain" else wrapped_like_transformers(plain))
    return request.param


def test_plain_function_and_parameter_names_for_each_form():
    plain = _plain(modeling_llama)
    wrapped = wrapped_like_transformers(plain)
    hand = _hand_made_wrapper(plain)
    for form in (plain, wrapped, hand, make_rope_function(wrapped), make_rope_function(plain)):
        assert plain_function(form) is plain
    for form in (plain, wrapped, hand):
        assert parameter_names(form) == ["q", "k", "cos", "sin", "unsqueeze_dim"]
    assert parameter_names(lambda *a, **k: None) == ["a", "k"]

    class Opaque(nn.Module):  # a module with no closed-over function: itself, still callable
        def forward(self, q, k, cos, sin, unsqueeze_dim=1):
            return plain(q, k, cos, sin, unsqueeze_dim)

    opaque = Opaque()
    assert plain_function(opaque) is opaque and parameter_names(opaque) == ["q", "k", "cos", "sin", "unsqueeze_dim"]


def test_family_patch_takes_either_form_and_revert_restores_it(rope_form):
    assert isinstance(modeling_llama.apply_rotary_pos_emb, nn.Module) == (rope_form == "wrapped")
    _patch_matches_transformers(tiny_llama(), lambda model: apply_liger_kernel_to_llama(model=model), modeling_llama)


def test_generic_patch_probes_either_form(rope_form):
    def generic(model: nn.Module):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the generic patch's one warning is tested in test_apply
            handle = apply_liger_kernel(model)
        assert handle.family == "generic"
        return handle

    _patch_matches_transformers(tiny("qwen3"), generic, modeling_qwen3)


def test_wrapped_rope_runs_the_kernel_not_the_wrapper(monkeypatch, fresh_registry):
    """After the patch, attention calls liger-align's RoPE (the module global), not the wrapper's forward."""
    plain = _plain(modeling_llama)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    counting.__signature__ = inspect.signature(plain)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", _hand_made_wrapper(counting))
    model = tiny_llama()
    ids, labels = batch()
    with apply_liger_kernel_to_llama(model=model):
        model(input_ids=ids, labels=labels).loss.backward()
    # ours falls back to the original only outside the kernel's contract; tiny Llama's inputs are inside it
    assert calls == []
    assert torch.isfinite(model.lm_head.weight.grad).all()
