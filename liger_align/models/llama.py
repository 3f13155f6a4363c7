"""``apply_liger_kernel_to_llama``: Llama 3, 3.1 and 3.2 (``LlamaForCausalLM``)."""

from __future__ import annotations

from torch import nn

from ._families import LLAMA, patch_family
from ._handle import PatchHandle


def apply_liger_kernel_to_llama(
    rope: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    fused_linear_cross_entropy: bool = True,
    model: nn.Module | None = None,
) -> PatchHandle:
    """Run Llama's RMSNorm, RoPE, SwiGLU MLP and loss through liger-align's kernels.

    Args:
        rope: replace ``modeling_llama.apply_rotary_pos_emb`` (module-wide, also with ``model``).
        rms_norm: ``LlamaRMSNorm.forward`` -> :func:`liger_align.kernels.layers.rms_norm.rms_norm`.
        swiglu: ``LlamaMLP.forward`` -> ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` (SiLU models).
        fused_linear_cross_entropy: ``LlamaForCausalLM.forward`` computes the training loss and
            ``logprob_targets`` log-probs without materialising logits (see ``_causal_lm``).
        model: ``None`` patches the classes (every Llama model, built before or after); a model (or a
            PEFT model wrapping one) patches that instance's modules only.

    Returns:
        A :class:`PatchHandle`; ``handle.revert()`` (or leaving ``with handle:``) restores Hugging
        Face's behaviour. Patching again is idempotent; the original returns when every handle reverted.
    """
    return patch_family(LLAMA, rope=rope, rms_norm=rms_norm, swiglu=swiglu,
                        fused_linear_cross_entropy=fused_linear_cross_entropy, model=model)
