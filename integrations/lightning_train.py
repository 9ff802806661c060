"""Lightning's strategies with and without liger-plugins' LigerCallback.

    python integrations/lightning_train.py --strategies ddp,model_parallel                 # CPU, gloo
    python integrations/lightning_train.py --accelerator gpu --strategies fsdp,deepspeed_stage_2,deepspeed_stage_3

Lightning starts the other rank itself (it re-runs this command). For every strategy, the tiny Llama
(configs/tiny/llama.json) is built in `LightningModule.configure_model` -- where large models are built:
inside the strategy's sharded-init context (DeepSpeed ZeRO-3: `zero.Init`, partitioned at once) -- and
trained from one seed twice, without and with the callback, which patches right after
`configure_model`, before the strategy wraps the model. Asserts: the same per-step loss (mean over
ranks) and validation loss as the unpatched run; every fused-loss call saw the full lm_head weight;
the patched forwards are still there after wrapping.
- ddp: DDPStrategy; model_parallel: ModelParallelStrategy, `configure_model` applies FSDP2 `fully_shard`
  itself (per decoder layer, final norm + lm_head as one group, the root), so the callback patches an
  already sharded model (DTensor parameters);
- fsdp: FSDPStrategy (FSDP1), one unit per decoder layer; deepspeed_stage_2 / deepspeed_stage_3.
CPU: ddp and model_parallel (Lightning refuses FSDPStrategy and DeepSpeedStrategy without CUDA).
Prints "INTEGRATION_SUMMARY {json}" and writes --out (rank 0); exit 1 on failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KernelProbe, TokenData, check_gathered_weight, compare_runs, model_config, \
    write_summary  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from liger_plugins.lightning import LigerCallback  # noqa: E402
from liger_plugins.patching import unpatch  # noqa: E402
from liger_plugins.patching.forwards import is_liger  # noqa: E402

STRATEGIES = ("ddp", "model_parallel", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="ddp,model_parallel", help="comma-separated: " + ",".join(STRATEGIES))
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--config", default="configs/tiny/llama.json")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="per device")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", help="write the JSON summary here (rank 0)")
    return parser.parse_args(argv)


class Module(pl.LightningModule):
    def __init__(self, args, strategy: str):
        super().__init__()
        self.args, self.strategy_name = args, strategy
        self.model = None
        self.losses: list[float] = []

    def configure_model(self):
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        config = model_config(self.args.config)
        if self.strategy_name == "deepspeed_stage_3":
            # Lightning builds this under zero.Init, where parameters are already partitioned (size 0);
            # transformers' init would index the embedding's padding row and fail (with or without us).
            config.pad_token_id = None
        self.model = AutoModelForCausalLM.from_config(config)
        if self.strategy_name == "model_parallel":  # the module shards itself (FSDP2)
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = self.device_mesh["data_parallel"]
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if self.args.precision == "bf16" else MixedPrecisionPolicy()
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard([self.model.model.norm, self.model.lm_head], mesh=mesh, mp_policy=mp,
                        reshard_after_forward=False)
            fully_shard(self.model, mesh=mesh, mp_policy=mp)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(self.all_gather(loss.detach().float()).mean().item())
        self.wrapper = type(self.trainer.strategy.model).__name__  # what the strategy trains
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.args.lr)


def make_strategy(name: str, args):
    from lightning.pytorch import strategies

    if name == "model_parallel":
        return strategies.ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    if name == "fsdp":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return strategies.FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=True)
    return name  # "ddp", "deepspeed_stage_2", "deepspeed_stage_3": Lightning's registered names


def loader(args, seed: int, n: int):
    data = TokenData(n, args.seq, model_config(args.config).vocab_size, seed=seed)
    rows = [{"input_ids": data.ids[i], "labels": data.labels[i]} for i in range(n)]
    return torch.utils.data.DataLoader(rows, batch_size=args.batch, shuffle=False)


def fit(args, strategy: str, liger: bool, probe: KernelProbe):
    precision = {"fp32": "32-true", "bf16": "bf16-mixed"}[args.precision]
    callbacks = [LigerCallback()] if liger else []
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=make_strategy(strategy, args),
        precision=precision, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    module = Module(args, strategy)
    probe.reset()
    # One epoch of exactly max_steps batches; the validation runs at its end, inside the same fit (no
    # second strategy set-up of the wrapped model).
    trainer.fit(module, loader(args, 1, args.steps * args.batch * args.devices),
                loader(args, 2, 2 * args.batch * args.devices))
    record = {"loss": module.losses, "calls": dict(probe.calls), "weights_seen": list(probe.weights),
              "wrapper": module.wrapper, "world_size": trainer.world_size,
              "val_loss": float(trainer.callback_metrics["val_loss"]),
              "patched_after_wrap": is_liger(module.model.model.norm.forward)
              and is_liger(module.model.model.layers[0].mlp.forward)}
    if liger:
        unpatch(module.model)
    return record, trainer.global_rank, module.model.config


def main(argv=None):
    args = parse_args(argv)
    names = [s for s in args.strategies.split(",") if s]
    if set(names) - set(STRATEGIES):
        raise SystemExit(f"unknown strategies {sorted(set(names) - set(STRATEGIES))}; choose from {STRATEGIES}")
    probe = KernelProbe()
    summary = {"script": "lightning_train", "args": vars(args), "torch": torch.__version__,
               "lightning": pl.__version__, "results": {}}
    rank = 0
    for name in names:
        base, rank, config = fit(args, name, False, probe)
        ours, rank, _ = fit(args, name, True, probe)
        problems = []
        curves = compare_runs(base, ours, args.precision)
        eval_curves = compare_runs({"loss": [base["val_loss"]]}, {"loss": [ours["val_loss"]]}, args.precision)
        if not curves["ok"] or not eval_curves["ok"]:
            problems.append("loss curve or validation loss differs from the unpatched run")
        if not ours["patched_after_wrap"] or base["calls"]["fused_linear_cross_entropy"]:
            problems.append("patched forwards lost by wrapping (or the unpatched run used kernels)")
        weight_problem = check_gathered_weight(ours["weights_seen"], config.vocab_size, config.hidden_size)
        if weight_problem:
            problems.append(weight_problem)
        summary["results"][name] = {"ok": not problems, "problems": problems, "checks": curves,
                                    "base": base, "liger": ours}
    failed = [name for name, result in summary["results"].items() if not result["ok"]]
    summary["ok"] = not failed
    if rank == 0:
        write_summary(summary, args.out)
    probe.close()
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
