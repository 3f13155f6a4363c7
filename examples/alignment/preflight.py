"""Checks the examples run before anything is loaded: flag values, the output folder, and how a refusal is told.

This module imports nothing heavy, so that any example (the Lightning one included) can check its
``--output_dir`` before it loads a model or data, and so that the alignment scripts check the flags that
need no torch or transformers before those are imported (:func:`check_command_line_early`).

A refused flag raises :class:`FlagError` (a ``ValueError``; the subclasses are also the error a check
raised before: ``FileNotFoundError``, ``TypeError``, ``OSError``). In-process callers (tests, notebooks)
get the exception; from the command line it is one line ``<prog>: error: <message>`` on stderr and exit
status 2, as argparse does (:func:`exit_on_flag_error`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from cli import ScriptArguments
    from transformers import TrainingArguments

HERE = Path(__file__).resolve().parent
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DTYPES = ("auto", "bfloat16", "float16", "float32")


class FlagError(ValueError):
    """A flag's value, a combination of flags, or the file or folder a flag names, refused before training."""


class FlagPathError(FlagError, FileNotFoundError):
    """A :class:`FlagError` naming a path that does not exist (also a ``FileNotFoundError``)."""


class FlagTypeError(FlagError, TypeError):
    """A :class:`FlagError` about a value of the wrong type in the data a flag names (also a ``TypeError``)."""


class FlagLoadError(FlagError, OSError):
    """A :class:`FlagError`: what a flag names could not be loaded, e.g. from the Hub offline (also an ``OSError``)."""


# ----------------------------------------------------------------------------------------------- telling


