"""What the fused linear ops share: input checks, dropping masked tokens, chunking, the products.

A fused linear op sees hidden ``(N, H)``, weight ``(V, H)``, optional bias ``(V,)`` and target ``(N,)``.
Tokens whose target is ``ignore_index`` are dropped first, so no product ever touches them. The
``M`` valid tokens are then processed either in vocabulary slices (``(M, Vc)`` logits at a time:
each slice's grad-weight is complete in one product) or in token chunks (``(C, V)`` logits at a
time: grad-weight is summed over chunks). Sums over chunks are accumulated in fp32 (rounding each
chunk's product to bf16 before summing biases training); a gradient that is not required is not
computed.
"""

from __future__ import annotations

import math

import torch

from ..._checks import TargetOutOfRangeError, raise_bad_num_items

# Default budget of one logits buffer. On an H200 (bf16, V=128256), 512 MiB was measurably faster
# than 256 MiB for both vocabulary slices (fewer, wider products) and token chunks (fewer fp32
# grad-weight accumulations); see README.
DEFAULT_CHUNK_BYTES = 512 * 2**20
# Vocabulary slices are cut at multiples of this many columns, so that every slice's logits keep a
# 16-byte-aligned leading dimension (cuBLAS falls back to slow kernels otherwise).
SLICE_ALIGN = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    names: tuple[str, str, str, str] = ("hidden", "weight", "target", "bias"),
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument when the shapes or dtypes do not fit.

    Expected: hidden ``(N, H)`` float, weight ``(V, H)`` float, target ``(N,)`` integer, bias ``(V,)`` or None.
    ``names`` are the caller's names of the four arguments (e.g. ``ref_hidden``, ``ref_weight``), used
    in the messages.
    """
    h_name, w_name, t_name, b_name = names
    for name, t in ((h_name, hidden), (w_name, weight), (t_name, target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{h_name} must be a floating-point tensor, got dtype {hidden.dtype}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{w_name} must be a floating-point tensor, got dtype {weight.dtype}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"{t_name} must be an integer tensor (int64), got dtype {target.dtype}")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(
            f"{h_name} ({hidden.dtype}) and {w_name} ({weight.dtype}) must share a dtype outside autocast: cast one "
            f"(e.g. {w_name}.to({h_name}.dtype)) or run under torch.autocast"
        )
    if hidden.dim() != 2:
        raise ValueError(f"{h_name} must have shape (N, H), got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must have shape (V, H), got {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{h_name}'s last dimension H={hidden.shape[1]} must match {w_name} (V, H) with H={weight.shape[1]}"
        )
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"{t_name} must have shape (N,) = ({hidden.shape[0]},), got {tuple(target.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError(f"{h_name} is empty: expected at least one token (N >= 1)")
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} is empty: expected a vocabulary of at least one row (V >= 1)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{b_name} must be a floating-point tensor or None, got {getattr(bias, 'dtype', type(bias).__name__)}"
            )
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{b_name} must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    named = ((h_name, hidden), (w_name, weight), (t_name, target)) + (((b_name, bias),) if bias is not None else ())
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        found = ", ".join(f"{name} on {t.device}" for name, t in named)
        raise ValueError(f"{', '.join(n for n, _ in named)} must be on one device, got {found}")


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the products: autocast's when it is on, else the common dtype of hidden and weight (that they
    share one is checked, with the caller's argument names, by :func:`check_linear_inputs`)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def valid_token_index(
    target: torch.Tensor, ignore_index: int, vocab: int, *, num_items: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices ``(M,)`` of the tokens whose target is not ``ignore_index``, after checking the targets.

    One host synchronisation per call: it reads the count of valid and of out-of-range targets
    together, to size the products over valid tokens only and to reject bad targets. A
    ``num_items`` (a 0-d tensor: ``num_items_in_batch`` on an accelerator, see
    :func:`~liger_align._checks.check_num_items`) is read in the same synchronisation and
    must be finite and positive.
    """
    valid = target != ignore_index
    out_of_range = valid & ((target < 0) | (target >= vocab))
    counts = [valid.sum().double(), out_of_range.sum().double()]
    if num_items is not None:
        counts.append(num_items.reshape(()).to(device=target.device, dtype=torch.float64))
    read = torch.stack(counts).tolist()
    n_valid, n_bad = int(read[0]), int(read[1])
    if num_items is not None and not (math.isfinite(read[2]) and read[2] > 0):
        raise_bad_num_items(read[2])
    if n_bad:
        raise_bad_targets(target, out_of_range, n_bad, vocab=vocab, ignore_index=ignore_index)
    return torch.nonzero_static(valid, size=n_valid).squeeze(1)


def raise_bad_targets(
    target: torch.Tensor, out_of_range: torch.Tensor, n_bad: int, *, vocab: int, ignore_index: int
) -> None:
    """Raise the ``ValueError`` for ``n_bad`` targets outside ``[0, V)`` (marked by ``out_of_range``), with examples."""
    bad = target[out_of_range][:5].tolist()
    raise TargetOutOfRangeError("target", count=n_bad, examples=bad, vocab=vocab, ignore_index=ignore_index)


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, chunk_bytes: int | None) -> int:
    """Rows per chunk such that a ``(rows, V)`` logits buffer of ``dtype`` fits ``chunk_bytes`` (at least 1 row)."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    if budget <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    per_row = vocab * torch.empty((), dtype=dtype).element_size()
    return max(1, min(n_rows, budget // per_row))


def slice_cols(n_rows: int, vocab: int, dtype: torch.dtype, chunk_bytes: int | None) -> int:
    """Vocabulary columns per slice such that an ``(n_rows, cols)`` logits buffer fits ``chunk_bytes``."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    if budget <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    per_col = max(1, n_rows) * torch.empty((), dtype=dtype).element_size()
    cols = budget // per_col
    if cols >= vocab:
        return vocab
    return max(SLICE_ALIGN, cols - cols % SLICE_ALIGN)


def project(h_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out = h_chunk @ weight.T + bias``: logits ``(C, V)`` of one chunk, written into ``out``."""
    if bias is None:
        return torch.mm(h_chunk, weight.t(), out=out)
    return torch.addmm(bias, h_chunk, weight.t(), out=out)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` without rounding ``a @ b`` to the inputs' dtype first."""
    if acc.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 (bf16/fp16 operands are not upcast on CUDA)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def mm_into_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[...] = a @ b`` with fp32 accumulation, rounded once to ``out``'s dtype."""
    if out.dtype == a.dtype == b.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(mm_fp32(a, b))
