"""Transformers' module-level functions (``apply_rotary_pos_emb`` and kin), plain or wrapped.

A modeling module's function can reach us in three forms:

- the plain Python function (transformers without the ``kernels`` package, e.g. 5.17);
- an ``nn.Module`` instance standing in for it (transformers >= 5.2x with ``kernels`` importable:
  ``use_kernel_forward_from_hub`` on a function turns it into a ``Func`` module whose ``forward(*args, **kwargs)``
  calls the function, and whose ``forward`` carries the function's signature);
- liger-align's own replacement, which keeps what it replaced on ``.original``.

:func:`plain_function` returns what computes the original result in every case, and
:func:`parameter_names` that callable's parameter names, so a probe or a patch never depends on the form.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn


def plain_function(current: Callable) -> Callable:
    """The function behind ``current``: ours unwrapped (``.original``), a hub ``Func`` module unwrapped to the
    function it calls, else ``current`` itself. A wrapper whose function cannot be found is returned as it is
    (it is callable with the function's arguments)."""
    fn = getattr(current, "original", current)
    if isinstance(fn, nn.Module):
        forward = type(fn).forward
        code, closure = getattr(forward, "__code__", None), getattr(forward, "__closure__", None) or ()
        cells = dict(zip(code.co_freevars, closure)) if code is not None else {}
        inner = cells["func"].cell_contents if "func" in cells else None
        if callable(inner) and not isinstance(inner, nn.Module):
            return inner
    return fn


def parameter_names(fn: Callable) -> list[str] | None:
    """The parameter names of ``fn`` (of its ``forward`` for a module standing in for a function), or ``None``
    when Python cannot tell them."""
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        return [p for p in inspect.signature(target).parameters]
    except (TypeError, ValueError):
        return None
