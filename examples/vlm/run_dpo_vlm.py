"""Preference training on images: DPO (Rafailov et al., 2023) of Qwen2-VL with liger_align's ``LigerDPOTrainer``.

TRL's ``DPOTrainer`` handles vision-language models: its collator turns each pair's images into
``pixel_values`` / ``image_grid_thw`` (and ``mm_token_type_ids``), and every forward passes them to the model.
``LigerDPOTrainer`` keeps all of that and computes the policy's and the reference's per-token log-probs with
liger_align's fused head (no ``[tokens, vocab]`` logits), with the Qwen2-VL kernel patches on both towers.

With no arguments the embedded default runs: a tiny Qwen2-VL, a local tokenizer and processor (Qwen2-VL's PIL
image processor: no torchvision), and pairs of captions of generated pictures where the chosen caption names
the shape's colour and the rejected one another colour; it prints the held-out image preference accuracy
(does the policy give the chosen caption the higher log-probability?) before and after. With
``--model_name_or_path`` a real checkpoint and its ``AutoProcessor`` are used and every ``DPOConfig`` flag works::

    python examples/vlm/run_dpo_vlm.py
    accelerate launch --config_file examples/vlm/fsdp.yaml examples/vlm/run_dpo_vlm.py \\
        --model_name_or_path Qwen/Qwen2-VL-2B-Instruct --dataset_name image_prefs.jsonl --bf16 --beta 0.1 \\
        --per_device_train_batch_size 4 --gradient_checkpointing --learning_rate 5e-7 --output_dir outputs/dpo_vlm

A data set has TRL's vision preference columns: ``image`` (a file path) or ``images`` (a list of paths),
and ``prompt``, ``chosen``, ``rejected`` (strings or conversational turns). ``--no-use_liger`` runs TRL's
``DPOTrainer``, for comparison.

``--output_dir`` gets the trained policy and a standard processor: the embedded run trains with an
image-only processor (``ImageOnlyQwen2VLProcessor``: no video processor, so no torchvision), and saves a
``Qwen2VLProcessor`` of the same tokenizer and image processor in its place (a checkpoint's own processor is
saved as it is). Both reload with transformers alone::

    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained("outputs/dpo_vlm")   # Qwen2VLForConditionalGeneration
    processor = AutoProcessor.from_pretrained("outputs/dpo_vlm")             # Qwen2VLProcessor

``AutoProcessor`` needs torchvision, as for any Qwen2-VL checkpoint; without it ``AutoImageProcessor`` and
``AutoTokenizer`` load the two parts (see ``run_qwen2_vl.py``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "alignment")]
import common  # noqa: E402
import vlm_embedded as embedded  # noqa: E402
import vocabulary_check  # noqa: E402
from cli import AlignmentScriptArguments  # noqa: E402
from loading import first_split, reference_copy  # noqa: E402
from preflight import check_output_dir_or_exit, reruns_embedded_demo  # noqa: E402
from vlm_loading import data_root, limit_threads, load_checkpoint, standard_processor  # noqa: E402

common.add_repo_to_path()
from liger_align.trainers import LigerDPOTrainer  # noqa: E402

DPO_VLM_EMBEDDED_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16, "learning_rate": 1e-3, "beta": 0.1,
    "num_train_epochs": 4, "warmup_steps": 3, "logging_steps": 5, "max_length": 64,
}


@dataclass
class DPOVLMScriptArguments(AlignmentScriptArguments):
    """The examples' arguments (``--overwrite_output_dir`` included) plus the embedded data set's sizes."""

    train_pairs: int = field(default=480, metadata={"help": "Embedded default: generated training pairs."})
    eval_pairs: int = field(default=48, metadata={"help": "Embedded default: generated held-out pairs."})


def load_pairs(args: DPOVLMScriptArguments, seed: int) -> tuple[Any, Any]:
    """(train, held-out) ``datasets.Dataset``\\ s in TRL's vision preference format."""
    from datasets import Dataset, Image, Sequence

    if args.dataset_name is None:
        return (Dataset.from_list(embedded.preference_rows(args.train_pairs, seed=seed)),
                Dataset.from_list(embedded.preference_rows(args.eval_pairs, seed=seed + 1)))
    raw = common.load_raw_dataset(args.dataset_name, args.dataset_config)
    first = first_split(raw)
    image_column = "images" if "images" in first.column_names else "image"
    common.check_columns(first, (image_column, "prompt", "chosen", "rejected"),
                         what=f"--dataset_name {args.dataset_name!r} for DPO on images")
    feature = Sequence(Image()) if image_column == "images" else Image()
    root = data_root(args.dataset_name)

    def absolute(row: dict[str, Any]) -> dict[str, Any]:
        fix = lambda p: p if not isinstance(p, str) or Path(p).is_absolute() else str(root / p)  # noqa: E731
        value = row[image_column]
        return {image_column: [fix(p) for p in value] if isinstance(value, list) else fix(value)}

    raw = raw.map(absolute).cast_column(image_column, feature)
    return common.split_dataset(raw, args, seed)