def prog_name() -> str:
    """The program's name as argparse shows it: the basename of ``sys.argv[0]``."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def one_line(message: str) -> str:
    """``message`` on one line: its lines joined with spaces."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def exit_with_error(message: str, prog: str | None = None) -> NoReturn:
    """Print ``<prog>: error: <message>`` (one line) to stderr and exit with status 2, as argparse does."""
    print(f"{prog or prog_name()}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def exit_on_flag_error(prog: str | None = None) -> Iterator[None]:
    """Turn a :class:`FlagError` raised inside into :func:`exit_with_error` (other errors pass through)."""
    try:
        yield
    except FlagError as error:
        exit_with_error(str(error), prog)


# ------------------------------------------------------------------- transformers' Liger-Kernel switches

#: What to say about transformers' switches for the separate Liger-Kernel package (TrainingArguments fields).
LIGER_KERNEL_FLAGS = {
    "use_liger_kernel": "--use_liger_kernel is transformers' switch for the separate Liger-Kernel package, which "
    "this script does not use",
    "liger_kernel_config": "--liger_kernel_config configures the separate Liger-Kernel package (transformers' "
    "--use_liger_kernel), which this script does not use",
}
USE_LIGER_HINT = "liger-align is on by default (--use_liger); --no-use_liger runs plain TRL/transformers"
HELP_NOTE = (
    "Which switch: --use_liger (on by default) trains with liger-align; --no-use_liger runs plain "
    "TRL/transformers for comparison. transformers' --use_liger_kernel and --liger_kernel_config belong to the "
    "separate Liger-Kernel package and are refused here."
)


def liger_kernel_flag_error(argv: Sequence[str]) -> str | None:
    """The refusal of ``--use_liger_kernel`` (unless given as false) or ``--liger_kernel_config`` in ``argv``."""
    values = argv_values(argv)
    for flag, what in LIGER_KERNEL_FLAGS.items():
        if flag not in values:
            continue
        value = values[flag]
        if flag == "use_liger_kernel" and value is not None and _to_bool(value) is False:
            continue
        return f"{what}; {USE_LIGER_HINT}"
    return None


# ------------------------------------------------------------------------------------------ the values


def _count(low: int) -> Callable[[Any], bool]:
    return lambda v: v >= low


#: flag -> (the type it is parsed as, whether a value is accepted, what is expected). ``None`` is accepted
#: where the field is optional (it means "unset").
VALUE_RULES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "max_length": (int, _count(1), "an integer >= 1 (or unset)"),
    "max_prompt_length": (int, _count(1), "an integer >= 1 (or unset)"),
    "max_completion_length": (int, _count(1), "an integer >= 1 (or unset)"),
    "per_device_train_batch_size": (int, _count(1), "an integer >= 1"),
    "per_device_eval_batch_size": (int, _count(1), "an integer >= 1"),
    "gradient_accumulation_steps": (int, _count(1), "an integer >= 1"),
    "max_steps": (int, lambda v: v == -1 or v >= 1, "-1 (train for --num_train_epochs) or an integer >= 1"),
    "logging_steps": (float, lambda v: v > 0, "a number > 0"),
    "eval_steps": (float, lambda v: v > 0, "a number > 0"),
    "save_steps": (float, lambda v: v > 0, "a number > 0"),
    "warmup_steps": (float, lambda v: v >= 0, "a number >= 0"),
    "learning_rate": (float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "eval_size": (float, lambda v: math.isfinite(v) and (0 < v < 1 or (v >= 1 and v == int(v))),
                  "a fraction in (0, 1) or a whole number of rows >= 1"),
    "meter_warmup_steps": (int, _count(0), "an integer >= 0"),
    "dtype": (str, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
}
#: The flags of ``VALUE_RULES`` that every alignment script has (``max_prompt_length`` and
#: ``max_completion_length`` are fields of some TRL configs only): checked before the imports.
EARLY_FLAGS = tuple(flag for flag in VALUE_RULES if flag not in ("max_prompt_length", "max_completion_length"))


def _bad_flag(flag: str, expected: str, value: Any) -> FlagError:
    return FlagError(f"--{flag} must be {expected}, got {value!r}")


def _check_value(flag: str, value: Any) -> None:
    """Raise :class:`FlagError` unless ``value`` (parsed) is what ``VALUE_RULES[flag]`` accepts; None passes."""
    kind, accepts, expected = VALUE_RULES[flag]
    if value is None:
        return
    if kind is int:
        typed = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        typed = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        typed = isinstance(value, kind)
    if not typed or not accepts(value):
        raise _bad_flag(flag, expected, value)


def _check_epochs(max_steps: int, num_train_epochs: float) -> None:
    if max_steps == -1 and not (math.isfinite(num_train_epochs) and num_train_epochs > 0):
        raise _bad_flag("num_train_epochs", "a number > 0 (or set --max_steps)", num_train_epochs)


def _check_lengths(lengths: dict[str, int | None]) -> None:
    whole = lengths.get("max_length")
    for part in ("max_prompt_length", "max_completion_length"):
        if lengths.get(part) is not None and whole is not None and lengths[part] >= whole:
            raise FlagError(
                f"--{part} ({lengths[part]}) must be smaller than --max_length ({whole}): "
                "prompt and completion share max_length"
            )


def check_flags(script_args: ScriptArguments, config: TrainingArguments) -> None:
    """Refuse flag values that would train on nothing or fail later (before any loading): raise :class:`FlagError`.

    Lengths (``max_length``, ``max_prompt_length``, ``max_completion_length``): unset or ``>= 1``, the
    prompt shorter than the whole; batch sizes and ``gradient_accumulation_steps`` ``>= 1``;
    ``max_steps`` ``-1`` (use epochs) or ``>= 1``; ``num_train_epochs > 0`` when it is used; logging,
    evaluation and save steps ``> 0``; ``warmup_steps >= 0``; a finite ``learning_rate >= 0``;
    ``eval_size`` a fraction in (0, 1) or a whole number ``>= 1``; ``meter_warmup_steps >= 0``; ``dtype``
    one of ``DTYPES``; ``report_to`` an integration transformers knows.
    """
    for flag in VALUE_RULES:
        for source in (script_args, config):  # the script's own fields (eval_size, dtype, ...) first
            if hasattr(source, flag):
                _check_value(flag, getattr(source, flag))
                break
    _check_lengths({flag: getattr(config, flag, None) for flag in ("max_length", "max_prompt_length",
                                                                     "max_completion_length")})
    _check_epochs(config.max_steps, config.num_train_epochs)
    _check_report_to(getattr(config, "report_to", None))


def _check_report_to(report_to: Any) -> None:
    """``--report_to``: what transformers' Trainer would refuse only once the model and data are loaded."""
    if not report_to:
        return
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        get_reporting_integration_callbacks(report_to)
    except ValueError as error:
        raise FlagError(f"--report_to: {str(error).rstrip('.')}; --report_to none reports nowhere") from None


# ---------------------------------------------------------------------------------------- paths named


def looks_like_path(name: str) -> bool:
    """Whether ``name`` reads as a local path (not a hub id): it starts like one, has a data-file suffix or
    more than one ``/``."""
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in DATA_FILE_TYPES or name.count("/") > 1


def check_dataset_path(name: str) -> None:
    """``--dataset_name``: a local-looking path must exist, a file must have a supported suffix (a hub id passes)."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in DATA_FILE_TYPES:
            raise FlagError(
                f"--dataset_name {name!r}: unsupported file type {path.suffix!r}; use one of {sorted(DATA_FILE_TYPES)}"
            )
    elif not path.is_dir() and looks_like_path(name):
        raise FlagPathError(f"--dataset_name {name!r}: no such file or folder ({path.resolve()})")


def check_model_path(name: str) -> None:
    """``--model_name_or_path``: a local-looking path must exist (a hub id passes)."""
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise FlagPathError(f"--model_name_or_path {name!r}: no such folder")


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(folder: str | Path) -> str | None:
    """The ``checkpoint-<N>`` folder of ``folder`` with the largest N, or None (as transformers'
    ``get_last_checkpoint``, which this module does not import)."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if folder.is_dir() else []
    if not found:
        return None
    return str(max(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1))))


