"""What several test files share, defined once.

- ``DEVICES``/``PATHS``/``GRID_PATHS``/``skip_unless_path``: the devices and implementation paths a test runs on.
- ``leaf_copies``: float64 leaves of the inputs, for the float64 references.
- ``count_products``: counts the logit products of the fused linear ops (proves "several chunks ran").
- The tiny Llama and Gemma models of the patch tests (``tiny_llama``, ``tiny_gemma``, ``batch``, ...).
- The trainer tests' shared pieces (``tiny_model``, ``common_args``, ``assert_logs_match``, ...); the tokenizer,
  tiny models and data they train on come from ``liger_align.testing``.
- The example tests' shared pieces (``SCRIPTS``, ``run_script``, ``example_module``, ``example_main``): the only
  part that touches ``examples/``.

Random numbers: without an explicit seed the builders draw from the global generators, which the
autouse ``seed`` fixture of ``conftest.py`` seeds from the test id, so every test is replayable.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _reference import rel_err
from conftest import HAS_CUDA, triton_runs_on

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- devices and paths

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# (device, impl) pairs; a test parametrised on them calls ``skip_unless_path`` first.
PATHS = [(device, impl) for device in DEVICES for impl in ("torch", "triton")]
# The same pairs for the large parameter grids: their runs through Triton's interpreter (Triton on CPU tensors)
# are in the slow tier only; each kernel keeps interpreter tests in the quick tier (``-m "not slow"``).
GRID_PATHS = [pytest.param(d, i, marks=pytest.mark.slow) if (d, i) == ("cpu", "triton") else (d, i) for d, i in PATHS]


def skip_unless_path(device: str, impl: str) -> None:
    """Skip unless tensors on ``device`` can run ``impl`` here (CUDA present; Triton's interpreter on CPU)."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if impl == "triton" and not triton_runs_on(device):
        pytest.skip(f"impl='triton' cannot run on {device} tensors here (TRITON_INTERPRET=1 or CUDA needed)")


def leaf_copies(*tensors: torch.Tensor | None, dtype: torch.dtype = torch.float64, device: Any = None) -> list:
    """Detached ``dtype`` copies (on ``device``, default: where each tensor is) that require grad like the
    originals; None stays None."""
    return [
        None if t is None else t.detach().to(device or t.device, dtype).requires_grad_(t.requires_grad)
        for t in tensors
    ]


def count_products(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Count the logits products of the fused linear ops from now on: ``_linear_chunks.project`` (one chunk's
    or one vocabulary slice's ``h @ w.T + b``) is wrapped wherever a loaded ``liger_align`` module looks it up.

    Returns the list of the ``(rows, vocabulary columns)`` of every product, so ``len(...)`` is the number
    of chunks or slices that ran.
    """
    from liger_align.kernels.head import _linear_chunks  # loads the kernel modules too

    real = _linear_chunks.project
    calls: list[tuple[int, int]] = []

    def counting(h_chunk, weight, *args, **kwargs):
        calls.append((h_chunk.shape[0], weight.shape[0]))
        return real(h_chunk, weight, *args, **kwargs)

    users = [m for name, m in list(sys.modules.items())
             if name.startswith("liger_align.") and getattr(m, "project", None) is real]
    assert users, "no liger_align module uses _linear_chunks.project (renamed?)"
    for module in users:
        monkeypatch.setattr(module, "project", counting)
    return calls


# ----------------------------------------------------------------------------- tiny Llama and Gemma models

VOCAB = 1003
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPE, tie_word_embeddings=True, rope_scaling=dict(LLAMA3_SCALING), rope_theta=500000.0,
                       attn_implementation="eager", **overrides)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Add N(0, 0.02) noise to every parameter (the default init has tiny weights; make the layers matter)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_llama(seed: int | None = None, **overrides):
    """A 2-layer Llama-3.2-shaped model (GQA, llama3 rope scaling, tied embeddings) of vocabulary ``VOCAB``;
    ``seed`` None draws from the global generator (seeded per test)."""
    from transformers import LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    return perturbed(LlamaForCausalLM(llama_config(**overrides)))


def batch(batch_size: int = 2, seq: int = 37, *, seed: int | None = None):
    """``input_ids`` and ``labels (B, T)`` over ``VOCAB``: row 0 has a 7-token prompt, the last row 5 pad tokens."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, seq), generator=gen)
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt
    labels[-1, -5:] = -100  # padding
    return ids, labels


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, grads(model)


def assert_same_grads(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys() and got
    for name in want:
        assert rel_err(got[name], want[name]) < tol, name


GEMMA_SHAPE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=97, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                   attn_implementation="eager")
GEMMA_SOFTCAP = 3.0


def gemma_families() -> dict[str, tuple]:
    """model_type -> (causal LM class, config class, extra config, modeling module, prefix, patch function,
    RMSNorms per layer)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GemmaConfig,
        GemmaForCausalLM,
    )
    from transformers.models.gemma import modeling_gemma
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.gemma3 import modeling_gemma3

    from liger_align.models import (
        apply_liger_kernel_to_gemma,
        apply_liger_kernel_to_gemma2,
        apply_liger_kernel_to_gemma3_text,
    )

    return {
        "gemma": (GemmaForCausalLM, GemmaConfig,  # both names: the attribute GemmaMLP reads changed across versions
                  {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}, modeling_gemma,
                  "Gemma", apply_liger_kernel_to_gemma, 2),
        "gemma2": (Gemma2ForCausalLM, Gemma2Config,
                   {"final_logit_softcapping": GEMMA_SOFTCAP, "attn_logit_softcapping": 20.0,
                    "query_pre_attn_scalar": 16, "sliding_window": 8},
                   modeling_gemma2, "Gemma2", apply_liger_kernel_to_gemma2, 4),
        "gemma3_text": (Gemma3ForCausalLM, Gemma3TextConfig, {"query_pre_attn_scalar": 16, "sliding_window": 8},
                        modeling_gemma3, "Gemma3", apply_liger_kernel_to_gemma3_text, 6),  # 4 + q/k norms
    }


GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")


def tiny_gemma(model_type: str, seed: int | None = None, **overrides):
    """A 2-layer Gemma / Gemma 2 / Gemma 3 text model of odd sizes (head_dim != hidden / heads), in train mode."""
    cls, config_cls, extra, *_ = gemma_families()[model_type]
    config = config_cls(**{**GEMMA_SHAPE, **extra, **overrides})
    assert config.head_dim != config.hidden_size // config.num_attention_heads
    if seed is not None:
        torch.manual_seed(seed)
    model = perturbed(cls(config))  # the default init leaves the norms at 0 and the logits flat
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)  # tied head: logits of a few units, soft-capping active
    return model.train()


# ----------------------------------------------------------------------------- trainer tests

SKIP_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
             "eval_samples_per_second", "eval_steps_per_second", "total_flos"}


def tiny_model(tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama (hidden 32, 4 heads, 2 kv heads) sized to the tokenizer (``liger_align.testing``'s
    ``build_tiny_llama``: the weights depend only on ``seed``)."""
    from liger_align.testing import build_tiny_llama

    return build_tiny_llama(
        len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, seed=seed,
    )


def common_args(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """Training arguments of the trainer tests: CPU, fp32, 5 steps of 4, logged every step, nothing saved."""
    args = dict(
        output_dir=str(tmp), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=5,
        logging_steps=1, learning_rate=1e-3, report_to=[], save_strategy="no", max_length=48, use_cpu=True,
        bf16=False, seed=0, dataloader_num_workers=0,
    )
    args.update(overrides)
    return args


class Forbidden:
    """Stands in for TRL's chunked log-prob kernel: a liger trainer must never call it."""

    @staticmethod
    def apply(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("TRL's own chunked log-prob kernel was called by a liger trainer")


def no_logits_guard(model: torch.nn.Module) -> Any:
    """Fail if the output head ever returns ``[..., vocab]`` logits in training (a hook on the head)."""
    from liger_align.models.head_call import causal_lm

    head = causal_lm(model).get_output_embeddings()
    vocab = head.weight.shape[0]

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.shape[-1] == vocab:
            raise AssertionError(f"[tokens, vocab] logits {tuple(output.shape)} were built in training")

    return head.register_forward_hook(hook)


def assert_logs_match(expected: list[dict[str, Any]], actual: list[dict[str, Any]], rtol: float = 2e-4,
                      atol: float = 2e-5, discrete: bool = True) -> None:
    """Every numeric entry of TRL's log history is in ours, equal within tolerance.

    ``discrete=False`` only checks that the 0/1-valued accuracies are present (a near-tie flips them
    under bf16 rounding).
    """
    assert len(expected) == len(actual), (len(expected), len(actual))
    compared = 0
    for step, (want, got) in enumerate(zip(expected, actual)):
        for key, value in want.items():
            if key in SKIP_KEYS or not isinstance(value, (int, float)):
                continue
            assert key in got, f"entry {step}: metric {key!r} missing from the liger trainer's logs"
            if not discrete and "accurac" in key:
                continue
            assert math.isclose(got[key], value, rel_tol=rtol, abs_tol=atol), (
                f"entry {step}: {key} = {got[key]!r}, TRL logged {value!r}"
            )
            compared += 1
    assert compared > 20
    assert any(k.startswith("eval_") for k in expected[-1]), "no evaluation metrics were compared"


# ----------------------------------------------------------------------------- example tests

ALIGNMENT = REPO / "examples" / "alignment"
SCRIPTS = {
    "orpo": ALIGNMENT / "run_orpo.py",
    "dpo": ALIGNMENT / "run_dpo.py",
    "simpo": ALIGNMENT / "run_simpo.py",
    "kto": ALIGNMENT / "run_kto.py",
    "sft": REPO / "examples" / "sft" / "run_sft.py",
}
FEW_STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_size", "16",
             "--meter_warmup_steps", "1"]


def run_script(script: Path, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` with ``args`` in a fresh interpreter, plain-PyTorch dispatch on CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def example_module(name: str):
    """Example ``name`` of :data:`SCRIPTS` imported as a module (its ``__main__`` block does not run)."""
    return import_script(SCRIPTS[name], f"example_{name}")


def import_script(script: Path, module_name: str):
    """The example ``script`` imported as module ``module_name`` (its ``__main__`` block does not run), with the
    shared alignment helpers and the script's own folder importable."""
    import importlib.util

    for path in (ALIGNMENT, script.parent):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    spec = importlib.util.spec_from_file_location(module_name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def example_main(name: str):
    """The in-process entry point of example ``name``: a function of ``argv``."""
    module = example_module(name)
    if name == "sft":
        return module.main
    import common

    algorithm = getattr(module, name.upper())
    return lambda argv: common.main(algorithm, argv)


def gradient_path(hidden, weight) -> str:
    """The sequence losses' gradient path in force for a separable objective on these tensors: the one the
    ``loss_path`` fixture forces (asked of the strategy choice itself; no state is shared)."""
    from liger_align.kernels import LogitOptions
    from liger_align.losses import _sequences

    return _sequences.sequence_strategy("auto", hidden, weight, separable=True, group_rows=1, opts=LogitOptions())
