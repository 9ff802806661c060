"""Softmax over one dimension: y = exp(x - max x) / sum exp(x - max x); dx = y * (dy - sum(dy * y)).

Math in fp32, y in x's dtype; the backward uses the saved y (as torch does). The softmax dimension
is moved last (a copy unless it already is) and rows are processed by one of two kernel shapes:
- rows up to `_MAX_BLOCK` wide: [BLOCK_M, BLOCK_N] tiles holding whole rows (narrow rows packed),
  one read and one write per element each way;
- wider rows (vocabularies): one program per row looping over column blocks, two passes (an online
  max/sum, then the normalized write; the backward: sum(dy * y), then dx), the second pass served
  mostly from L2.
Rows that are entirely -inf give NaN, as in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import check_float, new_output, on_input_device, row_launch_config, use_triton
from liger_kernels.ops._tiles import as_rows, from_rows

# Widest row kept whole in registers (and the column block of the looping kernels). The launch knob
# to tune on the GPU; the tests lower it to exercise the looping path on small rows.
_MAX_BLOCK = 16384
# Narrow rows are packed into tiles of at least this many elements.
_TILE_ELEMENTS = 2048


@triton.jit
def _softmax_fwd_kernel(
    x_ptr, x_stride, y_ptr, n_rows, n_cols,
    LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if LOOP:  # one row per program, column blocks
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        y_row = y_ptr + row * n_cols
        m = -float("inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # While every value so far is -inf, subtract 0 instead of -inf (no inf - inf = NaN).
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        inv = 1.0 / s
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            tl.store(y_row + cols, (tl.exp(x - m) * inv).to(y_ptr.dtype.element_ty), mask=mask)
    else:  # whole rows, BLOCK_M of them per tile
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        cols = tl.arange(0, BLOCK_N)[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        # Columns past the end are -inf (probability 0); rows past the end 0 (finite, not stored).
        x = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(cols < n_cols, x, -float("inf"))
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        y = e / tl.sum(e, axis=1)[:, None]
        tl.store(y_ptr + rows * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    dy_ptr, dy_stride, y_ptr, dx_ptr, n_rows, n_cols,
    LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y and dx are contiguous (n_rows, n_cols)."""
    if LOOP:
        row = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            dy = tl.load(dy_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            acc += dy * y
        dot = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            dy = tl.load(dy_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * n_cols + cols, (y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        cols = tl.arange(0, BLOCK_N)[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        dy = tl.load(dy_ptr + rows * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
        tl.store(dx_ptr + rows * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch(n_rows: int, n_cols: int):
    """(grid, LOOP, BLOCK_M, BLOCK_N, num_warps) for rows of width n_cols."""
    loop = n_cols > _MAX_BLOCK
    block_n = _MAX_BLOCK if loop else triton.next_power_of_2(n_cols)
    block_m = 1 if loop else max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(n_rows)))
    _, num_warps = row_launch_config(block_m * block_n)
    return (triton.cdiv(n_rows, block_m),), loop, block_m, block_n, num_warps


def _softmax_forward(x2: torch.Tensor) -> torch.Tensor:
    """y (M, N), contiguous, of rows x2 (unit column stride)."""
    n_rows, n_cols = x2.shape
    y = new_output((n_rows, n_cols), x2.dtype, x2.device)
    grid, loop, block_m, block_n, num_warps = _launch(n_rows, n_cols)
    _softmax_fwd_kernel[grid](x2, x2.stride(0), y, n_rows, n_cols,
                              LOOP=loop, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y


def _softmax_backward(dy2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dx (M, N) of rows dy2 (unit column stride) and the contiguous saved output y."""
    n_rows, n_cols = y.shape
    dx = new_output((n_rows, n_cols), y.dtype, y.device)
    grid, loop, block_m, block_n, num_warps = _launch(n_rows, n_cols)
    _softmax_bwd_kernel[grid](dy2, dy2.stride(0), y, dx, n_rows, n_cols,
                              LOOP=loop, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dx


class SoftmaxFunction(torch.autograd.Function):
    """Softmax over the last dimension."""

    @staticmethod
    def forward(ctx, x2):
        """x2: rows (M, N) with unit column stride; y (M, N)."""
        y = _softmax_forward(x2)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return _softmax_backward(as_rows(dy), y)


def softmax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The specification: torch.softmax in fp32 (fp64 for fp64 inputs), x's dtype out."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return torch.softmax(x.to(compute), dim).to(x.dtype)


def check_dim(x: torch.Tensor, dim: int) -> int:
    """dim as a non-negative index of x's dimensions, or ValueError."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for x with {x.dim()} dimensions")
    return dim % x.dim()


@on_input_device
def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of x over `dim`, in x's dtype (fp32 math)."""
    check_float("x", x)
    dim = check_dim(x, dim)
    if _library.compiling() and x.numel():  # one graph node under torch.compile
        return _softmax_op(x, dim)
    if not use_triton(x) or x.numel() == 0:
        return softmax_reference(x, dim)
    return apply_over_rows(SoftmaxFunction, x, dim)


def apply_over_rows(function, x: torch.Tensor, dim: int) -> torch.Tensor:
    """`function` (an autograd Function of rows) over x with `dim` moved last (see `from_rows`)."""
    last = x.movedim(dim, -1)
    return from_rows(function.apply(as_rows(last)), last).movedim(-1, dim)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def last_dim_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t with `dim` moved last, as contiguous rows (M, t.shape[dim])."""
    return as_rows(t.movedim(dim, -1)).contiguous()


def from_last_dim_rows(rows: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of last_dim_rows: a contiguous tensor shaped like `like`."""
    return rows.view(like.movedim(dim, -1).shape).movedim(-1, dim).contiguous()


@_library.custom_op("softmax", lambda x, dim: x.new_empty(x.shape))
def _softmax_op(x: torch.Tensor, dim: int) -> torch.Tensor:
    if not use_triton(x):
        return softmax_reference(x, dim).contiguous()
    return from_last_dim_rows(_softmax_forward(last_dim_rows(x, dim)), x, dim)


@_library.custom_op("softmax_backward", lambda dy, y, dim: y.new_empty(y.shape))
def _softmax_backward_op(dy: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """dx from the saved output y (the input is not kept)."""
    if not use_triton(y):
        # The formula autograd applies to torch.softmax, in fp32.
        compute = torch.promote_types(y.dtype, torch.float32)
        yf, dyf = y.to(compute), dy.to(compute)
        return (yf * (dyf - (dyf * yf).sum(dim, keepdim=True))).to(y.dtype).contiguous()
    return from_last_dim_rows(_softmax_backward(last_dim_rows(dy, dim), last_dim_rows(y, dim)), y, dim)


def register_autograd_from_output(op, backward_op) -> None:
    """Autograd of an op (x, dim) -> y whose gradient needs only y: dx = backward_op(dy, y, dim)
    (softmax, sparsemax)."""

    def setup(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    def grad(ctx, dy):
        (y,) = ctx.saved_tensors
        return backward_op(dy, y, ctx.dim), None

    op.register_autograd(grad, setup_context=setup)


register_autograd_from_output(_softmax_op, _softmax_backward_op)
