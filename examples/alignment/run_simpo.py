"""Align a causal LM with SimPO (Meng et al., 2024, "SimPO: Simple Preference Optimization with a
Reference-Free Reward") using ``liger_align``'s ``LigerCPOTrainer`` with ``loss_type="simpo"`` and
``cpo_alpha=0`` (SimPO is CPO's trainer without the NLL term).

With no arguments it runs the embedded default (tiny Llama 3.2, local tokenizer, shipped data) and
prints a summary; with arguments it does the real job, and every ``CPOConfig`` flag works::

    python examples/alignment/run_simpo.py
    accelerate launch --config_file examples/alignment/fsdp.yaml examples/alignment/run_simpo.py \\
        --model_name_or_path meta-llama/Llama-3.2-1B --dataset_name prefs.jsonl \\
        --beta 2.0 --simpo_gamma 0.5 --learning_rate 1e-6 --bf16

``--no-use_liger`` runs TRL's ``CPOTrainer`` instead, for comparison.
"""

from __future__ import annotations

import common
from trl.experimental.cpo import CPOConfig, CPOTrainer

common.add_repo_to_path()
from liger_align.trainers import LigerCPOTrainer  # noqa: E402

SIMPO = common.Algorithm(
    name="simpo",
    config_class=CPOConfig,
    trl_trainer=CPOTrainer,
    liger_trainer=LigerCPOTrainer,
    # CPO-SimPO (SimPO + an NLL term on the chosen answers, cpo_alpha 1): from random init pure SimPO only
    # pushes rejected answers down (0.583 -> 0.667 held-out preference accuracy; with the NLL term 0.854).
    embedded_defaults={"beta": 2.0, "simpo_gamma": 0.5, "learning_rate": 1e-3, "cpo_alpha": 1.0},
    config_defaults={"loss_type": "simpo", "cpo_alpha": 0.0, "remove_unused_columns": False},
)

if __name__ == "__main__":
    common.main(SIMPO)
