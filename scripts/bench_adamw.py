"""One AdamW step over the parameters of the e2e Llama model (bench_e2e.FAMILIES), on one GPU.

torch's foreach AdamW (torch's default), torch's fused=True kernel, the foreach step under
torch.compile, and liger_kernels.optim.AdamW, side by side in one run: `triton.testing.do_bench`
median ms, the fraction of the measured copy bandwidth (a bf16 step must read p, g, m, v and write
p, m, v: 14 bytes per parameter), the step's peak memory beyond parameters, gradients and states,
the host time of one step, and whether the parameters and states after 3 steps from the same start
equal the foreach step's bit for bit.

    python scripts/bench_adamw.py --out docs/bench/adamw.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton


def _copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def _parameters(family: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from liger_plugins.bench_e2e import FAMILIES

    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _optimizers():
    from liger_kernels.optim import AdamW

    def compiled_foreach(params):
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        step = torch.compile(optimizer.step)
        return optimizer, step

    def plain(cls, **kwargs):
        def make(params):
            optimizer = cls(params, lr=1e-4, **kwargs)
            return optimizer, optimizer.step
        return make

    return {"torch_foreach": plain(torch.optim.AdamW, foreach=True),
            "torch_fused": plain(torch.optim.AdamW, fused=True),
            "torch_compile_foreach": compiled_foreach,
            "ours": plain(AdamW)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llama")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    from liger_kernels.bench import warm_up_gpu

    warm_up_gpu(3.0)
    bandwidth = _copy_bandwidth()
    base = _parameters(args.family, dtype)
    n = sum(p.numel() for p in base)
    ideal_bytes = 7 * n * base[0].element_size()
    reference = None
    results = {}
    for name, make in _optimizers().items():
        try:
            results[name] = _measure(name, make, base, reference, ideal_bytes, bandwidth)
        except Exception as error:  # e.g. a compile failure: recorded, the others still run
            results[name] = dict(error=repr(error)[:500])
            print(f"{name}: FAILED {error!r}"[:500], flush=True)
        if reference is None and "reference" in results[name]:
            reference = results[name].pop("reference")
        results[name].pop("reference", None)
        torch.cuda.empty_cache()
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  family=args.family, dtype=args.dtype, parameters=n, tensors=len(base),
                  copy_bandwidth_gb_s=bandwidth / 1e9, ideal_ms=ideal_bytes / bandwidth * 1e3, results=results)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def _measure(name, make, base, reference, ideal_bytes, bandwidth) -> dict:
    """One optimizer's numbers; its states after 3 steps come back as "reference" for the first one."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in base]
    for p, b in zip(params, base):
        p.grad = b.grad.clone()
    optimizer, step = make(params)
    for _ in range(3):  # states allocated, compiled, and 3 steps from one start for the bitwise check
        step()
    torch.cuda.synchronize()
    after = [t.clone() for p in params for t in (p.detach(), optimizer.state[p]["exp_avg"],
                                                 optimizer.state[p]["exp_avg_sq"])]
    differing = sum(int((a != b).sum()) for a, b in zip(after, reference or after))
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - resident
    ms = triton.testing.do_bench(step, warmup=50, rep=1000)
    host = []
    for _ in range(5):  # host time of one call on an idle GPU (launches, pointer tables)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        host.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    result = dict(ms=ms, bandwidth_fraction=ideal_bytes / (ms / 1e3) / bandwidth,
                  peak_extra_mib=peak_extra / 2**20, host_ms=sorted(host)[2],
                  elements_differing_from_foreach_after_3_steps=differing)
    print(f"{name:24s} {ms:8.3f} ms  {result['bandwidth_fraction']:6.1%} of copy bandwidth  "
          f"+{peak_extra / 2**20:8.1f} MiB  host {result['host_ms']:6.2f} ms  differing {differing}", flush=True)
    return dict(result, reference=after if reference is None else None)


if __name__ == "__main__":
    main()
