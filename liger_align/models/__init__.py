"""Model-level patches (see docs/ARCHITECTURE.md): kernels for Llama 3.x, Qwen2, Mistral and Gemma 1/2/3,
and the vision-language Qwen2-VL and Qwen2.5-VL (both towers).

``apply_liger_kernel_to_llama(model=None)`` patches the classes, ``model=m`` one instance;
``apply_liger_kernel(m)`` picks by ``m.config.model_type`` (``handle.family`` says which). Every call
returns a :class:`PatchHandle` whose ``revert()`` restores Hugging Face's behaviour.
"""

from ._causal_lm import LigerCausalLMOutputWithPast
from ._handle import PatchHandle
from .apply import apply_liger_kernel, supported_model_types
from .gemma import apply_liger_kernel_to_gemma, apply_liger_kernel_to_gemma2, apply_liger_kernel_to_gemma3_text
from .llama import apply_liger_kernel_to_llama
from .mistral import apply_liger_kernel_to_mistral
from .qwen2 import apply_liger_kernel_to_qwen2
from .qwen2_vl import VisionLanguagePatchHandle, apply_liger_kernel_to_qwen2_5_vl, apply_liger_kernel_to_qwen2_vl

__all__ = [
    "LigerCausalLMOutputWithPast",
    "PatchHandle",
    "VisionLanguagePatchHandle",
    "apply_liger_kernel",
    "apply_liger_kernel_to_gemma",
    "apply_liger_kernel_to_gemma2",
    "apply_liger_kernel_to_gemma3_text",
    "apply_liger_kernel_to_llama",
    "apply_liger_kernel_to_mistral",
    "apply_liger_kernel_to_qwen2",
    "apply_liger_kernel_to_qwen2_5_vl",
    "apply_liger_kernel_to_qwen2_vl",
    "supported_model_types",
]
