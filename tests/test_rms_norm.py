"""rms_norm: values and gradients against transformers' LlamaRMSNorm run in float64, on every path."""

from __future__ import annotations

import pytest
import torch
from _helpers import PATHS, skip_unless_path
from _reference import TOLERANCE, rel_err
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from liger_align.kernels.layers.rms_norm import rms_norm


def _hf_reference(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Hugging Face's module on float64 leaf copies: ``(output, x64, weight64)``."""
    module = LlamaRMSNorm(x.shape[-1], eps=eps).to(device=x.device, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight.detach().double())
    x64 = x.detach().double().requires_grad_()
    return module(x64), x64, module.weight


def _check(shape, dtype, device, impl, eps=1e-5, tol=None):
    tol = tol or TOLERANCE[dtype]
    x = (torch.randn(shape) * 3 + 0.5).to(device, dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(device, dtype).requires_grad_()
    y = rms_norm(x, weight, eps=eps, impl=impl)
    ref, x64, w64 = _hf_reference(x, weight, eps)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, ref) < tol
    grad_out = torch.randn(shape).to(device, dtype)
    gx, gw = torch.autograd.grad(y, (x, weight), grad_out)
    rx, rw = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    assert gx.dtype == dtype and gw.dtype == dtype
    assert rel_err(gx, rx) < tol
    assert rel_err(gw, rw) < tol


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 48), (2, 19, 80), (3, 100, 48), (5, 1000)])
def test_matches_llama_rms_norm(device, impl, dtype, shape):
    skip_unless_path(device, impl)
    # the Triton path computes in fp32 whatever the storage dtype
    tol = 1e-5 if dtype == torch.float64 and impl == "triton" else None
    _check(shape, dtype, device, impl, tol=tol)


@pytest.mark.parametrize("device,impl", PATHS)
def test_weight_without_grad_and_fp32_weight_on_bf16_input(device, impl):
    skip_unless_path(device, impl)
    x = torch.randn(37, 48).to(device, torch.bfloat16).requires_grad_()
    weight = torch.randn(48, device=device)  # fp32, frozen: output is promoted to fp32 like HF's
    y = rms_norm(x, weight, eps=1e-6, impl=impl)
    ref, _, _ = _hf_reference(x, weight, 1e-6)
    assert y.dtype == torch.float32
    assert rel_err(y, ref) < TOLERANCE[torch.bfloat16]
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    assert gx.dtype == torch.bfloat16 and torch.isfinite(gx).all()


@pytest.mark.parametrize("device,impl", PATHS)
def test_paths_agree_and_eps_matters(device, impl):
    skip_unless_path(device, impl)
    x = torch.randn(37, 48, device=device) * 1e-3  # small rows: eps is visible
    w = torch.randn(48, device=device)
    a = rms_norm(x, w, eps=1e-5, impl=impl)
    b = rms_norm(x, w, eps=1e-5, impl="torch")
    c = rms_norm(x, w, eps=1e-6, impl=impl)
    assert rel_err(a, b) < 1e-5
    assert rel_err(a, c) > 1e-2


def test_bad_inputs():
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match=r"weight.*\(48,\).*\(47,\)"):
        rms_norm(x, torch.randn(47))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        rms_norm(torch.ones(4, 48, dtype=torch.int64), torch.randn(48))
    with pytest.raises(TypeError, match="weight"):
        rms_norm(x, [1.0] * 48)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.randn(48), eps=-1.0)
    with pytest.raises(ValueError, match="impl"):
        rms_norm(x, torch.randn(48), impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4097, 4096), (2, 1031, 2048), (333, 5120)])
def test_gpu_against_float64(dtype, shape):
    _check(shape, dtype, "cuda", None)
