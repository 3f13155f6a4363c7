"""Medusa heads as a model piece: initialisation, Medusa's key layout, the Medusa forward, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaModel

from liger_align.losses.medusa import fused_linear_medusa_loss
from liger_align.models.medusa import (
    MEDUSA_HEADS_FILE,
    add_medusa_heads,
    load_medusa_heads,
    medusa_head_runners,
    save_medusa_heads,
)
from liger_align.testing import build_tiny_llama

V = 97


def tiny(seed: int = 0):
    return build_tiny_llama(V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            seed=seed)


def test_new_heads_start_as_the_model_head_in_medusa_layout() -> None:
    model = tiny()
    heads = add_medusa_heads(model, 3, 2)
    assert model.medusa_head is heads and model.config.medusa_num_heads == 3
    assert list(heads.state_dict()) == [
        f"{k}.{name}" for k in range(3)
        for name in ("0.linear.weight", "0.linear.bias", "1.linear.weight", "1.linear.bias", "2.weight")
    ]
    hidden = torch.randn(2, 5, 32)
    logits = heads(hidden)
    assert logits.shape == (3, 2, 5, V)
    for k in range(3):
        torch.testing.assert_close(logits[k], model.lm_head(hidden), rtol=0, atol=0)
    assert add_medusa_heads(model, 3, 2) is heads
    with pytest.raises(ValueError, match="already has 3 Medusa heads"):
        add_medusa_heads(model, 4, 2)


def test_medusa_forward_runs_the_backbone_then_the_fused_loss() -> None:
    model = tiny(1)
    add_medusa_heads(model, 2, 1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.medusa_head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ids = torch.randint(0, V, (3, 11), generator=gen)
    labels = ids.masked_fill(torch.rand(3, 11, generator=gen) < 0.3, -100)
    mask = torch.ones_like(ids)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    for weights, freeze in (([1.0, 0.5, 0.25], False), ([0.0, 0.5, 0.25], True)):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, medusa_labels=labels, medusa_weights=weights,
                    medusa_freeze_backbone=freeze)
        want = fused_linear_medusa_loss(hidden, labels, medusa_head_runners(model), weights)
        torch.testing.assert_close(out.loss, want.loss)
        assert out.computed.tolist() == [w != 0 for w in weights]
        out.loss.backward()
        body = [p.grad for n, p in model.named_parameters() if n.startswith("model.")]
        assert all(g is None for g in body) if freeze else all(g is not None for g in body)
        assert all(p.grad is not None for p in model.medusa_head.parameters())
    assert model(input_ids=ids).logits.shape == (3, 11, V)  # without medusa_labels: the model's own forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_identical(dtype: torch.dtype, tmp_path: Path) -> None:
    model = tiny(2).to(dtype)
    heads = add_medusa_heads(model, 3, 1)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    path = save_medusa_heads(model, tmp_path, base_model_name_or_path="tiny-llama")
    assert path == tmp_path / MEDUSA_HEADS_FILE
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(f"{k}.{n}" for k in range(3) for n in ("0.linear.weight", "0.linear.bias",
                                                                                  "1.weight"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["medusa_num_layers"] == 1
    assert config["base_model_name_or_path"] == "tiny-llama"
    fresh = tiny(4).to(dtype)
    loaded = load_medusa_heads(fresh, tmp_path)
    saved, got = heads.state_dict(), loaded.state_dict()
    assert list(saved) == list(got)
    for key in saved:
        assert got[key].dtype == dtype and torch.equal(got[key], saved[key]), key
    other = tiny(5)
    add_medusa_heads(other, 2, 1)
    with pytest.raises(ValueError, match="holds 3 heads"):
        load_medusa_heads(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="medusa_lm_head"):
        load_medusa_heads(tiny(6), tmp_path / "missing")


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        add_medusa_heads(tiny(), 0, 1)
    with pytest.raises(ValueError, match="num_layers must be an int >= 0"):
        add_medusa_heads(tiny(), 2, -1)
    body = LlamaModel(tiny().config)
    with pytest.raises(ValueError, match="no output head"):
        add_medusa_heads(body, 2, 1)
