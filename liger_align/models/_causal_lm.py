"""The patched ``<Family>ForCausalLM.forward``: loss and per-token log-probs without the logits.

Training with ``labels`` (``model.train()``): the loss is Hugging Face's ``ForCausalLMLoss`` (labels
shifted left by one and padded with ``-100``, or ``shift_labels`` as given; mean over valid tokens,
or ``sum / num_items_in_batch`` when the trainer passes ``num_items_in_batch``), computed by
:func:`~liger_align.kernels.head.fused_linear_cross_entropy` straight from the last hidden states, and
``logits`` is ``None``.

``logprob_targets (B, T)``: the output's ``logps (B, T)`` fp32 holds ``log softmax(logits)[b, t,
target[b, t]]`` (no shift: position ``t``'s own distribution), 0 where ``target == -100``, from
:func:`~liger_align.kernels.head.linear_logprobs`; ``logits`` is ``None`` (train or eval).

Otherwise (eval, or no labels) the forward returns the logits exactly as before.

The fused ops run through :func:`~liger_align.models.head_call.call_through_head`, i.e. as the head
module's own forward, so FSDP1/FSDP2 and DeepSpeed ZeRO-3 gather the sharded head weight for the
forward and the backward, and accelerate's hooks still run. Only a PEFT adapter (e.g. LoRA) on the
head cannot be fused: the logits are then built through the adapted head (correct, without the memory
saving) and a one-time warning says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .._checks import TargetOutOfRangeError
from .._tokens import IGNORE_INDEX, next_token_targets
from ..kernels import fused_linear_cross_entropy, linear_logprobs
from .head_call import call_through_head, is_tuner_layer, logit_options, output_head, text_config

try:
    from transformers.utils import can_return_tuple
except ImportError:  # pragma: no cover - older transformers
    def can_return_tuple(fn):
        return fn

@dataclass
class LigerCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``logps (B, T)`` fp32, the log-probs of ``logprob_targets``."""

    logps: torch.FloatTensor | None = None


def _keep(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Hugging Face's slicing of ``(B, T, H)`` hidden states before the head (``0`` keeps all)."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return hidden[:, logits_to_keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


_WARNED_ADAPTED_HEAD: set[str] = set()


def _warn_adapted_head(model: nn.Module) -> None:
    name = type(model).__name__
    if name not in _WARNED_ADAPTED_HEAD:
        _WARNED_ADAPTED_HEAD.add(name)
        warnings.warn(
            f"liger_align: {name}.lm_head carries a PEFT adapter (e.g. LoRA), which a fused loss would skip; "
            "the loss is computed from materialised logits instead (correct, but without the memory saving). "
            "Train the head with modules_to_save=['lm_head'] or leave it out of target_modules to keep the saving.",
            stacklevel=3,
        )


def _check_targets(name: str, target: torch.Tensor, hidden: torch.Tensor) -> None:
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (B, T), got "
                        f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"{name} must have shape (B, T) = {tuple(hidden.shape[:-1])} (after logits_to_keep), "
                         f"got {tuple(target.shape)}")


def _logps_from_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    valid = target != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * valid


