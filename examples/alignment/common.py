"""The alignment examples' main: parse, check, load, train, report. Each piece lives in its own module.

Each ``run_<algorithm>.py`` describes its algorithm with an :class:`Algorithm` and calls :func:`main`.
With no ``--model_name_or_path`` the embedded default is used (``embedded.py``: a tiny Llama 3.2
built from a config, a local tokenizer), and with no ``--dataset_name`` the shipped preference data.

- ``cli.py``: the script arguments, :class:`Algorithm`, the embedded run's defaults, parsing, ``--help``;
- ``preflight.py``: flag values and the output folder, checked before anything is loaded (those that need
  no torch or transformers before these are imported), and :class:`preflight.FlagError`;
- ``loading.py``: data sets (load, check, split) and the model with its tokenizer;
- ``evaluation.py``: the held-out preference accuracy, independent of the trainers;
- ``reporting.py``: the StepMeter, peak memory, the timed training, the printed and written summary.
- ``vocabulary_check.py``: a warning when the embedded tokenizer reads user data as ``<unk>``.

A flag error (a bad value, an unknown flag, a missing path, data that do not fit) is one line
``<prog>: error: <message>`` on stderr with exit status 2 from the command line, as argparse does; the
flags that need no torch or transformers are checked when this module is imported by a ``run_*.py``
script, before the heavy imports (:func:`preflight.check_command_line_early`).

The other examples (SFT, Medusa, Qwen2-VL) put this folder on ``sys.path`` and use the same modules.
Importing this module also quietens notices that do not concern the user (below).
"""

from __future__ import annotations

import preflight

# A run_*.py script of this folder imports this module first: its flags are checked before torch loads.
preflight.check_command_line_early()

import contextlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import embedded  # noqa: E402
import torch  # noqa: E402
from cli import Algorithm, ScriptArguments, parse_args, parse_script_and_config  # noqa: E402
from evaluation import held_out_metrics  # noqa: E402
from loading import (  # noqa: E402
    check_columns,
    load_model_and_tokenizer,
    load_raw_dataset,
    prepare_datasets,
    reference_copy,
    split_dataset,
)
from preflight import FlagError, FlagTypeError, check_flags, check_output_dir, exit_on_flag_error  # noqa: E402
from reporting import finish_run, step_meter, train_measured  # noqa: E402
from vocabulary_check import warn_unknown_words  # noqa: E402

# What the other examples and the tests use through this module (``common.<name>``), beside main.
__all__ = [
    "Algorithm", "FlagError", "ScriptArguments", "add_repo_to_path", "check_columns", "embedded", "finish_run",
    "load_model_and_tokenizer", "load_raw_dataset", "main", "parse_args", "parse_script_and_config",
    "split_dataset", "step_meter", "train_measured",
]

# A clean run prints only what the user needs. The Liger trainers build on TRL's experimental ORPO/CPO,
# whose import notice concerns this repository (it pins the TRL range), not the user.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
if not torch.cuda.is_available():
    # DeepSpeed (imported by accelerate) otherwise warns that it "could not detect" a GPU on every CPU run.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# TRL's trainers read transformers' deprecated `is_gradient_checkpointing` and call the deprecated
# `gradient_checkpointing_enable/disable` on every reference pass (transformers >= 5.2x): not the user's doing.
for _name in ("is_gradient_checkpointing", "gradient_checkpointing_enable", "gradient_checkpointing_disable"):
    warnings.filterwarnings("ignore", message=f"`{_name}` is deprecated", category=FutureWarning)

REPO_ROOT = Path(__file__).resolve().parents[2]


def add_repo_to_path() -> None:
    """Make ``liger_align`` importable from a repository checkout that is not pip-installed."""
    if (REPO_ROOT / "liger_align").is_dir() and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def check_trainer_config(algorithm: Algorithm, config: Any) -> None:
    """The check of the config that ``algorithm.liger_trainer`` runs when it is built (lengths, ``beta``,
    ``label_smoothing``, loss weights, ...), run before anything is loaded: raises :class:`FlagError`."""
    from liger_align.trainers._inputs import check_config

    try:
        check_config(config, trainer=algorithm.liger_trainer.__name__, beta_may_be_zero=algorithm.beta_may_be_zero)
    except TypeError as error:
        raise FlagTypeError(str(error)) from None
    except ValueError as error:
        raise FlagError(str(error)) from None


def main(algorithm: Algorithm, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, load everything (checking it first), train, save, print and return the summary.

    The summary is also written to ``<output_dir>/run_summary.json``. A flag error before training
    (:class:`preflight.FlagError`: a value, a combination, the output folder, the data or model a flag names)
    is raised to an in-process caller (``argv`` given); from the command line (``argv=None``) it is one line
    ``<prog>: error: <message>`` on stderr and exit status 2. Errors argparse reports (an unknown flag, a
    value of the wrong type) exit with status 2 either way, as argparse does.
    """
    from_command_line = argv is None
    with exit_on_flag_error() if from_command_line else contextlib.nullcontext():
        script_args, config = parse_args(algorithm, argv)
        check_flags(script_args, config)
        if script_args.use_liger:
            check_trainer_config(algorithm, config)
        resume = check_output_dir(config, overwrite=script_args.overwrite_output_dir)
        train, held_out, pairs = prepare_datasets(algorithm, script_args, config.seed)
        model, tokenizer = load_model_and_tokenizer(script_args, config.seed)
    warn_unknown_words(train, tokenizer, script_args)

    trainer_class = algorithm.liger_trainer if script_args.use_liger else algorithm.trl_trainer
    kwargs: dict[str, Any] = {}
    if algorithm.reference_model and script_args.model_name_or_path is None:
        kwargs["ref_model"] = reference_copy(model)
    meter = step_meter(script_args, config)
    trainer = trainer_class(
        model=model, args=config, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer,
        callbacks=[meter], **kwargs,
    )
    # The model patches are undone at the end (the model is saved by then), so that a caller running
    # main() in-process (tests, notebooks) finds transformers' modules as they were.
    with contextlib.ExitStack() as cleanup:
        if hasattr(trainer, "revert_liger_kernel_patches"):
            cleanup.callback(trainer.revert_liger_kernel_patches)
        max_length = config.max_length or 512
        measured = train_measured(
            trainer, lambda: held_out_metrics(trainer, pairs, tokenizer, max_length), resume=resume
        )
        described = {
            "algorithm": algorithm.name,
            "trainer": type(trainer).__name__,
            "model": script_args.model_name_or_path or "embedded tiny Llama 3.2",
            "device": str(trainer.args.device),
        }
        return finish_run(trainer, described, measured, meter=meter, eval_rows=len(held_out), save_with=tokenizer)
