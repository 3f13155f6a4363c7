"""Fine-tune a causal LM on multiple-choice questions (MMLU's schema) with PyTorch Lightning.

``--use_liger`` (default) applies liger_align's kernels to the model instance when it is built::

    from liger_align.models import apply_liger_kernel
    apply_liger_kernel(model)     # RMSNorm, RoPE, SwiGLU/GeGLU, and the loss without [tokens, vocab] logits

and the loss comes from the patched forward with ``labels`` (computed inside the output head's own call,
so FSDP and ZeRO-3 gather the head's weight); ``--no-use_liger`` trains the unpatched model. The model
is built in ``LightningModule.configure_model`` (so FSDP wraps it and ZeRO-3 partitions it as it is
created). AdamW, linear warm-up over ``--warmup_ratio`` of the steps then cosine decay to 0; the
StepMeter's Lightning callback measures step time, tokens/s and peak memory.

With no arguments the embedded default runs on whatever device is there (a tiny Llama 3.2, a local
tokenizer, generated category questions, see ``mmlu_data.embedded_rows``), and prints the held-out
loss and answer accuracy before and after. The real job::

    python examples/lightning/training.py
    python examples/lightning/training.py --model meta-llama/Llama-3.2-1B --data mmlu_train.parquet \\
        --strategy deepspeed --devices 8 --batch_size 8 --max_length 512 --lr 2e-5 --output_dir outputs/mmlu

``--data`` takes a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file with MMLU's columns
``question``, ``choices`` and ``answer`` (the **0-based** index of the right choice). ``--strategy``:
``auto``, ``ddp``, ``fsdp`` (wraps and activation-checkpoints the model's ``_no_split_modules``),
``deepspeed`` (ZeRO-3, bf16); the last two need CUDA GPUs.

At the end the trained model is saved in ``--output_dir`` with ``save_pretrained`` (its full weights, gathered
from the FSDP shards or the ZeRO-3 partitions; rank 0 writes), beside the tokenizer, ``run_summary.json`` and
``steps.jsonl``. It reloads with transformers alone (liger_align's patches change no weight name)::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("outputs/mmlu")
    tokenizer = AutoTokenizer.from_pretrained("outputs/mmlu")
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _path in (HERE, REPO / "examples" / "alignment", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import mmlu_data  # noqa: E402
from lightning_strategies import STRATEGIES, require_deepspeed, strategy_for  # noqa: E402
from preflight import check_output_dir_or_exit, reruns_embedded_demo  # noqa: E402
from reporting import write_summary  # noqa: E402

from liger_align.models import apply_liger_kernel  # noqa: E402
from liger_align.utils import LightningStepMeter  # noqa: E402

__all__ = ["MMLUModule", "hf_state_dict", "main", "save_hf_model", "strategy_for", "warmup_cosine"]

# The embedded default: the tiny model's size and the settings under which it learns in well under a minute.
EMBEDDED_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
EMBEDDED_DEFAULTS = {"batch_size": 16, "lr": 1e-3, "max_epochs": 70, "weight_decay": 0.0}
REAL_DEFAULTS = {"batch_size": 8, "lr": 2e-5, "max_epochs": 1, "weight_decay": 0.01}


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """LR factor of optimizer step ``step`` (0-based): ``(step+1)/warmup`` while ``step < warmup``, then
    ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``, reaching 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class MMLUModule(pl.LightningModule):
    """Causal-LM fine-tuning on answer tokens, with held-out loss and answer accuracy.

    Args:
        build_model: returns the transformers causal LM; called once, in :meth:`configure_model`.
        use_liger: apply ``apply_liger_kernel`` to the built model.
        letter_ids: token id of each answer letter (`` A``, `` B``, ...), for the accuracy.
        lr, weight_decay, warmup_ratio: AdamW (no decay on biases and norms) and :func:`warmup_cosine`.
        gradient_checkpointing: Hugging Face's (non-reentrant) checkpointing of the decoder layers.
        log_every: print the loss every this many steps (0: never).

    ``train_losses`` holds each step's loss (the mean over all ranks' target tokens); ``evaluations``
    one dict per validation pass (``step``, ``val_loss`` per target token, ``val_accuracy``, ``rows``).
    """

    def __init__(
        self, build_model: Callable[[], torch.nn.Module], *, use_liger: bool = True, letter_ids: Sequence[int],
        lr: float, weight_decay: float = 0.0, warmup_ratio: float = 0.1, gradient_checkpointing: bool = False,
        log_every: int = 0,
    ) -> None:
        super().__init__()
        self.build_model = build_model
        self.use_liger = use_liger
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.gradient_checkpointing = gradient_checkpointing
        self.log_every = log_every
        self.letter_ids = [int(i) for i in letter_ids]  # a plain list: no buffer for FSDP/DeepSpeed to cast or shard
        self.model: torch.nn.Module | None = None
        self.use_cache: bool | None = None  # the model's config.use_cache before training (saved with it)
        self.liger_handle = None
        self._hf_ds_config = None
        self.train_losses: list[torch.Tensor] = []
        self.evaluations: list[dict[str, Any]] = []
        self._sums: torch.Tensor | None = None

    # -- model -------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self.trainer.strategy
        name = type(strategy).__name__
        if name == "DeepSpeedStrategy" and getattr(strategy, "zero_stage_3", False):
            # Let transformers build (or load) the model ZeRO-3-aware: partitioned, weights initialised/loaded
            # through gathered parameters. The config object must stay alive while the model is in use.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(strategy.config)
        on_gpu = name == "FSDPStrategy" and strategy.root_device.type == "cuda"
        with torch.device(strategy.root_device) if on_gpu else nullcontext():
            model = self.build_model()
        if self.use_liger:
            self.liger_handle = apply_liger_kernel(model)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = False
        self.model = model

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, math.ceil(self.warmup_ratio * total)) if self.warmup_ratio > 0 else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, warmup=warmup, total=total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- steps -------------------------------------------------------------------------------------

    def _forward(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"], **kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        world = self.trainer.world_size
        kwargs = {}
        if world > 1:
            # Normalise by the target tokens of the whole global batch (ranks' gradients are averaged), so a
            # step equals one process's step on the same global batch whatever each rank's token count.
            valid = (batch["labels"][:, 1:] != mmlu_data.IGNORE_INDEX).sum().float()
            total = self.trainer.strategy.reduce(valid, reduce_op="sum")
            kwargs["num_items_in_batch"] = (total / world).clamp(min=1.0 / world)
        loss = self._forward(batch, **kwargs).loss
        logged = loss.detach().float()
        if world > 1:
            logged = self.trainer.strategy.reduce(logged, reduce_op="mean")
        self.train_losses.append(logged)
        if self.log_every and self.global_step % self.log_every == 0:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.print(f"step {self.global_step:>5}  loss {logged.item():.4f}  lr {lr:.2e}")
        return loss

    def on_validation_epoch_start(self) -> None:
        self._sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss sum, tokens, correct, rows

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._forward(batch)
        valid = (batch["labels"][:, 1:] != mmlu_data.IGNORE_INDEX).sum()
        rows = torch.arange(batch["input_ids"].shape[0], device=self.device)
        letters = torch.tensor(self.letter_ids, device=self.device)
        scores = out.logits[rows, batch["answer_pos"]][:, letters].float()  # (B, letters)
        beyond = torch.arange(scores.shape[1], device=self.device)[None, :] >= batch["num_choices"][:, None]
        correct = (scores.masked_fill(beyond, -torch.inf).argmax(-1) == batch["answer"]).sum()
        self._sums += torch.stack([out.loss.double() * valid, valid.double(), correct.double(),
                                   torch.tensor(float(rows.numel()), device=self.device, dtype=torch.float64)])

    def on_validation_epoch_end(self) -> None:
        sums = self._sums
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        loss_sum, tokens, correct, rows = sums.tolist()
        record = {"step": self.global_step, "before_training": bool(self.trainer.sanity_checking),
                  "val_loss": loss_sum / max(tokens, 1.0), "val_accuracy": correct / max(rows, 1.0), "rows": int(rows)}
        self.evaluations.append(record)
        self.print(f"eval at step {record['step']}: loss {record['val_loss']:.4f}  "
                   f"accuracy {record['val_accuracy']:.3f} ({int(rows)} rows)")


# ----------------------------------------------------------------------------------------------- saving

_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def hf_state_dict(trainer: pl.Trainer) -> dict[str, torch.Tensor] | None:
    """The full state dict of the module's Hugging Face model (``module.model``), under its own key names, on
    rank 0 (``None`` on the other ranks). Every rank must call it: the gathering is a collective.

    FSDP: Lightning's full state dict (``state_dict_type="full"``: gathered, offloaded to CPU, on rank 0);
    DeepSpeed ZeRO-3: the engine's consolidated 16-bit weights (layer by layer, on rank 0's CPU), as the
    Hugging Face ``Trainer`` saves them; otherwise (one device, DDP) the module's own state dict.
    """
    strategy = trainer.strategy
    if type(strategy).__name__ == "DeepSpeedStrategy" and getattr(strategy, "zero_stage_3", False):
        state = strategy.deepspeed_engine._zero3_consolidated_16bit_state_dict()
    else:
        state = strategy.lightning_module_state_dict()
    if not trainer.is_global_zero:
        return None
    out = {}
    for key, value in state.items():
        for part in _WRAPPER_PARTS:
            key = key.replace(part, "")
        if key.startswith("model."):  # the LightningModule holds the Hugging Face model as ``self.model``
            out[key.removeprefix("model.")] = value
    if not out:
        raise RuntimeError(f"the gathered state dict holds no weight of the model (keys: {list(state)[:5]}...)")
    return out


def save_hf_model(trainer: pl.Trainer, module: MMLUModule, tokenizer: Any, output_dir: Path) -> None:
    """Save the trained model (``save_pretrained`` with its full state dict, :func:`hf_state_dict`) and
    ``tokenizer`` in ``output_dir`` from rank 0; every rank calls it. ``config.use_cache`` is saved as it was
    before training (training turns it off)."""
    state = hf_state_dict(trainer)
    if trainer.is_global_zero:
        model = module.model
        use_cache = model.config.use_cache
        if module.use_cache is not None:
            model.config.use_cache = module.use_cache
        try:
            model.save_pretrained(str(output_dir), state_dict=state)
        finally:
            model.config.use_cache = use_cache
        tokenizer.save_pretrained(str(output_dir))
    trainer.strategy.barrier("save_hf_model")


# ----------------------------------------------------------------------------------------------- checks


def resolve_accelerator(accelerator: str) -> str:
    """``cpu`` or ``cuda`` for ``--accelerator`` (``auto``: CUDA when visible); CUDA requested but absent raises."""
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--accelerator {accelerator}: no CUDA device is visible; use --accelerator cpu")
        return "cuda"
    if accelerator == "cpu":
        return "cpu"
    raise ValueError(f"--accelerator {accelerator!r}: expected auto, cpu, gpu or cuda")


def resolve_devices(devices: str, accelerator: str) -> int | list[int] | str:
    """``--devices`` as Lightning takes it, refusing more devices than exist (CUDA GPUs, or CPU cores)."""
    available = torch.cuda.device_count() if accelerator == "cuda" else (os.cpu_count() or 1)
    kind = "CUDA device(s) visible (torch.cuda.device_count())" if accelerator == "cuda" else "CPU cores"
    if devices in ("auto", "-1"):
        return devices if accelerator == "cuda" else 1
    try:
        wanted = [int(d) for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    except ValueError:
        raise ValueError(f"--devices {devices!r}: expected a count, a list like 0,1, or auto") from None
    if isinstance(wanted, list):
        bad = [d for d in wanted if not 0 <= d < available]
        if bad:
            raise ValueError(f"--devices {devices}: device index(es) {bad} do not exist; there are {available} {kind}")
        return wanted
    if not 1 <= wanted <= available:
        raise ValueError(
            f"--devices {wanted}: there are {available} {kind}; pass --devices between 1 and {available}"
            + (" (or --accelerator cpu)" if accelerator == "cuda" else "")
        )
    return wanted


def resolve_precision(precision: str | None, strategy: str, accelerator: str) -> str:
    """``--precision`` (default: ``bf16-mixed`` on a GPU with bf16, else ``32-true``); DeepSpeed here is bf16."""
    if precision is None:
        bf16 = accelerator == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if bf16 or strategy == "deepspeed" else "32-true"
    if strategy == "deepspeed" and precision not in ("bf16-mixed", "bf16-true"):
        raise ValueError(f"--precision {precision}: --strategy deepspeed runs ZeRO-3 in bf16; use --precision "
                         "bf16-mixed (or bf16-true)")
    return precision


def check_strategy(strategy: str, accelerator: str) -> None:
    """Unknown names, DeepSpeed missing, and FSDP/DeepSpeed on CPU raise, with the fix."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r}: unknown strategy; choose one of {list(STRATEGIES)}")
    if strategy == "deepspeed":
        require_deepspeed()
    if strategy in ("fsdp", "deepspeed") and accelerator != "cuda":
        raise ValueError(f"--strategy {strategy} needs CUDA GPUs (Lightning runs it on GPUs only); "
                         "on CPU use --strategy auto or --strategy ddp")


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="hub id or local folder of a causal LM (default: the embedded tiny Llama 3.2)")
    p.add_argument("--data", help="local MMLU-format .jsonl/.json/.csv/.parquet (default: the embedded questions)")
    p.add_argument("--eval_data", help="held-out file in the same format (default: --eval_size rows of --data)")
    p.add_argument("--eval_size", type=float, default=0.1, help="held-out fraction (< 1) or rows (>= 1) of --data")
    p.add_argument("--max_length", type=int, default=512, help="longest example in tokens (prompts are cut)")
    p.add_argument("--batch_size", type=int, help="examples per device and step (embedded: 16, else 8)")
    p.add_argument("--eval_batch_size", type=int, help="examples per device in evaluation (default: 2x batch)")
    p.add_argument("--lr", type=float, help="peak learning rate (embedded: 1e-3, else 2e-5)")
    p.add_argument("--weight_decay", type=float, help="AdamW weight decay, not on biases and norms (embedded 0)")
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of the steps of linear warm-up")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--strategy", default="auto", help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    p.add_argument("--devices", default="auto", help="device count, list (0,1) or auto")
    p.add_argument("--precision", help="32-true, bf16-mixed, bf16-true, ... (default: bf16-mixed on GPU, else 32)")
    p.add_argument("--max_steps", type=int, help="optimizer steps (default: --max_epochs over the data)")
    p.add_argument("--max_epochs", type=int, help="passes over the data when --max_steps is not set (embedded: 70)")
    p.add_argument("--output_dir", default="outputs/lightning",
                   help="the trained model (save_pretrained), its tokenizer, run_summary.json and steps.jsonl go here")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="train into a non-empty --output_dir anyway (its files are overwritten); without it a\n"
                        "non-empty folder is refused (the embedded demo's default folder is rerun into)")
    p.add_argument("--use_liger", action=argparse.BooleanOptionalAction, default=True,
                   help="apply liger_align's kernels (--no-use_liger: the unpatched model)")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="Hugging Face gradient checkpointing (fsdp checkpoints the decoder layers itself)")
    p.add_argument("--log_every", type=int, default=25, help="print the loss every N steps (0: never)")
    p.add_argument("--save_checkpoint", action="store_true", help="save a Lightning checkpoint in --output_dir")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.overwrite_output_dir = args.overwrite_output_dir or reruns_embedded_demo(argv, model_flag="model")
    return args


def load_tokenizer_and_rows(args: argparse.Namespace) -> tuple[Any, list[dict], list[dict], str]:
    """The tokenizer and the checked ``(train, held_out)`` rows; the last item names the data."""
    if args.data is None and args.eval_data is None:
        train, held_out = mmlu_data.embedded_rows()
        source = "embedded category questions (generated)"
    elif args.data is None:
        raise ValueError("--eval_data needs --data (the training file)")
    else:
        rows = mmlu_data.read_rows(args.data)
        if args.eval_data is not None:
            train, held_out = rows, mmlu_data.read_rows(args.eval_data)
        else:
            train, held_out = mmlu_data.split_rows(rows, args.eval_size, args.seed)
        source = args.data
    if args.model is None:
        from embedded import build_tokenizer

        tokenizer = build_tokenizer(mmlu_data.embedded_texts(train + held_out))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, train, held_out, source


def model_builder(args: argparse.Namespace, tokenizer: Any, precision: str) -> Callable[[], torch.nn.Module]:
    """A function that builds the model (called in ``configure_model``): the tiny Llama, or ``--model``."""
    if args.model is None:
        from embedded import build_tiny_llama

        return partial(build_tiny_llama, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=args.seed,
                       **EMBEDDED_MODEL)
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16 if precision == "16-true" else torch.float32
    return partial(AutoModelForCausalLM.from_pretrained, args.model, dtype=dtype)


def skeleton(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The model's structure on the meta device (no memory), to find the classes FSDP wraps."""
    with torch.device("meta"):
        return build()


def set_single_process_env() -> None:
    """Defaults of the distributed environment DeepSpeed reads, for one process on one device."""
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Check everything, train, print the summary (rank 0) and return it (the liger patch is reverted after)."""
    args = parse_args(argv)
    check_output_dir_or_exit(args, overwrite=args.overwrite_output_dir)  # before anything is loaded
    accelerator = resolve_accelerator(args.accelerator)
    check_strategy(args.strategy, accelerator)
    devices = resolve_devices(args.devices, accelerator)
    precision = resolve_precision(args.precision, args.strategy, accelerator)
    for key, value in (EMBEDDED_DEFAULTS if args.model is None else REAL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.strategy == "deepspeed" and devices == 1:
        set_single_process_env()
    if accelerator == "cpu" and args.model is None:
        torch.set_num_threads(1)  # the tiny model's matrices are too small to gain from threads; it runs faster
    elif accelerator == "cpu" and isinstance(devices, int) and devices > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))  # processes share the cores

    pl.seed_everything(args.seed, workers=True, verbose=False)
    tokenizer, train_rows, eval_rows, source = load_tokenizer_and_rows(args)
    max_choices = max(len(r["choices"]) for r in train_rows + eval_rows)
    letter_ids = mmlu_data.letter_token_ids(tokenizer, max_choices)
    encode = partial(mmlu_data.encode_rows, tokenizer=tokenizer, max_length=args.max_length, letter_ids=letter_ids)
    train, held_out = encode(train_rows), encode(eval_rows)
    world = (len(devices) if isinstance(devices, list) else devices) if devices not in ("auto", "-1") else (
        torch.cuda.device_count())
    mmlu_data.GlobalBatchSampler(len(train), args.batch_size, world_size=world)  # too little data raises here
    max_steps = args.max_steps or args.max_epochs * mmlu_data.steps_per_epoch(len(train), args.batch_size, world)

    build = model_builder(args, tokenizer, precision)
    strategy = strategy_for(args.strategy, skeleton(build) if args.strategy == "fsdp" else None)
    module = MMLUModule(build, use_liger=args.use_liger, letter_ids=letter_ids, lr=args.lr,
                        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                        gradient_checkpointing=args.gradient_checkpointing, log_every=args.log_every)
    data = mmlu_data.make_datamodule(train, held_out, batch_size=args.batch_size,
                                     eval_batch_size=args.eval_batch_size or 2 * args.batch_size,
                                     pad_token_id=tokenizer.pad_token_id, seed=args.seed)
    output_dir = Path(args.output_dir)
    meter = LightningStepMeter(warmup_steps=min(2, max_steps - 1), jsonl_path=output_dir / "steps.jsonl")
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, precision=precision, max_steps=max_steps,
        max_epochs=-1, check_val_every_n_epoch=None, val_check_interval=max_steps, num_sanity_val_steps=-1,
        use_distributed_sampler=False, callbacks=[meter], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=False, default_root_dir=output_dir,
    )
    began = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - began
    if args.save_checkpoint:
        trainer.save_checkpoint(output_dir / "last.ckpt")
    save_hf_model(trainer, module, tokenizer, output_dir)
    handle = module.liger_handle
    patches = (handle.summary(), len(handle.patched)) if handle is not None else (None, 0)
    if handle is not None:
        handle.revert()  # training is over: leave transformers' modules as they were in this process

    losses = [float(x) for x in torch.stack(module.train_losses).cpu()] if module.train_losses else []
    before = next((e for e in module.evaluations if e["before_training"]), None)
    after = next((e for e in reversed(module.evaluations) if not e["before_training"]), None)
    summary = {
        "model": args.model or "embedded tiny Llama 3.2",
        "data": source,
        "use_liger": args.use_liger,
        "liger_patches": patches[0],
        "liger_patched_count": patches[1],
        "strategy": args.strategy,
        "accelerator": accelerator,
        "world_size": trainer.world_size,
        "precision": precision,
        "batch_size_per_device": args.batch_size,
        "steps": trainer.global_step,
        "train_rows": len(train),
        "eval_rows": len(held_out),
        "train_seconds": seconds,
        "first_losses": losses[:3],
        "train_losses": losses,
        "chance_accuracy": mmlu_data.chance_accuracy(held_out),
        "before": before,
        "after": after,
        "meter": meter.summary(),
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        write_summary(summary, output_dir, printer=print_summary)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    m = s["meter"]
    gib = (m["peak_allocated_mib"] or 0) / 1024
    print(f"\n{s['model']} on {s['data']}: {s['strategy']} x{s['world_size']} {s['accelerator']}, {s['precision']}, "
          f"liger {'on' if s['use_liger'] else 'off'}")
    print(f"steps {s['steps']} in {s['train_seconds']:.1f} s; median step {m['median_step_s'] or 0:.4f} s, "
          f"{m['global_tokens_per_s'] or 0:.0f} tokens/s, peak memory {gib:.2f} GiB ({m['memory_kind']})")
    for when in ("before", "after"):
        e = s[when]
        if e is not None:
            print(f"{when:>6}: held-out loss {e['val_loss']:.4f}, answer accuracy {e['val_accuracy']:.3f} "
                  f"(chance {s['chance_accuracy']:.3f}, {e['rows']} rows)")
    if s.get("output_dir"):
        print(f"saved model and tokenizer to {s['output_dir']}")


if __name__ == "__main__":
    main()
