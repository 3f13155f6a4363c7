"""The fused loss for any causal LM whose output head is a linear layer over the last hidden states.

A model type without a family of its own (Qwen3, OLMo 2, Phi-3, Granite, Cohere, a MoE, ...) gets its
causal-LM forward fused only after a probe proves, on that model, that its own forward is
``loss_function(transform(lm_head(backbone(x).last_hidden_state)))`` (plus the router's auxiliary loss
for a mixture of experts): on a seeded 1 x 8 input in eval mode, without gradient, the logits and the
loss that :func:`probe_fused_head` rebuilds from the backbone's hidden states must equal the model's
own. ``transform`` is what the config declares (Cohere's ``logit_scale``, Granite's ``logits_scaling``,
Gemma 2's soft-capping, see :func:`~.head_call.logit_options`).

The proven model then gets the SFT handler of its fused forward (:mod:`.fused_forward`): the fused loss
when training with labels (or given ``logprob_targets``), the model's own forward otherwise (evaluation,
generation), so nothing but the training loss path changes. A model the probe cannot prove (meta or sharded weights,
another head, a forward that computes something else) keeps its own forward; the reason is returned.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._tokens import IGNORE_INDEX
from ._causal_lm import fused_output
from ._vision_forward import _with_logps
from .head_call import backbone, output_head, router_aux_loss, router_aux_weight, text_config

#: Keywords the fused forward handles itself; every other argument of the model's forward goes to the backbone.
_OWN = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "return_dict", "output_router_logits",
        "logprob_targets")
_PROBE_TOKENS = 8
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _is_moe(out_cls: type) -> bool:
    return "router_logits" in {f.name for f in dataclasses.fields(out_cls)}


def _router_flag(lm: nn.Module, given: bool | None) -> bool:
    return bool(given if given is not None else getattr(text_config(lm), "output_router_logits", False))


def _fused_call(lm: nn.Module, named: dict[str, Any], out_cls: type, *, fuse: bool = False) -> Any:
    """The fused forward on the bound arguments ``named`` of the model's own forward (``self`` excluded).

    ``fuse=True``: the fused loss outside training too (the probe)."""
    own = {k: named.pop(k, None) for k in _OWN}
    moe = _is_moe(out_cls)
    router = moe and _router_flag(lm, own["output_router_logits"])
    body = {k: v for k, v in named.items() if v is not None}
    body["use_cache"] = bool(body.get("use_cache", False))
    if moe:
        body["output_router_logits"] = router
    outputs = backbone(lm)(**body)
    out = fused_output(
        lm, outputs, out_cls, logits_to_keep=own["logits_to_keep"] or 0, labels=own["labels"],
        logprob_targets=own["logprob_targets"], shift_labels=own["shift_labels"],
        num_items_in_batch=own["num_items_in_batch"], fuse=fuse,
    )
    if router:
        aux = router_aux_loss(lm, outputs.router_logits, body.get("attention_mask"))
        out.aux_loss = aux
        if out.loss is not None:
            out.loss = out.loss + router_aux_weight(lm) * aux.to(out.loss.device)
    return out


def _bind(lm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, as the model's own forward takes them (its ``**kwargs`` flattened in)."""
    kwargs = dict(kwargs)
    logprob_targets = kwargs.pop("logprob_targets", None)
    signature = inspect.signature(type(lm).forward)
    bound = signature.bind(lm, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop(next(iter(signature.parameters)))  # self
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and named.pop(name, ()):
            raise TypeError(f"{type(lm).__name__}.forward got extra positional arguments; pass them by name")
    named["logprob_targets"] = logprob_targets
    return named


def wants_fused_loss(lm: nn.Module, kwargs: dict[str, Any]) -> bool:
    """The SFT handler's trigger: ``logprob_targets``, or labels (or ``shift_labels``) while training."""
    labelled = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None
    return kwargs.get("logprob_targets") is not None or (lm.training and labelled)


def fused_loss_handler(out_cls: type) -> Callable[[nn.Module, tuple, dict[str, Any]], Any]:
    """The SFT handler's ``run`` for a probed model whose own forward returns ``out_cls`` (``logps`` is added)."""
    fused_cls = _with_logps(out_cls)

    def run(lm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        out = _fused_call(lm, _bind(lm, args, kwargs), fused_cls)
        return out.to_tuple() if kwargs.get("return_dict") is False else out

    return run


def _close(got: torch.Tensor | None, want: torch.Tensor | None) -> bool:
    if got is None or want is None:
        return got is None and want is None
    if got.shape != want.shape or not torch.isfinite(want).all():
        return False
    err = (got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)
    return err.item() < _TOLERANCE.get(want.dtype, 1e-2)


def probe_fused_head(lm: nn.Module) -> tuple[Callable[..., Any] | None, str]:
    """``(run, "")`` when ``lm``'s own forward is proven to be the fused one's, else ``(None, reason)``.

    ``run`` is the handler of :func:`wants_fused_loss` calls, for :func:`~.fused_forward.install_handler`.

    ``lm`` is the transformers model (PEFT unwrapped). Its training mode and the global random state
    are left as they were.
    """
    name = type(lm).__name__
    params = list(lm.parameters())
    if any(p.device.type == "meta" or hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in params):
        return None, f"{name} has sharded or meta parameters: patch before sharding"
    try:
        head = output_head(lm)
    except ValueError as err:
        return None, str(err).removeprefix("model: ")
    vocab = getattr(text_config(lm), "vocab_size", None)
    if not isinstance(head, nn.Linear) or not isinstance(vocab, int) or head.weight.shape[0] != vocab:
        return None, f"{name}'s output head is not a linear layer onto the vocabulary"
    device = head.weight.device
    ids = torch.randint(0, vocab, (1, _PROBE_TOKENS), generator=torch.Generator().manual_seed(1234)).to(device)
    labels = ids.clone()
    labels[0, :2] = IGNORE_INDEX
    was_training = lm.training
    try:
        lm.eval()
        with torch.no_grad():
            want = type(lm).forward(lm, input_ids=ids, labels=labels, use_cache=False, return_dict=True)
            out_cls = type(want)
            if not dataclasses.is_dataclass(out_cls) or not isinstance(getattr(want, "logits", None), torch.Tensor):
                return None, f"{name}.forward returns no logits to compare"
            fused_cls = _with_logps(out_cls)
            got_loss = _fused_call(lm, {"input_ids": ids, "labels": labels}, fused_cls, fuse=True).loss
            got_logits = _fused_call(lm, {"input_ids": ids}, fused_cls).logits
    except Exception as err:  # a probe that cannot run proves nothing
        return None, f"{name}.forward could not be probed ({type(err).__name__}: {err})"
    finally:
        lm.train(was_training)
    if not _close(got_logits, want.logits):
        return None, f"{name}.forward computes other logits than its lm_head on the last hidden state"
    if not _close(got_loss, want.loss):
        return None, f"{name}.forward's loss is not the cross-entropy of its logits"
    return fused_loss_handler(out_cls), ""
