"""Triton kernels with autograd Functions and plain-PyTorch twins (see docs/ARCHITECTURE.md, ``kernels/``).

- :func:`linear_logprobs`: fused linear -> per-token target log-prob, the base of every loss.
- :func:`fused_linear_cross_entropy`: fused linear cross-entropy on the same row passes.
- :func:`rms_norm`, :func:`rope`, :func:`swiglu`, :func:`geglu`: the model kernels (Llama, Qwen2, Mistral, Gemma).
- :func:`check_linear_inputs`: the shape/dtype/device checks of a fused head's tensors, for the losses.
- :func:`layer_norm`: LayerNorm with optional bias (vision towers, e.g. Qwen2-VL).
"""

from ._linear_chunks import DEFAULT_CHUNK_BYTES, check_linear_inputs
from ._strategy import STRATEGIES
from .fused_linear_cross_entropy import CrossEntropyOutput, fused_linear_cross_entropy
from .geglu import geglu
from .layer_norm import layer_norm
from .linear_logprobs import LinearLogProbs, LogitOptions, linear_logprobs
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "STRATEGIES",
    "CrossEntropyOutput",
    "LinearLogProbs",
    "LogitOptions",
    "fused_linear_cross_entropy",
    "check_linear_inputs",
    "geglu",
    "layer_norm",
    "linear_logprobs",
    "rms_norm",
    "rope",
    "swiglu",
]
