"""Token conventions every layer shares: the ignore index and the next-token shift (one definition each).

Hugging Face (and TRL) mark positions without a loss with ``-100``; a causal LM's position ``t`` predicts
the token at ``t + 1``. Any layer may import this module (it imports nothing of liger_align).
"""

from __future__ import annotations

import torch

#: Label / target value of a position that gets no loss (Hugging Face's and TRL's convention).
IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(..., T) -> (..., T)``: ``out[..., t] = labels[..., t + 1]``, the last position ``ignore_index``.

    The targets of a causal LM's positions, aligned with them (Hugging Face's label shift, kept at length
    ``T`` so the hidden states need no slicing).
    """
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
