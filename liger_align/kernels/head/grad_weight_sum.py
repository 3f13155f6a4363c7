"""The lm_head grad-weight summed over token chunks, at fp32-equivalent accuracy, without a ``(V, H)`` fp32 buffer.

A fused loss that processes its tokens in chunks ``c`` of ``C`` rows has, per chunk, the logits'
gradient ``grad_logits_c (C, V)`` and the chunk's hidden states ``h_c (C, H)``, and needs::

    grad_W = sum_c grad_logits_c^T @ h_c        (V, H), in the weight's dtype

Rounding every chunk's contribution to bf16 before summing biases training (small updates vanish
against a large running sum), so the sum must keep more than bf16's 8 significant bits. The
strategy depends on the dtype and the number of chunks (``GradWeightSum.strategy``):

- ``"single"`` (``n_chunks <= 1``): one product written straight into the result; the GEMM
  accumulates in fp32 and rounds once. No extra memory.
- ``"in_place"`` (fp32 / fp64): the result itself is the accumulator (``addmm``). No extra memory.
- ``"compensated"`` (bf16, several chunks): a pair of bf16 ``(V, H)`` tensors, ``hi`` (which becomes
  the result) and ``lo`` (the rounding residual). Per chunk and output element::

      s  = dot_fp32(grad_logits_c[:, v], h_c[:, j]) + (float(hi) + float(lo))
      hi = bf16(s);  lo = bf16(s - float(hi))

  ``float(hi) + float(lo)`` is exact in fp32 and ``s - float(hi)`` is exact too, so each chunk adds
  one fp32 rounding of the sum plus a bf16 rounding of a residual already ``2^-9`` times smaller:
  about 17 bits of every running sum ``S_k`` are kept between chunks (error <= ~``2^-18 |S_k|`` a
  chunk), and the result (``hi``) is the fp32 sum rounded once to bf16, up to that. Only elements
  whose chunks cancel (``|S_final| << max_k |S_k|``) differ from an fp32 buffer's result, by about
  ``n_chunks 2^-18 max_k |S_k|``: still ``2^9`` below what rounding the running sum to bf16 gives.
  Extra memory ``2 V H`` bytes (``lo``) instead of ``4 V H`` for an fp32 buffer, and no final
  conversion pass. The first chunk reads neither tensor and the last one writes no ``lo`` (which is
  released then).

  * Triton path (CUDA; CPU through the interpreter): one GEMM kernel computes a tile of
    ``grad_logits^T @ h`` with fp32 accumulators over ``K = C`` and applies the update above in its
    epilogue, reading and writing ``hi``/``lo`` once per chunk with no fp32 temporary: 8 bytes of
    traffic per element and chunk, as much as cuBLAS' ``beta=1`` fp32 ``addmm``. ``grad_logits (C, V)``
    is read as ``A^T`` tiles with V contiguous; tiles go in groups of ``GROUP_V`` vocabulary blocks
    (operands shared in L2); a tile's ``H_SUB`` column blocks share the A tile and are updated one
    after the other (fewer live registers in the epilogue).
  * Torch path: the same update per vocabulary slice, with an fp32 temporary of at most
    ``TORCH_TEMP_BYTES`` (64 MiB).
- ``"fp32_buffer"`` (fp16, several chunks): an fp32 ``(V, H)`` buffer, converted at the end (4 V H
  extra bytes): fp16's 5-bit exponent would flush a residual ``lo`` to zero (it sits ``2^-11`` below
  values that are themselves small gradients), so the compensated pair would not be accurate.

Call :meth:`GradWeightSum.add_` once per chunk (at most ``n_chunks`` times), then ``result()`` once.
"""

from __future__ import annotations

import torch

from ..._checks import check_int
from .._dispatch import check_triton_runs, kernels_interpreted, triton_available
from ._linear_chunks import addmm_fp32_

