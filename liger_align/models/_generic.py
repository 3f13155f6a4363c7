"""Patches for a model whose ``config.model_type`` has no family of its own: only what is proven safe.

A layer kernel replaces a module's forward only where the module's own code computes the same thing.
That is checked, per module class, on a probe input (a seeded CPU generator, so the caller's random
state is untouched) before anything is patched:

- an ``*RMSNorm`` module with a 1-D ``weight``: against :func:`rms_norm_forward` (Llama's ``weight * x̂``)
  and :func:`gemma_rms_norm_forward` (``(1 + weight) * x̂``), in the weight's dtype and in one other
  dtype (so the output dtype rule is checked too);
- a gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn`` SiLU or tanh-GELU): against the
  SwiGLU / GeGLU forward;
- the modeling module's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``: against the RoPE kernel.

- the causal-LM forward: the fused loss (no logits in training) only where the model's own forward is
  proven, on a probe input, to be the cross-entropy of its linear head over the last hidden states (plus
  the MoE router's auxiliary loss); see :mod:`._any_causal_lm`. Otherwise the logits are still built and
  the handle's ``skipped`` says why.
Modules whose parameters are sharded (DeepSpeed ZeRO-3, FSDP2 DTensors) or on the meta device are not
probed and not patched: patch before sharding.
"""

from __future__ import annotations

import sys
import types
from typing import Callable

import torch
from torch import nn

from ._any_causal_lm import probe_fused_head, wants_fused_loss
from ._families import _forward_slot, patch_rope_function
from ._handle import PatchHandle
from ._layers import (
    geglu_mlp_forward,
    gemma_rms_norm_forward,
    make_rope_function,
    rms_norm_forward,
    swiglu_mlp_forward,
    uses_silu,
    uses_tanh_gelu,
)
from ._module_functions import parameter_names, plain_function
from .fused_forward import install_handler
from .head_call import unwrap_peft

_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
_ROPE_PARAMS = ["q", "k", "cos", "sin", "unsqueeze_dim"]


def _probe_tensor(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(shape, generator=gen).to(device=like.device, dtype=dtype or like.dtype)


def _same(got: object, want: object, inputs: torch.dtype) -> bool:
    """Same type, shape and dtype, and values within the tolerance of the coarser of ``inputs`` and the output."""
    if isinstance(want, tuple):
        return (isinstance(got, tuple) and len(got) == len(want)
                and all(_same(g, w, inputs) for g, w in zip(got, want)))
    if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor):
        return False
    if got.shape != want.shape or got.dtype != want.dtype or not torch.isfinite(want).all():
        return False
    err = (got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)
    return err.item() < max(_TOLERANCE.get(want.dtype, 1e-2), _TOLERANCE.get(inputs, 1e-2))


def _unprobeable(module: nn.Module) -> bool:
    """Parameters that cannot be run as they are: meta, ZeRO-3 partitioned, or FSDP2 DTensors."""
    return any(p.device.type == "meta" or hasattr(p, "ds_id") or type(p).__name__ == "DTensor"
               for p in module.parameters())


def _own_forward(module: nn.Module) -> Callable:
    """The class's forward bound to ``module`` (what a patch replaces), without hooks."""
    return types.MethodType(type(module).forward, module)


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.lower().endswith("rmsnorm") and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and (hasattr(module, "variance_epsilon") or hasattr(module, "eps")))


def _probe_norm(module: nn.Module) -> Callable | None:
    weight = module.weight
    other = torch.bfloat16 if weight.dtype != torch.bfloat16 else torch.float32
    inputs = [_probe_tensor((2, 5, weight.numel()), weight, dtype) * 2 for dtype in (weight.dtype, other)]
    for candidate in (rms_norm_forward, gemma_rms_norm_forward):
        if all(_same(candidate(module, x), _own_forward(module)(x), x.dtype) for x in inputs):
            return candidate
    return None


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")) and (
        isinstance(getattr(module, "act_fn", None), nn.Module))


def _probe_mlp(module: nn.Module) -> Callable | None:
    candidate = swiglu_mlp_forward if uses_silu(module) else geglu_mlp_forward if uses_tanh_gelu(module) else None
    weight = getattr(module.gate_proj, "weight", None)
    if candidate is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    x = _probe_tensor((2, 3, weight.shape[1]), weight)
    return candidate if _same(candidate(module, x), _own_forward(module)(x), x.dtype) else None


