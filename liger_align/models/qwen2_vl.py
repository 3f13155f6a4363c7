"""Qwen2-VL and Qwen2.5-VL (``<Prefix>ForConditionalGeneration``): kernels for both towers and the fused loss.

Written against transformers 5.x's ``modeling_qwen2_vl`` / ``modeling_qwen2_5_vl`` (the names below are the
same from 5.0 to at least 5.24). What each flag patches:

=============================  ======================================  =========================================
flag                           Qwen2-VL                                Qwen2.5-VL
=============================  ======================================  =========================================
``rms_norm``                   ``Qwen2VLRMSNorm`` (text)               ``Qwen2_5_VLRMSNorm`` (text and vision)
``swiglu``                     ``Qwen2MLP`` (text)                     ``Qwen2MLP`` (text), ``Qwen2_5_VLMLP`` (vision)
``rope``                       ``apply_rotary_pos_emb`` (text M-RoPE) and ``apply_rotary_pos_emb_vision``
``layer_norm``                 the vision tower's ``nn.LayerNorm``\\ s  nothing (its vision tower uses RMSNorm)
``fused_linear_cross_entropy`` ``<Prefix>ForConditionalGeneration.forward`` (:func:`vision_language_forward`)
=============================  ======================================  =========================================

M-RoPE in transformers 5.x: the rotary embedding module already interleaves the temporal / height / width
sections, so the attention receives per-token ``cos``/``sin`` of shape ``(B, T, D)``: exactly the layout of
:func:`~liger_align.kernels.layers.rope.rope`, which therefore runs unchanged. (Liger-Kernel's patch targets
``apply_multimodal_rotary_pos_emb`` and ``Qwen2RMSNorm``, which these modules no longer have.)

Class patch (``model=None``): every model of the family, built before or after, except the vision
``LayerNorm``\\ s, which are patched in models built while the patch is live (``modeling_qwen2_vl.LayerNorm``
is replaced by :class:`~._vision_layers.LigerLayerNorm`); pass ``model=`` to patch an existing instance's.
Instance patch: the modules of that model only (RoPE, as for the text families, module-wide while the
handle lives). The returned :class:`VisionLanguagePatchHandle` says per flag what was patched, or why not.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field

from torch import nn

from ._families import ModelFamily, _forward_slot, _patch_rope
from ._handle import PatchHandle
from ._layers import rms_norm_forward, swiglu_mlp_forward, uses_silu
from ._module_functions import plain_function
from ._vision_forward import vision_language_forward
from ._vision_layers import (
    LigerLayerNorm,
    fits_layer_norm,
    gated_silu_mlp_forward,
    is_silu,
    layer_norm_forward,
    make_vision_rope_function,
    register_layer_norm_owner,
)
from .head_call import unwrap_peft

FLAGS = ("rope", "rms_norm", "swiglu", "layer_norm", "fused_linear_cross_entropy")


@dataclass(frozen=True)
class VisionLanguageFamily:
    """Where a vision-language family's pieces live, on top of :class:`~._families.ModelFamily`.

    ``text_mlp``: the decoder's MLP class; ``vision_mlp``: a gated vision MLP class or None;
    ``vision_layer_norm``: whether the vision tower uses ``nn.LayerNorm`` (else RMSNorm).
    """

    base: ModelFamily
    title: str
    text_mlp: str = "Qwen2MLP"
    vision_mlp: str | None = None
    vision_layer_norm: bool = False

    @property
    def model_type(self) -> str:
        return self.base.model_type

    def modeling(self) -> types.ModuleType:
        return self.base.modeling()

    def cls(self, name: str) -> type:
        return getattr(self.modeling(), name)


QWEN2_VL = VisionLanguageFamily(ModelFamily("qwen2_vl", "qwen2_vl", "Qwen2VL"), "Qwen2-VL", vision_layer_norm=True)
QWEN2_5_VL = VisionLanguageFamily(ModelFamily("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VL"), "Qwen2.5-VL",
                                  vision_mlp="Qwen2_5_VLMLP")
VISION_LANGUAGE_FAMILIES = {f.model_type: f for f in (QWEN2_VL, QWEN2_5_VL)}


@dataclass
class VisionLanguagePatchHandle(PatchHandle):
    """A :class:`~._handle.PatchHandle` that also reports, per flag, what happened.

    ``states[flag]`` is ``"patched: <what>"``, ``"off"`` (flag False), ``"not present: <why>"`` (nothing of
    that kind in this model or family) or, after :meth:`revert`, ``"reverted"`` for what was patched.
    """

    states: dict[str, str] = field(default_factory=dict)

    def revert(self) -> None:
        super().revert()
        self.states = {k: "reverted" if v.startswith("patched") else v for k, v in self.states.items()}


# ------------------------------------------------------------------------------------------------ patching


def _patch_rope_functions(handle: PatchHandle, family: VisionLanguageFamily) -> list[str]:
    """Text M-RoPE (``apply_rotary_pos_emb``) and, where the module has it, ``apply_rotary_pos_emb_vision``."""
    _patch_rope(handle, family.base)
    done = ["apply_rotary_pos_emb (text M-RoPE)"]
    modeling = family.modeling()
    current = getattr(modeling, "apply_rotary_pos_emb_vision", None)
    if current is not None:
        original = plain_function(current)
        handle.add(modeling, "apply_rotary_pos_emb_vision", make_vision_rope_function(original),
                   f"{modeling.__name__}.apply_rotary_pos_emb_vision")
        done.append("apply_rotary_pos_emb_vision (vision)")
    return done


def _module_forward(module: nn.Module, flags: dict[str, bool], family: VisionLanguageFamily, classes: dict[str, type]
                    ) -> tuple[str | None, object]:
    """``(flag, replacement forward)`` for one module of an instance, ``(flag, None)`` for a skipped MLP, or
    ``(None, None)`` when nothing applies."""
    if flags["rms_norm"] and isinstance(module, classes["rms_norm"]):
        return "rms_norm", rms_norm_forward
    if flags["swiglu"] and isinstance(module, classes["text_mlp"]):
        return "swiglu", swiglu_mlp_forward if uses_silu(module) else None
    if flags["swiglu"] and classes["vision_mlp"] is not None and isinstance(module, classes["vision_mlp"]):
        return "swiglu", gated_silu_mlp_forward if is_silu(getattr(module, "act_fn", None)) else None
    if flags["layer_norm"] and family.vision_layer_norm and fits_layer_norm(module):
        return "layer_norm", layer_norm_forward
    if flags["fused_linear_cross_entropy"] and isinstance(module, classes["lm"]):
        return "fused_linear_cross_entropy", vision_language_forward
    return None, None


def patch_vision_language(family: VisionLanguageFamily, *, model: nn.Module | None, **flags: bool
                          ) -> VisionLanguagePatchHandle:
    """Apply the selected patches (``flags``: each of :data:`FLAGS`) to ``family``'s classes or to ``model``."""
    handle = VisionLanguagePatchHandle(family=family.model_type)
    prefix = family.base.prefix
    classes = {"rms_norm": family.cls(f"{prefix}RMSNorm"), "text_mlp": family.cls(family.text_mlp),
               "vision_mlp": family.cls(family.vision_mlp) if family.vision_mlp else None,
               "lm": family.cls(f"{prefix}ForConditionalGeneration")}
    found: dict[str, list[str]] = {flag: [] for flag in FLAGS}
    if flags["rope"]:
        found["rope"] = _patch_rope_functions(handle, family)
    skipped_mlp = 0
    if model is None:
        targets = [("rms_norm", classes["rms_norm"], rms_norm_forward), ("swiglu", classes["text_mlp"],
                   swiglu_mlp_forward), ("swiglu", classes["vision_mlp"], gated_silu_mlp_forward),
                   ("fused_linear_cross_entropy", classes["lm"], vision_language_forward)]
        for flag, cls, fn in targets:
            if flags[flag] and cls is not None:
                handle.add(cls, "forward", fn, f"{cls.__name__}.forward")
                found[flag].append(f"{cls.__name__}.forward")
        if flags["layer_norm"] and family.vision_layer_norm:
            modeling = family.modeling()
            register_layer_norm_owner(modeling)
            handle.add(modeling, "LayerNorm", LigerLayerNorm, f"{modeling.__name__}.LayerNorm")
            found["layer_norm"].append("LayerNorm of the models built from now on (model= patches an existing one's)")
    else:
        for name, module in unwrap_peft(model).named_modules():
            flag, fn = _module_forward(module, flags, family, classes)
            if flag is None:
                continue
            if fn is None:
                skipped_mlp += 1
                continue
            label = f"{name or type(module).__name__}.forward"
            handle.add(module, _forward_slot(module), types.MethodType(fn, module), label)
            found[flag].append(label)
    if skipped_mlp:
        handle.skipped.append(f"swiglu: {skipped_mlp} MLP module(s) whose activation is not SiLU")
        warnings.warn(f"liger_align: {skipped_mlp} MLP module(s) use an activation other than SiLU; the SwiGLU "
                      "kernel was not applied to them", stacklevel=3)
    handle.states = {flag: _state(flag, flags[flag], found[flag], family, instance=model is not None)
                     for flag in FLAGS}
    handle.skipped.extend(f"{flag}: {state.removeprefix('not present: ')}" for flag, state in handle.states.items()
                          if state.startswith("not present"))
    return handle


