"""The vision-language examples: the embedded Qwen2-VL SFT run learns the colours, the
unpatched and the data-file paths run, and DPO on image pairs runs and saves. Each script runs in a
subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLM = REPO / "examples" / "vlm"
SFT, DPO = VLM / "run_qwen2_vl.py", VLM / "run_dpo_vlm.py"
if str(VLM) not in sys.path:
    sys.path.insert(0, str(VLM))

import vlm_embedded as embedded  # noqa: E402

pytestmark = pytest.mark.slow


def run(script: Path, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def load_saved(output_dir: Path) -> dict:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(output_dir)
    assert model.config.model_type == "qwen2_vl"
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    return json.loads((output_dir / "run_summary.json").read_text())


@pytest.mark.slow
def test_embedded_sft_learns_the_colours_quickly(tmp_path: Path) -> None:
    began = time.perf_counter()
    result = run(SFT, ["--output_dir", str(tmp_path / "out")], cwd=tmp_path)
    seconds = time.perf_counter() - began
    assert result.returncode == 0, result.stderr[-4000:]
    summary = load_saved(tmp_path / "out")
    start, end = summary["start"]["colour_accuracy"], summary["end"]["colour_accuracy"]
    assert 0.2 <= start <= 0.47, start  # blind to the image: about one colour in three
    assert end >= 0.9, end
    assert summary["end"]["eval_loss"] < summary["start"]["eval_loss"]
    assert summary["patched"]["layer_norm"].startswith("patched") and "liger_align: qwen2_vl" in result.stdout
    assert summary["meter"]["tokens_per_s"] > 0 and "step meter" in result.stdout
    print(f"the embedded example took {seconds:.0f} s")  # reported, not asserted: CPU load varies


def test_unpatched_sft_and_a_data_file(tmp_path: Path) -> None:
    """``--no-use_liger`` with a user's jsonl of image paths (relative to the file) for a few steps."""
    rows = embedded.caption_rows(12, seed=5)
    (tmp_path / "images").mkdir()
    lines = []
    for i, row in enumerate(rows):
        row["image"].save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "prompt": row["prompt"], "completion": row["completion"]}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--no-use_liger", "--dataset_name", str(tmp_path / "captions.jsonl"), "--eval_size", "4",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "out"),
            "--meter_warmup_steps", "1"]
    result = run(SFT, args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = load_saved(tmp_path / "out")
    assert summary["steps"] == 2 and summary["trainer"] == "Trainer" and summary["eval_rows"] == 4
    assert "colour_accuracy" not in summary["start"]


def test_dpo_on_image_pairs_runs_and_saves(tmp_path: Path) -> None:
    args = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--train_pairs", "8", "--eval_pairs", "4",
            "--output_dir", str(tmp_path / "out"), "--meter_warmup_steps", "1"]
    result = run(DPO, args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = load_saved(tmp_path / "out")
    assert summary["trainer"] == "LigerDPOTrainer" and summary["steps"] == 2
    assert 0.0 <= summary["end"]["image_preference_accuracy"] <= 1.0
    assert "eval_rewards/margins" in summary["end"] and "liger_align: qwen2_vl" in result.stdout
