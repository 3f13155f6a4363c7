"""liger_align.utils: the StepMeter core, its HF Trainer and Lightning adapters, and the all-reduce (2 gloo ranks).

Token counts are checked against the attention-mask sums recorded independently by the data collator.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from liger_align.utils import StepMeter, count_tokens

ROOT = Path(__file__).resolve().parents[1]


def test_meter_records_summary_and_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    meter = StepMeter(warmup_steps=2, jsonl_path=path, device="cpu")  # CPU work, measured as such on any machine
    gen = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(6):
        meter.start_step()
        mask = torch.rand(3, 37, generator=gen) < 0.7
        extra = int(torch.randint(0, 50, (), generator=gen))
        meter.add_tokens(count_tokens({"attention_mask": mask, "input_ids": torch.zeros(3, 37)}))
        meter.add_tokens(extra)
        torch.randn(64, 64) @ torch.randn(64, 64)
        meter.end_step()
        counts.append(int(mask.sum()) + extra)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == meter.records and [r["tokens"] for r in lines] == counts
    assert [r["warmup"] for r in lines] == [True, True, False, False, False, False]
    measured = lines[2:]
    summary = meter.summary()
    assert summary["steps_measured"] == 4 and summary["warmup_steps"] == 2 and summary["world_size"] == 1
    assert summary["statistic"] == "median step" and "mean_step_s" not in summary  # one statistic, named
    assert summary["median_step_s"] == pytest.approx(statistics.median(r["step_s"] for r in measured))
    rates = [count / r["step_s"] for count, r in zip(counts[2:], measured)]
    assert summary["tokens_per_s"] == pytest.approx(statistics.median(rates))
    assert summary["global_tokens_per_s"] == pytest.approx(summary["tokens_per_s"])
    assert summary["memory_kind"] == "cpu_rss" and summary["peak_allocated_mib"] > 0
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in lines)


def test_summary_is_the_median_step_for_time_and_tokens(monkeypatch) -> None:
    """An outlier step (a save, an evaluation) moves neither figure; the mean would move both."""
    from types import SimpleNamespace

    from liger_align.utils import meter as meter_module

    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 13.0, 13.0, 14.0])  # steps of 1, 1, 1, 10 and 1 s
    monkeypatch.setattr(meter_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    meter = StepMeter(warmup_steps=0, device="cpu")
    for _ in range(5):
        meter.start_step()
        meter.add_tokens(100)
        meter.end_step()
    summary = meter.summary()
    assert [r["step_s"] for r in meter.records] == [1.0, 1.0, 1.0, 10.0, 1.0]
    assert summary["statistic"] == "median step"
    assert summary["median_step_s"] == 1.0 and summary["tokens_per_s"] == 100.0  # the mean: 2.8 s, 35.7 tokens/s
    assert summary["global_tokens_per_s"] == 100.0


def test_meter_bad_input_and_empty_summary() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        StepMeter(warmup_steps=-1)
    meter = StepMeter(warmup_steps=0)
    assert meter.summary()["steps_measured"] == 0 and meter.summary()["tokens_per_s"] is None
    assert meter.summary()["median_step_s"] is None and meter.summary()["statistic"] == "median step"
    assert meter.end_step() is None  # outside a step
    meter.start_step()
    with pytest.raises(ValueError, match="0-d"):
        meter.add_tokens(torch.ones(2))
    with pytest.raises(TypeError, match="int or a 0-d tensor"):
        meter.add_tokens(2.5)
    assert count_tokens({"input_ids": torch.zeros(2, 5)}) == 10 and count_tokens({}) is None


class _SpyCollator:
    """Right-pads ``input_ids`` and records each batch's attention-mask sum and its padded size."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id, self.masks, self.sizes = pad_id, [], []

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        self.masks.append(int(mask.sum()))
        self.sizes.append(ids.numel())
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("tokens_seen", ["no", "all", "non_padding"])
def test_hf_trainer_counts_non_padding_tokens_with_accumulation(tokens_seen: str, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from liger_align.utils import StepMeterCallback

    config = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, 61, (int(n),), generator=gen).tolist()}
            for n in torch.randint(3, 23, (40,), generator=gen)]
    collator = _SpyCollator(pad_id=0)
    callback = StepMeterCallback(warmup_steps=1, jsonl_path=tmp_path / "steps.jsonl")
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=3, gradient_accumulation_steps=2,
        report_to="none", save_strategy="no", logging_steps=1, include_num_input_tokens_seen=tokens_seen,
        use_cpu=True, dataloader_num_workers=0, learning_rate=1e-3, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[callback])
    trainer.train()

    records = callback.meter.records
    assert len(records) == 4 and [r["warmup"] for r in records] == [True, False, False, False]
    expected = [collator.masks[2 * i] + collator.masks[2 * i + 1] for i in range(4)]
    assert [r["tokens"] for r in records] == expected
    assert sum(collator.masks[:8]) < sum(collator.sizes[:8])  # there was padding, and it was not counted
    for record in records[1:]:
        assert record["tokens_per_s"] > 0 and record["peak_allocated_mib"] > 0 and record["memory_kind"] == "cpu_rss"
    lines = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert lines == records
    summary = callback.summary()
    assert summary["steps_measured"] == 3 and summary["tokens_per_s"] > 0 and summary["device"] == "cpu"
    assert callback._hook is None  # removed at the end of training
    model.train()
    model(**collator([rows[0]]))  # a forward outside training adds nothing
    assert len(callback.meter.records) == 4


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
def test_lightning_counts_batch_tokens(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from liger_align.utils import LightningStepMeter

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(31, 8)
            self.head = torch.nn.Linear(8, 31)

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            logits = self.head(self.embed(batch["input_ids"]))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(2)
    rows = [{"input_ids": torch.randint(1, 31, (int(n),), generator=gen).tolist()}
            for n in torch.randint(2, 19, (24,), generator=gen)]
    collator = _SpyCollator(pad_id=0)
    callback = LightningStepMeter(warmup_steps=2)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         default_root_dir=str(tmp_path))
    trainer.fit(Tiny(), DataLoader(rows, batch_size=4, collate_fn=collator))
    records = callback.meter.records
    assert [r["tokens"] for r in records] == collator.masks[:5] and len(records) == 5
    assert all(r["tokens_per_s"] > 0 and r["peak_allocated_mib"] > 0 for r in records[2:])
    assert callback.summary()["steps_measured"] == 3


