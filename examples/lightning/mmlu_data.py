"""Multiple-choice data in MMLU's schema for the Lightning example: loading, checks, prompt, labels, batches.

A row is ``{"question": str, "choices": [str, ...], "answer": int}`` with ``answer`` the **0-based**
index of the right choice (MMLU's own convention: ``answer == 0`` is the first choice, printed "A").
The prompt is the question, one line per choice labelled ``A.``, ``B.``, ... and ``Answer:``::

    What kind of thing is violin ?
    A. country
    B. planet
    C. metal
    D. instrument
    Answer:

and the target is `` D`` then EOS: the letter that names ``choices[answer]``. Only those target
tokens carry a label; the prompt and the padding are ``-100`` (the loss and the fused head skip them).

Nothing here imports lightning except :class:`MMLUDataModule` (imported on first use), so the data
checks also work in a process that never trains.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import random
import string
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
LETTERS = string.ascii_uppercase
COLUMNS = ("question", "choices", "answer")
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
SCHEMA_HELP = (
    "an MMLU-format file has the columns 'question' (text), 'choices' (a list of 2 to 26 texts) and "
    "'answer' (the 0-based index of the right choice)"
)


# ------------------------------------------------------------------------------------------- prompt


def format_prompt(question: str, choices: Sequence[str]) -> str:
    """The question, the choices labelled ``A.``, ``B.``, ... (``choices[k]`` gets ``LETTERS[k]``), ``Answer:``."""
    lines = [question.strip(), *(f"{LETTERS[k]}. {str(c).strip()}" for k, c in enumerate(choices)), "Answer:"]
    return "\n".join(lines)


def answer_letter(answer: int) -> str:
    """The letter printed before ``choices[answer]`` (0-based: 0 -> "A")."""
    return LETTERS[answer]


def letter_token_ids(tokenizer: Any, num_letters: int) -> list[int]:
    """The first token of `` A``, `` B``, ... (the target of each letter), for the first ``num_letters`` letters."""
    ids = []
    for letter in LETTERS[:num_letters]:
        pieces = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ValueError(f"tokenizer: ' {letter}' encodes to no token")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"tokenizer: the answer letters {list(LETTERS[:num_letters])} do not map to distinct tokens")
    return ids


# ------------------------------------------------------------------------------------------- checks


def _as_choices(value: Any, where: str) -> list[str]:
    if isinstance(value, str):  # CSV cells hold the list as text
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}: 'choices' must be a list of texts, got the text {value[:80]!r}") from None
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, (str, int, float)) for c in value):
        raise ValueError(f"{where}: 'choices' must be a list of texts, got {type(value).__name__}")
    if not 2 <= len(value) <= len(LETTERS):
        raise ValueError(f"{where}: 'choices' must hold 2 to {len(LETTERS)} choices, got {len(value)}")
    return [str(c) for c in value]


def _as_answer(value: Any, num_choices: int, where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    elif hasattr(value, "item") and not isinstance(value, (list, tuple)):  # numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{where}: 'answer' must be the 0-based index of the right choice (an integer 0..{num_choices - 1}), "
            f"got {value!r}; convert answer letters with 'ABCD'.index(letter)"
        )
    if not 0 <= value < num_choices:
        raise ValueError(
            f"{where}: 'answer' = {value} is out of range for {num_choices} choices: it must be the 0-based index "
            f"of the right choice (0..{num_choices - 1}); if the file counts from 1, subtract 1 from every answer"
        )
    return value


def check_rows(rows: Sequence[Any], source: str) -> list[dict[str, Any]]:
    """Check and normalise MMLU-format rows; a bad row raises ``ValueError`` naming ``source``, the row and the fix.

    Returns ``[{"question": str, "choices": [str, ...], "answer": int}, ...]`` (other columns dropped).
    """
    if not rows:
        raise ValueError(f"{source}: no rows; {SCHEMA_HELP}")
    out = []
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a record with columns {list(COLUMNS)}, got {type(row).__name__}")
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise ValueError(
                f"{where}: missing column(s) {missing} (found {sorted(row)}); {SCHEMA_HELP}. Rename the columns "
                "of your file to these names"
            )
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise ValueError(f"{where}: 'question' must be a non-empty text, got {row['question']!r}")
        choices = _as_choices(row["choices"], where)
        out.append({"question": row["question"], "choices": choices,
                    "answer": _as_answer(row["answer"], len(choices), where)})
    return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a local MMLU-format ``.jsonl``/``.json``/``.csv``/``.parquet`` file (see :func:`check_rows`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"--data {str(path)!r}: no such file; pass a local {'/'.join(FILE_TYPES)} file ({SCHEMA_HELP})"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or suffix == ".json":
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise ValueError(f"--data {str(path)!r}: not JSON lines ({err})") from None
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"--data {str(path)!r}: reading parquet needs pyarrow (pip install pyarrow)") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"--data {str(path)!r}: unsupported file type {suffix!r}; use one of {list(FILE_TYPES)}")
    return check_rows(rows, f"--data {str(path)!r}")


def split_rows(rows: list[dict], eval_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random split: ``eval_size`` rows (a fraction if < 1) held out; returns ``(train, held_out)``."""
    n_eval = int(round(eval_size * len(rows))) if eval_size < 1 else int(eval_size)
    if not 0 <= n_eval < len(rows):
        raise ValueError(f"--eval_size {eval_size}: must hold out fewer than the {len(rows)} rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


# ------------------------------------------------------------------------------------------- embedded

# Each topic: four categories (always offered in this order) and eight words of each.
_TOPICS: dict[tuple[str, ...], tuple[tuple[str, ...], ...]] = {
    ("fruit", "animal", "color", "tool"): (
        ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"),
        ("cat", "dog", "horse", "tiger", "lion", "rabbit", "sheep", "mouse"),
        ("red", "blue", "green", "yellow", "purple", "brown", "white", "black"),
        ("hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "pliers"),
    ),
    ("country", "planet", "metal", "instrument"): (
        ("france", "japan", "brazil", "kenya", "canada", "india", "egypt", "peru"),
        ("mars", "venus", "jupiter", "saturn", "neptune", "uranus", "earth", "pluto"),
        ("iron", "copper", "silver", "gold", "zinc", "nickel", "tin", "lead"),
        ("piano", "violin", "guitar", "drum", "flute", "trumpet", "harp", "cello"),
    ),
}
_TEMPLATES = (
    "Which category does {} belong to ?",
    "{} is an example of which of these ?",
    "What kind of thing is {} ?",
)


def embedded_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A small learnable multiple-choice set in MMLU's schema: ``(train, held_out)``, the same on every call.

    Every (word, phrasing) pair of 64 words and 3 phrasings is one question "which category is this
    word", whose choices are its topic's four categories in a fixed order, so the answer is a function
    of the word (a lookup a tiny model learns in a few hundred steps; answers are spread evenly over
    A-D). Held out: one phrasing of each word, chosen by a seeded draw (64 rows; 128 train), so every
    held-out word is seen in training, phrased the two other ways.
    """
    rng = random.Random(1234)
    train, held_out = [], []
    for categories, words_by_category in _TOPICS.items():
        for answer, words in enumerate(words_by_category):
            for word in words:
                out = rng.randrange(len(_TEMPLATES))
                for t, template in enumerate(_TEMPLATES):
                    row = {"question": template.format(word), "choices": list(categories), "answer": answer}
                    (held_out if t == out else train).append(row)
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def embedded_texts(rows: Sequence[dict[str, Any]]) -> Iterator[str]:
    """The texts a local tokenizer for ``rows`` is trained on: every prompt and every answer letter."""
    for row in rows:
        yield format_prompt(row["question"], row["choices"])
    yield " ".join(LETTERS)


# ------------------------------------------------------------------------------------------- encoding


def encode_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Any, *, max_length: int, letter_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """Tokenize ``rows``: ``input_ids`` = prompt + answer letter + EOS; ``labels`` -100 except the last two parts.

    Each example also holds ``answer_pos`` (the position whose next-token distribution is the answer's,
    i.e. the last prompt token), ``answer`` and ``num_choices`` for the accuracy. A prompt too long for
    ``max_length`` loses tokens from its start (after BOS), so the choices and ``Answer:`` stay.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer: has no eos_token_id; the target is the answer letter followed by EOS")
    bos = tokenizer.bos_token_id
    prompts = tokenizer([format_prompt(r["question"], r["choices"]) for r in rows])["input_ids"]
    examples, cut = [], 0
    for row, prompt in zip(rows, prompts, strict=True):
        target = tokenizer(" " + answer_letter(row["answer"]), add_special_tokens=False)["input_ids"] + [eos]
        if target[0] != letter_ids[row["answer"]]:
            raise ValueError("tokenizer: the answer letter encodes differently alone and in the letter table")
        room = max_length - len(target)
        if room < 2:
            raise ValueError(f"--max_length {max_length}: too short for a prompt and the {len(target)} target tokens")
        if len(prompt) > room:
            cut += 1
            keep_first = 1 if bos is not None and prompt[0] == bos else 0
            prompt = prompt[:keep_first] + prompt[len(prompt) - (room - keep_first):]
        examples.append({
            "input_ids": prompt + target,
            "labels": [IGNORE_INDEX] * len(prompt) + target,
            "answer_pos": len(prompt) - 1,
            "answer": row["answer"],
            "num_choices": len(row["choices"]),
        })
    if cut:
        warnings.warn(f"{cut} of {len(rows)} prompts were longer than --max_length {max_length} and lost their "
                      "first tokens", stacklevel=2)
    return examples


class MMLUCollator:
    """Right-pad encoded examples into a batch of ``(B, T)`` tensors.

    Returns ``input_ids`` (pad: ``pad_token_id``), ``attention_mask`` (1 on real tokens), ``labels``
    (-100 on padding), and ``answer_pos``, ``answer``, ``num_choices`` of shape ``(B,)``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for b, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[b, :n] = torch.tensor(e["input_ids"])
            labels[b, :n] = torch.tensor(e["labels"])
            mask[b, :n] = 1
        extra = {k: torch.tensor([e[k] for e in examples], dtype=torch.long) for k in ("answer_pos", "answer",
                                                                                       "num_choices")}
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, **extra}


# ------------------------------------------------------------------------------------------- batches


class GlobalBatchSampler(torch.utils.data.Sampler[int]):
    """This rank's indices, so that ``world_size`` ranks at ``batch_size`` see one process's batches of ``B * world``.

    Epoch ``e`` draws one permutation of ``range(n)`` from ``seed + e``; global batch ``g`` is
    ``perm[g*G:(g+1)*G]`` (``G = batch_size * world_size``, an incomplete last one dropped) and rank
    ``r`` takes its ``r``-th slice of ``batch_size``. Use with ``DataLoader(batch_size=batch_size)``.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise ValueError(f"the training data has {n} rows, fewer than one global batch of {self.global_batch} "
                             f"(--batch_size {batch_size} x {world_size} devices); lower --batch_size or add rows")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n // self.global_batch) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        for g in range(self.n // self.global_batch):
            start = g * self.global_batch + self.rank * self.batch_size
            yield from order[start:start + self.batch_size]


def steps_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps in one pass over ``n`` rows at ``batch_size`` per device (incomplete batch dropped)."""
    return n // (batch_size * world_size)


def make_datamodule(
    train: list[dict[str, Any]], held_out: list[dict[str, Any]], *, batch_size: int, eval_batch_size: int,
    pad_token_id: int, seed: int,
) -> Any:
    """A ``LightningDataModule`` over encoded examples (see :class:`MMLUCollator`, :class:`GlobalBatchSampler`).

    Held-out examples are split over ranks as ``held_out[rank::world_size]`` (nothing repeated, so the
    metrics summed over ranks are exact).
    """
    import lightning.pytorch as pl

    class MMLUDataModule(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.collator = MMLUCollator(pad_token_id)

        def _ranks(self) -> tuple[int, int]:
            trainer = self.trainer
            return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            rank, world = self._ranks()
            sampler = GlobalBatchSampler(len(train), batch_size, rank=rank, world_size=world, seed=seed)
            return torch.utils.data.DataLoader(train, batch_size=batch_size, sampler=sampler,
                                               collate_fn=self.collator, drop_last=True)

        def val_dataloader(self) -> torch.utils.data.DataLoader | list:
            if not held_out:
                return []
            rank, world = self._ranks()
            return torch.utils.data.DataLoader(held_out[rank::world], batch_size=eval_batch_size,
                                               collate_fn=self.collator)

    return MMLUDataModule()


def chance_accuracy(examples: Sequence[dict[str, Any]]) -> float:
    """Expected accuracy of a uniform guess: the mean of ``1 / num_choices``."""
    return math.fsum(1.0 / e["num_choices"] for e in examples) / max(1, len(examples))
