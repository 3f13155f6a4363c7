"""Test settings shared by the whole suite.

Without a GPU, Triton's interpreter is switched on *before* anything imports ``triton``, so every
Triton kernel is built for the interpreter and tests can run it on CPU tensors with ``impl="triton"``.
Automatic dispatch (``impl=None``) would then also pick the interpreter for every CPU tensor, which
is far too slow for model and trainer tests: outside tests marked ``interpreter``, automatic dispatch
is told the interpreter is off, so it takes the plain-PyTorch path on CPU (``impl="triton"`` still
runs the interpreter).

Every test starts from a seed derived from its node id (``seed``, autouse): a rerun of one test draws
the same numbers, whatever ran before it, and a failing test's report shows the seed it ran with.

Tiers: ``python -m pytest -q`` runs everything (CI); ``python -m pytest -q -m "not slow"`` is the quick
tier (trainer, distributed and example tests, and anything over a few seconds, are marked ``slow``).
"""

from __future__ import annotations

import importlib.util
import os
import random
import zlib

import pytest

HAS_CUDA = False
if importlib.util.find_spec("torch") is not None:
    import torch

    HAS_CUDA = torch.cuda.is_available()

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETER = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: str) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` in this process."""
    if not HAS_TRITON:
        return False
    return HAS_CUDA if device == "cuda" else INTERPRETER


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interpreter: keep TRITON_INTERPRET=1 set while the test runs")


def seed_of(nodeid: str) -> int:
    """The seed of the test ``nodeid``: a stable hash (CRC-32, not Python's salted ``hash``), < 2**31."""
    return zlib.crc32(nodeid.encode()) % 2**31


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Seed torch, ``random`` and numpy from the test id; the seed is shown in the report of a failure."""
    value = seed_of(request.node.nodeid)
    random.seed(value)
    if importlib.util.find_spec("numpy") is not None:
        import numpy

        numpy.random.seed(value)
    if importlib.util.find_spec("torch") is not None:
        torch.manual_seed(value)
    request.node.add_report_section("setup", "seed", f"seed = {value} (zlib.crc32 of {request.node.nodeid!r})")
    return value


@pytest.fixture(autouse=True)
def _dispatch_to_torch_on_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    if INTERPRETER and request.node.get_closest_marker("interpreter") is None:
        from liger_align.kernels import _dispatch

        monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    yield


@pytest.fixture(autouse=True)
def _revert_leftover_patches():
    """Undo every attribute patch a test left applied (e.g. an example run in-process patches
    ``modeling_llama.apply_rotary_pos_emb`` for the life of its process), so no test sees another's."""
    import sys

    handle_module = sys.modules.get("liger_align.models._handle")
    before = set(handle_module._REGISTRY) if handle_module is not None else set()
    yield
    handle_module = sys.modules.get("liger_align.models._handle")
    if handle_module is None:
        return
    with handle_module._LOCK:
        for key in set(handle_module._REGISTRY) - before:
            handle_module._restore(handle_module._REGISTRY.pop(key))


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("gpu") is not None and not HAS_CUDA:
        pytest.skip("needs a CUDA device")


@pytest.fixture(params=["grad_in_forward", "recompute"])
def loss_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per gradient path of the sequence losses: ``strategy="auto"`` is forced to it
    (where the objective is separable; a non-separable one keeps recompute)."""
    from liger_align.losses import _sequences

    real = _sequences.sequence_strategy
    path = request.param

    def forced(strategy, *args, separable, **kwargs):
        if strategy == "auto" and separable:
            strategy = path
        return real(strategy, *args, separable=separable, **kwargs)

    monkeypatch.setattr(_sequences, "sequence_strategy", forced)
    return path
