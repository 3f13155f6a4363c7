"""GradWeightSum: sum_c grad_logits_c^T @ h_c at fp32-equivalent accuracy without a (V, H) fp32 buffer.

The reference is the float64 sum of the chunks' products (of the bf16 inputs as given). Two peers set the
bar for the bf16 compensated sum: "fp32 accumulation rounded once to bf16" (what an fp32 buffer gives;
GradWeightSum must be as good, within 1.5x) and "the running sum rounded to bf16 after every chunk" (the
biased bf16 addmm; GradWeightSum must be clearly better, <= 0.5x of its error).
"""

from __future__ import annotations

import pytest
import torch

from liger_align.kernels import _dispatch
from liger_align.kernels.head import grad_weight_sum as gws_module
from liger_align.kernels.head.grad_weight_sum import GradWeightSum


def make_chunks(vocab, hidden, rows, n_chunks, dtype, *, device="cpu", seed=1234):
    """Chunks of a realistic cross-entropy gradient: (softmax - onehot) / N, with mixed-sign hidden states."""
    gen = torch.Generator(device=device).manual_seed(seed)
    total = rows * n_chunks
    grads, hiddens = [], []
    for _ in range(n_chunks):
        logits = 2.0 * torch.randn(rows, vocab, generator=gen, device=device)
        target = torch.randint(0, vocab, (rows,), generator=gen, device=device)
        g = torch.softmax(logits, dim=-1)
        g[torch.arange(rows, device=device), target] -= 1.0
        grads.append((g / total).to(dtype))
        hiddens.append(torch.randn(rows, hidden, generator=gen, device=device).to(dtype))
    return grads, hiddens


def reference(grads, hiddens):
    return sum(g.double().t() @ h.double() for g, h in zip(grads, hiddens))


def fp32_rounded_once(grads, hiddens, dtype):
    return sum(g.float().t() @ h.float() for g, h in zip(grads, hiddens)).to(dtype)


def rounded_every_chunk(grads, hiddens, dtype):
    acc = None
    for g, h in zip(grads, hiddens):
        prod = g.double().t() @ h.double()
        acc = prod.to(dtype) if acc is None else (acc.double() + prod).to(dtype)
    return acc


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def run_sum(grads, hiddens, *, dtype, triton_path, n_chunks=None, device="cpu", chunk_dtype=None):
    vocab, hidden = grads[0].shape[1], hiddens[0].shape[1]
    n_chunks = len(grads) if n_chunks is None else n_chunks
    acc = GradWeightSum(vocab, hidden, dtype=dtype, device=device, n_chunks=n_chunks, triton_path=triton_path,
                        chunk_dtype=chunk_dtype)
    for g, h in zip(grads, hiddens):
        acc.add_(g, h)
    return acc, acc.result()


def assert_beats_bf16_rounding(grads, hiddens, *, triton_path, device="cpu"):
    ref = reference(grads, hiddens)
    acc, out = run_sum(grads, hiddens, dtype=torch.bfloat16, triton_path=triton_path, device=device)
    assert acc.strategy == "compensated"
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = rel_err(out, ref)
    err_once = rel_err(fp32_rounded_once(grads, hiddens, torch.bfloat16), ref)
    err_chunk = rel_err(rounded_every_chunk(grads, hiddens, torch.bfloat16), ref)
    assert err <= 1.5 * err_once, (err, err_once)
    assert err <= 0.5 * err_chunk, (err, err_chunk)
    return out


def assert_within_one_ulp_of_once(out, grads, hiddens):
    """Each element equals the fp32 sum rounded once to bf16, up to one bf16 ulp and the pair's own error.

    The compensated pair keeps ~17 bits of every running sum ``S_k`` (``lo`` is a bf16 residual), so an
    element whose chunks cancel (``|S_final| << max_k |S_k|``) may differ by ``~n * 2^-17 * max_k |S_k|``;
    fp32 products summed in another order differ by ``~2^-24 sqrt(C) sum |g| |h|``.
    """
    once = fp32_rounded_once(grads, hiddens, out.dtype).double()
    running = torch.zeros_like(once)
    largest = torch.zeros_like(once)
    abs_sum = torch.zeros_like(once)
    for g, h in zip(grads, hiddens):
        running += g.double().t() @ h.double()
        abs_sum += g.double().abs().t() @ h.double().abs()
        torch.maximum(largest, running.abs(), out=largest)
    diff = (out.double() - once).abs()
    bound = 2.0**-7 * once.abs() + len(grads) * 2.0**-16 * largest + 2.0**-18 * abs_sum + 1e-30
    assert bool((diff <= bound).all()), (diff - bound).max().item()
    assert (diff == 0).double().mean().item() >= 0.95


