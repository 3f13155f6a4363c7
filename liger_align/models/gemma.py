"""``apply_liger_kernel_to_gemma`` / ``_gemma2`` / ``_gemma3_text``: Gemma 1, 2 and 3 (text) causal LMs.

What is patched (each flag as in :func:`~liger_align.models.llama.apply_liger_kernel_to_llama`):

- ``rms_norm``: every ``Gemma*RMSNorm`` -- the input / post-attention norms, Gemma 2 and 3's pre/post
  feed-forward norms, Gemma 3's q/k norms over the head dimension and the final norm -- through
  :func:`~liger_align.kernels.layers.rms_norm.rms_norm` with ``offset=1.0`` (``x / rms(x) * (1 + weight)`` in
  fp32, returned in the input's dtype, as ``GemmaRMSNorm`` does).
- ``geglu``: ``Gemma*MLP`` -> ``down_proj(geglu(gate_proj(x), up_proj(x)))`` with the tanh-approximate
  GELU (``gelu_pytorch_tanh``); an MLP with another activation is left alone, with a warning.
- ``rope``: the module's ``apply_rotary_pos_emb`` (``head_dim`` is the config's, not hidden / heads;
  Gemma 3's local and global rotary tables both go through it).
- ``fused_linear_cross_entropy``: ``Gemma*ForCausalLM.forward``; Gemma 2's (and Gemma 3's, when set)
  ``final_logit_softcapping`` is applied inside the fused loss, ``c * tanh(logits / c)``.

The embedding's ``sqrt(hidden_size)`` scale (``Gemma*TextScaledWordEmbedding`` or the backbone's
normaliser) stays Hugging Face's.
"""

from __future__ import annotations

from torch import nn

from ._families import GEMMA, GEMMA2, GEMMA3_TEXT, ModelFamily, patch_family
from ._handle import PatchHandle


def _patch(family: ModelFamily, rope: bool, rms_norm: bool, geglu: bool, fused_linear_cross_entropy: bool,
           model: nn.Module | None) -> PatchHandle:
    return patch_family(family, rope=rope, rms_norm=rms_norm, geglu=geglu,
                        fused_linear_cross_entropy=fused_linear_cross_entropy, model=model)


def apply_liger_kernel_to_gemma(
    rope: bool = True,
    rms_norm: bool = True,
    geglu: bool = True,
    fused_linear_cross_entropy: bool = True,
    model: nn.Module | None = None,
) -> PatchHandle:
    """Run Gemma's RMSNorm, RoPE, GeGLU MLP and loss through liger-align's kernels (``GemmaForCausalLM``).

    Args:
        rope: replace ``modeling_gemma.apply_rotary_pos_emb`` (module-wide, also with ``model``).
        rms_norm: ``GemmaRMSNorm.forward`` -> ``rms_norm(x, weight, offset=1.0, out_dtype=x.dtype)``.
        geglu: ``GemmaMLP.forward`` -> ``down_proj(geglu(gate_proj(x), up_proj(x)))`` (tanh-GELU models).
        fused_linear_cross_entropy: ``GemmaForCausalLM.forward`` computes the training loss and
            ``logprob_targets`` log-probs without materialising logits.
        model: ``None`` patches the classes; a model (or a PEFT model wrapping one) patches that instance.

    Returns:
        A :class:`PatchHandle` (``revert()`` restores Hugging Face's behaviour).

    Raises:
        ValueError: ``model`` is not a Gemma model, or has no ``GemmaForCausalLM`` while
            ``fused_linear_cross_entropy=True`` (nothing is patched).
    """
    return _patch(GEMMA, rope, rms_norm, geglu, fused_linear_cross_entropy, model)


def apply_liger_kernel_to_gemma2(
    rope: bool = True,
    rms_norm: bool = True,
    geglu: bool = True,
    fused_linear_cross_entropy: bool = True,
    model: nn.Module | None = None,
) -> PatchHandle:
    """Like :func:`apply_liger_kernel_to_gemma`, for ``Gemma2ForCausalLM`` (four RMSNorms per layer, final-logit
    soft-capping inside the fused loss)."""
    return _patch(GEMMA2, rope, rms_norm, geglu, fused_linear_cross_entropy, model)


def apply_liger_kernel_to_gemma3_text(
    rope: bool = True,
    rms_norm: bool = True,
    geglu: bool = True,
    fused_linear_cross_entropy: bool = True,
    model: nn.Module | None = None,
) -> PatchHandle:
    """Like :func:`apply_liger_kernel_to_gemma`, for the text-only ``Gemma3ForCausalLM`` (model type
    ``gemma3_text``; q/k RMSNorms too). The multimodal ``Gemma3ForConditionalGeneration`` is not covered."""
    return _patch(GEMMA3_TEXT, rope, rms_norm, geglu, fused_linear_cross_entropy, model)
