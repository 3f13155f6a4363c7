"""``MedusaTrainer``: stages 1 and 2, weighting, the heads' learning rate, logs, per-head token counts, saving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from liger_align.models.medusa import MEDUSA_HEADS_FILE, load_medusa_heads  # noqa: E402
from liger_align.testing import build_tiny_llama, build_tokenizer  # noqa: E402
from liger_align.testing.conversations import FILLER, RING, make_conversations, tokenize  # noqa: E402
from liger_align.trainers import MedusaTrainer, MedusaTrainingArguments  # noqa: E402
from liger_align.trainers.medusa import is_medusa_parameter  # noqa: E402

K = 3


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data():
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    rows = make_conversations(24, seed=1)
    tokenizer = build_tokenizer([t["value"] for r in rows for t in r["conversations"]] + list(RING) + list(FILLER))
    ids = tokenize(Dataset.from_list(rows), tokenizer, 160)
    return tokenizer, ids, DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding="longest")


def make_trainer(data, tmp: Path, use_liger: bool = True, **medusa) -> MedusaTrainer:
    tokenizer, ids, collator = data
    model = build_tiny_llama(
        len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id, seed=0,
    )
    args = MedusaTrainingArguments(
        output_dir=str(tmp), max_steps=2, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        **{"medusa_num_heads": K, **medusa},
    )
    return MedusaTrainer(model=model, args=args, train_dataset=ids, processing_class=tokenizer,
                         data_collator=collator, use_liger=use_liger)


def backward(trainer: MedusaTrainer, data, rows=range(4), **kwargs) -> torch.Tensor:
    batch = data[2]([data[1][i] for i in rows])
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch, **kwargs)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("stage", [1, 2])
def test_stages_train_what_they_should(stage: int, data, tmp_path: Path) -> None:
    trainer = make_trainer(data, tmp_path, medusa_only_heads=stage == 1, medusa_num_layers=1)
    model = trainer.model
    head_calls = []
    hook = model.lm_head.register_forward_pre_hook(lambda *_: head_calls.append(1))
    backward(trainer, data)
    hook.remove()
    body = {n: p for n, p in model.named_parameters() if not is_medusa_parameter(n)}
    medusa = {n: p for n, p in model.named_parameters() if is_medusa_parameter(n)}
    assert len(medusa) == K * 3 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in medusa.values())
    if stage == 1:
        assert all(p.grad is None and not p.requires_grad for p in body.values())
        assert model.lm_head.weight.grad is None and not head_calls  # head 0's loss is never computed
    else:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in body.values())
        assert head_calls
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {f"medusa{k}_{m}" for k in range(1, K + 1) for m in ("loss", "top1")} <= logged
    assert ("medusa0_loss" in logged) == (stage == 2)
    metrics = trainer.evaluate(data[1].select(range(8)))
    assert all(0.0 <= metrics[f"eval_medusa{k}_top1"] <= 1.0 for k in range(1, K + 1))


def test_weights_schedule_and_head_learning_rate(data, tmp_path: Path) -> None:
    trainer = make_trainer(data, tmp_path, medusa_heads_coefficient=0.5, medusa_decay_coefficient=0.8,
                           medusa_scheduler="linear", medusa_lr_multiplier=4.0)
    trainer.state.global_step, trainer.state.max_steps = 5, 20
    assert trainer.medusa_weights() == pytest.approx([1.0] + [0.5 * 0.25 * 0.8**k for k in range(1, K + 1)])
    batch = data[2]([data[1][i] for i in range(4)])
    out = trainer.compute_loss(trainer.model, batch, return_outputs=True)[1]
    total = sum(w * x for w, x in zip(trainer.medusa_weights(), out.head_losses.tolist()))
    assert out.loss.item() == pytest.approx(total, rel=1e-6)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    heads = {id(p) for n, p in trainer.model.named_parameters() if is_medusa_parameter(n)}
    grouped = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    assert set(grouped) == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    for pid, group in grouped.items():
        lr = 1e-3 * (4.0 if pid in heads else 1.0)
        assert group["initial_lr"] == pytest.approx(lr)
        assert group["lr"] == pytest.approx(lr * trainer.lr_scheduler.lr_lambdas[0](0))


def test_fused_and_materialised_paths_train_the_same_model(data, tmp_path: Path) -> None:
    fused = make_trainer(data, tmp_path / "a", medusa_num_layers=1, medusa_decay_coefficient=0.7)
    naive = make_trainer(data, tmp_path / "b", use_liger=False, medusa_num_layers=1, medusa_decay_coefficient=0.7)
    with torch.no_grad():
        for p, q in zip(fused.model.medusa_head.parameters(), naive.model.medusa_head.parameters(), strict=True):
            p.add_(0.01 * torch.randn_like(p))
            q.copy_(p)
    loss_a, loss_b = backward(fused, data), backward(naive, data)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(fused.model.named_parameters(), naive.model.parameters(), strict=True):
        err = (p.grad - q.grad).norm() / q.grad.norm()
        assert err < 1e-4, name


def test_per_head_counts_make_accumulation_exact(data, tmp_path: Path) -> None:
    trainer = make_trainer(data, tmp_path, medusa_num_layers=1)
    tokenizer, ids, collator = data
    batches = [collator([ids[i] for i in rows]) for rows in (range(0, 2), range(2, 4))]
    counts = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    want = [sum(int((b["labels"][:, 1 + k:] != -100).sum()) for b in batches) for k in range(K + 1)]
    assert counts.tolist() == want
    # two micro-batches with the accumulated counts = one batch of the same rows (padded alike)
    whole = collator([ids[i] for i in range(4)])
    halves = [{k: v[rows] for k, v in whole.items()} for rows in (slice(0, 2), slice(2, 4))]
    trainer.model.zero_grad(set_to_none=True)
    summed = 0.0
    for half in halves:
        loss = trainer.compute_loss(trainer.model, half, num_items_in_batch=torch.tensor(want))
        loss.backward()
        summed += loss.item()
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    full = backward(trainer, data)
    assert summed == pytest.approx(full.item(), rel=1e-5)
    for g, p in zip(grads, trainer.model.parameters(), strict=True):
        assert (g - p.grad).norm() <= 1e-4 * p.grad.norm()


@pytest.mark.parametrize("stage", [1, 2])
def test_save_model_writes_the_heads_alone_and_round_trips(stage: int, data, tmp_path: Path) -> None:
    trainer = make_trainer(data, tmp_path / "run", medusa_only_heads=stage == 1, medusa_num_layers=1)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    files = {p.name for p in out.iterdir()}
    assert MEDUSA_HEADS_FILE in files and "config.json" in files
    assert ("model.safetensors" in files) == (stage == 2)
    config = json.loads((out / "config.json").read_text())
    assert config["medusa_num_heads"] == K and config["medusa_num_layers"] == 1
    fresh = make_trainer(data, tmp_path / "fresh", medusa_num_layers=1).model
    loaded = load_medusa_heads(fresh, out).state_dict()
    trained = trainer.model.medusa_head.state_dict()
    assert list(loaded) == list(trained) and all(torch.equal(loaded[k], trained[k]) for k in trained)
    if stage == 2:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert not any(is_medusa_parameter(k) for k in f.keys())


def test_bad_arguments(data, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="medusa_scheduler"):
        MedusaTrainingArguments(output_dir=str(tmp_path), medusa_scheduler="cosine", report_to=[])
    with pytest.raises(ValueError, match="medusa_num_heads"):
        MedusaTrainingArguments(output_dir=str(tmp_path), medusa_num_heads=0, report_to=[])
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="MedusaTrainingArguments"):
        MedusaTrainer(model=torch.nn.Linear(2, 2), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    with pytest.raises(ValueError, match="labels"):
        trainer = make_trainer(data, tmp_path)
        batch = data[2]([data[1][i] for i in range(2)])
        trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "labels"})
