"""Command line of the examples: the script arguments, the embedded run's defaults, parsing, help.

``parse_script_and_config`` serves every example built on a Hugging Face ``TrainingArguments``
subclass (alignment, SFT, Medusa, Qwen2-VL); ``parse_args`` adds what the alignment scripts do
with their output folder. Checks of the parsed values are in ``preflight.py``.

The parser (:class:`ExampleArgumentParser`, an ``HfArgumentParser``) tells a flag error the way argparse
does, in one line ``<prog>: error: <message>`` with exit status 2 (no usage block): an unknown flag (with
the closest known one), a value of the wrong type or choice, transformers' ``--use_liger_kernel`` /
``--liger_kernel_config``. A config class refusing a combination in its ``__post_init__`` raises
:class:`preflight.FlagError` naming the flags (one line from the command line, see ``common.main``).
``-h``/``--help`` lists the script's flags and the common ones; ``--help-all`` every flag.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import re
import shutil
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from preflight import HELP_NOTE, FlagError, argv_values, exit_with_error, liger_kernel_flag_error, one_line
from transformers import HfArgumentParser, TrainingArguments


@dataclass
class ScriptArguments:
    """Arguments of the example scripts, beside the trainer's config (``ORPOConfig``, ``DPOConfig``, ...)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model to align (hub id or local folder). Default: the embedded tiny Llama 3.2."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A .jsonl/.json/.parquet/.csv file, a folder written by save_to_disk, or a hub data set name. "
            "Default: the preference data shipped in liger_align/testing/data."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a hub data set."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split, if the data set has one."})
    eval_size: float = field(
        default=0.1,
        metadata={"help": "Without a held-out split: the fraction (< 1) or number (>= 1) of rows held out."},
    )
    use_liger: bool = field(
        default=True,
        metadata={
            "help": "Use liger_align (trainer or model patch); --no-use_liger runs plain TRL/transformers. "
            "Not transformers' --use_liger_kernel, which is the separate Liger-Kernel package's switch."
        },
    )
    dtype: str = field(
        default="auto", metadata={"help": "dtype to load --model_name_or_path in: auto, bfloat16, float16, float32."}
    )
    meter_warmup_steps: int = field(
        default=2, metadata={"help": "Optimizer steps the StepMeter leaves out of its summary (warm-up)."}
    )


@dataclass
class AlignmentScriptArguments(ScriptArguments):
    """:class:`ScriptArguments` plus what the alignment scripts do with an existing output folder."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into a non-empty --output_dir anyway (its files are overwritten). Without it, a "
            "non-empty folder is refused; pass --resume_from_checkpoint to continue from a checkpoint-* in it."
        },
    )


@dataclass(frozen=True)
class Algorithm:
    """How one example script differs from the others.

    ``liger_trainer`` runs by default, ``trl_trainer`` with ``--no-use_liger``. ``embedded_defaults``
    tune the embedded run (over ``config_defaults``, which apply to every run; flags override both).
    ``reference_model``: the trainer takes a ``ref_model`` (DPO, KTO); TRL loads it from the model's
    path, so the embedded model, which has none, gets a frozen copy of itself. ``beta_may_be_zero``: the
    config check of ``liger_trainer`` accepts ``beta == 0`` (ORPO, whose beta weighs the odds-ratio term).
    """

    name: str
    config_class: type[TrainingArguments]
    trl_trainer: type
    liger_trainer: type
    paired: bool = True
    reference_model: bool = False
    embedded_defaults: dict[str, Any] = field(default_factory=dict)
    config_defaults: dict[str, Any] = field(default_factory=dict)
    beta_may_be_zero: bool = False


# Settings of the embedded default run, shared by all algorithms (each may override some).
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "num_train_epochs": 12,
    "max_length": 64,
    "logging_steps": 20,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "gradient_checkpointing": False,
}


#: The config flags ``--help`` shows (those the config class has), beside the script's own; ``--help-all``
#: shows every flag.
COMMON_CONFIG_FLAGS = (
    "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs",
    "max_steps", "max_length", "max_completion_length", "beta", "loss_type", "simpo_gamma", "cpo_alpha",
    "desirable_weight", "undesirable_weight", "bf16", "activation_checkpointing", "logging_steps", "eval_strategy",
    "save_strategy", "save_steps", "resume_from_checkpoint", "report_to", "seed",
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown (HfArgumentParser's choice); the description's paragraphs kept (they are filled here)."""


