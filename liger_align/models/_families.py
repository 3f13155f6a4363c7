"""Patch one model family (Llama, Qwen2, Mistral: the same four pieces) by class or by instance.

A family's modeling module defines ``<Prefix>RMSNorm``, ``<Prefix>MLP`` (``down(act(gate(x)) * up(x))``),
the module-level ``apply_rotary_pos_emb`` its attention calls, and ``<Prefix>ForCausalLM``.

- Class patch (``model=None``): the classes' ``forward`` and the module's ``apply_rotary_pos_emb``
  are replaced, so every model of the family (built before or after) runs the kernels.
- Instance patch: ``forward`` is set on that model's own RMSNorm and MLP modules and on the model
  (a PEFT wrapper is unwrapped with ``get_base_model()``). RoPE has no per-instance hook (the
  attention calls the module-level function), so ``rope=True`` patches the family's module function
  while the handle lives; it computes the same values as Hugging Face's, for every model.

Nothing in ``torch.nn.functional`` is touched. Each patch is reference-counted (see ``_handle``).
"""

from __future__ import annotations

import importlib
import types
import warnings
from dataclasses import dataclass

from torch import nn

from ._causal_lm import causal_lm_forward
from ._handle import PatchHandle
from ._layers import make_rope_function, rms_norm_forward, swiglu_mlp_forward, uses_silu


@dataclass(frozen=True)
class ModelFamily:
    """Where a family's classes live: ``transformers.models.<module>`` and the class-name prefix."""

    model_type: str
    module: str
    prefix: str

    def modeling(self) -> types.ModuleType:
        return importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")

    def cls(self, suffix: str) -> type:
        return getattr(self.modeling(), f"{self.prefix}{suffix}")


LLAMA = ModelFamily("llama", "llama", "Llama")
QWEN2 = ModelFamily("qwen2", "qwen2", "Qwen2")
MISTRAL = ModelFamily("mistral", "mistral", "Mistral")
FAMILIES = {f.model_type: f for f in (LLAMA, QWEN2, MISTRAL)}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (``get_base_model()``), else ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _forward_slot(module: nn.Module) -> str:
    """Where a module's own forward lives: accelerate's hooks keep the real one in ``_old_forward``."""
    return "_old_forward" if "_old_forward" in vars(module) else "forward"


def _patch_rope(handle: PatchHandle, family: ModelFamily) -> None:
    modeling = family.modeling()
    current = modeling.apply_rotary_pos_emb
    original = getattr(current, "original", current)
    handle.add(modeling, "apply_rotary_pos_emb", make_rope_function(original),
               f"{modeling.__name__}.apply_rotary_pos_emb")


def patch_family(
    family: ModelFamily, *, rope: bool, rms_norm: bool, swiglu: bool, fused_linear_cross_entropy: bool,
    model: nn.Module | None,
) -> PatchHandle:
    """Apply the selected patches to ``family``'s classes (``model=None``) or to ``model``."""
    handle = PatchHandle()
    if rope:
        _patch_rope(handle, family)
    if model is None:
        for flag, suffix, fn in (
            (rms_norm, "RMSNorm", rms_norm_forward),
            (swiglu, "MLP", swiglu_mlp_forward),
            (fused_linear_cross_entropy, "ForCausalLM", causal_lm_forward),
        ):
            if flag:
                cls = family.cls(suffix)
                handle.add(cls, "forward", fn, f"{cls.__name__}.forward")
        return handle

    base = unwrap(model)
    rms_cls, mlp_cls, lm_cls = (family.cls(s) for s in ("RMSNorm", "MLP", "ForCausalLM"))
    skipped_mlp = 0
    for name, module in base.named_modules():
        if rms_norm and isinstance(module, rms_cls):
            fn = rms_norm_forward
        elif swiglu and isinstance(module, mlp_cls):
            if not uses_silu(module):
                skipped_mlp += 1
                continue
            fn = swiglu_mlp_forward
        elif fused_linear_cross_entropy and isinstance(module, lm_cls):
            fn = causal_lm_forward
        else:
            continue
        handle.add(module, _forward_slot(module), types.MethodType(fn, module),
                   f"{name or type(module).__name__}.forward")
    if skipped_mlp:
        warnings.warn(f"liger_align: {skipped_mlp} {mlp_cls.__name__} module(s) use an activation other than "
                      "SiLU; the SwiGLU kernel was not applied to them", stacklevel=3)
    return handle
