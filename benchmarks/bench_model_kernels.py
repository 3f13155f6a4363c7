"""GPU benchmark of the model kernels (RMSNorm, RoPE, SwiGLU gate) and of a patched Llama-3.2-1B step.

Each kernel runs fwd+bwd in bf16 at Llama-3.2-1B (H=2048, I=8192, 32/8 heads, head_dim 64) and
Llama-3-8B (H=4096, I=14336, 32/8 heads, head_dim 128) sizes, at 8192 and 65536 tokens, against
transformers' eager code and Liger-Kernel's kernel (when ``liger_kernel`` is importable).

- ``ms``: median after warm-up (``_runner.measure``); ``graph_ms``: the same work replayed from a CUDA graph
  (``measure(cuda_graph=True)``), which removes the CPU launch cost that dominates at 8192 tokens. Ratios use
  ``graph_ms`` when the graph could be captured.
- ``floor_ms``: bytes that must move (each input read once, each output written once, bf16) divided by
  the device-to-device copy bandwidth measured in this run (read + write bytes of a 2 GiB copy);
  ``pct_floor = floor_ms / time``.
- ``extra_mib``: ``max_memory_allocated`` during one fwd+bwd minus what was allocated before it, minus
  the returned gradients (outputs every method must produce): ``_runner.peak_memory``.

Whole model: Llama-3.2-1B shape (random weights, bf16, SDPA attention), ``model(ids, labels).loss``
forward + backward at 1 x 1024 and 8 x 1024 tokens, unpatched vs ``apply_liger_kernel_to_llama(model=...)``.

Run on the GPU machine from the repository root: ``python benchmarks/bench_model_kernels.py``.
Prints a table last; writes ``benchmarks/results/model_kernels.json`` and ``model_kernels.png``.
``--smoke`` runs tiny sizes on CPU (torch paths, wall-clock timing) to check the script itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _runner  # noqa: E402
from _models import model_config  # noqa: E402

from liger_align.kernels.layers.rms_norm import rms_norm  # noqa: E402
from liger_align.kernels.layers.rope import rope  # noqa: E402
from liger_align.kernels.layers.swiglu import swiglu  # noqa: E402

MIB = 2**20
SIZES = {  # name: (hidden, intermediate, q heads, kv heads, head_dim)
    "llama-3.2-1b": (2048, 8192, 32, 8, 64),
    "llama-3-8b": (4096, 14336, 32, 8, 128),
}
SEQ = 1024  # tokens = batch x SEQ


def optional_liger():
    """Liger-Kernel's three ops, or None when it is not installed."""
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception as exc:  # noqa: BLE001 - any import failure means "absent"
        print(f"liger_kernel not available ({type(exc).__name__}: {exc}); skipping its rows")
        return None
    return {"rms_norm": LigerRMSNorm, "rope": liger_rotary_pos_emb, "swiglu": LigerSiLUMulFunction.apply}


# ---------------------------------------------------------------- floor


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/ms, counting the read and the write."""
    n = (2 * 2**30) // 2 if device == "cuda" else 2**22
    src = torch.empty(n, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = _runner.measure(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms


def fwd_bwd(forward: Callable[[], tuple[torch.Tensor, ...]], inputs: list[torch.Tensor],
            grad_outs: list[torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A closure running ``forward`` then the gradients of ``inputs`` (returned, not accumulated)."""

    def run():
        outs = forward()
        return torch.autograd.grad(outs, inputs, grad_outs)

    return run


# ---------------------------------------------------------------- the three kernels


