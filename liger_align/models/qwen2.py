"""``apply_liger_kernel_to_qwen2``: Qwen2's layers have Llama's structure, so the same kernels apply."""

from __future__ import annotations

from torch import nn

from ._families import QWEN2, patch_family
from ._handle import PatchHandle


def apply_liger_kernel_to_qwen2(
    rope: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    fused_linear_cross_entropy: bool = True,
    model: nn.Module | None = None,
) -> PatchHandle:
    """Like :func:`liger_align.models.llama.apply_liger_kernel_to_llama`, for ``Qwen2ForCausalLM``."""
    return patch_family(QWEN2, rope=rope, rms_norm=rms_norm, swiglu=swiglu,
                        fused_linear_cross_entropy=fused_linear_cross_entropy, model=model)
