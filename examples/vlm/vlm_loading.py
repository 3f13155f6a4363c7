"""What the two vision-language examples load alike: a checkpoint, the folder image paths are relative to,
and the thread count of the embedded CPU run."""

from __future__ import annotations

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
