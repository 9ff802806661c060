"""End-to-end training throughput: Hugging Face eager vs + Liger-Kernel vs + liger-plugins, on one GPU.

The setup of ../shared/ANCHORS.md: Llama architecture (hidden 2048, 16 layers, 16 heads / 8 KV heads,
intermediate 8192, vocab 128256, untied), bf16 weights, AdamW, SDPA attention, batch 8 x 2048 tokens;
median step time of N steps after warm-up. Each setup runs in its own process, because Liger-Kernel
patches transformers' classes globally and a CUDA allocator's peak must not carry over.

    liger-plugins bench --e2e --out docs/e2e          (all setups; JSON + PNG)
    python -m liger_plugins.bench_e2e --one ours      (one setup, prints one JSON line)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                  tie_word_embeddings=False, max_position_embeddings=4096),
    "qwen3": dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, intermediate_size=6144, vocab_size=151936,
                  tie_word_embeddings=False, max_position_embeddings=4096),
    # a smoke-test size that runs on CPU in seconds (tests, and `--family tiny` anywhere)
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                 tie_word_embeddings=False, max_position_embeddings=256),
}
# setup name -> (what patches the model, gradient checkpointing, torch.compile[, optimizer]). The
# optimizer is torch's foreach AdamW (ANCHORS.md) unless a setup names another: "liger_adamw" is
# liger_kernels.optim.AdamW (the same numbers in one pass), "torch_fused_adamw" torch's fused=True
# kernel (other roundings), the same optimizer change open to a Liger-Kernel user.
SETUPS = {
    "hf_eager": ("none", False, False),
    "hf_eager_ckpt": ("none", True, False),
    "hf_compile": ("none", False, True),
    # compiled, only our causal-mask decision (no kernels): what of ours_compile's gain is attention
    "hf_compile_causal": ("causal_mask_only", False, True),
    "liger_kernel": ("liger_kernel", False, False),
    "liger_kernel_ckpt": ("liger_kernel", True, False),
    "ours": ("ours", False, False),
    "ours_ckpt": ("ours", True, False),
    "ours_compile": ("ours", False, True),
    "ours_adamw": ("ours", False, False, "liger_adamw"),
    "ours_ckpt_adamw": ("ours", True, False, "liger_adamw"),
    # our AdamW stepping each parameter inside backward (same numbers in this loop: no clipping or
    # accumulation), every gradient dropped as soon as it is stepped
    "ours_adamw_in_backward": ("ours", False, False, "liger_adamw_in_backward"),
    "ours_ckpt_adamw_in_backward": ("ours", True, False, "liger_adamw_in_backward"),
    "ours_compile_adamw": ("ours", False, True, "liger_adamw"),
    "liger_kernel_fused_adamw": ("liger_kernel", False, False, "torch_fused_adamw"),
    "ours_fused_adamw": ("ours", False, False, "torch_fused_adamw"),  # the HF Trainer's default optimizer
    "liger_kernel_ckpt_fused_adamw": ("liger_kernel", True, False, "torch_fused_adamw"),
}
# The patchers that call our apply_liger (and must unpatch after).
_OUR_PATCHERS = ("ours", "causal_mask_only")


def training_step(family: str, setup: str, batch: int, seq: int):
    """(model, step) for one setup: the model of `family` built (seed 0) and patched as `setup` says,
    and `step()`, one forward + backward + AdamW step on fixed random tokens, returning the loss.
    Shared by this benchmark, scripts/profile_e2e.py and scripts/memory_peak.py."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    patcher, checkpointing, compiled, optimizer_name = (SETUPS[setup] + ("torch_foreach_adamw",))[:4]
    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config._attn_implementation = "sdpa"
    if patcher == "liger_kernel":
        import liger_kernel.transformers as lk

        apply = getattr(lk, f"apply_liger_kernel_to_{family}")
        apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    if patcher in _OUR_PATCHERS:
        from liger_plugins.patching import apply_liger

        kernels = patcher == "ours"
        apply_liger(model, rope=kernels, rms_norm=kernels, swiglu=kernels, fused_linear_cross_entropy=kernels,
                    layer_norm=kernels, qkv_projections=kernels)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    forward = torch.compile(model) if compiled else model
    if optimizer_name in ("liger_adamw", "liger_adamw_in_backward"):
        from liger_kernels.optim import AdamW

        # in backward: step() and zero_grad() below find no gradient left
        optimizer = AdamW(model.parameters(), lr=1e-5, step_in_backward=optimizer_name.endswith("in_backward"))
    else:
        fused = optimizer_name == "torch_fused_adamw"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=not fused, fused=fused)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step():
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step.optimizer = optimizer  # for probes that step it their own way (scripts/adamw_overlap_probe.py)
    return model, step


