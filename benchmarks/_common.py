"""Timing, memory and reporting helpers shared by the GPU benchmarks.

Peak extra memory of a fwd+bwd = ``max_memory_allocated`` during the call, minus what was allocated
before it, minus the bytes of the gradients it leaves in ``.grad`` (those are outputs every
method must produce). Times are medians of ``triton.testing.do_bench`` after warm-up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).parent / "results"))
GIB = 2**30


def bench_ms(fn: Callable[[], object], grads: list[torch.Tensor], *, warmup: int = 50, rep: int = 300) -> float:
    """Median milliseconds of ``fn`` (a fwd+bwd), with ``grads``' ``.grad`` reset between runs."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median"))


def peak_extra_gib(fn: Callable[[], object], grads: list[torch.Tensor]) -> float:
    """Peak memory of one ``fn()`` beyond its inputs and the gradients it returns, in GiB."""
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in grads if t.grad is not None)
    for t in grads:
        t.grad = None
    return (peak - before - grad_bytes) / GIB


def floor_valid_ms(n_valid: int, hidden_size: int, vocab: int, dtype: torch.dtype, *, forward_only: bool = False) -> float:
    """Median ms of the 3 lm_head GEMMs over the valid tokens only (1 GEMM when ``forward_only``)."""
    a = torch.randn(n_valid, hidden_size, device="cuda", dtype=dtype)
    w = torch.randn(vocab, hidden_size, device="cuda", dtype=dtype)
    g = torch.randn(n_valid, vocab, device="cuda", dtype=dtype)

    def gemms():
        torch.mm(a, w.t())
        if not forward_only:
            torch.mm(g, w)
            torch.mm(g.t(), a)

    ms = bench_ms(gemms, [])
    del a, w, g
    torch.cuda.empty_cache()
    return ms


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print ``rows`` as an aligned text table of ``columns``."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def save_results(name: str, rows: list[dict], meta: dict) -> Path:
    """Write ``rows`` and ``meta`` to ``results/<name>.json``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return path


def plot_ratios(name: str, rows: list[dict], *, group: str, method: str, value: str, title: str) -> Path | None:
    """Bar chart of ``value`` per ``method``, grouped by ``group``, to ``results/<name>.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = list(dict.fromkeys(r[group] for r in rows))
    methods = list(dict.fromkeys(r[method] for r in rows))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4))
    for i, m in enumerate(methods):
        xs, ys = [], []
        for j, g in enumerate(groups):
            match = [r for r in rows if r[group] == g and r[method] == m and isinstance(r.get(value), float)]
            if match:
                xs.append(j + i * width)
                ys.append(match[0][value])
        ax.bar(xs, ys, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel(value)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
