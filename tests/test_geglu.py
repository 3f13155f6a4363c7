"""geglu: values and gradients against a float64 tanh-GELU formula and transformers' ``gelu_pytorch_tanh``,
on the torch path and the Triton path (interpreter on CPU), plus the patched Gemma MLP."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _helpers import PATHS, skip_unless_path
from _reference import TOLERANCE, rel_err
from transformers import GemmaConfig
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import GemmaMLP

from liger_align.kernels.layers.geglu import geglu
from liger_align.models._layers import geglu_mlp_forward, uses_tanh_gelu


def _formula64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3))) * b`` written out, in float64."""
    a, b = a.double(), b.double()
    return 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a.pow(3)))) * b


def _check_gate(shape, dtype, device, impl, *, inplace_backward, tol=None):
    tol = tol or TOLERANCE[dtype]
    a_leaf = (torch.randn(shape) * 3).to(device, dtype).requires_grad_()
    b_leaf = torch.randn(shape).to(device, dtype).requires_grad_()
    # non-leaf inputs the op owns, as in the MLP (inplace_backward overwrites them)
    c = geglu(a_leaf * 1, b_leaf * 1, inplace_backward=inplace_backward, impl=impl)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a_leaf, b_leaf))
    ref = _formula64(a64, b64)
    assert c.shape == a_leaf.shape and c.dtype == dtype
    assert rel_err(c, ref) < tol
    grad_out = torch.randn(shape).to(device, dtype)
    ga, gb = torch.autograd.grad(c, (a_leaf, b_leaf), grad_out)
    ra, rb = torch.autograd.grad(ref, (a64, b64), grad_out.double())
    assert ga.dtype == dtype and gb.dtype == dtype
    assert rel_err(ga, ra) < tol and rel_err(gb, rb) < tol


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_gate_matches_float64_formula(device, impl, dtype, inplace_backward):
    skip_unless_path(device, impl)
    tol = 1e-5 if dtype == torch.float64 and impl == "triton" else None  # fp32 math inside the kernel
    _check_gate((3, 37, 177), dtype, device, impl, inplace_backward=inplace_backward, tol=tol)


@pytest.mark.parametrize("device,impl", PATHS)
def test_matches_transformers_gelu_pytorch_tanh(device, impl):
    skip_unless_path(device, impl)
    a = (torch.randn(41, 203) * 4).to(device).requires_grad_()
    b = torch.randn(41, 203, device=device).requires_grad_()
    c = geglu(a * 1, b * 1, impl=impl)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    ref = ACT2FN["gelu_pytorch_tanh"](a64) * b64
    assert rel_err(c, ref) < 2e-6
    grad_out = torch.randn_like(c)
    got = torch.autograd.grad(c, (a, b), grad_out)
    want = torch.autograd.grad(ref, (a64, b64), grad_out.double())
    assert all(rel_err(g, w) < 2e-6 for g, w in zip(got, want))
    # tanh-GELU is not the exact (erf) GELU: the comparison above can tell them apart
    assert rel_err(torch.nn.functional.gelu(a64) * b64, ref) > 2e-5


@pytest.mark.parametrize("device,impl", PATHS)
def test_large_and_tiny_inputs_stay_finite(device, impl):
    skip_unless_path(device, impl)
    a = torch.tensor([-1e4, -60.0, -20.0, -3.0, -1e-6, 0.0, 1e-6, 3.0, 20.0, 60.0, 1e4], device=device)
    a = a.requires_grad_()
    b = torch.full_like(a, 1.5).requires_grad_()
    c = geglu(a * 1, b * 1, impl=impl)
    ref = _formula64(a.detach(), b.detach())
    assert torch.isfinite(c).all() and torch.allclose(c.double(), ref, rtol=1e-5, atol=1e-7)
    ga, gb = torch.autograd.grad(c.sum(), (a, b))
    a64 = a.detach().double().requires_grad_()
    (ra,) = torch.autograd.grad(_formula64(a64, b.detach()).sum(), (a64,))
    assert torch.isfinite(ga).all() and torch.allclose(ga.double(), ra, rtol=1e-5, atol=1e-6)


def _mlp_pair(hidden: int, intermediate: int, dtype, device):
    config = GemmaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="gelu_pytorch_tanh",
                         hidden_activation="gelu_pytorch_tanh", num_attention_heads=4, head_dim=16)
    ref = GemmaMLP(config).to(device, torch.float64)
    ours = copy.deepcopy(ref).to(dtype)
    return ref, ours


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_mlp_matches_gemma_mlp(device, impl, dtype, monkeypatch):
    skip_unless_path(device, impl)
    import liger_align.models._layers as layers

    monkeypatch.setattr(layers, "geglu", lambda a, b, **kw: geglu(a, b, **{**kw, "impl": impl}))
    ref, ours = _mlp_pair(48, 139, dtype, device)
    assert uses_tanh_gelu(ours)
    x = torch.randn(2, 37, 48).to(device, dtype).requires_grad_()
    y = geglu_mlp_forward(ours, x)
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


def test_other_activation_runs_hugging_face_formula():
    ref, ours = _mlp_pair(48, 139, torch.float64, "cpu")
    ours.act_fn = ACT2FN["gelu"]  # exact GELU: not the kernel's function
    assert not uses_tanh_gelu(ours)
    x = torch.randn(3, 48, dtype=torch.float64)
    want = ours.down_proj(ACT2FN["gelu"](ours.gate_proj(x)) * ours.up_proj(x))
    assert torch.allclose(geglu_mlp_forward(ours, x), want)


def test_bad_inputs():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"b must have a's shape \(4, 8\), got \(4, 7\)"):
        geglu(a, torch.randn(4, 7))
    with pytest.raises(TypeError, match="b must have a's dtype"):
        geglu(a, torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="a must be a floating-point"):
        geglu(torch.ones(4, 8, dtype=torch.int32), a)
    with pytest.raises(ValueError, match="impl"):
        geglu(a, a, impl="cuda")
    assert geglu(torch.empty(0, 8), torch.empty(0, 8)).shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1031, 16384), (2, 517, 24576), (37, 177)])
def test_gpu_against_float64(dtype, shape):
    for inplace_backward in (False, True):
        _check_gate(shape, dtype, "cuda", None, inplace_backward=inplace_backward)
