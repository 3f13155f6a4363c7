"""Liger-Kernel's options of the fused cross-entropy (issue 13): ce_weight, z-loss, token accuracy, and label
smoothing, softcap and a non-default ignore_index each on its own, against a float64 ``F.cross_entropy``."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from _reference import TOLERANCE, rel_err
from conftest import HAS_CUDA, triton_runs_on

from liger_align.kernels import CrossEntropyOutput, fused_linear_cross_entropy
from liger_align.losses import LigerFusedLinearCrossEntropyLoss

STRATEGIES = ("grad_in_forward", "recompute")
# Each option alone, then all together (softcap changes the logits every other option sees).
OPTIONS = {
    "ce_weight": {"ce_weight": True},
    "z_loss": {"lse_square_scale": 3e-2},
    "label_smoothing": {"label_smoothing": 0.2},
    "softcap": {"softcap": 2.5},
    "ignore_index": {"ignore_index": 7},
    "weight+smoothing": {"ce_weight": True, "label_smoothing": 0.15},
    "all": {"ce_weight": True, "label_smoothing": 0.1, "lse_square_scale": 1e-2, "softcap": 3.0, "ignore_index": -1},
}


def _inputs(n, h, v, dtype, *, seed, ignore_index=-100, device="cpu", with_weight=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    bias = torch.randn(v, generator=gen) * 0.3
    target = torch.randint(0, v, (n,), generator=gen)
    # a third of the targets are their row's argmax, so the token accuracy is neither 0 nor 1
    top = (hidden.to(dtype).double() @ weight.to(dtype).double().t() + bias.to(dtype).double()).argmax(1)
    target[1::3] = top[1::3]
    target[::4] = ignore_index
    ce_weight = (torch.rand(v, generator=gen) * 1.5 + 0.1) if with_weight else None
    if ce_weight is not None:
        ce_weight[3] = 0.0  # a class of weight 0
    leaves = [t.to(device, dtype).requires_grad_() for t in (hidden, weight, bias)]
    return (*leaves, target.to(device), None if ce_weight is None else ce_weight.to(device))


def _reference(hidden, weight, bias, target, *, ce_weight=None, label_smoothing=0.0, lse_square_scale=0.0,
               softcap=None, ignore_index=-100, reduction="mean", num_items_in_batch=None):
    """float64 leaves -> (loss, z_loss, token_accuracy) as PyTorch defines the cross-entropy, plus s * lse^2."""
    z = hidden @ weight.t() + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    w64 = None if ce_weight is None else ce_weight.double()
    ce_red = "sum" if num_items_in_batch is not None else reduction
    ce = F.cross_entropy(z, target, weight=w64, label_smoothing=label_smoothing, ignore_index=ignore_index,
                         reduction=ce_red)
    valid = target != ignore_index
    z_tok = lse_square_scale * torch.logsumexp(z, 1) ** 2 * valid
    if num_items_in_batch is not None:
        ce, z_red = ce / num_items_in_batch, z_tok.sum() / num_items_in_batch
    elif reduction == "mean":
        denominator = valid.sum() if w64 is None else (w64[target.clamp(min=0)] * valid).sum()
        z_red = z_tok.sum() / denominator
    else:
        z_red = z_tok.sum() if reduction == "sum" else z_tok
    accuracy = ((z.argmax(1) == target) & valid).sum() / valid.sum().clamp(min=1)
    return ce + z_red, z_red, accuracy


def _run(hidden, weight, bias, target, ce_weight, opts, *, impl, strategy, reduction="mean", chunk_bytes=None):
    kwargs = {k: v for k, v in opts.items() if k != "ce_weight"}
    return fused_linear_cross_entropy(
        hidden, weight, target, bias, ce_weight=ce_weight if opts.get("ce_weight") else None, reduction=reduction,
        impl=impl, strategy=strategy, chunk_bytes=chunk_bytes, return_z_loss=True, return_token_accuracy=True,
        **kwargs,
    )


def _count_products(monkeypatch) -> list[int]:
    """Count the logits products (one per token chunk or vocabulary slice) of both strategies."""
    calls: list[int] = []
    for name in ("fused_linear_cross_entropy", "linear_logprobs"):  # the package's names are its functions
        module = importlib.import_module(f"liger_align.kernels.head.{name}")
        real = module.project
        monkeypatch.setattr(module, "project", lambda *a, _real=real: calls.append(1) or _real(*a))
    return calls


def _check(got, hidden, weight, bias, target, ce_weight, opts, *, reduction, tol, **ref_kw):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref_opts = {k: v for k, v in opts.items() if k != "ce_weight"}
    ref, z_ref, acc_ref = _reference(*leaves, target, ce_weight=ce_weight if opts.get("ce_weight") else None,
                                     reduction=reduction, **ref_opts, **ref_kw)
    assert isinstance(got, CrossEntropyOutput) and got.is_top1 is None
    assert got.loss.shape == ref.shape and rel_err(got.loss, ref) < tol
    if opts.get("lse_square_scale"):
        assert got.z_loss.shape == ref.shape and rel_err(got.z_loss, z_ref) < tol and not got.z_loss.requires_grad
    else:
        assert torch.count_nonzero(got.z_loss) == 0
    assert got.token_accuracy.dim() == 0 and 0 < acc_ref < 1
    # bf16 logits may round a near-tie to another argmax: one token either way
    n_valid = (target != ref_opts.get("ignore_index", -100)).sum().item()
    slack = 1.5 / n_valid if hidden.dtype == torch.bfloat16 else 1e-6
    assert abs(got.token_accuracy.item() - acc_ref.item()) < slack
    upstream = torch.rand(ref.shape, generator=torch.Generator().manual_seed(5)) + 0.5
    grads = torch.autograd.grad(got.loss, (hidden, weight, bias), upstream.to(got.loss.device))
    want = torch.autograd.grad(ref, leaves, upstream.double().to(ref.device))
    for name, g, r, t in zip(("hidden", "weight", "bias"), grads, want, (hidden, weight, bias)):
        assert g.dtype == t.dtype and rel_err(g, r) < tol, name


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_matches_reference(strategy, reduction, option, dtype, monkeypatch):
    if strategy == "grad_in_forward" and reduction == "none":
        pytest.skip("per-token losses need the recomputing strategy")
    opts = OPTIONS[option]
    ignore_index = opts.get("ignore_index", -100)
    hidden, weight, bias, target, ce_weight = _inputs(37, 29, 1003, dtype, seed=11, ignore_index=ignore_index)
    calls = _count_products(monkeypatch)
    got = _run(hidden, weight, bias, target, ce_weight, opts, impl="torch", strategy=strategy, reduction=reduction,
               chunk_bytes=4 * 1003 * 4)
    assert len(calls) >= 3  # the 27 valid tokens ran in >= 3 token chunks or vocabulary slices
    _check(got, hidden, weight, bias, target, ce_weight, opts, reduction=reduction, tol=TOLERANCE[dtype])


@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "option,dtype", [(option, torch.float32) for option in OPTIONS] + [("all", torch.bfloat16)]
)
def test_triton_interpreter_matches_reference(strategy, option, dtype, monkeypatch):
    if not triton_runs_on("cpu"):
        pytest.skip("Triton's interpreter is not on (TRITON_INTERPRET=1 before triton is imported)")
    opts = OPTIONS[option]
    hidden, weight, bias, target, ce_weight = _inputs(
        13, 16, 601, dtype, seed=12, ignore_index=opts.get("ignore_index", -100)
    )
    calls = _count_products(monkeypatch)
    reduction = "mean" if strategy == "grad_in_forward" else "none"
    got = _run(hidden, weight, bias, target, ce_weight, opts, impl="triton", strategy=strategy, reduction=reduction,
               chunk_bytes=2 * 601 * 4)
    assert len(calls) >= 3  # >= 3 token chunks (grad_in_forward) or vocabulary slices (recompute)
    _check(got, hidden, weight, bias, target, ce_weight, opts, reduction=reduction, tol=TOLERANCE[dtype])


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_masked_is_finite_with_zero_gradients(impl, strategy):
    if impl == "triton" and not triton_runs_on("cpu"):
        pytest.skip("Triton's interpreter is not on")
    hidden, weight, bias, target, ce_weight = _inputs(9, 16, 211, torch.float32, seed=13)
    target.fill_(-100)
    out = fused_linear_cross_entropy(
        hidden, weight, target, bias, ce_weight=ce_weight, label_smoothing=0.1, lse_square_scale=0.1, impl=impl,
        strategy=strategy, return_z_loss=True, return_token_accuracy=True, return_top1=True,
    )
    for value in (out.loss, out.z_loss, out.token_accuracy):
        assert torch.isfinite(value) and value.item() == 0.0
    assert not out.is_top1.any()
    for g in torch.autograd.grad(out.loss, (hidden, weight, bias)):
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_num_items_in_batch_is_the_denominator_with_ce_weight(strategy):
    hidden, weight, bias, target, ce_weight = _inputs(37, 29, 1003, torch.float32, seed=14)
    opts = {"ce_weight": True, "label_smoothing": 0.1, "lse_square_scale": 1e-2}
    got = fused_linear_cross_entropy(
        hidden, weight, target, bias, ce_weight=ce_weight, label_smoothing=0.1, lse_square_scale=1e-2,
        num_items_in_batch=torch.tensor(41.5), impl="torch", strategy=strategy, return_z_loss=True,
        return_token_accuracy=True,
    )
    _check(got, hidden, weight, bias, target, ce_weight, opts, reduction="mean", tol=TOLERANCE[torch.float32],
           num_items_in_batch=41.5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weighted_mean_over_targets_of_weight_zero_is_finite(strategy):
    hidden, weight, bias, target, ce_weight = _inputs(8, 16, 211, torch.float32, seed=15)
    ce_weight[target[target != -100]] = 0.0  # every valid target weighs 0: the denominator counts as 1
    loss = fused_linear_cross_entropy(hidden, weight, target, bias, ce_weight=ce_weight, impl="torch",
                                      strategy=strategy)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, (hidden, weight, bias)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_options_off_are_todays_op(strategy, monkeypatch):
    hidden, weight, bias, target, ce_weight = _inputs(37, 29, 1003, torch.float32, seed=16)
    plain = fused_linear_cross_entropy(hidden, weight, target, bias, impl="torch", strategy=strategy,
                                       chunk_bytes=4 * 1003 * 4)
    calls = _count_products(monkeypatch)
    off = fused_linear_cross_entropy(
        hidden, weight, target, bias, ce_weight=None, lse_square_scale=0.0, impl="torch", strategy=strategy,
        chunk_bytes=4 * 1003 * 4, return_z_loss=False, return_token_accuracy=False,
    )
    n_forward = len(calls)
    assert isinstance(off, torch.Tensor) and torch.equal(off, plain)
    g_off = torch.autograd.grad(off, (hidden, weight, bias))
    g_plain = torch.autograd.grad(plain, (hidden, weight, bias))
    assert all(torch.equal(a, b) for a, b in zip(g_off, g_plain))
    # asking for the z-loss and the accuracy adds no product
    calls.clear()
    fused_linear_cross_entropy(hidden, weight, target, bias, impl="torch", strategy=strategy, lse_square_scale=0.1,
                               chunk_bytes=4 * 1003 * 4, return_z_loss=True, return_token_accuracy=True)
    assert len(calls) == n_forward
    loss, is_top1 = fused_linear_cross_entropy(hidden, weight, target, bias, impl="torch", strategy=strategy,
                                               return_top1=True)
    assert is_top1.dtype == torch.bool and is_top1.shape == target.shape


class _LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: records the constexpr flags of every launch, then launches."""

    def __init__(self, kernel, flags: list[dict]) -> None:
        self.kernel, self.flags = kernel, flags

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.flags.append({k: v for k, v in kwargs.items() if k.startswith("HAS_") and k != "HAS_SOFTCAP"})
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "options,stats_flags,grad_flags",
    [
        ({}, {}, {}),
        ({"ce_weight": True}, {}, {}),  # without smoothing the weights only scale a per-row coefficient
        ({"lse_square_scale": 0.1}, {}, {"HAS_G": True}),
        ({"ce_weight": True, "label_smoothing": 0.1}, {"HAS_CLASS_WEIGHT": True},
         {"HAS_G": True, "HAS_CLASS_WEIGHT": True}),
    ],
)
def test_kernels_compile_an_option_only_when_it_is_on(strategy, options, stats_flags, grad_flags, monkeypatch):
    if not triton_runs_on("cpu"):
        pytest.skip("Triton's interpreter is not on")
    row_softmax = importlib.import_module("liger_align.kernels.head._row_softmax")
    launched: dict[str, list[dict]] = {"stats": [], "grad": []}
    monkeypatch.setattr(row_softmax, "_row_stats_kernel", _LaunchRecorder(row_softmax._row_stats_kernel,
                                                                          launched["stats"]))
    monkeypatch.setattr(row_softmax, "_row_grad_kernel", _LaunchRecorder(row_softmax._row_grad_kernel,
                                                                         launched["grad"]))
    hidden, weight, bias, target, ce_weight = _inputs(9, 16, 211, torch.float32, seed=21)
    kwargs = {k: v for k, v in options.items() if k != "ce_weight"}
    out = fused_linear_cross_entropy(
        hidden, weight, target, bias, ce_weight=ce_weight if options.get("ce_weight") else None, impl="triton",
        strategy=strategy, return_token_accuracy=True, return_z_loss=True, **kwargs,
    )
    out.loss.backward()
    assert launched["stats"] and launched["grad"]
    assert all(f == stats_flags for f in launched["stats"]) and all(f == grad_flags for f in launched["grad"])


