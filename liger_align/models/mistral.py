"""``apply_liger_kernel_to_mistral``: Mistral's layers have Llama's structure, so the same kernels apply."""

from __future__ import annotations

from torch import nn

from ._families import MISTRAL, patch_family
from ._handle import PatchHandle


def apply_liger_kernel_to_mistral(
    rope: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    fused_linear_cross_entropy: bool = True,
    model: nn.Module | None = None,
) -> PatchHandle:
    """Like :func:`liger_align.models.llama.apply_liger_kernel_to_llama`, for ``MistralForCausalLM``."""
    return patch_family(MISTRAL, rope=rope, rms_norm=rms_norm, swiglu=swiglu,
                        fused_linear_cross_entropy=fused_linear_cross_entropy, model=model)
