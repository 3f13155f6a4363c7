"""Flag errors of the alignment scripts (issue 22, item 10): one line ``<prog>: error: <message>`` on stderr,
exit status 2 and no traceback, as argparse does; the flags that need no torch or transformers are checked
before those are imported. ``--help`` is short and says which Liger switch to use; ``--help-all`` has every flag.

The scripts run in a subprocess, as a user runs them. The checks before the imports take a fraction of a
second (quick tier); a run that reaches the parser imports torch, transformers and TRL first (``slow``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from _helpers import ALIGNMENT, SCRIPTS, run_script

if str(ALIGNMENT) not in sys.path:
    sys.path.insert(0, str(ALIGNMENT))


def _assert_one_error_line(result, script: str, *needles: str, progress: bool = False) -> str:
    """Exit status 2, stderr exactly one line ``<script>: error: ...`` holding every needle; returns the line.

    ``progress``: the run loaded data first, so ``datasets``' progress bars (tqdm lines) may precede the error.
    """
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if progress:
        lines = [line for line in lines if not re.search(r"\d+ examples/s\]|\?\s*examples/s\]", line)]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"{Path(script).name}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ before the heavy imports

EARLY = [
    ("orpo", ["--max_length", "0"], "--max_length must be an integer >= 1 (or unset), got 0"),
    ("orpo", ["--max-length=abc"], "--max_length must be an integer >= 1"),
    ("dpo", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be an integer >= 1"),
    ("kto", ["--gradient_accumulation_steps", "-1"], "--gradient_accumulation_steps"),
    ("simpo", ["--max_steps", "0"], "--max_steps must be -1"),
    ("orpo", ["--num_train_epochs", "0"], "--num_train_epochs must be a number > 0 (or set --max_steps)"),
    ("orpo", ["--learning_rate", "nan"], "--learning_rate must be a finite number >= 0, got nan"),
    ("orpo", ["--logging_steps", "0"], "--logging_steps must be a number > 0"),
    ("orpo", ["--warmup_steps", "-1"], "--warmup_steps must be a number >= 0"),
    ("orpo", ["--eval_size", "2.5"], "--eval_size must be a fraction in (0, 1) or a whole number of rows >= 1"),
    ("orpo", ["--meter_warmup_steps", "-1"], "--meter_warmup_steps must be an integer >= 0"),
    ("orpo", ["--dtype", "fp8"], "--dtype must be one of auto, bfloat16, float16, float32, got 'fp8'"),
    ("orpo", ["--dataset_name", "nowhere/prefs.jsonl"], "--dataset_name 'nowhere/prefs.jsonl': no such file"),
    ("dpo", ["--model_name_or_path", "./no-such-model"], "--model_name_or_path './no-such-model': no such folder"),
    ("orpo", ["--use_liger_kernel"], "--use_liger_kernel is transformers' switch for the separate Liger-Kernel"),
    ("kto", ["--use-liger-kernel=True"], "--use_liger"),
    ("simpo", ["--liger_kernel_config", "{}"], "--liger_kernel_config configures the separate Liger-Kernel package"),
    ("orpo", ["--resume_from_checkpoint", "nowhere"], "--resume_from_checkpoint 'nowhere': no such checkpoint"),
]


@pytest.mark.parametrize("name,flags,message", EARLY, ids=[f"{n} {' '.join(f)}" for n, f, _ in EARLY])
def test_a_bad_flag_is_one_line_before_the_imports(name: str, flags: list[str], message: str, tmp_path: Path) -> None:
    result = run_script(SCRIPTS[name], [*flags, "--output_dir", str(tmp_path / "out")], cwd=tmp_path, timeout=60)
    line = _assert_one_error_line(result, SCRIPTS[name], message)
    if "liger" in " ".join(flags):
        assert "--use_liger" in line, line  # says which flag to use
    assert not (tmp_path / "out").exists()


def test_the_early_checks_import_neither_torch_nor_transformers(tmp_path: Path) -> None:
    result = run_script(SCRIPTS["orpo"], ["--max_length", "0"], cwd=tmp_path, timeout=60)
    _assert_one_error_line(result, SCRIPTS["orpo"], "--max_length")
    probe = (
        f"import runpy, sys; sys.path.insert(0, {str(ALIGNMENT)!r}); sys.argv = [sys.argv[1], '--max_length', '0']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exit_:\n"
        "    print(exit_.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    probed = run_script(Path("-c"), [probe, str(SCRIPTS["orpo"])], cwd=tmp_path, timeout=60)
    assert probed.stdout.split() == ["2", "False", "False"], (probed.stdout, probed.stderr[-2000:])


def test_a_non_empty_output_dir_is_refused_before_the_imports(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    result = run_script(SCRIPTS["dpo"], ["--output_dir", str(out)], cwd=tmp_path, timeout=60)
    _assert_one_error_line(result, SCRIPTS["dpo"], "--output_dir", "not empty", "--resume_from_checkpoint last",
                           "--overwrite_output_dir")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]


def test_light_reading_of_the_command_line(tmp_path: Path) -> None:
    import preflight

    values = preflight.argv_values(["--max-length", "7", "--bf16", "--lr=3", "--warmup_steps", "-1", "--x", "--"])
    assert values == {"max_length": "7", "bf16": None, "lr": "3", "warmup_steps": "-1", "x": None}
    assert preflight.liger_kernel_flag_error(["--use_liger_kernel", "False"]) is None
    assert "--use_liger" in preflight.liger_kernel_flag_error(["--use_liger_kernel", "1"])
    preflight.check_argv(["--max_length", "64", "--max_steps", "3", "--num_train_epochs", "0", "--eval_size", "16"])
    with pytest.raises(preflight.FlagError, match="--num_train_epochs"):
        preflight.check_argv(["--num_train_epochs", "-2"])
    with pytest.raises(preflight.FlagPathError):  # also a FileNotFoundError, as before
        preflight.check_argv(["--dataset_name", str(tmp_path / "missing.jsonl")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(preflight.FlagError, match="unsupported file type '.txt'"):
        preflight.check_argv(["--dataset_name", str(tmp_path / "notes.txt")])
    preflight.check_argv(["--output_dir", str(tmp_path), "--overwrite_output_dir"])  # allowed, nothing printed
    with pytest.raises(preflight.FlagError, match="not empty"):
        preflight.check_argv(["--output_dir", str(tmp_path), "--overwrite_output_dir", "false"])
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert preflight.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    config = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint="last")
    assert preflight.check_output_dir(config, overwrite=False) == str(tmp_path / "checkpoint-10")
    assert preflight.one_line("a\n  b\n\nc") == "a b c"


def test_exit_on_flag_error_prints_one_line(capsys) -> None:
    import preflight

    with pytest.raises(SystemExit) as exit_, preflight.exit_on_flag_error(prog="run_x.py"):
        raise preflight.FlagTypeError("--dataset_name 'd': row 3\nexpected a string")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "run_x.py: error: --dataset_name 'd': row 3 expected a string\n"
    with pytest.raises(KeyError), preflight.exit_on_flag_error():
        raise KeyError("not a flag error: passes through")


# ------------------------------------------------------------------------------- after the imports

LATE = [
    ("orpo", ["--learningrate", "1"], ["unrecognized arguments: --learningrate 1", "did you mean --learning_rate?"]),
    ("dpo", ["--beta", "abc"], ["argument --beta", "invalid float value: 'abc'"]),
    ("orpo", ["--lr_scheduler_type", "bogus"], ["--lr_scheduler_type", "invalid choice: 'bogus'"]),
    ("orpo", ["--max_length", "32", "--max_completion_length", "32"],
     ["--max_completion_length (32) must be smaller than --max_length (32)"]),
    ("simpo", ["--eval_strategy", "steps", "--load_best_model_at_end", "--save_strategy", "epoch"],
     ["--load_best_model_at_end", "--save_strategy"]),
    ("kto", ["--report_to", "nowhere"], ["--report_to", "nowhere is not supported", "--report_to none"]),
    ("dpo", ["--beta", "-1"], ["LigerDPOTrainer: config beta must be a finite number > 0, got -1.0"]),
]


@pytest.mark.slow  # each run imports torch, transformers and TRL first
@pytest.mark.parametrize("name,flags,needles", LATE, ids=[f"{n} {' '.join(f)}" for n, f, _ in LATE])
def test_a_flag_error_after_parsing_is_one_line(name: str, flags: list[str], needles: list[str],
                                                 tmp_path: Path) -> None:
    result = run_script(SCRIPTS[name], [*flags, "--output_dir", str(tmp_path / "out")], cwd=tmp_path, timeout=240)
    _assert_one_error_line(result, SCRIPTS[name], *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_column", "malformed_line", "null_value"])
def test_data_that_do_not_fit_are_one_line(case: str, tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(8)]
    path = tmp_path / "prefs.jsonl"
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if case == "missing_column":
        text = "".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n" for r in rows)
        needles = ["--dataset_name", "missing ['rejected']"]
    elif case == "malformed_line":
        text += '{"prompt": "q", "chosen":\n'
        needles = ["--dataset_name", "line 9 is not valid JSON"]
    else:
        rows[3]["rejected"] = None
        text = "".join(json.dumps(row) + "\n" for row in rows)
        needles = ["--dataset_name", "row 3, column 'rejected'"]
    path.write_text(text)
    result = run_script(SCRIPTS["dpo"], ["--dataset_name", str(path), "--output_dir", str(tmp_path / "out")],
                        cwd=tmp_path, timeout=240)
    _assert_one_error_line(result, SCRIPTS["dpo"], *needles, progress=True)
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_help_is_short_and_names_the_liger_switch(tmp_path: Path) -> None:
    short = run_script(SCRIPTS["orpo"], ["--help"], cwd=tmp_path, timeout=240)
    assert short.returncode == 0 and not short.stderr.strip(), short.stderr[-3000:]
    lines = short.stdout.splitlines()
    top = "\n".join(lines[:15])
    assert "--use_liger" in top and "--use_liger_kernel" in top and "--liger_kernel_config" in top, top
    assert len(lines) < 160, len(lines)
    for flag in ("--model_name_or_path", "--dataset_name", "--learning_rate", "--max_length", "--beta", "--help-all"):
        assert flag in short.stdout, flag
    assert "--lr_scheduler_kwargs" not in short.stdout  # one of the many left to --help-all
    full = run_script(SCRIPTS["orpo"], ["--help-all"], cwd=tmp_path, timeout=240)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "--lr_scheduler_kwargs" in full.stdout and "--use_liger_kernel" in full.stdout
    assert len(full.stdout.splitlines()) > 3 * len(lines)
