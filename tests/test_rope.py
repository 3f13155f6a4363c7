"""rope: values and gradients against transformers' apply_rotary_pos_emb in float64, with cos/sin from
LlamaRotaryEmbedding under Llama 3's "llama3" frequency scaling, GQA heads and odd sizes."""

from __future__ import annotations

import pytest
import torch
from _helpers import GRID_PATHS, PATHS, skip_unless_path
from _reference import TOLERANCE, rel_err
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from liger_align.kernels.layers.rope import rope

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def _tables(batch: int, seq: int, head_dim: int, n_heads: int, dtype, device, *, per_batch: bool):
    """``cos, sin`` ``(B or 1, T, D)`` in ``dtype`` from HF's llama3-scaled rotary embedding, positions
    beyond ``original_max_position_embeddings`` so the scaling is exercised."""
    config = LlamaConfig(hidden_size=head_dim * n_heads, num_attention_heads=n_heads, head_dim=head_dim,
                         max_position_embeddings=4096, rope_scaling=dict(LLAMA3_SCALING), rope_theta=500000.0)
    rotary = LlamaRotaryEmbedding(config).to(device)
    rows = batch if per_batch else 1
    starts = torch.randint(0, 300, (rows, 1))
    position_ids = (starts + torch.arange(seq)).to(device)
    dummy = torch.empty(0, device=device, dtype=dtype)
    return rotary(dummy, position_ids)


def _qk(batch, seq, n_q, n_kv, head_dim, dtype, device, unsqueeze_dim):
    """q, k as the attention builds them: ``view(B, T, H, D)`` then (for ``unsqueeze_dim=1``) ``transpose(1, 2)``."""
    q = torch.randn(batch, seq, n_q, head_dim).to(device, dtype)
    k = torch.randn(batch, seq, n_kv, head_dim).to(device, dtype)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return q.requires_grad_(), k.requires_grad_()


def _check(batch, seq, n_q, n_kv, head_dim, dtype, device, impl, *, unsqueeze_dim=1, per_batch=True, tol=None):
    tol = tol or TOLERANCE[dtype]
    q, k = _qk(batch, seq, n_q, n_kv, head_dim, dtype, device, unsqueeze_dim)
    cos, sin = _tables(batch, seq, head_dim, n_q, dtype, device, per_batch=per_batch)
    q_out, k_out = rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, impl=impl)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    q_ref, k_ref = apply_rotary_pos_emb(q64, k64, cos.double(), sin.double(), unsqueeze_dim=unsqueeze_dim)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.dtype == dtype and k_out.dtype == dtype
    assert rel_err(q_out, q_ref) < tol and rel_err(k_out, k_ref) < tol
    gq_out, gk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    gq, gk = torch.autograd.grad((q_out, k_out), (q, k), (gq_out, gk_out))
    rq, rk = torch.autograd.grad((q_ref, k_ref), (q64, k64), (gq_out.double(), gk_out.double()))
    assert gq.dtype == dtype and gk.shape == k.shape
    assert rel_err(gq, rq) < tol and rel_err(gk, rk) < tol


@pytest.mark.parametrize("device,impl", GRID_PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_matches_hf_gqa_llama3_scaling(device, impl, dtype, unsqueeze_dim):
    skip_unless_path(device, impl)
    tol = 1e-5 if dtype == torch.float64 and impl == "triton" else None
    _check(2, 37, 6, 2, 16, dtype, device, impl, unsqueeze_dim=unsqueeze_dim, tol=tol)


@pytest.mark.parametrize("device,impl", PATHS)
def test_broadcast_tables_and_odd_head_counts(device, impl):
    skip_unless_path(device, impl)
    # cos/sin shared by the batch (position_ids (1, T)); 5 query heads, 1 kv head (MQA); head_dim 24
    _check(3, 11, 5, 1, 24, torch.float32, device, impl, per_batch=False)


@pytest.mark.parametrize("device,impl", PATHS)
def test_contiguous_inputs_and_non_duplicated_tables(device, impl):
    skip_unless_path(device, impl)
    # arbitrary cos/sin (halves differ): the op must use both halves as the formula says
    q = torch.randn(2, 4, 13, 8, device=device, requires_grad=True)
    k = torch.randn(2, 2, 13, 8, device=device, requires_grad=True)
    cos, sin = torch.randn(2, 13, 8, device=device), torch.randn(2, 13, 8, device=device)
    out = rope(q, k, cos, sin, impl=impl)
    ref = apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    assert all(rel_err(o, r) < 1e-5 for o, r in zip(out, ref))
    g = torch.autograd.grad(out[0].square().sum() + out[1].sum(), (q, k))
    gr = torch.autograd.grad(ref[0].square().sum() + ref[1].sum(), (q, k))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(g, gr))


def test_tables_with_grad_take_the_torch_path():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    cos = torch.randn(1, 5, 8, requires_grad=True)
    sin = torch.randn(1, 5, 8, requires_grad=True)
    out = rope(q, k, cos, sin, impl="triton")
    ref = apply_rotary_pos_emb(q, k, cos, sin)
    gc = torch.autograd.grad(out[0].sum(), cos)[0]
    rc = torch.autograd.grad(ref[0].sum(), cos)[0]
    assert rel_err(gc, rc) < 1e-6


def test_patched_module_function_falls_back_outside_the_contract():
    from liger_align.models._layers import make_rope_function

    fn = make_rope_function(modeling_llama.apply_rotary_pos_emb)
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for a, b in zip(fn(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert rel_err(a, b) < 1e-6
    cos2d, sin2d = cos[0], sin[0]  # (T, D): not rope()'s contract, HF's own function runs
    q2, k2 = torch.randn(5, 8), torch.randn(5, 8)
    for a, b in zip(fn(q2, k2, cos2d, sin2d, unsqueeze_dim=0), apply_rotary_pos_emb(q2, k2, cos2d, sin2d, 0)):
        assert torch.equal(a, b)


def test_bad_inputs():
    q, k = torch.randn(2, 4, 13, 8), torch.randn(2, 2, 13, 8)
    cos, sin = torch.randn(2, 13, 8), torch.randn(2, 13, 8)
    with pytest.raises(ValueError, match=r"cos must have shape \(B or 1, T, D\) = \(2, 13, 8\), got \(2, 12, 8\)"):
        rope(q, k, cos[:, :12], sin)
    with pytest.raises(ValueError, match="head dimension D must be even"):
        rope(torch.randn(2, 4, 13, 7), torch.randn(2, 2, 13, 7), cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="k must match q"):
        rope(q, torch.randn(2, 2, 12, 8), cos, sin)
    with pytest.raises(ValueError, match="q must be 4-D"):
        rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        rope(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        rope(q, k.double(), cos, sin)
    with pytest.raises(TypeError, match="sin must be a floating-point"):
        rope(q, k, cos, sin.long())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_kv,head_dim", [(32, 8, 64), (32, 8, 128), (6, 2, 16)])
def test_gpu_against_float64(dtype, n_q, n_kv, head_dim):
    _check(2, 517, n_q, n_kv, head_dim, dtype, "cuda", None)
