"""The stock Hugging Face Trainer under accelerate's engines, with and without liger-plugins.

    accelerate launch --config_file configs/accelerate/<ddp|fsdp1|fsdp2|zero2|zero3>.yaml integrations/hf_train.py
    accelerate launch --config_file configs/accelerate/ddp.yaml integrations/hf_train.py --cpu   # gloo, CPU

Trains the tiny Llama of configs/tiny/llama.json (or --config FILE / a family of
liger_plugins.bench_e2e such as "llama", the 1.2 B model of ANCHORS.md) for --steps optimizer steps,
once per precision without the plugin and once with it (`liger_plugins.hf.enable()` +
`use_liger_kernel=True`, so the Trainer patches at `train()`, before accelerate wraps the model), from
the same seed and data, and asserts:
- the per-step training loss and the global gradient norm (computed by the engine from its sharded
  gradients) match the unpatched run, and so does the evaluation loss (the original forward, under
  `torch.no_grad`, on the wrapped model);
- the patch kept every parameter object, ran before the engine wrapped the model, and survived wrapping;
- every fused-loss call saw the full, gathered lm_head weight (not a DTensor or a ZeRO-3 partition).
Options exercise more of the engines: --gradient-checkpointing, --packed (padding-free batches from
DataCollatorWithFlattening: one row, position_ids restarting per sequence), --attn flash_attention_2,
--sdpa-backend flash (SDPA restricted to its flash kernel, bf16 on CUDA), --memory (per-rank peak
CUDA memory and median step time, the two variants in this one process one after the other).

Where it runs: accelerate enables FSDP and DeepSpeed only on accelerators (with --cpu it falls back to
DDP over gloo), so on CPU only the DDP config applies; integrations/engine_train.py drives FSDP1/2 and
ZeRO-2/3 directly on CPU. Prints "INTEGRATION_SUMMARY {json}" and writes --out (rank 0); exit 1 on failure.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KernelProbe, TokenData, check_gathered_weight, compare_runs, model_config, param_ids, \
    write_summary  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import liger_plugins.hf as liger_hf  # noqa: E402
from liger_plugins.patching import unpatch  # noqa: E402
from liger_plugins.patching.forwards import is_liger  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny/llama.json", help="model config JSON, or a bench_e2e family")
    parser.add_argument("--cpu", action="store_true", help="CPU processes over gloo (DDP only, see above)")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--variants", default="base,liger", help="base (unpatched), liger, or both (compared)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2, help="per device")
    parser.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--sdpa-backend", default="default", choices=["default", "flash"])
    parser.add_argument("--packed", action="store_true", help="padding-free batches (DataCollatorWithFlattening)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--memory", action="store_true", help="report per-rank peak CUDA memory and step time")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the step time (--memory)")
    parser.add_argument("--out", help="write the JSON summary here (rank 0)")
    return parser.parse_args(argv)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (CUDA synchronized). On CUDA, the peak-memory counter starts at
    `on_train_begin`, once the engine has wrapped (sharded) the model."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: list[float] = []
        self.memory_at_begin = None
        self._start = 0.0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.memory_at_begin = torch.cuda.memory_allocated() / 2**30

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


class PatchWatch:
    """Wraps the function the Trainer's `use_liger_kernel` path calls to patch, to check that it
    runs before the engine wraps the model and keeps every parameter object."""

    def __init__(self):
        self.events: list[dict] = []
        self._original = liger_hf.apply_liger
        liger_hf.apply_liger = self._apply

    def _apply(self, model, **kwargs):
        from torch.distributed import fsdp

        sharded_kinds = tuple(k for k in (getattr(fsdp, "FullyShardedDataParallel", None),
                                          getattr(fsdp, "FSDPModule", None)) if k)
        before = param_ids(model)
        event = {"wrapped_before_patch": any(isinstance(m, sharded_kinds) for m in model.modules())
                 or any(type(p).__name__ == "DTensor" for p in model.parameters()),
                 "zero3_partitioned": any(hasattr(p, "ds_id") for p in model.parameters())}
        summary = self._original(model, **kwargs)
        event["param_identity_kept"] = param_ids(model) == before
        event["patched"] = list(summary.patched)
        self.events.append(event)
        return summary


def expected_engine() -> str | None:
    """The engine the accelerate config asks for (`accelerate launch` exports it to the environment)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP" + os.environ.get("FSDP_VERSION", "1")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "ZeRO"
    return None


def engine_name(trainer: Trainer) -> str:
    accelerator = trainer.accelerator
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind == "FSDP":
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == "DEEPSPEED":
        return f"ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return kind


def make_data(args, config, world: int):
    n = args.steps * args.batch * args.accum * world
    train = TokenData(n, args.seq, config.vocab_size, seed=1, varying_lengths=args.packed)
    evaluation = TokenData(2 * args.batch * world, args.seq, config.vocab_size, seed=2, varying_lengths=args.packed)
    collator = None
    if args.packed:
        from transformers import DataCollatorWithFlattening

        collator = DataCollatorWithFlattening()
    return train, evaluation, collator


