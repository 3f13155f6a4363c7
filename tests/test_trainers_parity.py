"""Parity of the liger-align trainers with TRL's on a tiny Llama (CPU, fp32, same seed).

Each test trains TRL's trainer and ours for a few steps from the same weights and data, then
evaluates, and compares every logged number (loss, grad_norm and each metric, train and eval).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import Forbidden, assert_logs_match, common_args, no_logits_guard, tiny_model
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from liger_align.testing import build_tokenizer, load_preference_dataset, to_unpaired
from liger_align.trainers import LigerCPOTrainer, LigerDPOTrainer, LigerKTOTrainer, LigerORPOTrainer

pytestmark = pytest.mark.slow


def tiny_moe(tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Mixtral (4 experts, top-2) that returns its router aux loss; not patched by liger-align."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.05, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MixtralForCausalLM(config)


def train_and_eval(trainer_cls: type, config_cls: type, tmp: Path, kind: str, *, with_ref: bool = False,
                   config: dict[str, Any] | None = None, moe: bool = False,
                   **trainer_kwargs: Any) -> list[dict[str, Any]]:
    """Train ``trainer_cls`` then evaluate; return ``trainer.state.log_history``."""
    tokenizer = build_tokenizer()
    data = load_preference_dataset()
    train, evaluation = data.select(range(48)), data.select(range(400, 408))
    if kind == "unpaired":
        train, evaluation = to_unpaired(train), to_unpaired(evaluation)
    args = config_cls(**common_args(tmp, **(config or {})))
    build = tiny_moe if moe else tiny_model
    if with_ref:
        trainer_kwargs["ref_model"] = build(tokenizer)
    trainer = trainer_cls(
        model=build(tokenizer), args=args, train_dataset=train, eval_dataset=evaluation,
        processing_class=tokenizer, **trainer_kwargs,
    )
    import trl.trainer.utils as trl_utils

    liger = hasattr(trainer, "revert_liger_kernel_patches")
    models = (trainer.model, getattr(trainer, "ref_model", None))
    guards = [no_logits_guard(m) for m in models if m is not None and liger]
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
        if hasattr(trainer, "revert_liger_kernel_patches"):
            trainer.revert_liger_kernel_patches()
    return trainer.state.log_history


CASES = {
    "orpo": (ORPOTrainer, LigerORPOTrainer, ORPOConfig, "paired", {}, False),
    "orpo-ga2": (ORPOTrainer, LigerORPOTrainer, ORPOConfig, "paired",
                 {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2, "max_steps": 3}, False),
    "cpo": (CPOTrainer, LigerCPOTrainer, CPOConfig, "paired", {}, False),
    "simpo": (CPOTrainer, LigerCPOTrainer, CPOConfig, "paired", {"loss_type": "simpo", "cpo_alpha": 0.0}, False),
    "cpo-simpo-ga2": (CPOTrainer, LigerCPOTrainer, CPOConfig, "paired",
                      {"loss_type": "simpo", "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2,
                       "max_steps": 3}, False),
    "dpo": (DPOTrainer, LigerDPOTrainer, DPOConfig, "paired", {}, True),
    "dpo-ga2-rpo": (DPOTrainer, LigerDPOTrainer, DPOConfig, "paired",
                    {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2, "max_steps": 3,
                     "loss_type": ["sigmoid", "sft"]}, True),
    "dpo-precompute": (DPOTrainer, LigerDPOTrainer, DPOConfig, "paired",
                       {"precompute_ref_log_probs": True, "max_steps": 3}, True),
    "kto": (KTOTrainer, LigerKTOTrainer, KTOConfig, "unpaired", {}, True),
    "kto-ga2": (KTOTrainer, LigerKTOTrainer, KTOConfig, "unpaired",
                {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2, "max_steps": 3}, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainer_matches_trl(case: str, tmp_path: Path) -> None:
    trl_cls, liger_cls, config_cls, kind, config, with_ref = CASES[case]
    expected = train_and_eval(trl_cls, config_cls, tmp_path / "trl", kind, with_ref=with_ref, config=config)
    actual = train_and_eval(liger_cls, config_cls, tmp_path / "liger", kind, with_ref=with_ref, config=config)
    assert_logs_match(expected, actual)


@pytest.mark.parametrize("algo", ["orpo", "dpo"])
def test_moe_aux_loss_matches_trl(algo: str, tmp_path: Path) -> None:
    """A Mixtral policy: the router load-balancing loss is added (and logged by DPO) as TRL does."""
    trl_cls, liger_cls, config_cls, kind, _, with_ref = CASES[algo]
    config = {"max_steps": 3}
    expected = train_and_eval(trl_cls, config_cls, tmp_path / "trl", kind, with_ref=with_ref, config=config, moe=True)
    with pytest.warns(UserWarning, match="mixtral"):
        actual = train_and_eval(liger_cls, config_cls, tmp_path / "liger", kind, with_ref=with_ref, config=config,
                                moe=True)
    assert_logs_match(expected, actual)
    if algo == "dpo":
        assert all("aux_loss" in entry for entry in actual if "loss" in entry)


@pytest.mark.parametrize("algo", ["orpo", "dpo"])
def test_bf16_autocast_matches_trl(algo: str, tmp_path: Path) -> None:
    """bf16 mixed precision (CPU autocast): the backbone and the head run under the accelerator's autocast
    as in TRL; values agree to bf16 precision."""
    trl_cls, liger_cls, config_cls, kind, _, with_ref = CASES[algo]
    config = {"max_steps": 2, "bf16": True}
    expected = train_and_eval(trl_cls, config_cls, tmp_path / "trl", kind, with_ref=with_ref, config=config)
    actual = train_and_eval(liger_cls, config_cls, tmp_path / "liger", kind, with_ref=with_ref, config=config)
    assert_logs_match(expected, actual, rtol=3e-2, atol=3e-3, discrete=False)


def test_flag_and_signature() -> None:
    """Same constructor as TRL's plus ``use_liger_kernel_patches``; works with the patches off."""
    import inspect

    for trl_cls, liger_cls in ((ORPOTrainer, LigerORPOTrainer), (CPOTrainer, LigerCPOTrainer),
                               (DPOTrainer, LigerDPOTrainer), (KTOTrainer, LigerKTOTrainer)):
        assert issubclass(liger_cls, trl_cls)
        ours = inspect.signature(liger_cls.__init__).parameters
        for name in inspect.signature(trl_cls.__init__).parameters:
            assert name in ours, (liger_cls.__name__, name)
        assert ours["use_liger_kernel_patches"].default is True


