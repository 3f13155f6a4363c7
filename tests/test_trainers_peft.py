"""LoRA with the liger trainers: the reference is the adapter-disabled model, only adapters train,
and a LoRA on the output head is refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from _helpers import assert_logs_match, common_args, tiny_model  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig  # noqa: E402

from liger_align.testing import build_tokenizer, load_preference_dataset  # noqa: E402
from liger_align.trainers import LigerDPOTrainer, LigerORPOTrainer  # noqa: E402

pytestmark = pytest.mark.slow


def lora(*targets: str) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM")


def run_dpo(trainer_cls: type, tmp: Path) -> tuple[list[dict], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tokenizer = build_tokenizer()
    model = tiny_model(tokenizer)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = DPOConfig(**common_args(tmp, max_steps=3))
    trainer = trainer_cls(
        model=model, ref_model=None, args=args, train_dataset=load_preference_dataset().select(range(24)),
        eval_dataset=load_preference_dataset().select(range(400, 404)), processing_class=tokenizer,
        peft_config=lora("q_proj", "v_proj", "gate_proj"),
    )
    trainer.train()
    trainer.evaluate()
    after = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    if hasattr(trainer, "revert_liger_kernel_patches"):
        trainer.revert_liger_kernel_patches()
    return trainer.state.log_history, before, after


def test_lora_dpo_trains_only_adapters_and_matches_trl(tmp_path: Path) -> None:
    expected, _, _ = run_dpo(DPOTrainer, tmp_path / "trl")
    logs, before, after = run_dpo(LigerDPOTrainer, tmp_path / "liger")
    assert_logs_match(expected, logs)
    # step 1: the adapter starts at zero, so the policy equals the reference (adapter disabled)
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    adapters = {k: v for k, v in after.items() if "lora_" in k}
    assert adapters and any(not torch.equal(v, torch.zeros_like(v)) for k, v in adapters.items() if "lora_B" in k)
    for key, value in after.items():
        if "lora_" in key:
            continue
        base_key = key.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(value, before[base_key]), f"non-adapter weight {key} changed"


@pytest.mark.parametrize("trainer_cls,config_cls", [(LigerDPOTrainer, DPOConfig), (LigerORPOTrainer, ORPOConfig)])
def test_lora_on_lm_head_is_refused(trainer_cls: type, config_cls: type, tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    model = tiny_model(tokenizer)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="lm_head"):
        trainer_cls(
            model=model, args=config_cls(**common_args(tmp_path, max_steps=1)),
            train_dataset=load_preference_dataset().select(range(8)), processing_class=tokenizer,
            peft_config=lora("q_proj", "lm_head"),
        )