class _Help(argparse.Action):
    """``-h``/``--help``: the short help; ``--help-all`` (``full=True``): argparse's full help."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, default: Any = argparse.SUPPRESS,
                 help: str | None = None, full: bool = False) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)
        self.full = full

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if self.full:
            parser.print_help()
        else:
            sys.stdout.write(parser.format_short_help())
        parser.exit()


class ExampleArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` of the examples: argparse's one-line errors without the usage block, unknown flags
    refused (with the closest known flag), transformers' Liger-Kernel switches refused, a short ``--help``.

    ``script_class`` is the first dataclass (its flags head the short help), ``config_class`` the second.
    """

    def __init__(self, script_class: type, config_class: type, *, description: str | None = None) -> None:
        width = min(100, shutil.get_terminal_size().columns - 2)  # argparse's width, at most 100
        paragraphs = [p for p in (description, HELP_NOTE) if p]
        text = "\n\n".join(
            textwrap.fill(" ".join(p.split()), width, break_on_hyphens=False, break_long_words=False)
            for p in paragraphs
        )
        super().__init__((script_class, config_class), description=text, formatter_class=_HelpFormatter,
                         add_help=False)
        self.script_class, self.config_class = script_class, config_class
        self.add_argument("-h", "--help", action=_Help, help="show the script's flags and the common ones, and exit")
        self.add_argument("--help-all", action=_Help, full=True,
                          help=f"show every flag (all of {config_class.__name__}), and exit")

    def error(self, message: str) -> NoReturn:
        """One line ``<prog>: error: <message>`` on stderr, exit status 2 (argparse prints its usage first)."""
        exit_with_error(message, self.prog)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        """argparse's, refusing transformers' Liger-Kernel switches first and any argument left unrecognised."""
        args = list(sys.argv[1:] if args is None else args)
        refusal = liger_kernel_flag_error(args)
        if refusal:
            self.error(refusal)
        namespace, rest = super().parse_known_args(args, namespace)
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}{self._closest(rest)}")
        return namespace, rest

    def _closest(self, rest: Sequence[str]) -> str:
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        guesses = {}
        for arg in rest:
            flag = arg.split("=", 1)[0]
            if flag.startswith("--"):
                match = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
                if match:
                    guesses[flag] = match[0]
        if len(guesses) == 1:
            return f" (did you mean {next(iter(guesses.values()))}?)"
        said = ", ".join(f"{guess} for {flag}" for flag, guess in guesses.items())
        return f" (did you mean {said}?)" if guesses else ""

    def format_short_help(self) -> str:
        """Usage, description, the script's flags, the common config flags this config has, and a pointer to
        ``--help-all``. Each flag is shown by its first name (``--max_length``; ``--max-length`` works too)."""
        formatter = self._get_formatter()
        formatter.add_usage("%(prog)s [-h] [--help-all] [--FLAG VALUE ...]", [], [])
        formatter.add_text(self.description)
        script_fields = {f.name for f in dataclasses.fields(self.script_class)}
        config_fields = {f.name for f in dataclasses.fields(self.config_class)}
        common = [name for name in COMMON_CONFIG_FLAGS if name in config_fields]
        if "activation_checkpointing" not in config_fields and "gradient_checkpointing" in config_fields:
            common.append("gradient_checkpointing")
        shown = [a for a in self._actions if a.help is not argparse.SUPPRESS and a.option_strings
                 and not a.option_strings[0].startswith("--no_")]  # --no_use_liger: said in --use_liger's help
        for title, names in (("script flags", script_fields), (f"common {self.config_class.__name__} flags", common)):
            formatter.start_section(title)
            formatter.add_arguments([_first_name(a) for a in shown if a.dest in names])
            formatter.end_section()
        width = min(100, shutil.get_terminal_size().columns - 2)
        formatter.add_text(textwrap.fill(
            f"Flags take dashes too (--max-length). --help-all lists every flag: the {len(config_fields)} fields "
            f"of {self.config_class.__name__} as well.", width, break_on_hyphens=False, break_long_words=False,
        ))
        return formatter.format_help()


def _first_name(action: argparse.Action) -> argparse.Action:
    """A copy of ``action`` shown by its first option string only (``--max_length``, not ``--max-length`` too)."""
    shown = copy.copy(action)
    shown.option_strings = action.option_strings[:1]
    return shown


def _config_error(error: ValueError, argv: Sequence[str], config_class: type) -> FlagError:
    """A config's ``__post_init__`` refusal as a :class:`FlagError` that names the flags given which it mentions."""
    message = one_line(str(error))
    if message.startswith("--"):
        return FlagError(message)
    given = [name for name in argv_values(argv) if re.search(rf"(?<![\w-]){re.escape(name)}(?!\w)", message)]
    prefix = ", ".join(f"--{name}" for name in given) if given else config_class.__name__
    return FlagError(f"{prefix}: {message}")


