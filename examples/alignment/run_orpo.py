"""Align a causal LM with ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without
Reference Model") using ``liger_align``'s memory-efficient ``LigerORPOTrainer``.

With no arguments it runs the embedded default, on the GPU if there is one, in a few minutes of CPU
otherwise: a tiny Llama-3.2-shaped model built from a config, a tokenizer built locally and the
preference data shipped in ``liger_align/testing/data/preferences.jsonl``; it ends with a summary (steps,
wall time, peak memory, held-out reward accuracy before and after)::

    python examples/alignment/run_orpo.py

With arguments it does the real job; every ``ORPOConfig`` flag works::

    accelerate launch --config_file examples/alignment/fsdp.yaml examples/alignment/run_orpo.py \\
        --model_name_or_path meta-llama/Llama-3.2-1B --dataset_name prefs.jsonl \\
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --max_length 1024 \\
        --learning_rate 8e-6 --beta 0.1 --num_train_epochs 1 --bf16 --gradient_checkpointing \\
        --output_dir outputs/llama-3.2-1b-orpo

``--no-use_liger`` runs TRL's ``ORPOTrainer`` instead, for comparison.
"""

from __future__ import annotations

import common
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

common.add_repo_to_path()
from liger_align.trainers import LigerORPOTrainer  # noqa: E402

ORPO = common.Algorithm(
    name="orpo",
    config_class=ORPOConfig,
    trl_trainer=ORPOTrainer,
    liger_trainer=LigerORPOTrainer,
    embedded_defaults={"beta": 1.0},
    beta_may_be_zero=True,  # as LigerORPOTrainer's config check
    # TRL's ORPO collator needs the raw columns; set here, TRL does not print its notice about it.
    config_defaults={"remove_unused_columns": False},
)

if __name__ == "__main__":
    common.main(ORPO)
