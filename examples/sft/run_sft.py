"""Supervised fine-tuning with the Hugging Face ``Trainer``; ``--use_liger`` adds liger_align's model patch.

The patch is one line, applied to the model before training::

    from liger_align.models import apply_liger_kernel_to_llama
    apply_liger_kernel_to_llama(model=model)

It runs RMSNorm, RoPE and SwiGLU through liger_align's kernels and computes the loss without
materialising the ``[tokens, vocab]`` logits. With no arguments the embedded default runs (tiny
Llama 3.2, local tokenizer, the chosen answers of the shipped preference data as SFT targets) and a
summary is printed; with arguments it does the real job, and every ``TrainingArguments`` flag works::

    python examples/sft/run_sft.py
    python examples/sft/run_sft.py --model_name_or_path meta-llama/Llama-3.2-1B --dataset_name sft.jsonl \\
        --max_length 1024 --per_device_train_batch_size 8 --learning_rate 2e-5 --bf16 --output_dir outputs/sft

A data set needs a ``text`` column, or ``prompt`` and ``completion`` (or ``chosen``); the loss covers
the completion only. ``--no-use_liger`` trains the unpatched model, for comparison.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "alignment"))
import common  # noqa: E402

common.add_repo_to_path()
from liger_align.models import apply_liger_kernel_to_llama  # noqa: E402

SFT_EMBEDDED_DEFAULTS: dict[str, Any] = {"learning_rate": 3e-3, "num_train_epochs": 3}


@dataclass
class SFTScriptArguments(common.ScriptArguments):
    """The alignment examples' arguments plus the sequence length (``TrainingArguments`` has none)."""

    max_length: int = field(default=1024, metadata={"help": "Longest tokenized example; longer ones are cut."})


def to_sft_columns(dataset: Dataset, what: str) -> Dataset:
    """Map ``dataset`` to ``prompt``/``completion``: from those, ``prompt``+``chosen``, or ``text``."""
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        return dataset.select_columns(["prompt", "completion"])
    if {"prompt", "chosen"} <= columns:
        return dataset.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
    if "text" in columns:
        return dataset.map(lambda row: {"prompt": "", "completion": row["text"]}, remove_columns=dataset.column_names)
    raise ValueError(
        f"{what} needs a 'text' column, or 'prompt' and 'completion' (or 'chosen'); found {dataset.column_names}"
    )


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """``input_ids``/``labels`` of prompt + completion + EOS, the prompt's labels set to -100."""

    def encode(row: dict[str, str]) -> dict[str, list[int]]:
        prompt_ids = tokenizer(row["prompt"])["input_ids"] if row["prompt"] else []
        ids = tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id]
        start = len(prompt_ids) if ids[: len(prompt_ids)] == prompt_ids else 0
        labels = [-100] * start + ids[start:]
        return {
            "input_ids": ids[:max_length],
            "attention_mask": [1] * min(len(ids), max_length),
            "labels": labels[:max_length],
        }

    return dataset.map(encode, remove_columns=dataset.column_names)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, load and check everything, train, save, print and return the summary."""
    args, config = common.parse_script_and_config(
        SFTScriptArguments, TrainingArguments, name="sft", embedded_defaults=SFT_EMBEDDED_DEFAULTS, argv=argv
    )
    raw = common.load_raw_dataset(args.dataset_name, args.dataset_config)
    what = f"--dataset_name {args.dataset_name or str(common.embedded.DATA_PATH)!r} for SFT"
    if isinstance(raw, DatasetDict):
        raw = DatasetDict({split: to_sft_columns(part, what) for split, part in raw.items()})
    else:
        raw = to_sft_columns(raw, what)
    train, held_out = common.split_dataset(raw, args, config.seed)
    model, tokenizer = common.load_model_and_tokenizer(args, config.seed)

    if args.use_liger:
        apply_liger_kernel_to_llama(model=model)

    trainer = Trainer(
        model=model,
        args=config,
        train_dataset=tokenize(train, tokenizer, args.max_length),
        eval_dataset=tokenize(held_out, tokenizer, args.max_length),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )
    start = trainer.evaluate()["eval_loss"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    memory, memory_kind = common.peak_memory()
    end = trainer.evaluate()["eval_loss"]

    trainer.save_model(config.output_dir)
    summary = {
        "algorithm": "sft",
        "trainer": "Trainer"
        + (" + apply_liger_kernel_to_llama" if args.use_liger and apply_liger_kernel_to_llama else ""),
        "model": args.model_name_or_path or "embedded tiny Llama 3.2",
        "device": str(config.device),
        "steps": trainer.state.global_step,
        "train_seconds": seconds,
        "peak_memory_mib": memory,
        "peak_memory_kind": memory_kind,
        "eval_rows": len(held_out),
        "start": {"eval_loss": start},
        "end": {"eval_loss": end},
        "output_dir": config.output_dir,
    }
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        (Path(config.output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        common.print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