def test_return_fields_only_when_asked():
    hidden, weight, bias, target, _ = _inputs(11, 16, 211, torch.float32, seed=17)
    out = fused_linear_cross_entropy(hidden, weight, target, bias, impl="torch", return_token_accuracy=True)
    assert isinstance(out, CrossEntropyOutput) and out.z_loss is None and out.is_top1 is None
    out = fused_linear_cross_entropy(hidden, weight, target, bias, impl="torch", return_z_loss=True,
                                     return_top1=True)
    assert out.token_accuracy is None and out.is_top1.shape == target.shape and out.z_loss.item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_module_matches_functional_and_moves_its_weight(reduction):
    hidden, weight, bias, target, ce_weight = _inputs(37, 29, 1003, torch.float32, seed=18)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ce_weight, -100, 1e-2, 0.1, reduction, 4.0, True,
                                               return_token_accuracy=True, impl="torch")
    assert loss_fn.ce_weight is not ce_weight and torch.equal(loss_fn.ce_weight, ce_weight)
    got = loss_fn(weight, hidden, target, bias)
    want = fused_linear_cross_entropy(
        hidden, weight, target, bias, ce_weight=ce_weight, lse_square_scale=1e-2, label_smoothing=0.1,
        reduction=reduction, softcap=4.0, impl="torch", return_z_loss=True, return_token_accuracy=True,
    )
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    assert "ce_weight" in dict(loss_fn.named_buffers())


