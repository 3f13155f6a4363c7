"""``apply_liger_kernel(model)``: pick the patches by ``model.config.model_type``."""

from __future__ import annotations

import warnings

from torch import nn

from ._families import FAMILIES, patch_family, unwrap
from ._handle import PatchHandle


def apply_liger_kernel(model: nn.Module, **flags: bool) -> PatchHandle:
    """Patch ``model`` (an instance; PEFT wrappers too) for its family: llama, qwen2 or mistral.

    Args:
        model: a transformers model with ``config.model_type`` set.
        flags: ``rope``, ``rms_norm``, ``swiglu``, ``fused_linear_cross_entropy`` (each default True).

    Returns:
        A :class:`PatchHandle` (empty, after a ``UserWarning``, for an unsupported model type, which is
        left unchanged).
    """
    defaults = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True}
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise TypeError(f"unknown flags {unknown}; expected some of {sorted(defaults)}")
    config = getattr(unwrap(model), "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        warnings.warn(
            f"liger_align: no kernels for model_type={model_type!r} (supported: {sorted(FAMILIES)}); "
            "the model is left unchanged", stacklevel=2,
        )
        return PatchHandle()
    return patch_family(family, model=model, **{**defaults, **flags})
