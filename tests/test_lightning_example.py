"""The Lightning example (``examples/lightning/training.py``): it learns, liger matches the unpatched model,
DDP matches one process, the labels name the right choice, the strategies wrap the right classes, and bad
inputs fail early with the fix.

Runs that a user starts from the shell (no arguments, DDP) run in a subprocess; the others call ``main``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "lightning" / "training.py"
for path in (SCRIPT.parent, REPO / "examples" / "alignment"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

pytest.importorskip("lightning")

import mmlu_data  # noqa: E402
from lightning_strategies import fsdp_policy_classes, no_split_classes, strategy_for  # noqa: E402

_spec = importlib.util.spec_from_file_location("lightning_training_example", SCRIPT)
training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(training)

CPU = ["--accelerator", "cpu", "--log_every", "0"]


pytestmark = pytest.mark.slow


def run_script(args: list[str], cwd: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    began = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.perf_counter() - began


# ------------------------------------------------------------------------------------------- end to end


def test_no_arguments_learns_within_a_minute(tmp_path: Path) -> None:
    result, seconds = run_script([], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "outputs" / "lightning" / "run_summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert summary["use_liger"] and summary["liger_patched_count"] > 0
    assert after["val_loss"] < 0.5 * before["val_loss"]
    assert after["val_accuracy"] >= summary["chance_accuracy"] + 0.25, (before, after)
    assert summary["meter"]["steps_measured"] > 0 and summary["meter"]["tokens_per_s"] > 0
    assert "answer accuracy" in result.stdout and "tokens/s" in result.stdout
    print(f"the embedded default took {seconds:.1f} s")  # reported, not asserted: CPU load varies


def test_liger_matches_unpatched_in_fp32(tmp_path: Path) -> None:
    common = [*CPU, "--precision", "32-true", "--max_steps", "3", "--batch_size", "8"]
    liger = training.main([*common, "--output_dir", str(tmp_path / "a")])
    plain = training.main([*common, "--no-use_liger", "--output_dir", str(tmp_path / "b")])
    assert liger["liger_patched_count"] > 0 and plain["liger_patched_count"] == 0
    assert len(liger["first_losses"]) == 3
    assert liger["first_losses"][2] < liger["first_losses"][0]  # it trains
    torch.testing.assert_close(torch.tensor(liger["first_losses"]), torch.tensor(plain["first_losses"]),
                               rtol=0, atol=1e-5)


def test_ddp_two_processes_equal_one_process(tmp_path: Path) -> None:
    steps = ["--max_steps", "4", "--precision", "32-true", "--seed", "7"]
    result, _ = run_script([*CPU, *steps, "--strategy", "ddp", "--devices", "2", "--batch_size", "4",
                            "--output_dir", str(tmp_path / "ddp")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    ddp = json.loads((tmp_path / "ddp" / "run_summary.json").read_text())
    one = training.main([*CPU, *steps, "--devices", "1", "--batch_size", "8", "--output_dir", str(tmp_path / "one")])
    assert ddp["world_size"] == 2 and one["world_size"] == 1 and ddp["steps"] == one["steps"] == 4
    torch.testing.assert_close(torch.tensor(ddp["train_losses"]), torch.tensor(one["train_losses"]),
                               rtol=0, atol=1e-4)
    assert abs(ddp["after"]["val_loss"] - one["after"]["val_loss"]) < 1e-4
    assert ddp["after"]["rows"] == one["after"]["rows"]


# ------------------------------------------------------------------------------------------- labels


def test_labels_are_answer_and_eos_and_name_the_printed_choice() -> None:
    from embedded import build_tokenizer

    train, held_out = mmlu_data.embedded_rows()
    extra = [
        {"question": "Which one is apple ?", "choices": ["apple", "dog", "red", "saw", "iron"], "answer": 0},
        {"question": "Which one is iron ?", "choices": ["apple", "dog", "red", "saw", "iron"], "answer": 4},
        {"question": "Which one is dog ?", "choices": ["dog", "saw"], "answer": 0},
    ]
    rows = train[:20] + extra
    tokenizer = build_tokenizer(mmlu_data.embedded_texts(train + held_out + extra))
    letters = mmlu_data.letter_token_ids(tokenizer, 5)
    examples = mmlu_data.encode_rows(rows, tokenizer, max_length=64, letter_ids=letters)
    batch = mmlu_data.MMLUCollator(tokenizer.pad_token_id)(examples)
    assert sorted({a["answer"] for a in rows}) == [0, 1, 2, 3, 4]
    for b, row in enumerate(rows):
        labels, ids = batch["labels"][b], batch["input_ids"][b]
        n = int(batch["attention_mask"][b].sum())
        targeted = (labels != -100).nonzero().flatten().tolist()
        assert targeted == [n - 2, n - 1]  # the answer letter, then EOS
        assert labels[n - 1] == tokenizer.eos_token_id and labels[n - 2] == ids[n - 2]
        assert int(batch["answer_pos"][b]) == n - 3
        letter = tokenizer.decode([int(labels[n - 2])]).strip()
        prompt = tokenizer.decode(ids[: n - 2].tolist())
        printed = mmlu_data.format_prompt(row["question"], row["choices"])
        assert f"{letter}. {row['choices'][row['answer']]}" in printed.splitlines()
        # the same choice follows the letter in what the model reads (the word-level tokenizer spaces punctuation)
        assert f"{letter} . {row['choices'][row['answer']]}" in prompt
        assert (ids[n:] == tokenizer.pad_token_id).all() and (labels[n:] == -100).all()


def test_long_prompts_keep_bos_choices_and_answer() -> None:
    from embedded import build_tokenizer

    train, held_out = mmlu_data.embedded_rows()
    tokenizer = build_tokenizer(mmlu_data.embedded_texts(train + held_out))
    letters = mmlu_data.letter_token_ids(tokenizer, 4)
    row = dict(train[0], question=" ".join(["apple"] * 50) + " ?")
    with pytest.warns(UserWarning, match="longer than --max_length 20"):
        (ex,) = mmlu_data.encode_rows([row], tokenizer, max_length=20, letter_ids=letters)
    assert len(ex["input_ids"]) == 20 and ex["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(ex["input_ids"][-5:-2]).split()[-2:] == ["Answer", ":"]
    assert ex["labels"][-2] == letters[row["answer"]]


def test_global_batch_sampler_splits_one_process_batches() -> None:
    n, b, world = 37, 3, 4
    one = list(mmlu_data.GlobalBatchSampler(n, b * world, seed=5))
    ranks = [list(mmlu_data.GlobalBatchSampler(n, b, rank=r, world_size=world, seed=5)) for r in range(world)]
    for g in range(len(one) // (b * world)):
        together = sum((r[g * b:(g + 1) * b] for r in ranks), [])
        assert together == one[g * b * world:(g + 1) * b * world]
    sampler = mmlu_data.GlobalBatchSampler(n, b, seed=5)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and len(set(first)) == len(first) == len(sampler)


# ------------------------------------------------------------------------------------------- strategies


def _tiny(family: str) -> torch.nn.Module:
    import transformers

    config_cls = getattr(transformers, f"{family}Config")
    config = config_cls(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with torch.device("meta"):
        return getattr(transformers, f"{family}ForCausalLM")(config)


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral", "Gemma", "Gemma2"])
def test_fsdp_wraps_and_checkpoints_the_decoder_layers(family: str) -> None:
    model = _tiny(family)
    layer_cls = type(model.model.layers[0])
    assert layer_cls.__name__ == f"{family}DecoderLayer"
    strategy = strategy_for("fsdp", model)
    assert type(strategy).__name__ == "FSDPStrategy"
    wrapped, checkpointed = fsdp_policy_classes(strategy)
    assert wrapped == checkpointed == no_split_classes(model) == {layer_cls}


def test_strategy_names() -> None:
    assert strategy_for("auto") == "auto" and strategy_for("ddp") == "ddp"
    with pytest.raises(ValueError, match=r"--strategy 'zero3': unknown strategy; choose one of \['auto', 'ddp'"):
        strategy_for("zero3", _tiny("Llama"))
    with pytest.raises(ValueError, match="names no module class to wrap"):
        strategy_for("fsdp", torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_deepspeed_is_zero3_bf16() -> None:
    pytest.importorskip("deepspeed")
    strategy = strategy_for("deepspeed", _tiny("Llama"))
    assert type(strategy).__name__ == "DeepSpeedStrategy"
    assert strategy.config["zero_optimization"]["stage"] == 3 and strategy.config["bf16"] == {"enabled": True}


# ------------------------------------------------------------------------------------------- bad input


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [{"question": f"q{i} ?", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(12)]


def test_missing_column_fails_before_training(tmp_path: Path) -> None:
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q ?", "options": ["a", "b"], "answer": 0}])
    with pytest.raises(ValueError, match=r"row 0: missing column\(s\) \['choices'\].*Rename the columns"):
        training.main([*CPU, "--data", str(bad), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("answer", [4, -1])
def test_answer_out_of_range_fails_before_training(tmp_path: Path, answer: int) -> None:
    rows = [*GOOD[:5], dict(GOOD[5], answer=answer), *GOOD[6:]]
    bad = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=rf"row 5: 'answer' = {answer} is out of range for 4 choices.*0-based"):
        training.main([*CPU, "--data", str(bad), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_csv_and_parquet_files_load(tmp_path: Path) -> None:
    with (tmp_path / "d.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "choices", "answer", "subject"])
        writer.writeheader()
        for row in GOOD:
            writer.writerow(dict(row, choices=json.dumps(row["choices"]), subject="x"))
    assert mmlu_data.read_rows(tmp_path / "d.csv") == GOOD
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "d.parquet")
    assert mmlu_data.read_rows(tmp_path / "d.parquet") == GOOD
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        mmlu_data.read_rows(_write_jsonl(tmp_path / "d.txt", GOOD))


def test_too_many_devices_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--devices 999: there are \d+ CPU cores; pass --devices between 1 and"):
        training.main([*CPU, "--devices", "999", "--output_dir", str(tmp_path / "out")])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--accelerator gpu: no CUDA device is visible; use --accelerator cpu"):
            training.main(["--accelerator", "gpu", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_deepspeed_missing_fails_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise ImportError
    with pytest.raises(ValueError, match=r"needs DeepSpeed, which is not installed.*pip install 'deepspeed>=0.16'"):
        training.main(["--strategy", "deepspeed", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="needs DeepSpeed"):
        strategy_for("deepspeed", _tiny("Llama"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_sharded_strategies_on_cpu_fail_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--strategy fsdp needs CUDA GPUs.*use --strategy auto or --strategy ddp"):
        training.main(["--strategy", "fsdp", "--output_dir", str(tmp_path / "out")])


def test_warmup_cosine_schedule() -> None:
    total, warmup = 20, 4
    factors = [training.warmup_cosine(s, warmup=warmup, total=total) for s in range(total + 1)]
    assert factors[:warmup] == [0.25, 0.5, 0.75, 1.0][:warmup] and factors[warmup] == 1.0
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1:]))
    assert factors[total] == pytest.approx(0.0, abs=1e-12)
