"""Every non-alignment example refuses a non-empty ``--output_dir`` before loading anything (issue 22, item 6).

Each script runs in a subprocess, as a user runs it: the refusal is one ``error: ...`` line on stderr and
exit status 2 (argparse's), and comes after the imports only, so each run takes import time. The user's
file is left where it was. ``--overwrite_output_dir`` is accepted (parsed, and the check lets it through).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

EXAMPLES = {
    "sft": "examples/sft/run_sft.py",
    "qwen2_vl": "examples/vlm/run_qwen2_vl.py",
    "dpo_vlm": "examples/vlm/run_dpo_vlm.py",
    "medusa": "examples/medusa/train.py",
    "lightning": "examples/lightning/training.py",
}


def _run(script: str, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_non_empty_output_dir_is_refused(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's file\n")
    result = _run(EXAMPLES[name], ["--output_dir", str(out)])
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "overwrite_output_dir" in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(out) in errors[0] and "not empty" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written, nothing deleted
    assert (out / "notes.txt").read_text() == "the user's file\n"


def _module(name: str):
    """The example imported as a module (its ``__main__`` block does not run)."""
    import importlib.util

    for path in (REPO / "examples" / "alignment", REPO / Path(EXAMPLES[name]).parent):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    spec = importlib.util.spec_from_file_location(f"output_dir_example_{name}", REPO / EXAMPLES[name])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_overwrite_flag_accepts_a_non_empty_dir(name: str, tmp_path: Path) -> None:
    """With ``--overwrite_output_dir`` the check passes (in-process, so nothing is trained)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    module = _module(name)
    import preflight
    argv = ["--output_dir", str(out), "--overwrite_output_dir"]
    if name == "lightning":
        args = config = module.parse_args(argv)
    else:
        import common

        script_class = {
            "sft": "SFTScriptArguments", "qwen2_vl": "VLMScriptArguments", "dpo_vlm": "DPOVLMScriptArguments",
            "medusa": "MedusaScriptArguments",
        }[name]
        config_class = {
            "sft": "TrainingArguments", "qwen2_vl": "TrainingArguments", "dpo_vlm": "DPOConfig",
            "medusa": "MedusaTrainingArguments",
        }[name]
        args, config = common.parse_script_and_config(
            getattr(module, script_class), getattr(module, config_class), name=name, embedded_defaults={}, argv=argv
        )
    assert args.overwrite_output_dir is True
    assert preflight.check_output_dir_or_exit(config, overwrite=args.overwrite_output_dir) is None
    assert (out / "notes.txt").read_text() == "kept"
    with pytest.raises(SystemExit) as refused:
        preflight.check_output_dir_or_exit(config, overwrite=False)
    assert refused.value.code == 2


def test_resume_without_a_checkpoint_says_how_to_make_a_run_resumable(tmp_path: Path) -> None:
    """``--resume_from_checkpoint last`` after a default run (which saves no checkpoint-*): the error says which
    flags make a run resumable."""
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "examples" / "alignment"))
    from preflight import check_output_dir

    (tmp_path / "model.safetensors").write_text("")
    config = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint="last")
    with pytest.raises(ValueError, match=r"no checkpoint-\* folder .*--save_strategy steps --save_steps N"):
        check_output_dir(config, overwrite=False)
    (tmp_path / "checkpoint-3").mkdir()
    assert check_output_dir(config, overwrite=False) == str(tmp_path / "checkpoint-3")
