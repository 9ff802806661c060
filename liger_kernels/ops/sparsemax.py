"""Sparsemax (Martins & Astudillo, 2016): the Euclidean projection of x onto the probability simplex.

    y = max(x - tau, 0)   with tau the threshold where sum(max(x - tau, 0)) = 1
    dx = s * (dy - sum(s * dy) / sum(s)),   s = [y > 0] (the support)

The torch reference finds tau by sorting (the textbook algorithm). The Triton forward needs no sort:
with the whole row in registers, shifted by its max, it bisects f(tau) = sum(max(x - tau, 0)) - 1
on [-1, 0] (f is decreasing, f(-1) >= 0 > f(0)), then refines with exact Michelot steps
tau <- (sum_{x > tau} x - 1) / #{x > tau}, which from any tau <= tau* never overshoot and land on tau*
once the support is right; after the bisection the support is right to within a rounding of tau.
Math in fp32, y in x's dtype; the backward uses the saved y's support. The dimension is moved last
(a copy unless it already is); rows up to `_utils.MAX_FUSED_SIZE` wide (a ValueError beyond; the
reference, used for CPU tensors, has no limit). The tile math is two @triton.jit helpers
(sparsemax_tile, sparsemax_tile_grad), also called by multi-token attention's sparse mode.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import (
    MAX_FUSED_SIZE,
    check_float,
    check_row_size,
    new_output,
    row_launch_config,
    use_triton,
    on_input_device,
)
from liger_kernels.ops._tiles import as_rows
from liger_kernels.ops.softmax import (
    apply_over_rows,
    check_dim,
    from_last_dim_rows,
    last_dim_rows,
    register_autograd_from_output,
)

# Bisection halvings: the bracket [-1, 0] shrinks to 2^-30, below fp32 resolution of tau.
_BISECTIONS = 30
_MICHELOT_STEPS = 2
_TILE_ELEMENTS = 2048


@triton.jit
def sparsemax_tile(x, BISECTIONS: tl.constexpr, MICHELOT_STEPS: tl.constexpr):
    """Sparsemax of each row of the [BLOCK_M, BLOCK_N] fp32 tile x, in fp32. Entries outside the row
    (past its end, masked keys) must be -inf (never in the support); each row needs a finite entry
    (rows that are not stored may be any finite values, e.g. 0). Shared by the sparsemax kernels and
    multi-token attention's sparse mode; inlined by Triton."""
    # Shift by the row max (sparsemax is shift invariant): tau is then found in [-1, 0] to fp32
    # precision near 1, not near |max x|, and x - max is exact for values near the max.
    x_max = tl.max(x, axis=1)
    x = x - x_max[:, None]
    hi = tl.zeros_like(x_max)
    lo = hi - 1.0
    for _ in range(BISECTIONS):  # invariant: f(lo) >= 0 > f(hi)
        mid = 0.5 * (lo + hi)
        f = tl.sum(tl.maximum(x - mid[:, None], 0.0), axis=1) - 1.0
        lo = tl.where(f >= 0.0, mid, lo)
        hi = tl.where(f >= 0.0, hi, mid)
    tau = lo
    for _ in range(MICHELOT_STEPS):
        support = x > tau[:, None]
        k = tl.sum(support.to(tl.float32), axis=1)  # >= 1: the maximum is above tau
        tau = (tl.sum(tl.where(support, x, 0.0), axis=1) - 1.0) / k
    return tl.maximum(x - tau[:, None], 0.0)


@triton.jit
def sparsemax_tile_grad(y, dy):
    """dx of each row of the [BLOCK_M, BLOCK_N] tiles y (the sparsemax output, 0 outside the rows)
    and dy (fp32): s * (dy - sum(s * dy) / sum(s)), s = [y > 0]; rows with y all 0 give dx = 0."""
    support = y > 0
    k = tl.maximum(tl.sum(support.to(tl.float32), axis=1), 1.0)  # 1 only for rows past the end
    mean = tl.sum(tl.where(support, dy, 0.0), axis=1) / k
    return tl.where(support, dy - mean[:, None], 0.0)


