"""Generalized Jensen-Shannon divergence between a student and a teacher, on log-probabilities.

For student log-probabilities x = log Q and teacher log-probabilities y = log P, rows of width V:
    beta = 0:       KL(P || Q) = sum P * (y - x)                   (forward KL)
    beta = 1:       KL(Q || P) = sum Q * (x - y)                   (reverse KL)
    0 < beta < 1:   beta * KL(P || M) + (1 - beta) * KL(Q || M),   M = beta * P + (1 - beta) * Q
                  = sum beta * P * (y - log M) + (1 - beta) * Q * (x - log M)
(beta = 0.5 is the symmetric JSD), the same definition as the distillation losses
(`liger_kernels.losses.distillation.generalized_jsd`) and Liger-Kernel's JSD. The loss is the mean of
the per-row divergences over the rows whose `label` is not `ignore_index` (all rows without labels);
0 when every row is ignored. log M is computed as a log-sum-exp of (log beta + y, log(1-beta) + x), so
it stays finite when both probabilities underflow.

Gradients (exact, of the formula in x and y as free variables; ignored rows get 0), times g / n:
    beta = 0:  dx = -P,                         dy = P * (y - x + 1)
    beta = 1:  dx = Q * (x - y + 1),            dy = -Q
    else:      dx = (1 - beta) * Q * (x - log M), dy = beta * P * (y - log M)
The teacher usually has no gradient; dy is computed only when autograd asks for it.

Kernels: rows in 2-D tiles (`_tiles`), masked by the row labels. The forward reads x and y once and
writes one fp32 partial sum per program; the backward recomputes from x and y instead of storing a
gradient in the forward (which would hold a V-wide buffer per row between forward and backward), and
reads the incoming gradient and the row count from device memory (no host sync). Output in the
student's dtype; gradients in their inputs' dtypes; math in fp32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, new_output, on_input_device, use_triton
from liger_kernels.ops._tiles import as_rows, new_partials, store_partial, tile_config, tile_offsets

# Values of the kernels' constexpr MODE.
_FORWARD_KL, _REVERSE_KL, _MIXTURE = 0, 1, 2


def _mode(beta: float) -> int:
    return _FORWARD_KL if beta == 0.0 else _REVERSE_KL if beta == 1.0 else _MIXTURE


@triton.jit
def _load_tile(x_ptr, x_stride, y_ptr, y_stride, label_ptr, ignore_index, n_rows, n_cols,
               HAS_LABEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x, y (fp32) of this program's tile, its element mask (ignored rows masked off) and offsets."""
    rows, cols, mask = tile_offsets(n_rows, n_cols, BLOCK_M, BLOCK_N)
    if HAS_LABEL:
        label = tl.load(label_ptr + rows, mask=rows < n_rows, other=ignore_index)
        mask = mask & (label != ignore_index)
    x = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows * y_stride + cols, mask=mask, other=0.0).to(tl.float32)
    return x, y, mask, rows, cols


@triton.jit
def _log_mixture(x, y, log_beta, log_one_minus_beta):
    """log(beta * e^y + (1 - beta) * e^x) as a two-term log-sum-exp."""
    a = y + log_beta
    b = x + log_one_minus_beta
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))


