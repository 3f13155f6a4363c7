"""``StepMeter``: synchronised step time, non-padding tokens/s and peak memory of a training loop.

One step is one optimizer step (all its micro-batches). Per step::

    meter.start_step()          # synchronise the accelerator, then read the clock
    meter.add_tokens(n)         # n: int or 0-d tensor of non-padding tokens (kept on device: no host sync)
    meter.end_step()            # synchronise, read the clock, all-reduce the tokens, read peak memory

The first ``warmup_steps`` steps are recorded but flagged and left out of :meth:`summary`. At the first
measured step the accelerator's peak-memory counters are reset, so the peaks cover measured steps only.

- ``step_s``: wall time between the two synchronised clock reads (``time.perf_counter``).
- ``tokens_per_s = tokens / step_s`` (this rank); ``global_tokens_per_s = sum_r tokens_r / step_s`` (the
  token count is all-reduced when ``torch.distributed`` is initialised; ranks step in lockstep).
- Memory: ``max_memory_allocated`` / ``max_memory_reserved`` of the accelerator in MiB (``memory_kind``
  is the device type, e.g. ``"cuda"``); on CPU the process's peak resident set size (``ru_maxrss``,
  which cannot be reset) in both fields, with ``memory_kind="cpu_rss"``.

Each step gives one JSON record (kept in ``meter.records``; a line of ``jsonl_path`` if given, one file
per rank when ``world_size > 1``: ``<stem>.rank<r><suffix>``). Imports torch and the standard library only.

:meth:`StepMeter.summary` reports one statistic over the measured steps, the median, and names it
(``"statistic": "median step"``): ``median_step_s`` is the median of the steps' ``step_s``, and
``tokens_per_s`` / ``global_tokens_per_s`` the medians of the steps' own rates (with the same tokens in
every step: the tokens of a step over the median step time). A median is not pulled by an outlier step
(a checkpoint save, an evaluation, a recompilation), which a mean over the steps would spread into both.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

_MIB = 2**20
#: The statistic of :meth:`StepMeter.summary` over the measured steps, as its ``statistic`` field names it.
STATISTIC = "median step"


def _backend(device: torch.device) -> Any:
    """The torch accelerator module of ``device`` (``torch.cuda``, ``torch.xpu``, ...), or None on CPU."""
    if device.type == "cpu":
        return None
    return getattr(torch, device.type, None)


def _rss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (_MIB if sys.platform == "darwin" else 1024)


def count_tokens(inputs: Any) -> torch.Tensor | int | None:
    """Non-padding tokens of a batch: ``attention_mask.sum()``, else ``input_ids.numel()`` (0-d tensor, on device).

    ``inputs``: a mapping (or an object with attributes) holding ``attention_mask`` (B, T) and/or
    ``input_ids`` (B, T); ``None`` when it holds neither. A 4-d (B, 1, T, S) mask is not a padding mask:
    then ``input_ids`` is counted.
    """
    def get(name: str) -> Any:
        return inputs.get(name) if hasattr(inputs, "get") else getattr(inputs, name, None)

    mask = get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() <= 2:
        return mask.detach().sum(dtype=torch.int64)
    ids = get("input_ids")
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    embeds = get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return embeds.shape[0] * embeds.shape[1]
    return None


class StepMeter:
    """Measure training steps; see the module docstring for the definitions.

    Args:
        warmup_steps: leading steps recorded but excluded from the summary (>= 0).
        device: the accelerator to synchronise and read memory of; ``None``: the current CUDA device
            if CUDA is available, else CPU (resolved at the first step, so set the device first).
        jsonl_path: file that receives one JSON line per step (truncated at the first step).
        rank, world_size: default to ``torch.distributed``'s when initialised, else 0 and 1.
    """

    def __init__(
        self,
        warmup_steps: int = 2,
        device: torch.device | str | None = None,
        jsonl_path: str | Path | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.device = None if device is None else torch.device(device)
        self.jsonl_path = None if jsonl_path is None else Path(jsonl_path)
        self.rank = rank
        self.world_size = world_size
        self.records: list[dict[str, Any]] = []
        self._began: float | None = None
        self._tokens_int = 0
        self._tokens_tensor: torch.Tensor | None = None
        self._file: Path | None = None

    # -- setup -------------------------------------------------------------------------------------

    def _resolve(self) -> None:
        if self.device is None:
            self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
                torch.device("cpu"))
        elif self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.rank is None:
            self.rank = torch.distributed.get_rank() if dist else 0
        if self.world_size is None:
            self.world_size = torch.distributed.get_world_size() if dist else 1

    def _synchronize(self) -> None:
        backend = _backend(self.device)
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize(self.device)

    @property
    def memory_kind(self) -> str:
        """``"cpu_rss"`` on CPU, else the device type whose allocator is read (``"cuda"``, ...)."""
        backend = None if self.device is None else _backend(self.device)
        return "cpu_rss" if backend is None or not hasattr(backend, "max_memory_allocated") else self.device.type

    def _peak_mib(self) -> tuple[float, float]:
        if self.memory_kind == "cpu_rss":
            rss = _rss_mib()
            return rss, rss
        backend = _backend(self.device)
        allocated = backend.max_memory_allocated(self.device) / _MIB
        reserved = backend.max_memory_reserved(self.device) / _MIB if hasattr(backend, "max_memory_reserved") else (
            allocated)
        return allocated, reserved

    # -- the step ----------------------------------------------------------------------------------

    @property
    def in_step(self) -> bool:
        """True between :meth:`start_step` and :meth:`end_step`."""
        return self._began is not None

    def start_step(self) -> None:
        """Synchronise the accelerator and start the clock (resets the memory peaks at the first measured step)."""
        self._resolve()
        if len(self.records) == self.warmup_steps and self.memory_kind != "cpu_rss":
            self._synchronize()
            _backend(self.device).reset_peak_memory_stats(self.device)
        self._tokens_int = 0
        self._tokens_tensor = None
        self._synchronize()
        self._began = time.perf_counter()

    def add_tokens(self, n: int | torch.Tensor) -> None:
        """Count ``n`` non-padding tokens in the current step (a tensor stays on its device until :meth:`end_step`)."""
        if isinstance(n, torch.Tensor):
            if n.numel() != 1:
                raise ValueError(f"add_tokens: n must be an int or a 0-d tensor, got shape {tuple(n.shape)}")
            n = n.detach().reshape(()).to(torch.int64)
            self._tokens_tensor = n if self._tokens_tensor is None else self._tokens_tensor + n.to(
                self._tokens_tensor.device)
        elif isinstance(n, int) and not isinstance(n, bool):
            self._tokens_int += n
        else:
            raise TypeError(f"add_tokens: n must be an int or a 0-d tensor, got {type(n).__name__}")

    def end_step(self) -> dict[str, Any] | None:
        """Synchronise, stop the clock, record the step and return its record (None outside a step)."""
        if self._began is None:
            return None
        self._synchronize()
        step_s = time.perf_counter() - self._began
        self._began = None
        tokens = self._tokens_int + (0 if self._tokens_tensor is None else int(self._tokens_tensor.item()))
        global_tokens = self._all_reduce(tokens)
        allocated, reserved = self._peak_mib()
        record = {
            "step": len(self.records),
            "warmup": len(self.records) < self.warmup_steps,
            "step_s": step_s,
            "tokens": tokens,
            "global_tokens": global_tokens,
            "tokens_per_s": tokens / step_s if step_s > 0 else 0.0,
            "global_tokens_per_s": global_tokens / step_s if step_s > 0 else 0.0,
            "peak_allocated_mib": allocated,
            "peak_reserved_mib": reserved,
            "memory_kind": self.memory_kind,
            "rank": self.rank,
        }
        self.records.append(record)
        self._write(record)
        return record

    def _all_reduce(self, tokens: int) -> int:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return tokens
        device = "cpu" if self.device.type == "cpu" or dist.get_backend() == "gloo" else self.device
        count = torch.tensor([tokens], dtype=torch.int64, device=device)
        dist.all_reduce(count)
        return int(count.item())

    def _write(self, record: dict[str, Any]) -> None:
        if self.jsonl_path is None:
            return
        if self._file is None:
            path = self.jsonl_path
            if (self.world_size or 1) > 1:
                path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
            self._file = path
        with self._file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- the result --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Figures over the measured (post-warm-up) steps; ``None`` values when no step was measured.

        ``statistic`` names how the step figures are taken (``"median step"``, see the module docstring):
        ``median_step_s``, ``tokens_per_s`` and ``global_tokens_per_s`` are medians over the measured steps.
        """
        measured = [r for r in self.records if not r["warmup"]]

        def median(key: str) -> float | None:
            return statistics.median(r[key] for r in measured) if measured else None

        out: dict[str, Any] = {
            "steps_measured": len(measured),
            "warmup_steps": self.warmup_steps,
            "statistic": STATISTIC,
            "median_step_s": median("step_s"),
            "tokens_per_s": median("tokens_per_s"),
            "global_tokens_per_s": median("global_tokens_per_s"),
            "peak_allocated_mib": max((r["peak_allocated_mib"] for r in measured), default=None),
            "peak_reserved_mib": max((r["peak_reserved_mib"] for r in measured), default=None),
            "memory_kind": self.memory_kind if self.device is not None else None,
            "device": None if self.device is None else str(self.device),
            "world_size": self.world_size,
        }
        return out

    def __repr__(self) -> str:
        return f"StepMeter(warmup_steps={self.warmup_steps}, device={self.device}, steps={len(self.records)})"
