"""Medusa heads on a causal LM: the modules, attaching them, and the forward that trains them (see :mod:`.medusa`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .._tokens import IGNORE_INDEX
from ..losses.medusa import HeadFn, HeadRunner, fused_linear_medusa_loss
from .fused_forward import install_handler
from .head_call import (
    backbone,
    backbone_hidden,
    backbone_kwargs,
    call_through_head,
    causal_lm,
    logit_options,
    output_head,
)


class ResBlock(nn.Module):
    """``x + SiLU(linear(x))`` with ``linear = Linear(H, H)`` started at zero (the block starts as the identity)."""

    def __init__(self, hidden_size: int, *, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHead(nn.Sequential):
    """One Medusa head: ``num_layers`` :class:`ResBlock` s (children ``"0"``..) then ``Linear(H, V, bias=False)``.

    ``head(x)`` returns the logits ``(..., V)``; ``head(rows, fn)`` runs the ResBlocks on ``rows (M, H)`` and
    returns ``fn(out, weight, bias)`` computed as the projection's own forward (its weight gathered there).
    """

    def __init__(self, hidden_size: int, vocab_size: int, num_layers: int, *, dtype=None, device=None) -> None:
        blocks = [ResBlock(hidden_size, dtype=dtype, device=device) for _ in range(num_layers)]
        super().__init__(*blocks, nn.Linear(hidden_size, vocab_size, bias=False, dtype=dtype, device=device))
        self.num_layers = num_layers

    @property
    def proj(self) -> nn.Linear:
        """The output projection ``Linear(H, V, bias=False)``."""
        return self[self.num_layers]

    def forward(self, x: torch.Tensor, fn: HeadFn | None = None) -> Any:
        for index in range(self.num_layers):
            x = self[index](x)
        if fn is None:
            return self.proj(x)
        return call_through_head(self.proj, x, fn)


class MedusaHeads(nn.ModuleList):
    """K :class:`MedusaHead` s; ``heads(hidden)`` stacks their logits ``(K, ..., V)`` (Medusa's inference output)."""

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int = 1, *,
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        for name, value, low in (("num_heads", num_heads, 1), ("num_layers", num_layers, 0),
                                 ("hidden_size", hidden_size, 1), ("vocab_size", vocab_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        super().__init__(
            MedusaHead(hidden_size, vocab_size, num_layers, dtype=dtype, device=device) for _ in range(num_heads)
        )
        self.num_heads, self.num_layers = num_heads, num_layers
        self.hidden_size, self.vocab_size = hidden_size, vocab_size

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        """Copy the model head's weight ``(V, H)`` into every head's projection."""
        if tuple(weight.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"weight must have shape (V, H) = {(self.vocab_size, self.hidden_size)}, got "
                             f"{tuple(weight.shape)}")
        for head in self:
            head.proj.weight.copy_(weight.detach())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(hidden) for head in self])


@dataclass
class MedusaCausalLMOutput(ModelOutput):
    """The Medusa forward's output (see :class:`~liger_align.losses.medusa.MedusaLossOutput`): ``loss`` 0-d,
    then detached ``(K+1,)`` tensors, index 0 = the model's head."""

    loss: torch.Tensor | None = None
    head_losses: torch.Tensor | None = None
    head_top1: torch.Tensor | None = None
    head_correct: torch.Tensor | None = None
    head_counts: torch.Tensor | None = None
    computed: torch.Tensor | None = None


@contextlib.contextmanager
def _full_weight(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """The full ``weight``: gathered for a ZeRO-3 parameter, ``full_tensor()`` for a DTensor."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            yield weight
    elif type(weight).__name__ == "DTensor":
        yield weight.full_tensor()
    else:
        yield weight


def medusa_heads(model: nn.Module) -> MedusaHeads:
    """The :class:`MedusaHeads` of ``model`` (wrappers and PEFT unwrapped); ``ValueError`` when it has none."""
    heads = getattr(causal_lm(model), "medusa_head", None)
    if not isinstance(heads, MedusaHeads):
        raise ValueError(f"model: {type(causal_lm(model)).__name__} has no Medusa heads; call add_medusa_heads first")
    return heads


def add_medusa_heads(model: nn.Module, num_heads: int, num_layers: int = 1) -> MedusaHeads:
    """Attach K = ``num_heads`` Medusa heads of ``num_layers`` ResBlocks to a causal LM and install the Medusa forward.

    ``model``: a transformers causal LM (DDP/FSDP/DeepSpeed/``torch.compile`` wrappers and PEFT unwrapped)
    with an output head. The heads take its head's dtype and device and copy its weight; they are
    registered as ``model.medusa_head`` and ``config.medusa_num_heads`` / ``medusa_num_layers`` are set.
    Calling it again with the same sizes returns the existing heads. Raises ``ValueError`` for
    ``num_heads < 1``, ``num_layers < 0``, a model without an output head, or other sizes than attached.
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 0:
        raise ValueError(f"num_layers must be an int >= 0, got {num_layers!r}")
    lm = causal_lm(model)
    head = output_head(lm)  # ValueError for a model without an output head
    backbone(lm)
    existing = getattr(lm, "medusa_head", None)
    if isinstance(existing, MedusaHeads):
        if (existing.num_heads, existing.num_layers) != (num_heads, num_layers):
            raise ValueError(
                f"model already has {existing.num_heads} Medusa heads of {existing.num_layers} layers; "
                f"got num_heads={num_heads}, num_layers={num_layers}"
            )
        return existing
    weight = head.weight
    shape = getattr(weight, "ds_shape", None) or weight.shape
    vocab, hidden_size = int(shape[0]), int(shape[1])
    heads = MedusaHeads(hidden_size, vocab, num_heads, num_layers, dtype=weight.dtype, device=weight.device)
    if weight.device.type != "meta":
        with _full_weight(weight) as full:
            heads.init_from(full.to(heads[0].proj.weight.device))
    lm.medusa_head = heads
    config = getattr(lm, "config", None)
    if config is not None:
        config.medusa_num_heads, config.medusa_num_layers = num_heads, num_layers
    _install_forward(lm)
    return heads


def medusa_head_runners(model: nn.Module) -> list[HeadRunner]:
    """The ``K + 1`` :data:`~liger_align.losses.medusa.HeadRunner` s of ``model``: its own head, then heads 1..K."""
    lm = causal_lm(model)
    model_head = output_head(lm)

    def run_model_head(rows: torch.Tensor, fn: HeadFn) -> Any:
        return call_through_head(model_head, rows, fn)

    return [run_model_head, *(functools.partial(_run_head, head) for head in medusa_heads(lm))]


def _run_head(head: MedusaHead, rows: torch.Tensor, fn: HeadFn) -> Any:
    return head(rows, fn)


_MEDUSA_KEYWORDS = ("medusa_labels", "medusa_weights", "medusa_num_items", "medusa_freeze_backbone",
                    "medusa_ignore_index", "medusa_chunk_bytes", "medusa_strategy", "medusa_materialize_logits")


def _wants_medusa(lm: nn.Module, kwargs: dict[str, Any]) -> bool:
    return kwargs.get("medusa_labels") is not None


def _run_medusa(lm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> MedusaCausalLMOutput:
    """With ``medusa_labels (B, T)`` (unshifted): the backbone, then Medusa's weighted loss over the model's
    head and every Medusa head (``medusa_weights``: ``K + 1`` values, default all 1; ``medusa_num_items``:
    scalar or ``(K+1,)`` denominators; ``medusa_materialize_logits``: Medusa's own logits path, for
    comparison)."""
    options = {k: kwargs.pop(k) for k in _MEDUSA_KEYWORDS if k in kwargs}
    labels = options["medusa_labels"]
    with torch.no_grad() if options.get("medusa_freeze_backbone", False) else contextlib.nullcontext():
        hidden, _ = backbone_hidden(lm, args, backbone_kwargs(kwargs))
    runners = medusa_head_runners(lm)
    weights = options.get("medusa_weights")
    weights = [1.0] * len(runners) if weights is None else list(weights)
    result = fused_linear_medusa_loss(
        hidden, labels.to(hidden.device), runners, weights,
        ignore_index=options.get("medusa_ignore_index", IGNORE_INDEX), num_items_in_batch=options.get(
            "medusa_num_items"), chunk_bytes=options.get("medusa_chunk_bytes"),
        strategy=options.get("medusa_strategy", "auto"),
        materialize_logits=options.get("medusa_materialize_logits", False), **logit_options(lm),
    )
    return MedusaCausalLMOutput(**result._asdict())


def _install_forward(lm: nn.Module) -> None:
    """Add the Medusa handler to ``lm``'s fused forward (idempotent); without ``medusa_labels`` the model's own
    forward runs."""
    install_handler(lm, "medusa", _wants_medusa, _run_medusa)
