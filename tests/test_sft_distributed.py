"""The patched forward's fused loss under sharding: SFT of a tiny Llama patched with ``apply_liger_kernel``,
2 CPU processes (gloo) under DeepSpeed ZeRO-3 (``Trainer.train``), FSDP2 (``fully_shard``) and FSDP1 (the
trainer's ``compute_loss`` on the sharded module), against one process at the same global batch; a dispatch
spy on every rank proves no ``(N, V)`` logits were built. See tests/distributed/sft_distributed.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "distributed" / "sft_distributed.py"
ROOT = SCRIPT.parents[2]


pytestmark = pytest.mark.slow


def launch(mode: str, tmp: Path, nproc: int) -> dict:
    out = tmp / f"{mode}.json"
    if out.exists():
        return json.loads(out.read_text())
    cmd = [sys.executable, str(SCRIPT), "--mode", mode, "--out", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sft_distributed")


def check_no_logits(result: dict) -> None:
    for rank in result["ranks"]:
        assert rank["vocab_tensor_max_dims"] == 2, f"a (B, T, V) logits tensor was built: {rank['largest_vocab_shape']}"
        assert rank["largest_vocab_tensor"] <= rank["max_micro_batch_valid_tokens"] * rank["vocab"], rank


def check_matches(sharded: dict, single: dict) -> None:
    assert sharded["world"] == 2
    assert sharded["head_local_numel"] < sharded["head_full_numel"], "the head weight was not sharded"
    assert len(sharded["losses"]) == 3 and sharded["losses"][-1] < sharded["losses"][0]
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert sharded["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-5)
    check_no_logits(sharded)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero3_trainer_matches_single_process(tmp: Path) -> None:
    single = launch("single", tmp, 1)
    check_no_logits(single)
    zero3 = launch("zero3", tmp, 2)
    assert zero3["wrapper"] == "DeepSpeedEngine"
    check_matches(zero3, single)


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_fsdp_matches_single_process(mode: str, tmp: Path) -> None:
    single = launch("manual-single", tmp, 1)
    check_no_logits(single)
    check_matches(launch(mode, tmp, 2), single)
