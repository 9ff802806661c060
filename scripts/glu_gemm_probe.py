"""Can the gated MLP's elementwise passes ride in the matrix products' epilogues? (a probe, one GPU)

At the ANCHORS Llama shape (16384 tokens, hidden 2048, intermediate 8192, bf16) the gated MLP spends
~0.27 ms per layer in the glu forward (read g and u, write h) and ~0.54 ms in its backward (read dh, g, u;
write dg, du and h again), 12.8 ms of a 234 ms step (docs/e2e/h100_run15). Two of those tensors per
direction exist only to pass between a cuBLAS product and the glu kernel:
    forward:  g = x Wg^T, u = x Wu^T (written by cuBLAS) are read again by the glu kernel;
    backward: dh = dy Wd (written by cuBLAS) is read again by the glu backward.
A product that applies the glu in its epilogue skips them: 2 x 256 MiB per layer each way, ~5.8 ms
of the step at the copy bandwidth, if its own speed matches cuBLAS's (a Triton product that computed
the glu in its main loop instead, tried in session 10, ran 2.4x slower than cuBLAS + glu).

This times, on one GPU, for a few tile configurations each:
    forward:  cuBLAS (two products) + glu kernel  vs  one Triton kernel (two accumulators, glu epilogue)
    backward: cuBLAS + glu backward kernel       vs  one Triton kernel (glu-backward epilogue)
    plain:    cuBLAS dy Wd                        vs  the same Triton product with no epilogue
and checks that the fused outputs match the unfused ones (the products' bf16 rounding may differ in
the last bit where the accumulation order differs; the glu math is the glu kernels' own).

    python scripts/glu_gemm_probe.py --out glu_gemm_probe.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from liger_kernels._utils import INTERPRET
from liger_kernels.ops.glu import _SILU, _activation

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, GROUP_M); the fused forward holds two accumulators
CONFIGS = [(128, 128, 64, 4, 8, 8), (128, 128, 64, 3, 8, 8), (128, 256, 64, 3, 8, 8), (256, 128, 64, 3, 8, 8),
           (128, 128, 64, 4, 4, 8), (64, 128, 64, 4, 4, 8)]


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row blocks at a time (the B tiles stay in L2)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m


@triton.jit
def _gate_up_glu_kernel(x_ptr, wg_ptr, wu_ptr, g_ptr, u_ptr, h_ptr, M, N, K,
                        ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, UPCAST: tl.constexpr):
    """g = x Wg^T, u = x Wu^T, h = f(g) * u; x (M, K), Wg and Wu (N, K), outputs (M, N), all contiguous.
    K a multiple of BLOCK_K. Rows/columns past M/N are read from row/column (index mod M/N) and not stored."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (rows % M).to(tl.int64)[:, None] * K + ks[None, :]
    w_offs = (cols % N).to(tl.int64)[None, :] * K + ks[:, None]  # B[k, n] = W[n, k]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a, bg, bu = tl.load(x_ptrs + k), tl.load(wg_ptr + w_offs + k), tl.load(wu_ptr + w_offs + k)
        if UPCAST:  # the interpreter's tl.dot multiplies bf16 bit patterns; fp32 products are exact
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g)
        acc_u = tl.dot(a, bu, acc_u)
    g = acc_g.to(g_ptr.dtype.element_ty)
    u = acc_u.to(u_ptr.dtype.element_ty)
    f, _ = _activation(g.to(tl.float32), ACT)  # from the stored (rounded) g and u, as the glu kernel reads them
    h = (f * u.to(tl.float32)).to(h_ptr.dtype.element_ty)
    out = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(g_ptr + out, g, mask=mask)
    tl.store(u_ptr + out, u, mask=mask)
    tl.store(h_ptr + out, h, mask=mask)