@pytest.fixture
def full_fp32_matmul(monkeypatch):
    """The fp32 peers as true fp32 products on CUDA (no TF32)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def test_bf16_compensated_torch_path():
    grads, hiddens = make_chunks(1003, 67, 37, 16, torch.bfloat16)
    out = assert_beats_bf16_rounding(grads, hiddens, triton_path=False)
    assert_within_one_ulp_of_once(out, grads, hiddens)


@pytest.mark.interpreter
def test_bf16_compensated_triton_interpreter():
    grads, hiddens = make_chunks(1003, 67, 37, 16, torch.bfloat16, seed=4321)
    out = assert_beats_bf16_rounding(grads, hiddens, triton_path=True)
    assert_within_one_ulp_of_once(out, grads, hiddens)
    _, torch_out = run_sum(grads, hiddens, dtype=torch.bfloat16, triton_path=False)
    assert (out.double() - torch_out.double()).abs().max().item() <= 2.0**-7 * torch_out.abs().max().item()


@pytest.mark.gpu
@pytest.mark.usefixtures("full_fp32_matmul")
def test_bf16_compensated_gpu():
    grads, hiddens = make_chunks(32000, 1024, 512, 16, torch.bfloat16, device="cuda")
    out = assert_beats_bf16_rounding(grads, hiddens, triton_path=True, device="cuda")
    torch_out = assert_beats_bf16_rounding(grads, hiddens, triton_path=False, device="cuda")
    assert_within_one_ulp_of_once(out, grads, hiddens)
    assert (out.double() - torch_out.double()).abs().max().item() <= 2.0**-7 * torch_out.abs().max().item()


@pytest.mark.gpu
@pytest.mark.usefixtures("full_fp32_matmul")
def test_bf16_compensated_gpu_odd_sizes_and_strides():
    # Odd V, H, C (masked tile edges) and a grad_logits view with a padded row stride.
    grads, hiddens = make_chunks(5003, 333, 211, 5, torch.bfloat16, device="cuda", seed=7)
    padded = [torch.zeros(g.shape[0], g.shape[1] + 5, device="cuda", dtype=g.dtype) for g in grads]
    views = [p[:, : g.shape[1]].copy_(g) for p, g in zip(padded, grads)]
    _, out = run_sum(views, hiddens, dtype=torch.bfloat16, triton_path=True, device="cuda")
    assert_within_one_ulp_of_once(out, grads, hiddens)


@pytest.mark.gpu
@pytest.mark.usefixtures("full_fp32_matmul")
@pytest.mark.parametrize("n_chunks", [1, 6])
@pytest.mark.parametrize(
    ("dtype", "chunk_dtype"),
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float32), (torch.float16, torch.float16),
     (torch.bfloat16, torch.bfloat16)],
)
def test_other_strategies_gpu(dtype, chunk_dtype, n_chunks):
    grads, hiddens = make_chunks(3001, 515, 129, n_chunks, chunk_dtype, device="cuda", seed=14)
    ref = reference(grads, hiddens)
    _, out = run_sum(grads, hiddens, dtype=dtype, triton_path=True, device="cuda", chunk_dtype=chunk_dtype)
    assert out.dtype == dtype and out.device.type == "cuda"
    once = rel_err(sum(g.float().t() @ h.float() for g, h in zip(grads, hiddens)).to(dtype), ref)
    assert rel_err(out, ref) <= 1.5 * once + 1e-6


@pytest.mark.parametrize("triton_path", [False, pytest.param(True, marks=pytest.mark.interpreter)])
@pytest.mark.parametrize(("vocab", "hidden", "rows", "n_chunks"), [(7, 3, 5, 3), (301, 1, 1, 2), (1, 65, 100, 4)])
def test_bf16_odd_sizes(triton_path, vocab, hidden, rows, n_chunks):
    grads, hiddens = make_chunks(vocab, hidden, rows, n_chunks, torch.bfloat16, seed=vocab + hidden)
    _, out = run_sum(grads, hiddens, dtype=torch.bfloat16, triton_path=triton_path)
    assert out.shape == (vocab, hidden)
    assert_within_one_ulp_of_once(out, grads, hiddens)


@pytest.mark.interpreter
def test_triton_single_column_block(monkeypatch):
    # The kernel's H_SUB=1 form (one accumulator a program; some GPU configs use it).
    meta = {"BLOCK_V": 128, "BLOCK_H": 32, "BLOCK_K": 16, "GROUP_V": 2, "H_SUB": 1}
    monkeypatch.setattr(gws_module, "_INTERPRETER_META", meta)
    grads, hiddens = make_chunks(301, 67, 37, 3, torch.bfloat16, seed=15)
    _, out = run_sum(grads, hiddens, dtype=torch.bfloat16, triton_path=True)
    assert_within_one_ulp_of_once(out, grads, hiddens)


def test_torch_path_slices_match(monkeypatch):
    grads, hiddens = make_chunks(1003, 67, 37, 4, torch.bfloat16, seed=11)
    _, whole = run_sum(grads, hiddens, dtype=torch.bfloat16, triton_path=False)
    monkeypatch.setattr(gws_module, "TORCH_TEMP_BYTES", 4 * (67 + 37) * 10)  # 10 vocabulary rows per slice
    _, sliced = run_sum(grads, hiddens, dtype=torch.bfloat16, triton_path=False)
    assert_within_one_ulp_of_once(sliced, grads, hiddens)
    assert (sliced.double() - whole.double()).abs().max().item() <= 2.0**-7 * whole.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("triton_path", [False, True])
def test_fp32_fp64_accumulate_in_place(dtype, triton_path):
    grads, hiddens = make_chunks(1003, 67, 37, 16, dtype, seed=5)
    ref = reference(grads, hiddens)
    acc, out = run_sum(grads, hiddens, dtype=dtype, triton_path=triton_path)
    assert acc.strategy == "in_place" and not acc.triton_path and out.dtype == dtype
    assert rel_err(out, ref) <= (1e-6 if dtype == torch.float32 else 1e-13)
    assert GradWeightSum.extra_bytes(1003, 67, dtype, 16) == 0


@pytest.mark.parametrize("n_chunks", [1, 16])
@pytest.mark.parametrize("chunk_dtype", [torch.bfloat16, torch.float16])
def test_fp32_result_from_low_precision_chunks(n_chunks, chunk_dtype):
    # Autocast over fp32 weights: bf16/fp16 chunks, fp32 result accumulated in place.
    grads, hiddens = make_chunks(1003, 67, 37, n_chunks, chunk_dtype, seed=13)
    ref = reference(grads, hiddens)
    acc, out = run_sum(grads, hiddens, dtype=torch.float32, triton_path=False, chunk_dtype=chunk_dtype)
    assert acc.strategy == ("single" if n_chunks == 1 else "in_place") and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-6


def test_fp16_uses_fp32_buffer():
    grads, hiddens = make_chunks(1003, 67, 37, 16, torch.float16, seed=6)
    ref = reference(grads, hiddens)
    acc, out = run_sum(grads, hiddens, dtype=torch.float16, triton_path=False)
    assert acc.strategy == "fp32_buffer" and out.dtype == torch.float16
    err_once = rel_err(fp32_rounded_once(grads, hiddens, torch.float16), ref)
    assert rel_err(out, ref) <= 1.5 * err_once
    assert rel_err(out, ref) <= 0.5 * rel_err(rounded_every_chunk(grads, hiddens, torch.float16), ref)
    assert GradWeightSum.extra_bytes(1003, 67, torch.float16, 16) == 4 * 1003 * 67


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("triton_path", [False, True])
def test_single_chunk_is_one_product(dtype, triton_path):
    grads, hiddens = make_chunks(1003, 67, 53, 1, dtype, seed=8)
    ref = reference(grads, hiddens)
    acc, out = run_sum(grads, hiddens, dtype=dtype, triton_path=triton_path)
    assert acc.strategy == "single" and out.dtype == dtype
    assert rel_err(out, ref) <= 1.5 * rel_err(fp32_rounded_once(grads, hiddens, dtype), ref) + 1e-7
    assert GradWeightSum.extra_bytes(1003, 67, dtype, 1) == 0


def test_no_chunk_gives_zeros():
    acc = GradWeightSum(11, 5, dtype=torch.bfloat16, device="cpu", n_chunks=0, triton_path=False)
    out = acc.result()
    assert out.shape == (11, 5) and out.dtype == torch.bfloat16 and not out.any()


def test_fewer_chunks_than_announced():
    grads, hiddens = make_chunks(101, 9, 13, 3, torch.bfloat16, seed=9)
    acc = GradWeightSum(101, 9, dtype=torch.bfloat16, device="cpu", n_chunks=5, triton_path=False)
    for g, h in zip(grads, hiddens):
        acc.add_(g, h)
    assert_within_one_ulp_of_once(acc.result(), grads, hiddens)


def test_extra_bytes():
    vocab, hidden = 128256, 4096
    assert GradWeightSum.extra_bytes(vocab, hidden, torch.bfloat16, 4) == 2 * vocab * hidden
    torch_path = GradWeightSum.extra_bytes(vocab, hidden, torch.bfloat16, 4, triton_path=False)
    assert torch_path == 2 * vocab * hidden + gws_module.TORCH_TEMP_BYTES
    assert GradWeightSum.extra_bytes(vocab, hidden, torch.bfloat16, 1) == 0
    assert GradWeightSum.extra_bytes(vocab, hidden, torch.float16, 2) == 4 * vocab * hidden
    with pytest.raises(ValueError, match="n_chunks"):
        GradWeightSum.extra_bytes(vocab, hidden, torch.bfloat16, -1)


def test_lo_released_after_last_chunk():
    grads, hiddens = make_chunks(31, 7, 5, 2, torch.bfloat16, seed=10)
    acc = GradWeightSum(31, 7, dtype=torch.bfloat16, device="cpu", n_chunks=2, triton_path=False)
    acc.add_(grads[0], hiddens[0])
    assert acc._lo is not None
    acc.add_(grads[1], hiddens[1])
    assert acc._lo is None


def _fresh(**kw):
    args = {"dtype": torch.bfloat16, "device": "cpu", "n_chunks": 3, "triton_path": False} | kw
    return GradWeightSum(31, 7, **args)


@pytest.mark.parametrize(
    ("grad_logits", "h", "name"),
    [
        (torch.zeros(5, 30, dtype=torch.bfloat16), torch.zeros(5, 7, dtype=torch.bfloat16), "grad_logits"),
        (torch.zeros(31, dtype=torch.bfloat16), torch.zeros(5, 7, dtype=torch.bfloat16), "grad_logits"),
        (torch.zeros(5, 31, dtype=torch.bfloat16), torch.zeros(5, 8, dtype=torch.bfloat16), "h"),
        (torch.zeros(5, 31, dtype=torch.bfloat16), torch.zeros(4, 7, dtype=torch.bfloat16), "h"),
        (torch.zeros(5, 31, dtype=torch.float32), torch.zeros(5, 7, dtype=torch.bfloat16), "grad_logits"),
        (torch.zeros(5, 31, dtype=torch.bfloat16), torch.zeros(5, 7, dtype=torch.float16), "h"),
    ],
)
def test_bad_chunk_raises_naming_argument(grad_logits, h, name):
    acc = _fresh()
    with pytest.raises(ValueError, match=rf"^{name} must"):
        acc.add_(grad_logits, h)
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        acc.add_(torch.zeros(5, 31, dtype=torch.bfloat16), [[0.0] * 7] * 5)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"vocab": 0}, ValueError, "vocab"),
        ({"hidden_size": -3}, ValueError, "hidden_size"),
        ({"n_chunks": -1}, ValueError, "n_chunks"),
        ({"dtype": torch.int32}, ValueError, "dtype"),
        ({"triton_path": 1}, TypeError, "triton_path"),
        ({"chunk_dtype": torch.float32}, ValueError, "chunk_dtype"),
        ({"dtype": torch.float32, "chunk_dtype": torch.int8}, ValueError, "chunk_dtype"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, name):
    args = {"vocab": 31, "hidden_size": 7, "dtype": torch.bfloat16, "device": "cpu", "n_chunks": 3,
            "triton_path": False} | kwargs
    with pytest.raises(error, match=name):
        GradWeightSum(args.pop("vocab"), args.pop("hidden_size"), **args)


def test_triton_path_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "kernels_interpreted", lambda: False)
    with pytest.raises(ValueError, match="(?i)triton"):
        _fresh(triton_path=True)
    assert _fresh(triton_path=True, dtype=torch.float32).triton_path is False  # no kernel for fp32


def test_lifecycle_errors():
    grads, hiddens = make_chunks(31, 7, 5, 3, torch.bfloat16, seed=12)
    acc = _fresh(n_chunks=2)
    acc.add_(grads[0], hiddens[0])
    acc.add_(grads[1], hiddens[1])
    with pytest.raises(RuntimeError, match="more than n_chunks=2"):
        acc.add_(grads[2], hiddens[2])
    acc.result()
    with pytest.raises(RuntimeError, match="twice"):
        acc.result()
    with pytest.raises(RuntimeError, match="after result"):
        acc.add_(grads[0], hiddens[0])
