"""Command line of the examples: the script arguments, the embedded run's defaults, parsing.

``parse_script_and_config`` serves every example built on a Hugging Face ``TrainingArguments``
subclass (alignment, SFT, Medusa, Qwen2-VL); ``parse_args`` adds what the alignment scripts do
with their output folder. Checks of the parsed values are in ``preflight.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
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
        metadata={"help": "Use liger_align (trainer or model patch); --no-use_liger runs plain TRL/transformers."},
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
    tune the embedded run; ``config_defaults`` apply to every run (flags still override both).
    ``reference_model``: the trainer takes a ``ref_model`` (DPO, KTO); TRL loads it from the model's
    path, so the embedded model, which has none, gets a frozen copy of itself.
    """

    name: str
    config_class: type[TrainingArguments]
    trl_trainer: type
    liger_trainer: type
    paired: bool = True
    reference_model: bool = False
    embedded_defaults: dict[str, Any] = field(default_factory=dict)
    config_defaults: dict[str, Any] = field(default_factory=dict)


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


def parse_script_and_config(
    script_class: type,
    config_class: type[TrainingArguments],
    *,
    name: str,
    embedded_defaults: dict[str, Any],
    config_defaults: dict[str, Any] | None = None,
    argv: Sequence[str] | None = None,
) -> tuple[Any, Any]:
    """Parse ``argv`` (default: the command line) into ``script_class`` and ``config_class`` instances.

    The output folder defaults to ``outputs/<name>``. Without ``--model_name_or_path``,
    ``EMBEDDED_DEFAULTS`` updated with ``embedded_defaults`` are the defaults (bf16 on a GPU that has
    it); ``config_defaults`` apply to every run. Flags given on the command line always win.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((script_class, config_class))
    # HfArgumentParser spells the negation --no_use_liger and --no-use-liger; accept --no-use_liger too.
    parser.add_argument("--no-use_liger", action="store_false", dest="use_liger", help=argparse.SUPPRESS)
    defaults: dict[str, Any] = {"output_dir": str(Path("outputs") / name)}
    # Pinned host memory only helps copies to a GPU; without one, the DataLoader warns about it.
    defaults["dataloader_pin_memory"] = torch.cuda.is_available()
    if not _given(argv, "model_name_or_path"):
        defaults.update(EMBEDDED_DEFAULTS, **embedded_defaults)
        defaults["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    defaults.update(config_defaults or {})
    defaults = checkpointing_defaults(config_class, defaults, argv)
    parser.set_defaults(**defaults)
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
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
    script_args, config = parse_script_and_config(
        AlignmentScriptArguments,
        algorithm.config_class,
        name=algorithm.name,
        embedded_defaults=algorithm.embedded_defaults,
        config_defaults=algorithm.config_defaults,
        argv=argv,
    )
    if not _given(argv, "output_dir") and not _given(argv, "model_name_or_path") and not _given(
        argv, "overwrite_output_dir"
    ):
        script_args.overwrite_output_dir = True
    return script_args, config