# Bound of the torch path's fp32 temporary (one vocabulary slice of the sum, plus upcast operands on CPU).
TORCH_TEMP_BYTES = 64 * 2**20
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Under the interpreter: one fixed tile, wide (its cost is per program and per op, not per element).
_INTERPRETER_META = {"BLOCK_V": 256, "BLOCK_H": 32, "BLOCK_K": 64, "GROUP_V": 3, "H_SUB": 2}

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _round_bf16_as_fp32(x):
        """fp32 ``x`` rounded to the nearest bf16 (ties to even), as fp32 (the interpreter's cast truncates)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _update_tile(acc, hi_ptr, lo_ptr, rv, rh, V, HS, FIRST: tl.constexpr, LAST: tl.constexpr,
                     INTERPRETED: tl.constexpr):
        """The compensated update of one fp32 tile ``acc`` ``[BLOCK_V, BLOCK_H]`` at rows ``rv``, columns ``rh``."""
        out = rv.to(tl.int64)[:, None] * HS + rh[None, :]
        mask = (rv[:, None] < V) & (rh[None, :] < HS)
        total = acc
        if not FIRST:
            hi_old = tl.load(hi_ptr + out, mask=mask, other=0.0).to(tl.float32)
            lo_old = tl.load(lo_ptr + out, mask=mask, other=0.0).to(tl.float32)
            total = acc + (hi_old + lo_old)  # hi + lo is exact in fp32: one rounding per chunk
        if INTERPRETED:
            hi_f = _round_bf16_as_fp32(total)
        else:
            hi_f = total.to(hi_ptr.dtype.element_ty).to(tl.float32)  # round to nearest even
        tl.store(hi_ptr + out, hi_f.to(hi_ptr.dtype.element_ty), mask=mask)
        if not LAST:
            residual = total - hi_f  # exact
            if INTERPRETED:
                residual = _round_bf16_as_fp32(residual)
            tl.store(lo_ptr + out, residual.to(lo_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _compensated_gemm_kernel(
        g_ptr, h_ptr, hi_ptr, lo_ptr, V, HS, C, stride_gc, stride_gv, stride_hc, stride_hh,
        FIRST: tl.constexpr, LAST: tl.constexpr, INTERPRETED: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_V: tl.constexpr,
        H_SUB: tl.constexpr,
    ):
        # A program owns a [BLOCK_V, H_SUB * BLOCK_H] tile, as H_SUB accumulators of BLOCK_H columns that
        # share the A tile in the main loop and are updated one after the other (fewer live registers).
        pid = tl.program_id(0)
        n_v = tl.cdiv(V, BLOCK_V)
        n_h = tl.cdiv(HS, BLOCK_H * H_SUB)
        per_group = GROUP_V * n_h
        first_v = (pid // per_group) * GROUP_V
        group_rows = tl.minimum(n_v - first_v, GROUP_V)
        pid_v = first_v + (pid % per_group) % group_rows
        pid_h = (pid % per_group) // group_rows
        rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        rh0 = pid_h * (BLOCK_H * H_SUB) + tl.arange(0, BLOCK_H)
        rh1 = rh0 + BLOCK_H
        rk = tl.arange(0, BLOCK_K)
        # Rows/columns past the edge wrap onto valid ones (never stored), so only K is masked in the loop.
        a_ptrs = g_ptr + rk[None, :] * stride_gc + (rv % V)[:, None] * stride_gv  # A^T tile [BLOCK_V, BLOCK_K]
        b0_ptrs = h_ptr + rk[:, None] * stride_hc + (rh0 % HS)[None, :] * stride_hh  # [BLOCK_K, BLOCK_H]
        b1_ptrs = h_ptr + rk[:, None] * stride_hc + (rh1 % HS)[None, :] * stride_hh
        acc0 = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
        for k in range(tl.cdiv(C, BLOCK_K)):
            k_ok = rk < C - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b0 = tl.load(b0_ptrs, mask=k_ok[:, None], other=0.0)
            if INTERPRETED:  # the interpreter has no bf16 dot
                a, b0 = a.to(tl.float32), b0.to(tl.float32)
            acc0 = tl.dot(a, b0, acc0)
            if H_SUB == 2:
                b1 = tl.load(b1_ptrs, mask=k_ok[:, None], other=0.0)
                acc1 = tl.dot(a, b1.to(tl.float32) if INTERPRETED else b1, acc1)
            a_ptrs += BLOCK_K * stride_gc
            b0_ptrs += BLOCK_K * stride_hc
            b1_ptrs += BLOCK_K * stride_hc
        _update_tile(acc0, hi_ptr, lo_ptr, rv, rh0, V, HS, FIRST, LAST, INTERPRETED)
        if H_SUB == 2:
            _update_tile(acc1, hi_ptr, lo_ptr, rv, rh1, V, HS, FIRST, LAST, INTERPRETED)

    # Hopper tiles (64K registers, 228 KiB shared memory an SM). For sm_90: 128 x (2 x 128), 8 warps: 255
    # registers, no spill (a single 128 x 256 accumulator spills ~500 B); 128 x (2 x 64), 4 warps: two programs
    # an SM, one's epilogue overlapping the other's main loop. Autotuning reruns the kernel: the first call for
    # a (V, H) always has FIRST=True (writes hi/lo from the product alone), so reruns leave the right values.
    def _config(block_v: int, block_h: int, h_sub: int, warps: int, stages: int) -> triton.Config:
        meta = {"BLOCK_V": block_v, "BLOCK_H": block_h, "BLOCK_K": 64, "GROUP_V": 8, "H_SUB": h_sub}
        return triton.Config(meta, num_warps=warps, num_stages=stages)

    _TUNED_CONFIGS = [
        _config(128, 128, 2, 8, 3), _config(128, 128, 2, 8, 4), _config(128, 64, 2, 4, 3),
        _config(256, 64, 2, 8, 3), _config(128, 128, 1, 8, 3),
    ]
    _compensated_gemm_tuned = triton.autotune(configs=_TUNED_CONFIGS, key=["V", "HS"])(_compensated_gemm_kernel)


def compensated_addmm_(
    hi: torch.Tensor, lo: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor, *,
    first: bool, last: bool, triton_path: bool,
) -> None:
    """One chunk of the compensated sum: ``(hi, lo) <- hi + lo + grad_logits^T @ h`` (see the module docstring).

    ``hi``/``lo`` ``(V, H)`` contiguous bf16; ``grad_logits (C, V)`` and ``h (C, H)`` bf16 (checked by the
    caller). ``first``: ``hi``/``lo`` are not read (their content is ignored); ``last``: ``lo`` is not
    written. On CUDA the first call for a given ``(V, H)`` must have ``first=True``: it autotunes the
    kernel, which reruns it.
    """
    if triton_path:
        _triton_update_(hi, lo, grad_logits, h, first=first, last=last)
    else:
        _torch_update_(hi, lo, grad_logits, h, first=first, last=last)


def _triton_update_(hi, lo, g, h, *, first: bool, last: bool) -> None:
    vocab, hidden = hi.shape
    args = (g, h, hi, lo, vocab, hidden, g.shape[0], g.stride(0), g.stride(1), h.stride(0), h.stride(1))

    def grid(meta):
        return (triton.cdiv(vocab, meta["BLOCK_V"]) * triton.cdiv(hidden, meta["BLOCK_H"] * meta["H_SUB"]),)

    if kernels_interpreted() and not g.is_cuda:
        meta = _INTERPRETER_META
        _compensated_gemm_kernel[grid(meta)](*args, FIRST=first, LAST=last, INTERPRETED=True, **meta)
    else:
        _compensated_gemm_tuned[grid](*args, FIRST=first, LAST=last, INTERPRETED=False)


def _torch_update_(hi, lo, g, h, *, first: bool, last: bool) -> None:
    vocab, hidden = hi.shape
    # On CPU the bf16 operands are upcast per slice (no fp32-output bf16 GEMM there); cuBLAS takes them as they are.
    upcast = not g.is_cuda
    h_op = h.float() if upcast else h
    per_row = 4 * (hidden + (g.shape[0] if upcast else 0))
    rows = max(1, min(vocab, TORCH_TEMP_BYTES // per_row))
    temp = torch.empty((rows, hidden), device=hi.device, dtype=torch.float32)
    for v0 in range(0, vocab, rows):
        v1 = min(v0 + rows, vocab)
        acc, hi_s = temp[: v1 - v0], hi[v0:v1]
        if first:
            acc.zero_()
        else:
            acc.copy_(hi_s)
            acc.add_(lo[v0:v1])  # exact in fp32
        addmm_fp32_(acc, g[:, v0:v1].t(), h_op)
        hi_s.copy_(acc)  # round to nearest even
        if not last:
            acc.sub_(hi_s)
            lo[v0:v1].copy_(acc)


def _mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[...] = a @ b``, accumulated in fp32 (or ``out``'s wider dtype) and rounded once."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` (fp32/fp64 ``acc``) without rounding ``a @ b`` to ``a``'s dtype first."""
    if acc.dtype == torch.float32:
        addmm_fp32_(acc, a, b)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _strategy(dtype: torch.dtype, n_chunks: int) -> str:
    if n_chunks <= 1:
        return "single"
    if dtype in (torch.float32, torch.float64):
        return "in_place"
    return "compensated" if dtype == torch.bfloat16 else "fp32_buffer"


