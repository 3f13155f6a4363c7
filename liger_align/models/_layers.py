"""Replacement ``forward``s for the decoder's layers and the RoPE function of a modeling module.

They have the signatures of Hugging Face's ``<Family>RMSNorm.forward``, ``<Family>MLP.forward`` and
``apply_rotary_pos_emb`` (Llama, Qwen2, Mistral and the Gemmas share them) and run this package's
kernels. Gemma's RMSNorm scales by ``1 + weight`` and returns the input's dtype
(:func:`gemma_rms_norm_forward`); its MLP gates with the tanh-approximate GELU (:func:`geglu_mlp_forward`).
Each is marked with ``_liger_align = True`` so a patch can be recognised.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..kernels.layers.geglu import geglu
from ..kernels.layers.rms_norm import rms_norm
from ..kernels.layers.rope import rope
from ..kernels.layers.swiglu import swiglu

SILU_NAMES = ("silu", "swish")
# transformers' activation modules computing 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))):
# "gelu_pytorch_tanh" / "gelu_python_tanh" (GELUTanh, formerly PytorchGELUTanh), "gelu_new", "gelu_fast".
TANH_GELU_CLASSES = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation")


def _mark(fn: Callable) -> Callable:
    fn._liger_align = True  # type: ignore[attr-defined]
    return fn


def _eps(norm: torch.nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return getattr(norm, "eps", 1e-6) if eps is None else eps


@_mark
def rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``<Family>RMSNorm.forward``: ``(..., H) -> (..., H)`` through :func:`~liger_align.kernels.rms_norm`."""
    return rms_norm(hidden_states, self.weight, eps=_eps(self))


@_mark
def gemma_rms_norm_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``GemmaRMSNorm.forward`` (Gemma 1, 2, 3): ``x / rms(x) * (1 + weight)`` in fp32, cast to ``x.dtype``."""
    return rms_norm(x, self.weight, eps=_eps(self), offset=1.0, out_dtype=x.dtype)


def uses_silu(mlp: torch.nn.Module) -> bool:
    """True when the MLP's activation is SiLU: its ``act_fn`` module (``nn.SiLU``, transformers'
    ``SiLUActivation``), or without one ``config.hidden_act`` in ``("silu", "swish")``."""
    act = getattr(mlp, "act_fn", None)
    if isinstance(act, torch.nn.Module):
        return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return getattr(getattr(mlp, "config", None), "hidden_act", None) in SILU_NAMES


@_mark
def swiglu_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``<Family>MLP.forward``: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, ``(..., H) -> (..., H)``.

    The gate runs through :func:`~liger_align.kernels.layers.swiglu.swiglu`; its backward overwrites the two
    projections' outputs, which nothing else reads. Another activation runs Hugging Face's formula.
    """
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not uses_silu(self):
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(swiglu(gate, up, inplace_backward=True))


def uses_tanh_gelu(mlp: torch.nn.Module) -> bool:
    """True when the MLP's ``act_fn`` is a tanh-approximate GELU (Gemma's ``gelu_pytorch_tanh``).

    Decided by the activation module the MLP actually runs (Gemma reads ``config.hidden_act``,
    Gemma 2 and 3 ``config.hidden_activation``).
    """
    act = getattr(mlp, "act_fn", None)
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "tanh"
    return type(act).__name__ in TANH_GELU_CLASSES


@_mark
def geglu_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``GemmaMLP.forward``: ``down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))``, ``(..., H) -> (..., H)``.

    The gate runs through :func:`~liger_align.kernels.layers.geglu.geglu` (its backward overwrites the two
    projections' outputs, which nothing else reads). Another activation runs Hugging Face's formula.
    """
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not uses_tanh_gelu(self):
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(geglu(gate, up, inplace_backward=True))


def make_rope_function(original: Callable) -> Callable:
    """A drop-in ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` running :func:`rope`.

    Calls ``original`` (Hugging Face's function) for inputs outside :func:`rope`'s contract, e.g.
    ``cos`` without a batch dimension, partial rotary or extra keyword arguments.
    """

    @_mark
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1, **kwargs):
        if kwargs or not _rope_supported(q, k, cos, sin, unsqueeze_dim):
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, **kwargs)
        return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.__doc__ = (
        "Liger-align RoPE in place of Hugging Face's ``apply_rotary_pos_emb``; see "
        ":func:`liger_align.kernels.layers.rope.rope`."
    )
    apply_rotary_pos_emb.original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _rope_supported(q, k, cos, sin, unsqueeze_dim: int) -> bool:
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return False
    seq_dim = 3 - unsqueeze_dim
    d = q.shape[-1]
    return (
        d % 2 == 0 and k.shape[-1] == d and k.dtype == q.dtype and k.shape[0] == q.shape[0]
        and k.shape[seq_dim] == q.shape[seq_dim]
        and all(t.shape[0] in (1, q.shape[0]) and t.shape[1:] == (q.shape[seq_dim], d) for t in (cos, sin))
        and all(t.is_floating_point() and t.device == q.device for t in (q, k, cos, sin))
    )
