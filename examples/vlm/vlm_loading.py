"""What the two vision-language examples load and save alike: a checkpoint, the folder image paths are relative
to, the thread count of the embedded CPU run, and the processor saved beside the model (:func:`standard_processor`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from cli import ScriptArguments
from loading import load_dtype
from transformers import TrainingArguments


def limit_threads(args: ScriptArguments, config: TrainingArguments) -> None:
    """One CPU thread for the embedded run on a CPU: a model this small gains nothing from more threads, and
    OpenMP threads on a busy machine spin-wait."""
    if args.model_name_or_path is None and config.device.type == "cpu":
        torch.set_num_threads(1)


def data_root(dataset_name: str) -> Path:
    """The folder that relative image paths of ``--dataset_name`` start from: the data file's folder, or the
    data set's folder."""
    root = Path(dataset_name).expanduser().resolve()
    return root.parent if root.is_file() else root


def load_checkpoint(args: ScriptArguments) -> Any:
    """``--model_name_or_path`` as an image-text-to-text model (Qwen2-VL, Qwen2.5-VL) in ``--dtype``."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=load_dtype(args))


# The standard processor class of each family (what ``AutoProcessor`` builds for the saved folder) and the video
# processor class its ``processor_config.json`` names.
PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
VIDEO_PROCESSOR_CLASS = "Qwen2VLVideoProcessor"
# The image processor's settings the video processor shares (patching, merging, normalisation).
_SHARED_WITH_VIDEO = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "do_convert_rgb",
                      "do_rescale", "rescale_factor", "do_normalize", "resample")


class StandardProcessor:
    """A tokenizer and an image processor that ``save_pretrained`` as the model family's standard processor.

    The folder then holds what a Qwen2-VL checkpoint holds: ``processor_config.json`` (``processor_class``
    ``Qwen2VLProcessor``, or ``Qwen2_5_VLProcessor`` for Qwen2.5-VL, with the image processor's settings and a
    ``Qwen2VLVideoProcessor`` sharing its patching and normalisation), the tokenizer's files and the chat
    template. ``AutoProcessor.from_pretrained(folder)`` returns that processor; like every Qwen2-VL processor it
    needs torchvision (for the video processor). Without torchvision, ``AutoImageProcessor.from_pretrained``
    (Qwen2-VL's PIL image processor) and ``AutoTokenizer.from_pretrained`` load the two parts.

    The examples train with a processor that transformers cannot build without torchvision (the embedded
    image-only one, or a tokenizer and the PIL image processor); this writes the standard one in its place.
    For a family not in :data:`PROCESSOR_CLASSES` the tokenizer and the image processor are saved as they are.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, model_type: str = "qwen2_vl") -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.processor_class = PROCESSOR_CLASSES.get(model_type)  # None: another family, its parts saved apart

    def save_pretrained(self, folder: str | Path) -> None:
        from liger_align.testing.tiny_qwen2_vl import ImageOnlyQwen2VLProcessor

        folder = Path(folder)
        if self.processor_class is None:
            self.tokenizer.save_pretrained(str(folder))
            self.image_processor.save_pretrained(str(folder))
            return
        # The image-only processor writes the tokenizer, the chat template and the image processor as transformers
        # lays them out; the class names and the video processor are then those of the standard processor.
        ImageOnlyQwen2VLProcessor(self.image_processor, self.tokenizer,
                                  chat_template=self.tokenizer.chat_template).save_pretrained(str(folder))
        config_path = folder / "processor_config.json"
        config = json.loads(config_path.read_text())
        image = config["image_processor"]
        config["video_processor"] = {"video_processor_type": VIDEO_PROCESSOR_CLASS,
                                     **{k: image[k] for k in _SHARED_WITH_VIDEO if k in image}}
        config["processor_class"] = self.processor_class
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer_config = folder / "tokenizer_config.json"
        if tokenizer_config.is_file():
            values = json.loads(tokenizer_config.read_text())
            values["processor_class"] = self.processor_class
            tokenizer_config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def standard_processor(processor: Any, model: Any) -> Any:
    """What the examples save beside ``model``: ``processor`` itself when it is a standard transformers processor
    (``AutoProcessor`` loaded it from a checkpoint), else (the embedded image-only processor, or a tokenizer and
    an image processor given as ``(tokenizer, image_processor)``) a :class:`StandardProcessor` of the same parts."""
    import transformers

    if not isinstance(processor, tuple) and getattr(transformers, type(processor).__name__, None) is type(processor):
        return processor
    tokenizer, image_processor = processor if isinstance(processor, tuple) else (
        processor.tokenizer, processor.image_processor)
    return StandardProcessor(tokenizer, image_processor, getattr(model.config, "model_type", "qwen2_vl"))
