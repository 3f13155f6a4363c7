"""The examples' check that the embedded tokenizer knows the user's words (examples/alignment/vocabulary_check.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from _helpers import ALIGNMENT, SCRIPTS, run_script

if str(ALIGNMENT) not in sys.path:
    sys.path.insert(0, str(ALIGNMENT))

import embedded  # noqa: E402
from vocabulary_check import text_of, warn_unknown_words  # noqa: E402

USER = SimpleNamespace(dataset_name="my.jsonl", model_name_or_path=None)
MADE_UP = [
    {"prompt": f"Zorblat quenifex {i} vimmering?", "chosen": f"Plonkish wuzzle {i}.", "rejected": f"Grimbly frax {i}."}
    for i in range(40)
]


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


def test_shipped_data_gives_no_warning(tokenizer, capsys) -> None:
    report = warn_unknown_words(embedded.load_preference_dataset(), tokenizer, USER)
    assert report["rows"] == 480 and report["tokens"] > 1000
    assert report["unknown"] == 0 and report["unknown_share"] == 0.0
    assert report["pairs"] > 0 and report["identical_pairs"] == 0
    assert report["warnings"] == [] and capsys.readouterr().err == ""


def test_made_up_words_warn_with_the_share(tokenizer, capsys) -> None:
    from datasets import Dataset

    report = warn_unknown_words(Dataset.from_list(MADE_UP), tokenizer, USER)
    assert report["unknown_share"] > 0.5  # every word but the digits and punctuation
    err = capsys.readouterr().err
    share = f"{report['unknown_share']:.0%}"
    assert f"warning: {share} of the tokens of my.jsonl are <unk> for the embedded tokenizer" in err
    assert f"only the {report['vocabulary']} words" in err and "--model_name_or_path" in err
    # Made-up words alone: nothing known at all.
    words = [{"prompt": "zorblat quenifex", "chosen": "plonkish wuzzle", "rejected": "grimbly frax"}] * 5
    assert warn_unknown_words(words, tokenizer, USER, max_identical=1.0)["unknown_share"] == 1.0


def test_pairs_that_tokenise_identically_are_counted(tokenizer, capsys) -> None:
    rows = [{"prompt": "What is 3 + 4?", "chosen": f"Plonkish {i}", "rejected": f"Grimbly {i}"} for i in range(8)]
    rows += [{"prompt": "What is 3 + 4?", "chosen": "7", "rejected": "8"}] * 2  # known words: they differ
    rows += [{"prompt": "What is 3 + 4?", "chosen": "same", "rejected": "same"}]  # same text: not the tokenizer's doing
    report = warn_unknown_words(rows, tokenizer, USER, max_unknown=1.0)
    assert (report["pairs"], report["identical_pairs"]) == (10, 8)
    assert report["identical_share"] == pytest.approx(0.8)
    err = capsys.readouterr().err
    assert "warning: 8 of 10 pairs (80%) of my.jsonl have a chosen and a rejected answer" in err
    assert "of the tokens" not in err  # the unknown share was allowed here


def test_only_user_data_with_the_embedded_tokenizer_is_measured(tokenizer, capsys) -> None:
    assert warn_unknown_words(MADE_UP, tokenizer, SimpleNamespace(dataset_name=None, model_name_or_path=None)) is None
    assert warn_unknown_words(MADE_UP, tokenizer, SimpleNamespace(dataset_name="x", model_name_or_path="m")) is None
    assert capsys.readouterr().err == ""


def test_conversations_and_sft_columns(tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "zorblat"}]
    assert text_of(messages) == "What is 3 + 4? zorblat"
    assert text_of([{"type": "image"}, {"type": "text", "text": "hi"}]) == "hi"
    report = warn_unknown_words([{"prompt": "", "completion": "zorblat quenifex"}], tokenizer, USER)
    assert report["unknown_share"] == 1.0 and report["pairs"] == 0


@pytest.mark.slow
def test_orpo_on_unknown_words_warns(tmp_path: Path) -> None:
    data = tmp_path / "made_up.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in MADE_UP))
    args = ["--dataset_name", str(data), "--max_steps", "1", "--eval_size", "8", "--output_dir", str(tmp_path / "out")]
    result = run_script(SCRIPTS["orpo"], args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"of the tokens of {data} are <unk> for the embedded tokenizer" in result.stderr
    assert "pass --model_name_or_path with a real tokenizer" in result.stderr
