"""LigerORPOTrainer under 2-process CPU runs (gloo) reaches the single-process losses: DDP and
DeepSpeed ZeRO-3 through accelerate,
FSDP2 (``fully_shard``) and FSDP1 with the head weight sharded. Each run is a subprocess
of tests/distributed/orpo_distributed.py (see its docstring for why FSDP is applied by hand on CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "distributed" / "orpo_distributed.py"
ROOT = SCRIPT.parents[2]


pytestmark = pytest.mark.slow


def launch(mode: str, tmp: Path, nproc: int) -> dict:
    out = tmp / f"{mode}.json"
    cmd = [sys.executable, str(SCRIPT), "--mode", mode, "--out", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


def test_ddp_matches_single_process(tmp: Path) -> None:
    single, ddp = launch("single", tmp, 1), launch("ddp", tmp, 2)
    assert ddp["world"] == 2 and ddp["wrapper"] == "DistributedDataParallel"
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero3_matches_single_process(tmp: Path) -> None:
    reference = tmp / "single.json"
    single = json.loads(reference.read_text()) if reference.exists() else launch("single", tmp, 1)
    zero3 = launch("zero3", tmp, 2)
    assert zero3["world"] == 2 and zero3["wrapper"] == "DeepSpeedEngine"
    assert zero3["head_local_numel"] < zero3["head_full_numel"], "the head weight was not partitioned"
    assert zero3["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_fsdp_matches_single_process(mode: str, tmp: Path) -> None:
    reference = tmp / "manual-single.json"
    single = json.loads(reference.read_text()) if reference.exists() else launch("manual-single", tmp, 1)
    sharded = launch(mode, tmp, 2)
    assert sharded["world"] == 2
    assert sharded["head_local_numel"] < sharded["head_full_numel"], "the head weight was not sharded"
    assert len(sharded["losses"]) == 3 and sharded["losses"][-1] < sharded["losses"][0]
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)
