"""Checks of scalar options (hyper-parameters, counts, indices), shared by the kernels, losses and trainers.

Every check accepts a Python number, a numpy scalar or a 0-d (one-element) tensor, returns a plain
Python ``float``/``int``, and raises ``TypeError``/``ValueError`` whose message names the argument,
the expected range and the value received, e.g.
``beta must be a finite number > 0, got -0.1``. Booleans are refused where a number is expected
(``True`` is an ``int`` to Python, never a meaningful ``beta``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _describe(value: Any) -> str:
    """``repr`` of small values; the type and shape of tensors and arrays."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dim() == 0:
            return f"tensor({value.item()!r}, dtype={value.dtype})"
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if hasattr(value, "shape") and hasattr(value, "dtype") and getattr(value, "ndim", 0) > 0:
        return f"an array of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def as_real(name: str, value: Any) -> float | int:
    """``value`` as a Python ``int`` (integral input) or ``float``; ``TypeError`` naming ``name`` otherwise.

    Accepted: ``int``/``float``, numpy scalars (``np.float32(0.5)``), 0-d or one-element real tensors.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number (or a 0-d real tensor), got {_describe(value)}")
        return value.item()
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        raise TypeError(f"{name} must be a real number, got the boolean {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    shape = getattr(value, "shape", None)
    if shape == () and hasattr(value, "item"):  # a 0-d numpy array
        return as_real(name, value.item())
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} {_describe(value)}")


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """``" in [0, 1]"``, ``" > 0"``, ... (empty when unbounded)."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    context: str = "",
) -> float:
    """``value`` as a finite ``float`` within the interval; ``ValueError`` naming ``name`` and the range otherwise.

    ``low``/``high`` (None: unbounded) are inclusive unless ``low_open``/``high_open``; ``context`` is
    appended to the message (e.g. ``" for loss_type 'ipo'"``).
    """
    number = float(as_real(name, value))
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        expected = "a finite number" + _interval(low, high, low_open, high_open)
        raise ValueError(f"{name} must be {expected}{context}, got {_describe(value)}")
    return number


def check_positive(name: str, value: Any, *, context: str = "") -> float:
    """A finite number ``> 0``."""
    return check_real(name, value, low=0.0, low_open=True, context=context)


def check_non_negative(name: str, value: Any, *, context: str = "") -> float:
    """A finite number ``>= 0``."""
    return check_real(name, value, low=0.0, context=context)


def check_optional_positive(name: str, value: Any) -> float | None:
    """None, or a finite number ``> 0``."""
    return None if value is None else check_positive(name, value)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python ``int`` in ``[low, high]`` (an integral float such as ``4.0`` is accepted)."""
    number = as_real(name, value)
    if isinstance(number, float):
        if not number.is_integer():
            raise TypeError(f"{name} must be an integer, got {_describe(value)}")
        number = int(number)
    if (low is not None and number < low) or (high is not None and number > high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {number}")
    return number


def check_count(name: str, value: Any) -> int:
    """A positive integer (a size, a number of steps or rows, a byte budget)."""
    return check_int(name, value, low=1)


def check_ignore_index(value: Any, name: str = "ignore_index") -> int:
    """An integer within int64 (targets are int64; a larger value could never match one)."""
    number = check_int(name, value)
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(
            f"{name} must be an integer within int64 [-2**63, 2**63 - 1] (targets are int64), got {number}"
        )
    return number


def check_weights(name: str, values: Any, length: int) -> tuple[float, ...]:
    """``length`` finite, non-negative weights, e.g. ``loss_weights``; ``ValueError`` naming the bad entry."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence of {length} numbers, got {_describe(values)}")
    items = list(values.tolist() if hasattr(values, "tolist") else values)
    if len(items) != length:
        raise ValueError(f"{name} must have {length} weight(s), one per loss_type, got {len(items)}")
    return tuple(check_non_negative(f"{name}[{i}]", w) for i, w in enumerate(items))


def check_num_items(value: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``num_items_in_batch`` as a 0-d fp32 tensor on ``device``, checked ``> 0`` and finite.

    Returns ``(denominator, deferred)``. A Python or numpy number and a CPU tensor are checked here.
    A tensor on an accelerator is returned as ``deferred`` too: reading it here would add a host
    synchronisation, so the caller folds its check into the one it already makes (the valid-token
    count, see :func:`liger_align.kernels.head._linear_chunks.valid_token_index`).
    """
    name = "num_items_in_batch"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a scalar (int or 0-d tensor), got {_describe(value)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number (int or 0-d tensor), got {_describe(value)}")
        denominator = value.detach().reshape(()).to(device=device, dtype=torch.float32)
        if value.device.type == "cpu":
            check_positive(name, value)
            return denominator, None
        return denominator, denominator
    number = check_positive(name, value)
    return torch.tensor(number, dtype=torch.float32, device=device), None


def raise_bad_num_items(value: float) -> None:
    """The error of a ``num_items_in_batch`` found ``<= 0`` or not finite after the host read."""
    raise ValueError(f"num_items_in_batch must be a finite number > 0, got {value:g}")


def check_flag(name: str, value: object) -> bool:
    """``value`` as a Python ``bool`` (a numpy bool too); ``TypeError`` naming ``name`` otherwise (``1``, ``"yes"``,
    a tensor)."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {_describe(value)}")


def check_choice(name: str, value: Any, valid: Sequence[str]) -> str:
    """``value`` when it is one of ``valid`` (strings); ``ValueError`` naming ``name`` otherwise (None included)."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be one of {list(valid)} (a string), got {_describe(value)}")
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
    return value


class TargetOutOfRangeError(ValueError):
    """Token ids outside ``[0, V)`` that are not ``ignore_index``: ``count`` of them, ``examples`` (at most 5).

    ``name`` is the argument the message names; a caller that passed the ids under another name re-raises
    :meth:`renamed` (no message text is parsed).
    """

    def __init__(self, name: str, *, count: int, examples: list[int], vocab: int, ignore_index: int) -> None:
        self.name, self.count, self.examples, self.vocab, self.ignore_index = name, count, examples, vocab, ignore_index
        super().__init__(
            f"{name} must lie in [0, V) = [0, {vocab}) or equal ignore_index={ignore_index}; {count} values do not, "
            f"e.g. {examples}"
        )

    def renamed(self, name: str) -> TargetOutOfRangeError:
        """The same error naming ``name``."""
        return TargetOutOfRangeError(name, count=self.count, examples=self.examples, vocab=self.vocab,
                                     ignore_index=self.ignore_index)