@triton.jit
def _down_grad_glu_kernel(dy_ptr, wd_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, M, N, K,
                          ACT: tl.constexpr, EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          UPCAST: tl.constexpr):
    """dh = dy Wd; dy (M, K), Wd (K, N) (the down projection's (hidden, intermediate) weight), contiguous.
    EPILOGUE: dg = dh * u * f'(g), du = dh * f(g), h = f(g) * u from dh rounded to bf16 as the unfused
    path stores it; else dh itself into dg_ptr (the plain product, for timing)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + (rows % M).to(tl.int64)[:, None] * K + ks[None, :]
    b_ptrs = wd_ptr + ks.to(tl.int64)[:, None] * N + (cols % N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a, b = tl.load(a_ptrs + k), tl.load(b_ptrs + k * N)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    dh = acc.to(dg_ptr.dtype.element_ty)
    out = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if EPILOGUE:
        dh = dh.to(tl.float32)
        g = tl.load(g_ptr + out, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + out, mask=mask, other=0.0).to(tl.float32)
        f, df = _activation(g, ACT)
        tl.store(dg_ptr + out, (dh * u * df).to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + out, (dh * f).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + out, (f * u).to(h_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dg_ptr + out, dh, mask=mask)


def _grid(M, N, cfg):
    return (triton.cdiv(M, cfg[0]) * triton.cdiv(N, cfg[1]),)


def fused_gate_up_glu(x, wg, wu, cfg):
    M, K = x.shape
    N = wg.shape[0]
    assert K % cfg[2] == 0, "K must be a multiple of BLOCK_K"
    g, u, h = (torch.empty(M, N, device=x.device, dtype=x.dtype) for _ in range(3))
    bm, bn, bk, stages, warps, group = cfg
    _gate_up_glu_kernel[_grid(M, N, cfg)](x, wg, wu, g, u, h, M, N, K, ACT=_SILU, BLOCK_M=bm, BLOCK_N=bn,
                                          BLOCK_K=bk, GROUP_M=group, UPCAST=INTERPRET, num_stages=stages,
                                          num_warps=warps)
    return g, u, h


def fused_down_grad_glu(dy, wd, g, u, cfg, epilogue=True):
    M, K = dy.shape
    N = wd.shape[1]
    assert K % cfg[2] == 0, "K must be a multiple of BLOCK_K"
    dg = torch.empty(M, N, device=dy.device, dtype=dy.dtype)
    du, h = (torch.empty_like(dg) for _ in range(2)) if epilogue else (dg, dg)
    bm, bn, bk, stages, warps, group = cfg
    _down_grad_glu_kernel[_grid(M, N, cfg)](dy, wd, g, u, dg, du, h, M, N, K, ACT=_SILU, EPILOGUE=epilogue,
                                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group,
                                            UPCAST=INTERPRET, num_stages=stages, num_warps=warps)
    return (dg, du, h) if epilogue else dg


def unfused_forward(x, wg, wu):
    from liger_kernels.ops import glu

    g, u = x @ wg.T, x @ wu.T
    return g, u, glu._glu_forward(g, u, _SILU)


def unfused_backward(dy, wd, g, u):
    from liger_kernels.ops import glu

    dh = dy @ wd
    return glu._glu_backward_and_output(dh, g, u, _SILU)


def _max_diff(a, b):
    return float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1e-30)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from liger_kernels.bench import warm_up_gpu

    warm_up_gpu(3.0)
    torch.manual_seed(0)
    M, H, I = args.tokens, args.hidden, args.intermediate
    kw = dict(device="cuda", dtype=torch.bfloat16)
    x, dy = torch.randn(M, H, **kw), torch.randn(M, H, **kw) * 1e-2
    wg, wu, wd = (torch.randn(I, H, **kw) * H**-0.5, torch.randn(I, H, **kw) * H**-0.5,
                  torch.randn(H, I, **kw) * I**-0.5)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200)  # noqa: E731
    mm_ms = bench(lambda: dy @ wd)
    report = {"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "shape": [M, H, I],
              "cublas_tflops": 2 * M * H * I / mm_ms / 1e9,
              "unfused_forward_ms": bench(lambda: unfused_forward(x, wg, wu)), "cublas_plain_ms": mm_ms,
              "configs": []}
    ref_f = unfused_forward(x, wg, wu)
    ref_b = unfused_backward(dy, wd, ref_f[0], ref_f[1])
    report["unfused_backward_ms"] = bench(lambda: unfused_backward(dy, wd, ref_f[0], ref_f[1]))
    print(f"cuBLAS dy @ Wd {mm_ms:.3f} ms ({report['cublas_tflops']:.0f} TFLOP/s); unfused forward "
          f"{report['unfused_forward_ms']:.3f} ms, backward {report['unfused_backward_ms']:.3f} ms", flush=True)
    for cfg in CONFIGS:
        row = {"config": list(cfg)}
        for name, fn, ref in (("forward", lambda: fused_gate_up_glu(x, wg, wu, cfg), ref_f),
                              ("backward", lambda: fused_down_grad_glu(dy, wd, ref_f[0], ref_f[1], cfg), ref_b),
                              ("plain", lambda: fused_down_grad_glu(dy, wd, None, None, cfg, epilogue=False),
                               None)):
            try:
                outs = fn()
                row[f"{name}_ms"] = bench(fn)
                if ref is not None:
                    row[f"{name}_max_rel_diff"] = max(_max_diff(a, b) for a, b in zip(outs, ref))
            except Exception as error:  # e.g. out of shared memory for this tile: recorded, the rest runs
                row[f"{name}_error"] = repr(error)[:200]
        if "plain_ms" in row:
            row["plain_tflops"] = 2 * M * H * I / row["plain_ms"] / 1e9
        report["configs"].append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
        if args.out:  # after every config: a run cut short by its time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
