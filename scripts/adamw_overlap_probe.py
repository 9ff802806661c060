"""Probe: our AdamW stepped inside backward, as each parameter's gradient is final, against the step
after backward (one GPU, bench_e2e's `ours_adamw` setup).

Inside the e2e step our AdamW's kernels take 7.65 ms of the H200's ~235 ms (docs/e2e/h200_run1), all
after the last backward product, with the GPU doing nothing else. Stepping each parameter from a
post-accumulate-grad hook gives the same numbers when nothing reads the gradients between backward
and the step (no clipping, no accumulation, no loss scaler: this benchmark's loop) and frees each
gradient at once. Modes, on one model, switched between blocks of steps in alternating rounds:
    after        optimizer.step() after backward (bench_e2e)
    inline       each parameter's step launched from its hook, on the backward's stream
    side         the same on a second stream (waits for the gradient, overlaps later backward kernels)
    side_high    the same on a high-priority stream
Reports the step time (a sync per step, as bench_e2e), peak memory, and how many parameter values
after 2 steps from one snapshot differ from the `after` mode's, next to a second `after` run's count
(session 12, H100: every mode differed, with no such baseline; on CPU, under the interpreter, the
in-backward step equals the step after backward bit for bit).

    python scripts/adamw_overlap_probe.py --out overlap.json
"""

from __future__ import annotations

import statistics
import time

import torch
from _step_probe import parse_args, write_report

MODES = ("after", "inline", "side", "side_high")


class StepInBackward:
    """Post-accumulate-grad hooks that step each parameter as AdamW(step_in_backward=True) does
    (`_step_now`: its step, then its gradient dropped), on `stream` if given."""

    def __init__(self, model, optimizer, stream):
        self.stream = stream
        group_of = {p: g for g in optimizer.param_groups for p in g["params"]}

        def hook(param):
            if stream is None:
                optimizer._step_now(group_of[param], param)
                return
            stream.wait_stream(torch.cuda.current_stream())
            param.grad.record_stream(stream)  # its memory is not reused before the step has read it
            with torch.cuda.stream(stream):
                optimizer._step_now(group_of[param], param)

        self.handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters() if p.requires_grad]

    def finish(self):
        if self.stream is not None:  # the next forward reads the updated parameters
            torch.cuda.current_stream().wait_stream(self.stream)

    def remove(self):
        for h in self.handles:
            h.remove()


def main(argv=None):
    args = parse_args(__doc__, argv)

    from liger_kernels.bench import warm_up_gpu
    from liger_plugins.bench_e2e import release, training_step

    warm_up_gpu(3.0)
    model, step = training_step(args.family, "ours_adamw", args.batch, args.seq)
    optimizer = step.optimizer
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    for _ in range(2):
        step()  # states exist from here on
    torch.cuda.synchronize()
    streams = dict(after=None, inline=None, side=torch.cuda.Stream(), side_high=torch.cuda.Stream(priority=-1))

    hooks = {}  # the mode's hooks, registered once per block of steps (see `switch`)

    def switch(mode):
        for h in hooks.values():
            h.remove()
        hooks.clear()
        if mode != "after":
            hooks[mode] = StepInBackward(model, optimizer, streams[mode])

    def run(mode):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if mode == "after":
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            hooks[mode].finish()
        return loss

    # exactness: 2 steps of each mode from one snapshot of parameters and states
    params = [p for p in model.parameters()]
    snapshot = [(p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()}) for p in params]

    def restore():
        with torch.no_grad():
            for p, (value, state) in zip(params, snapshot):
                p.copy_(value)
                for k, v in state.items():
                    optimizer.state[p][k].copy_(v)

    # The step's backward is not deterministic on the GPU (cuDNN attention's dQ and the embedding's
    # gradient add with atomics): a second `after` run is the baseline a mode's difference is read against.
    finals = {}
    for mode in ("after", "after_again", *MODES[1:]):
        restore()
        switch(mode.replace("_again", ""))
        losses = [float(run(mode.replace("_again", ""))) for _ in range(2)]
        torch.cuda.synchronize()
        finals[mode] = (losses, [p.detach().clone() for p in params])
    switch("after")
    exact = {}
    for mode, (losses, ps) in finals.items():
        differing = sum(int((a != b).sum()) for a, b in zip(ps, finals["after"][1]))
        exact[mode] = dict(losses=losses, values_differing_from_after=differing,
                           equal_to_after=differing == 0)
        print(mode, exact[mode], flush=True)
    del snapshot, finals
    torch.cuda.empty_cache()

    samples = {m: dict(step_ms=[], peak_gib=[]) for m in MODES}
    for round_index in range(args.rounds):
        for mode in MODES if round_index % 2 == 0 else MODES[::-1]:
            switch(mode)
            run(mode)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.steps):
                start = time.perf_counter()
                run(mode)
                torch.cuda.synchronize()
                samples[mode]["step_ms"].append((time.perf_counter() - start) * 1e3)
            samples[mode]["peak_gib"].append(torch.cuda.max_memory_allocated() / 2**30)
    switch("after")
    release(model, "ours_adamw")
    results = []
    for mode, s in samples.items():
        step_ms = statistics.median(s["step_ms"])
        row = dict(mode=mode, step_ms=step_ms, tokens_per_s=args.batch * args.seq / step_ms * 1e3,
                   peak_gib=max(s["peak_gib"]), **exact[mode])
        results.append(row)
        print(f"{mode:10s} step {step_ms:7.2f} ms ({row['tokens_per_s'] / 1e3:5.1f} k tok/s)  "
              f"peak {row['peak_gib']:.2f} GiB  values differing from after: {row['values_differing_from_after']}",
              flush=True)
    results.append(dict(mode="after_again", **exact["after_again"]))
    write_report(args, results)


if __name__ == "__main__":
    main()
