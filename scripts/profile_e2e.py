"""Where one training step of the end-to-end setup spends its GPU time, by kernel family.

    python scripts/profile_e2e.py --setups hf_eager,ours --out docs/e2e/profile.json

Same model, batch, optimizer and torch.compile setting as `liger-plugins bench --e2e`
(liger_plugins/bench_e2e.py). After a few warm-up steps, torch.profiler records `--steps` steps;
every CUDA kernel's time is put into one family by its name (matmul, attention, our Triton kernels,
optimizer, other) and reported per step.
Matmul + attention is what no elementwise fusion can shorten: it bounds the speed-up left.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from liger_plugins.bench_e2e import FAMILIES, release, training_step

FAMILY_PATTERNS = [  # first match wins; names as the CUDA profiler reports them
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|sm90_|cublas|matmul|splitK"),
    ("optimizer", r"multi_tensor|foreach|adam"),
    ("ours (triton)", r"^_\w*kernel"),
    ("inductor (triton)", r"^triton_"),
    (
        "elementwise/reduce (torch)",
        r"elementwise|vectorized|reduce|unrolled|index|copy|cat|fill|softmax|gather|scatter",
    ),
]


def family(name: str) -> str:
    for label, pattern in FAMILY_PATTERNS:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def idle_gaps(spans, n: int = 8):
    """GPU time with no kernel running between the first and last kernel (ms, all steps), and the
    largest such gaps with the kernels around them: where the host, not the GPU, set the pace."""
    spans.sort()
    idle, gaps, busy_until, last = 0.0, [], None, ""
    for start, end, name in spans:
        if busy_until is not None and start > busy_until:
            gap = (start - busy_until) / 1e3
            idle += gap
            gaps.append({"ms": gap, "after": last[:80], "before": name[:80]})
        if busy_until is None or end > busy_until:
            busy_until, last = end, name
    return idle, sorted(gaps, key=lambda g: -g["ms"])[:n]


def host_during_gaps(step, steps: int, n: int = 6) -> list[dict]:
    """What the host was doing while the GPU sat idle: one more profiled pass, with host-side ops
    recorded and a sync after each step as bench_e2e has; for each of the largest gaps, the ops running
    on the host at its middle, innermost first (a sync, an allocation or plain Python between launches).
    Profiling the host slows it, so the gaps here are longer than in the GPU-only pass; their places
    are what counts."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
            torch.cuda.synchronize()  # as bench_e2e times a step: the host's lead is lost at every step start
    spans, host = [], []
    for evt in prof.events():
        if getattr(evt, "is_user_annotation", False):  # record_function ranges, also on the GPU's timeline
            continue
        rng = (evt.time_range.start, evt.time_range.end, evt.name)
        (spans if evt.device_type == torch.autograd.DeviceType.CUDA else host).append(rng)
    spans.sort()
    gaps, busy_until, last = [], None, ""
    for start, end, name in spans:
        if busy_until is not None and start > busy_until:
            gaps.append((start - busy_until, busy_until, start, last, name))
        if busy_until is None or end > busy_until:
            busy_until, last = end, name
    rows = []
    for length, g0, g1, before, after in sorted(gaps, reverse=True)[:n]:
        mid = (g0 + g1) / 2
        running = sorted((e - s, name) for s, e, name in host if s <= mid <= e)
        rows.append({"ms": length / 1e3, "after": before[:60], "before": after[:60],
                     "host_ops_innermost_first": [name[:60] for _, name in running[:6]]})
    return rows


