"""y = (f(a) * b) @ W.T (+ residual) in one Triton kernel: the gated activation computed while the
product loads its left operand, so c = f(a) * b is never written to memory.

The gated MLP's forward otherwise runs the glu kernel (read a and b, write c: 3 x tokens x
intermediate elements) and then cuBLAS (read c again). Here each (BLOCK_M, BLOCK_K) tile of c is
computed from the tiles of a and b -- the glu kernel's `_activation`, in fp32, rounded to the inputs'
dtype, so the operand equals the glu kernel's c bit for bit -- and fed to `tl.dot` with fp32
accumulation. The result is the same function as `F.linear(c, W)` (`addmm(residual, c, W.T)`: the
residual added to the fp32 accumulator, one rounding); only the order of the fp32 partial sums differs
from cuBLAS's. fp32 inputs multiply in IEEE fp32 (no TF32), as torch's default matmul does.

Used by `gated_down_proj` / `gated_mlp` forwards when `GLU_MATMUL` is on (off by default until it is
measured against cuBLAS on a GPU: the product must stay near cuBLAS's rate for the saved glu pass, 0.27
ms per layer on an H100 at the ANCHORS Llama shape, to be a gain). The backward is unchanged (it
recomputes c for the weight gradient in the glu backward pass).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from liger_kernels._utils import INTERPRET
from liger_kernels.ops.glu import _activation

# Off by default (see the module docstring); LIGER_GLU_MATMUL=1 or set this attribute to switch it on.
GLU_MATMUL_DEFAULT = os.environ.get("LIGER_GLU_MATMUL", "0") == "1"
GLU_MATMUL = GLU_MATMUL_DEFAULT

# Hopper-sized tiles, chosen without a GPU at hand: the first measurement should sweep these.
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
if INTERPRET:  # the interpreter runs every config of an autotuner: one small one
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1)]


# Not keyed on M (the token count, new with every batch shape): a re-tune per shape would cost ~0.5 s.
@triton.autotune(configs=_CONFIGS, key=["N", "K", "HAS_RESIDUAL"])
@triton.jit
def _glu_matmul_kernel(a_ptr, b_ptr, w_ptr, r_ptr, y_ptr, M, N, K,
                       stride_am, stride_bm, stride_wn, stride_rm, stride_ym,
                       ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    DTYPE = y_ptr.dtype.element_ty
    # grouped launch order: GROUP_M row blocks share each column block of W while it is in L2
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        tile_ok = row_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + rows64[:, None] * stride_am + k[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows64[:, None] * stride_bm + k[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        f, _ = _activation(a, ACT)
        c = (f * b).to(DTYPE)  # the glu kernel's c, rounded as it stores it
        w = tl.load(w_ptr + cols64[None, :] * stride_wn + k[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)  # (BLOCK_K, BLOCK_N) tile of W.T
        if IEEE:  # fp32 inputs, or the interpreter (whose bf16/fp16 dot is wrong): exact fp32 products
            acc = tl.dot(c.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(c, w, acc)
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + rows64[:, None] * stride_rm + cols64[None, :], mask=out_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols64[None, :], acc.to(DTYPE), mask=out_ok)


def glu_matmul_rows(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, act: int,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """(f(a) * b) @ weight.T (+ residual) for rows a, b (M, K) with unit column stride, weight (N, K)
    contiguous, residual rows (M, N) or None; all of one dtype. Returns a new (M, N) tensor."""
    m, k = a.shape
    n = weight.shape[0]
    weight = weight.contiguous()
    y = torch.empty((m, n), device=a.device, dtype=a.dtype)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(residual) if residual is not None else y.zero_()
    r = residual if residual is not None else y  # an unused pointer when there is no residual
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _glu_matmul_kernel[grid](a, b, weight, r, y, m, n, k, a.stride(0), b.stride(0), weight.stride(0), r.stride(0),
                             y.stride(0), ACT=act, HAS_RESIDUAL=residual is not None,
                             IEEE=a.dtype == torch.float32 or INTERPRET)
    return y
