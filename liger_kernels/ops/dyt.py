"""DyT (Dynamic Tanh, a normalization-free replacement of LayerNorm): y = weight * tanh(alpha * x) + bias.

x (..., H), alpha a learnable scalar (shape () or (1,)), weight and bias (H,) (bias optional). Math in
fp32, y in x's dtype. Gradients, with th = tanh(alpha * x) and the sums over all rows:
    dx = dy * weight * alpha * (1 - th^2)
    dalpha = sum(dy * weight * (1 - th^2) * x),  dweight = sum over rows (dy * th),  dbias = sum over rows dy

Kernels. Forward: 2-D tiles (`_tiles`), alpha read from device memory (no host sync). Backward: a
persistent grid of (row programs x column blocks); each program strides over row tiles of its
column block, writes dx, and accumulates its dweight/dbias columns and its dalpha share in fp32
registers, then stores one partial row (no atomics); a torch column sum of the few hundred partial
rows finishes the reduction (deterministic).
Only x is saved for backward. Any H works (column blocks), no row-size limit.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import (
    check_float,
    check_same_device,
    new_output,
    num_programs_for_rows,
    on_input_device,
    use_triton,
)
from liger_kernels.ops._tiles import as_rows, from_rows, tile_config, tile_offsets


@triton.jit
def _tanh(u):
    """tanh in fp32 without overflow for large |u|."""
    e = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]
    th = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -th, th)


@triton.jit
def _dyt_fwd_kernel(
    x_ptr, x_stride, alpha_ptr, w_ptr, b_ptr, y_ptr, n_rows, n_cols,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols, mask = tile_offsets(n_rows, n_cols, BLOCK_M, BLOCK_N)
    col_ok = cols < n_cols
    x = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = w * _tanh(alpha * x)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dyt_bwd_kernel(
    dy_ptr, dy_stride, x_ptr, x_stride, alpha_ptr, w_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
    dalpha_partial_ptr, n_rows, n_cols,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (p, c) handles row tiles p, p + P, ... of column block c. It writes its dweight and
    dbias columns to row p of the (P, n_cols) partials and its dalpha share at (p, c) of a
    (P, n_column_blocks) buffer."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    alpha = tl.load(alpha_ptr).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dalpha = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), n_programs):
        rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        th = _tanh(alpha * x)
        g = dy * w[None, :] * (1.0 - th * th)  # d loss / d (alpha * x)
        tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], (g * alpha).to(dx_ptr.dtype.element_ty),
                 mask=mask)
        dalpha += g * x
        dw += dy * th
        if HAS_BIAS:
            db += dy
    tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(db_partial_ptr + pid * n_cols + cols, tl.sum(db, axis=0), mask=col_ok)
    tl.store(dalpha_partial_ptr + pid * tl.num_programs(1) + tl.program_id(1), tl.sum(dalpha))


def _dyt_forward(x2, alpha, weight, bias):
    """y (M, N) of rows x2 (unit column stride); weight and bias contiguous."""
    n_rows, n_cols = x2.shape
    y = new_output((n_rows, n_cols), x2.dtype, x2.device)
    grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols)
    _dyt_fwd_kernel[grid](
        x2, x2.stride(0), alpha, weight, bias if bias is not None else weight, y, n_rows, n_cols,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y


def _dyt_backward(dy2, x2, alpha, weight, bias):
    """(dx (M, N), dalpha, dweight, dbias or None) of rows dy2, x2 (unit column stride)."""
    n_rows, n_cols = x2.shape
    has_bias = bias is not None
    dx = new_output((n_rows, n_cols), x2.dtype, x2.device)
    (_, n_col_blocks), block_m, block_n, num_warps = tile_config(n_rows, n_cols)
    # A few programs per SM in all: the column blocks share the persistent row programs.
    n_row_tiles = triton.cdiv(n_rows, block_m)
    n_programs = max(1, num_programs_for_rows(n_row_tiles, x2.device) // n_col_blocks)
    dw_partial = new_output((n_programs, n_cols), torch.float32, x2.device)
    db_partial = new_output((n_programs, n_cols), torch.float32, x2.device) if has_bias else dw_partial
    dalpha_partial = new_output((n_programs, n_col_blocks), torch.float32, x2.device)
    _dyt_bwd_kernel[(n_programs, n_col_blocks)](
        dy2, dy2.stride(0), x2, x2.stride(0), alpha, weight, dx, dw_partial, db_partial, dalpha_partial,
        n_rows, n_cols,
        HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    # The partials are a few hundred rows: one torch column sum each finishes the reduction.
    dalpha = dalpha_partial.sum().to(alpha.dtype).view(alpha.shape)
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(bias.dtype) if has_bias else None
    return dx, dalpha, dweight, dbias


class DyTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, alpha, weight, bias):
        """x2: rows (M, H) with unit column stride; y (M, H)."""
        ctx.save_for_backward(x2, alpha, weight, bias)
        return _dyt_forward(x2, alpha, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x2, alpha, weight, bias = ctx.saved_tensors
        return _dyt_backward(as_rows(dy), x2, alpha, weight, bias)


def dyt_reference(
    x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The specification: weight * tanh(alpha * x) + bias in fp32 (fp64 for fp64 inputs), x's dtype out."""
    compute = torch.promote_types(x.dtype, torch.float32)
    y = weight.to(compute) * torch.tanh(alpha.to(compute) * x.to(compute))
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


