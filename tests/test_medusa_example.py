"""examples/medusa/train.py: the embedded default learns (head-k held-out top-1 from < 0.1 to >= 0.8),
Medusa's flags do what they say, and bad flags fail early."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "medusa" / "train.py"


pytestmark = pytest.mark.slow


def load_example():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    spec = importlib.util.spec_from_file_location("medusa_example", SCRIPT)
    module = sys.modules.setdefault("medusa_example", importlib.util.module_from_spec(spec))
    if not hasattr(module, "main"):
        spec.loader.exec_module(module)
    return module


def test_embedded_default_learns_the_ring(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["stage"] == 1 and summary["medusa_num_heads"] == 3
    print(f"training took {summary['train_seconds']:.0f} s")  # reported, not asserted: CPU load varies
    for k in (1, 2, 3):
        assert summary["top1_start"][k] < 0.1 and summary["top1_end"][k] >= 0.8, (k, summary)
    assert summary["meter"]["steps_measured"] > 0 and summary["meter"]["tokens_per_s"] > 0
    assert "medusa head 3 (t+4)" in proc.stdout and "StepMeter" in proc.stdout
    assert (out / "medusa_lm_head.safetensors").is_file() and not (out / "model.safetensors").exists()


def test_flags_do_what_they_say(tmp_path: Path) -> None:
    example = load_example()
    summary = example.main([
        "--output_dir", str(tmp_path), "--max_steps", "2", "--medusa_num_heads", "2", "--medusa_num_layers", "0",
        "--medusa_only_heads", "false", "--no-use_liger", "--medusa_scheduler", "sine", "--embedded_conversations",
        "48", "--logging_steps", "1", "--medusa_decay_coefficient", "0.5",
    ])
    assert summary["stage"] == 2 and summary["steps"] == 2 and "materialised logits" in summary["trainer"]
    assert len(summary["top1_end"]) == 3
    from safetensors import safe_open

    with safe_open(str(tmp_path / "medusa_lm_head.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["0.0.weight", "1.0.weight"]
    assert (tmp_path / "model.safetensors").is_file()  # stage 2 saves the model too
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 2 and config["model_type"] == "llama"


def test_bad_flags_fail_early(tmp_path: Path) -> None:
    example = load_example()
    with pytest.raises(ValueError, match="medusa_scheduler"):
        example.main(["--output_dir", str(tmp_path), "--medusa_scheduler", "cosine"])
    with pytest.raises(ValueError, match="medusa_num_heads"):
        example.main(["--output_dir", str(tmp_path), "--medusa_num_heads", "0"])
    with pytest.raises(ValueError, match="conversations"):
        example.to_messages({"text": "x"})
    with pytest.raises(ValueError, match="speaker"):
        example.to_messages({"conversations": [{"from": "robot", "value": "x"}]})
