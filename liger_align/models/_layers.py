"""Replacement ``forward``s for the decoder's layers and the RoPE function of a modeling module.

They have the signatures of Hugging Face's ``<Family>RMSNorm.forward``, ``<Family>MLP.forward`` and
``apply_rotary_pos_emb`` (Llama, Qwen2 and Mistral share them) and run this package's kernels.
Each is marked with ``_liger_align = True`` so a patch can be recognised.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..kernels.rms_norm import rms_norm
from ..kernels.rope import rope
from ..kernels.swiglu import swiglu

SILU_NAMES = ("silu", "swish")


def _mark(fn: Callable) -> Callable:
    fn._liger_align = True  # type: ignore[attr-defined]
    return fn


@_mark
def rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``<Family>RMSNorm.forward``: ``(..., H) -> (..., H)`` through :func:`~liger_align.kernels.rms_norm.rms_norm`."""
    eps = getattr(self, "variance_epsilon", None)
    if eps is None:
        eps = getattr(self, "eps", 1e-6)
    return rms_norm(hidden_states, self.weight, eps=eps)


def uses_silu(mlp: torch.nn.Module) -> bool:
    """True when the MLP's activation is SiLU (``config.hidden_act`` in ``("silu", "swish")``)."""
    config = getattr(mlp, "config", None)
    return getattr(config, "hidden_act", None) in SILU_NAMES


@_mark
def swiglu_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``<Family>MLP.forward``: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, ``(..., H) -> (..., H)``.

    The gate runs through :func:`~liger_align.kernels.swiglu.swiglu`; its backward overwrites the two
    projections' outputs, which nothing else reads. Another activation runs Hugging Face's formula.
    """
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not uses_silu(self):
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(swiglu(gate, up, inplace_backward=True))


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
        ":func:`liger_align.kernels.rope.rope`."
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
