"""Every non-alignment example saves, in ``--output_dir``, what a user reloads with transformers' Auto classes
(issue 22, item 8), and the reloaded model is the trained one.

Each example runs in-process with its smallest settings, and the model it trained is kept (the test wraps the
function that saves it). A fresh interpreter that never imports liger_align then reloads the folder:
``AutoModelForCausalLM`` / ``AutoModelForImageTextToText`` and ``AutoTokenizer`` / ``AutoProcessor``; it builds
one batch with the reloaded tokenizer or processor (an image, for the VLMs) and writes the batch and the
logits. Here the trained model's logits on that batch must match, and the reloaded parameters must equal the
trained ones. Medusa: the base model reloads with ``AutoModelForCausalLM``, the heads with the example's own
``load_trained``.

Qwen2-VL's processor needs torchvision (its video processor). With torchvision ``AutoProcessor`` must return a
``Qwen2VLProcessor``; without it (the CI machine) ``AutoProcessor`` must fail on torchvision alone, and the
folder's ``AutoImageProcessor`` and ``AutoTokenizer`` make the batch through the example's collator.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import import_script

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCRIPTS = {
    "sft": EXAMPLES / "sft" / "run_sft.py",
    "qwen2_vl": EXAMPLES / "vlm" / "run_qwen2_vl.py",
    "dpo_vlm": EXAMPLES / "vlm" / "run_dpo_vlm.py",
    "medusa": EXAMPLES / "medusa" / "train.py",
    "lightning": EXAMPLES / "lightning" / "training.py",
}
HF_SMALL = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--meter_warmup_steps", "1"]
SMALL = {
    "sft": [*HF_SMALL, "--eval_size", "8"],
    "qwen2_vl": [*HF_SMALL, "--train_images", "8", "--eval_images", "4"],
    "dpo_vlm": [*HF_SMALL, "--train_pairs", "8", "--eval_pairs", "4"],
    "medusa": [*HF_SMALL, "--embedded_conversations", "48", "--eval_size", "8"],
    "lightning": ["--accelerator", "cpu", "--log_every", "0", "--max_steps", "2", "--batch_size", "8",
                  "--precision", "32-true"],
}
TEXT = "Question : which one is red ? Answer : A"  # a few tokens of any embedded vocabulary (<unk> is fine)

pytestmark = pytest.mark.slow

# The reloading side: plain transformers (and the example's collator, which imports no liger_align).
RELOAD = textwrap.dedent('''
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    job = json.loads(sys.argv[1])
    out = {}
    if job["kind"] == "causal":
        model = AutoModelForCausalLM.from_pretrained(job["model"]).eval()
        tokenizer = AutoTokenizer.from_pretrained(job["processor"])
        batch = dict(tokenizer([job["text"]], return_tensors="pt"))
        out["tokenizer_class"] = type(tokenizer).__name__
    else:
        from PIL import Image
        from transformers import AutoImageProcessor, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(job["model"]).eval()
        image = Image.open(job["image"]).convert("RGB")
        try:
            processor = AutoProcessor.from_pretrained(job["processor"])
        except ImportError as err:  # Qwen2-VL's video processor needs torchvision
            out["processor_error"] = str(err)
            from vlm_collator import VisionSFTCollator, uses_mm_token_type_ids

            collator = VisionSFTCollator(AutoTokenizer.from_pretrained(job["processor"]),
                                         AutoImageProcessor.from_pretrained(job["processor"]),
                                         mm_token_type_ids=uses_mm_token_type_ids(model))
            batch = collator([{"image": image, "prompt": job["prompt"], "completion": job["completion"]}])
            batch.pop("labels")
            out["image_processor_class"] = type(collator.image_processor).__name__
        else:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": job["prompt"]}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True) + job["completion"]
            batch = dict(processor(images=[image], text=[text], return_tensors="pt"))
            out["image_processor_class"] = type(processor.image_processor).__name__
        out["processor_class"] = type(processor).__name__ if "processor_error" not in out else None
    with torch.no_grad():
        logits = model(**batch).logits
    out["model_class"] = type(model).__name__
    out["liger_align_imported"] = any(m.split(".")[0] == "liger_align" for m in sys.modules)
    torch.save({"batch": batch, "logits": logits, "state": model.state_dict()}, job["result"])
    print(json.dumps(out))
''')


def reload_in_fresh_python(tmp_path: Path, **job: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run :data:`RELOAD` on ``job``; (what it printed, the saved batch / logits / state dict)."""
    job["result"] = str(tmp_path / "reloaded.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(EXAMPLES / "vlm"))  # the collator; liger_align is not on it
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(job)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["liger_align_imported"] is False
    return info, torch.load(job["result"], weights_only=False)


def load_example(name: str):
    """The example as a module (its ``__main__`` block does not run), under a name of its own."""
    return import_script(SCRIPTS[name], f"reload_example_{name}")


def train(name: str, out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> tuple[dict[str, Any], Any]:
    """Run example ``name`` into ``out``; (its summary, the model it trained and saved)."""
    module = load_example(name)
    kept: dict[str, Any] = {}
    if name == "lightning":
        save = module.save_hf_model

        def keep(trainer, lightning_module, *args, **kwargs):
            kept["model"] = lightning_module.model
            return save(trainer, lightning_module, *args, **kwargs)

        monkeypatch.setattr(module, "save_hf_model", keep)
    else:
        import common

        finish = common.finish_run

        def keep(trainer, *args, **kwargs):
            kept["model"] = trainer.model
            return finish(trainer, *args, **kwargs)

        monkeypatch.setattr(common, "finish_run", keep)
    summary = module.main([*SMALL[name], *extra, "--output_dir", str(out)])
    return summary, kept["model"].eval()


def assert_same_parameters(trained: torch.nn.Module, reloaded: dict[str, torch.Tensor]) -> None:
    """Every reloaded tensor equals the trained model's tensor of that name (the Medusa heads aside)."""
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("medusa_head.")}
    assert set(reloaded) == set(state), sorted(set(state) ^ set(reloaded))
    for key, value in reloaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


@torch.no_grad()
def assert_same_logits(trained: torch.nn.Module, result: dict[str, Any]) -> None:
    logits = trained(**result["batch"]).logits
    assert torch.isfinite(result["logits"]).all()
    torch.testing.assert_close(result["logits"], logits.float(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------- causal LMs


@pytest.mark.parametrize("name", ["sft", "lightning"])
def test_causal_lm_output_reloads(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    summary, trained = train(name, out, monkeypatch)
    assert summary["steps"] == 2
    assert {"model.safetensors", "config.json", "tokenizer.json", "run_summary.json"} <= {p.name for p in out.iterdir()}
    info, result = reload_in_fresh_python(tmp_path, kind="causal", model=str(out), processor=str(out), text=TEXT)
    assert info["model_class"] == type(trained).__name__
    assert_same_parameters(trained, result["state"])
    assert_same_logits(trained, result)
    if name == "lightning":  # training turns the cache off; the saved config has it as the model had it
        assert json.loads((out / "config.json").read_text())["use_cache"] is True


# ----------------------------------------------------------------------------------------- Medusa


@pytest.mark.parametrize("stage", [1, 2])
def test_medusa_output_reloads(stage: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 (the embedded default's) saves the unchanged base model in ``base_model/``; stage 2 the trained
    model in the folder. The heads reload through the example's ``load_trained``."""
    out = tmp_path / "out"
    extra = ["--medusa_only_heads", "false"] if stage == 2 else []
    summary, trained = train("medusa", out, monkeypatch, *extra)
    assert summary["stage"] == stage
    config = json.loads((out / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and (out / "medusa_lm_head.safetensors").is_file()
    base = out if stage == 2 else out / "base_model"
    assert (base / "model.safetensors").is_file() and (out / "model.safetensors").exists() == (stage == 2)
    if stage == 1:
        assert Path(config["base_model_name_or_path"]) == base.resolve()
    info, result = reload_in_fresh_python(tmp_path, kind="causal", model=str(base), processor=str(out), text=TEXT)
    assert info["model_class"] == "LlamaForCausalLM"
    assert_same_parameters(trained, result["state"])
    assert_same_logits(trained, result)

    example = sys.modules["reload_example_medusa"]
    model, tokenizer = example.load_trained(out)
    assert tokenizer(TEXT)["input_ids"] == result["batch"]["input_ids"][0].tolist()
    hidden = torch.randn(5, model.config.hidden_size)
    with torch.no_grad():
        for k in range(3):
            torch.testing.assert_close(model.medusa_head[k](hidden), trained.medusa_head[k](hidden), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- vision-language


@pytest.mark.parametrize("name", ["qwen2_vl", "dpo_vlm"])
def test_vlm_output_reloads_with_its_processor(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    summary, trained = train(name, out, monkeypatch)
    assert summary["steps"] == 2
    config = json.loads((out / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2VLProcessor"
    assert config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert json.loads((out / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"

    embedded = sys.modules["vlm_embedded"]
    row = embedded.caption_rows(1, seed=3)[0]
    row["image"].save(tmp_path / "image.png")
    info, result = reload_in_fresh_python(
        tmp_path, kind="vlm", model=str(out), processor=str(out), image=str(tmp_path / "image.png"),
        prompt=row["prompt"], completion=row["completion"],
    )
    assert info["model_class"] == "Qwen2VLForConditionalGeneration"
    if importlib.util.find_spec("torchvision") is not None:
        assert info["processor_class"] == "Qwen2VLProcessor", info
    else:
        assert "Torchvision" in info["processor_error"], info
        assert info["image_processor_class"] == "Qwen2VLImageProcessorPil", info
    batch = result["batch"]
    image_token = trained.config.image_token_id
    assert int((batch["input_ids"] == image_token).sum()) == int(batch["image_grid_thw"].prod()) // 4  # merge 2x2
    assert_same_parameters(trained, result["state"])
    assert_same_logits(trained, result)
