"""Probe: sibling projections (q/k/v; gate/up) as one product over concatenated weights, against one
product per projection, at the e2e shapes (one GPU, cuBLAS via torch).

Our ops run q/k/v (`linear_projections`) and gate/up (`gated_mlp`) as separate products, summing the
input gradients in the second product's epilogue (`addmm_`). With the weights adjacent in memory the
three products of each pass could be one:
    forward  y = x @ [W1; W2; ...]^T                (M x K) @ (K x sum N)
    dx       dY @ [W1; W2; ...]                     one product with K' = sum N, no addmm_ chain
    dW       dY^T @ x                                one (sum N) x K output
This times both ways per pass (median of triton.testing.do_bench after a warm-up) to see whether the
larger products pay for keeping the weights adjacent.

    python scripts/projection_concat_probe.py --out concat.json
"""

from __future__ import annotations

import argparse
import json

import torch

# (name, tokens M, hidden K, output widths of the sibling projections); Qwen3's q/k/v equal the Llama's
SHAPES = [
    ("llama_qkv", 16384, 2048, (2048, 1024, 1024)),
    ("llama_gate_up", 16384, 2048, (8192, 8192)),
    ("qwen3_gate_up", 16384, 2048, (6144, 6144)),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from triton.testing import do_bench

    from liger_kernels.bench import warm_up_gpu

    warm_up_gpu(3.0)
    dtype = torch.bfloat16
    rows = []
    for name, m, k, widths in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for n in widths]
        grads = [torch.randn(m, n, device="cuda", dtype=dtype) for n in widths]
        w_cat = torch.cat(weights)
        g_cat = torch.cat(grads, dim=1)
        flops = 2 * m * k * sum(widths)

        def fwd_split():
            return [x.mm(w.t()) for w in weights]

        def dx_split():
            out = grads[0].mm(weights[0])
            for g, w in zip(grads[1:], weights[1:]):
                out.addmm_(g, w)
            return out

        def dw_split():
            return [g.t().mm(x) for g in grads]

        cases = dict(
            forward=(fwd_split, lambda: x.mm(w_cat.t())),
            dx=(dx_split, lambda: g_cat.mm(w_cat)),
            dw=(dw_split, lambda: g_cat.t().mm(x)),
        )
        for pass_name, (split, fused) in cases.items():
            split_ms = do_bench(split, warmup=50, rep=300, return_mode="median")
            fused_ms = do_bench(fused, warmup=50, rep=300, return_mode="median")
            row = dict(shape=name, m=m, k=k, widths=list(widths), pass_=pass_name, split_ms=split_ms,
                       concat_ms=fused_ms, split_tflops=flops / split_ms / 1e9, concat_tflops=flops / fused_ms / 1e9)
            rows.append(row)
            print(f"{name:14s} {pass_name:8s} split {split_ms:6.3f} ms ({row['split_tflops']:4.0f} TFLOP/s)  "
                  f"concat {fused_ms:6.3f} ms ({row['concat_tflops']:4.0f})", flush=True)
        # the concatenation itself, per forward, if the weights were not kept adjacent
        cat_ms = do_bench(lambda: torch.cat(weights), warmup=20, rep=200, return_mode="median")
        rows.append(dict(shape=name, pass_="cat_weights", ms=cat_ms))
        print(f"{name:14s} cat of the weights {cat_ms:6.3f} ms", flush=True)
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, results=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
