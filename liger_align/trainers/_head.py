"""The one place where the trainers touch the model: backbone hidden states and the output head.

A fused loss needs the last hidden states ``(B, T, H)`` and the head's weight ``(V, H)`` (and bias),
never the logits. Getting them right under every wrapper is the whole difficulty:

- **FSDP 1 and 2** shard the head's weight and gather it only inside the wrapped root module's
  forward, and hook the backward on that forward's outputs. So the loss must run *inside*
  ``model(...)``: :func:`install_fused_forward` gives the causal LM a forward that, called with
  ``liger_head=fn``, runs the backbone and returns ``fn(hidden, weight, bias)`` instead of logits.
  Every wrapper (DDP, FSDP, DeepSpeed, PEFT, accelerate's autocast) forwards the keyword untouched.
- **DeepSpeed ZeRO-3** gathers a parameter only inside its own module's call, and re-gathers it for
  the backward from hooks on that call's outputs. Our base recomputes the logits in the backward, so a
  one-off ``GatheredParameters`` block is not enough: :func:`call_through_head` runs ``fn`` *as the
  head module's forward*, so ZeRO-3 (and an FSDP unit wrapping the head alone) gathers the weight for
  the forward and again for the backward. A DTensor weight (FSDP2 outside its unshard) is gathered
  with ``full_tensor()``, which is differentiable.
- **PEFT**: the fused forward is installed on the base causal LM, below the adapters, so LoRA layers
  in the backbone stay active (and are disabled by ``disable_adapter()`` for a reference pass). A
  ``modules_to_save`` copy of the head is used when active. A LoRA layer *on* the head would be
  silently ignored by a fused loss, so it is an error.
- **Autocast**: the backbone and the loss run inside ``model(...)``, i.e. inside the forward that
  accelerate wraps with its autocast; callers add ``accelerator.autocast()`` for direct calls.
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

logger = logging.getLogger(__name__)

#: ``fn(hidden (R, T, H), weight (V, H), bias (V,) | None) -> any pytree of tensors``.
HeadFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], Any]

_INSTALLED = "_liger_align_fused_forward"
_WRAPPERS = {"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"}
_DROP = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "return_dict", "output_hidden_states")
_TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


# ----------------------------------------------------------------------------------------- unwrapping


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM under DDP / FSDP1 / DeepSpeed / ``torch.compile`` wrappers and PEFT (adapters stay in it)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in _WRAPPERS:
            model = model.module
        elif is_peft(model):
            model = model.get_base_model()
        else:
            break
    return model


def _is_tuner_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def check_head_not_adapted(model: nn.Module) -> None:
    """Raise ``ValueError`` when a PEFT adapter (e.g. LoRA) sits on the output head: a fused loss reads
    ``lm_head.weight`` directly, so the adapter would never be trained."""
    head = causal_lm(model).get_output_embeddings()
    if head is not None and _is_tuner_layer(head):
        raise ValueError(
            "A PEFT adapter on the output head (lm_head) is not supported by the liger-align trainers: the fused "
            "loss reads lm_head.weight directly, so the adapter would never be trained. Remove 'lm_head' from "
            "target_modules (use modules_to_save=['lm_head'] to train the head itself)."
        )


def output_head(lm: nn.Module) -> nn.Module:
    """The module holding the head's weight: the output embeddings, or the active ``modules_to_save`` copy."""
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (get_output_embeddings() is None)")
    if _is_tuner_layer(head):
        check_head_not_adapted(lm)
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):  # peft ModulesToSaveWrapper
        active = head.active_adapters if hasattr(head, "active_adapters") else [head.active_adapter]
        active = [a for a in active if a in head.modules_to_save]
        disabled = getattr(head, "disable_adapters", False) or not active
        head = head.original_module if disabled else head.modules_to_save[active[0]]
    return head


def backbone(lm: nn.Module) -> nn.Module:
    """The decoder stack that returns ``last_hidden_state`` (``lm.model`` for Llama)."""
    prefix = getattr(lm, "base_model_prefix", "model")
    body = getattr(lm, prefix, None)
    if isinstance(body, nn.Module) and body is not lm:
        return body
    if hasattr(lm, "get_decoder"):
        return lm.get_decoder()
    raise ValueError(f"cannot find the backbone of {type(lm).__name__} (no attribute {prefix!r})")


# ----------------------------------------------------------------------------------------- the head call


