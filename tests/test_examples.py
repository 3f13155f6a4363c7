"""The example scripts: a few steps of each, what they write, their early errors, the shipped data.

Each script runs in a subprocess (as a user runs it) on the embedded default: tiny Llama 3.2,
local tokenizer, shipped data. The error checks call the scripts' ``main`` in-process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _helpers import ALIGNMENT, FEW_STEPS, SCRIPTS, run_script
from _helpers import example_main as _main
from _helpers import example_module as _module

if str(ALIGNMENT) not in sys.path:
    sys.path.insert(0, str(ALIGNMENT))


pytestmark = pytest.mark.slow


def check_saved(output_dir: Path) -> dict:
    """The folder holds a model and tokenizer that ``from_pretrained`` loads and that run; return the summary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    ids = tokenizer("What is 3 + 4?", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    return json.loads((output_dir / "run_summary.json").read_text())


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_example_runs_and_saves(name: str, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    result = run_script(SCRIPTS[name], [*FEW_STEPS, "--output_dir", str(output_dir)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = check_saved(output_dir)
    assert summary["algorithm"] == name and summary["steps"] == 2
    assert "steps" in result.stdout and "peak memory" in result.stdout and "step meter" in result.stdout
    meter = summary["meter"]  # the StepMeter: 1 warm-up step, 1 measured, non-padding tokens counted
    assert meter["steps_measured"] == 1 and meter["tokens_per_s"] > 0 and meter["peak_allocated_mib"] > 0


def test_orpo_without_liger_runs_trl(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    result = run_script(SCRIPTS["orpo"], [*FEW_STEPS, "--no-use_liger", "--output_dir", str(output_dir)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert check_saved(output_dir)["trainer"] == "ORPOTrainer"


def test_user_dataset_file_and_saved_folder(tmp_path: Path) -> None:
    """A local .jsonl file and a save_to_disk folder with a test split both load."""
    import common
    import embedded

    data = embedded.load_preference_dataset().select(range(40))
    data.to_json(tmp_path / "prefs.jsonl")
    argv = ["--dataset_name", str(tmp_path / "prefs.jsonl"), "--eval_size", "8", "--output_dir", str(tmp_path)]
    args, config = common.parse_args(_module("orpo").ORPO, argv)
    assert config.bf16 is False and config.max_length == 64  # the embedded run's defaults on CPU
    train, held_out = common.split_dataset(common.load_raw_dataset(args.dataset_name), args, seed=0)
    assert (len(train), len(held_out)) == (32, 8)
    data.train_test_split(test_size=5, seed=0).save_to_disk(tmp_path / "saved")
    args.dataset_name = str(tmp_path / "saved")
    train, held_out = common.split_dataset(common.load_raw_dataset(args.dataset_name), args, seed=0)
    assert (len(train), len(held_out)) == (35, 5)


@pytest.mark.parametrize("name", ["orpo", "kto", "sft"])
def test_missing_path_is_a_clear_error(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "prefs.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _main(name)(["--dataset_name", str(missing), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "needed"), [("orpo", "chosen"), ("dpo", "rejected"), ("kto", "label"), ("sft", "text")]
)
def test_missing_columns_is_a_clear_error(name: str, needed: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(8)))
    with pytest.raises(ValueError, match=rf"(?s){needed}.*answer"):
        _main(name)(["--dataset_name", str(path), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_make_dataset_is_deterministic_and_matches_the_shipped_file(tmp_path: Path) -> None:
    import embedded
    import make_dataset

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    make_dataset.main(["--output", str(first)])
    make_dataset.main(["--output", str(second)])
    assert first.read_bytes() == second.read_bytes() == embedded.DATA_PATH.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) >= 200 and all(set(row) == {"prompt", "chosen", "rejected"} for row in rows)
    assert all(row["chosen"] != row["rejected"] for row in rows)
    assert embedded.DATA_PATH.stat().st_size < 200_000


def test_embedded_model_is_llama_3_2_shaped() -> None:
    import embedded

    tokenizer = embedded.build_tokenizer()
    model = embedded.build_tiny_llama(len(tokenizer), seed=3)
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.rope_parameters["rope_type"] == "llama3" and config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    again = embedded.build_tiny_llama(len(tokenizer), seed=3)
    assert all((a == b).all() for a, b in zip(model.parameters(), again.parameters(), strict=True))
    unpaired = embedded.load_unpaired_dataset()
    assert unpaired.column_names == ["prompt", "completion", "label"]
    assert len(unpaired) == 2 * len(embedded.load_preference_dataset())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["orpo", "dpo", "simpo", "kto"])
def test_default_run_learns_the_preference(name: str, tmp_path: Path) -> None:
    """The no-argument run (only the output folder moved): held-out preference accuracy rises clearly."""
    output_dir = tmp_path / "out"
    result = run_script(SCRIPTS[name], ["--output_dir", str(output_dir)], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((output_dir / "run_summary.json").read_text())
    start, end = summary["start"], summary["end"]
    assert end["preference_accuracy"] >= start["preference_accuracy"] + 0.15, summary
    if name == "orpo":  # DPO's reward accuracy starts at 0 (policy == reference: all ties); KTO logs none
        assert end["eval_rewards/accuracies"] >= start["eval_rewards/accuracies"] + 0.15, summary
