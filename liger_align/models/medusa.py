"""Medusa heads on any causal LM, trained through the fused multi-head loss (see docs/ARCHITECTURE.md).

Medusa (Cai et al., 2024) adds K decoding heads on the last hidden state ``h (..., H)``; head k predicts
the token at ``t+k+1``. Head k is ``num_layers`` ResBlocks ``x <- x + SiLU(W_k,l x + b_k,l)`` then a
``Linear(H, V, bias=False)`` initialised from the model's own head. The ResBlock linears start at zero
(Medusa zeroes their weight; the bias is zeroed here too, so a new head is exactly the model's head).

- One ``nn.Module`` per head (:class:`MedusaHead`), held by :class:`MedusaHeads` at ``model.medusa_head``:
  FSDP/ZeRO-3 can shard and gather one head at a time. Their ``state_dict`` is Medusa's key layout,
  ``{k}.{l}.linear.weight``, ``{k}.{l}.linear.bias`` (l < num_layers) and ``{k}.{num_layers}.weight``
  (k counted from 0 for the first extra head), the layout of Medusa's ``medusa_lm_head.pt`` /
  ``medusa_lm_head.safetensors`` that Medusa's, TGI's and TensorRT-LLM's loaders read.
- :func:`add_medusa_heads` attaches the heads and gives the model a forward that, called with
  ``medusa_labels=labels``, runs the backbone (under ``no_grad`` with ``medusa_freeze_backbone=True``:
  Medusa-1) and returns :class:`MedusaCausalLMOutput` from
  :func:`~liger_align.losses.medusa.fused_linear_medusa_loss`; without it the model's own forward runs.
  The loss runs inside the model's call (FSDP/ZeRO-3 gather the model's head there) and each head's
  product inside its own projection's call (:func:`~liger_align.models.head_call.call_through_head`).
- :func:`save_medusa_heads` / :func:`load_medusa_heads`: the heads alone, as safetensors, gathered
  from FSDP1/FSDP2/ZeRO-3 shards (a collective: call it on every rank), plus Medusa's ``config.json``
  fields (``medusa_num_heads``, ``medusa_num_layers``, ``base_model_name_or_path``).
"""

from ._medusa_heads import (
    MedusaCausalLMOutput,
    MedusaHead,
    MedusaHeads,
    ResBlock,
    add_medusa_heads,
    medusa_head_runners,
    medusa_heads,
)
from ._medusa_io import (
    MEDUSA_CONFIG_FILE,
    MEDUSA_HEADS_FILE,
    load_medusa_heads,
    medusa_heads_state_dict,
    read_medusa_heads,
    save_medusa_heads,
)

__all__ = [
    "MEDUSA_CONFIG_FILE", "MEDUSA_HEADS_FILE", "MedusaCausalLMOutput", "MedusaHead", "MedusaHeads", "ResBlock",
    "add_medusa_heads", "load_medusa_heads", "medusa_head_runners", "medusa_heads", "medusa_heads_state_dict",
    "read_medusa_heads", "save_medusa_heads",
]