class GradWeightSum:
    """``sum_c grad_logits_c^T @ h_c`` ``(V, H)`` in ``dtype``, fp32-equivalent accuracy, no fp32 ``(V, H)`` buffer.

    Args:
        vocab: ``V``, rows of the result (the lm_head's vocabulary).
        hidden_size: ``H``, columns of the result.
        dtype: the result's (the weight's) dtype: fp16, bf16, fp32 or fp64.
        device: where the result lives; chunks must be there too.
        n_chunks: the number of :meth:`add_` calls to come (at most; ``0`` gives a zero result).
        triton_path: use the fused Triton kernel for the bf16 compensated sum (CUDA, or CPU through the
            interpreter); otherwise plain torch. Other strategies always use cuBLAS/torch.
        chunk_dtype: the dtype of every chunk's ``grad_logits`` and ``h`` (default ``dtype``); may differ
            only for an fp32/fp64 result (autocast over fp32 weights: bf16 chunks, fp32 accumulation).

    Strategy (``self.strategy``, see the module docstring): ``"single"`` (``n_chunks <= 1``),
    ``"in_place"`` (fp32/fp64), ``"compensated"`` (bf16: ``hi``/``lo`` pair, ``2 V H`` extra bytes),
    ``"fp32_buffer"`` (fp16: ``4 V H`` extra bytes). The result is the exact sum rounded to ``dtype``,
    up to fp32 accumulation error.
    """

    def __init__(
        self, vocab: int, hidden_size: int, *, dtype: torch.dtype, device, n_chunks: int, triton_path: bool,
        chunk_dtype: torch.dtype | None = None,
    ) -> None:
        self.vocab = check_int("vocab", vocab, low=1)
        self.hidden_size = check_int("hidden_size", hidden_size, low=1)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        chunk_dtype = dtype if chunk_dtype is None else chunk_dtype
        if chunk_dtype not in _DTYPES:
            raise ValueError(f"chunk_dtype must be one of {list(_DTYPES)} or None, got {chunk_dtype!r}")
        if chunk_dtype != dtype and dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"chunk_dtype must equal dtype={dtype} unless the result is fp32/fp64, got chunk_dtype={chunk_dtype}"
            )
        self.chunk_dtype = chunk_dtype
        self.n_chunks = check_int("n_chunks", n_chunks, low=0)
        if not isinstance(triton_path, bool):
            raise TypeError(f"triton_path must be a bool, got {type(triton_path).__name__}")
        self.dtype = dtype
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:<current>"
        self.strategy = _strategy(dtype, self.n_chunks)
        self.triton_path = triton_path and self.strategy == "compensated"
        if self.triton_path:
            check_triton_runs(torch.empty(0, device=self.device))
        self._added = 0
        self._done = False
        self._out: torch.Tensor | None = None  # result, fp32 buffer (fp16) or hi (bf16)
        self._lo: torch.Tensor | None = None

    @staticmethod
    def extra_bytes(
        vocab: int, hidden_size: int, dtype: torch.dtype, n_chunks: int, *, triton_path: bool = True
    ) -> int:
        """Peak device memory beyond the ``(V, H)`` result, in bytes (for a dispatcher's memory budget).

        0 for ``"single"``/``"in_place"``; ``2 V H`` for ``"compensated"`` (``lo``; the torch path adds
        a temporary of at most ``TORCH_TEMP_BYTES``); ``4 V H`` for ``"fp32_buffer"``.
        """
        elements = check_int("vocab", vocab, low=1) * check_int("hidden_size", hidden_size, low=1)
        strategy = _strategy(dtype, check_int("n_chunks", n_chunks, low=0))
        if strategy == "compensated":
            return 2 * elements + (0 if triton_path else TORCH_TEMP_BYTES)
        return 4 * elements if strategy == "fp32_buffer" else 0

    def _check_chunk(self, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
        for name, t in (("grad_logits", grad_logits), ("h", h)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != self.chunk_dtype:
                raise ValueError(f"{name} must have dtype {self.chunk_dtype} (chunk_dtype), got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} must be on {self.device} (the result's device), got {t.device}")
        if grad_logits.dim() != 2 or grad_logits.shape[1] != self.vocab:
            raise ValueError(f"grad_logits must have shape (C, V) with V={self.vocab}, got {tuple(grad_logits.shape)}")
        expected = (grad_logits.shape[0], self.hidden_size)
        if tuple(h.shape) != expected:
            raise ValueError(f"h must have shape (C, H) = {expected} (C from grad_logits), got {tuple(h.shape)}")

    def add_(self, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
        """Add one chunk: ``grad_logits (C, V)`` and ``h (C, H)``, both in ``chunk_dtype`` on ``device``."""
        if self._done:
            raise RuntimeError("GradWeightSum.add_ called after result(); make a new GradWeightSum per sum")
        if self._added >= self.n_chunks:
            raise RuntimeError(f"GradWeightSum.add_ called more than n_chunks={self.n_chunks} times")
        self._check_chunk(grad_logits, h)
        first = self._added == 0
        self._added += 1
        last = self._added == self.n_chunks
        shape = (self.vocab, self.hidden_size)
        a = grad_logits.t()
        if self.strategy != "compensated":  # "single", "in_place", "fp32_buffer"
            if first:
                acc_dtype = torch.float32 if self.strategy == "fp32_buffer" else self.dtype
                self._out = torch.empty(shape, device=self.device, dtype=acc_dtype)
                _mm_(self._out, a, h)
            else:
                _addmm_(self._out, a, h)
        else:
            if first:
                self._out = torch.empty(shape, device=self.device, dtype=self.dtype)
                self._lo = torch.empty(shape, device=self.device, dtype=self.dtype)
            compensated_addmm_(
                self._out, self._lo, grad_logits, h, first=first, last=last, triton_path=self.triton_path
            )
            if last:
                self._lo = None

    def result(self) -> torch.Tensor:
        """The sum ``(V, H)`` in ``dtype`` (zeros when no chunk was added); releases the helper buffers. Once only."""
        if self._done:
            raise RuntimeError("GradWeightSum.result() called twice; it releases its buffers on the first call")
        self._done = True
        out, self._out, self._lo = self._out, None, None
        if out is None:
            return torch.zeros((self.vocab, self.hidden_size), device=self.device, dtype=self.dtype)
        return out if out.dtype == self.dtype else out.to(self.dtype)
