"""Supervised fine-tuning with the Hugging Face ``Trainer``; ``--use_liger`` (default) adds liger_align's model patch.

The patch is one line, applied to the model before training; it picks the family (Llama, Qwen2,
Mistral, Gemma, ... whatever ``liger_align.models`` supports) from ``model.config.model_type``::

    from liger_align.models import apply_liger_kernel
    handle = apply_liger_kernel(model)      # handle.patched lists what was replaced

It runs the norms, RoPE and the gated MLP through liger_align's kernels and computes the loss without
materialising the ``[tokens, vocab]`` logits. With no arguments the embedded default runs (a tiny
model, Llama 3.2 unless ``--embedded_family`` says qwen2, mistral, gemma or gemma2; a local
tokenizer; the chosen answers of the shipped preference data as SFT targets) and a summary is
printed: what was patched, the held-out loss, and the StepMeter's synchronised step time, non-padding
tokens/s and peak memory (one JSON line per step in ``<output_dir>/steps.jsonl``). With arguments it
does the real job, and every ``TrainingArguments`` flag (``--report_to`` included) works::

    python examples/sft/run_sft.py
    python examples/sft/run_sft.py --embedded_family gemma2
    python examples/sft/run_sft.py --model_name_or_path meta-llama/Llama-3.2-1B --dataset_name sft.jsonl \\
        --max_length 1024 --per_device_train_batch_size 8 --learning_rate 2e-5 --bf16 --output_dir outputs/sft

A data set needs a ``text`` column, or ``prompt`` and ``completion`` (or ``chosen``); the loss covers
the completion and its EOS token (padding is masked by position, so EOS stays a target when the
tokenizer pads with EOS). The held-out split is drawn with ``--seed``. ``--no-use_liger`` trains the
unpatched model, for comparison.

``--output_dir`` gets the trained model and its tokenizer, which reload with transformers alone (the patch
changes no weight name, and is reverted when ``main`` returns)::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("outputs/sft")
    tokenizer = AutoTokenizer.from_pretrained("outputs/sft")
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "alignment"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import tiny_models  # noqa: E402
import vocabulary_check  # noqa: E402
from cli import AlignmentScriptArguments  # noqa: E402
from preflight import check_output_dir_or_exit, reruns_embedded_demo  # noqa: E402

common.add_repo_to_path()
from liger_align.models import PatchHandle, apply_liger_kernel, supported_model_types  # noqa: E402

SFT_EMBEDDED_DEFAULTS: dict[str, Any] = {"learning_rate": 3e-3, "num_train_epochs": 3}


@dataclass
class SFTScriptArguments(AlignmentScriptArguments):
    """The alignment examples' arguments (``--overwrite_output_dir`` included) plus the sequence length."""

    max_length: int = field(default=1024, metadata={"help": "Longest tokenized example; longer ones are cut."})
    embedded_family: str | None = field(
        default=None,
        metadata={"help": f"Family of the embedded tiny model: one of {list(tiny_models.FAMILIES)} (default llama)."},
    )


def check_script_args(args: SFTScriptArguments) -> None:
    """Raise ``ValueError`` naming the flag for a bad ``--max_length`` or ``--embedded_family``."""
    if not isinstance(args.max_length, int) or args.max_length <= 0:
        raise ValueError(f"--max_length must be a positive integer, got {args.max_length!r}")
    if args.embedded_family is not None:
        if args.model_name_or_path is not None:
            raise ValueError(
                f"--embedded_family {args.embedded_family!r} picks the embedded tiny model; it cannot be combined "
                f"with --model_name_or_path {args.model_name_or_path!r}"
            )
        if args.embedded_family not in tiny_models.FAMILIES:
            raise ValueError(
                f"--embedded_family {args.embedded_family!r} is not supported; "
                f"expected one of {list(tiny_models.FAMILIES)}"
            )


