"""swiglu: values and gradients against transformers' LlamaMLP (SiLU) run in float64, on every path."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import PATHS, skip_unless_path
from _reference import TOLERANCE, rel_err
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP

from liger_align.kernels.layers.swiglu import swiglu
from liger_align.models._layers import swiglu_mlp_forward


def _check_gate(shape, dtype, device, impl, *, inplace_backward, tol=None):
    tol = tol or TOLERANCE[dtype]
    a_leaf = (torch.randn(shape) * 3).to(device, dtype).requires_grad_()
    b_leaf = torch.randn(shape).to(device, dtype).requires_grad_()
    # non-leaf inputs the op owns, as in the MLP (inplace_backward overwrites them)
    c = swiglu(a_leaf * 1, b_leaf * 1, inplace_backward=inplace_backward, impl=impl)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a_leaf, b_leaf))
    ref = ACT2FN["silu"](a64) * b64
    assert c.shape == a_leaf.shape and c.dtype == dtype
    assert rel_err(c, ref) < tol
    grad_out = torch.randn(shape).to(device, dtype)
    ga, gb = torch.autograd.grad(c, (a_leaf, b_leaf), grad_out)
    ra, rb = torch.autograd.grad(ref, (a64, b64), grad_out.double())
    assert rel_err(ga, ra) < tol and rel_err(gb, rb) < tol


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_gate_matches_silu_times_up(device, impl, dtype, inplace_backward):
    skip_unless_path(device, impl)
    tol = 1e-5 if dtype == torch.float64 and impl == "triton" else None
    _check_gate((3, 37, 176), dtype, device, impl, inplace_backward=inplace_backward, tol=tol)


def _mlp_pair(hidden: int, intermediate: int, dtype, device):
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu", num_attention_heads=4)
    ref = LlamaMLP(config).to(device, torch.float64)
    ours = copy.deepcopy(ref).to(dtype)
    return ref, ours


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_mlp_matches_llama_mlp(device, impl, dtype, monkeypatch):
    skip_unless_path(device, impl)
    import liger_align.models._layers as layers

    monkeypatch.setattr(layers, "swiglu", lambda a, b, **kw: swiglu(a, b, **{**kw, "impl": impl}))
    ref, ours = _mlp_pair(48, 136, dtype, device)
    x = torch.randn(2, 37, 48).to(device, dtype).requires_grad_()
    y = swiglu_mlp_forward(ours, x)
    x64 = x.detach().double().requires_grad_()
    y_ref = ref(x64)
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and rel_err(y, y_ref) < tol
    grad_out = torch.randn_like(y)
    params, ref_params = list(ours.parameters()), list(ref.parameters())
    got = torch.autograd.grad(y, [x, *params], grad_out)
    want = torch.autograd.grad(y_ref, [x64, *ref_params], grad_out.double())
    for g, w in zip(got, want):
        assert rel_err(g, w) < tol


def test_bad_inputs():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"b must have a's shape \(4, 8\), got \(4, 7\)"):
        swiglu(a, torch.randn(4, 7))
    with pytest.raises(TypeError, match="b must have a's dtype"):
        swiglu(a, torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="a must be a floating-point"):
        swiglu(torch.ones(4, 8, dtype=torch.int32), a)
    with pytest.raises(ValueError, match="impl"):
        swiglu(a, a, impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1031, 8192), (2, 517, 14336), (37, 176)])
def test_gpu_against_float64(dtype, shape):
    for inplace_backward in (False, True):
        _check_gate(shape, dtype, "cuda", None, inplace_backward=inplace_backward)
