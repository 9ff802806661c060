"""PolyNorm (the polynomial-composition activation of Motif/PolyCom):

    y = w0 * norm(x^3) + w1 * norm(x^2) + w2 * norm(x) + b,   norm(u) = u / sqrt(mean(u^2) + eps)

per row over the last dimension H, with weight (3,) and bias (1,) scalars. Math in fp32 (x is upcast
before the powers), one rounding at the end to x's dtype. Backward, with u_k = x^k, r_k the row's
1 / sqrt(mean(u_k^2) + eps) and n_k = u_k * r_k (k = 3, 2, 1 for w0, w1, w2):
    du_k = w_k * r_k * (dy - n_k * mean(dy * n_k)),   dx = 3 x^2 du_3 + 2 x du_2 + du_1
    dw_k = sum over all elements of dy * n_k,   db = sum dy

Kernels: whole rows in [BLOCK_M, BLOCK_N] tiles (narrow rows packed, as rms_norm). The forward is one
pass (read x, write y and three fp32 r_k per row). The backward is one pass on a persistent grid:
each program strides over row tiles, writes dx and accumulates its four parameter-gradient sums in
fp32, stored as one partial row (no atomics) that torch sums. Rows up to `_utils.MAX_FUSED_SIZE`
wide (ValueError beyond; the reference, used for CPU tensors, has no limit).
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
    check_same_device,
    new_output,
    num_programs_for_rows,
    use_triton,
    on_input_device,
)
from liger_kernels.ops._tiles import as_rows, from_rows
from liger_kernels.ops.rms_norm import tile_config, tile_rows


@triton.jit
def _rstd(u, n_cols, eps):
    return tl.rsqrt(tl.sum(u * u, axis=1) / n_cols + eps)


@triton.jit
def _poly_norm_fwd_kernel(
    x_ptr, x_stride, w_ptr, b_ptr, y_ptr, rstd_ptr, n_rows, n_cols, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """rstd (n_rows, 3) holds r_3, r_2, r_1 of each row."""
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    rows, row_ok, mask = tile_rows(tl.program_id(0), n_rows, col_ok, BLOCK_M)
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = x * x
    x3 = x2 * x
    r3 = _rstd(x3, n_cols, eps)
    r2 = _rstd(x2, n_cols, eps)
    r1 = _rstd(x, n_cols, eps)
    w0 = tl.load(w_ptr).to(tl.float32)
    w1 = tl.load(w_ptr + 1).to(tl.float32)
    w2 = tl.load(w_ptr + 2).to(tl.float32)
    b = tl.load(b_ptr).to(tl.float32)
    y = (w0 * r3)[:, None] * x3 + (w1 * r2)[:, None] * x2 + (w2 * r1)[:, None] * x + b
    tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows * 3, r3, mask=row_ok)
    tl.store(rstd_ptr + rows * 3 + 1, r2, mask=row_ok)
    tl.store(rstd_ptr + rows * 3 + 2, r1, mask=row_ok)


@triton.jit
def _norm_backward(dy, n, r, w, n_cols):
    """d loss / d u of w * norm(u) for a tile, from n = norm(u) and r = its row's 1 / rms."""
    return (w * r)[:, None] * (dy - n * (tl.sum(dy * n, axis=1) / n_cols)[:, None])


