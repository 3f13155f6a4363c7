"""Reliability of the alignment examples (issue 12): output folders, early flag checks, malformed data,
and a clean console (no deprecation or notice that does not concern the user)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from _helpers import ALIGNMENT, FEW_STEPS, REPO, SCRIPTS
from _helpers import example_main as _main
from _helpers import example_module as _module

if str(ALIGNMENT) not in sys.path:
    sys.path.insert(0, str(ALIGNMENT))


pytestmark = pytest.mark.slow


def test_output_dir_is_refused_overwritten_or_resumed(tmp_path: Path) -> None:
    import common

    main = _main("orpo")
    out = tmp_path / "out"
    saving = [*FEW_STEPS, "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out)]
    assert main(saving)["steps"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(ValueError, match=r"not empty \(checkpoints \['checkpoint-1', 'checkpoint-2'\]\).*"
                                         r"--resume_from_checkpoint last.*--overwrite_output_dir"):
        main(saving)
    longer = [a if a != "2" else "3" for a in saving]  # --max_steps 3
    summary = main([*longer, "--resume_from_checkpoint", "last"])
    assert summary["steps"] == 3
    assert len((out / "steps.jsonl").read_text().splitlines()) == 1  # one new step, after checkpoint-2
    assert main([*saving, "--overwrite_output_dir"])["steps"] == 2
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        main([*saving, "--resume_from_checkpoint", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="no checkpoint-\\* folder"):
        main([*FEW_STEPS, "--output_dir", str(tmp_path / "empty"), "--resume_from_checkpoint", "last"])
    # the embedded demo (no --output_dir) reruns into its default folder
    args, _ = common.parse_args(_module("orpo").ORPO, [])
    assert args.overwrite_output_dir is True
    args, _ = common.parse_args(_module("orpo").ORPO, ["--output_dir", str(out)])
    assert args.overwrite_output_dir is False


BAD_FLAGS = [
    (["--max_length", "0"], r"--max_length must be an integer >= 1 \(or unset\), got 0"),
    (["--max_length", "-4"], "--max_length"),
    (["--max_length", "32", "--max_completion_length", "32"], "--max_completion_length .* smaller than --max_length"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be an integer >= 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--max_steps", "0"], r"--max_steps must be -1 .* or an integer >= 1, got 0"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be a number > 0"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--eval_size", "0"], "--eval_size"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_before_loading(flags, message, tmp_path: Path, monkeypatch) -> None:
    import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("data were loaded before the flags were checked")

    monkeypatch.setattr(loading, "load_raw_dataset", no_loading)
    with pytest.raises(ValueError, match=message):
        _main("simpo")([*flags, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})] * 3
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(rows[:2] + ['{"prompt": "q", "chosen": "a",'] + rows[2:]) + "\n")
    with pytest.raises(ValueError, match=r"line 3 is not valid JSON"):
        _main("dpo")(["--dataset_name", str(path), "--output_dir", str(tmp_path / "out")])
    path.write_text("\n".join(rows + ["[1, 2]"]) + "\n")
    with pytest.raises(ValueError, match=r"line 4 must be a JSON object"):
        _main("dpo")(["--dataset_name", str(path), "--output_dir", str(tmp_path / "out")])


def test_checkpointing_flag_uses_this_transformers_name_without_warning() -> None:
    import dataclasses

    import common
    from trl import DPOConfig

    algorithm = _module("dpo").DPO
    new_name = "activation_checkpointing" in {f.name for f in dataclasses.fields(DPOConfig)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, embedded_config = common.parse_args(algorithm, [])
        _, real_config = common.parse_args(algorithm, ["--model_name_or_path", "some/model", "--bf16", "False"])
    assert embedded_config.gradient_checkpointing is False  # the embedded default: off
    assert real_config.gradient_checkpointing is True  # TRL's default kept for a real model
    if new_name:
        assert embedded_config.activation_checkpointing is False and real_config.activation_checkpointing is True
    _, config = common.parse_args(algorithm, ["--gradient_checkpointing", "True"])
    assert config.gradient_checkpointing is True  # the user's (old) flag is honoured


@pytest.mark.parametrize("name", ["orpo", "dpo"])
def test_a_clean_run_prints_no_notice_that_does_not_concern_the_user(name: str, tmp_path: Path) -> None:
    """No deprecation of our own calls, no TRL experimental notice, no collator/pin-memory/accelerator notice."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRL_EXPERIMENTAL_SILENCE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(SCRIPTS[name]), *FEW_STEPS, "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    text = result.stdout + result.stderr
    for notice in ("Warning", "deprecated", "trl.experimental", "remove_unused_columns", "pin_memory",
                   "Setting accelerator to CPU"):
        assert notice not in text, (notice, [line for line in text.splitlines() if notice in line])


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_a_null_value_is_named_with_its_row_in_the_file(name: str, tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": None if i == 5 else f"b{i}"} for i in range(20)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(TypeError, match=r"the data set row 5, column 'rejected': expected a string .*NoneType None"):
        _main(name)(["--dataset_name", str(path), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
