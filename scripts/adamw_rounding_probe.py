"""Which roundings torch's CUDA foreach AdamW ops use, and which ours uses, in fp32 (one GPU).

Each foreach op of torch's AdamW step runs on random fp32 tensors and is compared with candidate
formulas evaluated in float64 and rounded once (a fused multiply-add) or after every operation
(separate multiply and add; true division or multiplication by the reciprocal). Then one step of
liger_kernels.optim.AdamW is compared with torch's foreach step. Prints, per candidate, the fraction
of elements where it differs from torch; writes the same as JSON.

    python scripts/adamw_rounding_probe.py --out probe.json
"""

from __future__ import annotations

import argparse
import json

import torch


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def _d(x) -> torch.Tensor:
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)


def _differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    n = 1 << 22
    dev = "cuda"
    p = torch.randn(n, device=dev)
    g = torch.randn(n, device=dev) * 1e-2
    m = torch.randn(n, device=dev) * 1e-3
    v = torch.rand(n, device=dev) * 1e-5 + 1e-9
    w, s, b, step_size, c = 0.1, 0.001, 0.0435889894354067, -0.0031, 0.99985
    w32, s32, b32, ss32, c32 = (torch.tensor(x, dtype=torch.float32).item() for x in (w, s, b, step_size, c))
    report = {}

    r = [m.clone()]
    torch._foreach_lerp_(r, [g], w)
    diff = _f32(g - m)
    report["lerp"] = {"fma": _differ(r[0], _f32(_d(m) + _d(w32) * _d(diff))),
                      "separate": _differ(r[0], m + _f32(_d(w32) * _d(diff)))}

    r = [v.clone()]
    torch._foreach_addcmul_(r, [g], [g], s)
    gg = g * g
    report["addcmul"] = {"fma_s_gg": _differ(r[0], _f32(_d(v) + _d(s32) * _d(gg))),
                         "separate": _differ(r[0], v + _f32(_d(s32) * _d(gg))),
                         "fma_sg_g": _differ(r[0], _f32(_d(v) + _d(_f32(_d(s32) * _d(g))) * _d(g)))}

    r = torch._foreach_sqrt([v])
    report["sqrt"] = {"correctly_rounded": _differ(r[0], _f32(_d(v).sqrt())),
                      "torch_sqrt": _differ(r[0], v.sqrt())}

    d = r[0].clone()
    r = [d.clone()]
    torch._foreach_div_(r, [b])
    report["div_scalarlist"] = {"true_division": _differ(r[0], _f32(_d(d) / _d(b32))),
                                "reciprocal_f32": _differ(r[0], _f32(_d(d) * _d(_f32(1.0 / _d(b32))))),
                                "reciprocal_f64": _differ(r[0], _f32(_d(d) * _d(_f32(1.0 / _d(b)))))}
    d = r[0] + 1e-8

    r = [p.clone()]
    torch._foreach_addcdiv_(r, [m], [d], [step_size])
    q = _f32(_d(m) / _d(d))
    report["addcdiv_scalarlist"] = {"fma": _differ(r[0], _f32(_d(p) + _d(ss32) * _d(q))),
                                    "separate": _differ(r[0], p + _f32(_d(ss32) * _d(q)))}

    r = [p.clone()]
    torch._foreach_mul_(r, c)
    report["mul"] = {"single": _differ(r[0], _f32(_d(p) * _d(c32)))}

    # one full step: ours vs torch's foreach, fp32 and bf16
    from liger_kernels.optim import AdamW

    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(torch.randn(4097, 33, device=dev).to(dtype)) for _ in range(2)]
        mirror = [torch.nn.Parameter(q.detach().clone()) for q in params]
        ours = AdamW(params, lr=3e-3, weight_decay=0.05)
        theirs = torch.optim.AdamW(mirror, lr=3e-3, weight_decay=0.05, foreach=True)
        for _ in range(3):
            for a, z in zip(params, mirror):
                a.grad = (torch.randn_like(a, dtype=torch.float32) * 0.1).to(dtype)
                z.grad = a.grad.clone()
            ours.step()
            theirs.step()
        report[f"full_step_{dtype}"] = {
            "param": _differ(params[0], mirror[0]),
            "exp_avg": _differ(ours.state[params[0]]["exp_avg"], theirs.state[mirror[0]]["exp_avg"]),
            "exp_avg_sq": _differ(ours.state[params[0]]["exp_avg_sq"], theirs.state[mirror[0]]["exp_avg_sq"])}
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, fraction_differing=report)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
