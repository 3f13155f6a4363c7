"""Fine-tune Qwen2-VL on image-text pairs with the Hugging Face ``Trainer``; ``--use_liger`` (default) applies
liger_align's Qwen2-VL patch (RMSNorm, SwiGLU, M-RoPE and vision RoPE, the vision LayerNorms, and the loss
without the ``[tokens, vocab]`` logits)::

    from liger_align.models import apply_liger_kernel_to_qwen2_vl
    handle = apply_liger_kernel_to_qwen2_vl(model=model)   # handle.states says what was patched

With no arguments the embedded default runs: a tiny Qwen2-VL built from a config, a local tokenizer with
Qwen's special tokens and chat template, and generated pictures of coloured shapes captioned "a red square";
it prints the held-out colour-word accuracy before and after training (about 1/3 before). With
``--model_name_or_path`` a real checkpoint (Qwen2-VL or Qwen2.5-VL) and its ``AutoProcessor`` are loaded and
every ``TrainingArguments`` flag works::

    python examples/vlm/run_qwen2_vl.py
    accelerate launch --config_file examples/vlm/fsdp.yaml examples/vlm/run_qwen2_vl.py \\
        --model_name_or_path Qwen/Qwen2-VL-2B-Instruct --dataset_name captions.jsonl --bf16 \\
        --per_device_train_batch_size 8 --gradient_checkpointing --learning_rate 1e-5 --output_dir outputs/qwen2_vl

A data set has the columns ``image`` (a file path, relative to the data file's folder or absolute),
``prompt`` and ``completion``; the loss covers the completion and its EOS. ``--no-use_liger`` trains the
unpatched model, for comparison.

``--output_dir`` gets the trained model (``model.safetensors``, ``config.json``) and its processor
(``processor_config.json`` naming ``Qwen2VLProcessor``, the tokenizer's files, the chat template), which reload
with transformers alone (no liger_align: its patches change no weight name)::

    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained("outputs/qwen2_vl")   # Qwen2VLForConditionalGeneration
    processor = AutoProcessor.from_pretrained("outputs/qwen2_vl")             # Qwen2VLProcessor

``AutoProcessor`` needs torchvision here as for any Qwen2-VL checkpoint (for the video processor); without
it, ``AutoImageProcessor.from_pretrained`` and ``AutoTokenizer.from_pretrained`` of the folder give the image
processor (Qwen2-VL's PIL one) and the tokenizer, which ``vlm_collator.VisionSFTCollator`` batches.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "alignment")]
import common  # noqa: E402
import vlm_embedded as embedded  # noqa: E402
import vocabulary_check  # noqa: E402
from cli import AlignmentScriptArguments  # noqa: E402
from loading import first_split  # noqa: E402
from preflight import check_output_dir_or_exit, reruns_embedded_demo  # noqa: E402
from vlm_collator import VisionSFTCollator, uses_mm_token_type_ids  # noqa: E402
from vlm_loading import data_root, limit_threads, load_checkpoint, standard_processor  # noqa: E402

common.add_repo_to_path()
from liger_align.models import apply_liger_kernel  # noqa: E402

VLM_EMBEDDED_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32, "learning_rate": 4e-3,
    "num_train_epochs": 4, "warmup_steps": 5, "logging_steps": 10, "max_length": 64,
    "remove_unused_columns": False,
}


@dataclass
class VLMScriptArguments(AlignmentScriptArguments):
    """The examples' arguments (``--overwrite_output_dir`` included), the sequence length, the embedded data's sizes."""

    max_length: int = field(default=1024, metadata={"help": "Longest row in tokens (image tokens included)."})
    train_images: int = field(default=480, metadata={"help": "Embedded default: generated training images."})
    eval_images: int = field(default=60, metadata={"help": "Embedded default: generated held-out images."})


class ImageRows(torch.utils.data.Dataset):
    """Rows of a ``datasets.Dataset`` with an ``image`` path column, opened as RGB PIL images on access."""

    def __init__(self, rows: Any, root: Path) -> None:
        self.rows, self.root = rows, root

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        row = dict(self.rows[i])
        if isinstance(row["image"], str):
            path = Path(row["image"])
            row["image"] = Image.open(path if path.is_absolute() else self.root / path).convert("RGB")
        return row


def load_data(args: VLMScriptArguments, seed: int) -> tuple[Any, Any]:
    """(train, held-out) rows: generated for the embedded default, else ``--dataset_name`` split as usual."""
    if args.dataset_name is None:
        return (embedded.caption_rows(args.train_images, seed=seed),
                embedded.caption_rows(args.eval_images, seed=seed + 1))
    raw = common.load_raw_dataset(args.dataset_name, args.dataset_config)
    common.check_columns(
        first_split(raw), ("image", "prompt", "completion"), what=f"--dataset_name {args.dataset_name!r}"
    )
    train, held_out = common.split_dataset(raw, args, seed)
    root = data_root(args.dataset_name)
    return ImageRows(train, root), ImageRows(held_out, root)


def load_model(args: VLMScriptArguments, seed: int) -> tuple[Any, Any, Any, Any]:
    """(model, tokenizer, image processor, processor to save): the embedded tiny Qwen2-VL, or the checkpoint and
    its processor. The last is what ``--output_dir`` gets beside the model, for ``AutoProcessor``: the checkpoint's
    own processor, or (embedded, or no torchvision) the standard one of the tokenizer and image processor."""
    if args.model_name_or_path is None:
        tokenizer = embedded.build_tokenizer()
        model, image_processor = embedded.build_tiny_qwen2_vl(tokenizer, seed=seed), embedded.build_image_processor()
        return model, tokenizer, image_processor, standard_processor((tokenizer, image_processor), model)
    from transformers import AutoProcessor

    model = load_checkpoint(args)
    try:
        processor = AutoProcessor.from_pretrained(args.model_name_or_path)
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
    except (ImportError, ValueError, AttributeError):  # no torchvision: the PIL image processor
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(args.model_name_or_path)
        processor = (tokenizer, image_processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, image_processor, standard_processor(processor, model)


@torch.no_grad()
def colour_accuracy(model: Any, collator: VisionSFTCollator, rows: list[dict[str, Any]], batch_size: int = 32) -> float:
    """Held-out accuracy of the colour word: at the caption's second token ("a <colour> <shape>"), is the
    most likely of the colour words the image's colour? A model blind to the image scores about 1/3."""
    names = list(embedded.COLOURS)
    colour_ids = torch.tensor([collator.tokenizer.convert_tokens_to_ids(c) for c in names])
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        first = (labels != -100).int().argmax(-1)  # "a"; the colour follows, predicted at the position of "a"
        picked = logits[torch.arange(len(chunk), device=device), first][:, colour_ids.to(device)]
        truth = torch.tensor([names.index(r["colour"]) for r in chunk], device=device)
        right += int((picked.argmax(-1) == truth).sum())
    model.train(was_training)
    return right / max(len(rows), 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, build everything, train, save; print and return the summary.

    A non-empty ``--output_dir`` is refused (``error: ...``, exit status 2) before anything is loaded,
    unless ``--overwrite_output_dir`` or ``--resume_from_checkpoint``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = common.parse_script_and_config(
        VLMScriptArguments, TrainingArguments, name="qwen2_vl", embedded_defaults=VLM_EMBEDDED_DEFAULTS, argv=argv
    )
    resume = check_output_dir_or_exit(config, overwrite=args.overwrite_output_dir or reruns_embedded_demo(argv))
    limit_threads(args, config)
    model, tokenizer, image_processor, saved_processor = load_model(args, config.seed)
    train, held_out = load_data(args, config.seed)
    vocabulary_check.warn_unknown_words(getattr(train, "rows", train), tokenizer, args)
    collator = VisionSFTCollator(tokenizer, image_processor, max_length=args.max_length,
                                 mm_token_type_ids=uses_mm_token_type_ids(model))
    patched: dict[str, str] = {}
    if args.use_liger:
        handle = apply_liger_kernel(model)
        patched = dict(getattr(handle, "states", None) or {"patched": handle.summary()})
        print(f"liger_align: {handle.summary()}")

    meter = common.step_meter(args, config)
    trainer = Trainer(model=model, args=config, train_dataset=train, eval_dataset=held_out,
                      data_collator=collator, processing_class=tokenizer, callbacks=[meter])
    embedded_data = args.dataset_name is None

    def metrics() -> dict[str, float]:
        out = {"eval_loss": trainer.evaluate()["eval_loss"]}
        if embedded_data:
            out["colour_accuracy"] = colour_accuracy(model, collator, held_out)
        return out

    measured = common.train_measured(trainer, metrics, resume=resume)
    described = {
        "algorithm": "sft (vision-language)",
        "trainer": "Trainer" + (" + liger_align Qwen2-VL patch" if args.use_liger else ""),
        "model": args.model_name_or_path or "embedded tiny Qwen2-VL",
        "device": str(config.device),
        "patched": patched,
    }
    return common.finish_run(trainer, described, measured, meter=meter, eval_rows=len(held_out),
                             save_with=saved_processor)


if __name__ == "__main__":
    main()
