"""The tiny vision-language setup: a local tokenizer with Qwen's special tokens and a chat template, Qwen2-VL's
PIL image processor, a tiny Qwen2-VL built from a config, and generated images of coloured shapes with captions.

Nothing here reaches the network or needs torchvision; ``tokenizers`` and ``pillow`` (the ``dev`` extra) are
imported when a tokenizer or an image is made. The task is learnable by a tiny model in seconds: each image
shows one shape (square, circle or triangle) in one colour (red, green or blue) on a noisy grey background;
the caption is ``"a red square"``. A model that does not look at the image names the colour right one time
in three.

    from liger_align.testing.tiny_qwen2_vl import build_tokenizer, build_tiny_qwen2_vl, caption_rows
    tokenizer = build_tokenizer()
    model = build_tiny_qwen2_vl(tokenizer)
    rows = caption_rows(64, seed=0)     # [{"image": PIL.Image, "prompt": str, "completion": str, "colour": str}]
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import torch
from transformers import Qwen2VLProcessor

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
UNK = "<unk>"
QWEN_SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Qwen2-VL's chat format: "<|im_start|>role\n...<|im_end|>\n"; an image part is "<|vision_start|><|image_pad|>
# <|vision_end|>" (one placeholder, expanded to the image's token count by the collator or the processor).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COLOURS = {"red": (215, 40, 35), "green": (40, 175, 60), "blue": (40, 75, 215)}
SHAPES = ("square", "circle", "triangle")
# (height, width) in pixels, multiples of patch 14 x merge 2 = 28: grids (1, 4, 4), (1, 4, 6), (1, 6, 4)
IMAGE_SIZES = ((56, 56), (56, 84), (84, 56))
PROMPT = "what is in the picture ?"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the captions' words, with Qwen2-VL's special tokens and chat template.

    ``<|im_end|>`` is the EOS (as in Qwen2-VL-Instruct), ``<|endoftext|>`` pads; deterministic.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [PROMPT, "a", *COLOURS, *SHAPES, "user assistant system"]
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(words, trainer=trainers.WordLevelTrainer(special_tokens=[*QWEN_SPECIAL_TOKENS, UNK]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]), model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor() -> Any:
    """Qwen2-VL's PIL image processor (no torchvision): patch 14, merge 2, temporal patch 2, CLIP normalisation."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=448 * 448)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor (which needs torchvision): images and text only.

    TRL's vision trainers (``DPOTrainer``, ``KTOTrainer``) take a processor as ``processing_class``.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> ImageOnlyQwen2VLProcessor:
    tokenizer = tokenizer or build_tokenizer()
    return ImageOnlyQwen2VLProcessor(build_image_processor(), tokenizer, chat_template=tokenizer.chat_template)


def build_tiny_qwen2_vl(
    tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 64, num_hidden_layers: int = 2,
    vision_depth: int = 2, vision_dim: int = 32, seed: int = 0,
) -> Qwen2VLForConditionalGeneration:
    """A randomly initialised Qwen2-VL at a tiny size, fp32, sized to ``tokenizer`` (its special-token ids).

    Text: ``hidden_size``, ``num_hidden_layers``, 4 heads / 2 kv heads, SwiGLU ``2.75 * hidden``, M-RoPE with
    sections ``[2, 3, 3]`` of the head dim 16. Vision: ``vision_depth`` blocks of ``vision_dim`` (4 heads,
    LayerNorm, quick-GELU MLP x2), patch 14, 2x2 merge into the text width. Weights depend only on ``seed``.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
        ("vision_end_token_id", VISION_END))}
    heads = 4
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=int(2.75 * hidden_size),
            num_hidden_layers=num_hidden_layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=1024, rms_norm_eps=1e-6, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": _mrope_section(hidden_size // heads)},
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden_size, num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        tie_word_embeddings=False, **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal / height / width shares of ``head_dim / 2`` rotary frequencies (Qwen2-VL: 16, 24, 24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def draw(colour: str, shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """One ``size = (height, width)`` RGB image: a ``colour`` ``shape`` on a noisy grey background."""
    import numpy as np
    from PIL import Image, ImageDraw

    height, width = size
    grey = rng.randint(90, 165)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-12, 13, (height, width, 3))
    image = Image.fromarray(np.clip(grey + noise, 0, 255).astype(np.uint8))
    side = rng.randint(int(0.45 * min(size)), int(0.8 * min(size)))
    x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    canvas = ImageDraw.Draw(image)
    box = (x0, y0, x0 + side, y0 + side)
    if shape == "square":
        canvas.rectangle(box, fill=fill)
    elif shape == "circle":
        canvas.ellipse(box, fill=fill)
    else:
        canvas.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


def caption_rows(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` captioning rows ``{"image", "prompt", "completion", "colour"}``; colours and shapes cycle evenly."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        size = IMAGE_SIZES[rng.randrange(len(IMAGE_SIZES))]
        rows.append({"image": draw(colour, shape, size, rng), "prompt": PROMPT,
                     "completion": f"a {colour} {shape}", "colour": colour})
    rng.shuffle(rows)
    return rows


def preference_rows(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` image preference pairs in TRL's conversational vision format.

    ``{"images": [PIL], "prompt": [user turn], "chosen": [assistant turn], "rejected": [assistant turn]}``
    (string contents; TRL's collator puts the image before the first user text): the chosen caption names the
    image's colour, the rejected one another colour (same shape).
    """
    rng = random.Random(seed + 7919)
    pairs = []
    for row in caption_rows(n, seed=seed):
        wrong = rng.choice([c for c in COLOURS if c != row["colour"]])
        shape = row["completion"].split()[-1]
        pairs.append({
            "images": [row["image"]],
            "prompt": [{"role": "user", "content": PROMPT}],
            "chosen": [{"role": "assistant", "content": row["completion"]}],
            "rejected": [{"role": "assistant", "content": f"a {wrong} {shape}"}],
        })
    return pairs
