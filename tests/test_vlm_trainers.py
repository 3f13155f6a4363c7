"""Preference training on images: LigerDPOTrainer and LigerKTOTrainer on a tiny Qwen2-VL match TRL's trainers.

Same weights, data and seed; TRL's own vision collator turns the image pairs into ``pixel_values``,
``image_grid_thw`` and ``mm_token_type_ids`` for both. Every number TRL logs over 3 steps and the final
evaluation (loss, grad_norm, rewards, log-probs, logits, entropy, accuracies) agrees within 2e-4, the head
never builds ``[tokens, vocab]`` logits in training, TRL's own chunked kernel is never called, and the
Qwen2-VL kernels ran on both towers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from _helpers import Forbidden, assert_logs_match, no_logits_guard
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from liger_align.testing import tiny_qwen2_vl as embedded
from liger_align.trainers import LigerDPOTrainer, LigerKTOTrainer

pytestmark = pytest.mark.slow


def unpaired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        for key, label in (("chosen", True), ("rejected", False)):
            out.append({"images": row["images"], "prompt": row["prompt"], "completion": row[key], "label": label})
    return out


def train_and_eval(trainer_cls: type, config_cls: type, tmp: Path, *, kto: bool) -> tuple[list[dict], Any]:
    processor = embedded.build_processor()
    model = embedded.build_tiny_qwen2_vl(processor.tokenizer, seed=0)
    train_rows, eval_rows = embedded.preference_rows(12, seed=0), embedded.preference_rows(8, seed=1)
    if kto:
        train_rows, eval_rows = unpaired(train_rows), unpaired(eval_rows)
    args = config_cls(
        output_dir=str(tmp), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=3, logging_steps=1,
        learning_rate=1e-3, report_to=[], save_strategy="no", max_length=64, use_cpu=True, bf16=False, seed=0,
        dataloader_num_workers=0, **({"desirable_weight": 1.0} if kto else {}),
    )
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=args,
                          train_dataset=Dataset.from_list(train_rows), eval_dataset=Dataset.from_list(eval_rows),
                          processing_class=processor)
    import trl.trainer.utils as trl_utils

    liger = hasattr(trainer, "revert_liger_kernel_patches")
    states = trainer.liger_patch_handles[0].states if liger else None
    guards = [no_logits_guard(trainer.model)] if liger else []
    trl_kernel = trl_utils._ChunkedLogProbFunction
    try:
        if liger:
            trl_utils._ChunkedLogProbFunction = Forbidden
        trainer.train()
        for guard in guards:
            guard.remove()
        trainer.evaluate()
    finally:
        trl_utils._ChunkedLogProbFunction = trl_kernel
        if liger:
            trainer.revert_liger_kernel_patches()
    return trainer.state.log_history, states


@pytest.mark.parametrize("algo", ["dpo", "kto"])
def test_vision_preference_trainer_matches_trl(algo: str, tmp_path: Path) -> None:
    trl_cls, liger_cls, config_cls = {"dpo": (DPOTrainer, LigerDPOTrainer, DPOConfig),
                                      "kto": (KTOTrainer, LigerKTOTrainer, KTOConfig)}[algo]
    expected, _ = train_and_eval(trl_cls, config_cls, tmp_path / "trl", kto=algo == "kto")
    actual, states = train_and_eval(liger_cls, config_cls, tmp_path / "liger", kto=algo == "kto")
    assert len([e for e in expected if "loss" in e and "eval_loss" not in e]) == 3
    assert_logs_match(expected, actual, rtol=2e-4, atol=2e-4)
    # the layer kernels of both towers ran; the head is liger-align's fused forward (not the patched one)
    assert all(states[f].startswith("patched") for f in ("rope", "rms_norm", "swiglu", "layer_norm")), states
    assert states["fused_linear_cross_entropy"] == "off"
