"""Does the embedded tokenizer know the user's words? Measured once, before training, by :func:`warn_unknown_words`.

The embedded default's tokenizers are word-level and know only the words of the example's own data: every
other word becomes the unknown token. Trained on user data in other words, a run "works" but learns nothing
(chosen and rejected may even become the same tokens). The examples that accept ``--dataset_name`` with the
embedded tokenizer call :func:`warn_unknown_words`, which prints a ``warning: ...`` line on stderr then.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "text")
MAX_ROWS = 2000  # rows measured (the first ones): enough for a share, cheap for a large data set


def text_of(value: Any) -> str:
    """The text of a column value: a string, or the ``content`` (text parts) of a conversation's messages."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        if "content" in value:
            return text_of(value["content"])
        return str(value["text"]) if value.get("type", "text") == "text" and "text" in value else ""
    if isinstance(value, Iterable):
        return " ".join(text for text in (text_of(part) for part in value) if text)
    return str(value)


def _columns(dataset: Any, limit: int) -> dict[str, list[Any]]:
    """The text columns of the first ``limit`` rows (a ``datasets.Dataset`` by column: images are not decoded)."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        present = [name for name in TEXT_COLUMNS if name in names]
        if not present:
            return {}
        return dict(dataset.select_columns(present)[: min(limit, len(dataset))])
    rows = [row for _, row in zip(range(limit), dataset, strict=False)]
    return {name: [row.get(name) for row in rows] for name in TEXT_COLUMNS if rows and name in rows[0]}


def warn_unknown_words(
    dataset: Any, tokenizer: Any, args: Any, *, limit: int = MAX_ROWS, max_unknown: float = 0.05,
    max_identical: float = 0.1,
) -> dict[str, Any] | None:
    """Measure how much of ``dataset`` the embedded ``tokenizer`` cannot read; warn on stderr when it is too much.

    Only user data read by the embedded tokenizer is measured: the script arguments ``args`` have a
    ``dataset_name`` and no ``model_name_or_path`` (otherwise this returns ``None``). Over the first
    ``limit`` rows of the text columns present (``prompt``, ``chosen``, ``rejected``, ``completion``,
    ``text``; conversations by their messages' content): the share of tokens that are the unknown token,
    and for paired data the pairs whose chosen and rejected differ as text but tokenise identically. A
    ``warning: ...`` line on stderr (main process only) names each share above ``max_unknown`` /
    ``max_identical``. Returns the measurement: ``rows``, ``tokens``, ``unknown``, ``unknown_share``,
    ``pairs``, ``identical_pairs``, ``identical_share``, ``vocabulary`` (the words the tokenizer knows)
    and ``warnings`` (the lines printed).
    """
    dataset_name = args.dataset_name
    if args.model_name_or_path is not None or dataset_name is None:
        return None
    columns = _columns(dataset, limit)
    unk_id = tokenizer.unk_token_id
    encoded = {
        name: [tokenizer(text_of(value), add_special_tokens=False)["input_ids"] for value in values]
        for name, values in columns.items()
    }
    tokens = sum(len(ids) for rows in encoded.values() for ids in rows)
    unknown = sum(ids.count(unk_id) for rows in encoded.values() for ids in rows)
    pairs = identical = 0
    if "chosen" in encoded and "rejected" in encoded:
        for chosen, rejected, chosen_ids, rejected_ids in zip(
            columns["chosen"], columns["rejected"], encoded["chosen"], encoded["rejected"], strict=True
        ):
            if text_of(chosen) != text_of(rejected):
                pairs += 1
                identical += chosen_ids == rejected_ids
    vocabulary = len(tokenizer.get_vocab()) - len(set(tokenizer.all_special_tokens))
    report: dict[str, Any] = {
        "rows": len(next(iter(columns.values()), [])), "tokens": tokens, "unknown": unknown,
        "unknown_share": unknown / tokens if tokens else 0.0, "pairs": pairs, "identical_pairs": identical,
        "identical_share": identical / pairs if pairs else 0.0, "vocabulary": vocabulary, "warnings": [],
    }
    hint = "pass --model_name_or_path with a real tokenizer"
    if report["unknown_share"] > max_unknown:
        report["warnings"].append(
            f"{report['unknown_share']:.0%} of the tokens of {dataset_name} are {tokenizer.unk_token} for the embedded "
            f"tokenizer (it knows only the {vocabulary} words of the example's built-in data); {hint}"
        )
    if report["identical_share"] > max_identical:
        report["warnings"].append(
            f"{identical} of {pairs} pairs ({report['identical_share']:.0%}) of {dataset_name} have a chosen and a "
            "rejected answer that differ as text but are the same tokens for the embedded tokenizer (nothing to "
            f"prefer); {hint}"
        )
    if os.environ.get("RANK", "0") == "0":
        for line in report["warnings"]:
            print(f"warning: {line}", file=sys.stderr, flush=True)
    return report
