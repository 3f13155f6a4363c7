"""Inputs and float64 references for the preference-loss tests, driving TRL 1.16's own code.

TRL computes its losses inside trainer methods that call a model. The references here build a bare
trainer object (``object.__new__``) with the attributes those methods read and a stand-in model that
returns float64 logits (or per-token log-probs) of the test's hidden states, so that TRL's code
computes the loss, the metrics and, through autograd, the gradients.
"""

from __future__ import annotations

import types
from collections import defaultdict

import torch
from _helpers import leaf_copies, skip_unless_path
from _reference import TOLERANCE, reference_logits, rel_err

IGNORE = -100


# Tolerance of the relative error against float64, by input dtype (sums of bf16 log-probs drift more).
def tol(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 3e-2}.get(dtype, TOLERANCE[dtype])


def make_rows(rows, length, width, vocab, dtype, *, bias, seed, device="cpu", masked_rows=()):
    """Leaves ``hidden (R, T, H)``, ``weight (V, H)``, ``bias (V,)`` or None, and ``target (R, T)``.

    Each row starts with a masked prompt of random length and ends with random padding; the rows in
    ``masked_rows`` are masked entirely.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) / width**0.5
    b = torch.randn(vocab, generator=gen) * 0.5 if bias else None
    target = torch.randint(0, vocab, (rows, length), generator=gen)
    prompt = torch.randint(1, length // 3, (rows,), generator=gen)
    pad = torch.randint(0, length // 4, (rows,), generator=gen)
    pos = torch.arange(length)
    target[(pos[None] < prompt[:, None]) | (pos[None] >= length - pad[:, None])] = IGNORE
    for r in masked_rows:
        target[r] = IGNORE
    leaf = lambda t: None if t is None else t.to(device, dtype).requires_grad_()  # noqa: E731
    return leaf(hidden), leaf(weight), leaf(b), target.to(device)


def logits64(hidden, weight, bias):
    """Float64 logits ``(R, T, V)`` of float64 leaves."""
    rows, length, width = hidden.shape
    return reference_logits(hidden.reshape(-1, width), weight, bias).view(rows, length, -1)


def token_logps64(logits, target):
    """Per-token float64 log-probs ``(R, T)`` of ``target``, 0 where ignored."""
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return logp * (target != IGNORE)


def masked_logits_mean(logits, target):
    valid = target != IGNORE
    return (logits.mean(-1) * valid).sum() / valid.sum().clamp(min=1)


def pad_left(t, value):
    """``(R, T) -> (R, T + 1)`` with ``value`` in front: TRL's unshifted layout of a shifted target."""
    return torch.cat((torch.full_like(t[:, :1], value), t), 1)


def trainer_stub(cls, **attrs):
    """A bare ``cls`` instance (no ``__init__``) with the attributes TRL's loss code reads."""
    obj = object.__new__(cls)
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x, unwrap_model=lambda m: m,
    )
    base = dict(
        accelerator=accelerator, aux_loss_enabled=False, is_encoder_decoder=False, padding_value=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    for key, value in {**base, **attrs}.items():
        object.__setattr__(obj, key, value)
    return obj


class LogitsModel(torch.nn.Module):
    """Stand-in causal LM returning float64 ``logits (R, T + 1, V)`` of fixed hidden states (the last row unused)."""

    is_gradient_checkpointing = False

    def __init__(self, hidden, weight, bias):
        super().__init__()
        logits = logits64(hidden, weight, bias)
        self.logits = torch.cat((logits, torch.zeros_like(logits[:, :1])), 1)

    def forward(self, input_ids=None, **_):
        assert input_ids.shape[:2] == self.logits.shape[:2]
        return types.SimpleNamespace(logits=self.logits)


class FusedHeadModel(torch.nn.Module):
    """Stand-in for TRL 1.16's fused-lm-head model output: per-token ``log_probs`` of ``labels[:, 1:]``.

    ``hidden_by_ptr`` maps ``input_ids.data_ptr()`` to the ``(hidden, weight, bias)`` float64 leaves
    that row set is projected from (the KTO trainer calls the model on its KL rows too).
    """

    is_gradient_checkpointing = False

    def __init__(self, hidden_by_ptr, logps_dtype=torch.float64):
        super().__init__()
        self.hidden_by_ptr = hidden_by_ptr
        self.logps_dtype = logps_dtype  # TRL's alpha-divergence code accepts fp32 log-probs, not float64

    def forward(self, input_ids=None, labels=None, fused_lm_head=False, **_):
        assert fused_lm_head
        hidden, weight, bias = self.hidden_by_ptr[input_ids.data_ptr()]
        logits = logits64(hidden, weight, bias)
        target = labels[:, 1:]
        logp = torch.log_softmax(logits, -1)
        return types.SimpleNamespace(
            log_probs=token_logps64(logits, target).to(self.logps_dtype),
            entropy=-(logp.exp() * logp).sum(-1).detach(),
            mean_logits=logits.mean(-1).detach(),
            is_top1=logits.argmax(-1) == target,
        )


def unshifted_batch(target):
    """``input_ids``, ``attention_mask``, ``completion_mask`` ``(R, T + 1)`` whose shifted labels are ``target``."""
    valid = target != IGNORE
    input_ids = pad_left(target.clamp(min=0), 0)
    completion_mask = pad_left(valid.long(), 0)
    return input_ids, torch.ones_like(input_ids), completion_mask


def check_grads(loss, ref_loss, leaves, ref_leaves, dtype, scale=1.0):
    """Gradients of ``scale * loss`` and ``scale * ref_loss`` agree for every leaf that requires grad."""
    pairs = [(t, r) for t, r in zip(leaves, ref_leaves) if t is not None]
    got = torch.autograd.grad(scale * loss, [t for t, _ in pairs])
    want = torch.autograd.grad(scale * ref_loss, [r for _, r in pairs])
    for g, w, (t, _) in zip(got, want, pairs):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert torch.isfinite(g).all()
        assert rel_err(g, w) < tol(dtype), (tuple(t.shape), rel_err(g, w))
    return got


def close(value, ref, dtype, *, atol=0.0):
    """``value`` matches the float64 ``ref`` (relative error, or absolute ``atol`` near zero)."""
    value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    ref = torch.as_tensor(ref, dtype=torch.float64).detach().cpu()
    if atol and (value - ref).abs().max() <= atol:
        return True
    return rel_err(value, ref) < tol(dtype)


__all__ = [
    "FusedHeadModel", "IGNORE", "LogitsModel", "check_grads", "close", "leaf_copies", "logits64", "make_rows",
    "masked_logits_mean", "pad_left", "rel_err", "skip_unless_path", "token_logps64", "tol", "trainer_stub",
    "unshifted_batch",
]
