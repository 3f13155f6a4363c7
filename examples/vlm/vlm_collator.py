"""A supervised fine-tuning collator for Qwen2-VL-style models that expands the image placeholders itself.

Each row is ``{"image": PIL.Image (or a list of them), "prompt": str, "completion": str}``. The prompt is one
user turn (the images, then the prompt text) through the tokenizer's chat template with the generation
prompt; the completion's tokens and the EOS follow. The collator needs only a tokenizer and an image
processor (Qwen2-VL's PIL one works without torchvision, unlike ``Qwen2VLProcessor``):

- ``pixel_values (patches, C * temporal_patch * patch^2)`` and ``image_grid_thw (images, 3)`` come from the
  image processor, in the batch's row order;
- each image's single ``<|image_pad|>`` placeholder becomes ``t * h * w / merge^2`` copies (``merge`` =
  the image processor's ``merge_size``), the count the vision tower's patch merger produces;
- ``mm_token_type_ids (B, T)`` is 1 exactly on image tokens (``mm_token_type_ids=True``; transformers 5.x
  builds the M-RoPE positions from it), 0 elsewhere;
- ``labels`` are ``-100`` on the prompt (image tokens and vision markers included) and on padding; the
  completion and its EOS are kept;
- ``max_length``: a longer row loses the end of its completion; a cut inside the prompt's image tokens is a
  ``ValueError`` (it would leave ``pixel_values`` without their tokens).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


def uses_mm_token_type_ids(model: Any) -> bool:
    """Whether this transformers' ``model`` (a Qwen2-VL-style model) takes ``mm_token_type_ids`` in its forward."""
    forward = type(model).forward
    return "mm_token_type_ids" in inspect.signature(forward).parameters


@dataclass
class VisionSFTCollator:
    """Batch ``{"image", "prompt", "completion"}`` rows for ``Qwen2VLForConditionalGeneration`` (module docstring).

    Args:
        tokenizer: with a chat template that renders an ``{"type": "image"}`` part as one ``image_token``.
        image_processor: returns ``pixel_values`` and ``image_grid_thw`` and has ``merge_size``.
        image_token: the placeholder token (Qwen2-VL: ``<|image_pad|>``).
        max_length: longest row in tokens, or None.
        mm_token_type_ids: add ``mm_token_type_ids`` to the batch.
    """

    tokenizer: Any
    image_processor: Any
    image_token: str = "<|image_pad|>"
    max_length: int | None = None
    mm_token_type_ids: bool = True

    def __post_init__(self) -> None:
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"image_token {self.image_token!r} is not a token of the tokenizer")
        if self.tokenizer.eos_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs an eos_token and a pad_token")

    def _prompt_ids(self, n_images: int, prompt: str) -> list[int]:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, row: dict[str, Any], tokens_per_image: list[int]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one row whose images need ``tokens_per_image`` placeholder tokens each."""
        prompt = self._prompt_ids(len(tokens_per_image), row["prompt"])
        found = [i for i, t in enumerate(prompt) if t == self.image_token_id]
        if len(found) != len(tokens_per_image):
            raise ValueError(f"the chat template rendered {len(found)} {self.image_token} placeholders for "
                             f"{len(tokens_per_image)} image(s)")
        expanded: list[int] = []
        last = 0
        for at, count in zip(found, tokens_per_image):
            expanded += prompt[last:at] + [self.image_token_id] * count
            last = at + 1
        expanded += prompt[last:]
        answer = self.tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        answer = answer + [self.tokenizer.eos_token_id]
        ids, labels = expanded + answer, [IGNORE_INDEX] * len(expanded) + answer
        if self.max_length is not None and len(ids) > self.max_length:
            kept_images = sum(1 for t in ids[: self.max_length] if t == self.image_token_id)
            if kept_images < sum(tokens_per_image):
                raise ValueError(
                    f"max_length={self.max_length} would cut a row inside its image tokens (the prompt needs "
                    f"{len(expanded)} tokens, {sum(tokens_per_image)} of them for the image(s)); raise max_length "
                    "or use smaller images"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images_per_row = [r["image"] if isinstance(r["image"], (list, tuple)) else [r["image"]] for r in rows]
        flat = [image for images in images_per_row for image in images]
        vision = self.image_processor(images=flat, return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = self.image_processor.merge_size
        counts = (grid.prod(-1) // merge**2).tolist()
        encoded, start = [], 0
        for row, images in zip(rows, images_per_row):
            encoded.append(self.encode(row, counts[start: start + len(images)]))
            start += len(images)
        width = max(len(ids) for ids, _ in encoded)
        batch = len(rows)
        input_ids = torch.full((batch, width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(ids)] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "pixel_values": vision["pixel_values"], "image_grid_thw": grid}
        if self.mm_token_type_ids:
            out["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        return out
