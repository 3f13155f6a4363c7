"""What every example reports: the StepMeter, peak memory, the timed training, the summary printed and written
to ``<output_dir>/run_summary.json``."""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from preflight import FlagError

if TYPE_CHECKING:  # annotations only: the Lightning example imports this module without transformers' Trainer
    from cli import ScriptArguments
    from transformers import TrainingArguments


def peak_memory() -> tuple[float, str]:
    """Peak memory in MiB and what was measured: CUDA ``max_memory_allocated`` or the process max RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def step_meter(args: ScriptArguments, config: TrainingArguments) -> Any:
    """A ``StepMeterCallback`` (synchronised step time, non-padding tokens/s, peak memory) writing
    one JSON line per step to ``<output_dir>/steps.jsonl``."""
    from liger_align.utils import StepMeterCallback

    if args.meter_warmup_steps < 0:
        raise FlagError(f"--meter_warmup_steps must be an integer >= 0, got {args.meter_warmup_steps}")
    return StepMeterCallback(warmup_steps=args.meter_warmup_steps, jsonl_path=Path(config.output_dir) / "steps.jsonl")


def print_meter(meter: dict[str, Any]) -> None:
    """One line of the StepMeter's summary (see ``liger_align.utils.StepMeter.summary``): the step time and
    tokens/s are both of the statistic the summary names (``"median step"``)."""
    if not meter["steps_measured"]:
        print(f"step meter   no step measured after {meter['warmup_steps']} warm-up step(s) (--meter_warmup_steps)")
        return
    kind = "process peak RSS" if meter["memory_kind"] == "cpu_rss" else f"{meter['memory_kind']} allocated/reserved"
    print(
        f"step meter   {meter['steps_measured']} steps after {meter['warmup_steps']} warm-up; "
        f"{meter.get('statistic', 'median step')}: {meter['median_step_s']:.3f} s, {meter['tokens_per_s']:.0f} "
        f"tokens/s (all ranks {meter['global_tokens_per_s']:.0f}); peak {meter['peak_allocated_mib']:.0f}/"
        f"{meter['peak_reserved_mib']:.0f} MiB ({kind})"
    )


def print_summary(summary: dict[str, Any]) -> None:
    """Print the run's summary: steps, wall time, peak memory, held-out metrics at the start and the end."""
    print(
        f"\n== {summary['algorithm'].upper()} with {summary['trainer']} on {summary['model']} ({summary['device']}) =="
    )
    print(f"steps        {summary['steps']}")
    print(f"wall time    {summary['train_seconds']:.1f} s (training only)")
    print(f"peak memory  {summary['peak_memory_mib']:.0f} MiB ({summary['peak_memory_kind']})")
    if "meter" in summary:
        print_meter(summary["meter"])
    print(f"held-out ({summary['eval_rows']} rows)".ljust(40) + "start      end")
    for key, start in summary["start"].items():
        end = summary["end"].get(key, math.nan)
        print(f"  {key.removeprefix('eval_')}".ljust(40) + f"{start:<10.3f} {end:.3f}")
    rewards = [summary["start"].get(f"eval_rewards/{side}") for side in ("chosen", "rejected")]
    if summary["start"].get("eval_rewards/accuracies") == 0 and all(r is not None and r == 0 for r in rewards):
        print("  (at the start the policy is the reference: every reward is 0, and a tie counts as a miss)")
    kind = "processor" if (Path(summary["output_dir"]) / "processor_config.json").exists() else "tokenizer"
    print(f"saved model and {kind} to {summary['output_dir']}")



def train_measured(trainer: Any, metrics: Callable[[], Any], *, resume: str | None = None) -> dict[str, Any]:
    """``metrics()`` before and after ``trainer.train()``, which is timed with its peak memory measured.

    Returns ``steps``, ``train_seconds``, ``peak_memory_mib``, ``peak_memory_kind`` (see :func:`peak_memory`;
    the CUDA peak is reset before training), ``start`` and ``end`` (what ``metrics`` returned).
    """
    start = metrics()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - began
    memory, memory_kind = peak_memory()
    end = metrics()
    return {
        "steps": trainer.state.global_step,
        "train_seconds": seconds,
        "peak_memory_mib": memory,
        "peak_memory_kind": memory_kind,
        "start": start,
        "end": end,
    }


def write_summary(
    summary: dict[str, Any], output_dir: str | Path, *, save_with: Any = None,
    printer: Callable[[dict[str, Any]], None] = print_summary,
) -> None:
    """Save ``save_with`` (a tokenizer or processor) to ``output_dir``, write ``run_summary.json`` there, print.

    Call it on the main process only. Values JSON cannot hold are written as their ``str``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if save_with is not None:
        save_with.save_pretrained(str(output_dir))
    (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    printer(summary)


def finish_run(
    trainer: Any, described: dict[str, Any], measured: dict[str, Any], *, meter: Any, eval_rows: int,
    save_with: Any = None, printer: Callable[[dict[str, Any]], None] = print_summary,
) -> dict[str, Any]:
    """Save the model to ``--output_dir``; return the run's summary, written and printed on the main process.

    The summary holds ``described`` (what ran: algorithm, trainer, model, device, ...), ``measured`` (from
    :func:`train_measured`), the StepMeter's summary, ``eval_rows`` and ``output_dir``.
    """
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    summary = {**described, **measured, "meter": meter.summary(), "eval_rows": eval_rows, "output_dir": output_dir}
    if trainer.is_world_process_zero():
        write_summary(summary, output_dir, save_with=save_with, printer=printer)
    return summary
