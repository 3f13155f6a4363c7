"""``MedusaTrainer``: Medusa-1 and Medusa-2 training with the Hugging Face ``Trainer`` and the fused multi-head loss.

The trainer adds Medusa heads to the model (:func:`~liger_align.models.medusa.add_medusa_heads`, unless
it has them) and trains with the model's Medusa forward, which computes
:func:`~liger_align.losses.medusa.fused_linear_medusa_loss` without any ``(tokens, vocab)`` logits:

- **Stage 1** (``medusa_only_heads=True``, Medusa-1): the backbone and the model's head are frozen
  (``requires_grad=False``) and the backbone runs under ``no_grad``; the model head's weight is 0, so its
  loss is never computed.
- **Stage 2** (``medusa_only_heads=False``, Medusa-2): everything trains; the model head's weight is 1.

Head k >= 1 weighs ``medusa_heads_coefficient * medusa_decay_coefficient**k * schedule(step / max_steps)``
(``medusa_scheduler``: constant, linear, sine, sine_<r>). The heads' parameters form their own optimizer
groups at ``learning_rate * medusa_lr_multiplier``. Logged (averaged over the logging window, summed over
ranks): ``medusa{k}_loss`` and ``medusa{k}_top1`` for every computed head, k = 0 the model's head.
With gradient accumulation each head's loss is divided by its own valid-target count over the whole
accumulated (and, with ``average_tokens_across_devices``, all-rank) batch.

``save_model`` writes the heads alone (``medusa_lm_head.safetensors`` in Medusa's key layout and Medusa's
``config.json`` fields, gathered from FSDP/ZeRO-3 shards) and, in stage 2, the model without the heads;
checkpoints resume from them. ``use_liger=False`` computes the same loss from materialised logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .._tokens import IGNORE_INDEX
from ..losses.medusa import check_scheduler, medusa_loss_weights
from ..models.head_call import causal_lm
from ..models.medusa import (
    MEDUSA_HEADS_FILE,
    add_medusa_heads,
    load_medusa_heads,
    medusa_heads,
    save_medusa_heads,
)
from ._mixin import apply_model_patches

_HEAD_PREFIX = "medusa_head."


def is_medusa_parameter(name: str) -> bool:
    """Whether the parameter ``name`` (any wrapper prefixes) belongs to the Medusa heads."""
    return name.startswith(_HEAD_PREFIX) or f".{_HEAD_PREFIX}" in name


@dataclass
class MedusaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus Medusa's flags (the names and defaults of Medusa's training scripts)."""

    medusa_num_heads: int = field(default=1, metadata={"help": "Number of Medusa heads (K >= 1)."})
    medusa_num_layers: int = field(default=1, metadata={"help": "ResBlocks per Medusa head (>= 0)."})
    medusa_heads_coefficient: float = field(default=1.0, metadata={"help": "Weight of the Medusa heads' losses."})
    medusa_decay_coefficient: float = field(default=1.0, metadata={"help": "Head k's loss is scaled by decay**k."})
    medusa_scheduler: str = field(
        default="constant", metadata={"help": "Schedule of the heads' weight: constant, linear, sine, sine_<r>."}
    )
    medusa_lr_multiplier: float = field(default=1.0, metadata={"help": "Learning rate of the heads = lr * this."})
    medusa_only_heads: bool = field(
        default=False, metadata={"help": "Stage 1 (Medusa-1): train the heads only, backbone and head frozen."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scheduler(self.medusa_scheduler)
        for name, low in (("medusa_num_heads", 1), ("medusa_num_layers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("medusa_heads_coefficient", "medusa_decay_coefficient", "medusa_lr_multiplier"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value == value and value != float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class MedusaTrainer(Trainer):
    """HF ``Trainer`` for Medusa heads (module docstring). ``args`` is a :class:`MedusaTrainingArguments`.

    Extra keywords: ``use_liger`` (default True: the fused loss; False: Medusa's materialised logits) and
    ``use_liger_kernel_patches`` (default: ``use_liger``; liger-align's RMSNorm/RoPE/SwiGLU kernels).
    """

    def __init__(
        self, model: nn.Module | None = None, args: MedusaTrainingArguments | None = None, *rest: Any,
        use_liger: bool = True, use_liger_kernel_patches: bool | None = None, **kwargs: Any,
    ) -> None:
        if args is None:
            args = MedusaTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, MedusaTrainingArguments):
            raise TypeError(f"args must be a MedusaTrainingArguments (Medusa's flags), got {type(args).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a causal LM nn.Module (model_init is not supported), got {type(model)}")
        self.use_liger = bool(use_liger)
        patches = self.use_liger if use_liger_kernel_patches is None else bool(use_liger_kernel_patches)
        self.liger_patch_handle = apply_model_patches(model) if patches else None
        add_medusa_heads(model, args.medusa_num_heads, args.medusa_num_layers)
        if args.medusa_only_heads:
            for name, param in causal_lm(model).named_parameters():
                param.requires_grad_(is_medusa_parameter(name))
        self._medusa_sums: dict[str, dict[str, torch.Tensor]] = {}
        self._medusa_eval_metrics: dict[str, float] = {}
        self._medusa_eval_prefix: str | None = None
        super().__init__(model, args, *rest, **kwargs)

    # ------------------------------------------------------------------------------------- the loss

    def medusa_weights(self) -> list[float]:
        """``[lambda_0, ..., lambda_K]`` at the current step (``progress = global_step / max_steps``)."""
        args, state = self.args, self.state
        progress = min(1.0, state.global_step / state.max_steps) if state.max_steps else 1.0
        return medusa_loss_weights(
            args.medusa_num_heads, heads_coefficient=args.medusa_heads_coefficient,
            decay_coefficient=args.medusa_decay_coefficient, scheduler=args.medusa_scheduler, progress=progress,
            model_head_weight=0.0 if args.medusa_only_heads else 1.0,
        )

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """Medusa's weighted loss of the batch (``labels (B, T)`` unshifted, -100 where no loss)."""
        if inputs.get("labels") is None:
            raise ValueError("MedusaTrainer needs 'labels' (B, T) in every batch (-100 where no loss)")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        out = model(
            **model_inputs, medusa_labels=inputs["labels"], medusa_weights=self.medusa_weights(),
            medusa_num_items=num_items_in_batch, medusa_freeze_backbone=self.args.medusa_only_heads,
            medusa_materialize_logits=not self.use_liger,
        )
        loss = out.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # the counts are global; DDP averages the gradients
        self._record(out, "train" if model.training else "eval")
        return (loss, out) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """Per-head valid-target counts ``(K+1,)`` over the accumulated batch (head k counts ``labels[:, 1+k:]``)."""
        total = super()._get_num_items_in_batch(batch_samples, device)
        if total is None or self.args.n_gpu > 1:
            return total
        n_heads = self.args.medusa_num_heads + 1
        counts = sum(
            torch.stack([(batch["labels"][..., 1 + k:] != IGNORE_INDEX).sum() for k in range(n_heads)])
            for batch in batch_samples
        ).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        return counts

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """The weighted loss under ``no_grad`` (head metrics are recorded for the eval log; no logits returned)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------- metrics

    def _record(self, out: Any, mode: str) -> None:
        sums = self._medusa_sums.setdefault(mode, {})
        values = {
            "loss": out.head_losses.float(), "steps": out.computed.float(),
            "correct": out.head_correct.float(), "count": out.head_counts.float(),
        }
        for key, value in values.items():
            value = value.detach()
            sums[key] = value if key not in sums else sums[key] + value.to(sums[key].device)

    def _pop_metrics(self, mode: str, prefix: str) -> dict[str, float]:
        sums = self._medusa_sums.pop(mode, None)
        if not sums:
            return {}
        stacked = torch.stack([sums[k] for k in ("loss", "steps", "correct", "count")])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="sum")
        loss, steps, correct, count = stacked.tolist()
        metrics = {}
        for k in range(len(steps)):
            if steps[k] > 0:
                metrics[f"{prefix}medusa{k}_loss"] = loss[k] / steps[k]
                metrics[f"{prefix}medusa{k}_top1"] = correct[k] / count[k] if count[k] else 0.0
        return metrics

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Hugging Face's log plus the window's ``medusa{k}_loss`` / ``medusa{k}_top1`` (``eval_...`` in eval)."""
        if self._medusa_eval_prefix is not None:
            self._medusa_eval_metrics = self._pop_metrics("eval", self._medusa_eval_prefix)
            logs = {**logs, **self._medusa_eval_metrics}
        elif "loss" in logs:
            logs = {**logs, **self._pop_metrics("train", "")}
        super().log(logs, *args, **kwargs)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Hugging Face's evaluate; the returned metrics include ``eval_medusa{k}_loss`` / ``eval_medusa{k}_top1``."""
        self._medusa_sums.pop("eval", None)
        self._medusa_eval_metrics = {}
        self._medusa_eval_prefix = f"{metric_key_prefix}_"
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._medusa_eval_prefix = None
        metrics.update(self._medusa_eval_metrics)
        return metrics

    # ------------------------------------------------------------------------------------- optimizer

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Hugging Face's optimizer with the heads' parameters moved to groups at ``lr * medusa_lr_multiplier``."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not fresh:
            return optimizer
        model = self.model if model is None else model
        head_ids = {id(p) for n, p in model.named_parameters() if is_medusa_parameter(n)}
        target = getattr(optimizer, "optimizer", optimizer)
        groups, head_groups = [], []
        for group in target.param_groups:
            heads = [p for p in group["params"] if id(p) in head_ids]
            rest = [p for p in group["params"] if id(p) not in head_ids]
            if rest:
                groups.append({**group, "params": rest})
            if heads:
                head_groups.append({**group, "params": heads, "lr": group["lr"] * self.args.medusa_lr_multiplier,
                                    "medusa_heads": True})
        target.param_groups = groups + head_groups
        return optimizer

    # ------------------------------------------------------------------------------------- save / load

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The heads alone (``medusa_lm_head.safetensors`` + Medusa's config fields); in stage 2 the model first.

        Every rank must call it (the trainer does): the heads are gathered from FSDP/ZeRO-3 shards.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.medusa_only_heads:
            super().save_model(output_dir, _internal_call)
        elif self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        base = getattr(getattr(causal_lm(self.model), "config", None), "_name_or_path", None) or None
        save_medusa_heads(self.model, output_dir, base_model_name_or_path=base, wrapped=self.model_wrapped,
                          is_main_process=self.args.should_save)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Hugging Face's ``_save`` of the model without the Medusa heads (they have their own file)."""
        if state_dict is None:
            state_dict = self.model.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if not is_medusa_parameter(k)}
        super()._save(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: the model's weights when the checkpoint has them (stage 2), then the heads."""
        folder = Path(resume_from_checkpoint)
        if not (folder / MEDUSA_HEADS_FILE).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
        if any((folder / name).exists() for name in names):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_medusa_heads(self.model if model is None else model, folder)

    def medusa_heads(self) -> nn.Module:
        """The trained :class:`~liger_align.models.medusa.MedusaHeads`."""
        return medusa_heads(self.model)
