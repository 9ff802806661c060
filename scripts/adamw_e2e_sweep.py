"""The AdamW kernel's tile shape measured inside the training step it serves (one GPU).

In isolation (scripts/bench_adamw.py) our step runs at ~89% of the copy bandwidth; inside the e2e
step the same kernels took 10.1 ms instead of 8.0 (profile, H100). Inside the step the tile chosen
in isolation (4096 elements, 8 warps) was the slowest but one: on the H200 (docs/e2e/h200_run1)
1024 x 4 warps took 7.65 ms against its 10.33, so that is the default now. Why the step differs
from the bench (clocks after ~200 ms of matrix products? L2 contents?) is not established.

This keeps one model of bench_e2e's `ours_adamw` setup and switches the tile (elements per program,
warps) between blocks of steps, in alternating rounds: the step time (with a sync per step, as
bench_e2e) and the optimizer's own GPU time (CUDA events around its step). The values do not depend
on the tile (the step is elementwise).

    python scripts/adamw_e2e_sweep.py --out adamw_sweep.json
"""

from __future__ import annotations

import statistics
import time

import torch
from _step_probe import parse_args, write_report

CONFIGS = [(1024, 4), (4096, 8), (2048, 4), (512, 4), (1024, 2), (2048, 8)]


def main(argv=None):
    args = parse_args(__doc__, argv)

    from liger_kernels import optim
    from liger_kernels.bench import warm_up_gpu
    from liger_kernels.ops import adamw
    from liger_plugins.bench_e2e import training_step

    events = []
    untimed_step = optim.AdamW.step

    def timed_step(self, closure=None):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = untimed_step(self, closure)
        end.record()
        events.append((start, end))
        return loss

    optim.AdamW.step = timed_step
    warm_up_gpu(3.0)
    _, step = training_step(args.family, "ours_adamw", args.batch, args.seq)
    for _ in range(3):
        step()
    default = (adamw._BLOCK, adamw._NUM_WARPS)
    samples = {c: dict(step_ms=[], optimizer_ms=[]) for c in CONFIGS}
    for round_index in range(args.rounds):
        for config in CONFIGS if round_index % 2 == 0 else CONFIGS[::-1]:
            adamw._BLOCK, adamw._NUM_WARPS = config
            step()  # compiles this tile
            torch.cuda.synchronize()
            events.clear()
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                torch.cuda.synchronize()
                samples[config]["step_ms"].append((time.perf_counter() - start) * 1e3)
            samples[config]["optimizer_ms"] += [s.elapsed_time(e) for s, e in events]
    adamw._BLOCK, adamw._NUM_WARPS = default
    results = []
    for (block, warps), s in samples.items():
        step_ms = statistics.median(s["step_ms"])
        row = dict(block=block, num_warps=warps, step_ms=step_ms, optimizer_ms=statistics.median(s["optimizer_ms"]),
                   tokens_per_s=args.batch * args.seq / step_ms * 1e3)
        results.append(row)
        print(f"BLOCK {block:5d}  warps {warps:2d}   step {step_ms:7.2f} ms  ({row['tokens_per_s'] / 1e3:5.1f} k tok/s)"
              f"   optimizer {row['optimizer_ms']:6.2f} ms", flush=True)
    write_report(args, results, default=dict(block=default[0], num_warps=default[1]))


if __name__ == "__main__":
    main()
