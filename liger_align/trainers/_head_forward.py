"""The trainers' two handlers of the model's fused forward (:mod:`liger_align.models.fused_forward`).

- ``model(input_ids, attention_mask=..., liger_head=fn, output_router_logits=...)`` returns
  ``{"head": fn(hidden, weight, bias), "aux_loss": tensor | None}`` with ``hidden`` the backbone's last
  hidden states ``(B, T, H)``; no logits are built. The paired trainers (ORPO, CPO/SimPO) call it.
- ``model(..., labels=labels, fused_lm_head=True)`` answers TRL's fused-LM-head protocol, which TRL's
  DPO and KTO trainers call: while TRL's ``__init__`` runs, :func:`liger_fused_lm_head_for` swaps TRL's
  installer ``add_fused_lm_head`` for :func:`add_liger_fused_lm_head`, so every such call (policy,
  reference, precomputed reference) runs :func:`._trl_protocol.trl_fused_output` on our base.

Inside, the head is called through :func:`~liger_align.models.head_call.call_through_head` (ZeRO-3 and a
head-only FSDP unit gather the weight for the forward and the backward). PEFT: the handlers are installed
on the base causal LM, below the adapters, so LoRA layers in the backbone stay active (and are disabled by
``disable_adapter()`` for a reference pass). MoE: with ``output_router_logits`` the router's
load-balancing loss is returned as ``aux_loss``, as the model's own forward computes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..models import PatchHandle
from ..models.fused_forward import fused_state, install_handler
from ..models.head_call import (
    backbone_hidden,
    backbone_kwargs,
    call_through_head,
    causal_lm,
    output_head,
    router_aux_loss,
    text_config,
)
from ._trl_protocol import trl_fused_output

logger = logging.getLogger(__name__)

_TRL = "trl_fused_lm_head"


@dataclasses.dataclass(frozen=True)
class TrlProtocolSettings:
    """What TRL's protocol computes: ``outputs`` (``log_probs`` and the metric fields the installers asked
    for; each installer adds its own) at ``temperature`` (the logits' divisor)."""

    outputs: tuple[str, ...] = ("log_probs",)
    temperature: float = 1.0

    def updated(self, outputs: tuple[str, ...], temperature: float | None) -> TrlProtocolSettings:
        """The settings after one more install: ``outputs`` added; ``temperature`` set when given.

        Raises ``ValueError`` when ``temperature`` differs from the installed one (two callers would
        want different log-probs from the same forward).
        """
        if temperature is not None and float(temperature) != self.temperature:
            raise ValueError(
                f"temperature: the fused forward is installed with temperature={self.temperature}, got "
                f"{temperature}; one model cannot serve two temperatures"
            )
        return dataclasses.replace(self, outputs=tuple(dict.fromkeys(self.outputs + tuple(outputs))))


def trl_settings(lm: nn.Module) -> TrlProtocolSettings:
    """The :class:`TrlProtocolSettings` installed on ``lm``."""
    return fused_state(lm).settings[_TRL]


def _backbone(lm: nn.Module, args: tuple, kwargs: dict[str, Any], *, router_default: bool):
    """``(hidden (B, T, H), aux_loss | None)`` of ``lm``'s backbone on the call's inputs."""
    body_kwargs = backbone_kwargs({k: v for k, v in kwargs.items() if k not in ("liger_head", "fused_lm_head")})
    if router_default:
        body_kwargs.setdefault("output_router_logits", True)
    if not body_kwargs.get("output_router_logits", False):
        body_kwargs.pop("output_router_logits", None)
    hidden, body_out = backbone_hidden(lm, args, body_kwargs)
    aux = None
    if body_kwargs.get("output_router_logits"):
        aux = router_aux_loss(lm, getattr(body_out, "router_logits", None), body_kwargs.get("attention_mask"))
    return hidden, aux


def _wants_head(lm: nn.Module, kwargs: dict[str, Any]) -> bool:
    return kwargs.get("liger_head") is not None


def _run_head(lm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    hidden, aux = _backbone(lm, args, kwargs, router_default=False)
    return {"head": call_through_head(output_head(lm), hidden, kwargs["liger_head"]), "aux_loss": aux}


def _wants_trl(lm: nn.Module, kwargs: dict[str, Any]) -> bool:
    return kwargs.get("fused_lm_head") is True


def _run_trl(lm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    router = bool(getattr(text_config(lm), "output_router_logits", False))
    hidden, aux = _backbone(lm, args, kwargs, router_default=router)
    settings = trl_settings(lm)
    return trl_fused_output(
        lm, output_head(lm), hidden, labels=kwargs.get("labels"), shift_labels=kwargs.get("shift_labels"),
        num_items=kwargs.get("num_items_in_batch"), aux=aux, outputs=settings.outputs,
        temperature=settings.temperature,
    )


def install_trainer_forward(
    lm: nn.Module, *, outputs: tuple[str, ...] = ("log_probs",), temperature: float | None = None
) -> PatchHandle:
    """Give the causal LM ``lm`` (not a wrapper) the ``liger_head`` and TRL-protocol handlers; idempotent.

    A second call only merges the settings (:meth:`TrlProtocolSettings.updated`); the forward, and any
    wrapper accelerate put over it, stays.
    """
    state = fused_state(lm)
    previous = state.settings.get(_TRL) if state is not None else None
    settings = (previous or TrlProtocolSettings(temperature=1.0 if temperature is None else float(temperature)))
    settings = settings.updated(tuple(outputs), temperature)
    handle = install_handler(lm, "liger_head", _wants_head, _run_head)
    handle.extend(install_handler(lm, _TRL, _wants_trl, _run_trl, settings=settings))
    return handle


def add_liger_fused_lm_head(
    model: nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """Drop-in for TRL's ``add_fused_lm_head``: the same call protocol and output fields, on liger-align's base.

    ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput`` with per-token
    ``log_probs`` ``(B, T-1)`` (differentiable), ``mean_logits``, ``entropy``, ``is_top1``,
    ``log_sum_sq_probs`` (those in ``outputs``; no gradient), ``label_mask``, ``loss`` and ``aux_loss``.
    """
    if cast_lm_head_to_fp32:
        logger.warning("cast_lm_head_to_fp32 is ignored: liger-align's base accumulates in fp32 already")
    install_trainer_forward(causal_lm(model), outputs=tuple(outputs), temperature=temperature)


@contextlib.contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily replace ``module.name`` by ``value``."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


@contextlib.contextmanager
def liger_fused_lm_head_for(trainer_cls: type) -> Iterator[None]:
    """While TRL's ``__init__`` of ``trainer_cls`` runs, its ``add_fused_lm_head`` installs liger-align's instead.

    Swapping the installer is the narrowest change that routes every ``fused_lm_head=True`` call
    (policy, reference, precomputed reference) through our base.
    """
    modules = []
    for klass in trainer_cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and hasattr(module, "add_fused_lm_head") and module not in modules:
            modules.append(module)
    if not modules:
        raise RuntimeError(
            f"{trainer_cls.__name__}: this TRL version has no fused-LM-head protocol (add_fused_lm_head); "
            "liger_align.trainers needs TRL's DPO/KTO trainers that call the model with fused_lm_head=True"
        )
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(_swapped(module, "add_fused_lm_head", add_liger_fused_lm_head))
        yield

