"""One subprocess per run, for the whole-training benchmarks (sft, trainers, vlm, lightning).

Each (shape, arm) runs in a fresh interpreter so that its peak memory is its own: the script is started
again with ``--worker --worker-out FILE`` and its own flags, writes its measurement to ``FILE`` as JSON, and
the driver reads it back. Timing, schema and plots are ``_runner``'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def worker_env(*, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The parent's environment with the repository on ``PYTHONPATH``, quiet tokenizers/TRL, ``extra`` set."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p), **extra}
    for name in drop:
        env.pop(name, None)
    return env


def run_worker(script: str | Path, args: list[str], out: Path, *, timeout: float,
               env: dict[str, str] | None = None) -> tuple[Any, str | None, float]:
    """Run ``python script --worker --worker-out out *args``; returns ``(the JSON it wrote or None, failure text or
    None, wall seconds)``. A non-zero exit, a missing file or a timeout is a failure (the output's tail)."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), "--worker", "--worker-out", str(out), *args]
    began = time.time()
    try:
        proc = subprocess.run(cmd, env=env or worker_env(), capture_output=True, text=True, timeout=max(1, timeout))
        tail = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
        failure = None if proc.returncode == 0 and out.exists() else (tail or f"exit code {proc.returncode}")
    except subprocess.TimeoutExpired as err:
        text = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        failure = f"timed out after {timeout:.0f} s: {text[-1500:]}".strip()
    data = json.loads(out.read_text()) if out.exists() else None
    return data, failure, time.time() - began


def is_oom(text: str | BaseException) -> bool:
    """Whether an exception or a failure text is an out-of-memory."""
    if isinstance(text, BaseException):
        import torch

        if isinstance(text, torch.OutOfMemoryError):
            return True
    return "out of memory" in str(text).lower() or "OutOfMemoryError" in str(text)