@triton.jit
def _sparsemax_fwd_kernel(
    x_ptr, x_stride, y_ptr, n_rows, n_cols,
    BISECTIONS: tl.constexpr, MICHELOT_STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    # Columns past the end are -inf (never in the support); rows past the end 0 (finite, not stored).
    x = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(cols < n_cols, x, -float("inf"))
    y = sparsemax_tile(x, BISECTIONS, MICHELOT_STEPS)
    tl.store(y_ptr + rows * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sparsemax_bwd_kernel(
    dy_ptr, dy_stride, y_ptr, dx_ptr, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    dy = tl.load(dy_ptr + rows * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dx = sparsemax_tile_grad(y, dy)
    tl.store(dx_ptr + rows * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch(n_rows: int, n_cols: int):
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(n_rows)))
    _, num_warps = row_launch_config(block_m * block_n)
    return (triton.cdiv(n_rows, block_m),), block_m, block_n, num_warps


def _sparsemax_forward(x2: torch.Tensor) -> torch.Tensor:
    """y (M, N), contiguous, of rows x2 (unit column stride)."""
    n_rows, n_cols = x2.shape
    y = new_output((n_rows, n_cols), x2.dtype, x2.device)
    grid, block_m, block_n, num_warps = _launch(n_rows, n_cols)
    _sparsemax_fwd_kernel[grid](
        x2, x2.stride(0), y, n_rows, n_cols, BISECTIONS=_BISECTIONS, MICHELOT_STEPS=_MICHELOT_STEPS,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y


def _sparsemax_backward(dy2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dx (M, N) of rows dy2 (unit column stride) and the contiguous saved output y."""
    n_rows, n_cols = y.shape
    dx = new_output((n_rows, n_cols), y.dtype, y.device)
    grid, block_m, block_n, num_warps = _launch(n_rows, n_cols)
    _sparsemax_bwd_kernel[grid](dy2, dy2.stride(0), y, dx, n_rows, n_cols,
                                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dx


class SparsemaxFunction(torch.autograd.Function):
    """Sparsemax over the last dimension."""

    @staticmethod
    def forward(ctx, x2):
        """x2: rows (M, N) with unit column stride; y (M, N)."""
        y = _sparsemax_forward(x2)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return _sparsemax_backward(as_rows(dy), y)


def sparsemax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The specification, by sorting, in fp32 (fp64 for fp64 inputs); x's dtype out. Differentiable:
    autograd through it gives the sparsemax Jacobian of the module docstring."""
    compute = torch.promote_types(x.dtype, torch.float32)
    z = x.to(compute).movedim(dim, -1)
    z = z - z.max(-1, keepdim=True).values.detach()  # shift invariant; keeps tau near [-1, 0]
    z_sorted = z.sort(dim=-1, descending=True).values
    cumsum = z_sorted.cumsum(-1)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=compute)
    support_size = (1 + k * z_sorted > cumsum).sum(-1, keepdim=True)  # >= 1
    tau = (cumsum.gather(-1, support_size - 1) - 1) / support_size.to(compute)
    # relu, not clamp: at a tie (z == tau, y == 0) clamp would pass the gradient through, relu gives
    # the support [y > 0] of the docstring (and of the kernels).
    return torch.relu(z - tau).movedim(-1, dim).to(x.dtype)


@on_input_device
def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax of x over `dim`: a probability distribution with exact zeros; x's dtype out."""
    check_float("x", x)
    dim = check_dim(x, dim)
    triton_path = use_triton(x)
    check_row_size("x", x.shape[dim], MAX_FUSED_SIZE if triton_path else sys.maxsize)
    if _library.compiling() and x.numel():  # one graph node under torch.compile
        return _sparsemax_op(x, dim)
    if not triton_path or x.numel() == 0:
        return sparsemax_reference(x, dim)
    return apply_over_rows(SparsemaxFunction, x, dim)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


@_library.custom_op("sparsemax", lambda x, dim: x.new_empty(x.shape))
def _sparsemax_op(x: torch.Tensor, dim: int) -> torch.Tensor:
    if not use_triton(x):
        return sparsemax_reference(x, dim).contiguous()
    return from_last_dim_rows(_sparsemax_forward(last_dim_rows(x, dim)), x, dim)


@_library.custom_op("sparsemax_backward", lambda dy, y, dim: y.new_empty(y.shape))
def _sparsemax_backward_op(dy: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """dx from the saved output's support (the input is not kept)."""
    if not use_triton(y):
        # The Jacobian autograd finds through the reference, in fp32.
        compute = torch.promote_types(y.dtype, torch.float32)
        support = y > 0
        dyf = torch.where(support, dy.to(compute), 0.0)
        mean = dyf.sum(dim, keepdim=True) / support.sum(dim, keepdim=True)
        return torch.where(support, dyf - mean, 0.0).to(y.dtype).contiguous()
    return from_last_dim_rows(_sparsemax_backward(last_dim_rows(dy, dim), last_dim_rows(y, dim)), y, dim)


register_autograd_from_output(_sparsemax_op, _sparsemax_backward_op)
