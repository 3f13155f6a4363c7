"""Float64 references and comparison helpers shared by the kernel and loss tests."""

from __future__ import annotations

import torch

# Relative error ||out - ref|| / ||ref|| allowed for each input dtype against a float64 reference.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def reference_logits(hidden, weight, bias=None, *, softcap=None, temperature=1.0, logit_scale=1.0) -> torch.Tensor:
    """Materialised float64 logits ``(N, V)`` with the same transform as the kernels."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def reference_logprobs(hidden, weight, target, bias=None, *, ignore_index=-100, **transform) -> torch.Tensor:
    """Float64 per-token target log-probs ``(N,)``, 0 where ``target == ignore_index``."""
    logp = torch.log_softmax(reference_logits(hidden, weight, bias, **transform), dim=-1)
    valid = target != ignore_index
    return logp.gather(1, target.clamp(min=0)[:, None]).squeeze(1) * valid
