"""layer_norm: values and gradients against a float64 formula, with and without bias, on every path."""

from __future__ import annotations

import pytest
import torch
from _helpers import PATHS, skip_unless_path
from _reference import TOLERANCE, rel_err

from liger_align.kernels import layer_norm
from liger_align.kernels.layers.layer_norm import layer_norm_torch


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The textbook formula in float64 (biased variance), written out: no call to F.layer_norm."""
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def _leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def _check(shape, dtype, device, impl, *, with_bias: bool, eps: float = 1e-6, tol: float | None = None):
    tol = tol or TOLERANCE[dtype]
    x = (torch.randn(shape) * 3 + 1.5).to(device, dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(device, dtype).requires_grad_()
    bias = (0.3 * torch.randn(shape[-1])).to(device, dtype).requires_grad_() if with_bias else None
    y = layer_norm(x, weight, bias, eps=eps, impl=impl)
    x64, w64, b64 = _leaf64(x), _leaf64(weight), _leaf64(bias)
    ref = _reference(x64, w64, b64, eps)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, ref) < tol
    grad_out = torch.randn(shape).to(device, dtype)
    inputs = (x, weight) + ((bias,) if with_bias else ())
    refs = (x64, w64) + ((b64,) if with_bias else ())
    got = torch.autograd.grad(y, inputs, grad_out)
    want = torch.autograd.grad(ref, refs, grad_out.double())
    for name, g, r in zip(("x", "weight", "bias"), got, want):
        assert g.dtype == dtype, name
        assert rel_err(g, r) < tol, name


@pytest.mark.interpreter
@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 48), (2, 19, 80), (3, 101, 33), (5, 1000)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_formula(device, impl, dtype, shape, with_bias):
    skip_unless_path(device, impl)
    # the Triton path computes in fp32 whatever the storage dtype
    tol = 1e-5 if dtype == torch.float64 and impl == "triton" else None
    _check(shape, dtype, device, impl, with_bias=with_bias, tol=tol)


@pytest.mark.interpreter
@pytest.mark.parametrize("device,impl", PATHS)
def test_matches_nn_layer_norm_module(device, impl):
    """Same numbers as the module it replaces in Qwen2-VL's vision tower (eps 1e-6, with bias)."""
    skip_unless_path(device, impl)
    module = torch.nn.LayerNorm(67, eps=1e-6).to(device)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3)
        module.bias.normal_(0.0, 0.3)
    x = torch.randn(29, 67, device=device, requires_grad=True)
    want = module(x)
    gx_want, gw_want, gb_want = torch.autograd.grad(want.square().sum(), (x, module.weight, module.bias))
    got = layer_norm(x, module.weight, module.bias, eps=module.eps, impl=impl)
    gx, gw, gb = torch.autograd.grad(got.square().sum(), (x, module.weight, module.bias))
    for a, b in ((got, want), (gx, gx_want), (gw, gw_want), (gb, gb_want)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("device,impl", PATHS)
def test_frozen_affine_and_constant_rows(device, impl):
    """Frozen weight/bias (no dweight/dbias computed); constant rows (variance 0) stay finite."""
    skip_unless_path(device, impl)
    x = torch.randn(13, 40, device=device)
    x[3] = 2.5  # a constant row: xhat = 0, rstd = 1/sqrt(eps)
    x.requires_grad_()
    weight, bias = torch.randn(40, device=device), torch.randn(40, device=device)
    y = layer_norm(x, weight, bias, eps=1e-5, impl=impl)
    ref = _reference(x.detach().double(), weight.double(), bias.double(), 1e-5)
    assert rel_err(y, ref) < 1e-5
    assert torch.allclose(y[3].double(), bias.double(), atol=1e-5)
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    assert torch.isfinite(gx).all()
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(_reference(x64, weight.double(), bias.double(), 1e-5).sum(), (x64,))
    assert rel_err(gx, want) < 1e-4


@pytest.mark.interpreter
@pytest.mark.parametrize("device,impl", PATHS)
def test_fp32_weight_on_bf16_input_and_eps(device, impl):
    skip_unless_path(device, impl)
    x = torch.randn(37, 48).to(device, torch.bfloat16).requires_grad_()
    weight = torch.randn(48, device=device, requires_grad=True)
    y = layer_norm(x, weight, None, eps=1e-6, impl=impl)
    assert y.dtype == torch.float32  # promote_types(bf16, fp32), as nn.LayerNorm under autocast
    assert rel_err(y, _reference(x.detach().double(), weight.detach().double(), None, 1e-6)) < 2e-2
    gx, gw = torch.autograd.grad(y.sum(), (x, weight))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    small = torch.randn(11, 48, device=device) * 1e-3  # tiny variance: eps is visible
    a = layer_norm(small, weight.detach(), eps=1e-5, impl=impl)
    assert rel_err(a, layer_norm_torch(small, weight.detach(), eps=1e-5)) < 1e-5
    assert rel_err(a, layer_norm(small, weight.detach(), eps=1e-7, impl=impl)) > 1e-2


def test_bad_inputs():
    x = torch.randn(4, 48)
    w = torch.randn(48)
    with pytest.raises(ValueError, match=r"weight.*\(48,\).*\(47,\)"):
        layer_norm(x, torch.randn(47))
    with pytest.raises(ValueError, match=r"bias.*\(48,\).*\(3,\)"):
        layer_norm(x, w, torch.randn(3))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer_norm(torch.ones(4, 48, dtype=torch.int64), w)
    with pytest.raises(TypeError, match="weight"):
        layer_norm(x, [1.0] * 48)
    with pytest.raises(TypeError, match="bias"):
        layer_norm(x, w, torch.ones(48, dtype=torch.int64))
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, w, eps=-1.0)
    with pytest.raises(ValueError, match="impl"):
        layer_norm(x, w, impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4097, 1280), (2, 1031, 5120), (333, 3584)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_against_float64(dtype, shape, with_bias):
    _check(shape, dtype, "cuda", None, with_bias=with_bias)
