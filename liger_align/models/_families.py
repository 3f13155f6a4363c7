"""Patch one model family (Llama, Qwen2, Mistral, Gemma 1/2/3: the same four pieces) by class or by instance.

A family's modeling module defines ``<Prefix>RMSNorm``, ``<Prefix>MLP`` (``down(act(gate(x)) * up(x))``),
the module-level ``apply_rotary_pos_emb`` its attention calls, and ``<Prefix>ForCausalLM``. The families
differ in two of them: Gemma's RMSNorm scales by ``1 + weight`` and returns the input's dtype, and its
MLP gates with the tanh-approximate GELU (the ``geglu`` flag, where the Llama-like families have ``swiglu``).
Gemma 2 and 3 have two more RMSNorms per layer (pre/post feed-forward) and Gemma 3 q/k RMSNorms over
the head dimension: the same class, so the same patch. Gemma 2's final-logit soft-capping is applied by
the fused causal-LM forward from the config. The embedding scale (``sqrt(hidden)``) is left as it is.

- Class patch (``model=None``): the classes' ``forward`` and the module's ``apply_rotary_pos_emb``
  are replaced, so every model of the family (built before or after) runs the kernels.
- Instance patch: ``forward`` is set on that model's own RMSNorm and MLP modules and on the model
  (a PEFT wrapper is unwrapped with ``get_base_model()``). RoPE has no per-instance hook (the
  attention calls the module-level function), so ``rope=True`` patches the family's module function
  while the handle lives; it computes the same values as Hugging Face's, for every model.

An instance patch checks the model first (before anything is patched): a model of another family, or
``fused_linear_cross_entropy=True`` on a model without ``<Prefix>ForCausalLM`` (no output head), is a
``ValueError``. Nothing in ``torch.nn.functional`` is touched. Each patch is reference-counted (see ``_handle``).
"""

from __future__ import annotations

import importlib
import types
import warnings
from dataclasses import dataclass

from torch import nn

from ._causal_lm import causal_lm_forward
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
from ._module_functions import plain_function
from .head_call import unwrap_peft

#: MLP kernel flag -> (replacement forward, "does this MLP use the kernel's activation?", activation, kernel).
MLP_KERNELS = {
    "swiglu": (swiglu_mlp_forward, uses_silu, "SiLU", "SwiGLU"),
    "geglu": (geglu_mlp_forward, uses_tanh_gelu, "tanh-approximate GELU", "GeGLU"),
}


@dataclass(frozen=True)
class ModelFamily:
    """Where a family's classes live: ``transformers.models.<module>`` and the class-name prefix.

    ``mlp``: the MLP kernel flag (a key of :data:`MLP_KERNELS`); ``offset_norm``: Gemma's ``(1 + weight)``
    RMSNorm returning the input's dtype.
    """

    model_type: str
    module: str
    prefix: str
    mlp: str = "swiglu"
    offset_norm: bool = False

    @property
    def patcher_name(self) -> str:
        return f"apply_liger_kernel_to_{self.model_type}"

    def norm_forward(self):
        return gemma_rms_norm_forward if self.offset_norm else rms_norm_forward

    def modeling(self) -> types.ModuleType:
        return importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")

    def cls(self, suffix: str) -> type:
        return getattr(self.modeling(), f"{self.prefix}{suffix}")


LLAMA = ModelFamily("llama", "llama", "Llama")
QWEN2 = ModelFamily("qwen2", "qwen2", "Qwen2")
MISTRAL = ModelFamily("mistral", "mistral", "Mistral")
GEMMA = ModelFamily("gemma", "gemma", "Gemma", mlp="geglu", offset_norm=True)
GEMMA2 = ModelFamily("gemma2", "gemma2", "Gemma2", mlp="geglu", offset_norm=True)
GEMMA3_TEXT = ModelFamily("gemma3_text", "gemma3", "Gemma3", mlp="geglu", offset_norm=True)
FAMILIES = {f.model_type: f for f in (LLAMA, QWEN2, MISTRAL, GEMMA, GEMMA2, GEMMA3_TEXT)}


def _forward_slot(module: nn.Module) -> str:
    """Where a module's own forward lives: accelerate's hooks keep the real one in ``_old_forward``."""
    return "_old_forward" if "_old_forward" in vars(module) else "forward"


def _patch_rope(handle: PatchHandle, family: ModelFamily) -> None:
    patch_rope_function(handle, family.modeling())


