"""What is alive at the peak of one training step of the end-to-end setup (CUDA caching allocator history).

    python scripts/memory_peak.py --setups ours,ours_compile --out peak.json

Same model and step as liger_plugins/bench_e2e.py. After warm-up steps, the allocator records one step
with stack frames; replaying its alloc/free events finds the moment of most memory allocated during that
step (on top of what was allocated before it: weights, optimizer state) and groups the blocks alive then
by the code that allocated them (the innermost frames outside torch's own Python).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from liger_plugins.bench_e2e import FAMILIES, release, training_step


def _where(frames) -> str:
    # torch's own Python is skipped (not transformers', also under a venv in /opt/torch); Inductor's
    # generated code lives in /tmp and is kept
    picked = [f for f in frames if "site-packages/torch/" not in f["filename"]][:3]
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in picked) or "?"


def peak_of_step(setup: str, family: str, batch: int, seq: int) -> dict:
    model, step = training_step(family, setup, batch, seq)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=500000)
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for e in snapshot["device_traces"][0] if e["action"] in ("alloc", "free_completed")]
    current = peak = peak_index = 0
    for i, e in enumerate(events):  # find the peak
        current += e["size"] if e["action"] == "alloc" else -e["size"]
        if current > peak:
            peak, peak_index = current, i
    live = {}
    for e in events[: peak_index + 1]:  # the blocks alive at the peak
        if e["action"] == "alloc":
            live[e["addr"]] = e
        else:
            live.pop(e["addr"], None)
    groups = defaultdict(lambda: [0, 0])
    for e in live.values():
        g = groups[_where(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:25]
    release(model, setup)
    return {"setup": setup, "allocated_before_step_gib": before / 2**30,
            "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_above_before_gib": peak / 2**30, "peak_reached_by": _where(events[peak_index].get("frames", [])),
            "alive_at_peak": [{"gib": size / 2**30, "blocks": n, "where": where} for where, (size, n) in top]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default="ours,ours_compile")
    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", default="peak.json")
    args = parser.parse_args(argv)
    results = []
    for setup in args.setups.split(","):
        r = peak_of_step(setup, args.family, args.batch, args.seq)
        results.append(r)
        print(f"{setup}: before the step {r['allocated_before_step_gib']:.2f} GiB, max {r['max_allocated_gib']:.2f} "
              f"GiB, peak reached by {r['peak_reached_by']}", flush=True)
        for item in r["alive_at_peak"][:12]:
            print(f"    {item['gib']:6.2f} GiB {item['blocks']:5d} blocks  {item['where'][:150]}", flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