_DISTRIBUTED = """
import json, sys, torch, torch.distributed as dist
from liger_align.utils import StepMeter
dist.init_process_group("gloo")
rank = dist.get_rank()
meter = StepMeter(warmup_steps=0)
for step in range(3):
    meter.start_step()
    meter.add_tokens(torch.tensor(10 * (rank + 1) + step))
    meter.end_step()
if rank == 0:
    json.dump({"records": meter.records, "summary": meter.summary()}, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes (gloo)
def test_global_tokens_are_all_reduced(tmp_path: Path) -> None:
    script, out = tmp_path / "ranks.py", tmp_path / "out.json"
    script.write_text(textwrap.dedent(_DISTRIBUTED))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["tokens"] for r in result["records"]] == [10, 11, 12]
    assert [r["global_tokens"] for r in result["records"]] == [10 + 20, 11 + 21, 12 + 22]
    assert result["summary"]["world_size"] == 2
    assert result["summary"]["global_tokens_per_s"] > result["summary"]["tokens_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_time_is_synchronised_and_peaks_reset_after_warmup() -> None:
    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device)
    baseline = torch.cuda.memory_allocated(device) / 2**20
    meter = StepMeter(warmup_steps=1, device=device)
    meter.start_step()  # warm-up: a 1024 MiB peak that the measured steps must not report
    big = torch.empty(1024 * 2**20, dtype=torch.uint8, device=device)
    del big
    meter.end_step()
    for _ in range(2):
        meter.start_step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x = torch.empty(96 * 2**20, dtype=torch.uint8, device=device)
        for _ in range(30):
            a = a @ a.T / 4096
        end.record()
        meter.add_tokens(torch.tensor(7, device=device))
        del x
        record = meter.end_step()
        end.synchronize()
        assert record["step_s"] >= 0.9 * start.elapsed_time(end) / 1000  # the clock waited for the kernels
        assert record["tokens"] == 7 and record["memory_kind"] == "cuda"
    assert meter.records[0]["peak_allocated_mib"] - baseline >= 1024
    summary = meter.summary()
    assert 96 <= summary["peak_allocated_mib"] - baseline < 1024
    assert summary["peak_reserved_mib"] >= summary["peak_allocated_mib"] and summary["device"] == "cuda:0"
