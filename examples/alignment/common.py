"""What the alignment examples share: arguments, data loading and checks, evaluation, the summary.

Each ``run_<algorithm>.py`` describes its algorithm with an :class:`Algorithm` and calls :func:`main`.
With no ``--model_name_or_path`` the embedded default is used (``embedded.py``: a tiny Llama 3.2
built from a config, a local tokenizer), and with no ``--dataset_name`` the shipped preference data.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import embedded
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)
from trl.data_utils import maybe_apply_chat_template

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
PAIRED_COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def add_repo_to_path() -> None:
    """Make ``liger_align`` importable from a repository checkout that is not pip-installed."""
    if (REPO_ROOT / "liger_align").is_dir() and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


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
            "Default: the preference data shipped in examples/alignment/data."
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


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in DATA_FILE_TYPES or name.count("/") > 1


def load_raw_dataset(name: str | None, config_name: str | None = None) -> Dataset | DatasetDict:
    """Load ``name``: ``None`` (the shipped data), a local file or ``save_to_disk`` folder, or a hub id.

    Raises ``FileNotFoundError`` for a local-looking path that does not exist, and ``RuntimeError``
    naming the data set when a hub id cannot be loaded (for instance offline).
    """
    if name is None:
        return embedded.load_preference_dataset()
    path = Path(name).expanduser()
    if path.is_file():
        file_type = DATA_FILE_TYPES.get(path.suffix.lower())
        if file_type is None:
            raise ValueError(
                f"--dataset_name {name!r}: unsupported file type {path.suffix!r}; use one of {sorted(DATA_FILE_TYPES)}"
            )
        if path.suffix.lower() == ".jsonl":
            check_jsonl(path, name)
        return load_dataset(file_type, data_files=str(path), split="train")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return load_from_disk(str(path))
        return load_dataset(str(path), config_name)
    if _looks_like_path(name):
        raise FileNotFoundError(f"--dataset_name {name!r}: no such file or folder ({path.resolve()})")
    try:
        return load_dataset(name, config_name)
    except Exception as error:  # the hub raises many kinds of errors offline
        raise RuntimeError(
            f"--dataset_name {name!r}: could not load it from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Offline, pass a local .jsonl/.json/.parquet file or a save_to_disk folder instead."
        ) from error


def check_jsonl(path: Path, name: str) -> None:
    """Raise ``ValueError`` naming the line when a line of the JSON-lines file ``path`` is not a JSON object.

    (``datasets`` reports a malformed line without its number.) Blank lines are allowed.
    """
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"--dataset_name {name!r}: line {number} is not valid JSON ({err.msg} at column {err.colno}): "
                    f"{line.strip()[:80]!r}"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"--dataset_name {name!r}: line {number} must be a JSON object (one row), got "
                    f"{type(row).__name__}: {line.strip()[:80]!r}"
                )


def check_columns(dataset: Dataset, required: Sequence[str], *, what: str) -> None:
    """Raise ``ValueError`` naming the missing and the present columns unless ``dataset`` has ``required``."""
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{what} needs the columns {list(required)}; missing {missing}, found {dataset.column_names}")


def split_dataset(raw: Dataset | DatasetDict, args: ScriptArguments, seed: int) -> tuple[Dataset, Dataset]:
    """Return (train, held-out): the named splits, or a seeded ``eval_size`` cut of the train split."""
    if isinstance(raw, DatasetDict):
        if args.dataset_train_split not in raw:
            raise ValueError(
                f"--dataset_train_split {args.dataset_train_split!r} not in the data set's splits {list(raw)}"
            )
        if args.dataset_test_split in raw:
            return raw[args.dataset_train_split], raw[args.dataset_test_split]
        raw = raw[args.dataset_train_split]
    size = args.eval_size if args.eval_size < 1 else int(args.eval_size)
    if len(raw) < 2:
        raise ValueError(f"the data set has {len(raw)} row(s); at least 2 are needed to hold some out")
    parts = raw.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def prepare_datasets(algorithm: Algorithm, args: ScriptArguments, seed: int) -> tuple[Dataset, Dataset, Dataset | None]:
    """Load, check and split the data: (train, held-out for the trainer, held-out pairs or ``None``).

    Paired algorithms need ``prompt``/``chosen``/``rejected``. KTO takes ``prompt``/``completion``/
    ``label``, or paired data that it unpairs (then the held-out pairs also give a preference accuracy).
    """
    raw = load_raw_dataset(args.dataset_name, args.dataset_config)
    first = raw[next(iter(raw))] if isinstance(raw, DatasetDict) else raw
    what = f"--dataset_name {args.dataset_name or str(embedded.DATA_PATH)!r} for {algorithm.name.upper()}"
    paired_data = algorithm.paired or not set(UNPAIRED_COLUMNS) <= set(first.column_names)
    if paired_data:
        check_columns(first, PAIRED_COLUMNS, what=what if algorithm.paired else f"{what} (or {list(UNPAIRED_COLUMNS)})")
    # Value types row by row, numbered as in the file (the trainers check again after the split).
    from liger_align.trainers._inputs import check_dataset

    check_dataset(first, name="the data set", paired=paired_data, trainer=what)
    if paired_data:
        train, held_out = split_dataset(raw, args, seed)
        if algorithm.paired:
            return train, held_out, held_out
        return embedded.to_unpaired(train), embedded.to_unpaired(held_out), held_out
    train, held_out = split_dataset(raw, args, seed)
    return train, held_out, None


def load_model_and_tokenizer(args: ScriptArguments, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``--model_name_or_path`` and its tokenizer, or the embedded tiny Llama 3.2 and local tokenizer."""
    if args.model_name_or_path is None:
        model, tokenizer, _ = embedded.build_embedded(seed=seed)
        return model, tokenizer
    if _looks_like_path(args.model_name_or_path) and not Path(args.model_name_or_path).expanduser().exists():
        raise FileNotFoundError(f"--model_name_or_path {args.model_name_or_path!r}: no such folder")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@torch.no_grad()