def check_output_dir(config: TrainingArguments | Any, *, overwrite: bool) -> str | None:
    """Follow the Trainer's convention for ``--output_dir``; return the checkpoint to resume from (or None).

    ``config`` is a ``TrainingArguments`` or any object with an ``output_dir`` (an ``argparse.Namespace``,
    say); without a ``resume_from_checkpoint`` attribute the script has no resuming, and only the
    refusal applies. A refusal raises :class:`FlagError` (:class:`FlagPathError` for a missing checkpoint).

    - ``--resume_from_checkpoint PATH`` resumes from that folder; ``--resume_from_checkpoint last``
      (or ``true``) from the newest ``checkpoint-*`` in ``--output_dir``; either must exist.
    - Otherwise a non-empty ``--output_dir`` is refused (naming the checkpoints it holds) unless
      ``--overwrite_output_dir``. Nothing in it is deleted either way.
    """
    output_dir = Path(config.output_dir)
    resumable = hasattr(config, "resume_from_checkpoint")
    resume = getattr(config, "resume_from_checkpoint", None)
    if resume:
        if str(resume).lower() in ("last", "true"):
            last = last_checkpoint(output_dir)
            if last is None:
                raise FlagError(
                    f"--resume_from_checkpoint {resume}: no checkpoint-* folder in --output_dir {str(output_dir)!r}; "
                    "the embedded default saves none (--save_strategy no): to make a run resumable, train it with "
                    "--save_strategy steps --save_steps N (or --save_strategy epoch)"
                )
            return last
        if not Path(resume).is_dir():
            raise FlagPathError(f"--resume_from_checkpoint {resume!r}: no such checkpoint folder")
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
    raise FlagError(
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


# ------------------------------------------------------------------------- before the heavy imports


def argv_values(argv: Sequence[str]) -> dict[str, str | None]:
    """The last value given to each ``--flag`` in ``argv`` (``--flag value`` or ``--flag=value``, dashes in the
    name read as underscores, as HfArgumentParser accepts them); ``None`` for a flag given without a value.

    A light reading for the checks before the imports: abbreviated flags are left to the real parser.
    """
    values: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            if eq:
                values[name] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values[name] = argv[i + 1]
                i += 1
            else:
                values[name] = None
        i += 1
    return values


def _to_bool(text: str) -> bool | None:
    """HfArgumentParser's reading of a boolean flag's value; None for anything else."""
    lowered = text.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    return None


def _parse(flag: str, text: str) -> Any:
    kind, _, expected = VALUE_RULES[flag]
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise _bad_flag(flag, expected, text) from None


def check_argv(argv: Sequence[str]) -> None:
    """The checks that need neither torch nor transformers, on the command line ``argv`` of an alignment script.

    Raises :class:`FlagError` for: transformers' Liger-Kernel switches; the values of ``EARLY_FLAGS`` given
    explicitly (``num_train_epochs`` too, when ``--max_steps`` is not set); a missing ``--dataset_name`` or
    ``--model_name_or_path`` path; an ``--output_dir`` given and refused, or a ``--resume_from_checkpoint``
    that does not exist. The same checks run again after parsing (with the defaults), so none is lost
    where a flag is spelled in a way this light reading does not follow (an abbreviation).
    """
    refusal = liger_kernel_flag_error(argv)
    if refusal:
        raise FlagError(refusal)
    values = argv_values(argv)
    parsed = {flag: _parse(flag, values[flag]) for flag in EARLY_FLAGS if values.get(flag) is not None}
    for flag, value in parsed.items():
        _check_value(flag, value)
    epochs = values.get("num_train_epochs")
    if epochs is not None and parsed.get("max_steps", -1) == -1:
        try:
            number: Any = float(epochs)
        except ValueError:
            number = epochs  # not a number: refused with the text given
        if not (isinstance(number, float) and math.isfinite(number) and number > 0):
            raise _bad_flag("num_train_epochs", "a number > 0 (or set --max_steps)", number)
    if values.get("dataset_name"):
        check_dataset_path(values["dataset_name"])
    if values.get("model_name_or_path"):
        check_model_path(values["model_name_or_path"])
    if values.get("output_dir"):
        overwrite = "overwrite_output_dir" in values and (
            values["overwrite_output_dir"] is None or _to_bool(values["overwrite_output_dir"]) is not False
        )
        resume = values.get("resume_from_checkpoint")
        if resume or not overwrite:
            check_output_dir(SimpleNamespace(output_dir=values["output_dir"], resume_from_checkpoint=resume),
                             overwrite=overwrite)


def check_command_line_early() -> None:
    """Run :func:`check_argv` on ``sys.argv`` when the program is an alignment script (``run_*.py`` of this
    folder), before it imports torch and transformers: a refusal is one ``<prog>: error: ...`` line and exit
    status 2 in a fraction of a second instead of after the imports. Does nothing for any other program
    (an in-process caller, another example) or when help is asked for."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file:
        return
    script = Path(main_file).resolve()
    if script.parent != HERE or not script.name.startswith("run_"):
        return
    argv = sys.argv[1:]
    if any(arg in ("-h", "--help", "--help-all") for arg in argv):
        return
    with exit_on_flag_error():
        check_argv(argv)
