"""ReLU squared (Primer, Nemotron MLPs): y = relu(x)^2, dx = 2 * relu(x) * dy.

Math in fp32, outputs in x's dtype. Rows in 2-D tiles (`_tiles`), one pass each way; the forward
saves only x and the backward recomputes relu(x). New outputs; nothing is written in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import check_float, new_output, on_input_device, use_triton
from liger_kernels.ops._tiles import as_rows, tile_config, tile_offsets


@triton.jit
def _relu_squared_fwd_kernel(x_ptr, x_stride, y_ptr, n_rows, n_cols,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = tile_offsets(n_rows, n_cols, BLOCK_M, BLOCK_N)
    r = tl.maximum(tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(y_ptr + rows * n_cols + cols, (r * r).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_squared_bwd_kernel(dy_ptr, dy_stride, x_ptr, x_stride, dx_ptr, n_rows, n_cols,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = tile_offsets(n_rows, n_cols, BLOCK_M, BLOCK_N)
    dy = tl.load(dy_ptr + rows * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.maximum(tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(dx_ptr + rows * n_cols + cols, (2.0 * r * dy).to(dx_ptr.dtype.element_ty), mask=mask)


def _relu_squared_forward(x2: torch.Tensor) -> torch.Tensor:
    """y (M, N) of rows x2 (unit column stride)."""
    n_rows, n_cols = x2.shape
    y = new_output((n_rows, n_cols), x2.dtype, x2.device)
    grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols)
    _relu_squared_fwd_kernel[grid](x2, x2.stride(0), y, n_rows, n_cols,
                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y


def _relu_squared_backward(dy2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """dx (M, N) of rows dy2, x2 (unit column stride)."""
    n_rows, n_cols = x2.shape
    dx = new_output((n_rows, n_cols), x2.dtype, x2.device)
    grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols)
    _relu_squared_bwd_kernel[grid](dy2, dy2.stride(0), x2, x2.stride(0), dx, n_rows, n_cols,
                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dx


class ReLUSquaredFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2):
        """x2: rows (M, N) with unit column stride; y (M, N)."""
        ctx.save_for_backward(x2)
        return _relu_squared_forward(x2)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        return _relu_squared_backward(as_rows(dy), x2)


def relu_squared_reference(x: torch.Tensor) -> torch.Tensor:
    """The specification: relu(x)^2 in fp32 (fp64 for fp64 inputs), x's dtype out."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return torch.relu(x.to(compute)).square().to(x.dtype)


@on_input_device
def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 elementwise."""
    check_float("x", x)
    if _library.compiling() and x.numel():  # one graph node under torch.compile
        return _relu_squared_op(x)
    if not use_triton(x) or x.numel() == 0:
        return relu_squared_reference(x)
    # Rows in, rows out, reshaped here: a view made inside the Function could not be modified in place.
    y = ReLUSquaredFunction.apply(_rows(x))
    return y if x.dim() == 2 else y.view(x.shape)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """as_rows, with a 0-d tensor as one 1-wide row."""
    return as_rows(t.reshape(1) if t.dim() == 0 else t)


@_library.custom_op("relu_squared", lambda x: x.new_empty(x.shape))
def _relu_squared_op(x: torch.Tensor) -> torch.Tensor:
    if not use_triton(x):
        return relu_squared_reference(x).contiguous()
    return _relu_squared_forward(_rows(x)).view(x.shape)


@_library.custom_op("relu_squared_backward", lambda dy, x: x.new_empty(x.shape))
def _relu_squared_backward_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dx."""
    if not use_triton(x):
        (dx,) = _library.reference_vjp(relu_squared_reference, (x,), dy)
        return dx.contiguous()
    return _relu_squared_backward(_rows(dy), _rows(x)).view(x.shape)


def _relu_squared_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _relu_squared_grad(ctx, dy):
    (x,) = ctx.saved_tensors
    return _relu_squared_backward_op(dy, x)


_relu_squared_op.register_autograd(_relu_squared_grad, setup_context=_relu_squared_setup)
