"""The fused forward the trainers install on the causal LM: the loss runs *inside* ``model(...)``.

FSDP 1 and 2 gather the sharded head weight only inside the wrapped root module's forward and hook
the backward on that forward's outputs, and accelerate's autocast wraps that forward. So
:func:`install_fused_forward` gives the causal LM a forward that, called with ``liger_head=fn``, runs
the backbone and returns ``fn(hidden, weight, bias)`` instead of logits; every wrapper (DDP, FSDP,
DeepSpeed, PEFT, autocast) forwards the keyword untouched. Inside, the head is called through
:func:`liger_align.models.head_call.call_through_head` (ZeRO-3 and a head-only FSDP unit gather the
weight for the forward and the backward; see that module for PEFT's cases).

- **PEFT**: the forward is installed on the base causal LM, below the adapters, so LoRA layers in the
  backbone stay active (and are disabled by ``disable_adapter()`` for a reference pass).
- **MoE**: with ``output_router_logits=True`` the load-balancing loss of the router logits is
  returned as ``aux_loss``, as the model's own forward computes it.
- Called with ``fused_lm_head=True`` the same forward answers TRL's fused-LM-head protocol
  (:mod:`._trl_protocol`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types
from collections.abc import Callable
from typing import Any

from torch import nn

from ..models.head_call import (
    HeadFn,
    backbone_hidden,
    backbone_kwargs,
    call_through_head,
    output_head,
    router_aux_loss,
    text_config,
)

logger = logging.getLogger(__name__)

_INSTALLED = "_liger_align_fused_forward"
_STATE = "_liger_align_fused_state"


@dataclasses.dataclass(frozen=True)
class FusedForwardState:
    """The settings of an installed fused forward, kept on the model instance (``lm._liger_align_fused_state``).

    ``outputs``: the fields TRL's protocol computes (``log_probs`` and the metric fields the installers
    asked for; each installer adds its own, none removes another's). ``temperature``: the logits'
    divisor in TRL's protocol. ``inner``: the forward to fall back on (None: the class's, looked up at
    call time; else an instance forward set before, e.g. a model patch bound to the model). ``owner``:
    ``id`` of the model it was installed on (a deep copy is a different owner).
    """

    outputs: tuple[str, ...]
    temperature: float
    inner: Callable[..., Any] | None
    owner: int

    def updated(self, outputs: tuple[str, ...], temperature: float | None) -> FusedForwardState:
        """The state after one more install: ``outputs`` added; ``temperature`` set when given.

        Raises ``ValueError`` when ``temperature`` differs from the installed one (two callers would
        want different log-probs from the same forward).
        """
        if temperature is not None and float(temperature) != self.temperature:
            raise ValueError(
                f"temperature: the fused forward is installed with temperature={self.temperature}, got "
                f"{temperature}; one model cannot serve two temperatures"
            )
        return dataclasses.replace(self, outputs=tuple(dict.fromkeys(self.outputs + tuple(outputs))))


def fused_state(lm: nn.Module) -> FusedForwardState:
    """The :class:`FusedForwardState` of ``lm`` (a causal LM with the fused forward installed)."""
    return lm.__dict__[_STATE]


def install_fused_forward(
    lm: nn.Module, *, outputs: tuple[str, ...] = ("log_probs",), temperature: float | None = None
) -> None:
    """Give the causal LM ``lm`` (not a wrapper) a forward with two fused modes; idempotent.

    - ``lm(input_ids, attention_mask=..., liger_head=fn, output_router_logits=...)`` returns
      ``{"head": fn(hidden, weight, bias), "aux_loss": tensor | None}`` with ``hidden`` the backbone's last
      hidden states ``(B, T, H)``; no logits are built.
    - ``lm(..., labels=labels, fused_lm_head=True)`` answers TRL's fused-LM-head protocol (see
      :func:`._trl_protocol.add_liger_fused_lm_head`), at ``temperature`` (None: 1.0, or the one installed).
    - Without either keyword, the forward is the one ``lm`` had (generation, evaluation logits).

    The installed forward keeps no reference to ``lm``: its settings live on the instance
    (:class:`FusedForwardState`) and the forward it falls back on is the class's, looked up at call time
    (or a model patch bound to ``lm``), so ``copy.deepcopy(lm)`` is a true copy. A second call only
    updates the settings (:meth:`FusedForwardState.updated`): it never replaces the forward again, so the
    wrappers accelerate put over it (autocast, output casting) stay in place.
    """
    state = lm.__dict__.get(_STATE)
    if state is not None:
        lm.__dict__[_STATE] = state.updated(tuple(outputs), temperature)
        return
    previous = lm.__dict__.get("forward")
    if previous is not None and "_original_forward" in lm.__dict__:
        logger.warning(
            "%s was already prepared by accelerate (its forward wraps autocast): liger-align's fused forward, "
            "installed now, runs without that autocast; install it before accelerator.prepare",
            type(lm).__name__,
        )
    lm.__dict__[_STATE] = FusedForwardState(
        outputs=tuple(outputs), temperature=1.0 if temperature is None else float(temperature), inner=previous,
        owner=id(lm),
    )

    @functools.wraps(type(lm).forward)
    def forward(
        self: nn.Module, *args: Any, liger_head: HeadFn | None = None, fused_lm_head: bool = False, **kwargs: Any
    ) -> Any:
        state = fused_state(self)
        if liger_head is None and not fused_lm_head:
            return _fallback_forward(self, state)(*args, **kwargs)
        body_kwargs = backbone_kwargs(kwargs)
        if fused_lm_head and getattr(text_config(self), "output_router_logits", False):
            body_kwargs.setdefault("output_router_logits", True)
        if not body_kwargs.get("output_router_logits", False):
            body_kwargs.pop("output_router_logits", None)
        hidden, body_out = backbone_hidden(self, args, body_kwargs)
        aux = None
        if body_kwargs.get("output_router_logits"):
            aux = router_aux_loss(self, getattr(body_out, "router_logits", None), body_kwargs.get("attention_mask"))
        head = output_head(self)
        if liger_head is not None:
            return {"head": call_through_head(head, hidden, liger_head), "aux_loss": aux}
        from ._trl_protocol import trl_fused_output  # the adapter installs this forward: imported on use

        return trl_fused_output(
            self, head, hidden, labels=kwargs.get("labels"), shift_labels=kwargs.get("shift_labels"),
            num_items=kwargs.get("num_items_in_batch"), aux=aux, state=state,
        )

    setattr(forward, _INSTALLED, True)
    lm.forward = types.MethodType(forward, lm)


def _fallback_forward(lm: nn.Module, state: FusedForwardState) -> Callable[..., Any]:
    """The forward ``lm`` had before the fused one: the class's, or the instance forward that was there."""
    inner = state.inner
    if inner is None:
        return types.MethodType(type(lm).forward, lm)
    if isinstance(inner, types.MethodType) and inner.__self__ is lm:
        return inner
    if state.owner == id(lm):
        return inner
    raise RuntimeError(
        f"this {type(lm).__name__} is a copy of a model whose forward had been replaced by {inner!r}, which "
        "still calls the original model; copy the model before wrapping its forward (or unwrap it first)"
    )
