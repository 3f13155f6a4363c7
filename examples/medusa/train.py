"""Train Medusa heads (Medusa-1: heads only, or Medusa-2: everything) with liger-align's ``MedusaTrainer``.

Head k predicts the token k+1 places after the next one; the loss of all heads is computed by the fused
multi-head cross-entropy, so the ``(heads, tokens, vocab)`` logits never exist. Medusa's own flags:
``--medusa_num_heads``, ``--medusa_num_layers``, ``--medusa_heads_coefficient``,
``--medusa_decay_coefficient``, ``--medusa_scheduler`` (constant, linear, sine, sine_<r>),
``--medusa_lr_multiplier``, ``--medusa_only_heads`` (stage 1), and ``--no-use_liger`` (the same model
and loss from materialised logits, Medusa's own way); every ``TrainingArguments`` flag works too.

With no arguments the embedded default runs: the tiny Llama 3.2 and a local tokenizer, on generated
ShareGPT-format conversations whose assistant turns walk a fixed ring of words (so tokens t+2..t+4
are predictable from token t); the loss covers the assistant turns only; batches are padded to their
longest row. It prints the StepMeter summary and each head's held-out top-1 accuracy before and
after training (computed from materialised logits, independently of the fused loss)::

    python examples/medusa/train.py
    python examples/medusa/train.py --model_name_or_path meta-llama/Llama-3.2-1B-Instruct \\
        --dataset_name sharegpt.json --medusa_num_heads 5 --medusa_num_layers 1 --medusa_only_heads \\
        --learning_rate 1e-3 --bf16 --per_device_train_batch_size 8 --max_length 2048 --output_dir outputs/medusa

A data set holds ShareGPT rows (``conversations``: ``[{"from": "human"|"gpt"|"system", "value": ...}]``)
or chat rows (``messages``: ``[{"role": ..., "content": ...}]``), formatted with the tokenizer's chat
template.

What ``--output_dir`` holds:

- ``medusa_lm_head.safetensors``: the heads alone, in Medusa's key layout (``{k}.{l}.linear.weight``, ...),
  the file Medusa's, TGI's and TensorRT-LLM's loaders read; ``config.json`` has Medusa's fields
  (``medusa_num_heads``, ``medusa_num_layers``, ``base_model_name_or_path``);
- the tokenizer's files (``AutoTokenizer.from_pretrained(output_dir)``);
- the model: with Medusa-2 (``--medusa_only_heads false``) the trained model itself, in the folder
  (``AutoModelForCausalLM.from_pretrained(output_dir)``; its ``config.json`` carries Medusa's fields too);
  with Medusa-1 the backbone is unchanged, so ``base_model_name_or_path`` names it: the checkpoint of
  ``--model_name_or_path``, or, for the embedded model (which exists nowhere else), ``output_dir/base_model``,
  where this example saves it (``AutoModelForCausalLM.from_pretrained(output_dir + "/base_model")``).

:func:`load_trained` reads all of it back: the model (``AutoModelForCausalLM``, no liger_align patch) with the
heads loaded by ``liger_align.models.medusa.load_medusa_heads``, and the tokenizer::

    from train import load_trained          # examples/medusa/train.py
    model, tokenizer = load_trained("outputs/medusa")
    heads = model.medusa_head               # head k: model.medusa_head[k](hidden) -> logits of token t+k+2
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "alignment"))
import common  # noqa: E402
import embedded  # noqa: E402
from cli import AlignmentScriptArguments  # noqa: E402
from preflight import check_output_dir_or_exit, reruns_embedded_demo  # noqa: E402

common.add_repo_to_path()
from liger_align.models.head_call import backbone, causal_lm, output_head  # noqa: E402
from liger_align.models.medusa import MEDUSA_CONFIG_FILE, load_medusa_heads, medusa_heads  # noqa: E402
from liger_align.testing.conversations import (  # noqa: E402, F401
    FILLER,
    RING,
    ROLES,
    make_conversations,
    to_messages,
    tokenize,
)
from liger_align.trainers import MedusaTrainer, MedusaTrainingArguments  # noqa: E402

# The generated conversations and the chat tokenization live in ``liger_align.testing.conversations`` (the
# MedusaTrainer tests use them too); ROLES and to_messages stay importable from here under their old names.

# The embedded run: stage 1 (heads only) on the tiny random backbone.
MEDUSA_EMBEDDED_DEFAULTS: dict[str, Any] = {
    "medusa_num_heads": 3,
    "medusa_num_layers": 1,
    "medusa_only_heads": True,
    "learning_rate": 5e-3,
    "medusa_lr_multiplier": 4.0,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 5,
    "weight_decay": 0.0,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "max_length": 256,
    "eval_size": 32,
    "logging_steps": 10,
}


@dataclass
class MedusaScriptArguments(AlignmentScriptArguments):
    """The examples' arguments (``--overwrite_output_dir`` included), the sequence length and the data's size."""

    max_length: int = field(default=2048, metadata={"help": "Longest tokenized conversation; longer ones are cut."})
    embedded_conversations: int = field(
        default=192, metadata={"help": "Embedded default only: how many conversations to generate."}
    )


@torch.no_grad()
def head_accuracy(model: torch.nn.Module, data: Dataset, collator: Any, batch_size: int = 32) -> list[float]:
    """Held-out top-1 of the model's head (k = 0) and of every Medusa head, from materialised logits.

    Head k at position t is right when ``argmax`` of its logits is ``labels[t + k + 1]`` (valid targets only).
    """
    lm = causal_lm(model)
    heads = medusa_heads(lm)
    was_training = lm.training
    lm.eval()
    device = output_head(lm).weight.device
    hits = torch.zeros(heads.num_heads + 1)
    counts = torch.zeros(heads.num_heads + 1)
    for start in range(0, len(data), batch_size):
        batch = collator([data[i] for i in range(start, min(start + batch_size, len(data)))])
        hidden = backbone(lm)(input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device)).last_hidden_state
        labels = batch["labels"].to(device)
        for k in range(heads.num_heads + 1):
            target = labels[:, 1 + k:]
            valid = target != -100
            rows, target = hidden[:, : target.shape[1]][valid], target[valid]
            head = output_head(lm) if k == 0 else heads[k - 1]
            for i in range(0, rows.shape[0], 1024):  # logits of 1024 valid rows at a time
                hits[k] += (head(rows[i: i + 1024]).argmax(-1) == target[i: i + 1024]).sum().item()
            counts[k] += target.numel()
    lm.train(was_training)
    return (hits / counts.clamp(min=1)).tolist()


def load_data(args: MedusaScriptArguments, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) rows: ``--dataset_name`` (split with ``--eval_size`` without a test split) or generated."""
    if args.dataset_name is None:
        raw: Dataset | DatasetDict = Dataset.from_list(make_conversations(args.embedded_conversations, seed))
    else:
        raw = common.load_raw_dataset(args.dataset_name, args.dataset_config)
    return common.split_dataset(raw, args, seed)