def load_model(args: DPOVLMScriptArguments, seed: int) -> tuple[Any, Any]:
    """(model, processor): the embedded tiny Qwen2-VL and an image-only processor, or the checkpoint's."""
    if args.model_name_or_path is None:
        processor = embedded.build_processor()
        return embedded.build_tiny_qwen2_vl(processor.tokenizer, seed=seed), processor
    from transformers import AutoProcessor

    return load_checkpoint(args), AutoProcessor.from_pretrained(args.model_name_or_path)


@torch.no_grad()
def image_preference_accuracy(model: Any, collator: Any, pairs: Any, batch_size: int = 16) -> float:
    """Fraction of held-out pairs whose chosen completion gets the higher summed log-probability under ``model``
    (given the pair's image and prompt); independent of any trainer's metrics. A tie counts as wrong."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = total = 0
    for start in range(0, len(pairs), batch_size):
        rows = [dict(pairs[i]) for i in range(start, min(start + batch_size, len(pairs)))]
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        completion = batch.pop("completion_mask")
        logits = model(**batch).logits[:, :-1].float()
        target = batch["input_ids"][:, 1:]
        logps = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0] * completion[:, 1:]
        chosen, rejected = logps.sum(-1).chunk(2)
        wins += int((chosen > rejected).sum())
        total += len(rows)
    model.train(was_training)
    return wins / max(total, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, build everything, train, save; print and return the summary.

    A non-empty ``--output_dir`` is refused (``error: ...``, exit status 2) before anything is loaded,
    unless ``--overwrite_output_dir`` or ``--resume_from_checkpoint``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = common.parse_script_and_config(
        DPOVLMScriptArguments, DPOConfig, name="dpo_vlm", embedded_defaults=DPO_VLM_EMBEDDED_DEFAULTS, argv=argv
    )
    resume = check_output_dir_or_exit(config, overwrite=args.overwrite_output_dir or reruns_embedded_demo(argv))
    limit_threads(args, config)
    model, processor = load_model(args, config.seed)
    train, held_out = load_pairs(args, config.seed)
    vocabulary_check.warn_unknown_words(train, processor.tokenizer, args)
    kwargs: dict[str, Any] = {}
    if args.model_name_or_path is None:  # TRL loads the reference from the model's path; the embedded model has none
        kwargs["ref_model"] = reference_copy(model)
    trainer_class = LigerDPOTrainer if args.use_liger else DPOTrainer
    meter = common.step_meter(args, config)
    trainer = trainer_class(model=model, args=config, train_dataset=train, eval_dataset=held_out,
                            processing_class=processor, callbacks=[meter], **kwargs)
    if args.use_liger and trainer.liger_patch_handles:
        print(f"liger_align: {trainer.liger_patch_handles[0].summary()}")

    def metrics() -> dict[str, float]:
        out = {k: float(v) for k, v in trainer.evaluate().items() if k.startswith("eval_rewards/")}
        out["image_preference_accuracy"] = image_preference_accuracy(
            trainer.model, trainer.data_collator, held_out, batch_size=config.per_device_eval_batch_size)
        return out

    measured = common.train_measured(trainer, metrics, resume=resume)
    described = {
        "algorithm": "dpo (images)",
        "trainer": type(trainer).__name__,
        "model": args.model_name_or_path or "embedded tiny Qwen2-VL",
        "device": str(trainer.args.device),
    }
    return common.finish_run(  # the standard processor in place of the embedded image-only one (docstring)
        trainer, described, measured, meter=meter, eval_rows=len(held_out),
        save_with=standard_processor(processor, trainer.model),
    )


if __name__ == "__main__":
    main()
