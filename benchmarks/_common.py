"""The old helper names, kept for scripts not yet moved to :mod:`_runner` (the one runner); no logic of its own."""

from __future__ import annotations

from typing import Any, Callable

import torch
from _runner import GIB, REP_MS, RESULTS, WARMUP_MS, floor_valid_ms, measure, peak_memory, plot, print_table, save

__all__ = ["GIB", "RESULTS", "bench_ms", "floor_valid_ms", "peak_extra_gib", "plot_ratios", "print_table",
           "save_results"]


def bench_ms(fn: Callable[[], object], grads: list[torch.Tensor], *, warmup: int = WARMUP_MS,
             rep: int = REP_MS) -> float:
    """:func:`_runner.measure` (``warmup`` and ``rep`` in ms) with ``grads``' ``.grad`` reset between runs."""
    return measure(fn, grads=grads, warmup_ms=warmup, rep_ms=rep)


def peak_extra_gib(fn: Callable[[], object], grads: list[torch.Tensor]) -> float | None:
    """Extra GiB of :func:`_runner.peak_memory`."""
    return peak_memory(fn, grads=grads)[0]


def save_results(name: str, rows: list[dict], meta: dict) -> Any:
    return save(name, rows, meta)


def plot_ratios(name: str, rows: list[dict], *, group: str, method: str, value: str, title: str) -> Any:
    return plot(name, rows, group=[group], method=method, values=[(value, value)], title=title)