@triton.jit
def _jsd_fwd_kernel(
    x_ptr, x_stride, y_ptr, y_stride, label_ptr, partial_ptr, ignore_index, n_rows, n_cols,
    beta, log_beta, log_one_minus_beta,
    MODE: tl.constexpr, HAS_LABEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    x, y, mask, _, _ = _load_tile(x_ptr, x_stride, y_ptr, y_stride, label_ptr, ignore_index,
                                  n_rows, n_cols, HAS_LABEL, BLOCK_M, BLOCK_N)
    if MODE == 0:
        loss = tl.exp(y) * (y - x)
    elif MODE == 1:
        loss = tl.exp(x) * (x - y)
    else:
        log_m = _log_mixture(x, y, log_beta, log_one_minus_beta)
        loss = beta * tl.exp(y) * (y - log_m) + (1.0 - beta) * tl.exp(x) * (x - log_m)
    store_partial(partial_ptr, tl.sum(tl.where(mask, loss, 0.0)))


@triton.jit
def _jsd_bwd_kernel(
    x_ptr, x_stride, y_ptr, y_stride, label_ptr, g_ptr, n_ptr, dx_ptr, dy_ptr, ignore_index,
    n_rows, n_cols, beta, log_beta, log_one_minus_beta,
    MODE: tl.constexpr, HAS_LABEL: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    x, y, mask, rows, cols = _load_tile(x_ptr, x_stride, y_ptr, y_stride, label_ptr, ignore_index,
                                        n_rows, n_cols, HAS_LABEL, BLOCK_M, BLOCK_N)
    scale = tl.load(g_ptr).to(tl.float32) / tl.load(n_ptr)
    if MODE == 0:
        p = tl.exp(y)
        dx = -p
        dy = p * (y - x + 1.0)
    elif MODE == 1:
        q = tl.exp(x)
        dx = q * (x - y + 1.0)
        dy = -q
    else:
        log_m = _log_mixture(x, y, log_beta, log_one_minus_beta)
        dx = (1.0 - beta) * tl.exp(x) * (x - log_m)
        dy = beta * tl.exp(y) * (y - log_m)
    # Ignored rows are masked off the loads but still get their zero gradient stored.
    out_mask = (rows < n_rows) & (cols < n_cols)
    out = rows * n_cols + cols
    if COMPUTE_DX:
        tl.store(dx_ptr + out, tl.where(mask, dx * scale, 0.0).to(dx_ptr.dtype.element_ty), mask=out_mask)
    if COMPUTE_DY:
        tl.store(dy_ptr + out, tl.where(mask, dy * scale, 0.0).to(dy_ptr.dtype.element_ty), mask=out_mask)


def _log_betas(beta: float) -> tuple[float, float]:
    """(log beta, log(1 - beta)) for the mixture mode (unused, and set to 0, otherwise)."""
    if _mode(beta) != _MIXTURE:
        return 0.0, 0.0
    return math.log(beta), math.log1p(-beta)


def _row_labels(label, x2):
    """The labels as one contiguous row index vector (x2 stands in for the unused pointer)."""
    return label.reshape(-1).contiguous() if label is not None else x2


def _row_count(label, ignore_index, n_rows, device):
    """Rows counted in the mean, as a device tensor (no host sync); at least 1."""
    if label is not None:
        return (label.reshape(-1) != ignore_index).sum(dtype=torch.float32).clamp_min(1.0)
    return torch.full((), float(max(n_rows, 1)), dtype=torch.float32, device=device)


def _jsd_forward(x2, y2, label, beta, ignore_index):
    """(loss in x's dtype, row count) of rows x2, y2 (unit column stride)."""
    n_rows, n_cols = x2.shape
    grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols)
    partial = new_partials(grid, x2.device)
    log_beta, log_one_minus_beta = _log_betas(beta)
    _jsd_fwd_kernel[grid](
        x2, x2.stride(0), y2, y2.stride(0), _row_labels(label, x2), partial, ignore_index, n_rows, n_cols,
        beta, log_beta, log_one_minus_beta,
        MODE=_mode(beta), HAS_LABEL=label is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    count = _row_count(label, ignore_index, n_rows, x2.device)
    return (partial.sum() / count).to(x2.dtype), count


def _jsd_backward(grad, x2, y2, label, count, beta, ignore_index, compute_dx, compute_dy):
    """(dx (M, N) or None, dy (M, N) or None) of rows x2, y2 for the incoming gradient of the loss."""
    n_rows, n_cols = x2.shape
    dx = new_output((n_rows, n_cols), x2.dtype, x2.device) if compute_dx else x2
    dy = new_output((n_rows, n_cols), y2.dtype, y2.device) if compute_dy else y2
    grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols)
    log_beta, log_one_minus_beta = _log_betas(beta)
    _jsd_bwd_kernel[grid](
        x2, x2.stride(0), y2, y2.stride(0), _row_labels(label, x2), grad, count, dx, dy, ignore_index,
        n_rows, n_cols, beta, log_beta, log_one_minus_beta,
        MODE=_mode(beta), HAS_LABEL=label is not None, COMPUTE_DX=compute_dx, COMPUTE_DY=compute_dy,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dx if compute_dx else None, dy if compute_dy else None


class JSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, label, beta, ignore_index):
        x2, y2 = as_rows(x), as_rows(y)
        loss, count = _jsd_forward(x2, y2, label, beta, ignore_index)
        ctx.save_for_backward(x2, y2, label, count)
        ctx.shapes, ctx.beta, ctx.ignore_index = (x.shape, y.shape), beta, ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad):
        x2, y2, label, count = ctx.saved_tensors
        dx, dy = _jsd_backward(
            grad, x2, y2, label, count, ctx.beta, ctx.ignore_index,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        x_shape, y_shape = ctx.shapes
        return (dx.view(x_shape) if dx is not None else None, dy.view(y_shape) if dy is not None else None,
                None, None, None)


def jsd_reference(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    label: torch.Tensor | None = None,
    beta: float = 0.5,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The specification (module docstring), in fp32 (fp64 for fp64 inputs); also the CPU path."""
    compute = torch.promote_types(torch.promote_types(student_logprobs.dtype, teacher_logprobs.dtype),
                                  torch.float32)
    x = student_logprobs.to(compute).reshape(-1, student_logprobs.shape[-1])
    y = teacher_logprobs.to(compute).reshape(-1, teacher_logprobs.shape[-1])
    if beta == 0.0:
        rows = (y.exp() * (y - x)).sum(-1)
    elif beta == 1.0:
        rows = (x.exp() * (x - y)).sum(-1)
    else:
        log_m = torch.logaddexp(y + math.log(beta), x + math.log1p(-beta))
        rows = (beta * y.exp() * (y - log_m) + (1 - beta) * x.exp() * (x - log_m)).sum(-1)
    if label is None:
        count = rows.new_tensor(float(max(rows.numel(), 1)))
    else:
        valid = label.reshape(-1) != ignore_index
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        count = valid.sum().to(compute).clamp_min(1.0)
    return (rows.sum() / count).to(student_logprobs.dtype)


@on_input_device
def jsd(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    label: torch.Tensor | None = None,
    beta: float = 0.5,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Generalized JSD (module docstring) of log-probabilities (..., V), averaged over the rows whose
    label (shape (...)) is not ignore_index. beta in [0, 1]: 0 = KL(teacher || student), 1 =
    KL(student || teacher). Returns a scalar in the student's dtype."""
    check_float("student_logprobs", student_logprobs)
    check_float("teacher_logprobs", teacher_logprobs)
    check_same_device(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs, label=label)
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            f"student_logprobs {tuple(student_logprobs.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must have the same shape"
        )
    if student_logprobs.dim() == 0:
        raise ValueError("student_logprobs must have at least one dimension (the vocabulary)")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if label is not None:
        if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
            raise TypeError(f"label must be an integer tensor, got {label.dtype}")
        if label.shape != student_logprobs.shape[:-1]:
            raise ValueError(
                f"label has shape {tuple(label.shape)}; expected {tuple(student_logprobs.shape[:-1])} "
                "(the student's shape without its last dimension)"
            )
    if _library.compiling() and student_logprobs.numel():  # one graph node under torch.compile
        return _jsd_op(student_logprobs, teacher_logprobs, label, float(beta), int(ignore_index))
    if not use_triton(student_logprobs, teacher_logprobs) or student_logprobs.numel() == 0:
        return jsd_reference(student_logprobs, teacher_logprobs, label, beta, ignore_index)
    return JSDFunction.apply(student_logprobs, teacher_logprobs, label, float(beta), int(ignore_index))


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


@_library.custom_op("jsd", lambda x, y, label, beta, ignore_index: x.new_empty(()))
def _jsd_op(
    x: torch.Tensor, y: torch.Tensor, label: Optional[torch.Tensor], beta: float, ignore_index: int
) -> torch.Tensor:
    if not use_triton(x, y):
        return jsd_reference(x, y, label, beta, ignore_index)
    return _jsd_forward(as_rows(x), as_rows(y), label, beta, ignore_index)[0]


def _jsd_backward_fake(grad, x, y, label, beta, ignore_index, compute_dx, compute_dy):
    return (
        _library.fake_grad(x, compute_dx),
        _library.fake_grad(y, compute_dy),
    )


@_library.custom_op("jsd_backward", _jsd_backward_fake)
def _jsd_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    label: Optional[torch.Tensor],
    beta: float,
    ignore_index: int,
    compute_dx: bool,
    compute_dy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dy), placeholders for those not asked for. The row count is recomputed from the labels
    (a small reduction) rather than kept from the forward."""
    if not use_triton(x, y):
        dx, dy = _library.reference_vjp(
            lambda x, y: jsd_reference(x, y, label, beta, ignore_index), (x, y), grad
        )
        dx, dy = dx.contiguous(), dy.contiguous()
    else:
        x2, y2 = as_rows(x), as_rows(y)
        count = _row_count(label, ignore_index, x2.shape[0], x.device)
        dx, dy = _jsd_backward(grad, x2, y2, label, count, beta, ignore_index, compute_dx, compute_dy)
        dx = dx.view(x.shape) if compute_dx else None
        dy = dy.view(y.shape) if compute_dy else None
    return dx if compute_dx else _library.absent(x), dy if compute_dy else _library.absent(y)


def _jsd_setup(ctx, inputs, output):
    x, y, label, ctx.beta, ctx.ignore_index = inputs
    ctx.save_for_backward(x, y, label)


def _jsd_grad(ctx, grad):
    x, y, label = ctx.saved_tensors
    compute_dx, compute_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dy = _jsd_backward_op(grad, x, y, label, ctx.beta, ctx.ignore_index, compute_dx, compute_dy)
    return dx if compute_dx else None, dy if compute_dy else None, None, None, None


_jsd_op.register_autograd(_jsd_grad, setup_context=_jsd_setup)