def load_model(args: MedusaScriptArguments, train: Dataset, seed: int) -> tuple[Any, PreTrainedTokenizerBase]:
    """``--model_name_or_path`` and its tokenizer, or the tiny Llama 3.2 with a tokenizer of the generated words."""
    if args.model_name_or_path is not None:
        return common.load_model_and_tokenizer(args, seed)
    texts = [turn["value"] for row in train for turn in row["conversations"]]
    tokenizer = embedded.build_tokenizer(texts + RING + FILLER + ["ring from"])
    model = embedded.build_tiny_llama(
        len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, seed=seed,
    )
    return model, tokenizer


BASE_MODEL_FOLDER = "base_model"  # Medusa-1 on the embedded model: where the (unchanged) backbone is saved


def save_base_model(trainer: MedusaTrainer, output_dir: str | Path) -> Path:
    """Medusa-1 on the embedded model: save the backbone (without the heads) and the tokenizer in
    ``output_dir/base_model``, and make it the ``base_model_name_or_path`` that the heads' ``config.json`` names.

    The trainer's own ``save_model`` (Hugging Face's, which gathers FSDP/ZeRO-3 shards) writes it: every rank
    calls it.
    """
    folder = Path(output_dir) / BASE_MODEL_FOLDER
    Trainer.save_model(trainer, str(folder))  # Hugging Face's: the model (MedusaTrainer._save drops the heads)
    causal_lm(trainer.model).config._name_or_path = str(folder.resolve())
    return folder