def parse_script_and_config(
    script_class: type,
    config_class: type[TrainingArguments],
    *,
    name: str,
    embedded_defaults: dict[str, Any],
    config_defaults: dict[str, Any] | None = None,
    argv: Sequence[str] | None = None,
    description: str | None = None,
) -> tuple[Any, Any]:
    """Parse ``argv`` (default: the command line) into ``script_class`` and ``config_class`` instances.

    The output folder defaults to ``outputs/<name>``. Without ``--model_name_or_path``,
    ``config_defaults`` apply to every run; without ``--model_name_or_path``, ``EMBEDDED_DEFAULTS`` updated
    with ``embedded_defaults`` are laid over them (bf16 on a GPU that has it). Flags given on the command
    line always win.

    An unknown flag, a bad value or choice and transformers' Liger-Kernel switches exit as argparse does
    (one line, status 2; ``SystemExit(2)`` in-process); a combination the config class refuses raises
    :class:`preflight.FlagError` (a ``ValueError``). ``description`` heads ``--help``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ExampleArgumentParser(script_class, config_class, description=description)
    # HfArgumentParser spells the negation --no_use_liger and --no-use-liger; accept --no-use_liger too.
    parser.add_argument("--no-use_liger", action="store_false", dest="use_liger", help=argparse.SUPPRESS)
    defaults: dict[str, Any] = {"output_dir": str(Path("outputs") / name)}
    # Pinned host memory only helps copies to a GPU; without one, the DataLoader warns about it.
    defaults["dataloader_pin_memory"] = torch.cuda.is_available()
    defaults.update(config_defaults or {})
    if not _given(argv, "model_name_or_path"):  # the embedded run's own settings win over the script's
        defaults.update(EMBEDDED_DEFAULTS, **embedded_defaults)
        defaults["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    defaults = checkpointing_defaults(config_class, defaults, argv)
    parser.set_defaults(**defaults)
    try:
        script_args, config = parser.parse_args_into_dataclasses(args=argv)
    except FlagError:
        raise
    except ValueError as error:  # a __post_init__ refusing a combination (bf16 without a GPU, strategies, ...)
        raise _config_error(error, argv, config_class) from error
    return script_args, config


def _given(argv: Sequence[str], flag: str) -> bool:
    """Whether ``--flag`` (or ``--flag=...``) is on the command line ``argv``."""
    return any(arg == f"--{flag}" or arg.startswith(f"--{flag}=") for arg in argv)


def checkpointing_defaults(config_class: type, defaults: dict[str, Any], argv: Sequence[str]) -> dict[str, Any]:
    """``defaults`` with activation checkpointing under the name this transformers uses.

    transformers >= 5.2x names it ``activation_checkpointing`` and warns when ``gradient_checkpointing``
    is set (TRL's configs default the old name to True; our embedded defaults set it too). Where the
    new field exists, the default moves to it, so a run warns only when the user passes the old flag.
    """
    names = {f.name: f for f in dataclasses.fields(config_class)}
    defaults = dict(defaults)
    if "activation_checkpointing" not in names or _given(argv, "gradient_checkpointing"):
        return defaults
    old = names["gradient_checkpointing"]
    value = defaults.pop("gradient_checkpointing", old.default if old.default is not dataclasses.MISSING else None)
    defaults.setdefault("activation_checkpointing", value)
    defaults["gradient_checkpointing"] = None
    return defaults


def parse_args(
    algorithm: Algorithm, argv: Sequence[str] | None = None
) -> tuple[AlignmentScriptArguments, TrainingArguments]:
    """Parse ``argv`` into :class:`AlignmentScriptArguments` and the algorithm's config (``ORPOConfig``, ...).

    Without ``--output_dir`` and ``--model_name_or_path`` (the embedded demo), the default folder
    ``outputs/<name>`` is overwritten by a new run (said in one line), as re-running a demo should.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    description = (
        f"Align a causal LM with {algorithm.name.upper()} using liger-align's {algorithm.liger_trainer.__name__} "
        f"(TRL's {algorithm.trl_trainer.__name__} with --no-use_liger), configured by "
        f"{algorithm.config_class.__name__}. Without --model_name_or_path it trains the embedded tiny Llama 3.2 on "
        "the shipped preference data."
    )
    script_args, config = parse_script_and_config(
        AlignmentScriptArguments,
        algorithm.config_class,
        name=algorithm.name,
        embedded_defaults=algorithm.embedded_defaults,
        config_defaults=algorithm.config_defaults,
        argv=argv,
        description=description,
    )
    if not _given(argv, "output_dir") and not _given(argv, "model_name_or_path") and not _given(
        argv, "overwrite_output_dir"
    ):
        script_args.overwrite_output_dir = True
    return script_args, config