def rms_norm_cases(tokens, hidden, dtype, device, liger):
    """``(name, fwd+bwd closure)`` per method, and the bytes a fwd+bwd must move."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def setup(module=None):
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        w = module.weight if module is not None else torch.nn.Parameter(
            1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype))
        return x, w, torch.randn_like(x)

    cases = []
    x, w, g = setup()
    cases.append(("liger_align", fwd_bwd(lambda: (rms_norm(x, w, eps=1e-5),), [x, w], [g])))
    hf = LlamaRMSNorm(hidden, eps=1e-5).to(device, dtype)
    x2, w2, g2 = setup(hf)
    cases.append(("transformers", fwd_bwd(lambda: (hf(x2),), [x2, w2], [g2])))
    if liger is not None:
        lk = liger["rms_norm"](hidden, eps=1e-5).to(device, dtype)
        x3, w3, g3 = setup(lk)
        cases.append(("liger_kernel", fwd_bwd(lambda: (lk(x3),), [x3, w3], [g3])))
    itemsize = torch.finfo(dtype).bits // 8
    return cases, 5 * tokens * hidden * itemsize  # fwd: read x, write y; bwd: read dy, x, write dx


def rope_cases(tokens, n_q, n_kv, head_dim, dtype, device, liger):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch = max(1, tokens // SEQ)
    seq = tokens // batch
    angles = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * torch.rand(head_dim // 2, device=device)
    emb = torch.cat((angles, angles), dim=-1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def setup():
        # the attention's layout: view (B, T, H, D), then transpose(1, 2)
        q = torch.randn(batch, seq, n_q, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(batch, seq, n_kv, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        return q, k, torch.randn_like(q), torch.randn_like(k)

    methods = [("liger_align", lambda q, k: rope(q, k, cos, sin)),
               ("transformers", lambda q, k: apply_rotary_pos_emb(q, k, cos, sin))]
    if liger is not None:
        methods.append(("liger_kernel", lambda q, k: liger["rope"](q, k, cos, sin)))
    cases = []
    for name, op in methods:
        q, k, gq, gk = setup()
        cases.append((name, fwd_bwd(lambda op=op, q=q, k=k: op(q, k), [q, k], [gq, gk])))
    itemsize = torch.finfo(dtype).bits // 8
    qk = tokens * (n_q + n_kv) * head_dim
    # fwd: read q, k, write q', k'; bwd: read dq', dk', write dq, dk; cos and sin read in each pass
    return cases, (4 * qk + 4 * seq * head_dim) * itemsize


def swiglu_cases(tokens, intermediate, dtype, device, liger):
    from transformers.activations import ACT2FN

    silu = ACT2FN["silu"]

    def setup():
        a = torch.randn(tokens, intermediate, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn_like(a, requires_grad=True)
        return a, b, torch.randn_like(a)

    # the in-place variants overwrite a and b with their gradients at every run: timing is value-independent
    methods = [("liger_align", lambda a, b: (swiglu(a, b, inplace_backward=True),)),
               ("liger_align(out-of-place)", lambda a, b: (swiglu(a, b),)),
               ("transformers", lambda a, b: (silu(a) * b,))]
    if liger is not None:
        methods.append(("liger_kernel", lambda a, b: (liger["swiglu"](a, b),)))
    cases = []
    for name, op in methods:
        a, b, g = setup()
        cases.append((name, fwd_bwd(lambda op=op, a=a, b=b: op(a, b), [a, b], [g])))
    itemsize = torch.finfo(dtype).bits // 8
    return cases, 8 * tokens * intermediate * itemsize  # fwd: a, b, c; bwd: dc, a, b, da, db


def bench_kernels(args, bandwidth, liger) -> list[dict]:
    """The runner over (kernel, size, tokens); ``pct_floor``, ``vs_transformers``, ``vs_liger_kernel`` per row."""
    def setup(shape: dict) -> _runner.Case:
        hidden, inter, n_q, n_kv, head_dim = SIZES[shape["size"]]
        if args.smoke:
            hidden, inter, n_q, n_kv, head_dim = hidden // 32, inter // 32, 4, 2, 16
        tokens, kernel = shape["tokens"], shape["kernel"]
        if kernel == "rms_norm":
            cases, moved = rms_norm_cases(tokens, hidden, args.dtype, args.device, liger)
        elif kernel == "rope":
            cases, moved = rope_cases(tokens, n_q, n_kv, head_dim, args.dtype, args.device, liger)
        else:
            cases, moved = swiglu_cases(tokens, inter, args.dtype, args.device, liger)
        return _runner.Case(dict(cases), fields={"floor_ms": moved / bandwidth})

    shapes = [{"kernel": k, "size": s, "tokens": t} for s in SIZES for t in args.tokens
              for k in ("rms_norm", "rope", "swiglu")]
    rows = _runner.run(shapes, setup, cuda_graph=True, rep_ms=100, warmup_ms=25,
                       ratios={"vs_transformers": ("transformers", "time"),
                               "vs_liger_kernel": ("liger_kernel", "time")})
    for row in rows:
        best = row["graph_ms"] if isinstance(row.get("graph_ms"), float) else row.get("ms")
        row["pct_floor"] = 100 * row["floor_ms"] / best if isinstance(best, float) else None
        gib = row.pop("extra_gib", None)
        row["extra_mib"] = None if gib is None else gib * 1024
        row.pop("peak_gib", None)
    return rows


# ---------------------------------------------------------------- whole model


def llama_1b(device: str, smoke: bool):
    """Llama-3.2-1B's shape (``_models``, SDPA attention), bf16; ``smoke``: 2 layers of hidden 64, V=1003."""
    from transformers import LlamaForCausalLM

    extra = {"vocab_size": 1003, "intermediate_size": 176} if smoke else {}
    config = model_config("llama-3.2-1b", smoke=smoke, attn_implementation="sdpa", **extra)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).train()