def patch_rope_function(handle: PatchHandle, modeling: types.ModuleType) -> None:
    """Replace ``modeling.apply_rotary_pos_emb`` (module-wide) by liger-align's, keeping the original on it.

    The original may be the plain function or transformers' hub-kernel ``Func`` module standing in for it
    (see :mod:`._module_functions`); the replacement falls back to the plain function, and revert restores
    whichever object the module held."""
    original = plain_function(modeling.apply_rotary_pos_emb)
    handle.add(modeling, "apply_rotary_pos_emb", make_rope_function(original),
               f"{modeling.__name__}.apply_rotary_pos_emb")


def check_instance(family: ModelFamily, model: nn.Module, *, fused_linear_cross_entropy: bool) -> None:
    """Raise ``ValueError`` when ``model`` is not of ``family``, or has no ``<Prefix>ForCausalLM`` to fuse."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    base = unwrap_peft(model)
    rms_cls, mlp_cls, lm_cls = (family.cls(s) for s in ("RMSNorm", "MLP", "ForCausalLM"))
    modules = list(base.modules())
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if not any(isinstance(m, (rms_cls, mlp_cls, lm_cls)) for m in modules):
        other = f"{model_type} model" if model_type else "model without config.model_type"
        hint = f"apply_liger_kernel_to_{model_type}(model=...) or " if model_type in FAMILIES else ""
        raise ValueError(
            f"model: {family.patcher_name} patches {family.model_type} models ({family.prefix}* modules), got a "
            f"{other} ({type(base).__name__}); nothing was patched. Use {hint}apply_liger_kernel(model), which "
            "picks the patch by config.model_type"
        )
    if fused_linear_cross_entropy and not any(isinstance(m, lm_cls) for m in modules):
        get_head = getattr(base, "get_output_embeddings", None)
        why = "has no output head" if not callable(get_head) or get_head() is None else f"is not a {lm_cls.__name__}"
        raise ValueError(
            f"model: {type(base).__name__} {why} (no {lm_cls.__name__} inside), so fused_linear_cross_entropy=True "
            "has nothing to fuse; pass fused_linear_cross_entropy=False to patch only the layers"
        )


def patch_family(
    family: ModelFamily, *, rope: bool, rms_norm: bool, fused_linear_cross_entropy: bool, model: nn.Module | None,
    swiglu: bool = True, geglu: bool = True,
) -> PatchHandle:
    """Apply the selected patches to ``family``'s classes (``model=None``) or to ``model``.

    ``swiglu`` / ``geglu``: the MLP kernel flags; only the family's own (``family.mlp``) is used.
    """
    mlp = {"swiglu": swiglu, "geglu": geglu}[family.mlp]
    mlp_forward, mlp_fits, act_name, kernel = MLP_KERNELS[family.mlp]
    if model is not None:
        check_instance(family, model, fused_linear_cross_entropy=fused_linear_cross_entropy)
    handle = PatchHandle(family=family.model_type)
    if rope:
        _patch_rope(handle, family)
    if model is None:
        for flag, suffix, fn in (
            (rms_norm, "RMSNorm", family.norm_forward()),
            (mlp, "MLP", mlp_forward),
            (fused_linear_cross_entropy, "ForCausalLM", causal_lm_forward),
        ):
            if flag:
                cls = family.cls(suffix)
                handle.add(cls, "forward", fn, f"{cls.__name__}.forward")
        return handle

    base = unwrap_peft(model)
    rms_cls, mlp_cls, lm_cls = (family.cls(s) for s in ("RMSNorm", "MLP", "ForCausalLM"))
    skipped_mlp = 0
    for name, module in base.named_modules():
        if rms_norm and isinstance(module, rms_cls):
            fn = family.norm_forward()
        elif mlp and isinstance(module, mlp_cls):
            if not mlp_fits(module):
                skipped_mlp += 1
                continue
            fn = mlp_forward
        elif fused_linear_cross_entropy and isinstance(module, lm_cls):
            fn = causal_lm_forward
        else:
            continue
        handle.add(module, _forward_slot(module), types.MethodType(fn, module),
                   f"{name or type(module).__name__}.forward")
    if skipped_mlp:
        handle.skipped.append(f"{skipped_mlp} {mlp_cls.__name__} module(s): activation is not {act_name}")
        warnings.warn(f"liger_align: {skipped_mlp} {mlp_cls.__name__} module(s) use an activation other than "
                      f"{act_name}; the {kernel} kernel was not applied to them", stacklevel=3)
    return handle
