"""examples/sft/run_sft.py: families of the embedded default, EOS as a target when pad == eos, the seeded
split, and its early errors (each names the flag, before any training or output folder)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _helpers import ALIGNMENT, SCRIPTS, run_script
from _helpers import example_module as _module

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "examples" / "sft"), str(ALIGNMENT)]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft():
    return _module("sft")


def _supported(family: str) -> bool:
    """Whether ``apply_liger_kernel`` patches the tiny ``family`` model (gemma families arrive with their patch)."""
    import warnings

    import embedded
    import tiny_models

    from liger_align.models import apply_liger_kernel

    model = tiny_models.build_tiny_model(family, len(embedded.build_tokenizer()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with apply_liger_kernel(model) as handle:
            return bool(handle.patched)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_embedded_family_runs_patched_and_metered(family: str, tmp_path: Path) -> None:
    if not _supported(family):
        pytest.skip(f"liger_align.models has no {family} patch yet")
    out = tmp_path / "out"
    args = ["--embedded_family", family, "--max_steps", "3", "--meter_warmup_steps", "1", "--eval_size", "16",
            "--per_device_train_batch_size", "4", "--output_dir", str(out)]
    result = run_script(SCRIPTS["sft"], args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["model_type"] == family and any("ForCausalLM.forward" in p for p in summary["patched"])
    assert f"liger_align: {family}: " in result.stdout and "step meter" in result.stdout
    meter = summary["meter"]
    assert meter["steps_measured"] == 2 and meter["tokens_per_s"] > 0 and meter["peak_allocated_mib"] > 0
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and all(s["tokens"] > 0 for s in steps)
    assert summary["end"]["eval_loss"] < summary["start"]["eval_loss"]


def test_eos_stays_a_target_when_pad_is_eos(sft) -> None:
    import embedded

    tokenizer = embedded.build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rows = sft.to_sft_columns(embedded.load_preference_dataset().select(range(7)), "test")
    features = sft.tokenize(rows, tokenizer, max_length=512)
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) > 1  # the batch will be padded
    batch = sft.make_collator(tokenizer)([dict(f) for f in features])
    eos = tokenizer.eos_token_id
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, n - 1] == eos and batch["labels"][i, n - 1] == eos  # the row's own EOS
        assert (batch["labels"][i, n:] == -100).all() and (batch["attention_mask"][i, n:] == 0).all()
        assert (batch["input_ids"][i, n:] == eos).all()  # padded with EOS, yet not a target
    # The loss the model trains on includes those EOS targets: it differs from masking by token id.
    model = embedded.build_tiny_llama(len(tokenizer), seed=1)
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    target = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp(min=0),
                                                  reduction="none")
    by_position = per_token[target != -100].mean()
    by_token_id = per_token[(target != -100) & (target != eos)].mean()
    assert loss.double() == pytest.approx(by_position.item(), rel=1e-5)
    assert abs(by_position - by_token_id) > 1e-4


def test_split_is_seeded(sft) -> None:
    import common

    def held_out(seed: int) -> list[str]:
        args, config = common.parse_script_and_config(
            sft.SFTScriptArguments, sft.TrainingArguments, name="sft", embedded_defaults={},
            argv=["--seed", str(seed), "--eval_size", "16"],
        )
        raw = sft.to_sft_columns(common.load_raw_dataset(None), "test")
        return common.split_dataset(raw, args, config.seed)[1]["prompt"]

    assert held_out(3) == held_out(3) and held_out(3) != held_out(4)


def _saved_model(tmp_path: Path, *, vocab_delta: int = 0, model_type: str = "llama") -> Path:
    """A tiny model and the local tokenizer in a folder; the model's head has ``len(tokenizer) + vocab_delta`` rows."""
    import embedded
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = embedded.build_tokenizer()
    vocab = len(tokenizer) + vocab_delta
    if model_type == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=128))
    else:
        model = embedded.build_tiny_llama(vocab, hidden_size=32, num_hidden_layers=1)
    folder = tmp_path / f"{model_type}{vocab_delta}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("max_length_zero", r"--max_length must be a positive integer, got 0"),
        ("max_length_negative", r"--max_length must be a positive integer, got -3"),
        ("misspelled_family", r"--embedded_family 'lama' is not supported.*'llama'"),
        ("family_with_model", r"--embedded_family 'qwen2'.*--model_name_or_path"),
        ("vocab_too_large", r"--model_name_or_path .*tokenizer has (\d+) tokens but the model's head scores only"),
    ],
)
def test_bad_input_is_a_clear_error(sft, case: str, match: str, tmp_path: Path) -> None:
    argv = {
        "max_length_zero": lambda: ["--max_length", "0"],
        "max_length_negative": lambda: ["--max_length", "-3"],
        "misspelled_family": lambda: ["--embedded_family", "lama"],
        "family_with_model": lambda: ["--embedded_family", "qwen2", "--model_name_or_path", str(tmp_path)],
        "vocab_too_large": lambda: ["--model_name_or_path", str(_saved_model(tmp_path, vocab_delta=-5))],
    }[case]()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        sft.main([*argv, "--output_dir", str(out), "--max_steps", "1"])
    assert not out.exists()


def test_a_model_type_without_a_family_gets_the_probed_fused_loss(sft, tmp_path: Path) -> None:
    """GPT-2 has no kernel family: its layers stay, its loss is fused (the probe proves its head), or
    the one-line reason is an error naming --no-use_liger when nothing at all can be patched."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_saved_model(tmp_path, model_type="gpt2"))
    with pytest.warns(UserWarning, match="model_type='gpt2'"):
        handle = sft.patch_model(model)
    assert handle.patched == ["GPT2LMHeadModel.forward"]
    handle.revert()
    model.lm_head = torch.nn.Identity()  # nothing left to prove: the error names the way out
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"--use_liger: .*'gpt2'.*--no-use_liger"):
        sft.patch_model(model)


def test_a_head_larger_than_the_tokenizer_is_fine(sft, tmp_path: Path) -> None:
    """Padded vocabularies (head rows > tokenizer size, as Qwen2's) pass the check."""
    import embedded

    tokenizer = embedded.build_tokenizer()
    sft.check_vocabulary(embedded.build_tiny_llama(len(tokenizer) + 7, hidden_size=32), tokenizer, "--model")
    match = rf"--model: the tokenizer has {len(tokenizer)} tokens.*only {len(tokenizer) - 1}"
    with pytest.raises(ValueError, match=match):
        sft.check_vocabulary(embedded.build_tiny_llama(len(tokenizer) - 1, hidden_size=32), tokenizer, "--model")
