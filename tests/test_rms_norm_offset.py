"""rms_norm with Gemma's ``(1 + weight)`` offset and Gemma's output dtype: values and gradients against
transformers' GemmaRMSNorm / Gemma2RMSNorm / Gemma3RMSNorm run in float64, on every path."""

from __future__ import annotations

import pytest
import torch
from _helpers import PATHS, skip_unless_path
from _reference import TOLERANCE, rel_err
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from liger_align.kernels.layers.rms_norm import rms_norm
from liger_align.models._layers import gemma_rms_norm_forward

GEMMA_NORMS = [GemmaRMSNorm, Gemma2RMSNorm, Gemma3RMSNorm]


def _hf_reference(cls, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Hugging Face's module on float64 leaf copies: ``(output, x64, weight64)``."""
    module = cls(x.shape[-1], eps=eps).to(device=x.device, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight.detach().double())
    x64 = x.detach().double().requires_grad_()
    return module(x64), x64, module.weight


def _formula64(x, weight, eps):
    x, weight = x.double(), weight.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight)


def _check(cls, shape, dtype, device, impl, *, w_dtype=None, eps=1e-6, tol=None):
    tol = tol or TOLERANCE[dtype]
    x = (torch.randn(shape) * 3 + 0.5).to(device, dtype).requires_grad_()
    # Gemma stores the scale centred on 0 (initialised to zeros): small values, some below -1
    weight = (0.5 * torch.randn(shape[-1])).to(device, w_dtype or dtype).requires_grad_()
    y = rms_norm(x, weight, eps=eps, offset=1.0, out_dtype=x.dtype, impl=impl)
    ref, x64, w64 = _hf_reference(cls, x, weight, eps)
    assert torch.allclose(ref, _formula64(x, weight, eps))  # the formula the docstring states
    assert y.shape == x.shape and y.dtype == dtype  # Gemma returns the input's dtype
    assert rel_err(y, ref) < tol
    grad_out = torch.randn(shape).to(device, dtype)
    gx, gw = torch.autograd.grad(y, (x, weight), grad_out)
    rx, rw = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    assert gx.dtype == dtype and gw.dtype == weight.dtype
    assert rel_err(gx, rx) < tol
    assert rel_err(gw, rw) < tol


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 48), (2, 19, 80), (5, 1000)])
def test_matches_gemma_rms_norm(device, impl, dtype, shape):
    skip_unless_path(device, impl)
    tol = 1e-5 if dtype == torch.float64 and impl == "triton" else None  # fp32 math inside the kernel
    _check(GemmaRMSNorm, shape, dtype, device, impl, tol=tol)


@pytest.mark.parametrize("cls", GEMMA_NORMS)
@pytest.mark.parametrize("device,impl", PATHS)
def test_every_gemma_generation(cls, device, impl):
    skip_unless_path(device, impl)
    _check(cls, (3, 11, 48), torch.float32, device, impl)


@pytest.mark.parametrize("device,impl", PATHS)
def test_fp32_weight_on_bf16_input_returns_bf16(device, impl):
    """Gemma's casting: normalised in fp32, times ``1 + weight`` in fp32, cast to the input's dtype."""
    skip_unless_path(device, impl)
    _check(GemmaRMSNorm, (37, 48), torch.bfloat16, device, impl, w_dtype=torch.float32)


@pytest.mark.parametrize("device,impl", PATHS)
def test_offset_and_out_dtype_are_what_they_say(device, impl):
    skip_unless_path(device, impl)
    x = torch.randn(13, 40, device=device)
    w = torch.randn(40, device=device)
    plain = rms_norm(x, w + 1.0, eps=1e-6, impl="torch")
    assert rel_err(rms_norm(x, w, eps=1e-6, offset=1.0, impl=impl), plain) < 1e-6
    assert rel_err(rms_norm(x, w, eps=1e-6, offset=0.0, impl=impl), plain) > 1e-2
    # default out_dtype stays Llama's promote_types(x, weight)
    xb = x.bfloat16()
    assert rms_norm(xb, w, offset=1.0, impl=impl).dtype == torch.float32
    assert rms_norm(xb, w, offset=1.0, out_dtype=torch.bfloat16, impl=impl).dtype == torch.bfloat16


@pytest.mark.parametrize("cls", GEMMA_NORMS)
def test_patched_forward_matches_module(cls):
    module = cls(48, eps=1e-6)
    with torch.no_grad():
        module.weight.normal_(0, 0.3)
    x = torch.randn(2, 7, 48, dtype=torch.bfloat16)
    want = module(x)
    got = gemma_rms_norm_forward(module, x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert rel_err(got, module.to(torch.float64)(x.double())) < TOLERANCE[torch.bfloat16]
    assert rel_err(got, want) < TOLERANCE[torch.bfloat16]


def test_bad_inputs():
    x = torch.randn(4, 48)
    with pytest.raises(TypeError, match="offset must be a float"):
        rms_norm(x, torch.randn(48), offset="1")
    with pytest.raises(TypeError, match="out_dtype must be None or a floating-point torch.dtype"):
        rms_norm(x, torch.randn(48), out_dtype=torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4097, 2048), (2, 1031, 3072), (333, 256)])
def test_gpu_against_float64(dtype, shape):
    _check(GemmaRMSNorm, shape, dtype, "cuda", None)
