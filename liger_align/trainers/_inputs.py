"""Checks of a trainer's config and data sets, run before TRL tokenises anything.

Without them a missing ``rejected`` column surfaces as a ``KeyError`` inside ``datasets``, a ``None``
completion as an ``AttributeError`` in the tokenizer, and ``max_length=0`` trains on nothing. Each
check raises ``ValueError``/``TypeError`` naming the data set, the row, the column and the expected
type, or the config field, its expected range and the value received.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from .._checks import check_count, check_non_negative, check_positive, check_real

PAIRED = ("chosen", "rejected")
UNPAIRED = ("completion", "label")
#: Columns of data sets that are already tokenised (TRL's own preprocessed formats): not checked here.
TOKENISED = ("prompt_ids", "prompt_input_ids", "chosen_ids", "chosen_input_ids", "completion_ids", "input_ids")
_TEXT = "a string or a list of chat messages (dicts with 'role' and 'content')"


def bound_arguments(trainer_cls: type, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of TRL's ``trainer_cls.__init__`` by name (positional ones included)."""
    signature = inspect.signature(trainer_cls.__init__)
    try:
        return dict(signature.bind_partial(None, *args, **kwargs).arguments)
    except TypeError:  # let TRL's own constructor report a wrong call
        return dict(kwargs)


# ----------------------------------------------------------------------------------------------- config


def check_config(config: Any, *, trainer: str, beta_may_be_zero: bool = False) -> None:
    """Lengths (``max_length``, ``max_prompt_length``, ``max_completion_length``: None or ``>= 1``),
    ``beta`` (``> 0``; ``>= 0`` for ORPO, whose ``beta`` weighs the odds-ratio term), ``label_smoothing``
    in ``[0, 1]``, ``loss_weights`` and KTO's ``desirable_weight``/``undesirable_weight`` finite ``>= 0``."""
    if config is None:
        return
    for field in ("max_length", "max_prompt_length", "max_completion_length"):
        value = getattr(config, field, None)
        if value is not None:
            _named(trainer, field, lambda v, f=field: check_count(f, v), value)
    if hasattr(config, "beta"):
        check = check_non_negative if beta_may_be_zero else check_positive
        _named(trainer, "beta", lambda v: check("beta", v), config.beta)
    if hasattr(config, "label_smoothing"):
        _named(trainer, "label_smoothing",
               lambda v: check_real("label_smoothing", v, low=0.0, high=1.0), config.label_smoothing)
    weights = getattr(config, "loss_weights", None)
    if weights is not None:
        for i, weight in enumerate(weights):
            _named(trainer, f"loss_weights[{i}]", lambda v, i=i: check_non_negative(f"loss_weights[{i}]", v), weight)
    for field in ("desirable_weight", "undesirable_weight"):
        if hasattr(config, field):
            _named(trainer, field, lambda v, f=field: check_non_negative(f, v), getattr(config, field))


def _named(trainer: str, field: str, check: Any, value: Any) -> None:
    try:
        check(value)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{trainer}: config {err}") from None


# ----------------------------------------------------------------------------------------------- datasets


def check_datasets(train_dataset: Any, eval_dataset: Any, *, paired: bool, trainer: str) -> None:
    """Check the columns and value types of the training and evaluation sets (a dict of sets too).

    Paired (ORPO, CPO, DPO): ``chosen`` and ``rejected`` (``prompt`` optional: TRL extracts an implicit
    one), each a string or a list of chat messages. KTO: ``prompt``, ``completion`` and a boolean
    ``label``, or paired data (TRL unpairs it). Already tokenised data sets are left to TRL.
    """
    sets: list[tuple[str, Any]] = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, Mapping):
        sets += [(f"eval_dataset[{key!r}]", ds) for key, ds in eval_dataset.items()]
    else:
        sets.append(("eval_dataset", eval_dataset))
    for name, dataset in sets:
        if dataset is not None:
            check_dataset(dataset, name=name, paired=paired, trainer=trainer)


def _columns(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is None and getattr(dataset, "features", None) is not None:
        names = list(dataset.features)
    return None if names is None else list(names)


def _rows(dataset: Any, columns: list[str]) -> Iterable[tuple[int, dict[str, Any]]]:
    """``(index, row)`` over the ``columns`` of every row of a ``Dataset`` (batched reads), or of the
    first row of an iterable data set (reading further would consume a stream)."""
    if hasattr(dataset, "select_columns") and hasattr(dataset, "__len__") and hasattr(dataset, "iter"):
        index = 0
        for batch in dataset.select_columns(columns).iter(batch_size=1024):
            for i in range(len(batch[columns[0]])):
                yield index, {c: batch[c][i] for c in columns}
                index += 1
        return
    first = next(iter(dataset), None)
    if first is not None:
        yield 0, first


def check_dataset(dataset: Any, *, name: str, paired: bool, trainer: str) -> None:
    """Columns and value types of one data set; see :func:`check_datasets`."""
    columns = _columns(dataset)
    if columns is None:  # a torch Dataset or another custom object: TRL decides
        return
    if any(c in columns for c in TOKENISED) and not any(c in columns for c in PAIRED + ("completion",)):
        return
    has_pairs = all(c in columns for c in PAIRED)
    if paired or (has_pairs and "completion" not in columns):
        required, label = PAIRED, False
        wanted = "'chosen' and 'rejected' (and optionally 'prompt')"
    else:
        required, label = ("prompt",) + UNPAIRED, True
        wanted = "'prompt', 'completion' and 'label' (or paired 'chosen'/'rejected', which it unpairs)"
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"{trainer}: {name} has no column {missing[0]!r}: it needs {wanted}; its columns are {columns}"
        )
    text_columns = [c for c in ("prompt",) + required if c in columns and c != "label"]
    text_columns = list(dict.fromkeys(text_columns))
    read = text_columns + (["label"] if label else [])
    for index, row in _rows(dataset, read):
        kinds = {}
        for column in text_columns:
            kinds[column] = _text_kind(row[column], trainer=trainer, where=f"{name} row {index}, column {column!r}")
        if len(set(kinds.values())) > 1:
            spelled = ", ".join(f"{c!r} is {k}" for c, k in kinds.items())
            raise ValueError(
                f"{trainer}: {name} row {index}: {spelled}; use one format per row (all strings, or all lists of "
                "chat messages)"
            )
        if label:
            value = row["label"]
            if not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
                raise TypeError(
                    f"{trainer}: {name} row {index}, column 'label': expected a bool (True for a desirable "
                    f"completion), got {type(value).__name__} {value!r}"
                )


def _text_kind(value: Any, *, trainer: str, where: str) -> str:
    """``"a string"`` or ``"a list of messages"``; ``TypeError`` naming ``where`` otherwise."""
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        for i, message in enumerate(value):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise TypeError(
                    f"{trainer}: {where}: expected {_TEXT}; message {i} is {type(message).__name__} "
                    f"{_short(message)}"
                )
            if message["content"] is None:
                raise TypeError(f"{trainer}: {where}: expected {_TEXT}; message {i} has content None")
        return "a list of messages"
    raise TypeError(f"{trainer}: {where}: expected {_TEXT}, got {type(value).__name__} {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