BAD = [
    ({"ce_weight": [1.0] * 211}, TypeError, "ce_weight must be a torch.Tensor"),
    ({"ce_weight": torch.ones(211, dtype=torch.int64)}, TypeError, "ce_weight must be a floating-point"),
    ({"ce_weight": torch.ones(210)}, ValueError, r"ce_weight must have shape \(V,\) = \(211,\)"),
    ({"ce_weight": torch.ones(1, 211)}, ValueError, "ce_weight must have shape"),
    ({"ce_weight": torch.ones(211, device="meta")}, ValueError, "ce_weight must be on the weight's device"),
    ({"ce_weight": torch.ones(211).index_fill_(0, torch.tensor([5]), -1.0)}, ValueError, r"ce_weight\[5\]"),
    ({"ce_weight": torch.ones(211).index_fill_(0, torch.tensor([9]), float("nan"))}, ValueError, r"ce_weight\[9\]"),
    ({"ce_weight": torch.ones(211).index_fill_(0, torch.tensor([2]), float("inf"))}, ValueError, "finite"),
    ({"lse_square_scale": -0.1}, ValueError, "lse_square_scale must be a finite number >= 0"),
    ({"lse_square_scale": float("nan")}, ValueError, "lse_square_scale"),
    ({"lse_square_scale": "0.1"}, TypeError, "lse_square_scale"),
    ({"return_z_loss": 1}, TypeError, "return_z_loss must be a bool"),
    ({"return_token_accuracy": "yes"}, TypeError, "return_token_accuracy must be a bool"),
    ({"return_top1": None}, TypeError, "return_top1 must be a bool"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD)
def test_bad_options_are_refused_before_any_product(kwargs, error, message, monkeypatch):
    hidden, weight, bias, target, _ = _inputs(7, 16, 211, torch.float32, seed=19)
    calls = _count_products(monkeypatch)
    with pytest.raises(error, match=message):
        fused_linear_cross_entropy(hidden, weight, target, bias, impl="torch", **kwargs)
    assert not calls


def test_module_refuses_bad_options():
    with pytest.raises(ValueError, match="lse_square_scale"):
        LigerFusedLinearCrossEntropyLoss(lse_square_scale=-1.0)
    with pytest.raises(TypeError, match="return_z_loss"):
        LigerFusedLinearCrossEntropyLoss(return_z_loss="no")
    with pytest.raises(TypeError, match="ce_weight"):
        LigerFusedLinearCrossEntropyLoss(ce_weight=torch.ones(3, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("option", ["ce_weight", "z_loss", "all"])
def test_cuda_triton_matches_reference(dtype, strategy, option, monkeypatch):
    opts = OPTIONS[option]
    hidden, weight, bias, target, ce_weight = _inputs(
        301, 96, 5003, dtype, seed=20, ignore_index=opts.get("ignore_index", -100), device="cuda"
    )
    calls = _count_products(monkeypatch)
    got = _run(hidden, weight, bias, target, ce_weight, opts, impl=None, strategy=strategy,
               chunk_bytes=32 * 5003 * 4)
    assert len(calls) >= 3
    _check(got, hidden, weight, bias, target, ce_weight, opts, reduction="mean", tol=TOLERANCE[dtype])


# ----------------------------------------------------------------------- use_token_scaling, return_predicted_tokens


def _scaled_reference(hidden, weight, bias, target, *, ce_weight=None, label_smoothing=0.0, lse_square_scale=0.0,
                      softcap=None, ignore_index=-100, reduction="mean"):
    """float64: each token's loss (z-loss included) times its detached target probability, reduced as the op;
    and the argmax ids (-1 where ignored)."""
    z = hidden @ weight.t() + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    w64 = None if ce_weight is None else ce_weight.double()
    valid = target != ignore_index
    per_token = F.cross_entropy(z, target, weight=w64, label_smoothing=label_smoothing, ignore_index=ignore_index,
                                reduction="none")
    lse = torch.logsumexp(z, 1)
    per_token = per_token + lse_square_scale * lse**2 * valid
    q = torch.softmax(z, 1).gather(1, target.clamp(min=0)[:, None])[:, 0].detach()
    scaled = per_token * q * valid
    predicted = torch.where(valid, z.argmax(1), -1)
    if reduction == "none":
        return scaled, predicted, z
    if reduction == "sum":
        return scaled.sum(), predicted, z
    denominator = valid.sum() if w64 is None else (w64[target.clamp(min=0)] * valid).sum()
    return scaled.sum() / denominator, predicted, z


def _check_predicted(got: torch.Tensor, want: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == torch.int64 and got.shape == want.shape and not got.requires_grad
    assert torch.equal(got == -1, want == -1)
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:  # bf16 logits may round a near-tie the other way: the id picked is a maximum within bf16's step
        rows = (got != want).nonzero()[:, 0]
        assert rows.numel() <= max(1, got.numel() // 50)
        for r in rows.tolist():
            assert z[r, want[r]] - z[r, got[r]] <= 2e-2 * z[r].abs().max()


SCALING_OPTIONS = {"plain": {}, "all": {"ce_weight": True, "label_smoothing": 0.1, "lse_square_scale": 1e-2,
                                       "softcap": 3.0}}


def _token_scaling_case(impl, strategy, reduction, option, dtype, *, n, h, v, chunk_bytes, seed, device="cpu"):
    opts = SCALING_OPTIONS[option]
    hidden, weight, bias, target, ce_weight = _inputs(n, h, v, dtype, seed=seed, device=device)
    kwargs = {k: val for k, val in opts.items() if k != "ce_weight"}
    got = fused_linear_cross_entropy(
        hidden, weight, target, bias, ce_weight=ce_weight if opts.get("ce_weight") else None, reduction=reduction,
        impl=impl, strategy=strategy, chunk_bytes=chunk_bytes, use_token_scaling=True, return_predicted_tokens=True,
        **kwargs,
    )
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref, predicted, z = _scaled_reference(*leaves, target, ce_weight=ce_weight if opts.get("ce_weight") else None,
                                          reduction=reduction, **kwargs)
    assert isinstance(got, CrossEntropyOutput) and got.z_loss is None and got.token_accuracy is None
    tol = TOLERANCE[dtype]
    assert got.loss.shape == ref.shape and rel_err(got.loss, ref) < tol
    _check_predicted(got.predicted_tokens, predicted, z.detach(), dtype)
    upstream = (torch.rand(ref.shape, generator=torch.Generator().manual_seed(5)) + 0.5).to(device)
    grads = torch.autograd.grad(got.loss, (hidden, weight, bias), upstream)
    want = torch.autograd.grad(ref, leaves, upstream.double())
    for name, g, r in zip(("hidden", "weight", "bias"), grads, want):
        assert rel_err(g, r) < tol, name


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option", list(SCALING_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_scaling_and_predicted_tokens_torch_path(strategy, reduction, option, dtype):
    if strategy == "grad_in_forward" and reduction == "none":
        pytest.skip("per-token losses need the recomputing strategy")
    _token_scaling_case("torch", strategy, reduction, option, dtype, n=37, h=29, v=1003, chunk_bytes=4 * 1003 * 4,
                        seed=31)


@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("option", list(SCALING_OPTIONS))
def test_token_scaling_and_predicted_tokens_triton_interpreter(strategy, option):
    if not triton_runs_on("cpu"):
        pytest.skip("Triton's interpreter is not on")
    reduction = "mean" if strategy == "grad_in_forward" else "none"
    # 601 columns in slices of 256 (recompute) and rows in chunks: the argmax is folded across slices
    _token_scaling_case("triton", strategy, reduction, option, torch.float32, n=13, h=16, v=601,
                        chunk_bytes=2 * 601 * 4, seed=32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_token_scaling_and_predicted_tokens_cuda(dtype, strategy):
    reduction = "mean" if strategy == "grad_in_forward" else "none"
    _token_scaling_case(None, strategy, reduction, "all", dtype, n=301, h=96, v=5003, chunk_bytes=32 * 5003 * 4,
                        seed=34, device="cuda")


def test_predicted_tokens_take_the_first_maximum_across_slices():
    hidden = torch.ones(3, 4)
    weight = torch.zeros(601, 4)
    weight[[5, 300, 599]] = 1.0  # three tied maxima, in three different vocabulary slices of 256
    weight[10] = 0.5
    target = torch.tensor([1, -100, 2])
    for strategy in STRATEGIES:
        for impl in ["torch"] + (["triton"] if triton_runs_on("cpu") else []):
            out = fused_linear_cross_entropy(hidden, weight, target, impl=impl, strategy=strategy, chunk_bytes=256 * 4,
                                             return_predicted_tokens=True)
            assert out.predicted_tokens.tolist() == [5, -1, 5], (strategy, impl)


def test_module_takes_the_two_options_and_checks_them():
    hidden, weight, bias, target, _ = _inputs(11, 8, 97, torch.float32, seed=33)
    loss_fn = LigerFusedLinearCrossEntropyLoss(use_token_scaling=True, return_predicted_tokens=True)
    out = loss_fn(weight, hidden, target, bias)
    want = fused_linear_cross_entropy(hidden, weight, target, bias, use_token_scaling=True,
                                      return_predicted_tokens=True)
    assert torch.equal(out.loss, want.loss) and torch.equal(out.predicted_tokens, want.predicted_tokens)
    with pytest.raises(TypeError, match="use_token_scaling must be a bool"):
        LigerFusedLinearCrossEntropyLoss(use_token_scaling=1)
    with pytest.raises(TypeError, match="return_predicted_tokens must be a bool"):
        fused_linear_cross_entropy(hidden, weight, target, return_predicted_tokens="yes")
