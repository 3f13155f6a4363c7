"""Checks the examples run before anything is loaded: flag values and the output folder.

This module imports nothing heavy, so that any example (the Lightning one included) can check its
``--output_dir`` before it loads a model or data.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cli import ScriptArguments
    from transformers import TrainingArguments


def _bad_flag(flag: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"--{flag} must be {expected}, got {value!r}")


def check_flags(script_args: ScriptArguments, config: TrainingArguments) -> None:
    """Refuse length, batch-size and step flags that would train on nothing or fail later (before any loading).

    Lengths (``max_length``, ``max_prompt_length``, ``max_completion_length``): unset or ``>= 1``, the
    prompt shorter than the whole; batch sizes and ``gradient_accumulation_steps`` ``>= 1``;
    ``max_steps`` ``-1`` (use epochs) or ``>= 1``; ``num_train_epochs > 0`` when it is used; logging,
    evaluation and save steps ``> 0``; ``warmup_steps >= 0``; a finite ``learning_rate >= 0``;
    ``eval_size > 0``.
    """
    lengths = {}
    for flag in ("max_length", "max_prompt_length", "max_completion_length"):
        value = getattr(config, flag, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _bad_flag(flag, "an integer >= 1 (or unset)", value)
        lengths[flag] = value
    for part in ("max_prompt_length", "max_completion_length"):
        if lengths[part] is not None and lengths["max_length"] is not None and lengths[part] >= lengths["max_length"]:
            raise ValueError(
                f"--{part} ({lengths[part]}) must be smaller than --max_length ({lengths['max_length']}): "
                "prompt and completion share max_length"
            )
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(config, flag)
        if not isinstance(value, int) or value < 1:
            raise _bad_flag(flag, "an integer >= 1", value)
    if config.max_steps == 0 or config.max_steps < -1:
        raise _bad_flag("max_steps", "-1 (train for --num_train_epochs) or an integer >= 1", config.max_steps)
    if config.max_steps == -1 and not (math.isfinite(config.num_train_epochs) and config.num_train_epochs > 0):
        raise _bad_flag("num_train_epochs", "a number > 0 (or set --max_steps)", config.num_train_epochs)
    for flag in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(config, flag, None)
        if value is not None and not value > 0:
            raise _bad_flag(flag, "a number > 0", value)
    if getattr(config, "warmup_steps", 0) < 0:
        raise _bad_flag("warmup_steps", "a number >= 0", config.warmup_steps)
    if not (math.isfinite(config.learning_rate) and config.learning_rate >= 0):
        raise _bad_flag("learning_rate", "a finite number >= 0", config.learning_rate)
    if not (math.isfinite(script_args.eval_size) and script_args.eval_size > 0):
        raise _bad_flag("eval_size", "a fraction in (0, 1) or a number of rows >= 1", script_args.eval_size)
    if script_args.eval_size >= 1 and script_args.eval_size != int(script_args.eval_size):
        raise _bad_flag("eval_size", "a fraction in (0, 1) or a whole number of rows", script_args.eval_size)


def check_output_dir(config: TrainingArguments | Any, *, overwrite: bool) -> str | None:
    """Follow the Trainer's convention for ``--output_dir``; return the checkpoint to resume from (or None).

    ``config`` is a ``TrainingArguments`` or any object with an ``output_dir`` (an ``argparse.Namespace``,
    say); without a ``resume_from_checkpoint`` attribute the script has no resuming, and only the
    refusal applies.

    - ``--resume_from_checkpoint PATH`` resumes from that folder; ``--resume_from_checkpoint last``
      (or ``true``) from the newest ``checkpoint-*`` in ``--output_dir``; either must exist.
    - Otherwise a non-empty ``--output_dir`` is refused (naming the checkpoints it holds) unless
      ``--overwrite_output_dir``. Nothing in it is deleted either way.
    """
    output_dir = Path(config.output_dir)
    resumable = hasattr(config, "resume_from_checkpoint")
    resume = getattr(config, "resume_from_checkpoint", None)
    if resume:
        from transformers.trainer_utils import get_last_checkpoint

        if str(resume).lower() in ("last", "true"):
            last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
            if last is None:
                raise ValueError(
                    f"--resume_from_checkpoint {resume}: no checkpoint-* folder in --output_dir {str(output_dir)!r}; "
                    "the embedded default saves none (--save_strategy no): to make a run resumable, train it with "
                    "--save_strategy steps --save_steps N (or --save_strategy epoch)"
                )
            return last
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume!r}: no such checkpoint folder")
        return str(resume)
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return None
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*") if p.is_dir())
    if overwrite:
        note = f" (its {len(checkpoints)} checkpoint-* folder(s) are left as they are)" if checkpoints else ""
        print(f"writing into the non-empty --output_dir {str(output_dir)!r}{note}")
        return None
    held = f"checkpoints {checkpoints}" if checkpoints else f"{sum(1 for _ in output_dir.iterdir())} entries"
    hint = (
        f"pass --resume_from_checkpoint last (or {str(output_dir / checkpoints[-1])!r}) to continue, or "
        if checkpoints and resumable else "pass "
    )
    raise ValueError(
        f"--output_dir {str(output_dir)!r} is not empty ({held}): {hint}--overwrite_output_dir to train into it "
        "anyway, or choose another --output_dir"
    )


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(arg == f"--{flag}" or arg.startswith(f"--{flag}=") for arg in argv)


def reruns_embedded_demo(argv: Sequence[str], *, model_flag: str = "model_name_or_path") -> bool:
    """Whether ``argv`` names neither ``--output_dir`` nor ``--<model_flag>``: the embedded demo, whose
    default folder (``outputs/<name>``) a new run overwrites, as re-running a demo should."""
    return not _given(argv, "output_dir") and not _given(argv, model_flag)


def check_output_dir_or_exit(config: TrainingArguments | Any, *, overwrite: bool) -> str | None:
    """:func:`check_output_dir` for a command-line run: a refusal prints one line ``error: ...`` to stderr
    and exits with status 2, as argparse does for a bad flag (``SystemExit(2)`` for in-process callers)."""
    try:
        return check_output_dir(config, overwrite=overwrite)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
