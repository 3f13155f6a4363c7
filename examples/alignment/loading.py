"""Loading for the examples: data sets (local files, ``save_to_disk`` folders, hub ids), their checks and
the held-out split, and the model with its tokenizer (a checkpoint or the embedded tiny Llama 3.2).

What the user's flags name and cannot be used (a missing path, a malformed file, missing columns, a hub id
that does not load) raises :class:`preflight.FlagError`, which the alignment scripts print as one line.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import embedded
import torch
from cli import Algorithm, ScriptArguments
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from preflight import (
    DATA_FILE_TYPES,
    FlagError,
    FlagLoadError,
    FlagTypeError,
    check_dataset_path,
    check_model_path,
    looks_like_path,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

PAIRED_COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
__all__ = ["DATA_FILE_TYPES", "looks_like_path"]  # kept importable from here (they live in preflight.py)


def load_raw_dataset(name: str | None, config_name: str | None = None) -> Dataset | DatasetDict:
    """Load ``name``: ``None`` (the shipped data), a local file or ``save_to_disk`` folder, or a hub id.

    Raises :class:`preflight.FlagPathError` (a ``FileNotFoundError``) for a local-looking path that does
    not exist, :class:`preflight.FlagError` for an unsupported file type or a malformed JSON-lines file, and
    :class:`preflight.FlagLoadError` naming the data set when a hub id cannot be loaded (for instance offline).
    """
    if name is None:
        return embedded.load_preference_dataset()
    check_dataset_path(name)
    path = Path(name).expanduser()
    if path.is_file():
        file_type = DATA_FILE_TYPES[path.suffix.lower()]
        if path.suffix.lower() == ".jsonl":
            check_jsonl(path, name)
        return load_dataset(file_type, data_files=str(path), split="train")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return load_from_disk(str(path))
        return load_dataset(str(path), config_name)
    try:
        return load_dataset(name, config_name)
    except Exception as error:  # the hub raises many kinds of errors offline
        raise FlagLoadError(
            f"--dataset_name {name!r}: could not load it from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Offline, pass a local .jsonl/.json/.parquet file or a save_to_disk folder instead."
        ) from error


def check_jsonl(path: Path, name: str) -> None:
    """Raise :class:`preflight.FlagError` naming the line when a line of the JSON-lines file ``path`` is not a
    JSON object.

    (``datasets`` reports a malformed line without its number.) Blank lines are allowed.
    """
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FlagError(
                    f"--dataset_name {name!r}: line {number} is not valid JSON ({err.msg} at column {err.colno}): "
                    f"{line.strip()[:80]!r}"
                ) from None
            if not isinstance(row, dict):
                raise FlagError(
                    f"--dataset_name {name!r}: line {number} must be a JSON object (one row), got "
                    f"{type(row).__name__}: {line.strip()[:80]!r}"
                )


def check_columns(dataset: Dataset, required: Sequence[str], *, what: str) -> None:
    """Raise :class:`preflight.FlagError` naming the missing and the present columns unless ``dataset`` has
    ``required``."""
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise FlagError(f"{what} needs the columns {list(required)}; missing {missing}, found {dataset.column_names}")


def first_split(raw: Dataset | DatasetDict) -> Dataset:
    """``raw`` itself, or the first split of a ``DatasetDict`` (whose columns the checks read)."""
    return raw[next(iter(raw))] if isinstance(raw, DatasetDict) else raw


def split_dataset(raw: Dataset | DatasetDict, args: ScriptArguments, seed: int) -> tuple[Dataset, Dataset]:
    """Return (train, held-out): the named splits, or a seeded ``eval_size`` cut of the train split."""
    if isinstance(raw, DatasetDict):
        if args.dataset_train_split not in raw:
            raise FlagError(
                f"--dataset_train_split {args.dataset_train_split!r} not in the data set's splits {list(raw)}"
            )
        if args.dataset_test_split in raw:
            return raw[args.dataset_train_split], raw[args.dataset_test_split]
        raw = raw[args.dataset_train_split]
    size = args.eval_size if args.eval_size < 1 else int(args.eval_size)
    if len(raw) < 2:
        raise FlagError(f"--dataset_name: the data set has {len(raw)} row(s); at least 2 are needed to hold some out")
    parts = raw.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def prepare_datasets(algorithm: Algorithm, args: ScriptArguments, seed: int) -> tuple[Dataset, Dataset, Dataset | None]:
    """Load, check and split the data: (train, held-out for the trainer, held-out pairs or ``None``).

    Paired algorithms need ``prompt``/``chosen``/``rejected``. KTO takes ``prompt``/``completion``/
    ``label``, or paired data that it unpairs (then the held-out pairs also give a preference accuracy).
    """
    raw = load_raw_dataset(args.dataset_name, args.dataset_config)
    first = first_split(raw)
    what = f"--dataset_name {args.dataset_name or str(embedded.DATA_PATH)!r} for {algorithm.name.upper()}"
    paired_data = algorithm.paired or not set(UNPAIRED_COLUMNS) <= set(first.column_names)
    if paired_data:
        check_columns(first, PAIRED_COLUMNS, what=what if algorithm.paired else f"{what} (or {list(UNPAIRED_COLUMNS)})")
    # Value types row by row, numbered as in the file (the trainers check again after the split).
    from liger_align.trainers._inputs import check_dataset

    try:
        check_dataset(first, name="the data set", paired=paired_data, trainer=what)
    except TypeError as error:
        raise FlagTypeError(str(error)) from None
    except ValueError as error:
        raise FlagError(str(error)) from None
    if paired_data:
        train, held_out = split_dataset(raw, args, seed)
        if algorithm.paired:
            return train, held_out, held_out
        return embedded.to_unpaired(train), embedded.to_unpaired(held_out), held_out
    train, held_out = split_dataset(raw, args, seed)
    return train, held_out, None


def load_model_and_tokenizer(args: ScriptArguments, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``--model_name_or_path`` and its tokenizer, or the embedded tiny Llama 3.2 and local tokenizer.

    A missing local folder raises :class:`preflight.FlagPathError`, one that transformers cannot load (no
    model there, a hub id offline) :class:`preflight.FlagLoadError` (both ``OSError``).
    """
    if args.model_name_or_path is None:
        model, tokenizer, _ = embedded.build_embedded(seed=seed)
        return model, tokenizer
    check_model_path(args.model_name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=load_dtype(args))
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    except OSError as error:  # transformers' "not a valid model identifier", "couldn't connect", ...
        raise FlagLoadError(
            f"--model_name_or_path {args.model_name_or_path!r}: could not load it ({type(error).__name__}: {error})"
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_dtype(args: ScriptArguments) -> Any:
    """``--dtype`` as ``from_pretrained`` takes it: ``"auto"`` or a ``torch.dtype``."""
    return args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)


def reference_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy of ``model`` in eval mode: the reference of DPO/KTO for a model with no path to reload."""
    return copy.deepcopy(model).eval().requires_grad_(False)