def _probe_rope(original: Callable, like: torch.Tensor, head_dim: int) -> bool:
    if parameter_names(original) != _ROPE_PARAMS:
        return False
    q, k = _probe_tensor((2, 3, 7, head_dim), like), _probe_tensor((2, 1, 7, head_dim), like) * 0.5
    angles = _probe_tensor((2, 7, head_dim), like).float()
    cos, sin = angles.cos().to(like.dtype), angles.sin().to(like.dtype)
    return _same(make_rope_function(original)(q, k, cos, sin), original(q, k, cos, sin), q.dtype)


def _head_dim(config: object) -> int | None:
    head_dim = getattr(config, "head_dim", None)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    return head_dim if isinstance(head_dim, int) and head_dim > 0 and head_dim % 2 == 0 else None


def patch_generic(model: nn.Module, *, rope: bool = True, rms_norm: bool = True, swiglu: bool = True,
                  geglu: bool = True, fused_linear_cross_entropy: bool = True, **_other: bool) -> PatchHandle:
    """Patch ``model``'s layers that match a kernel on a probe input (see the module docstring).

    ``swiglu`` / ``geglu`` enable the gated-MLP kernels; flags of other families' kernels are ignored.
    Returns a :class:`PatchHandle` with ``family="generic"``; ``skipped`` lists what was not patched and why.
    """
    base = unwrap_peft(model)
    handle = PatchHandle(family="generic")
    verdicts: dict[type, Callable | None] = {}
    unprobeable: set[str] = set()
    seen = {"norm": 0, "mlp": 0}
    with torch.no_grad():
        for name, module in base.named_modules():
            if rms_norm and _is_rms_norm(module):
                kind, probe = "norm", _probe_norm
            elif (swiglu or geglu) and _is_gated_mlp(module):
                kind, probe = "mlp", _probe_mlp
            else:
                continue
            seen[kind] += 1
            if _unprobeable(module):
                unprobeable.add(type(module).__name__)
                continue
            cls = type(module)
            if cls not in verdicts:
                try:
                    verdicts[cls] = probe(module)
                except Exception:  # any failure to run the probe means: not proven equal, leave it alone
                    verdicts[cls] = None
            fn = verdicts[cls]
            if fn is None or (fn is swiglu_mlp_forward and not swiglu) or (fn is geglu_mlp_forward and not geglu):
                continue
            handle.add(module, _forward_slot(module), types.MethodType(fn, module),
                       f"{name or cls.__name__}.forward")
        for cls, fn in verdicts.items():
            if fn is None:
                handle.skipped.append(f"{cls.__name__} (its forward differs from the kernel's on a probe input)")
        if unprobeable:
            handle.skipped.append(f"{', '.join(sorted(unprobeable))} (sharded or meta parameters: patch before "
                                  "sharding)")
        if rms_norm and not seen["norm"]:
            handle.skipped.append("RMSNorm (no *RMSNorm module with a 1-D weight)")
        if (swiglu or geglu) and not seen["mlp"]:
            handle.skipped.append("MLP (no gate_proj/up_proj/down_proj MLP)")
        if rope:
            _generic_rope(handle, base)
    if fused_linear_cross_entropy:
        run, why = probe_fused_head(base)
        if run is None:
            handle.skipped.append(f"the fused loss ({why}; the logits are still built)")
        else:
            handle.extend(install_handler(base, "sft", wants_fused_loss, run, last=True))
    return handle


def _generic_rope(handle: PatchHandle, base: nn.Module) -> None:
    modeling = sys.modules.get(type(base).__module__)
    current = getattr(modeling, "apply_rotary_pos_emb", None)
    like = next((p for p in base.parameters() if p.is_floating_point()), None)
    head_dim = _head_dim(getattr(base, "config", None))
    if not callable(current) or like is None or head_dim is None:
        handle.skipped.append("RoPE (no apply_rotary_pos_emb in the model's modeling module)")
        return
    original = plain_function(current)
    try:
        ok = like.device.type != "meta" and _probe_rope(original, like.detach(), head_dim)
    except Exception:  # a probe that cannot run proves nothing
        ok = False
    if ok:
        patch_rope_function(handle, modeling)
    else:
        handle.skipped.append(f"RoPE ({modeling.__name__}.apply_rotary_pos_emb has another signature or differs "
                              "on a probe input)")
