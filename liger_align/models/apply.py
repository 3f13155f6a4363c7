"""``apply_liger_kernel(model)``: pick the patches by ``model.config.model_type`` (or an explicit ``model_type``)."""

from __future__ import annotations

import difflib
import inspect
import logging
import warnings
from typing import Callable

from torch import nn

from ._generic import patch_generic
from ._handle import PatchHandle
from .gemma import apply_liger_kernel_to_gemma, apply_liger_kernel_to_gemma2, apply_liger_kernel_to_gemma3_text
from .head_call import unwrap_peft
from .llama import apply_liger_kernel_to_llama
from .mistral import apply_liger_kernel_to_mistral
from .qwen2 import apply_liger_kernel_to_qwen2
from .qwen2_vl import apply_liger_kernel_to_qwen2_5_vl, apply_liger_kernel_to_qwen2_vl

logger = logging.getLogger(__name__)

#: ``config.model_type`` -> its patch function ``fn(model=..., <flag>=bool, ...)``. A new family adds one entry.
PATCHERS: dict[str, Callable[..., PatchHandle]] = {
    "llama": apply_liger_kernel_to_llama,
    "qwen2": apply_liger_kernel_to_qwen2,
    "mistral": apply_liger_kernel_to_mistral,
    "gemma": apply_liger_kernel_to_gemma,
    "gemma2": apply_liger_kernel_to_gemma2,
    "gemma3_text": apply_liger_kernel_to_gemma3_text,
    "qwen2_vl": apply_liger_kernel_to_qwen2_vl,
    "qwen2_5_vl": apply_liger_kernel_to_qwen2_5_vl,
}


def _flags_of(fn: Callable) -> set[str]:
    """The boolean keyword flags a patch function takes (every parameter but ``model``)."""
    return {name for name, p in inspect.signature(fn).parameters.items()
            if name != "model" and isinstance(p.default, bool)}


def supported_model_types() -> list[str]:
    """The model types :func:`apply_liger_kernel` has a family patch for."""
    return sorted(PATCHERS)


def apply_liger_kernel(model: nn.Module, *, model_type: str | None = None, **flags: bool) -> PatchHandle:
    """Patch ``model`` (an instance; PEFT wrappers too) with its family's kernels.

    Args:
        model: a transformers model with ``config.model_type`` set.
        model_type: use this family's patches instead of ``config.model_type`` (one of
            :func:`supported_model_types`); a model of another family is a ``ValueError``.
        flags: ``rope``, ``rms_norm``, ``swiglu``, ``geglu``, ``fused_linear_cross_entropy`` (and the
            flags of other registered families), each default True. A flag for a kernel the family does
            not use (``swiglu`` for Gemma, ``geglu`` for Llama) is ignored.

    Returns:
        A :class:`PatchHandle`; ``handle.family`` is the model type whose patches ran, ``handle.patched``
        what was patched. A model type without a family gets the generic patch (``family="generic"``:
        only layers, and the fused-loss forward, proven equal on a probe input, see ``_generic``) and ONE
        ``UserWarning`` that names what was and was not patched.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, an unknown flag, or a flag that is not a bool.
        ValueError: ``model_type`` unsupported; the model not of ``model_type``'s family; or
            ``fused_linear_cross_entropy=True`` on a family model without an output head.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers nn.Module, got {type(model).__name__}")
    known = set().union(*(_flags_of(fn) for fn in PATCHERS.values()))
    unknown = sorted(set(flags) - known)
    if unknown:
        raise TypeError(f"unknown flags {unknown}; expected some of {sorted(known)}")
    not_bool = {k: v for k, v in flags.items() if not isinstance(v, bool)}
    if not_bool:
        raise TypeError(f"flags must be True or False, got {not_bool}")
    if model_type is not None and model_type not in PATCHERS:
        close = difflib.get_close_matches(str(model_type), PATCHERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"model_type={model_type!r} is not supported{hint}; supported: {supported_model_types()}")
    detected = getattr(getattr(unwrap_peft(model), "config", None), "model_type", None)
    chosen = model_type or detected
    patcher = PATCHERS.get(chosen)
    if patcher is None:
        handle = patch_generic(model, **flags)
        done = handle.summary().split(": ", 1)[1]
        tail = "the rest of the model is left unchanged" if handle.patched else "the model is left unchanged"
        warnings.warn(
            f"liger_align: no kernel family for model_type={detected!r} (supported: {supported_model_types()}; "
            f"pass model_type= if the model is one of them); generic patch: {done}; {tail}",
            stacklevel=2,
        )
        return handle
    accepted = _flags_of(patcher)
    handle = patcher(model=model, **{k: v for k, v in flags.items() if k in accepted})
    if handle.family is None:
        handle.family = chosen
    logger.info("liger_align: %s", handle.summary())
    return handle