def _full(param: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor (FSDP2 sharded parameter) gathered to a plain tensor, differentiably; others unchanged."""
    if param is not None and hasattr(param, "full_tensor") and type(param).__name__ == "DTensor":
        return param.full_tensor()
    return param


def call_through_head(head: nn.Module, hidden: torch.Tensor, fn: HeadFn) -> Any:
    """Return ``fn(hidden, head.weight, head.bias)`` computed as ``head``'s own forward.

    Calling the module (rather than reading its weight) runs the hooks of whatever owns the weight:
    ZeRO-3 gathers it for the forward and registers the re-gather for the backward on the outputs, and
    an FSDP unit around the head unshards it the same way.
    """

    def routed(h: torch.Tensor) -> Any:
        weight = _full(head.weight)
        bias = _full(getattr(head, "bias", None))
        if weight.dim() != 2 or weight.numel() == 0:
            raise RuntimeError(
                f"the output head's weight is still partitioned inside its own forward (shape "
                f"{tuple(weight.shape)}): the sharding wrapper did not gather it; call the model through "
                "its wrapper (DeepSpeed engine / FSDP module), not the bare module"
            )
        return fn(h, weight, bias)

    had_own = "forward" in head.__dict__
    saved = head.__dict__.get("forward")
    head.forward = routed
    try:
        return head(hidden)
    finally:
        if had_own:
            head.forward = saved
        else:
            del head.forward


def _router_aux_loss(lm: nn.Module, router_logits: Any, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The MoE load-balancing loss the model's own forward would add, or None when it has no router logits."""
    if router_logits is None:
        return None
    module = importlib.import_module(type(lm).__module__)
    loss_fn = getattr(module, "load_balancing_loss_func", None)
    if loss_fn is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as loss_fn
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    names = ("num_experts", "num_local_experts", "n_routed_experts")
    experts = next((getattr(config, n) for n in names if getattr(config, n, None)), None)
    experts = experts or getattr(lm, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(lm, "num_experts_per_tok", None)
    return loss_fn(router_logits, experts, top_k, attention_mask)


def _logit_options(lm: nn.Module) -> dict[str, Any]:
    """Softcap and scale of the model's final logits (Gemma-2 style softcapping, Cohere/Granite scales)."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return {"softcap": softcap, "logit_scale": 1.0 if scale is None else float(scale)}


def install_fused_forward(
    lm: nn.Module, *, outputs: tuple[str, ...] = ("log_probs",), temperature: float = 1.0
) -> None:
    """Give the causal LM ``lm`` (not a wrapper) a forward with two fused modes; idempotent.

    - ``lm(input_ids, attention_mask=..., liger_head=fn, output_router_logits=...)`` returns
      ``{"head": fn(hidden, weight, bias), "aux_loss": tensor | None}`` with ``hidden`` the backbone's last
      hidden states ``(B, T, H)``; no logits are built.
    - ``lm(..., labels=labels, fused_lm_head=True)`` answers TRL's fused-LM-head protocol (see
      :func:`add_liger_fused_lm_head`).
    - Without either keyword, the forward is the original one (generation, evaluation logits).
    """
    current = lm.__dict__.get("forward")
    if current is not None and getattr(current, _INSTALLED, None) is not None:
        state = getattr(current, _INSTALLED)
        state["outputs"] = tuple(dict.fromkeys(state["outputs"] + tuple(outputs)))
        state["temperature"] = temperature
        return
    state = {"outputs": tuple(outputs), "temperature": float(temperature)}
    original = lm.forward

    @functools.wraps(type(lm).forward)
    def forward(
        self: nn.Module, *args: Any, liger_head: HeadFn | None = None, fused_lm_head: bool = False, **kwargs: Any
    ) -> Any:
        if liger_head is None and not fused_lm_head:
            return original(*args, **kwargs)
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        num_items = kwargs.get("num_items_in_batch")
        body_kwargs = {k: v for k, v in kwargs.items() if k not in _DROP and v is not None}
        body_kwargs["use_cache"] = False
        config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
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
            return {"head": call_through_head(head, hidden.to(head.weight.device), liger_head), "aux_loss": aux}
        return _trl_fused_output(self, head, hidden, labels, shift_labels, num_items, aux, state)

    setattr(forward, _INSTALLED, state)
    lm.forward = types.MethodType(forward, lm)


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
    opts = dict(_logit_options(lm), temperature=state["temperature"])

    def fn(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        extra = [k for k in ("entropy", "is_top1", "log_sum_sq_probs") if k in wanted]
        res = linear_logprobs(flat_h, weight, flat_t, bias, ignore_index=-100, distribution_stats=bool(extra), **opts)
        out = {"log_probs": res.logps.view(labels.shape), "mean_logits": res.logit_mean.view(labels.shape)}
        out.update({k: getattr(res, k).view(labels.shape) for k in extra})
        return out

    per_token = call_through_head(head, hidden.to(head.weight.device), fn)
    log_probs = per_token["log_probs"]
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)
    if aux is not None:
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
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
