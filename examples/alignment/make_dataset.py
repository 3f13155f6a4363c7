"""Write the preference data set shipped with the package: ``liger_align/testing/data/preferences.jsonl``.

Each row is a ``prompt`` with a correct (``chosen``) and an incorrect (``rejected``) answer, drawn from
four small task families whose preference a tiny model can learn in a few minutes of CPU:

- ``sum``:      "What is 7 + 5?"                      chosen " 12"        rejected " 13"
- ``opposite``: "What is the opposite of hot?"        chosen " cold"      rejected " tall"
- ``larger``:   "Which is larger, 31 or 18?"          chosen " 31"        rejected " 18"
- ``repeat``:   "Repeat after me: red fox sun"        chosen " red fox sun"  rejected " sun red fox"

The output depends only on ``--seed`` and ``--rows``: running the script twice writes the same bytes.

    python examples/alignment/make_dataset.py            # rewrites liger_align/testing/data/preferences.jsonl
    python examples/alignment/make_dataset.py --output /tmp/prefs.jsonl --rows 100
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "liger_align" / "testing" / "data" / "preferences.jsonl"
DEFAULT_ROWS = 480
DEFAULT_SEED = 1234

OPPOSITES: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"),
    ("old", "new"), ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("early", "late"),
    ("full", "empty"), ("hard", "soft"), ("high", "low"), ("long", "short"), ("rich", "poor"),
    ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"), ("near", "far"), ("thick", "thin"),
)  # fmt: skip
WORDS: tuple[str, ...] = (
    "red", "blue", "green", "fox", "cat", "dog", "sun", "moon", "tree", "river",
    "stone", "bird", "fish", "rain", "snow", "wind", "star", "leaf", "rock", "lamp",
)  # fmt: skip

Row = dict[str, str]


def _sum_row(rng: random.Random) -> Row:
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    wrong = a + b + rng.choice((-3, -2, -1, 1, 2, 3))
    if wrong < 0:
        wrong = a + b + 1
    template = rng.choice(("What is {a} + {b}?", "Compute {a} + {b}.", "What is {a} plus {b}?"))
    return {"prompt": template.format(a=a, b=b), "chosen": f" {a + b}", "rejected": f" {wrong}"}


def _opposite_row(rng: random.Random) -> Row:
    word, opposite = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    others = [w for pair in OPPOSITES for w in pair if w not in (word, opposite)]
    template = rng.choice(("What is the opposite of {w}?", "Give the opposite of {w}.", "The opposite of {w} is?"))
    return {"prompt": template.format(w=word), "chosen": f" {opposite}", "rejected": f" {rng.choice(others)}"}


def _larger_row(rng: random.Random) -> Row:
    a, b = rng.sample(range(0, 50), 2)
    template = rng.choice(("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"))
    return {"prompt": template.format(a=a, b=b), "chosen": f" {max(a, b)}", "rejected": f" {min(a, b)}"}


def _repeat_row(rng: random.Random) -> Row:
    words = rng.sample(WORDS, rng.randint(3, 4))
    shuffled = words[:]
    while shuffled == words:
        rng.shuffle(shuffled)
    text = " ".join(words)
    return {"prompt": f"Repeat after me: {text}", "chosen": f" {text}", "rejected": " " + " ".join(shuffled)}


FAMILIES: tuple[Callable[[random.Random], Row], ...] = (_sum_row, _opposite_row, _larger_row, _repeat_row)


def generate_rows(num_rows: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> list[Row]:
    """Return ``num_rows`` preference rows (``prompt``, ``chosen``, ``rejected``), the families interleaved.

    Deterministic: the same ``num_rows`` and ``seed`` always give the same rows.
    """
    if num_rows <= 0:
        raise ValueError(f"num_rows must be positive, got {num_rows}")
    rng = random.Random(seed)
    return [FAMILIES[i % len(FAMILIES)](rng) for i in range(num_rows)]


def write_jsonl(rows: list[Row], path: Path) -> None:
    """Write ``rows`` to ``path`` as JSON lines (sorted keys, ``\\n`` line ends), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=True) + "\n")


def main(argv: list[str] | None = None) -> Path:
    """Parse the command line, write the file and return its path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON lines")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="number of preference rows")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    args = parser.parse_args(argv)
    write_jsonl(generate_rows(args.rows, args.seed), args.output)
    print(f"wrote {args.rows} rows to {args.output}")
    return args.output


if __name__ == "__main__":
    main()