def load_model_and_tokenizer(args: SFTScriptArguments, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``--model_name_or_path`` and its tokenizer, or the tiny ``--embedded_family`` model and the local tokenizer."""
    if args.model_name_or_path is not None or args.embedded_family in (None, "llama"):
        return common.load_model_and_tokenizer(args, seed)
    tokenizer = common.embedded.build_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = tiny_models.build_tiny_model(
        args.embedded_family, len(tokenizer), pad_token_id=tokenizer.pad_token_id, seed=seed, **ids
    )
    return model, tokenizer


def check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    """Raise ``ValueError`` if ``model`` has no output head or the tokenizer has ids its head cannot score."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{what}: {type(model).__name__} has no output head (get_output_embeddings() is None)")
    rows = head.weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"{what}: the tokenizer has {len(tokenizer)} tokens but the model's head scores only {rows} "
            "(lm_head.out_features); call model.resize_token_embeddings(len(tokenizer)) or use the matching tokenizer"
        )


def patch_model(model: PreTrainedModel) -> PatchHandle:
    """``apply_liger_kernel(model)``; its handle, or ``ValueError`` naming ``--use_liger`` if nothing was patched."""
    model_type = getattr(model.config, "model_type", None)
    handle = apply_liger_kernel(model)
    if not handle.patched:
        raise ValueError(
            f"--use_liger: liger_align has no kernels for model_type={model_type!r} (supported: "
            f"{supported_model_types()}); pass --no-use_liger to train it unpatched"
        )
    return handle


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


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100) by position.

    Padding is masked where the attention mask is 0, never by token id: when the tokenizer pads
    with its EOS token, each row's real EOS keeps its label.
    """
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, load and check everything, patch, train, save, print and return the summary.

    The patch is reverted when ``main`` returns or raises (in-process callers get transformers back).
    A non-empty ``--output_dir`` is refused (``error: ...``, exit status 2) before anything is loaded,
    unless ``--overwrite_output_dir`` or ``--resume_from_checkpoint``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = common.parse_script_and_config(
        SFTScriptArguments, TrainingArguments, name="sft", embedded_defaults=SFT_EMBEDDED_DEFAULTS, argv=argv
    )
    check_script_args(args)
    resume = check_output_dir_or_exit(config, overwrite=args.overwrite_output_dir or reruns_embedded_demo(argv))
    raw = common.load_raw_dataset(args.dataset_name, args.dataset_config)
    what = f"--dataset_name {args.dataset_name or str(common.embedded.DATA_PATH)!r} for SFT"
    if isinstance(raw, DatasetDict):
        raw = DatasetDict({split: to_sft_columns(part, what) for split, part in raw.items()})
    else:
        raw = to_sft_columns(raw, what)
    train, held_out = common.split_dataset(raw, args, config.seed)
    model, tokenizer = load_model_and_tokenizer(args, config.seed)
    vocabulary_check.warn_unknown_words(train, tokenizer, args)
    model_name = args.model_name_or_path or f"embedded tiny {args.embedded_family or 'llama'}"
    check_vocabulary(model, tokenizer, f"--model_name_or_path {model_name!r}")
    meter = common.step_meter(args, config)
    with patch_model(model) if args.use_liger else PatchHandle() as handle:
        if config.process_index == 0:
            print(f"liger_align: {handle.summary()}" if handle.patched else "liger_align: unpatched (--no-use_liger)")
        trainer = Trainer(
            model=model,
            args=config,
            train_dataset=tokenize(train, tokenizer, args.max_length),
            eval_dataset=tokenize(held_out, tokenizer, args.max_length),
            processing_class=tokenizer,
            data_collator=make_collator(tokenizer),
            callbacks=[meter],
        )
        measured = common.train_measured(
            trainer, lambda: {"eval_loss": trainer.evaluate()["eval_loss"]}, resume=resume
        )
        described = {
            "algorithm": "sft",
            "family": handle.family,
            "trainer": "Trainer" + (" + apply_liger_kernel" if handle.patched else ""),
            "model": model_name,
            "model_type": model.config.model_type,
            "patched": list(handle.patched),
            "device": str(config.device),
        }
        return common.finish_run(
            trainer, described, measured, meter=meter, eval_rows=len(held_out), save_with=tokenizer
        )


if __name__ == "__main__":
    main()
