"""Reliability of the alignment examples (issue 12): output folders, early flag checks, malformed data,
and a clean console (no deprecation or notice that does not concern the user).

A refused flag, folder or data set raises ``preflight.FlagError`` in-process (a ``ValueError``; the path and
type refusals are also ``FileNotFoundError`` / ``TypeError``); from the command line it is one line
``<prog>: error: ...`` and exit status 2 (here: ``main`` with ``argv=None``; subprocess runs in
``test_example_flag_errors.py``)."""

from __future__ import annotations

import json
import os
import re
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

from preflight import FlagError, FlagPathError, FlagTypeError  # noqa: E402

pytestmark = pytest.mark.slow


def test_output_dir_is_refused_overwritten_or_resumed(tmp_path: Path) -> None:
    import common

    main = _main("orpo")
    out = tmp_path / "out"
    saving = [*FEW_STEPS, "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out)]
    assert main(saving)["steps"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(FlagError, match=r"not empty \(checkpoints \['checkpoint-1', 'checkpoint-2'\]\).*"
                                        r"--resume_from_checkpoint last.*--overwrite_output_dir"):
        main(saving)
    longer = [a if a != "2" else "3" for a in saving]  # --max_steps 3
    summary = main([*longer, "--resume_from_checkpoint", "last"])
    assert summary["steps"] == 3
    assert len((out / "steps.jsonl").read_text().splitlines()) == 1  # one new step, after checkpoint-2
    assert main([*saving, "--overwrite_output_dir"])["steps"] == 2
    with pytest.raises(FlagPathError, match="no such checkpoint folder"):  # a FileNotFoundError too
        main([*saving, "--resume_from_checkpoint", str(tmp_path / "nowhere")])
    with pytest.raises(FlagError, match="no checkpoint-\\* folder"):
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
    (["--eval_size", "2.5"], "--eval_size must be a fraction in \\(0, 1\\) or a whole number of rows >= 1"),
    (["--dtype", "fp8"], "--dtype must be one of auto, bfloat16, float16, float32"),
    (["--meter_warmup_steps", "-1"], "--meter_warmup_steps must be an integer >= 0"),
    (["--report_to", "nowhere"], "--report_to: nowhere is not supported"),
    (["--beta", "0"], "LigerCPOTrainer: config beta must be a finite number > 0"),  # the trainer's own check
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_before_loading(flags, message, tmp_path: Path, monkeypatch, capsys) -> None:
    import common
    import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("data were loaded before the flags were checked")

    monkeypatch.setattr(loading, "load_raw_dataset", no_loading)
    argv = [*flags, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(FlagError, match=message):  # in-process (argv given): the exception
        _main("simpo")(argv)
    # from the command line (argv=None): one line "<prog>: error: ...", exit status 2, no traceback
    monkeypatch.setattr(sys, "argv", ["run_simpo.py", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        common.main(_module("simpo").SIMPO)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("run_simpo.py: error: ") and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


def test_argparse_errors_exit_with_one_line_in_process(capsys) -> None:
    """What argparse refuses (an unknown flag, a bad type, Liger-Kernel's switch) exits 2 in-process too;
    a combination the config's ``__post_init__`` refuses is a FlagError naming the flag."""
    import common

    algorithm = _module("orpo").ORPO
    cases = [
        (["--max_lenght", "8"], "unrecognized arguments: --max_lenght 8 (did you mean --max_length?)"),
        (["--beta", "x"], "argument --beta: invalid float value: 'x'"),
        (["--use_liger_kernel"], "liger-align is on by default (--use_liger)"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exit_:
            common.parse_args(algorithm, argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and ": error: " in err[0] and needle in err[0], err
    with pytest.raises(FlagError, match=r"^--bf16: Your setup doesn't support bf16"):
        common.parse_args(algorithm, ["--bf16", "True"])


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})] * 3
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(rows[:2] + ['{"prompt": "q", "chosen": "a",'] + rows[2:]) + "\n")
    with pytest.raises(FlagError, match=r"line 3 is not valid JSON"):
        _main("dpo")(["--dataset_name", str(path), "--output_dir", str(tmp_path / "out")])
    path.write_text("\n".join(rows + ["[1, 2]"]) + "\n")
    with pytest.raises(FlagError, match=r"line 4 must be a JSON object"):
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
    # the step meter's figures are of one statistic, named in the printed line and in run_summary.json
    meter = json.loads((tmp_path / "out" / "run_summary.json").read_text())["meter"]
    assert meter["statistic"] == "median step" and "mean_step_s" not in meter
    assert "median step: " in result.stdout and "tokens/s" in result.stdout
    text = result.stdout + result.stderr
    for notice in ("Warning", "deprecated", "trl.experimental", "remove_unused_columns", "pin_memory",
                   "Setting accelerator to CPU"):
        assert notice not in text, (notice, [line for line in text.splitlines() if notice in line])


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_a_null_value_is_named_with_its_row_in_the_file(name: str, tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": None if i == 5 else f"b{i}"} for i in range(20)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    message = r"the data set row 5, column 'rejected': expected a string .*NoneType None"
    with pytest.raises(FlagTypeError, match=message):  # a TypeError too
        _main(name)(["--dataset_name", str(path), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
