"""The embedded default of the vision-language examples: a local tokenizer with Qwen's special tokens and a
chat template, a tiny Qwen2-VL built from a config, and generated images of coloured shapes with captions.

The builders live in the library (``liger_align.testing.tiny_qwen2_vl``, which the tests use too); this
module keeps the names the examples use. Nothing here reaches the network or needs torchvision::

    from vlm_embedded import build_tokenizer, build_tiny_qwen2_vl, caption_rows
    tokenizer = build_tokenizer()
    model = build_tiny_qwen2_vl(tokenizer)
    rows = caption_rows(64, seed=0)     # [{"image": PIL.Image, "prompt": str, "completion": str, "colour": str}]
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
if (_REPO / "liger_align").is_dir() and str(_REPO) not in sys.path:  # a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO))

from liger_align.testing.tiny_qwen2_vl import (  # noqa: E402
    CHAT_TEMPLATE,
    COLOURS,
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_SIZES,
    PAD,
    PROMPT,
    QWEN_SPECIAL_TOKENS,
    SHAPES,
    UNK,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    ImageOnlyQwen2VLProcessor,
    build_image_processor,
    build_processor,
    build_tiny_qwen2_vl,
    build_tokenizer,
    caption_rows,
    draw,
    preference_rows,
)

__all__ = [
    "CHAT_TEMPLATE", "COLOURS", "IMAGE_PAD", "IMAGE_SIZES", "IM_END", "IM_START", "PAD", "PROMPT",
    "QWEN_SPECIAL_TOKENS", "SHAPES", "UNK", "VIDEO_PAD", "VISION_END", "VISION_START", "ImageOnlyQwen2VLProcessor",
    "build_image_processor", "build_processor", "build_tiny_qwen2_vl", "build_tokenizer", "caption_rows", "draw",
    "preference_rows",
]
