"""The fused forward of the vision-language models (Qwen2-VL, Qwen2.5-VL) and the checks of its vision inputs.

:func:`vision_language_forward` replaces ``<Prefix>ForConditionalGeneration.forward`` (see
:mod:`.qwen2_vl`): the backbone (both towers) as Hugging Face runs it, then the fused loss or log-probs
of :func:`~._causal_lm.fused_output` on the last hidden states, in the original forward's output class
plus ``logps``. Images and videos are checked against their grids and placeholders before the vision
tower runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from dataclasses import field

import torch
from torch import nn

from ._causal_lm import can_return_tuple, fused_output, pop_loss_kwargs

# ------------------------------------------------------------------------------------------------ inputs


def _check_vision_inputs(lm: nn.Module, input_ids: torch.Tensor | None, pixels: torch.Tensor | None,
                         grid: torch.Tensor | None, kind: str) -> None:
    """Raise ``ValueError`` unless ``pixels``, ``grid`` and ``input_ids``' placeholders describe the same images."""
    pixels_name = "pixel_values" if kind == "image" else "pixel_values_videos"
    grid_name = f"{kind}_grid_thw"
    if pixels is None and grid is None:
        return
    if pixels is None or grid is None:
        given, missing = (pixels_name, grid_name) if grid is None else (grid_name, pixels_name)
        raise ValueError(f"{given} was given without {missing}: the vision tower needs both")
    if not isinstance(grid, torch.Tensor) or grid.dim() != 2 or grid.shape[-1] != 3 or grid.is_floating_point():
        raise ValueError(f"{grid_name} must be an integer tensor (num_{kind}s, 3) of (t, h, w) patch counts, got "
                         f"{tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__}")
    vision = lm.config.vision_config
    patch_values = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    if pixels.dim() != 2 or pixels.shape[-1] != patch_values:
        raise ValueError(f"{pixels_name} must have shape (patches, channels * temporal_patch_size * patch_size^2 = "
                         f"{patch_values}), got {tuple(pixels.shape)}")
    merge = vision.spatial_merge_size
    grid_cpu = grid.detach().cpu()
    patches = int(grid_cpu.prod(-1).sum())
    if pixels.shape[0] != patches:
        raise ValueError(f"{pixels_name} has {pixels.shape[0]} patch rows but {grid_name} {grid_cpu.tolist()} "
                         f"describes sum(t * h * w) = {patches}: the grid is inconsistent with the pixels")
    if bool((grid_cpu[:, 1:] % merge != 0).any()):
        raise ValueError(f"{grid_name} {grid_cpu.tolist()}: h and w must be multiples of spatial_merge_size={merge}")
    if input_ids is not None:
        token_id = getattr(lm.config, f"{kind}_token_id")
        placeholders = int((input_ids == token_id).sum())
        needed = patches // merge**2
        if placeholders != needed:
            raise ValueError(
                f"input_ids holds {placeholders} {kind} placeholder tokens (id {token_id}) but {grid_name} describes "
                f"{grid_cpu.shape[0]} {kind}(s) needing sum(t * h * w) / {merge}^2 = {needed}: expand each {kind}'s "
                f"placeholder to t * h * w / {merge}^2 tokens and give one {grid_name} row per {kind} in the batch"
            )


# ------------------------------------------------------------------------------------------------ forward


@functools.cache
def _with_logps(base: type) -> type:
    """``base`` (a ``ModelOutput`` dataclass) plus ``logps (B, T)`` fp32, the log-probs of ``logprob_targets``."""
    return dataclasses.make_dataclass(
        f"Liger{base.__name__}", [("logps", "torch.FloatTensor | None", field(default=None))], bases=(base,),
        namespace={"__module__": __name__, "__doc__": f"``{base.__name__}`` plus ``logps (B, T)`` fp32."},
    )


def _output_class(lm: nn.Module) -> type:
    """The output dataclass of ``lm``'s original forward, with ``logps`` added.

    transformers >= 5.20 returns ``MultimodalCausalLMOutputWithPast``; earlier 5.x releases a per-family
    ``<Prefix>CausalLMOutputWithPast`` (with ``rope_deltas``).
    """
    for klass in type(lm).__mro__:
        if klass.__module__.startswith("transformers.models.") and klass.__name__.endswith("ForConditionalGeneration"):
            own = getattr(importlib.import_module(klass.__module__),
                          klass.__name__.replace("ForConditionalGeneration", "CausalLMOutputWithPast"), None)
            if own is not None:
                return _with_logps(own)
            break
    from transformers import modeling_outputs

    base = getattr(modeling_outputs, "MultimodalCausalLMOutputWithPast", modeling_outputs.CausalLMOutputWithPast)
    return _with_logps(base)


def _accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(type(module).forward).parameters


@can_return_tuple
def vision_language_forward(
    self: nn.Module,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    image_grid_thw: torch.LongTensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    mm_token_type_ids: torch.IntTensor | None = None,
    rope_deltas: torch.LongTensor | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    logprob_targets: torch.LongTensor | None = None,
    **kwargs,
):
    """``Qwen2VLForConditionalGeneration.forward`` (and Qwen2.5-VL's) with a fused loss and fused log-probs.

    Args (beyond Hugging Face's; the cache argument, ``second_per_grid_ts`` and attention kwargs pass
    through ``kwargs`` to ``self.model``):
        input_ids: ``(B, T)``, each image's placeholder expanded to ``t * h * w / merge^2`` image tokens.
        pixel_values: ``(patches, C * temporal_patch * patch^2)`` for all images of the batch, in order;
            ``image_grid_thw (num_images, 3)`` their patch grids. Videos likewise. Checked against each
            other and against ``input_ids``' placeholders before the vision tower runs.
        mm_token_type_ids: ``(B, T)`` 0 text / 1 image / 2 video (transformers 5.x builds M-RoPE positions from it).
        rope_deltas: passed on where the backbone's forward takes it (transformers 5.x keeps it on
            ``model.model.rope_deltas`` instead, and ignores it here).
        labels: ``(B, T)``, ``-100`` where no loss (shifted here); ``logprob_targets (B, T)``: not shifted.
        kwargs: ``num_items_in_batch`` and ``shift_labels`` are loss arguments.

    Returns:
        The original forward's output class plus ``logps``: ``loss`` (0-d fp32) with labels, ``logits``
        ``(B, T, V)`` or ``None`` (training with labels, or ``logprob_targets``), ``logps (B, T)`` fp32 or ``None``.
        ``V`` and ``H`` come from ``config.text_config``.
    """
    loss_kwargs = pop_loss_kwargs(kwargs)
    _check_vision_inputs(self, input_ids, pixel_values, image_grid_thw, "image")
    _check_vision_inputs(self, input_ids, pixel_values_videos, video_grid_thw, "video")
    vision = {
        "pixel_values": pixel_values, "pixel_values_videos": pixel_values_videos, "image_grid_thw": image_grid_thw,
        "video_grid_thw": video_grid_thw, "mm_token_type_ids": mm_token_type_ids,
    }
    body = {k: v for k, v in vision.items() if v is not None}
    if rope_deltas is not None and _accepts(self.model, "rope_deltas"):
        body["rope_deltas"] = rope_deltas
    outputs = self.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
        use_cache=use_cache, **body, **kwargs,
    )
    return fused_output(self, outputs, _output_class(self), logits_to_keep=logits_to_keep, labels=labels,
                        logprob_targets=logprob_targets, **loss_kwargs)


vision_language_forward._liger_align = True  # type: ignore[attr-defined]
