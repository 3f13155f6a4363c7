"""Replacement ``forward``s and functions for the vision towers of vision-language models (Qwen2-VL, Qwen2.5-VL).

- :func:`layer_norm_forward`: ``nn.LayerNorm.forward`` through :func:`~liger_align.kernels.layer_norm`
  (Qwen2-VL's vision blocks and patch merger).
- :class:`LigerLayerNorm`: an ``nn.LayerNorm`` whose forward is :func:`layer_norm_forward` while a class patch
  of a modeling module's ``LayerNorm`` name is live (see :func:`register_layer_norm_owner`), and
  ``nn.LayerNorm``'s own forward after it was reverted.
- :func:`make_vision_rope_function`: ``apply_rotary_pos_emb_vision(q, k, cos, sin)`` through
  :func:`~liger_align.kernels.layers.rope.rope`; the vision tower's ``q``/``k`` are ``(N, heads, D)`` (all images'
  patches in one sequence) and ``cos``/``sin`` ``(N, D)``, i.e. the kernel's ``(B, T, H, D)`` layout with ``B = 1``.
- :func:`gated_silu_mlp_forward`: a gated MLP that has no ``config`` (Qwen2.5-VL's vision ``Qwen2_5_VLMLP``,
  with biases), decided by its activation module.

Each is marked with ``_liger_align = True``, like :mod:`._layers`.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn

from ..kernels.layers.layer_norm import layer_norm
from ..kernels.layers.rope import rope
from ..kernels.layers.swiglu import swiglu
from ._handle import is_patched
from ._layers import _rope_supported

SILU_CLASSES = ("SiLU", "SiLUActivation")


def _mark(fn: Callable) -> Callable:
    fn._liger_align = True  # type: ignore[attr-defined]
    return fn


def fits_layer_norm(module: nn.Module) -> bool:
    """Whether an ``nn.LayerNorm`` has the kernel's contract: a weight and one normalised dimension."""
    return (
        isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1
        and isinstance(module.weight, torch.Tensor)
    )


@_mark
def layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``nn.LayerNorm.forward``: ``(..., H) -> (..., H)`` through :func:`~liger_align.kernels.layer_norm`.

    The output dtype is ``promote_types(x.dtype, weight.dtype)`` (``nn.LayerNorm`` under autocast gives fp32
    for fp32 weights; a bf16 model gets bf16). A LayerNorm without weight runs ``nn.LayerNorm.forward``.
    """
    if not fits_layer_norm(self):
        return nn.LayerNorm.forward(self, x)
    return layer_norm(x, self.weight, self.bias, eps=self.eps)


_LAYER_NORM_OWNERS: list[types.ModuleType] = []


def register_layer_norm_owner(modeling: types.ModuleType) -> None:
    """Remember a modeling module whose ``LayerNorm`` name a class patch replaces by :class:`LigerLayerNorm`."""
    if modeling not in _LAYER_NORM_OWNERS:
        _LAYER_NORM_OWNERS.append(modeling)


class LigerLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict) that runs liger-align's kernel while patched.

    Models built while a class patch (``apply_liger_kernel_to_qwen2_vl()``) is live construct their vision
    LayerNorms from this class; once every such patch is reverted they compute ``nn.LayerNorm``'s forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(is_patched(owner, "LayerNorm") for owner in _LAYER_NORM_OWNERS):
            return layer_norm_forward(self, x)
        return super().forward(x)


def is_silu(act: object) -> bool:
    """Whether an activation module computes SiLU (``nn.SiLU`` or transformers' ``SiLUActivation``)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ in SILU_CLASSES


@_mark
def gated_silu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with the SiLU gate through :func:`swiglu`.

    For gated MLPs without a ``config`` (Qwen2.5-VL's vision MLP): the activation module decides; any other
    activation runs the original formula. The projections may carry biases.
    """
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not is_silu(self.act_fn):
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(swiglu(gate, up, inplace_backward=True))


def _vision_rope_supported(q, k, cos, sin) -> bool:
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return False
    if q.dim() != 3 or k.dim() != 3 or cos.dim() != 2 or sin.dim() != 2:
        return False
    return _rope_supported(q[None], k[None], cos[None], sin[None], 2)


def make_vision_rope_function(original: Callable) -> Callable:
    """A drop-in ``apply_rotary_pos_emb_vision(q, k, cos, sin)`` running :func:`rope`.

    ``q (N, n_heads, D)``, ``k (N, n_heads, D)``, ``cos``/``sin`` ``(N, D)`` (fp32 in Qwen2-VL): computed in
    fp32 and returned in ``q``'s and ``k``'s dtypes, as Hugging Face's function does. Other inputs (and extra
    arguments) go to ``original``.
    """

    @_mark
    def apply_rotary_pos_emb_vision(q, k, cos, sin, *args, **kwargs):
        if args or kwargs or not _vision_rope_supported(q, k, cos, sin):
            return original(q, k, cos, sin, *args, **kwargs)
        q_out, k_out = rope(q[None], k[None], cos[None], sin[None], unsqueeze_dim=2)
        return q_out[0], k_out[0]

    apply_rotary_pos_emb_vision.__doc__ = (
        "Liger-align RoPE in place of Hugging Face's ``apply_rotary_pos_emb_vision``; see "
        ":func:`liger_align.models._vision_layers.make_vision_rope_function`."
    )
    apply_rotary_pos_emb_vision.original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb_vision
