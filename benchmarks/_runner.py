"""The benchmarks' one runner: timer, memory, inputs, JSON schema, table, plot and driver.

- :func:`measure`: median milliseconds of ``fn()``. On CUDA ``triton.testing.do_bench`` (``WARMUP_MS`` of
  warm-up, then ``REP_MS`` of repeats, ``.grad`` of ``grads`` reset before each run); ``cuda_graph=True``
  replays the work from a CUDA graph (``do_bench_cudagraph``), for launch-bound ops (``None`` when it cannot
  be captured or without CUDA). Without CUDA: the median of ``CPU_RUNS`` ``time.perf_counter`` runs.
- :func:`peak_memory`: peak allocated during one ``fn()`` beyond what was allocated before it, minus the
  gradients it produces (``.grad`` of ``grads`` and tensors it returns: outputs every method must produce).
- :func:`token_inputs`: hidden ``(R, T, H)`` and weight ``(V, H)`` leaves, targets ``(R, T)`` whose first
  ``masked`` fraction is ``IGNORE``; rows ``[:R/2]`` and ``[R/2:]`` are the chosen and rejected halves.
- :func:`run`: each benchmark is ``setup(shape) -> Case`` (arms ``name -> callable``) over a list of
  shapes; each arm is timed (and its memory measured), ratios to the floor or a named arm of the same run.
- :func:`save`: ``results/<name>.json`` as ``{"meta": run_meta(...), "rows": [...]}``; :func:`plot`: the PNG.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).parent / "results"))
GIB, MIB = 2**30, 2**20
IGNORE = -100
WARMUP_MS, REP_MS, CPU_RUNS = 50, 300, 3
PEERS = ("liger-kernel", "cut-cross-entropy", "trl", "transformers", "peft", "accelerate", "lightning", "deepspeed")


def on_cuda() -> bool:
    return torch.cuda.is_available()


def _reset(grads: Sequence[torch.Tensor]) -> None:
    for t in grads:
        t.grad = None


def measure(fn: Callable[[], Any], *, grads: Sequence[torch.Tensor] = (), cuda_graph: bool = False,
            warmup_ms: int = WARMUP_MS, rep_ms: int = REP_MS) -> float | None:
    """Median ms of ``fn()`` after warm-up (see the module docstring); ``None`` only for an impossible graph."""
    grads = list(grads)
    if not on_cuda():
        if cuda_graph:
            return None
        fn()  # warm-up
        times = []
        for _ in range(CPU_RUNS):
            _reset(grads)
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
        _reset(grads)
        return statistics.median(times)
    import triton

    if not cuda_graph:
        ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads or None,
                                     return_mode="median")
        _reset(grads)
        return float(ms)
    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            ms = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, grad_to_none=grads or None, return_mode="median")
        return float(ms)
    except Exception as exc:  # noqa: BLE001 - an op that cannot be captured gets no graph time
        print(f"  (no CUDA graph: {type(exc).__name__}: {str(exc)[:120]})")
        torch.cuda.synchronize()
        return None
    finally:
        _reset(grads)


def _bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_bytes(o) for o in obj)
    return 0


def peak_memory(fn: Callable[[], Any], *, grads: Sequence[torch.Tensor] = ()) -> tuple[float | None, float | None]:
    """``(extra GiB, absolute peak GiB)`` of one ``fn()``; ``(None, None)`` without CUDA."""
    if not on_cuda():
        return None, None
    _reset(grads)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    produced = _bytes(out) + sum(_bytes(t.grad) for t in grads)
    del out
    _reset(grads)
    return (peak - before - produced) / GIB, peak / GIB


def peak_allocated_gib(*, reset: bool = False) -> float | None:
    """``max_memory_allocated`` in GiB since the last reset (``reset``: start a new window); None without CUDA."""
    if not on_cuda():
        return None
    peak = torch.cuda.max_memory_allocated() / GIB
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def free_memory() -> None:
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


@dataclass
class TokenInputs:
    """One shape's tensors (see :func:`token_inputs`)."""

    hidden: torch.Tensor  # (R, T, H) leaf
    weight: torch.Tensor  # (V, H) leaf
    target: torch.Tensor  # (R, T), IGNORE where masked
    ref_hidden: torch.Tensor | None = None  # (R, T, H), no grad
    ref_weight: torch.Tensor | None = None  # (V, H), no grad
    labels: torch.Tensor | None = None  # (R,) bool, KTO: half desirable

    @property
    def n_valid(self) -> int:
        return int((self.target != IGNORE).sum())

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden (R*T, H), target (R*T,))`` views."""
        return self.hidden.reshape(-1, self.hidden.shape[-1]), self.target.reshape(-1)


def token_inputs(rows: int, seq: int, hidden_size: int, vocab: int, *, dtype: torch.dtype = torch.bfloat16,
                 device: str | None = None, masked: float = 0.25, reference: bool = False,
                 seed: int = 0) -> TokenInputs:
    """Seeded inputs: first ``masked`` of each row's targets are ``IGNORE``; ``reference``: a frozen twin."""
    device = device or ("cuda" if on_cuda() else "cpu")
    torch.manual_seed(seed)
    scale = hidden_size**-0.5
    hidden = torch.randn(rows, seq, hidden_size, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) * scale).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows, seq), device=device)
    target[:, : int(seq * masked)] = IGNORE
    x = TokenInputs(hidden, weight, target, labels=torch.arange(rows, device=device) % 2 == 0)
    if reference:
        x.ref_hidden = torch.randn(rows, seq, hidden_size, device=device, dtype=dtype)
        x.ref_weight = (torch.randn(vocab, hidden_size, device=device) * scale).to(dtype)
    return x


