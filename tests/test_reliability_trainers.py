"""Reliability of the trainers (issue 12): the reference model under autocast, true copies of a model a
Liger trainer was built on, config and data-set checks before tokenisation, finite ORPO metrics."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import common_args, tiny_model
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig  # noqa: E402

from liger_align.models.head_call import causal_lm  # noqa: E402
from liger_align.testing import build_tokenizer, load_preference_dataset, to_unpaired  # noqa: E402
from liger_align.trainers import LigerCPOTrainer, LigerDPOTrainer, LigerKTOTrainer, LigerORPOTrainer  # noqa: E402
from liger_align.trainers._head_forward import install_trainer_forward  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def _first_rewards(log_history: list[dict[str, Any]]) -> tuple[float, float]:
    entry = next(h for h in log_history if "rewards/chosen" in h)
    return entry["rewards/chosen"], entry["rewards/margins"]


@pytest.mark.parametrize("algo", ["dpo", "kto"])
def test_reference_runs_under_autocast_and_step0_rewards_match_trl(algo: str, tokenizer: Any, tmp_path: Path) -> None:
    """bf16=True with fp32 weights: the reference forward runs under the accelerator's autocast (as the
    policy does), so the first step's rewards are TRL's (0: the reference is a copy of the policy)."""
    trl_cls, liger_cls, config_cls = (
        (DPOTrainer, LigerDPOTrainer, DPOConfig) if algo == "dpo" else (KTOTrainer, LigerKTOTrainer, KTOConfig)
    )
    data = load_preference_dataset().select(range(16))
    if algo == "kto":
        data = to_unpaired(data)
    results = {}
    for cls in (trl_cls, liger_cls):
        model = tiny_model(tokenizer)
        ref = copy.deepcopy(model)
        seen: list[tuple[bool, torch.dtype]] = []
        ref.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda module, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        )
        config = config_cls(**common_args(tmp_path / cls.__name__, bf16=True, max_steps=1))
        trainer = cls(model=model, ref_model=ref, args=config, train_dataset=data, processing_class=tokenizer)
        seen.clear()
        trainer.train()
        if hasattr(trainer, "revert_liger_kernel_patches"):
            trainer.revert_liger_kernel_patches()
        assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen), (cls.__name__, seen)
        results[cls.__name__] = _first_rewards(trainer.state.log_history)
    want, got = results[trl_cls.__name__], results[liger_cls.__name__]
    assert got == pytest.approx(want, abs=1e-6), (got, want)
    assert got == pytest.approx((0.0, 0.0), abs=1e-6)


def test_installing_twice_keeps_accelerates_autocast_wrapper(tokenizer: Any) -> None:
    """A second install (the trainer's post-init) updates the settings only: the autocast wrapper that
    ``accelerator.prepare_model`` put over the fused forward stays, and the fused path runs under it."""
    from accelerate import Accelerator

    model = tiny_model(tokenizer)
    install_trainer_forward(model)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    wrapper = prepared.forward
    install_trainer_forward(prepared, outputs=("entropy",))
    assert prepared.forward == wrapper
    seen = []
    ids = torch.randint(3, len(tokenizer), (2, 9))
    out = prepared(ids, liger_head=lambda h, w, b: seen.append(torch.is_autocast_enabled("cpu")) or h.shape)
    assert seen == [True] and out["head"] == (2, 9, 32)


@pytest.mark.parametrize("trainer_cls,config_cls", [(LigerORPOTrainer, ORPOConfig), (LigerDPOTrainer, DPOConfig)])
def test_deepcopy_of_a_trained_on_model_is_a_true_copy(trainer_cls, config_cls, tokenizer: Any, tmp_path: Path) -> None:
    """``copy.deepcopy`` of the model a Liger trainer installed its forward on computes with the copy's weights,
    on the plain path (logits) and on the fused path."""
    data = load_preference_dataset().select(range(8))
    model = tiny_model(tokenizer)
    kwargs = {"ref_model": copy.deepcopy(model)} if trainer_cls is LigerDPOTrainer else {}
    trainer = trainer_cls(model=model, args=config_cls(**common_args(tmp_path)), train_dataset=data,
                          processing_class=tokenizer, **kwargs)
    original = trainer.model
    twin = copy.deepcopy(original)
    ids = torch.randint(3, len(tokenizer), (2, 11))
    with torch.no_grad():
        before = twin(ids).logits
        assert torch.equal(before, original(ids).logits)
        for p in twin.parameters():
            p.zero_()
        logits_original, logits_twin = original(ids).logits, twin(ids).logits
        head_original = original(ids, liger_head=lambda h, w, b: h @ w.t())["head"]
        head_twin = twin(ids, liger_head=lambda h, w, b: h @ w.t())["head"]
    assert torch.equal(logits_original, before)
    assert torch.count_nonzero(logits_twin) == 0 and torch.count_nonzero(logits_original) > 0
    assert torch.count_nonzero(head_twin) == 0 and torch.allclose(head_original, logits_original, atol=1e-5)
    trainer.revert_liger_kernel_patches()


# ----------------------------------------------------------------------------------------------- input checks


def _paired_rows(n: int = 4) -> list[dict[str, Any]]:
    return [{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(n)]


BAD_PAIRED = [
    ("missing rejected", lambda rows: [{k: v for k, v in r.items() if k != "rejected"} for r in rows],
     ValueError, r"train_dataset has no column 'rejected'.*'chosen' and 'rejected'"),
    ("None value", lambda rows: rows[:2] + [dict(rows[2], rejected=None)] + rows[3:],
     TypeError, r"train_dataset row 2, column 'rejected': expected a string or a list of chat messages.*NoneType"),
    ("int value", lambda rows: [dict(r, chosen=7) for r in rows],
     TypeError, r"row 0, column 'chosen'.*got int 7"),
    ("bad message", lambda rows: [dict(r, prompt=[{"text": "hi"}], chosen=[{"role": "assistant", "content": "a"}],
                                       rejected=[{"role": "assistant", "content": "b"}]) for r in rows],
     TypeError, r"row 0, column 'prompt'.*message 0 is dict"),
    ("mixed formats", lambda rows: [dict(r, chosen=[{"role": "assistant", "content": "a"}],
                                         rejected=[{"role": "assistant", "content": "b"}]) for r in rows],
     ValueError, r"row 0: 'prompt' is a string, 'chosen' is a list of messages"),
]


@pytest.mark.parametrize("trainer_cls,config_cls", [(LigerORPOTrainer, ORPOConfig), (LigerDPOTrainer, DPOConfig),
                                                    (LigerCPOTrainer, None)])
@pytest.mark.parametrize("case,mutate,error,message", BAD_PAIRED, ids=[b[0] for b in BAD_PAIRED])
def test_bad_paired_dataset_is_named_before_tokenisation(trainer_cls, config_cls, case, mutate, error, message,
                                                         tokenizer: Any, tmp_path: Path) -> None:
    if config_cls is None:
        from trl.experimental.cpo import CPOConfig as config_cls
    data = Dataset.from_list(mutate(_paired_rows()))
    with pytest.raises(error, match=message):
        trainer_cls(model=tiny_model(tokenizer), args=config_cls(**common_args(tmp_path)), train_dataset=data,
                    processing_class=tokenizer)


def test_bad_eval_dataset_and_kto_labels_are_named(tokenizer: Any, tmp_path: Path) -> None:
    good = Dataset.from_list(_paired_rows())
    bad = Dataset.from_list([{k: v for k, v in r.items() if k != "chosen"} for r in _paired_rows()])
    with pytest.raises(ValueError, match=r"eval_dataset\['held'\] has no column 'chosen'"):
        LigerORPOTrainer(model=tiny_model(tokenizer), args=ORPOConfig(**common_args(tmp_path)), train_dataset=good,
                         eval_dataset={"held": bad}, processing_class=tokenizer)
    rows = [{"prompt": "Q?", "completion": " a", "label": True}, {"prompt": "Q?", "completion": " b", "label": None}]
    with pytest.raises(TypeError, match=r"train_dataset row 1, column 'label': expected a bool.*NoneType None"):
        LigerKTOTrainer(model=tiny_model(tokenizer), ref_model=tiny_model(tokenizer),
                        args=KTOConfig(**common_args(tmp_path)), train_dataset=Dataset.from_list(rows),
                        processing_class=tokenizer)
    missing = Dataset.from_list([{"prompt": "Q?", "completion": " a"}])
    with pytest.raises(ValueError, match=r"train_dataset has no column 'label'"):
        LigerKTOTrainer(model=tiny_model(tokenizer), ref_model=tiny_model(tokenizer),
                        args=KTOConfig(**common_args(tmp_path)), train_dataset=missing, processing_class=tokenizer)


@pytest.mark.parametrize("field,value,message", [
    ("max_length", 0, r"LigerDPOTrainer: config max_length must be an integer in \[1, inf\], got 0"),
    ("max_length", -5, "max_length"),
    ("beta", -0.1, r"config beta must be a finite number > 0.*got -0.1"),
    ("beta", float("nan"), "beta"),
    ("label_smoothing", 1.5, r"label_smoothing must be a finite number in \[0, 1\]"),
    ("loss_weights", [float("nan")], r"loss_weights\[0\] must be a finite number >= 0"),
])
def test_bad_config_is_named_before_tokenisation(field, value, message, tokenizer: Any, tmp_path: Path) -> None:
    args = DPOConfig(**common_args(tmp_path))
    setattr(args, field, value)  # TRL's config accepts these; the trainer must not
    with pytest.raises(ValueError, match=message):
        LigerDPOTrainer(model=tiny_model(tokenizer), ref_model=tiny_model(tokenizer), args=args,
                        train_dataset=Dataset.from_list(_paired_rows()), processing_class=tokenizer)


def test_orpo_beta_zero_is_allowed_but_negative_is_not(tokenizer: Any, tmp_path: Path) -> None:
    data = Dataset.from_list(_paired_rows())
    args = ORPOConfig(**common_args(tmp_path, beta=0.0))
    trainer = LigerORPOTrainer(model=tiny_model(tokenizer), args=args, train_dataset=data, processing_class=tokenizer)
    trainer.revert_liger_kernel_patches()
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0"):
        LigerORPOTrainer(model=tiny_model(tokenizer), args=ORPOConfig(**common_args(tmp_path, beta=-1.0)),
                         train_dataset=data, processing_class=tokenizer)


def test_orpo_metrics_are_finite_with_a_fully_truncated_row(tokenizer: Any, tmp_path: Path) -> None:
    """A chosen row with no completion token: loss, gradients and the ``log_odds_*`` metrics stay finite
    (TRL's own formula gives NaN there)."""
    data = load_preference_dataset().select(range(8))
    trainer = LigerORPOTrainer(model=tiny_model(tokenizer), args=ORPOConfig(**common_args(tmp_path)),
                               train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    batch["chosen_labels"][0] = -100
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in metrics.values()), metrics
    assert "log_odds_ratio" in metrics and "log_odds_chosen" in metrics
    grads = [p.grad for p in causal_lm(trainer.model).parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    trainer.revert_liger_kernel_patches()