def head_outputs(
    self: nn.Module,
    hidden: torch.Tensor,
    *,
    labels: torch.LongTensor | None,
    shift_labels: torch.LongTensor | None,
    logprob_targets: torch.LongTensor | None,
    num_items_in_batch: torch.Tensor | int | None,
    fuse: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(loss, logits, logps)`` of ``self``'s output head on the last hidden states ``hidden (B, T, H)``.

    The part of the patched forward after the backbone, shared by every causal LM and vision-language
    model patch: the fused loss in training, the fused ``logprob_targets`` log-probs, or the logits
    (see the module docstring). The vocabulary comes from the text config. ``fuse=True`` takes the fused
    loss outside training too (the probe of :mod:`._any_causal_lm`).
    """
    target = None
    if shift_labels is not None:
        target = shift_labels
    elif labels is not None:
        target = next_token_targets(labels)
    fuse_loss = target is not None and (self.training or fuse or logprob_targets is not None)
    if target is not None:
        _check_targets("labels", target, hidden)
    if logprob_targets is not None:
        _check_targets("logprob_targets", logprob_targets, hidden)

    head = self.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(self).__name__} has no output head (get_output_embeddings() is None)")
    opts = logit_options(self)
    want_logits = not fuse_loss and logprob_targets is None
    logits = loss = logps = None
    if want_logits or is_tuner_layer(head):
        if not want_logits:
            _warn_adapted_head(self)
        logits = head(hidden)
        if opts["logit_scale"] != 1.0:
            logits = logits * opts["logit_scale"]
        if opts["softcap"] is not None:
            logits = opts["softcap"] * torch.tanh(logits / opts["softcap"])
        if target is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=text_config(self).vocab_size,
                num_items_in_batch=num_items_in_batch, shift_labels=shift_labels,
            )
        if logprob_targets is not None:
            logps = _logps_from_logits(logits, logprob_targets)
        if not want_logits:
            logits = None
    else:
        def fused(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
            flat_hidden = h.reshape(-1, h.shape[-1])
            fused_loss = fused_logps = None
            if fuse_loss:
                fused_loss = fused_linear_cross_entropy(
                    flat_hidden, weight, target.reshape(-1).to(weight.device), bias, ignore_index=IGNORE_INDEX,
                    reduction="mean", num_items_in_batch=num_items_in_batch, **opts,
                )
            if logprob_targets is not None:
                fused_logps = linear_logprobs(
                    flat_hidden, weight, logprob_targets.reshape(-1).to(weight.device), bias,
                    ignore_index=IGNORE_INDEX, **opts,
                ).logps.view(logprob_targets.shape)
            return fused_loss, fused_logps

        try:
            loss, logps = call_through_head(output_head(self), hidden, fused)
        except TargetOutOfRangeError as err:  # name the caller's argument, not the kernel's
            raise err.renamed("labels" if fuse_loss else "logprob_targets") from None
    return loss, logits, logps


def pop_loss_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the loss arguments a trainer passes (``num_items_in_batch``, ``shift_labels``) out of ``kwargs``."""
    return {name: kwargs.pop(name, None) for name in ("num_items_in_batch", "shift_labels")}


def fused_output(
    self: nn.Module, outputs: Any, out_cls: type, *, logits_to_keep: int | torch.Tensor,
    labels: torch.Tensor | None, logprob_targets: torch.Tensor | None, shift_labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None, fuse: bool = False,
) -> Any:
    """``out_cls`` (a ``ModelOutput`` with ``loss``, ``logits``, ``logps``) from the backbone's ``outputs``:
    :func:`head_outputs` on its last hidden states (after ``logits_to_keep``), every other field passed through."""
    hidden = _keep(outputs.last_hidden_state, logits_to_keep)
    loss, logits, logps = head_outputs(
        self, hidden, labels=labels, shift_labels=shift_labels, logprob_targets=logprob_targets,
        num_items_in_batch=num_items_in_batch, fuse=fuse,
    )
    passthrough = {
        f.name: getattr(outputs, f.name, None) for f in fields(out_cls) if f.name not in ("loss", "logits", "logps")
    }
    return out_cls(loss=loss, logits=logits, logps=logps, **passthrough)


@can_return_tuple
def causal_lm_forward(
    self: nn.Module,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    logprob_targets: torch.LongTensor | None = None,
    **kwargs,
) -> LigerCausalLMOutputWithPast:
    """Hugging Face's causal-LM forward with a fused loss and fused per-token log-probs.

    Args (beyond Hugging Face's, whose cache argument and attention kwargs pass through ``kwargs``):
        labels: ``(B, T)`` token ids, ``-100`` where no loss (shifted here, as Hugging Face does).
        logprob_targets: ``(B, T)`` token ids, ``-100`` where masked, aligned with the positions (not shifted).
        kwargs: ``num_items_in_batch`` and ``shift_labels`` are loss arguments; the rest go to the backbone.

    Returns:
        :class:`LigerCausalLMOutputWithPast`: ``loss`` (0-d fp32) when labels are given, ``logits``
        ``(B, T, V)`` or ``None`` (see the module docstring), ``logps (B, T)`` fp32 or ``None``.
    """
    loss_kwargs = pop_loss_kwargs(kwargs)
    outputs = self.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
    )
    return fused_output(self, outputs, LigerCausalLMOutputWithPast, logits_to_keep=logits_to_keep, labels=labels,
                        logprob_targets=logprob_targets, **loss_kwargs)


causal_lm_forward._liger_align = True  # type: ignore[attr-defined]