def floor_valid_ms(n_valid: int, hidden_size: int, vocab: int, dtype: torch.dtype, *, forward_only: bool = False,
                   device: str | None = None) -> float:
    """Median ms of the 3 lm_head GEMMs (logits, grad-input, grad-weight) over ``n_valid`` tokens (1 if forward)."""
    device = device or ("cuda" if on_cuda() else "cpu")
    a = torch.randn(n_valid, hidden_size, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden_size, device=device, dtype=dtype)
    g = torch.randn(n_valid, vocab, device=device, dtype=dtype)

    def gemms() -> None:
        torch.mm(a, w.t())
        if not forward_only:
            torch.mm(g, w)
            torch.mm(g.t(), a)

    return measure(gemms)  # the buffers are freed on return


@dataclass
class Case:
    """One shape of one benchmark: ``arms`` maps a name to a fwd+bwd callable, or to a string (why skipped)."""

    arms: dict[str, Callable[[], Any] | str]
    grads: list[torch.Tensor] = field(default_factory=list)
    floor_ms: float | None = None  # recorded as the arm ``floor_name`` (not timed here)
    floor_name: str = "floor_valid"
    fields: dict[str, Any] = field(default_factory=dict)  # extra row fields of every arm of this case


def _time(row: dict) -> float | None:
    best = row.get("graph_ms") if isinstance(row.get("graph_ms"), float) else row.get("ms")
    return best if isinstance(best, float) else None


def add_ratios(rows: list[dict], *, keys: Sequence[str], ratios: dict[str, tuple[str, str]],
               method: str = "method") -> None:
    """``row[name] = row[value] / base[value]`` where ``ratios[name] = (base arm, value)`` and ``base`` is the row of
    that arm (``row[method]``) with the same ``keys``; ``value == "time"``: ``graph_ms`` when present, else ``ms``."""
    for row in rows:
        for name, (arm, value) in ratios.items():
            base = next((r for r in rows if r.get(method) == arm and all(r.get(k) == row.get(k) for k in keys)), None)
            get = _time if value == "time" else (lambda r, v=value: r.get(v) if isinstance(r.get(v), float) else None)
            a, b = get(row), get(base) if base is not None else None
            row[name] = a / b if a is not None and b else None


def run(shapes: Iterable[dict], setup: Callable[[dict], Case], *, ratios: dict[str, tuple[str, str]] | None = None,
        cuda_graph: bool = False, memory: bool = True, skip: Callable[[dict, str], str | None] | None = None,
        warmup_ms: int = WARMUP_MS, rep_ms: int = REP_MS) -> list[dict]:
    """Time every arm of ``setup(shape)`` per shape; one row per arm (the shape's fields, ``method``, ``ms``,
    ``graph_ms`` when ``cuda_graph``, ``extra_gib``, ``peak_gib``, and the ``ratios``, by default
    ``x_floor = time / floor``). A missing peer, an OOM or a failure is recorded in ``ms``, never raised.
    ``skip(shape, arm)`` may return a reason not to run an arm."""
    ratios = {"x_floor": ("floor_valid", "time")} if ratios is None else ratios
    out: list[dict] = []
    keys: list[str] = []
    for shape in shapes:
        keys = list(dict.fromkeys([*keys, *shape]))
        case = setup(shape)
        base = {**shape, **case.fields}
        if case.floor_ms is not None:
            out.append({**base, "method": case.floor_name, "ms": case.floor_ms, "extra_gib": 0.0})
        for name, fn in case.arms.items():
            row = {**base, "method": name}
            reason = fn if isinstance(fn, str) else (skip(shape, name) if skip else None)
            if reason:
                row["ms"] = f"skipped: {reason}"
            else:
                try:
                    fn()  # warm-up (compilation, autotuning) before measuring memory
                    if memory:
                        row["extra_gib"], row["peak_gib"] = peak_memory(fn, grads=case.grads)
                    row["ms"] = measure(fn, grads=case.grads, warmup_ms=warmup_ms, rep_ms=rep_ms)
                    if cuda_graph:
                        row["graph_ms"] = measure(fn, grads=case.grads, cuda_graph=True, rep_ms=rep_ms)
                except torch.OutOfMemoryError:
                    row["ms"] = "OOM"
                except Exception as exc:  # noqa: BLE001 - a failing peer is recorded, not fatal
                    row["ms"] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                _reset(case.grads)
                free_memory()
            out.append(row)
            shown = " ".join(str(v) for v in shape.values())
            print(f"  {shown} {name}: {row['ms'] if isinstance(row['ms'], str) else round(row['ms'], 3)}", flush=True)
        del case
        free_memory()
    add_ratios(out, keys=keys, ratios=ratios)
    return out