def release(model, setup: str) -> None:
    """Undo our patch of `model` (module-level patches would otherwise outlive it in the process)."""
    if SETUPS[setup][0] in _OUR_PATCHERS:
        from liger_plugins.patching import unpatch

        unpatch(model)


def run_one(family: str, setup: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import torch

    model, step = training_step(family, setup, batch, seq)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    median = statistics.median(times)
    release(model, setup)
    return dict(family=family, setup=setup, batch=batch, seq=seq, steps=steps,
                step_ms=median * 1e3, tokens_per_s=batch * seq / median,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                device=device, losses=losses)


def run_all(families, setups, batch, seq, steps, warmup, out_dir, rounds: int = 1) -> list[dict]:
    """Each setup in its own process, `rounds` times, the order reversed every other round: the GPU's
    clocks drop as it heats up, so a setup that always ran last would be measured on a slower GPU.
    A setup's tokens/s is the median over its rounds (each a median of `steps` steps)."""
    results = []
    for family in families:
        runs: dict[str, list[dict]] = {s: [] for s in setups}
        for r in range(rounds):
            for setup in (setups if r % 2 == 0 else setups[::-1]):
                if SETUPS[setup][0] == "liger_kernel" and not _has_liger_kernel():
                    if r == 0:
                        print(f"skip {family}/{setup}: liger_kernel is not installed", flush=True)
                    continue
                run = _run_subprocess(family, setup, batch, seq, steps, warmup)
                runs[setup].append(run)
                if "error" in run:
                    print(f"FAILED {family}/{setup}:\n{run['error']}", flush=True)
                    continue
                peak = f"{run['peak_gib']:6.2f} GiB" if run["peak_gib"] is not None else "n/a (CPU)"
                print(f"{family:6s} {setup:18s} {run['tokens_per_s'] / 1e3:7.1f} k tok/s  "
                      f"{run['step_ms']:7.1f} ms/step  peak {peak}", flush=True)
        results += [_merge_rounds(family, setup, runs[setup]) for setup in setups if runs[setup]]
    if rounds > 1:
        for r in results:
            if "error" not in r:
                print(f"{r['family']:6s} {r['setup']:18s} {r['tokens_per_s'] / 1e3:7.1f} k tok/s (median of "
                      f"{len(r['rounds_tokens_per_s'])} rounds)", flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "e2e.json"), "w") as f:
            json.dump(dict(environment=_environment(), results=results), f, indent=1)
        _plot(results, os.path.join(out_dir, "e2e.png"))
    return results


def _run_subprocess(family, setup, batch, seq, steps, warmup) -> dict:
    cmd = [sys.executable, "-m", "liger_plugins.bench_e2e", "--one", setup, "--family", family,
           "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(family=family, setup=setup, error=(proc.stderr or proc.stdout)[-1500:])
    return json.loads(lines[-1])


def _merge_rounds(family, setup, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    if len(runs) == 1:
        return ok[0]
    step_ms = statistics.median(r["step_ms"] for r in ok)
    peaks = [r["peak_gib"] for r in ok if r["peak_gib"] is not None]
    return dict(ok[0], step_ms=step_ms, tokens_per_s=ok[0]["batch"] * ok[0]["seq"] / (step_ms / 1e3),
                peak_gib=max(peaks) if peaks else None,
                rounds_tokens_per_s=[r["tokens_per_s"] for r in ok], failed_rounds=len(runs) - len(ok))


def _has_liger_kernel() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def _environment() -> dict:
    import torch
    import transformers
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    return dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__)


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    labels = [f"{r['family']}\n{r['setup']}" for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, len(ok) * 1.1), 4.5))
    ax1.bar(labels, [r["tokens_per_s"] / 1e3 for r in ok], color="tab:blue")
    ax1.set_ylabel("k tokens/s")
    ax2.bar(labels, [r["peak_gib"] or 0.0 for r in ok], color="tab:orange")
    ax2.set_ylabel("peak GiB")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=7, rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=sorted(SETUPS), help="run one setup in this process, print JSON")
    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    parser.add_argument("--families", default="llama,qwen3")
    parser.add_argument("--setups", default="hf_eager,liger_kernel,ours,hf_eager_ckpt,liger_kernel_ckpt,ours_ckpt")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run every setup this many times, alternating order")
    parser.add_argument("--out", default="docs/e2e")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.family, args.one, args.batch, args.seq, args.steps, args.warmup)))
        return 0
    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; choose from {sorted(SETUPS)}")
    run_all(args.families.split(","), setups, args.batch, args.seq, args.steps, args.warmup, args.out,
            args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