def load_trained(output_dir: str | Path, **from_pretrained: Any) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """``(model with its Medusa heads, tokenizer)`` from a folder this example saved (module docstring).

    The model is ``AutoModelForCausalLM.from_pretrained`` of the folder when it holds the model (Medusa-2), else
    of its ``base_model`` folder (Medusa-1 on the embedded model), else of the ``base_model_name_or_path`` its
    ``config.json`` names (Medusa-1 on a checkpoint); ``from_pretrained`` (``dtype=...``, ...) goes to that call.
    The heads come from ``medusa_lm_head.safetensors`` (``load_medusa_heads``), the tokenizer from the folder.
    """
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(output_dir)
    config = json.loads((folder / MEDUSA_CONFIG_FILE).read_text())
    if "model_type" in config:  # Medusa-2: the trained model is in the folder
        source: str | Path = folder
    elif (folder / BASE_MODEL_FOLDER / MEDUSA_CONFIG_FILE).is_file():
        source = folder / BASE_MODEL_FOLDER
    elif config.get("base_model_name_or_path"):
        source = config["base_model_name_or_path"]
    else:
        raise ValueError(f"output_dir: {folder} holds neither a model nor a base_model_name_or_path in its config.json")
    model = AutoModelForCausalLM.from_pretrained(source, **from_pretrained)
    load_medusa_heads(model, folder)
    return model, AutoTokenizer.from_pretrained(folder)


def print_summary(summary: dict[str, Any]) -> None:
    """The run's summary: stage, steps, wall time, the StepMeter figures, per-head held-out top-1."""
    meter = summary["meter"]
    print(f"\n== Medusa stage {summary['stage']} with {summary['trainer']} on {summary['model']} "
          f"({summary['device']}) ==")
    print(f"steps        {summary['steps']}   wall time {summary['train_seconds']:.1f} s (training only)")
    if meter.get("steps_measured"):
        print(f"StepMeter    median step {meter['median_step_s'] * 1e3:.1f} ms, {meter['tokens_per_s']:.0f} tokens/s, "
              f"peak {meter['peak_allocated_mib']:.0f} MiB ({meter['memory_kind']}), "
              f"{meter['steps_measured']} steps measured after {meter['warmup_steps']} warm-up")
    else:
        print(f"StepMeter    no step measured (all {summary['steps']} were warm-up)")
    print(f"held-out top-1 ({summary['eval_rows']} conversations)   start    end")
    for k, (start, end) in enumerate(zip(summary["top1_start"], summary["top1_end"], strict=True)):
        name = "model head (t+1)" if k == 0 else f"medusa head {k} (t+{k + 1})"
        if k == 0 and summary["stage"] == 1:
            name += " [frozen]"  # stage 1 trains the Medusa heads only: the model head keeps its value
        print(f"  {name:<34}{start:.3f}    {end:.3f}")
    saved = "the heads and the model" if summary["stage"] == 2 else "the heads" + (
        f" (the base model in {BASE_MODEL_FOLDER}/)" if summary.get("base_model_saved") else "")
    print(f"saved {saved} to {summary['output_dir']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, build everything, train, save (module docstring), print and return the summary.

    A non-empty ``--output_dir`` is refused (``error: ...``, exit status 2) before anything is loaded,
    unless ``--overwrite_output_dir`` or ``--resume_from_checkpoint``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = common.parse_script_and_config(
        MedusaScriptArguments, MedusaTrainingArguments, name="medusa", embedded_defaults=MEDUSA_EMBEDDED_DEFAULTS,
        argv=argv,
    )
    resume = check_output_dir_or_exit(config, overwrite=args.overwrite_output_dir or reruns_embedded_demo(argv))
    train, held_out = load_data(args, config.seed)
    model, tokenizer = load_model(args, train, config.seed)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding="longest")
    train_ids, held_ids = tokenize(train, tokenizer, args.max_length), tokenize(held_out, tokenizer, args.max_length)
    meter = common.step_meter(args, config)
    trainer = MedusaTrainer(
        model=model, args=config, train_dataset=train_ids, eval_dataset=held_ids, processing_class=tokenizer,
        data_collator=collator, callbacks=[meter], use_liger=args.use_liger,
    )
    measured = common.train_measured(
        trainer, lambda: head_accuracy(trainer.model, held_ids, collator, config.per_device_eval_batch_size),
        resume=resume,
    )
    measured["top1_start"], measured["top1_end"] = measured.pop("start"), measured.pop("end")  # one value a head
    described = {
        "stage": 1 if config.medusa_only_heads else 2,
        "trainer": type(trainer).__name__ + ("" if args.use_liger else " (materialised logits)"),
        "model": args.model_name_or_path or "embedded tiny Llama 3.2",
        "device": str(config.device),
        "medusa_num_heads": config.medusa_num_heads,
    }
    if config.medusa_only_heads and args.model_name_or_path is None:  # the embedded backbone exists nowhere else
        save_base_model(trainer, config.output_dir)
        described["base_model_saved"] = True
    return common.finish_run(trainer, described, measured, meter=meter, eval_rows=len(held_out),
                             printer=print_summary)


if __name__ == "__main__":
    main()