def bench_model(args) -> list[dict]:
    from liger_align.models import apply_liger_kernel_to_llama

    model = llama_1b(args.device, args.smoke)
    params = list(model.parameters())
    weights_mib = sum(p.numel() * p.element_size() for p in params) / MIB
    rows = []
    for batch in (1, 8):
        ids = torch.randint(0, model.config.vocab_size, (batch, SEQ if not args.smoke else 37), device=args.device)

        def step():
            for p in params:
                p.grad = None
            model(input_ids=ids, labels=ids).loss.backward()
            return ()

        for patched in (False, True):
            handle = apply_liger_kernel_to_llama(model=model) if patched else None
            name = "liger_align" if patched else "transformers"
            print(f"model llama-3.2-1b tokens={ids.numel()} {name}", flush=True)
            ms = _runner.measure(step, warmup_ms=25, rep_ms=100)
            extra, peak = _runner.peak_memory(step)
            extra = None if extra is None else extra * 1024
            rows.append({"kernel": "model fwd+bwd", "size": "llama-3.2-1b", "tokens": ids.numel(), "method": name,
                         "ms": ms, "graph_ms": None, "floor_ms": None, "pct_floor": None,
                         "extra_mib": extra, "peak_gib": peak, "weights_mib": weights_mib})
            if handle is not None:
                handle.revert()
        for row in rows[-2:]:
            row["vs_transformers"] = row["ms"] / rows[-2]["ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--skip-model", action="store_true", help="kernels only")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to test the script")
    args = parser.parse_args()
    args.dtype = torch.bfloat16
    args.device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.tokens = [64, 256]
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --smoke)")
    torch.manual_seed(0)
    liger = None if args.smoke else optional_liger()
    bandwidth = copy_bandwidth(args.device)
    rows = bench_kernels(args, bandwidth, liger)
    if not args.skip_model:
        rows += bench_model(args)
    meta = _runner.run_meta(copy_bandwidth_tb_s=bandwidth * 1e3 / 1e12, liger_kernel=liger is not None,
                            smoke=args.smoke)
    name = "model_kernels_smoke" if args.smoke else "model_kernels"
    path = _runner.save(name, rows, meta)
    _runner.plot(name, [r for r in rows if r.get("pct_floor") is not None], group=["kernel", "size", "tokens"],
                 values=[("pct_floor", "% of HBM floor (higher is better)")], ref_line=80,
                 title="Model kernels, fwd+bwd, bf16")
    print(f"\nwrote {path} and {name}.png; copy bandwidth {meta['copy_bandwidth_tb_s']:.2f} TB/s (read+write)")
    print(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}\n")
    _runner.print_table(rows, ["kernel", "size", "tokens", "method", "ms", "graph_ms", "floor_ms", "pct_floor",
                               "vs_transformers", "vs_liger_kernel", "extra_mib", "peak_gib"])


if __name__ == "__main__":
    main()
