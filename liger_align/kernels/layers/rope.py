"""Rotary position embedding (Su et al., 2021, "RoFormer"), in Hugging Face's rotate-half layout.

With ``x = [x1, x2]`` split into halves of the head dimension ``D`` and ``cos = [c1, c2]``,
``sin = [s1, s2]`` likewise (Llama's are ``cat(freqs, freqs)``, so ``c1 == c2``, but any values work)::

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
    out1 = x1 * c1 - x2 * s1,   out2 = x2 * c2 + x1 * s2

The backward is the transposed rotation::

    dx1 = dy1 * c1 + dy2 * s2,  dx2 = dy2 * c2 - dy1 * s1

Llama 3's frequency scaling ("llama3" rope type), NTK and the rest live in how ``cos``/``sin`` are
built (``LlamaRotaryEmbedding``); this op applies whatever tables it is given. The Triton path runs one
program per token that loads the token's ``cos``/``sin`` row once and rotates every query and
key/value head (GQA: ``n_q_heads`` and ``n_kv_heads`` differ) in place of the strided layout it gets,
so the ``transpose(1, 2)`` views the attention builds cost no copy. ``cos``/``sin`` are treated as
constants on the Triton path; when they require grad the plain-PyTorch path runs instead.
"""

from __future__ import annotations

import torch

from .._dispatch import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(
        src_ptr, dst_ptr, src_b, src_t, src_h, dst_b, dst_t, dst_h, b, t, n_heads, c1, c2, s1, s2,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        heads = tl.arange(0, BLOCK_HEADS)
        d = tl.arange(0, BLOCK_HALF)
        mask = (heads < n_heads)[:, None] & (d < HALF)[None, :]
        src = src_ptr + b * src_b + t * src_t + heads[:, None] * src_h + d[None, :]
        dst = dst_ptr + b * dst_b + t * dst_t + heads[:, None] * dst_h + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(dst, o1.to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, o2.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
        q_b, q_t, q_h, k_b, k_t, k_h, qo_b, qo_t, qo_h, ko_b, ko_t, ko_h,
        cos_b, cos_t, sin_b, sin_t, seq_len, n_q_heads, n_kv_heads,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        b = token // seq_len
        t = token % seq_len
        d = tl.arange(0, BLOCK_HALF)
        dm = d < HALF
        cos_row = cos_ptr + b * cos_b + t * cos_t + d
        sin_row = sin_ptr + b * sin_b + t * sin_t + d
        c1 = tl.load(cos_row, mask=dm, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_row + HALF, mask=dm, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_row, mask=dm, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_row + HALF, mask=dm, other=0.0).to(tl.float32)[None, :]
        _rotate_heads(q_ptr, qo_ptr, q_b, q_t, q_h, qo_b, qo_t, qo_h, b, t, n_q_heads, c1, c2, s1, s2,
                      HALF, BLOCK_HALF, BLOCK_Q, BACKWARD)
        _rotate_heads(k_ptr, ko_ptr, k_b, k_t, k_h, ko_b, ko_t, ko_h, b, t, n_kv_heads, c1, c2, s1, s2,
                      HALF, BLOCK_HALF, BLOCK_K, BACKWARD)


def _btd_strides(x: torch.Tensor, head_dim: int) -> tuple[int, int, int]:
    """``(batch, seq, head)`` element strides of ``x`` laid out as ``(B, H, T, D)`` (``head_dim=1``)
    or ``(B, T, H, D)`` (``head_dim=2``)."""
    seq_dim = 3 - head_dim
    return x.stride(0), x.stride(seq_dim), x.stride(head_dim)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, q_out, k_out, cos, sin, head_dim: int, backward: bool) -> None:
    batch, seq_len, d = q.shape[0], q.shape[3 - head_dim], q.shape[-1]
    n_q, n_kv = q.shape[head_dim], k.shape[head_dim]
    cos = cos.expand(batch, seq_len, d)
    sin = sin.expand(batch, seq_len, d)
    half = d // 2
    block_q, block_k = triton.next_power_of_2(n_q), triton.next_power_of_2(n_kv)
    elements = (block_q + block_k) * triton.next_power_of_2(half)
    num_warps = 4 if elements <= 4096 else 8
    _rope_kernel[(batch * seq_len,)](
        q, k, q_out, k_out, cos, sin,
        *_btd_strides(q, head_dim), *_btd_strides(k, head_dim),
        *_btd_strides(q_out, head_dim), *_btd_strides(k_out, head_dim),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), seq_len, n_q, n_kv,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_Q=block_q, BLOCK_K=block_k,
        BACKWARD=backward, num_warps=num_warps,
    )


