"""The output-head call that stays correct under sharding: one place for the patched forward, the trainers
and the Medusa heads.

A fused loss needs the last hidden states ``(..., H)`` and the head's weight ``(V, H)`` (and bias),
never the logits. Reading ``lm_head.weight`` directly is wrong under every sharding wrapper:

- **DeepSpeed ZeRO-3** gathers a parameter only inside its own module's call, and re-gathers it for
  the backward from hooks on that call's outputs.
- **FSDP 1 and 2** gather the weight inside the wrapping unit's forward (the root, or a unit around
  the head alone) and hook the backward on that forward's outputs. A DTensor weight (FSDP2 outside
  its unshard) must be gathered with the differentiable ``full_tensor()``.

:func:`call_through_head` therefore runs ``fn(hidden, weight, bias)`` *as the head module's own
forward*: every hook of whatever owns the weight runs around it, for the forward and the backward
(the fused ops recompute in, or keep gradients for, the backward while the weight is gathered).

- **PEFT**: :func:`output_head` resolves a ``modules_to_save`` copy of the head; a LoRA layer *on* the
  head cannot be fused (the loss reads ``weight`` directly and would skip the adapter):
  :func:`head_has_adapter` tells, and callers either fall back to the logits or refuse.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: ``fn(hidden (..., H), weight (V, H), bias (V,) | None) -> any pytree of tensors``.
HeadFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], Any]

_WRAPPERS = {"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"}


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (``get_base_model()``), else ``model`` itself."""
    return model.get_base_model() if is_peft(model) else model


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / FSDP1 / DeepSpeed / ``torch.compile`` wrappers and PEFT."""
    for _ in range(8):
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in _WRAPPERS:
            model = model.module
        elif is_peft(model):
            model = unwrap_peft(model)
        else:
            break
    return model


def is_tuner_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT adapter layer (LoRA and friends) wrapping a base layer."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def head_has_adapter(model: nn.Module) -> bool:
    """Whether a PEFT adapter (e.g. LoRA) sits on ``model``'s output head (a fused loss would skip it)."""
    head = causal_lm(model).get_output_embeddings()
    return head is not None and is_tuner_layer(head)


def check_head_not_adapted(model: nn.Module) -> None:
    """Raise ``ValueError`` when a PEFT adapter sits on the output head (see :func:`head_has_adapter`)."""
    if head_has_adapter(model):
        raise ValueError(
            "A PEFT adapter on the output head (lm_head) is not supported by the liger-align trainers: the fused "
            "loss reads lm_head.weight directly, so the adapter would never be trained. Remove 'lm_head' from "
            "target_modules (use modules_to_save=['lm_head'] to train the head itself)."
        )


def output_head(lm: nn.Module) -> nn.Module:
    """The module holding the head's weight: the output embeddings, or the active ``modules_to_save`` copy.

    Raises ``ValueError`` when ``lm`` has no output head, or when a PEFT adapter sits on it.
    """
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(
            f"model: {type(lm).__name__} has no output head (get_output_embeddings() is None); the fused loss "
            "needs a causal LM with an lm_head"
        )
    if is_tuner_layer(head):
        check_head_not_adapted(lm)
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):  # peft ModulesToSaveWrapper
        active = head.active_adapters if hasattr(head, "active_adapters") else [head.active_adapter]
        active = [a for a in active if a in head.modules_to_save]
        disabled = getattr(head, "disable_adapters", False) or not active
        head = head.original_module if disabled else head.modules_to_save[active[0]]
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"model: the output head {type(head).__name__} has no weight tensor to fuse")
    return head


def backbone(lm: nn.Module) -> nn.Module:
    """The decoder stack that returns ``last_hidden_state`` (``lm.model`` for Llama)."""
    prefix = getattr(lm, "base_model_prefix", "model")
    body = getattr(lm, prefix, None)
    if isinstance(body, nn.Module) and body is not lm:
        return body
    if hasattr(lm, "get_decoder"):
        return lm.get_decoder()
    raise ValueError(f"cannot find the backbone of {type(lm).__name__} (no attribute {prefix!r})")


