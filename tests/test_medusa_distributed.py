"""Medusa heads under 2-process CPU FSDP2 (gloo): the saved heads are non-empty and equal the single-process ones.

Each run is a subprocess of tests/distributed/medusa_distributed.py (see its docstring).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "distributed" / "medusa_distributed.py"
ROOT = SCRIPT.parents[2]


pytestmark = pytest.mark.slow


def launch(mode: str, tmp: Path, nproc: int) -> dict:
    out = tmp / f"{mode}.json"
    cmd = [sys.executable, str(SCRIPT), "--mode", mode, "--out", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_fsdp2_saves_the_same_heads_as_one_process(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    single, sharded = launch("single", tmp_path, 1), launch("fsdp2", tmp_path, 2)
    assert sharded["world"] == 2 and sharded["head_type"] == "DTensor"
    assert sharded["head_local_numel"] < sharded["head_full_numel"], "the Medusa head was not sharded"
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    want, got = load_file(single["heads"]), load_file(sharded["heads"])
    assert list(got) == list(want) and len(got) == 3 * 3
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape and got[key].numel() > 0, key
        torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-6)
    trained = load_file(single["heads"])["0.0.linear.weight"]
    assert trained.abs().sum() > 0, "the ResBlock did not train (it starts at zero)"