def optional(module: str, attr: str | None = None) -> Any:
    """``import module`` (and ``.attr``); a string naming why not when it cannot be imported (an arm skip reason)."""
    try:
        mod = __import__(module, fromlist=["_"])
        return getattr(mod, attr) if attr else mod
    except Exception as exc:  # noqa: BLE001 - any import failure means "absent"
        return f"{module} not available ({type(exc).__name__})"


# ------------------------------------------------------------------------------------------- report


def run_meta(**extra: Any) -> dict[str, Any]:
    """The run's context: GPU, torch, triton, the peers' versions, UTC date, the command line; then ``extra``."""
    versions = {}
    for name in ("triton", *PEERS):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"gpu": torch.cuda.get_device_name() if on_cuda() else f"cpu ({platform.processor() or 'no GPU'})",
            "torch": torch.__version__, "triton": versions.pop("triton"), "transformers": versions.pop("transformers"),
            "versions": versions, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), **extra}


def save(name: str, rows: list[dict], meta: dict[str, Any], *, results_dir: Path | None = None) -> Path:
    """Write ``{"meta": meta, "rows": rows}`` to ``<results_dir>/<name>.json`` (default ``RESULTS``)."""
    folder = Path(results_dir or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    return path


def load_rows(path: Path) -> tuple[dict[str, Any], list[dict]]:
    """``(meta, rows)`` of a saved JSON, also of the older ``{"config", "results"}`` files."""
    data = json.loads(Path(path).read_text())
    return data.get("meta", data.get("config", {})), data.get("rows", data.get("results", []))


def print_table(rows: list[dict], columns: Sequence[str]) -> None:
    """Print ``rows`` as an aligned text table of ``columns`` (absent or None: ``-``)."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def plot(path: str | Path, rows: list[dict], *, group: Sequence[str], values: Sequence[tuple[str, str]],
         method: str = "method", title: str = "", ref_line: float | None = 1.0,
         annotate: dict[str, str] | None = None) -> Path | None:
    """Grouped bar chart to ``path`` (a name: ``RESULTS/<name>.png``): one panel per ``(value key, y label)`` of
    ``values``, one group per distinct ``group`` fields (a number shown as ``key=value``), one bar per ``method``;
    a non-number is written on the axis (``OOM``); ``annotate[value] = ratio key`` prints that ratio on the bar.
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return None
    path = Path(path) if str(path).endswith(".png") else RESULTS / f"{path}.png"
    label = lambda r: "\n".join(v if isinstance(v := r.get(k), str) else f"{k}={v}" for k in group)  # noqa: E731
    groups = list(dict.fromkeys(label(r) for r in rows))
    methods = list(dict.fromkeys(str(r.get(method)) for r in rows))
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(1, len(values), figsize=(max(6, 1.0 * len(groups) * len(values) + 3), 4.2),
                             squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], values):
        labelled: set[str] = set()
        for i, m in enumerate(methods):
            for j, g in enumerate(groups):
                match = [r for r in rows if label(r) == g and str(r.get(method)) == m]
                if not match:
                    continue
                x, v = j + (i - (len(methods) - 1) / 2) * width, match[0].get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    ax.bar(x, v, width, color=f"C{i}", label=None if m in labelled else m)
                    labelled.add(m)
                    ratio = match[0].get((annotate or {}).get(key, ""))
                    if isinstance(ratio, float):
                        ax.annotate(f"{ratio:.2f}x", (x, v), ha="center", va="bottom", fontsize=6)
                elif isinstance(v, str):
                    ax.text(x, 0, v.split(":")[0], rotation=90, ha="center", va="bottom", fontsize=6, color=f"C{i}")
        ax.set_xticks(range(len(groups)), groups, fontsize=7)
        if ref_line is not None:
            ax.axhline(ref_line, color="k", lw=0.8, ls="--")
        ax.set_ylabel(ylabel)
        if labelled:
            ax.legend(fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