def preference_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    *,
    batch_size: int = 16,
    max_length: int = 512,
) -> float:
    """Fraction of ``pairs`` whose chosen completion gets the higher mean per-token log-prob under ``model``.

    Independent of any trainer: each completion is scored with its EOS token after the prompt (the
    way TRL's trainers train on it), truncated to ``max_length`` tokens. A tie counts as wrong.
    """
    texts: list[tuple[list[int], int]] = []  # (token ids, index where the completion starts)
    for row in pairs:
        row = maybe_apply_chat_template(dict(row), tokenizer)
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        for completion in (row["chosen"], row["rejected"]):
            ids = tokenizer(row["prompt"] + completion)["input_ids"] + [tokenizer.eos_token_id]
            start = next(
                (i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b),
                min(len(prompt_ids), len(ids) - 1),
            )
            texts.append((ids[:max_length], max(start, 1)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (ids, start) in enumerate(chunk):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            labels[j, start : len(ids)] = torch.tensor(ids[start:])
            attention[j, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        target = labels[:, 1:].to(device)
        logps = -torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), target.clamp(min=0), reduction="none"
        ) * (target != -100)
        counts = (target != -100).sum(-1).clamp(min=1)
        scores += (logps.sum(-1) / counts).tolist()
    model.train(was_training)
    wins = [chosen > rejected for chosen, rejected in zip(scores[0::2], scores[1::2], strict=True)]
    return sum(wins) / max(len(wins), 1)


def peak_memory() -> tuple[float, str]:
    """Peak memory in MiB and what was measured: CUDA ``max_memory_allocated`` or the process max RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def _metrics(
    trainer: Any, pairs: Dataset | None, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, float]:
    metrics = {k: float(v) for k, v in trainer.evaluate().items() if k.startswith("eval_rewards/")}
    if pairs is not None and trainer.args.world_size == 1:
        metrics["preference_accuracy"] = preference_accuracy(
            trainer.model, tokenizer, pairs, batch_size=trainer.args.per_device_eval_batch_size, max_length=max_length
        )
    return metrics


def step_meter(args: ScriptArguments, config: TrainingArguments) -> Any:
    """A ``StepMeterCallback`` (synchronised step time, non-padding tokens/s, peak memory) writing
    one JSON line per step to ``<output_dir>/steps.jsonl``."""
    from liger_align.utils import StepMeterCallback

    if args.meter_warmup_steps < 0:
        raise ValueError(f"--meter_warmup_steps must be >= 0, got {args.meter_warmup_steps}")
    return StepMeterCallback(warmup_steps=args.meter_warmup_steps, jsonl_path=Path(config.output_dir) / "steps.jsonl")


def print_meter(meter: dict[str, Any]) -> None:
    """One line of the StepMeter's summary (see ``liger_align.utils.StepMeter.summary``)."""
    if not meter["steps_measured"]:
        print(f"step meter   no step measured after {meter['warmup_steps']} warm-up step(s) (--meter_warmup_steps)")
        return
    kind = "process peak RSS" if meter["memory_kind"] == "cpu_rss" else f"{meter['memory_kind']} allocated/reserved"
    print(
        f"step meter   {meter['steps_measured']} steps after {meter['warmup_steps']} warm-up: "
        f"median {meter['median_step_s']:.3f} s/step, {meter['tokens_per_s']:.0f} tokens/s "
        f"(all ranks {meter['global_tokens_per_s']:.0f}), peak {meter['peak_allocated_mib']:.0f}/"
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
    print(f"saved model and tokenizer to {summary['output_dir']}")


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


def check_output_dir(config: TrainingArguments, *, overwrite: bool) -> str | None:
    """Follow the Trainer's convention for ``--output_dir``; return the checkpoint to resume from (or None).

    - ``--resume_from_checkpoint PATH`` resumes from that folder; ``--resume_from_checkpoint last``
      (or ``true``) from the newest ``checkpoint-*`` in ``--output_dir``; either must exist.
    - Otherwise a non-empty ``--output_dir`` is refused (naming the checkpoints it holds) unless
      ``--overwrite_output_dir``.
    """
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(config.output_dir)
    resume = config.resume_from_checkpoint
    if resume:
        if str(resume).lower() in ("last", "true"):
            last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
            if last is None:
                raise ValueError(
                    f"--resume_from_checkpoint {resume}: no checkpoint-* folder in --output_dir {str(output_dir)!r}"
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
        if checkpoints else "pass "
    )
    raise ValueError(
        f"--output_dir {str(output_dir)!r} is not empty ({held}): {hint}--overwrite_output_dir to train into it "
        "anyway, or choose another --output_dir"
    )


def main(algorithm: Algorithm, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, load everything (checking it first), train, save, print and return the summary.

    The summary is also written to ``<output_dir>/run_summary.json``.
    """
    script_args, config = parse_args(algorithm, argv)
    check_flags(script_args, config)
    resume = check_output_dir(config, overwrite=script_args.overwrite_output_dir)
    train, held_out, pairs = prepare_datasets(algorithm, script_args, config.seed)
    model, tokenizer = load_model_and_tokenizer(script_args, config.seed)

    trainer_class = algorithm.liger_trainer if script_args.use_liger else algorithm.trl_trainer
    kwargs: dict[str, Any] = {}
    if algorithm.reference_model and script_args.model_name_or_path is None:
        kwargs["ref_model"] = copy.deepcopy(model).eval().requires_grad_(False)
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
        start = _metrics(trainer, pairs, tokenizer, max_length)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - began
        memory, memory_kind = peak_memory()
        end = _metrics(trainer, pairs, tokenizer, max_length)

        trainer.save_model(config.output_dir)
        summary = {
            "algorithm": algorithm.name,
            "trainer": type(trainer).__name__,
            "model": script_args.model_name_or_path or "embedded tiny Llama 3.2",
            "device": str(trainer.args.device),
            "steps": trainer.state.global_step,
            "train_seconds": seconds,
            "peak_memory_mib": memory,
            "peak_memory_kind": memory_kind,
            "meter": meter.summary(),
            "eval_rows": len(held_out),
            "start": start,
            "end": end,
            "output_dir": config.output_dir,
        }
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(config.output_dir)
            (Path(config.output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print_summary(summary)
        return summary
