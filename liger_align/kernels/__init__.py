"""Triton kernels with autograd Functions and plain-PyTorch twins (see DESIGN.md, layer ``kernels``)."""

from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .linear_logprobs import LinearLogProbs, LogitOptions, linear_logprobs

__all__ = ["LinearLogProbs", "LogitOptions", "fused_linear_cross_entropy", "linear_logprobs"]
