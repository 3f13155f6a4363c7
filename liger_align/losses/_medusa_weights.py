"""Medusa-2's weighting of the heads: ``lambda_k = heads_coefficient * decay_coefficient**k * schedule(progress)``.

The schedules of ``progress = step / max_steps`` (see :mod:`.medusa`): ``"constant"`` 1, ``"linear"``
``progress``, ``"sine"`` ``sin(progress * pi / 2)``, ``"sine_<r>"`` ``sin(progress / r * pi / 2)`` until
``progress = r``, then 1. Plain Python numbers: the weights are settings, not tensors.
"""

from __future__ import annotations

import math

SCHEDULERS = ("constant", "linear", "sine")


def check_scheduler(scheduler: str) -> None:
    """Raise ``ValueError`` unless ``scheduler`` is ``constant``, ``linear``, ``sine`` or ``sine_<r>`` (0 < r <= 1)."""
    if isinstance(scheduler, str) and scheduler in SCHEDULERS:
        return
    if isinstance(scheduler, str) and scheduler.startswith("sine_"):
        try:
            ratio = float(scheduler[len("sine_"):])
        except ValueError:
            ratio = math.nan
        if 0.0 < ratio <= 1.0:
            return
    raise ValueError(
        f"medusa_scheduler must be one of {list(SCHEDULERS)} or 'sine_<r>' with 0 < r <= 1, got {scheduler!r}"
    )


def medusa_schedule(scheduler: str, progress: float) -> float:
    """Medusa-2's coefficient of the extra heads at ``progress = step / max_steps`` in ``[0, 1]``."""
    check_scheduler(scheduler)
    if not (isinstance(progress, (int, float)) and 0.0 <= progress <= 1.0):
        raise ValueError(f"progress must be a number in [0, 1] (step / max_steps), got {progress!r}")
    if scheduler == "constant":
        return 1.0
    if scheduler == "linear":
        return float(progress)
    if scheduler == "sine":
        return math.sin(progress * math.pi / 2)
    ratio = float(scheduler[len("sine_"):])
    return math.sin(progress / ratio * math.pi / 2) if progress < ratio else 1.0


def medusa_loss_weights(
    num_heads: int,
    *,
    heads_coefficient: float = 1.0,
    decay_coefficient: float = 1.0,
    scheduler: str = "constant",
    progress: float = 1.0,
    model_head_weight: float = 1.0,
) -> list[float]:
    """``[lambda_0, lambda_1, ..., lambda_K]``: ``model_head_weight``, then ``coef * decay**k * schedule(progress)``."""
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    for name, value in (("heads_coefficient", heads_coefficient), ("decay_coefficient", decay_coefficient),
                        ("model_head_weight", model_head_weight)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    factor = heads_coefficient * medusa_schedule(scheduler, progress)
    return [float(model_head_weight)] + [factor * decay_coefficient**k for k in range(1, num_heads + 1)]
