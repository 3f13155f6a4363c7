"""The SFT collator of ``examples/vlm``: image placeholder expansion, mm_token_type_ids, labels, truncation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

VLM = Path(__file__).resolve().parents[1] / "examples" / "vlm"
if str(VLM) not in sys.path:
    sys.path.insert(0, str(VLM))

import vlm_embedded as embedded  # noqa: E402
from vlm_collator import VisionSFTCollator, uses_mm_token_type_ids  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parts():
    return embedded.build_tokenizer(), embedded.build_image_processor()


def test_image_tokens_type_ids_and_labels(parts):
    tokenizer, image_processor = parts
    rows = embedded.caption_rows(9, seed=3)
    rows[4] = dict(rows[4], image=[rows[4]["image"], rows[5]["image"]])  # a row with two images
    batch = VisionSFTCollator(tokenizer, image_processor)(rows)
    image_id = tokenizer.convert_tokens_to_ids(embedded.IMAGE_PAD)
    merge = image_processor.merge_size
    grid = batch["image_grid_thw"]
    assert grid.shape == (10, 3) and len({tuple(g) for g in grid.tolist()}) > 1  # images of different grids
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    per_image = (grid.prod(-1) // merge**2).tolist()
    expected_rows = per_image[:4] + [per_image[4] + per_image[5]] + per_image[6:]
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (ids == image_id).sum(-1).tolist() == expected_rows
    assert torch.equal(batch["mm_token_type_ids"], (ids == image_id).long())
    eos = tokenizer.eos_token_id
    for i, row in enumerate(rows):
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos]
        kept = labels[i][labels[i] != -100].tolist()
        assert kept == answer  # the completion and its EOS, nothing else
        length = int(mask[i].sum())
        assert labels[i, length - 1] == eos and ids[i, length - 1] == eos
        assert (labels[i, length:] == -100).all() and (ids[i, length:] == tokenizer.pad_token_id).all()
        assert (labels[i][ids[i] == image_id] == -100).all()
        first = int((labels[i] != -100).int().argmax())
        assert tokenizer.convert_ids_to_tokens(ids[i, first - 2: first].tolist()) == [embedded.IM_START, "assistant"]


def test_batch_runs_through_the_model(parts):
    tokenizer, image_processor = parts
    model = embedded.build_tiny_qwen2_vl(tokenizer)
    assert uses_mm_token_type_ids(model)
    batch = VisionSFTCollator(tokenizer, image_processor, mm_token_type_ids=uses_mm_token_type_ids(model))(
        embedded.caption_rows(3))
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape


def test_truncation(parts):
    tokenizer, image_processor = parts
    rows = embedded.caption_rows(2, seed=1)
    full = VisionSFTCollator(tokenizer, image_processor)(rows)
    lengths = full["attention_mask"].sum(-1)
    cut = VisionSFTCollator(tokenizer, image_processor, max_length=int(lengths.min()) - 1)(rows)
    assert cut["input_ids"].shape[1] == int(lengths.min()) - 1  # the completion's end is cut, images kept
    assert (cut["input_ids"] == tokenizer.convert_tokens_to_ids(embedded.IMAGE_PAD)).sum() == \
        (full["input_ids"] == tokenizer.convert_tokens_to_ids(embedded.IMAGE_PAD)).sum()
    with pytest.raises(ValueError, match=r"max_length=6 would cut a row inside its image tokens"):
        VisionSFTCollator(tokenizer, image_processor, max_length=6)(rows)


def test_bad_setup(parts):
    tokenizer, image_processor = parts
    with pytest.raises(ValueError, match="image_token '<no-such>' is not a token"):
        VisionSFTCollator(tokenizer, image_processor, image_token="<no-such>")
