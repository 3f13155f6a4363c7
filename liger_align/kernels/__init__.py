"""Triton kernels with autograd Functions and plain-PyTorch twins (see docs/ARCHITECTURE.md, ``kernels/``).

- :func:`linear_logprobs`: fused linear -> per-token target log-prob, the base of every loss.
- :func:`fused_linear_cross_entropy`: fused linear cross-entropy on the same row passes.
- :func:`rms_norm`, :func:`rope`, :func:`swiglu`, :func:`geglu`: the model kernels (Llama, Qwen2, Mistral, Gemma).
- :func:`check_linear_inputs`: the shape/dtype/device checks of a fused head's tensors, for the losses.
- :func:`layer_norm`: LayerNorm with optional bias (vision towers, e.g. Qwen2-VL).
"""

from .head._linear_chunks import DEFAULT_CHUNK_BYTES, check_linear_inputs
from .head._strategy import STRATEGIES
from .head.fused_linear_cross_entropy import CrossEntropyOutput, fused_linear_cross_entropy
from .head.linear_logprobs import LinearLogProbs, LogitOptions, linear_logprobs
from .layers.geglu import geglu
from .layers.layer_norm import layer_norm
from .layers.rms_norm import rms_norm
from .layers.rope import rope
from .layers.swiglu import swiglu

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