class RoPEFunction(torch.autograd.Function):
    """Triton RoPE of ``q`` and ``k`` with constant ``cos``/``sin``; see :func:`rope`."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = _unit_last(q), _unit_last(k)
        cos, sin = _unit_last(cos), _unit_last(sin)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        _launch(q, k, q_out, k_out, cos, sin, head_dim, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.head_dim = head_dim
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        dq_out, dk_out = _unit_last(dq_out), _unit_last(dk_out)
        dq, dk = torch.empty_like(dq_out), torch.empty_like(dk_out)
        _launch(dq_out, dk_out, dq, dk, cos, sin, ctx.head_dim, backward=True)
        return dq, dk, None, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_torch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch RoPE with the contract of :func:`rope` (fp32 math, or fp64 for fp64 inputs)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    c = cos.unsqueeze(unsqueeze_dim).to(compute)
    s = sin.unsqueeze(unsqueeze_dim).to(compute)
    outs = []
    for x in (q, k):
        xc = x.to(compute)
        outs.append((xc * c + _rotate_half(xc) * s).to(x.dtype))
    return outs[0], outs[1]


def _check(q: object, k: object, cos: object, sin: object, unsqueeze_dim: object) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}"
                            f"{' of dtype ' + str(t.dtype) if isinstance(t, torch.Tensor) else ''}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (q is (B, H, T, D)) or 2 (q is (B, T, H, D)), got {unsqueeze_dim!r}")
    layout = "(B, H, T, D)" if unsqueeze_dim == 1 else "(B, T, H, D)"
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    seq_dim = 3 - unsqueeze_dim
    batch, seq_len, d = q.shape[0], q.shape[seq_dim], q.shape[-1]
    if d % 2:
        raise ValueError(f"the head dimension D must be even, got q of shape {tuple(q.shape)}")
    if k.shape[0] != batch or k.shape[seq_dim] != seq_len or k.shape[-1] != d:
        raise ValueError(f"k must match q's batch, sequence and head dim {layout}: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1:] != (seq_len, d):
            raise ValueError(f"{name} must have shape (B or 1, T, D) = ({batch}, {seq_len}, {d}), "
                             f"got {tuple(t.shape)}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
    unsqueeze_dim: int = 1, impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embeddings to queries and keys (Hugging Face's ``apply_rotary_pos_emb``).

    Args:
        q: ``(B, n_q_heads, T, D)`` (``unsqueeze_dim=1``, the Llama layout) or ``(B, T, n_q_heads, D)``
            (``unsqueeze_dim=2``); any strides with a unit last stride (``transpose`` views are fine).
        k: the same layout with ``n_kv_heads`` heads (GQA), ``q``'s dtype.
        cos, sin: ``(B or 1, T, D)``, e.g. from ``LlamaRotaryEmbedding`` (any dtype; read in fp32).
        unsqueeze_dim: where the head dimension of ``q``/``k`` is, as in Hugging Face.
        impl: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).

    Returns:
        ``(q_embed, k_embed)`` shaped and typed like ``q`` and ``k``:
        ``x * cos + rotate_half(x) * sin`` computed in fp32, rounded once.
    """
    _check(q, k, cos, sin, unsqueeze_dim)
    constant_tables = not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
    if not constant_tables or q.numel() == 0 or not use_triton(q, k, cos, sin, impl=impl):
        return rope_torch(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)
