"""The one place where the trainers touch the model: backbone hidden states and a fused head.

The loss must run *inside* ``model(...)``: FSDP 1 and 2 gather the sharded head weight only inside the
wrapped root module's forward and hook the backward on that forward's outputs, and accelerate's
autocast wraps that forward. :func:`install_fused_forward` gives the causal LM a forward that, called
with ``liger_head=fn``, runs the backbone and returns ``fn(hidden, weight, bias)`` instead of logits;
every wrapper (DDP, FSDP, DeepSpeed, PEFT, autocast) forwards the keyword untouched. Inside, the head
is called through :func:`liger_align.models.head_call.call_through_head` (ZeRO-3 and a head-only FSDP
unit gather the weight for the forward and the backward; see that module for PEFT's cases).

- **PEFT**: the fused forward is installed on the base causal LM, below the adapters, so LoRA layers
  in the backbone stay active (and are disabled by ``disable_adapter()`` for a reference pass). A
  LoRA layer *on* the head would be silently ignored by a fused loss, so it is an error here.
- **MoE**: with ``output_router_logits=True`` the load-balancing loss of the router logits is
  returned as ``aux_loss``, as the model's own forward computes it.

The same forward also answers TRL's ``fused_lm_head=True`` protocol (DPO and KTO call the model that
way), with TRL's output fields, computed with liger-align's fused base.

The last section holds the trainer plumbing the four trainers share: the
``use_liger_kernel_patches`` keyword and constructor signature, the model patches, the target shift
and the ``logits/*`` metric computed from the hidden states.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..kernels.linear_logprobs import linear_logprobs
from ..models import apply_liger_kernel
from ..models.head_call import (  # noqa: F401  (re-exported for the trainers and tests)
    HeadFn, backbone, call_through_head, causal_lm, check_head_not_adapted, is_peft, logit_options, output_head,
    text_config,
)
from ._inputs import bound_arguments, check_config, check_datasets

logger = logging.getLogger(__name__)

_INSTALLED = "_liger_align_fused_forward"
_STATE = "_liger_align_fused_state"
_DROP = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "return_dict", "output_hidden_states")
_TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _router_aux_loss(lm: nn.Module, router_logits: Any, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The MoE load-balancing loss the model's own forward would add, or None when it has no router logits."""
    if router_logits is None:
        return None
    module = importlib.import_module(type(lm).__module__)
    loss_fn = getattr(module, "load_balancing_loss_func", None)
    if loss_fn is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as loss_fn
    config = text_config(lm)
    names = ("num_experts", "num_local_experts", "n_routed_experts")
    experts = next((getattr(config, n) for n in names if getattr(config, n, None)), None)
    experts = experts or getattr(lm, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(lm, "num_experts_per_tok", None)
    return loss_fn(router_logits, experts, top_k, attention_mask)


def install_fused_forward(
    lm: nn.Module, *, outputs: tuple[str, ...] = ("log_probs",), temperature: float = 1.0
) -> None:
    """Give the causal LM ``lm`` (not a wrapper) a forward with two fused modes; idempotent.

    - ``lm(input_ids, attention_mask=..., liger_head=fn, output_router_logits=...)`` returns
      ``{"head": fn(hidden, weight, bias), "aux_loss": tensor | None}`` with ``hidden`` the backbone's last
      hidden states ``(B, T, H)``; no logits are built.
    - ``lm(..., labels=labels, fused_lm_head=True)`` answers TRL's fused-LM-head protocol (see
      :func:`add_liger_fused_lm_head`).
    - Without either keyword, the forward is the one ``lm`` had (generation, evaluation logits).

    The installed forward keeps no reference to ``lm``: its settings live on the instance
    (``lm._liger_align_fused_state``) and the forward it falls back on is the class's, looked up at
    call time (or a model patch bound to ``lm``), so ``copy.deepcopy(lm)`` is a true copy. A second
    call only updates the settings: it never replaces the forward again, so the wrappers accelerate
    put over it (autocast, output casting) stay in place.
    """
    state = lm.__dict__.get(_STATE)
    if state is not None:
        state["outputs"] = tuple(dict.fromkeys(state["outputs"] + tuple(outputs)))
        state["temperature"] = float(temperature)
        return
    previous = lm.__dict__.get("forward")
    if previous is not None and "_original_forward" in lm.__dict__:
        logger.warning(
            "%s was already prepared by accelerate (its forward wraps autocast): liger-align's fused forward, "
            "installed now, runs without that autocast; install it before accelerator.prepare",
            type(lm).__name__,
        )
    # The forward to fall back on: None means the class's (looked up at call time); an instance forward
    # set before (a model patch, bound to ``lm``) is kept, and a deep copy rebinds it to the copy.
    lm.__dict__[_STATE] = {
        "outputs": tuple(outputs), "temperature": float(temperature), "inner": previous, "owner": id(lm),
    }

    @functools.wraps(type(lm).forward)
    def forward(
        self: nn.Module, *args: Any, liger_head: HeadFn | None = None, fused_lm_head: bool = False, **kwargs: Any
    ) -> Any:
        state = self.__dict__[_STATE]
        if liger_head is None and not fused_lm_head:
            return _fallback_forward(self, state)(*args, **kwargs)
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        num_items = kwargs.get("num_items_in_batch")
        body_kwargs = {k: v for k, v in kwargs.items() if k not in _DROP and v is not None}
        body_kwargs["use_cache"] = False
        config = text_config(self)
        if fused_lm_head and getattr(config, "output_router_logits", False):
            body_kwargs.setdefault("output_router_logits", True)
        if not body_kwargs.get("output_router_logits", False):
            body_kwargs.pop("output_router_logits", None)
        body_out = backbone(self)(*args, **body_kwargs)
        hidden = body_out.last_hidden_state if hasattr(body_out, "last_hidden_state") else body_out[0]
        aux = None
        if body_kwargs.get("output_router_logits"):
            aux = _router_aux_loss(self, getattr(body_out, "router_logits", None), body_kwargs.get("attention_mask"))
        head = output_head(self)
        if liger_head is not None:
            return {"head": call_through_head(head, hidden, liger_head), "aux_loss": aux}
        return _trl_fused_output(self, head, hidden, labels, shift_labels, num_items, aux, state)

    setattr(forward, _INSTALLED, True)
    lm.forward = types.MethodType(forward, lm)


def _fallback_forward(lm: nn.Module, state: dict[str, Any]) -> Callable[..., Any]:
    """The forward ``lm`` had before the fused one: the class's, or the instance forward that was there."""
    inner = state["inner"]
    if inner is None:
        return types.MethodType(type(lm).forward, lm)
    if isinstance(inner, types.MethodType) and inner.__self__ is lm:
        return inner
    if state["owner"] == id(lm):
        return inner
    raise RuntimeError(
        f"this {type(lm).__name__} is a copy of a model whose forward had been replaced by {inner!r}, which "
        "still calls the original model; copy the model before wrapping its forward (or unwrap it first)"
    )


def add_liger_fused_lm_head(
    model: nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """Drop-in for TRL's ``add_fused_lm_head``: the same call protocol and output fields, on liger-align's base.

    ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput`` with per-token
    ``log_probs`` ``(B, T-1)`` (differentiable), ``mean_logits``, ``entropy``, ``is_top1``,
    ``log_sum_sq_probs`` (those in ``outputs``; no gradient), ``label_mask``, ``loss`` and ``aux_loss``.
    """
    if cast_lm_head_to_fp32:
        logger.warning("cast_lm_head_to_fp32 is ignored: liger-align's base accumulates in fp32 already")
    install_fused_forward(causal_lm(model), outputs=tuple(outputs), temperature=temperature)


def _trl_fused_output(lm, head, hidden, labels, shift_labels, num_items, aux, state) -> Any:
    """TRL's ``FusedCausalLMOutput`` for ``hidden (B, T, H)`` and unshifted ``labels (B, T)``."""
    from trl.trainer.utils import FusedCausalLMOutput

    if shift_labels is None:
        if labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels)")
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    labels = labels.to(head.weight.device)
    mask = labels != -100
    wanted = state["outputs"]
    opts = dict(logit_options(lm), temperature=state["temperature"])

    def fn(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        extra = [k for k in ("entropy", "is_top1", "log_sum_sq_probs") if k in wanted]
        res = linear_logprobs(flat_h, weight, flat_t, bias, ignore_index=-100, distribution_stats=bool(extra), **opts)
        out = {"log_probs": res.logps.view(labels.shape), "mean_logits": res.logit_mean.view(labels.shape)}
        out.update({k: getattr(res, k).view(labels.shape) for k in extra})
        return out

    per_token = call_through_head(head, hidden, fn)
    log_probs = per_token["log_probs"]
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)
    if aux is not None:
        config = text_config(lm)
        loss = loss + getattr(config, "router_aux_loss_coef", 0.0) * aux
    return FusedCausalLMOutput(
        loss=loss,
        label_mask=mask,
        aux_loss=aux,
        **{k: (per_token.get(k) if k in wanted or k == "log_probs" else None) for k in _TRL_OUTPUTS},
    )


# ----------------------------------------------------------------------------------------- model patches


def apply_model_patches(model: nn.Module | None) -> Any:
    """Apply liger-align's kernel patches to ``model`` when its architecture is supported; return the handle or None.

    Architectures :mod:`liger_align.models` does not cover are left as they are.
    """
    if model is None:
        return None
    lm = causal_lm(model)
    try:
        # The causal-LM forward is ours (install_fused_forward); only the layer kernels are wanted.
        return apply_liger_kernel(lm, fused_linear_cross_entropy=False)
    except NotImplementedError as err:
        logger.info("no liger-align model patches for %s: %s", type(lm).__name__, err)
        return None


@contextlib.contextmanager
def swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily replace ``module.name`` by ``value``."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


# ----------------------------------------------------------------------------------------- trainer plumbing


class LigerTrainerMixin:
    """Constructor keyword ``use_liger_kernel_patches`` and the preparation of the policy (and reference).

    Subclasses call :meth:`_liger_pre_init` before TRL's ``__init__`` (patches a model given as an
    instance, before PEFT wraps it) and :meth:`_liger_post_init` after it.
    """

    liger_patch_handles: list[Any]

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
            install_fused_forward(causal_lm(model), outputs=outputs)

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


def shift_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``target[:, t] = labels[:, t + 1]`` and ``ignore_index`` in the last column (the next-token targets)."""
    target = labels.new_full(labels.shape, ignore_index)
    target[:, :-1] = labels[:, 1:]
    return target


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


@contextlib.contextmanager
def liger_fused_lm_head_for(trainer_cls: type) -> Iterator[None]:
    """While TRL's ``__init__`` of ``trainer_cls`` runs, its ``add_fused_lm_head`` installs liger-align's instead.

    TRL's DPO and KTO trainers call the model with ``fused_lm_head=True`` and read per-token
    log-probs (and metric fields) from the output; swapping the installer is the narrowest change
    that routes every such call (policy, reference, precomputed reference) through our base.
    """
    import sys

    modules = []
    for klass in trainer_cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and hasattr(module, "add_fused_lm_head") and module not in modules:
            modules.append(module)
    if not modules:
        raise RuntimeError(
            f"{trainer_cls.__name__}: this TRL version has no fused-LM-head protocol (add_fused_lm_head); "
            "liger_align.trainers needs TRL's DPO/KTO trainers that call the model with fused_lm_head=True"
        )
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(swapped(module, "add_fused_lm_head", add_liger_fused_lm_head))
        yield
