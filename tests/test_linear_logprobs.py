"""linear_logprobs: values and gradients against float64 logits, on every path; bad input."""

from __future__ import annotations

import pytest
import torch
from _helpers import PATHS, count_products, leaf_copies, skip_unless_path
from _reference import TOLERANCE, reference_logprobs, rel_err
from conftest import triton_runs_on

from liger_align.kernels import linear_logprobs


def _inputs(n, h, v, dtype, device, *, bias, masked_every=3, seed=None):
    gen = None if seed is None else torch.Generator().manual_seed(seed)  # None: the per-test seed
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(v, generator=gen) * 0.5).to(device, dtype).requires_grad_() if bias else None
    target = torch.randint(0, v, (n,), generator=gen).to(device)
    if masked_every:
        target[::masked_every] = -100
    return hidden, weight, b, target


def _check(hidden, weight, bias, target, *, tol, **options):
    out = linear_logprobs(hidden, weight, target, bias, **options)
    transform = {k: options[k] for k in ("softcap", "temperature", "logit_scale") if k in options}
    h64, w64, b64 = leaf_copies(hidden, weight, bias)
    ref = reference_logprobs(h64, w64, target, b64, **transform)
    assert out.logps.dtype == torch.float32 and out.logps.shape == target.shape
    assert rel_err(out.logps, ref) < tol
    masked = target == -100
    assert torch.all(out.logps[masked] == 0) and torch.all(out.logit_mean[masked] == 0)
    grad_out = torch.randn(target.shape, device=target.device)
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    refs = [t for t in (h64, w64, b64) if t is not None and t.requires_grad]
    got = torch.autograd.grad(out.logps, inputs, grad_out)
    want = torch.autograd.grad(ref, refs, grad_out.double())
    for g, r, t in zip(got, want, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert rel_err(g, r) < tol
    return out


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients(device, impl, dtype, bias, monkeypatch):
    skip_unless_path(device, impl)
    hidden, weight, b, target = _inputs(37, 48, 1003, dtype, device, bias=bias)
    # a small chunk budget forces several chunks
    _check(hidden, weight, b, target, tol=TOLERANCE[dtype], impl=impl, chunk_bytes=8 * 1003 * 4)
    products = count_products(monkeypatch)
    linear_logprobs(hidden, weight, target, b, impl=impl, chunk_bytes=8 * 1003 * 4)
    assert len(products) > 1  # the forward alone ran several chunks


@pytest.mark.parametrize("device,impl", PATHS)
def test_transform_options(device, impl):
    skip_unless_path(device, impl)
    hidden, weight, b, target = _inputs(29, 40, 517, torch.float32, device, bias=True)
    out = _check(
        hidden, weight, b, target, tol=TOLERANCE[torch.float32], impl=impl, softcap=2.5, temperature=0.7,
        logit_scale=1.9
    )
    from _reference import reference_logits

    h64, w64, b64 = leaf_copies(hidden, weight, b)
    want_mean = reference_logits(h64, w64, b64, softcap=2.5, temperature=0.7, logit_scale=1.9).mean(-1)
    valid = target != -100
    assert rel_err(out.logit_mean[valid], want_mean[valid]) < 1e-5


@pytest.mark.parametrize("device,impl", PATHS)
def test_all_masked_is_zero_with_zero_gradient(device, impl):
    skip_unless_path(device, impl)
    hidden, weight, b, target = _inputs(11, 24, 301, torch.float32, device, bias=True)
    target.fill_(-100)
    out = linear_logprobs(hidden, weight, target, b, impl=impl)
    assert torch.all(out.logps == 0)
    (out.logps.sum() * 3).backward()
    for t in (hidden, weight, b):
        assert torch.isfinite(t.grad).all() and torch.all(t.grad == 0)


@pytest.mark.parametrize("device,impl", PATHS)
def test_frozen_weight_gets_no_gradient(device, impl):
    skip_unless_path(device, impl)
    hidden, weight, _, target = _inputs(23, 32, 257, torch.float32, device, bias=False)
    weight.requires_grad_(False)
    out = linear_logprobs(hidden, weight, target, impl=impl)
    out.logps.sum().backward()
    assert weight.grad is None and hidden.grad is not None
    h64, w64 = leaf_copies(hidden, weight)
    reference_logprobs(h64, w64, target).sum().backward()
    assert rel_err(hidden.grad, h64.grad) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device,impl", PATHS)
def test_non_contiguous_inputs(device, impl):
    skip_unless_path(device, impl)
    base_hidden = torch.randn(48, 37, device=device)
    hidden = base_hidden.t().requires_grad_()  # (37, 48), column-major
    base_weight = torch.randn(1003, 96, device=device) / 7
    weight = base_weight[:, ::2].requires_grad_()  # (1003, 48), strided
    target = torch.randint(0, 1003, (74,), device=device)[::2]
    target[5] = -100
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not target.is_contiguous()
    _check(hidden, weight, None, target, tol=TOLERANCE[torch.float32], impl=impl)


@pytest.mark.parametrize("device,impl", PATHS)
def test_fp16_inputs(device, impl):
    skip_unless_path(device, impl)
    if device == "cpu" and impl == "torch":
        pass  # CPU matmul in fp16 is supported by recent torch
    hidden, weight, b, target = _inputs(19, 32, 211, torch.float16, device, bias=True)
    _check(hidden, weight, b, target, tol=TOLERANCE[torch.float16], impl=impl)


def test_autocast_mixed_dtypes_on_cpu():
    hidden, weight, _, target = _inputs(17, 32, 203, torch.float32, "cpu", bias=False)
    with pytest.raises(TypeError, match="share a dtype"):
        linear_logprobs(hidden.detach().bfloat16(), weight, target, impl="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_logprobs(hidden.bfloat16(), weight, target, impl="torch")
    out.logps.sum().backward()
    assert weight.grad.dtype == torch.float32
    h64, w64 = leaf_copies(hidden, weight)
    ref = reference_logprobs(h64, w64, target)
    assert rel_err(out.logps, ref) < TOLERANCE[torch.bfloat16]


def test_paths_agree_on_cpu():
    skip_unless_path("cpu", "triton")
    hidden, weight, b, target = _inputs(31, 40, 409, torch.float32, "cpu", bias=True)
    a = linear_logprobs(hidden, weight, target, b, impl="torch").logps
    t = linear_logprobs(hidden, weight, target, b, impl="triton").logps
    assert rel_err(t, a) < 1e-5


@pytest.mark.interpreter
def test_auto_dispatch_follows_interpreter_variable():
    from liger_align.kernels._dispatch import use_triton

    x = torch.zeros(1)
    assert use_triton(x) == triton_runs_on("cpu")
    assert use_triton(x, impl="torch") is False
    with pytest.raises(ValueError, match="impl"):
        use_triton(x, impl="cuda")


BAD_INPUTS = [
    ("hidden", lambda h, w, t, b: (h[None], w, t, b), ValueError, "hidden must have shape"),
    ("weight H", lambda h, w, t, b: (h, w[:, :-1], t, b), ValueError, "must match weight"),
    ("target shape", lambda h, w, t, b: (h, w, t[:-1], b), ValueError, "target must have shape"),
    ("target dtype", lambda h, w, t, b: (h, w, t.float(), b), TypeError, "target must be an integer"),
    ("hidden dtype", lambda h, w, t, b: (h.long(), w, t, b), TypeError, "hidden must be a floating-point"),
    ("bias shape", lambda h, w, t, b: (h, w, t, b[:-1]), ValueError, "bias must have shape"),
    ("target range", lambda h, w, t, b: (h, w, t.clone().fill_(w.shape[0]), b), ValueError,
    r"target must lie in \[0, V\)"),
    ("negative target", lambda h, w, t, b: (h, w, t.clone().fill_(-7), b), ValueError, "ignore_index=-100"),
    ("empty", lambda h, w, t, b: (h[:0], w, t[:0], b), ValueError, "hidden is empty"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(name, mutate, error, message):
    hidden, weight, b, target = _inputs(9, 16, 101, torch.float32, "cpu", bias=True, seed=3)
    with pytest.raises(error, match=message):
        linear_logprobs(*mutate(hidden, weight, target, b))


@pytest.mark.parametrize("option,value", [("temperature", 0.0), ("softcap", -1.0), ("logit_scale", float("nan"))])
def test_bad_options(option, value):
    hidden, weight, _, target = _inputs(9, 16, 101, torch.float32, "cpu", bias=False, seed=4)
    with pytest.raises(ValueError, match=option):
        linear_logprobs(hidden, weight, target, **{option: value})


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distribution_stats(device, impl, dtype):
    skip_unless_path(device, impl)
    from _reference import reference_logits

    hidden, weight, b, target = _inputs(37, 48, 1003, dtype, device, bias=True)
    out = linear_logprobs(hidden, weight, target, b, impl=impl, distribution_stats=True, chunk_bytes=8 * 1003 * 4,
    softcap=4.0)
    assert linear_logprobs(hidden, weight, target, b, impl=impl).entropy is None
    z = reference_logits(*leaf_copies(hidden, weight, b), softcap=4.0)
    logp = torch.log_softmax(z, -1)
    valid = target != -100
    want_entropy = -(logp.exp() * logp).sum(-1)
    want_sq = torch.logsumexp(2 * logp, -1)
    assert rel_err(out.entropy[valid], want_entropy[valid]) < TOLERANCE[dtype]
    assert rel_err(out.log_sum_sq_probs[valid], want_sq[valid]) < TOLERANCE[dtype]
    assert torch.all(out.entropy[~valid] == 0) and not out.is_top1[~valid].any()
    # bf16 rounding can flip near-ties; the argmax agrees on (almost) every token
    want_top1 = (z.argmax(-1).cpu() == target.cpu().clamp(min=0))[valid.cpu()]
    agree = (out.is_top1[valid].cpu() == want_top1).float().mean()
    assert agree >= (1.0 if dtype == torch.float32 else 0.9)
    # the metrics carry no gradient; the log-probs still do
    assert not out.entropy.requires_grad and out.logps.requires_grad
    out.logps.sum().backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("device,impl", PATHS)
def test_top1_on_a_peaked_distribution(device, impl):
    skip_unless_path(device, impl)
    hidden, weight, _, target = _inputs(29, 32, 301, torch.float32, device, bias=False)
    target = (hidden.detach() @ weight.detach().t()).argmax(-1)  # every target is the argmax
    target[::2] = (target[::2] + 1) % 301  # half of them are not
    out = linear_logprobs(hidden, weight, target, impl=impl, distribution_stats=True)
    expected = torch.ones(29, dtype=torch.bool, device=device)
    expected[::2] = False
    assert torch.equal(out.is_top1, expected)