def top_ops(step, steps: int, n: int = 40) -> list[dict]:
    """The torch ops (with their input shapes) whose own kernels take the most GPU time per step: which
    matrix product runs at what rate, what a copy or cat kernel belongs to."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    rows.sort(key=lambda e: -e.self_device_time_total)
    return [{"op": e.key, "shapes": str(e.input_shapes)[:160], "calls_per_step": e.count / steps,
             "ms": e.self_device_time_total / 1e3 / steps} for e in rows[:n]]


def profile(setup: str, family_name: str, batch: int, seq: int, steps: int, ops: bool = False,
            host_gaps: bool = False) -> dict:
    model, step = training_step(family_name, setup, batch, seq)  # any setup, Liger-Kernel's too
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps  # unprofiled: GPU time + host gaps
    # as bench_e2e times it, a sync after every step: the GPU also waits for the host to reach the
    # next step's first kernel (the difference is what the per-step sync costs)
    synced = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        synced.append((time.perf_counter() - start) * 1e3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_family, per_kernel, spans = {}, {}, []
    for evt in prof.events():  # device-side events only: kernels and memcpy/memset, each once
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        spans.append((evt.time_range.start, evt.time_range.end, evt.name))
        ms = evt.time_range.elapsed_us() / 1e3 / steps
        fam = family(evt.name)
        per_family[fam] = per_family.get(fam, 0.0) + ms
        prev = per_kernel.get(evt.name, (fam, 0.0))[1]
        per_kernel[evt.name] = (fam, prev + ms)
    total = sum(per_family.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:25]
    idle_ms, gaps = idle_gaps(spans)
    op_rows = top_ops(step, steps) if ops else []
    gap_rows = host_during_gaps(step, steps) if host_gaps else []
    release(model, setup)
    return {"setup": setup, "family": family_name, "batch": batch, "seq": seq, "steps": steps,
            "wall_ms_per_step": wall_ms, "wall_ms_per_step_synced": sorted(synced)[len(synced) // 2],
            "gpu_ms_per_step": total,
            "ms_per_step_by_family": dict(sorted(per_family.items(), key=lambda kv: -kv[1])),
            "gpu_idle_ms_per_step": idle_ms / steps, "largest_idle_gaps": gaps,
            "top_kernels_ms_per_step": [{"name": k[:120], "family": f, "ms": ms} for k, (f, ms) in top],
            "top_ops_ms_per_step": op_rows, "host_during_largest_gaps": gap_rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default="hf_eager,ours")
    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ops", action="store_true", help="also the top torch ops with their input shapes")
    parser.add_argument("--gaps", action="store_true", help="also what the host ran during the largest GPU gaps")
    parser.add_argument("--out", default="docs/e2e/profile.json")
    args = parser.parse_args(argv)
    results = []
    for setup in args.setups.split(","):
        r = profile(setup, args.family, args.batch, args.seq, args.steps, args.ops, args.gaps)
        results.append(r)
        fams = ", ".join(f"{k} {v:.1f}" for k, v in r["ms_per_step_by_family"].items())
        print(f"{setup}: {r['wall_ms_per_step']:.1f} wall ms/step ({r['wall_ms_per_step_synced']:.1f} with a sync per "
              f"step), {r['gpu_ms_per_step']:.1f} GPU ms/step: {fams}", flush=True)
        for k in r["top_kernels_ms_per_step"][:14]:
            print(f"    {k['ms']:7.2f} ms  {k['family']:20s} {k['name'][:90]}", flush=True)
        print(f"    GPU idle {r['gpu_idle_ms_per_step']:.1f} ms/step; largest gaps:", flush=True)
        for g in r["largest_idle_gaps"]:
            print(f"    {g['ms']:7.2f} ms  after {g['after'][:50]}  before {g['before'][:50]}", flush=True)
        for g in r["host_during_largest_gaps"]:
            ops = " < ".join(g["host_ops_innermost_first"])
            print(f"    host gap {g['ms']:6.2f} ms before {g['before'][:40]}: {ops}", flush=True)
        for o in r["top_ops_ms_per_step"]:
            print(f"    {o['ms']:7.2f} ms  {o['calls_per_step']:5.0f}x {o['op']:28s} {o['shapes'][:100]}", flush=True)
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
