"""One fused forward per causal LM: what ``model(...)`` runs when a caller asks for a fused output head.

The loss must run *inside* ``model(...)``: FSDP 1 and 2 gather a sharded head weight only inside the
wrapped root module's forward and hook the backward on that forward's outputs, accelerate's autocast
wraps that forward, and DDP, DeepSpeed and PEFT forward keywords untouched. So every fused path of the
package — the SFT loss (``labels``), the trainers' head callback (``liger_head=fn``), TRL's fused-LM-head
protocol (``fused_lm_head=True``) and Medusa's heads (``medusa_labels``) — is a *handler* of one forward,
installed on the causal LM instance by :func:`install_handler`:

- a handler is ``(wants(lm, kwargs) -> bool, run(lm, args, kwargs) -> output)``, registered under a name;
  the first handler (in install order; the SFT one last) that wants the call runs it, else the forward the model had
  (its class's, or an instance forward set before, e.g. a family patch) runs unchanged;
- the forward keeps no reference to the model: handlers and settings live in a
  :class:`FusedForwardState` in the instance's ``__dict__``, so ``copy.deepcopy`` is a true copy;
- a second install only adds its handler: the forward is never replaced again, so the wrappers
  accelerate put over it (autocast, output casting) stay; each install returns a :class:`PatchHandle`
  whose ``revert()`` removes its handler (and the forward with the last one).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types
from collections.abc import Callable
from typing import Any

from torch import nn

from ._handle import PatchHandle, patch_attr

logger = logging.getLogger(__name__)

_STATE = "_liger_align_fused_state"

#: ``wants(lm, kwargs)``: whether this handler serves the call.
Wants = Callable[[nn.Module, dict[str, Any]], bool]
#: ``run(lm, args, kwargs)``: the call's output.
Run = Callable[[nn.Module, tuple, dict[str, Any]], Any]


@dataclasses.dataclass
class FusedForwardState:
    """The handlers and settings of an installed fused forward, kept on the instance (``lm.__dict__``).

    ``handlers``: name -> ``(wants, run, last)``, in install order (``last``: asked after the others).
    ``settings``: name -> a handler's settings (e.g. the TRL protocol's outputs and temperature).
    ``inner``: the instance forward there before (None: the class's, looked up at call time).
    ``owner``: ``id`` of the model it was installed on.
    """

    handlers: dict[str, tuple[Wants, Run, bool]]
    settings: dict[str, Any]
    inner: Callable[..., Any] | None
    owner: int


def fused_state(lm: nn.Module) -> FusedForwardState | None:
    """The :class:`FusedForwardState` of ``lm``, or None when no fused forward is installed."""
    return lm.__dict__.get(_STATE)


def fallback_forward(lm: nn.Module) -> Callable[..., Any]:
    """The forward ``lm`` had before the fused one: the class's, or the instance forward that was there."""
    state = fused_state(lm)
    inner = None if state is None else state.inner
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


#: The handlers' trigger keywords: left out of the call to the model's own forward when None or False.
TRIGGERS = ("logprob_targets", "liger_head", "fused_lm_head", "medusa_labels")


def _dispatch(self: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run the first installed handler that wants the call, else the model's previous forward."""
    state = fused_state(self)
    ordered = sorted(state.handlers.values(), key=lambda h: h[2])  # stable: install order within a rank
    for wants, run, _last in ordered:
        if wants(self, kwargs):
            return run(self, args, kwargs)
    for key in TRIGGERS:
        if key in kwargs and (kwargs[key] is None or kwargs[key] is False):
            del kwargs[key]
    return fallback_forward(self)(*args, **kwargs)


def _forward_for(lm: nn.Module) -> Callable[..., Any]:
    """The fused forward bound to ``lm``, with the signature of its class's forward (``inspect.signature`` of it
    is what Hugging Face's ``Trainer`` reads to keep a data set's columns)."""

    @functools.wraps(type(lm).forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _dispatch(self, args, kwargs)

    return types.MethodType(forward, lm)


def install_handler(
    lm: nn.Module, name: str, wants: Wants, run: Run, *, settings: Any = None, last: bool = False
) -> PatchHandle:
    """Register handler ``name`` on the causal LM ``lm`` (not a wrapper), installing the fused forward once.

    ``last``: asked only after every other handler (the SFT loss, whose trigger ``labels`` also comes with
    the other handlers' calls). Installing ``name`` again replaces its ``(wants, run)`` and settings.
    Returns a :class:`PatchHandle` whose ``revert()`` removes this handler, and the fused forward with the
    last handler.
    """
    handle = PatchHandle(family="fused_forward")
    state = fused_state(lm)
    if state is None:
        previous = lm.__dict__.get("forward")
        if previous is not None and "_original_forward" in lm.__dict__:
            logger.warning(
                "%s was already prepared by accelerate (its forward wraps autocast): liger-align's fused forward, "
                "installed now, runs without that autocast; install it before accelerator.prepare",
                type(lm).__name__,
            )
        state = FusedForwardState(handlers={}, settings={}, inner=previous, owner=id(lm))
        forward = _forward_for(lm)
    else:  # count the patches up (so the last handle restores), without replacing the forward or its wrappers
        forward = lm.__dict__.get("forward") or _forward_for(lm)
    undo_state = patch_attr(lm, _STATE, state)
    handle.add(lm, "forward", forward, f"{type(lm).__name__}.forward")
    handle.on_revert(undo_state)
    state.handlers[name] = (wants, run, last)
    if settings is not None:
        state.settings[name] = settings

    def remove() -> None:
        state.handlers.pop(name, None)
        state.settings.pop(name, None)

    handle.on_revert(remove)
    return handle