@on_input_device
def dyt(
    x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """DyT over the last dimension of x (..., H): weight * tanh(alpha * x) + bias, with alpha a
    one-element tensor and weight, bias (H,). Output in x's dtype; parameters may be another dtype."""
    check_float("x", x)
    check_float("alpha", alpha)
    check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    check_same_device(x=x, alpha=alpha, weight=weight, bias=bias)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the hidden size)")
    if alpha.numel() != 1:
        raise ValueError(f"alpha must hold one value (shape () or (1,)), got shape {tuple(alpha.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and (param.dim() != 1 or param.shape[0] != x.shape[-1]):
            raise ValueError(
                f"{name} must have shape ({x.shape[-1]},) (x's last dimension), got {tuple(param.shape)}"
            )
    if _library.compiling() and x.numel():  # one graph node under torch.compile
        return _dyt_op(x, alpha, weight, bias)
    if not use_triton(x, alpha, weight, bias) or x.numel() == 0:
        return dyt_reference(x, alpha, weight, bias)
    y = DyTFunction.apply(as_rows(x), alpha, weight.contiguous(), bias.contiguous() if bias is not None else None)
    return from_rows(y, x)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.contiguous() if t is not None else None


@_library.custom_op("dyt", lambda x, alpha, weight, bias: x.new_empty(x.shape))
def _dyt_op(
    x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    if not use_triton(x, alpha, weight, bias):
        return dyt_reference(x, alpha, weight, bias).contiguous()
    return _dyt_forward(as_rows(x), alpha, weight.contiguous(), _contiguous(bias)).view(x.shape)


def _dyt_backward_fake(dy, x, alpha, weight, bias):
    dbias = bias.new_empty(bias.shape) if bias is not None else _library.absent(weight)
    return x.new_empty(x.shape), alpha.new_empty(alpha.shape), weight.new_empty(weight.shape), dbias


@_library.custom_op("dyt_backward", _dyt_backward_fake)
def _dyt_backward_op(
    dy: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dalpha, dweight, dbias or a placeholder)."""
    if not use_triton(x, alpha, weight, bias):
        params = (alpha, weight) if bias is None else (alpha, weight, bias)
        dx, dalpha, dweight, *dbias = _library.reference_vjp(dyt_reference, (x, *params), dy)
        dbias = dbias[0].contiguous() if dbias else None
        dx = dx.contiguous()
    else:
        dx, dalpha, dweight, dbias = _dyt_backward(
            as_rows(dy), as_rows(x), alpha, weight.contiguous(), _contiguous(bias)
        )
        dx = dx.view(x.shape)
    return dx, dalpha, dweight, dbias if dbias is not None else _library.absent(weight)


def _dyt_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _dyt_grad(ctx, dy):
    dx, dalpha, dweight, dbias = _dyt_backward_op(dy, *ctx.saved_tensors)
    needs = ctx.needs_input_grad
    return tuple(g if need else None for g, need in zip((dx, dalpha, dweight, dbias), needs))


_dyt_op.register_autograd(_dyt_grad, setup_context=_dyt_setup)