@triton.jit
def _poly_norm_bwd_kernel(
    dy_ptr, dy_stride, x_ptr, x_stride, w_ptr, rstd_ptr, dx_ptr, partial_ptr, n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Persistent: program p handles row tiles p, p + P, ... and writes row p of the (P, 4) partials
    (dw0, dw1, dw2, db)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w0 = tl.load(w_ptr).to(tl.float32)
    w1 = tl.load(w_ptr + 1).to(tl.float32)
    w2 = tl.load(w_ptr + 2).to(tl.float32)
    dw0 = 0.0
    dw1 = 0.0
    dw2 = 0.0
    db = 0.0
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows, row_ok, mask = tile_rows(tile, n_rows, col_ok, BLOCK_M)
        dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r3 = tl.load(rstd_ptr + rows * 3, mask=row_ok, other=0.0)
        r2 = tl.load(rstd_ptr + rows * 3 + 1, mask=row_ok, other=0.0)
        r1 = tl.load(rstd_ptr + rows * 3 + 2, mask=row_ok, other=0.0)
        x2 = x * x
        n3 = x2 * x * r3[:, None]
        n2 = x2 * r2[:, None]
        n1 = x * r1[:, None]
        dx = (3.0 * x2) * _norm_backward(dy, n3, r3, w0, n_cols)
        dx += (2.0 * x) * _norm_backward(dy, n2, r2, w1, n_cols)
        dx += _norm_backward(dy, n1, r1, w2, n_cols)
        tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw0 += tl.sum(dy * n3)
        dw1 += tl.sum(dy * n2)
        dw2 += tl.sum(dy * n1)
        db += tl.sum(dy)
    tl.store(partial_ptr + pid * 4, dw0)
    tl.store(partial_ptr + pid * 4 + 1, dw1)
    tl.store(partial_ptr + pid * 4 + 2, dw2)
    tl.store(partial_ptr + pid * 4 + 3, db)


def _poly_norm_forward(x2, weight, bias, eps):
    """(y (M, N), fp32 rstd (M, 3)) of rows x2 (unit column stride); weight contiguous."""
    n_rows, n_cols = x2.shape
    y = new_output((n_rows, n_cols), x2.dtype, x2.device)
    rstd = new_output((n_rows, 3), torch.float32, x2.device)
    block_m, block_n, num_warps = tile_config(n_cols)
    _poly_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x2, x2.stride(0), weight, bias, y, rstd, n_rows, n_cols, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, rstd


def _poly_norm_backward(dy2, x2, weight, bias, rstd):
    """(dx (M, N), dweight, dbias) of rows dy2, x2 (unit column stride)."""
    n_rows, n_cols = x2.shape
    dx = new_output((n_rows, n_cols), x2.dtype, x2.device)
    block_m, block_n, num_warps = tile_config(n_cols)
    n_programs = num_programs_for_rows(triton.cdiv(n_rows, block_m), x2.device)
    partial = new_output((n_programs, 4), torch.float32, x2.device)
    _poly_norm_bwd_kernel[(n_programs,)](
        dy2, dy2.stride(0), x2, x2.stride(0), weight, rstd, dx, partial, n_rows, n_cols,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    sums = partial.sum(0)
    return dx, sums[:3].to(weight.dtype), sums[3:].to(bias.dtype).view(bias.shape)


class PolyNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, eps):
        """x2: rows (M, H) with unit column stride; y (M, H)."""
        y, rstd = _poly_norm_forward(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, bias, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, rstd = ctx.saved_tensors
        dx, dweight, dbias = _poly_norm_backward(as_rows(dy), x2, weight, bias, rstd)
        return dx, dweight, dbias, None


def poly_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6):
    """The specification (module docstring) in fp32 (fp64 for fp64 inputs); x's dtype out."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    w = weight.to(compute)

    def norm(u):
        return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)

    y = w[0] * norm(xf.pow(3)) + w[1] * norm(xf.pow(2)) + w[2] * norm(xf) + bias.to(compute)
    return y.to(x.dtype)


@on_input_device
def poly_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PolyNorm over the last dimension of x (..., H) with weight (3,) and bias (1,); x's dtype out."""
    check_float("x", x)
    check_float("weight", weight)
    check_float("bias", bias)
    check_same_device(x=x, weight=weight, bias=bias)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the hidden size)")
    if tuple(weight.shape) != (3,):
        raise ValueError(f"weight must have shape (3,), got {tuple(weight.shape)}")
    if bias.numel() != 1:
        raise ValueError(f"bias must hold one value (shape (1,)), got shape {tuple(bias.shape)}")
    triton_path = use_triton(x, weight, bias)
    check_row_size("x", x.shape[-1], MAX_FUSED_SIZE if triton_path else sys.maxsize)
    if _library.compiling() and x.numel():  # one graph node under torch.compile
        return _poly_norm_op(x, weight, bias, float(eps))[0]
    if not triton_path or x.numel() == 0:
        return poly_norm_reference(x, weight, bias, eps)
    return from_rows(PolyNormFunction.apply(as_rows(x), weight.contiguous(), bias, float(eps)), x)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _poly_norm_fake(x, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty((x.numel() // x.shape[-1], 3), dtype=torch.float32)


@_library.custom_op("poly_norm", _poly_norm_fake)
def _poly_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, fp32 r_3, r_2, r_1 per row)."""
    if not use_triton(x, weight, bias):
        xf = x.float().reshape(-1, x.shape[-1])
        rstd = torch.stack([torch.rsqrt(u.square().mean(-1) + eps) for u in (xf.pow(3), xf.square(), xf)], 1)
        return poly_norm_reference(x, weight, bias, eps).contiguous(), rstd
    y, rstd = _poly_norm_forward(as_rows(x), weight.contiguous(), bias, eps)
    return y.view(x.shape), rstd


def _poly_norm_backward_fake(dy, x, weight, bias, rstd, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


@_library.custom_op("poly_norm_backward", _poly_norm_backward_fake)
def _poly_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias)."""
    if not use_triton(x, weight, bias):
        dx, dweight, dbias = _library.reference_vjp(
            lambda x, w, b: poly_norm_reference(x, w, b, eps), (x, weight, bias), dy
        )
        return dx.contiguous(), dweight.contiguous(), dbias.contiguous()
    dx, dweight, dbias = _poly_norm_backward(as_rows(dy), as_rows(x), weight.contiguous(), bias, rstd)
    # In fp32 dweight and dbias are views of one buffer: custom op outputs must not alias each other.
    return dx.view(x.shape), dweight, dbias.clone()


def _poly_norm_setup(ctx, inputs, output):
    x, weight, bias, ctx.eps = inputs
    ctx.save_for_backward(x, weight, bias, output[1])


def _poly_norm_grad(ctx, dy, _drstd):
    x, weight, bias, rstd = ctx.saved_tensors
    dx, dweight, dbias = _poly_norm_backward_op(dy, x, weight, bias, rstd, ctx.eps)
    needs = ctx.needs_input_grad
    return dx if needs[0] else None, dweight if needs[1] else None, dbias if needs[2] else None, None


_poly_norm_op.register_autograd(_poly_norm_grad, setup_context=_poly_norm_setup)