#: Keywords of a causal LM's forward that belong to its loss or its output format, not to the backbone.
LOSS_KEYWORDS = (
    "labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "return_dict", "output_hidden_states",
)


def backbone_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords of a causal-LM forward call that go to its backbone: no loss keyword, no ``None``, no cache."""
    body = {k: v for k, v in kwargs.items() if k not in LOSS_KEYWORDS and v is not None}
    body["use_cache"] = False
    return body


def backbone_hidden(lm: nn.Module, args: tuple, body_kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """``(last hidden states (B, T, H), the backbone's whole output)`` of ``lm``'s backbone on the call's inputs."""
    out = backbone(lm)(*args, **body_kwargs)
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]), out


def text_config(lm: nn.Module) -> Any:
    """The text part of ``lm.config`` (the config itself for a text-only model)."""
    config = lm.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_options(lm: nn.Module) -> dict[str, Any]:
    """Softcap and scale of the model's final logits (Gemma-2 softcapping, Cohere/Granite scales)."""
    config = text_config(lm)
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return {"softcap": softcap, "logit_scale": 1.0 if scale is None else float(scale)}


def router_aux_loss(lm: nn.Module, router_logits: Any, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The MoE load-balancing loss the model's own forward would add, or None when it has no router logits."""
    if router_logits is None:
        return None
    module = importlib.import_module(type(lm).__module__)
    loss_fn = getattr(module, "load_balancing_loss_func", None)
    if loss_fn is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as loss_fn
    config = text_config(lm)
    names = ("num_experts", "num_local_experts", "n_routed_experts")
    experts = next((getattr(config, n) for n in names if getattr(config, n, None)), None)
    experts = experts or getattr(lm, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(lm, "num_experts_per_tok", None)
    return loss_fn(router_logits, experts, top_k, attention_mask)


def router_aux_weight(lm: nn.Module) -> float:
    """The weight of the MoE router's auxiliary loss in ``lm``'s loss (its ``router_aux_loss_coef``; 0 without)."""
    coef = getattr(lm, "router_aux_loss_coef", None)
    return getattr(text_config(lm), "router_aux_loss_coef", 0.0) if coef is None else coef


def _full(param: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor (FSDP2 sharded parameter) gathered to a plain tensor, differentiably; others unchanged."""
    if param is not None and hasattr(param, "full_tensor") and type(param).__name__ == "DTensor":
        return param.full_tensor()
    return param


def call_through_head(head: nn.Module, hidden: torch.Tensor, fn: HeadFn) -> Any:
    """Return ``fn(hidden, head.weight, head.bias)`` computed as ``head``'s own forward.

    Calling the module (rather than reading its weight) runs the hooks of whatever owns the weight:
    ZeRO-3 gathers it for the forward and registers the re-gather for the backward on the outputs, and
    an FSDP unit around the head unshards it the same way. ``hidden`` is moved to the weight's device.
    """

    def routed(h: torch.Tensor) -> Any:
        weight = _full(head.weight)
        bias = _full(getattr(head, "bias", None))
        if weight.dim() != 2 or weight.numel() == 0:
            raise RuntimeError(
                f"the output head's weight is still partitioned inside its own forward (shape "
                f"{tuple(weight.shape)}): the sharding wrapper did not gather it; call the model through "
                "its wrapper (DeepSpeed engine / FSDP module), not the bare module"
            )
        return fn(h.to(weight.device), weight, bias)

    # accelerate's hooks keep the module's own forward in ``_old_forward`` and run around it: replace that.
    slot = "_old_forward" if "_old_forward" in head.__dict__ else "forward"
    had_own = slot in head.__dict__
    saved = head.__dict__.get(slot)
    setattr(head, slot, routed)
    try:
        return head(hidden)
    finally:
        if had_own:
            setattr(head, slot, saved)
        else:
            delattr(head, slot)
