"""The preference data shipped with the package (``data/preferences.jsonl``) and its unpaired (KTO) view.

480 rows ``{"prompt", "chosen", "rejected"}`` of four small task families a tiny model learns in minutes on a
CPU (sums, opposites, the larger number, repeating words); ``examples/alignment/make_dataset.py`` writes
the file and proves it deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

DATA_PATH = Path(__file__).resolve().parent / "data" / "preferences.jsonl"
PAIRED_COLUMNS = ("prompt", "chosen", "rejected")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file into a list of dicts (blank lines are skipped)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_preference_dataset(path: str | Path = DATA_PATH) -> Dataset:
    """The shipped preference data as a ``Dataset`` with string columns ``prompt``, ``chosen``, ``rejected``.

    Rows are in file order; split them with ``Dataset.train_test_split`` for a held-out set.
    """
    from datasets import Dataset

    rows = read_jsonl(path)
    return Dataset.from_dict({key: [row[key] for row in rows] for key in PAIRED_COLUMNS})


def to_unpaired(dataset: Dataset) -> Dataset:
    """The unpaired (KTO) view of a paired data set: columns ``prompt``, ``completion``, ``label``.

    Each pair gives two rows, ``(prompt, chosen, True)`` then ``(prompt, rejected, False)``.
    """

    def unpair(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": [], "completion": [], "label": []}
        for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=True):
            out["prompt"] += [prompt, prompt]
            out["completion"] += [chosen, rejected]
            out["label"] += [True, False]
        return out

    return dataset.map(unpair, batched=True, remove_columns=dataset.column_names)


def load_unpaired_dataset(path: str | Path = DATA_PATH) -> Dataset:
    """The shipped data in the unpaired KTO format (``prompt``, ``completion``, ``label``)."""
    return to_unpaired(load_preference_dataset(path))


def corpus(path: str | Path = DATA_PATH) -> Iterator[str]:
    """Every text of the data at ``path``: each row's prompt, chosen and rejected answer, in file order."""
    for row in read_jsonl(path):
        yield from (row["prompt"], row["chosen"], row["rejected"])
