"""Held-out evaluation of the alignment examples, independent of any trainer's own metrics."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import maybe_apply_chat_template


@torch.no_grad()
def preference_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    *,
    batch_size: int = 16,
    max_length: int = 512,
) -> float:
    """Fraction of ``pairs`` whose chosen completion gets the higher mean per-token log-prob under ``model``.

    Independent of any trainer: each completion is scored with its EOS token after the prompt (the
    way TRL's trainers train on it), truncated to ``max_length`` tokens. A tie counts as wrong.
    """
    texts: list[tuple[list[int], int]] = []  # (token ids, index where the completion starts)
    for row in pairs:
        row = maybe_apply_chat_template(dict(row), tokenizer)
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        for completion in (row["chosen"], row["rejected"]):
            ids = tokenizer(row["prompt"] + completion)["input_ids"] + [tokenizer.eos_token_id]
            start = next(
                (i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b),
                min(len(prompt_ids), len(ids) - 1),
            )
            texts.append((ids[:max_length], max(start, 1)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (ids, start) in enumerate(chunk):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            labels[j, start : len(ids)] = torch.tensor(ids[start:])
            attention[j, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        target = labels[:, 1:].to(device)
        logps = -torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), target.clamp(min=0), reduction="none"
        ) * (target != -100)
        counts = (target != -100).sum(-1).clamp(min=1)
        scores += (logps.sum(-1) / counts).tolist()
    model.train(was_training)
    wins = [chosen > rejected for chosen, rejected in zip(scores[0::2], scores[1::2], strict=True)]
    return sum(wins) / max(len(wins), 1)

def held_out_metrics(
    trainer: Any, pairs: Dataset | None, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, float]:
    """The trainer's held-out ``eval_rewards/*`` and, on one process with ``pairs``, :func:`preference_accuracy`."""
    metrics = {k: float(v) for k, v in trainer.evaluate().items() if k.startswith("eval_rewards/")}
    if pairs is not None and trainer.args.world_size == 1:
        metrics["preference_accuracy"] = preference_accuracy(
            trainer.model, tokenizer, pairs, batch_size=trainer.args.per_device_eval_batch_size, max_length=max_length
        )
    return metrics

