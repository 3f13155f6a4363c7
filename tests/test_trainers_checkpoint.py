"""Checkpoint and resume with a liger trainer: the steps after the resume log the same loss as an
uninterrupted run. Also the version guard of ``liger_align.trainers``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from _helpers import common_args, tiny_model
from trl.experimental.orpo import ORPOConfig

from liger_align.testing import build_tokenizer, load_preference_dataset
from liger_align.trainers import LigerORPOTrainer, _versions

pytestmark = pytest.mark.slow


def orpo(tmp: Path, **overrides: object) -> LigerORPOTrainer:
    tokenizer = build_tokenizer()
    args = ORPOConfig(**common_args(tmp, max_steps=4, **overrides))
    return LigerORPOTrainer(
        model=tiny_model(tokenizer), args=args, train_dataset=load_preference_dataset().select(range(32)),
        processing_class=tokenizer,
    )


def losses(trainer: LigerORPOTrainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = orpo(tmp_path / "full")
    full.train()
    full.revert_liger_kernel_patches()

    first = orpo(tmp_path / "ckpt", save_strategy="steps", save_steps=2)
    first.train()
    first.revert_liger_kernel_patches()
    checkpoint = tmp_path / "ckpt" / "checkpoint-2"
    assert checkpoint.is_dir()

    resumed = orpo(tmp_path / "ckpt")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed.revert_liger_kernel_patches()
    want, got = losses(full), losses(resumed)
    assert {3, 4} <= set(got) and resumed.state.global_step == 4
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


BAD_VERSIONS = [("trl", "1.14.0"), ("trl", "2.0.0"), ("transformers", "4.40.0"), ("transformers", "6.0.0")]


@pytest.mark.parametrize("package,version", BAD_VERSIONS)
def test_unsupported_version_is_a_clear_import_error(
    package: str, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _versions.installed_version
    monkeypatch.setattr(_versions, "installed_version", lambda name: version if name == package else real(name))
    low, high = _versions.SUPPORTED[package]
    with pytest.raises(ImportError, match=rf"{package}>={low},<{high}.*{package}=={version}"):
        _versions.check_supported_versions()
    # A fresh import of the package (its __init__ runs the check again); undo puts the imported package back.
    monkeypatch.delitem(sys.modules, "liger_align.trainers")
    with pytest.raises(ImportError, match=package):
        importlib.import_module("liger_align.trainers")
    monkeypatch.undo()


def test_missing_package_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_versions, "installed_version", lambda name: None)
    with pytest.raises(ImportError, match="not installed"):
        _versions.check_supported_versions()


def test_installed_versions_are_supported() -> None:
    _versions.check_supported_versions()