def train_once(args, precision: str, liger: bool, out_dir: str) -> dict:
    training_args = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, gradient_accumulation_steps=args.accum, optim="adamw_torch",
        learning_rate=args.lr, lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, data_seed=0,
        use_cpu=args.cpu, ddp_backend="gloo" if args.cpu else None, bf16=precision == "bf16",
        gradient_checkpointing=args.gradient_checkpointing, use_liger_kernel=liger,
        remove_unused_columns=False,
    )
    config = model_config(args.config, args.attn)
    # transformers finds packed sequences in position_ids only when the forward builds no KV cache.
    config.use_cache = False
    # Built after TrainingArguments: under a ZeRO-3 config, from_config then builds inside zero.Init.
    # Elsewhere on CUDA it is built on this rank's GPU (a 1.2 B model initializes in seconds there).
    device = training_args.device
    torch.manual_seed(0)
    with device if device.type == "cuda" and expected_engine() != "ZeRO" else nullcontext():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    train, evaluation, collator = make_data(args, config, training_args.world_size)
    timer = StepTimer(cuda=device.type == "cuda")
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                      data_collator=collator, callbacks=[timer])
    sdpa = nullcontext()
    if args.sdpa_backend == "flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    cuda = device.type == "cuda"
    record = {}
    with sdpa:
        trainer.train()
        if cuda:  # training only: the evaluation runs the original forward (materialized logits)
            record["peak_memory_gib_per_rank"] = gather(torch.cuda.max_memory_allocated() / 2**30)
            record["memory_at_train_begin_gib_per_rank"] = gather(timer.memory_at_begin)
        record["eval_loss"] = trainer.evaluate()["eval_loss"]
    history = trainer.state.log_history
    record.update(
        engine=engine_name(trainer), world_size=training_args.world_size,
        loss=[e["loss"] for e in history if "loss" in e and "train_runtime" not in e],
        grad_norm=[e["grad_norm"] for e in history if "grad_norm" in e],
        # The causal LM's forward may now be accelerate's autocast wrapper around the patched one (bf16),
        # so the fused loss is checked by the probe; the norm and MLP forwards are never wrapped.
        patched_after_wrap=is_liger(model.model.norm.forward) and is_liger(model.model.layers[0].mlp.forward),
    )
    timed = timer.times[args.warmup:] or timer.times
    record["median_step_s"] = statistics.median(timed)
    record["tokens_per_s_per_rank"] = args.batch * args.accum * args.seq / record["median_step_s"]
    if liger:
        unpatch(model)
    trainer.accelerator.free_memory()
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        record["memory_left_after_gib"] = torch.cuda.memory_allocated() / 2**30  # should be ~0
    return record


def gather(value) -> list:
    """`value` of every rank, in rank order."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main(argv=None):
    args = parse_args(argv)
    precisions = args.precision.split(",")
    variants = args.variants.split(",")
    if set(precisions) - {"fp32", "bf16"} or set(variants) - {"base", "liger"}:
        raise SystemExit("--precision takes fp32,bf16 and --variants base,liger")
    liger_hf.enable()
    watch = PatchWatch()
    probe = KernelProbe()
    summary = {"script": "hf_train", "args": vars(args), "torch": torch.__version__, "runs": {}, "problems": []}
    config = model_config(args.config)
    with tempfile.TemporaryDirectory() as out_dir:
        for precision in precisions:
            runs = {}
            for variant in variants:
                probe.reset()
                watch.events.clear()
                runs[variant] = train_once(args, precision, variant == "liger", out_dir)
                runs[variant]["calls"] = dict(probe.calls)
                runs[variant]["weights_seen"] = list(probe.weights)
                runs[variant]["patch_events"] = list(watch.events)
            summary["runs"][precision] = runs
            summary["problems"] += check(runs, precision, config)
    summary["engine"] = next(iter(next(iter(summary["runs"].values())).values()))["engine"]
    if args.memory:  # the headline numbers of the per-run records
        keys = ("peak_memory_gib_per_rank", "median_step_s", "tokens_per_s_per_rank")
        summary["memory"] = {precision: {v: {k: runs[v].get(k) for k in keys} for v in variants}
                             for precision, runs in summary["runs"].items()}
    expected = expected_engine()
    if expected and not summary["engine"].startswith(expected):
        summary["problems"].append(
            f"the accelerate config asks for {expected} but the Trainer ran {summary['engine']} (accelerate "
            "enables FSDP and DeepSpeed only on accelerators; on CPU use integrations/engine_train.py)")
    summary["ok"] = not summary["problems"]
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        write_summary(summary, args.out)
    probe.close()
    if summary["problems"]:
        print("FAILED: " + "; ".join(summary["problems"]), file=sys.stderr)
        sys.exit(1)


def check(runs: dict, precision: str, config) -> list[str]:
    problems = []
    base, ours = runs.get("base"), runs.get("liger")
    if base is not None and base["calls"]["fused_linear_cross_entropy"]:
        problems.append(f"{precision}: the unpatched run called liger kernels")
    if ours is None:
        return problems
    events = ours["patch_events"]
    if len(events) != 1:
        problems.append(f"{precision}: expected one patch by the Trainer, got {len(events)}")
    elif events[0]["wrapped_before_patch"] or not events[0]["param_identity_kept"]:
        problems.append(f"{precision}: patch ran after wrapping or replaced parameters: {events[0]}")
    if not ours["patched_after_wrap"]:
        problems.append(f"{precision}: patched forwards lost by wrapping")
    weight_problem = check_gathered_weight(ours["weights_seen"], config.vocab_size, config.hidden_size)
    if weight_problem:
        problems.append(f"{precision}: {weight_problem}")
    if base is not None:
        curves = compare_runs(base, ours, precision)
        eval_curves = compare_runs({"loss": [base["eval_loss"]]}, {"loss": [ours["eval_loss"]]}, precision)
        runs["comparison"] = {**curves, "eval_ok": eval_curves["ok"]}
        if not curves["ok"] or not eval_curves["ok"]:
            problems.append(
                f"{precision}: loss / grad-norm / eval-loss differ from the unpatched run: {runs['comparison']}"
            )
    return problems


if __name__ == "__main__":
    main()