def test_orpo_without_patches(tmp_path: Path) -> None:
    expected = train_and_eval(ORPOTrainer, ORPOConfig, tmp_path / "trl", "paired", config={"max_steps": 2})
    actual = train_and_eval(LigerORPOTrainer, ORPOConfig, tmp_path / "liger", "paired", config={"max_steps": 2},
                            use_liger_kernel_patches=False)
    assert_logs_match(expected, actual)


@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.0),
                                             ("simpo", 0.25)])
def test_loss_metrics_are_trls_formulas(loss_type: str, alpha: float) -> None:
    """The ORPO and CPO trainers log the rewards and log-odds the fused losses return (no second formula):
    on the same ``(B,)`` log-probs they equal what TRL's ``cpo_loss`` / ``odds_ratio_loss`` compute."""
    from types import SimpleNamespace

    from liger_align.losses import cpo_objective, orpo_objective

    gen = torch.Generator().manual_seed(1234)
    chosen = -(torch.rand(7, generator=gen, dtype=torch.float64) * 3 + 0.05)
    rejected = -(torch.rand(7, generator=gen, dtype=torch.float64) * 3 + 0.05)
    nll = torch.rand((), generator=gen, dtype=torch.float64)
    cpu = SimpleNamespace(device=torch.device("cpu"))
    trl_cpo = SimpleNamespace(beta=0.2, loss_type=loss_type, label_smoothing=0.0, simpo_gamma=0.5, alpha=alpha,
                              accelerator=cpu)
    _, want_chosen, want_rejected = CPOTrainer.cpo_loss(trl_cpo, chosen, rejected)
    _, cpo = cpo_objective(chosen, rejected, nll, beta=0.2, loss_type=loss_type, simpo_gamma=0.5, alpha=alpha)
    torch.testing.assert_close(cpo["chosen_rewards"].double(), want_chosen, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cpo["rejected_rewards"].double(), want_rejected, rtol=1e-6, atol=1e-7)

    trl_orpo = SimpleNamespace(beta=0.2, accelerator=cpu)
    _, want_chosen, want_rejected, want_ratio, want_log_odds = ORPOTrainer.odds_ratio_loss(trl_orpo, chosen, rejected)
    _, orpo = orpo_objective(chosen, rejected, nll, beta=0.2)
    torch.testing.assert_close(orpo["chosen_rewards"].double(), want_chosen.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(orpo["rejected_rewards"].double(), want_rejected.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(orpo["log_odds_ratio"].double(), want_ratio.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(orpo["log_odds_chosen"].double(), want_log_odds.double(), rtol=1e-6, atol=1e-7)