_WHAT = {"rms_norm": "RMSNorm modules", "swiglu": "gated SiLU MLPs", "layer_norm": "LayerNorm modules",
         "fused_linear_cross_entropy": "ForConditionalGeneration forward"}


def _state(flag: str, wanted: bool, found: list[str], family: VisionLanguageFamily, *, instance: bool) -> str:
    """One entry of :attr:`VisionLanguagePatchHandle.states`."""
    if not wanted:
        return "off"
    if flag == "layer_norm" and not family.vision_layer_norm:
        return f"not present: {family.title}'s vision tower has no LayerNorm (it uses RMSNorm)"
    if not found:
        return f"not present: no {_WHAT[flag]} in this model"
    if instance and flag != "rope":
        return f"patched: {len(found)} {_WHAT[flag]}"
    return "patched: " + ", ".join(found)


def _check_instance(family: VisionLanguageFamily, model: nn.Module | None) -> None:
    if model is None:
        return
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a {family.title} nn.Module or None, got {type(model).__name__}")
    model_type = getattr(getattr(unwrap_peft(model), "config", None), "model_type", None)
    if model_type != family.model_type:
        raise ValueError(
            f"model: apply_liger_kernel_to_{family.model_type} patches {family.title} models (model_type "
            f"{family.model_type!r}), got {type(unwrap_peft(model)).__name__} with model_type {model_type!r}; "
            "nothing was patched (liger_align.models.apply_liger_kernel picks the right patch by model type)"
        )


