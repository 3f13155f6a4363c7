"""The plumbing the four TRL trainers share: constructor keyword and signature, model patches, head call, metrics.

- :class:`LigerTrainerMixin`: ``use_liger_kernel_patches``, the input checks before TRL tokenises,
  the model patches (before PEFT wraps a model given as an instance), the fused forward
  handlers (:mod:`._head_forward`), the head call under the accelerator's autocast, and TRL's paired metrics.
- :func:`with_flag_signature`: the parent's constructor signature plus the keyword.
- :func:`position_logit_means`: TRL's ``logits/*`` metrics from the hidden states, without logits.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._tokens import IGNORE_INDEX, next_token_targets
from ..models import apply_liger_kernel
from ..models.head_call import causal_lm, check_head_not_adapted
from ._head_forward import install_trainer_forward, liger_fused_lm_head_for
from ._inputs import bound_arguments, check_config, check_datasets


def apply_model_patches(model: nn.Module | None) -> Any:
    """Apply liger-align's kernel patches to ``model`` when its architecture is supported; return the handle or None.

    Architectures :mod:`liger_align.models` does not cover are left as they are.
    """
    if model is None:
        return None
    lm = causal_lm(model)
    # The causal-LM forward's fused handlers are the trainers' (install_trainer_forward); only the layers here.
    return apply_liger_kernel(lm, fused_linear_cross_entropy=False)


class LigerTrainerMixin:
    """Constructor keyword ``use_liger_kernel_patches`` and the preparation of the policy (and reference).

    Subclasses construct through :meth:`_liger_init`: :meth:`_liger_pre_init` before TRL's ``__init__``
    (patches a model given as an instance, before PEFT wraps it) and :meth:`_liger_post_init` after it.
    """

    liger_patch_handles: list[Any]

    def _liger_init(
        self, parent: type, args: tuple, kwargs: dict[str, Any], use_liger_kernel_patches: bool, *, paired: bool,
        fused_protocol: bool = False, beta_may_be_zero: bool = False,
    ) -> None:
        """The constructor of every Liger trainer: inputs checked, models patched, TRL's ``parent.__init__``,
        fused forward installed.

        ``fused_protocol``: ``parent`` (DPO, KTO) has a reference model and reads log-probs through TRL's
        fused-LM-head protocol, answered by liger-align's base while its ``__init__`` runs (:mod:`._trl_protocol`).
        """
        bound = self._liger_check_inputs(parent, args, kwargs, paired=paired, beta_may_be_zero=beta_may_be_zero)
        names = ("model", "ref_model") if fused_protocol else ("model",)
        self._liger_pre_init(use_liger_kernel_patches, *(bound.get(name) for name in names))
        with liger_fused_lm_head_for(parent) if fused_protocol else contextlib.nullcontext():
            parent.__init__(self, *args, **kwargs)
        self._liger_post_init(*(getattr(self, name) for name in names))

    def _liger_check_inputs(
        self, parent: type, args: tuple, kwargs: dict[str, Any], *, paired: bool, beta_may_be_zero: bool = False
    ) -> dict[str, Any]:
        """Check the config and the data sets before TRL's ``__init__`` tokenises them; return the
        constructor arguments by name (see :mod:`._inputs`)."""
        bound = bound_arguments(parent, args, kwargs)
        name = type(self).__name__
        check_config(bound.get("args"), trainer=name, beta_may_be_zero=beta_may_be_zero)
        check_datasets(bound.get("train_dataset"), bound.get("eval_dataset"), paired=paired, trainer=name)
        return bound

    def _liger_pre_init(self, use_liger_kernel_patches: bool, *models: Any) -> None:
        self.use_liger_kernel_patches = bool(use_liger_kernel_patches)
        self.liger_patch_handles = []
        self._liger_patched: set[int] = set()
        for model in models:
            if isinstance(model, nn.Module):
                check_head_not_adapted(model)
                self._liger_patch(model)

    def _liger_patch(self, model: nn.Module | None) -> None:
        if not self.use_liger_kernel_patches or model is None or id(causal_lm(model)) in self._liger_patched:
            return
        handle = apply_model_patches(model)
        if handle is not None:
            self.liger_patch_handles.append(handle)
            self._liger_patched.add(id(causal_lm(model)))

    def _liger_post_init(self, *models: Any, outputs: tuple[str, ...] = ("log_probs",)) -> None:
        for model in models:
            if model is None:
                continue
            check_head_not_adapted(model)
            self._liger_patch(model)
            install_trainer_forward(causal_lm(model), outputs=outputs)

    def _liger_head_forward(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, head: Callable[..., Any]
    ) -> tuple[Any, torch.Tensor | None]:
        """Run ``model`` with ``head(hidden, weight, bias)`` in place of the logits, under the accelerator's autocast.

        Returns what ``head`` returned and the weighted MoE aux loss (None unless the trainer enables it).
        """
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False, "liger_head": head}
        if self.aux_loss_enabled:
            kwargs["output_router_logits"] = True
        with self.accelerator.autocast():
            result = model(input_ids, **kwargs)
        aux = self.aux_loss_coef * result["aux_loss"] if self.aux_loss_enabled else None
        return result["head"], aux

    def _liger_paired_forward(
        self, model: Any, batch: dict[str, Any], *, padding_value: int, nll_over_inputs: bool, means_skip_last: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, outputs)`` of ``self.liger_loss`` on TRL's concatenated chosen + rejected batch (decoder-only).

        Targets: the completion labels (``concatenated_labels``), shifted. ``nll_over_inputs``: the NLL
        target is every attended token of the chosen rows (ORPO), else the loss's own (CPO).
        ``outputs``: the loss's, plus ``logits_chosen``/``logits_rejected`` (TRL's ``logits/*``: means
        over every position, padding included; ``means_skip_last`` leaves the last one out, as ORPO's TRL).
        The MoE aux loss, when enabled, is added to ``loss``.
        """
        concat = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=padding_value, device=self.accelerator.device
        )
        input_ids, attention_mask = concat["concatenated_input_ids"], concat["concatenated_attention_mask"]
        half = batch["chosen_labels"].shape[0]
        target = next_token_targets(concat["concatenated_labels"])
        extra = {}
        if nll_over_inputs:
            extra["nll_target"] = next_token_targets(input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)[:half])
        loss_fn = self.liger_loss

        def head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
            loss, out = loss_fn(weight, hidden, target, bias, **extra)
            means = position_logit_means(hidden[:, :-1] if means_skip_last else hidden, weight, bias)
            return {"loss": loss, **out, "logits_chosen": means[:half].mean(), "logits_rejected": means[half:].mean()}

        out, aux_loss = self._liger_head_forward(model, input_ids, attention_mask, head)
        return (out["loss"] if aux_loss is None else out["loss"] + aux_loss), out

    def _liger_metrics(
        self, train_eval: str, out: dict[str, torch.Tensor], scalars: tuple[str, ...]
    ) -> dict[str, float]:
        """TRL's paired metrics (ORPO's and CPO's: same names, same gathering) from the loss's ``out``, as floats.

        The rewards are the loss's own (TRL's formulas; ``tests/test_trainers_parity.py`` checks they agree);
        ``scalars`` name further 0-d outputs logged under their own name (``nll_loss``, ...).
        """
        gather = self.accelerator.gather_for_metrics
        prefix = "eval_" if train_eval == "eval" else ""
        chosen_rewards, rejected_rewards = out["chosen_rewards"], out["rejected_rewards"]
        values = {
            "rewards/chosen": gather(chosen_rewards).mean(),
            "rewards/rejected": gather(rejected_rewards).mean(),
            "rewards/accuracies": gather((chosen_rewards > rejected_rewards).float()).mean(),
            "rewards/margins": gather(chosen_rewards - rejected_rewards).mean(),
            "logps/rejected": gather(out["rejected_logps"].detach()).mean(),
            "logps/chosen": gather(out["chosen_logps"].detach()).mean(),
            "logits/rejected": gather(out["logits_rejected"].detach()).mean(),
            "logits/chosen": gather(out["logits_chosen"].detach()).mean(),
        }
        values.update({k: gather(out[k].detach()).mean() for k in scalars})
        return {f"{prefix}{k}": v.item() for k, v in values.items()}

    def revert_liger_kernel_patches(self) -> None:
        """Undo the model patches this trainer applied (the fused forward stays; it is inert unless asked)."""
        while self.liger_patch_handles:
            self.liger_patch_handles.pop().revert()
        self._liger_patched.clear()


def with_flag_signature(cls: type) -> type:
    """Give ``cls.__init__`` the parent's signature plus the keyword-only ``use_liger_kernel_patches``."""
    base = next(b for b in cls.__mro__[1:] if b is not LigerTrainerMixin and "__init__" in vars(b))
    parent = inspect.signature(base.__init__)
    params = [p for p in parent.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    flag = inspect.Parameter("use_liger_kernel_patches", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool)
    params.append(flag)
    cls.__init__.__signature__ = parent.replace(parameters=params)
    return cls


def position_logit_means(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Mean over the vocabulary of every position's logits, ``(R, T)``, without the logits.

    The mean of ``h @ W.T + b`` over the vocabulary is ``h @ mean_v(W) + mean_v(b)``: one ``(H,)``
    vector, so TRL's ``logits/*`` metrics (a mean over every position, padding included) cost nothing.
    """
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        w_mean = weight.detach().float().mean(0)
        means = hidden.detach().float() @ w_mean
        if bias is not None:
            means = means + bias.detach().float().mean()
    return means
