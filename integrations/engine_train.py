"""The sharding engines themselves, driven by a plain training loop: FSDP1, FSDP2, DeepSpeed ZeRO-2/3.

    torchrun --standalone --nproc_per_node 2 integrations/engine_train.py --engines fsdp1,fsdp2,zero2,zero3
    torchrun --standalone --nproc_per_node 2 integrations/engine_train.py --device cuda --precision bf16

This is how a custom loop (torchtitan-style FSDP2, `deepspeed.initialize`) uses them, and it is the only
way to run them on CPU: accelerate (hence the HF Trainer) turns FSDP and DeepSpeed off when the device is
the CPU, and Lightning refuses its FSDP and DeepSpeed strategies without a GPU. Here they run with gloo.

For every engine, the tiny Llama is built from one seed and trained twice, without and with
liger-plugins (patched after building, before wrapping, as the adapters do), and the run asserts:
- the patch kept every parameter object (same names, same ids) and the patched forwards survive wrapping;
- every fused-loss call saw the full, gathered lm_head weight (a plain (vocab, hidden) tensor, not a
  FSDP2 DTensor, a FSDP1 flat-parameter shard or an empty ZeRO-3 partition);
- the per-step loss (mean over ranks) and the global gradient norm the engine computes from its sharded
  gradients match the unpatched run, and so do the final parameters, gathered in full.
How the model is built and wrapped per engine:
- fsdp1: `FullyShardedDataParallel`, one unit per decoder layer, use_orig_params (lm_head in the root unit);
- fsdp2: `fully_shard` per decoder layer, the embedding alone, final norm + lm_head as one group (as
  accelerate groups them), then the root;
- zero2: `deepspeed.initialize`; zero3: the model built by transformers under `zero.Init` (through
  `HfDeepSpeedConfig`, as transformers does for ZeRO-3), so its parameters are partitioned from the start.
Prints and writes (--out) a JSON summary; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, KernelProbe, TokenData, check_gathered_weight, close, compare_runs, model_config, \
    param_ids, write_summary  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ENGINES = ("fsdp1", "fsdp2", "zero2", "zero3")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--config", default="configs/tiny/llama.json")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank and step")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", help="write the JSON summary here (rank 0)")
    return parser.parse_args(argv)


def deepspeed_config(stage: int, args, world: int) -> dict:
    """configs/deepspeed/zero{stage}.json with its "auto" values filled, as the HF Trainer fills them."""
    config = json.loads((ROOT / f"configs/deepspeed/zero{stage}.json").read_text())
    config.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1,
                  train_batch_size=args.batch * world, gradient_clipping=1.0)
    config["bf16"] = {"enabled": args.precision == "bf16"}
    config.pop("fp16", None)
    zero = config["zero_optimization"]
    for key, value in list(zero.items()):
        if value == "auto":  # bucket sizes and thresholds: DeepSpeed's own defaults
            del zero[key]
    config["zero_allow_untested_optimizer"] = True  # a torch optimizer, as the HF Trainer passes one
    return config


def build_model(engine: str, args, world: int):
    from transformers import AutoModelForCausalLM

    config = model_config(args.config)
    hf_ds = None
    if engine == "zero3":
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(deepspeed_config(3, args, world))  # from_config now builds under zero.Init
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if engine != "zero3":
        model.to(args.device)
    return model, hf_ds


def wrap(engine: str, model, args, world: int):
    """(what to call for training, optimizer or DeepSpeed engine)."""
    device = torch.device(args.device)
    layer_cls = type(model.model.layers[0])
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        bf16 = args.precision == "bf16"
        mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        # device_id=cpu: FSDP1 otherwise looks for an accelerator and refuses CPU-only runs.
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer_cls}), use_orig_params=True,
                                           device_id=device if args.device == "cpu" else torch.cuda.current_device(),
                                           mixed_precision=mp)
        return wrapped, make_optimizer(wrapped.parameters(), args)
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(args.device, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if args.precision == "bf16" else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model.model.embed_tokens, mesh=mesh, mp_policy=mp)
        fully_shard([model.model.norm, model.lm_head], mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model, make_optimizer(model.parameters(), args)
    import deepspeed

    stage = int(engine[-1])
    optimizer = make_optimizer(model.parameters(), args)
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(stage, args, world))
    return ds_engine, ds_engine


def make_optimizer(params, args):
    # SGD with momentum: its state is sharded like Adam's, and the final parameters are linear in the
    # gradients, so they can be compared tightly (Adam turns rounding noise in near-zero gradients
    # into full +-lr steps).
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9)


def global_grad_norm(engine: str, wrapped) -> float:
    if engine == "fsdp1":
        return float(wrapped.clip_grad_norm_(1.0))
    norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)  # DTensor grads: a DTensor norm
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_params(engine: str, model, wrapped) -> list[torch.Tensor]:
    """Every parameter of the model, gathered in full, as fp32 CPU tensors (same order in every run)."""
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            return [p.detach().float().cpu().clone() for p in wrapped.parameters()]
    if engine == "fsdp2":
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        return [p.detach().float().cpu() for p in full]
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params) if engine == "zero3" else nullcontext():
        return [p.detach().float().cpu().clone() for p in params]


def train(engine: str, liger: bool, args, world: int, rank: int, probe: KernelProbe) -> dict:
    from liger_plugins.patching import apply_liger, unpatch
    from liger_plugins.patching.forwards import is_liger

    model, hf_ds = build_model(engine, args, world)
    record = {"loss": [], "grad_norm": []}
    if liger:
        before = param_ids(model)
        apply_liger(model)
        record["param_identity_kept"] = param_ids(model) == before
    wrapped, optimizer = wrap(engine, model, args, world)
    record["patched_after_wrap"] = is_liger(model.forward) and is_liger(model.model.norm.forward)
    record["lm_head_weight"] = type(model.lm_head.weight).__name__ + str(list(model.lm_head.weight.shape))
    config = model.config
    data = TokenData(args.steps * world * args.batch, args.seq, config.vocab_size)
    probe.reset()
    for step in range(args.steps):
        start = (step * world + rank) * args.batch
        ids = data.ids[start:start + args.batch].to(args.device)
        labels = data.labels[start:start + args.batch].to(args.device)
        loss = wrapped(input_ids=ids, labels=labels).loss  # bf16: the engine casts (FSDP policy, DS bf16)
        if engine.startswith("zero"):
            wrapped.backward(loss)
            wrapped.step()
            norm = float(wrapped.get_global_grad_norm())
        else:
            loss.backward()
            norm = global_grad_norm(engine, wrapped)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        record["loss"].append(mean.item() / world)
        record["grad_norm"].append(norm)
    record["calls"] = dict(probe.calls)
    record["weights_seen"] = list(probe.weights)
    params = full_params(engine, model, wrapped)
    if liger:
        unpatch(model)
    if engine.startswith("zero"):
        wrapped.destroy()
    del hf_ds  # ZeRO-3 stays "enabled" for transformers while this object lives
    return record, params, config


def main(argv=None):
    args = parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    if any(e.startswith("zero") for e in engines):
        import importlib

        import deepspeed

        if args.device == "cpu":
            # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (minutes, needs a C++
            # toolchain) at init; gloo does the collectives without it. (`deepspeed.comm.torch` as an
            # attribute is the torch package, hence the module lookup by name.)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # Before zero.Init reads the world size (it is 1 until DeepSpeed's comm layer is set up).
        deepspeed.init_distributed()
    probe = KernelProbe()
    summary = {"script": "engine_train", "device": args.device, "precision": args.precision, "world_size": world,
               "torch": torch.__version__, "results": {}}
    failed = []
    for engine in engines:
        base, base_params, config = train(engine, False, args, world, rank, probe)
        ours, our_params, _ = train(engine, True, args, world, rank, probe)
        checks = compare_runs(base, ours, args.precision)
        atol, rtol = (1e-4, 1e-4) if args.precision == "fp32" else (2e-2, 5e-2)
        checks["params_ok"] = all(close(a.flatten().tolist(), b.flatten().tolist(), atol, rtol)[0]
                                  for a, b in zip(our_params, base_params))
        problems = []
        if not checks["ok"]:
            problems.append("loss / grad-norm curves differ")
        if not checks["params_ok"]:
            problems.append("final parameters differ")
        if not ours["param_identity_kept"]:
            problems.append("apply_liger replaced parameters")
        if not ours["patched_after_wrap"] or base["calls"]["fused_linear_cross_entropy"]:
            problems.append("patched forwards lost by wrapping (or the unpatched run used kernels)")
        weight_problem = check_gathered_weight(ours["weights_seen"], config.vocab_size, config.hidden_size)
        if weight_problem:
            problems.append(weight_problem)
        summary["results"][engine] = {"ok": not problems, "problems": problems, "checks": checks,
                                      "base": base, "liger": ours}
        if problems:
            failed.append(engine)
    summary["ok"] = not failed
    if rank == 0:
        write_summary(summary, args.out)
    probe.close()
    dist.barrier()
    dist.destroy_process_group()
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