def apply_liger_kernel_to_qwen2_vl(
    model: nn.Module | None = None,
    *,
    rope: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    layer_norm: bool = True,
    fused_linear_cross_entropy: bool = True,
) -> VisionLanguagePatchHandle:
    """Run Qwen2-VL's kernels through liger-align (see the module docstring for what each flag patches).

    Args:
        model: ``None`` patches the classes; a ``Qwen2VLForConditionalGeneration`` (or ``Qwen2VLModel``, or a
            PEFT model wrapping one) patches that instance's modules only.
        rope: text M-RoPE and vision RoPE through :func:`liger_align.kernels.layers.rope` (module-wide).
        rms_norm: the decoder's ``Qwen2VLRMSNorm``\\ s.
        swiglu: the decoder's ``Qwen2MLP`` (SiLU models).
        layer_norm: the vision tower's LayerNorms through :func:`liger_align.kernels.layers.layer_norm`.
        fused_linear_cross_entropy: ``Qwen2VLForConditionalGeneration.forward`` computes the training loss
            and ``logprob_targets`` log-probs without materialising logits (:func:`vision_language_forward`).

    Returns:
        A :class:`VisionLanguagePatchHandle`: ``states`` per flag, ``patched`` labels, ``revert()``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``. ValueError: ``model`` is not a Qwen2-VL model (nothing
        is patched).
    """
    _check_instance(QWEN2_VL, model)
    return patch_vision_language(QWEN2_VL, model=model, rope=rope, rms_norm=rms_norm, swiglu=swiglu,
                                 layer_norm=layer_norm, fused_linear_cross_entropy=fused_linear_cross_entropy)


def apply_liger_kernel_to_qwen2_5_vl(
    model: nn.Module | None = None,
    *,
    rope: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    layer_norm: bool = True,
    fused_linear_cross_entropy: bool = True,
) -> VisionLanguagePatchHandle:
    """Like :func:`apply_liger_kernel_to_qwen2_vl`, for ``Qwen2_5_VLForConditionalGeneration``.

    RMSNorm covers the text and the vision tower (``Qwen2_5_VLRMSNorm``), SwiGLU the decoder's ``Qwen2MLP``
    and the vision ``Qwen2_5_VLMLP``; ``layer_norm`` has nothing to patch (``states["layer_norm"]`` says so).
    """
    _check_instance(QWEN2_5_VL, model)
    return patch_vision_language(QWEN2_5_VL, model=model, rope=rope, rms_norm=rms_norm, swiglu=swiglu,
                                 layer_norm=layer_norm, fused_linear_cross_entropy=fused_linear_cross_entropy)

