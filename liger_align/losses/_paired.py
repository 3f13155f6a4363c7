"""What the preference losses share: option handling, the chosen/rejected split, the reference, metrics.

Nothing here multiplies by the lm_head itself: every log-prob comes from
:func:`~liger_align.losses._sequences.sequence_stats`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypedDict

import torch
from typing_extensions import Unpack

from .._checks import check_choice
from ..kernels import STRATEGIES, check_linear_inputs
from ..kernels.head.linear_logprobs import LogitOptions
from ._sequences import SequenceStats, sequence_stats

REF_NAMES = ("ref_hidden", "ref_weight", "target", "ref_bias")


class LogitKwargs(TypedDict, total=False):
    """The logit keywords every loss takes (flat, keyword-only), packed once into a :class:`LogitOptions`.

    ``ignore_index`` (-100): targets dropped before any product. ``temperature`` (1.0), ``softcap``
    (None), ``logit_scale`` (1.0): ``z = softcap * tanh(logit_scale * raw / softcap) / temperature``.
    ``chunk_bytes`` (512 MiB): budget of one logits buffer. ``impl`` (None): ``"triton"``/``"torch"``
    forces a path. ``strategy`` (``"auto"``): ``"grad_in_forward"`` (3 products) or ``"recompute"``
    (4 products), see :func:`liger_align.kernels.head.sequence_objective.sequence_strategy`.
    """

    ignore_index: int
    temperature: float
    softcap: float | None
    logit_scale: float
    chunk_bytes: int | None
    impl: str | None
    strategy: str


_LOGIT_KEYS = tuple(LogitKwargs.__annotations__)


def logit_options(**kwargs: Unpack[LogitKwargs]) -> tuple[LogitOptions, str]:
    """``(LogitOptions, strategy)`` of a loss's keyword arguments (validated here, before any kernel).

    An unknown keyword raises ``TypeError`` naming it and the accepted ones.
    """
    unknown = sorted(set(kwargs) - set(_LOGIT_KEYS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the logit options are {list(_LOGIT_KEYS)}")
    strategy = check_choice("strategy", kwargs.pop("strategy", "auto"), STRATEGIES)
    return LogitOptions(**kwargs), strategy


def options_kwargs(opts: LogitOptions, strategy: str) -> dict[str, Any]:
    """The keyword arguments that rebuild ``(opts, strategy)`` through :func:`logit_options`."""
    return {**{key: getattr(opts, key) for key in _LOGIT_KEYS if key != "strategy"}, "strategy": strategy}


def check_vector(name: str, value: torch.Tensor, length: int) -> torch.Tensor:
    """``value`` as a ``(length,)`` fp32 tensor without gradient; ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({length},), got {type(value).__name__}")
    if value.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(value.shape)}")
    return value.detach().float()


class Halves(NamedTuple):
    """Statistics of the B chosen rows and of the B rejected rows of a paired batch, each ``(B,)``."""

    chosen: SequenceStats
    rejected: SequenceStats


def split_pairs(stats: SequenceStats) -> Halves:
    """Split ``(2B,)`` statistics into the chosen (first B rows) and rejected (last B rows) halves."""
    half = stats.sum_logps.shape[0] // 2
    first = SequenceStats(*(t[:half] for t in stats))
    second = SequenceStats(*(t[half:] for t in stats))
    return Halves(first, second)


def sequence_logps(stats: SequenceStats, average: bool) -> torch.Tensor:
    """Per-sequence log-probs ``(R,)``: the sum over each row's valid tokens, or with ``average`` their mean.

    The one place the preference losses form them from :class:`SequenceStats` (their ``average_log_prob``).
    An all-masked row gives 0 either way, with zero gradient.
    """
    return stats.mean_logps() if average else stats.sum_logps


def logits_mean(stats: SequenceStats) -> torch.Tensor:
    """Mean logit over every valid token of the rows in ``stats`` (0-d, detached); 0 when there is none.

    By design this averages over valid (non-ignored) tokens only; Liger-Kernel's ``*_logits_mean``
    averages over every position, prompt and padding included.
    """
    return (stats.logit_sum.sum() / stats.n_tokens.sum().clamp(min=1)).detach()


def token_mean_nll(stats: SequenceStats) -> torch.Tensor:
    """Cross-entropy averaged over all valid tokens of the rows in ``stats`` (0-d); 0 when there is none."""
    return -stats.sum_logps.sum() / stats.n_tokens.sum().clamp(min=1)


def reference_logps(
    target: torch.Tensor,
    opts: LogitOptions,
    *,
    ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    policy_weight: torch.Tensor,
    policy_bias: torch.Tensor | None,
    names: tuple[str, str, str, str] = REF_NAMES,
) -> SequenceStats | None:
    """Reference statistics of ``ref_hidden (R, T, H_ref)`` without gradient, or None without ``ref_hidden``.

    ``ref_weight (V, H_ref)`` and ``ref_bias (V,)`` default to the policy's head (a shared, frozen head,
    e.g. under PEFT) when ``ref_weight`` is None. ``names``: the caller's names of
    ``(ref_hidden, ref_weight, target, ref_bias)``, used in the messages.
    """
    h_name, w_name, t_name, b_name = names
    if ref_hidden is None:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError(f"{w_name}/{b_name} were given without {h_name}: pass {h_name} (R, T, H) too")
        return None
    if not isinstance(ref_hidden, torch.Tensor):
        raise TypeError(f"{h_name} must be a torch.Tensor of shape (R, T, H), got {type(ref_hidden).__name__}")
    if ref_hidden.dim() != 3 or ref_hidden.shape[:2] != target.shape:
        raise ValueError(
            f"{h_name} must have shape (R, T, H) with (R, T) = {tuple(target.shape)} like {t_name}, "
            f"got {tuple(ref_hidden.shape)}"
        )
    if ref_weight is None:
        if ref_bias is not None:
            raise ValueError(f"{b_name} was given without {w_name}: pass the reference head's {w_name} (V, H) too")
        ref_weight, ref_bias = policy_weight, policy_bias
        names = (h_name, "lin_weight", t_name, "bias")  # the policy's head: name it as the caller did
    elif not isinstance(ref_weight, torch.Tensor) or ref_weight.dim() != 2:
        raise ValueError(
            f"{w_name} must be a tensor of shape (V, H), got {tuple(getattr(ref_weight, 'shape', ()))}"
        )
    elif ref_weight.shape[0] != policy_weight.shape[0]:
        raise ValueError(
            f"{w_name} must have the policy's vocabulary: (V, H) with V={policy_weight.shape[0]} rows like "
            f"lin_weight, got {tuple(ref_weight.shape)}"
        )
    if ref_weight.shape[1] != ref_hidden.shape[2]:
        raise ValueError(
            f"{w_name} must have shape (V, H) with H={ref_hidden.shape[2]} like {h_name}, "
            f"got {tuple(ref_weight.shape)}"
        )
    flat = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    check_linear_inputs(flat, ref_weight, target.reshape(-1), ref_bias, names=names)
    with torch.no_grad():
        stats = sequence_stats(
            ref_hidden.detach(), ref_weight.detach(), target, None if ref_bias is None else ref_bias.detach(), opts,
        )
    return SequenceStats(*(t.detach() for t in stats))
