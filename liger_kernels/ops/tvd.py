"""Total variation distance between two distributions given as probabilities.

For p and q of shape (..., V), rows of width V, elementwise l = 0.5 * |p - q|; rows whose `label` is
`ignore_index` contribute 0. With n the number of counted rows (all rows without labels):
"none" -> l (p's shape, zeros on ignored rows); "sum" -> sum(l); "batchmean" -> sum(l) / n (the mean
per-row TVD); "mean" -> sum(l) / (n * V). A zero n counts as 1 (every row ignored: loss 0).
Gradients: dp = 0.5 * sign(p - q) * g, dq = -dp (sign(0) = 0, as autograd's abs), g the incoming
gradient times the reduction's scale; 0 on ignored rows.

Kernels: rows in 2-D tiles (`_tiles`) masked by the row labels; one pass over p and q each way; the
forward writes l ("none") or one fp32 partial sum per program (no atomics); the backward reads the
incoming gradient and the normalizer from device memory (no host sync). Output in the promoted dtype
of p and q, gradients in their inputs' dtypes, math in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, new_output, on_input_device, use_triton
from liger_kernels.ops._tiles import as_rows, new_partials, store_partial, tile_config, tile_offsets

REDUCTIONS = ("none", "sum", "mean", "batchmean")


@triton.jit
def _load_tile(p_ptr, p_stride, q_ptr, q_stride, label_ptr, ignore_index, n_rows, n_cols,
               HAS_LABEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """p - q (fp32) of this tile, its mask with ignored rows off, the in-bounds mask, rows, cols."""
    rows, cols, in_bounds = tile_offsets(n_rows, n_cols, BLOCK_M, BLOCK_N)
    mask = in_bounds
    if HAS_LABEL:
        label = tl.load(label_ptr + rows, mask=rows < n_rows, other=ignore_index)
        mask = mask & (label != ignore_index)
    p = tl.load(p_ptr + rows * p_stride + cols, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + rows * q_stride + cols, mask=mask, other=0.0).to(tl.float32)
    return p - q, mask, in_bounds, rows, cols


@triton.jit
def _tvd_fwd_kernel(
    p_ptr, p_stride, q_ptr, q_stride, label_ptr, out_ptr, ignore_index, n_rows, n_cols,
    HAS_LABEL: tl.constexpr, REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    diff, mask, in_bounds, rows, cols = _load_tile(p_ptr, p_stride, q_ptr, q_stride, label_ptr,
                                                   ignore_index, n_rows, n_cols, HAS_LABEL, BLOCK_M, BLOCK_N)
    loss = tl.where(mask, 0.5 * tl.abs(diff), 0.0)
    if REDUCE:
        store_partial(out_ptr, tl.sum(loss))
    else:  # ignored rows get their zeros stored
        tl.store(out_ptr + rows * n_cols + cols, loss.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _tvd_bwd_kernel(
    p_ptr, p_stride, q_ptr, q_stride, label_ptr, g_ptr, g_stride, norm_ptr, dp_ptr, dq_ptr,
    ignore_index, n_rows, n_cols,
    HAS_LABEL: tl.constexpr, SCALAR_GRAD: tl.constexpr, COMPUTE_DP: tl.constexpr,
    COMPUTE_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    diff, mask, in_bounds, rows, cols = _load_tile(p_ptr, p_stride, q_ptr, q_stride, label_ptr,
                                                   ignore_index, n_rows, n_cols, HAS_LABEL, BLOCK_M, BLOCK_N)
    if SCALAR_GRAD:  # reduced loss: one incoming gradient over the reduction's normalizer
        g = tl.load(g_ptr).to(tl.float32) / tl.load(norm_ptr)
    else:
        g = tl.load(g_ptr + rows * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    half_sign = tl.where(diff > 0, 0.5, tl.where(diff < 0, -0.5, 0.0))
    dp = tl.where(mask, half_sign * g, 0.0)
    out = rows * n_cols + cols
    if COMPUTE_DP:
        tl.store(dp_ptr + out, dp.to(dp_ptr.dtype.element_ty), mask=in_bounds)
    if COMPUTE_DQ:
        tl.store(dq_ptr + out, (-dp).to(dq_ptr.dtype.element_ty), mask=in_bounds)


def _normalizer(reduction: str, label, ignore_index: int, n_rows: int, n_cols: int, device):
    """Divisor of a reduced loss as a 0-d fp32 device tensor (no host sync when counting labels);
    a zero divisor counts as 1."""
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=device)
    if label is None:
        rows = torch.full((), float(n_rows), dtype=torch.float32, device=device)
    else:
        rows = (label.reshape(-1) != ignore_index).sum(dtype=torch.float32)
    return (rows * (n_cols if reduction == "mean" else 1)).clamp_min(1.0)


def _row_labels(label, p2):
    """The labels as one contiguous row index vector (p2 stands in for the unused pointer)."""
    return label.reshape(-1).contiguous() if label is not None else p2


def _tvd_forward(p2, q2, label, reduction, ignore_index, shape):
    """(loss, normalizer or None) of rows p2, q2 (unit column stride) of inputs shaped `shape`."""
    n_rows, n_cols = p2.shape
    out_dtype = torch.promote_types(p2.dtype, q2.dtype)
    reduce = reduction != "none"
    grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols)
    # The unreduced loss is allocated in the inputs' shape (contiguous: the kernel's (M, N) rows), not
    # viewed into it: TVDFunction returns it, and a view made there could not be modified in place.
    out = new_partials(grid, p2.device) if reduce else new_output(shape, out_dtype, p2.device)
    _tvd_fwd_kernel[grid](
        p2, p2.stride(0), q2, q2.stride(0), _row_labels(label, p2), out, ignore_index, n_rows, n_cols,
        HAS_LABEL=label is not None, REDUCE=reduce, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    if not reduce:
        return out, None
    norm = _normalizer(reduction, label, ignore_index, n_rows, n_cols, p2.device)
    return (out.sum() / norm).to(out_dtype), norm


def _tvd_backward(grad, p2, q2, label, norm, ignore_index, compute_dp, compute_dq):
    """(dp (M, N) or None, dq (M, N) or None); norm is None for the unreduced loss."""
    n_rows, n_cols = p2.shape
    reduce = norm is not None
    g = grad if reduce else as_rows(grad)
    dp = new_output((n_rows, n_cols), p2.dtype, p2.device) if compute_dp else p2
    dq = new_output((n_rows, n_cols), q2.dtype, q2.device) if compute_dq else q2
    grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols)
    _tvd_bwd_kernel[grid](
        p2, p2.stride(0), q2, q2.stride(0), _row_labels(label, p2), g, 0 if reduce else g.stride(0),
        norm if reduce else p2, dp, dq, ignore_index, n_rows, n_cols,
        HAS_LABEL=label is not None, SCALAR_GRAD=reduce, COMPUTE_DP=compute_dp, COMPUTE_DQ=compute_dq,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dp if compute_dp else None, dq if compute_dq else None


class TVDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, q, label, reduction, ignore_index):
        p2, q2 = as_rows(p), as_rows(q)
        loss, norm = _tvd_forward(p2, q2, label, reduction, ignore_index, p.shape)
        ctx.save_for_backward(p2, q2, label, norm)
        ctx.shape, ctx.ignore_index = p.shape, ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad):
        p2, q2, label, norm = ctx.saved_tensors
        dp, dq = _tvd_backward(
            grad, p2, q2, label, norm, ctx.ignore_index, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        dp = dp.view(ctx.shape) if dp is not None else None
        dq = dq.view(ctx.shape) if dq is not None else None
        return dp, dq, None, None, None


def tvd_reference(
    p: torch.Tensor,
    q: torch.Tensor,
    reduction: str = "batchmean",
    label: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The specification (module docstring), in fp32 (fp64 for fp64 inputs); also the CPU path."""
    out_dtype = torch.promote_types(p.dtype, q.dtype)
    compute = torch.promote_types(out_dtype, torch.float32)
    loss = 0.5 * (p.to(compute) - q.to(compute)).abs()
    if label is not None:
        valid = (label != ignore_index).unsqueeze(-1)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.to(out_dtype)
    n_rows, n_cols = loss.numel() // max(loss.shape[-1], 1), loss.shape[-1]
    norm = _normalizer(reduction, label, ignore_index, n_rows, n_cols, loss.device).to(compute)
    return (loss.sum() / norm).to(out_dtype)


@on_input_device
def tvd(
    p: torch.Tensor,
    q: torch.Tensor,
    reduction: str = "batchmean",
    label: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Total variation distance 0.5 * |p - q| between probabilities (..., V), reduced as the module
    docstring says; rows whose label (shape (...)) is ignore_index count as absent."""
    check_float("p", p)
    check_float("q", q)
    check_same_device(p=p, q=q, label=label)
    if p.shape != q.shape:
        raise ValueError(f"p {tuple(p.shape)} and q {tuple(q.shape)} must have the same shape")
    if p.dim() == 0:
        raise ValueError("p must have at least one dimension (the distribution)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if label is not None:
        if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
            raise TypeError(f"label must be an integer tensor, got {label.dtype}")
        if label.shape != p.shape[:-1]:
            raise ValueError(
                f"label has shape {tuple(label.shape)}; expected {tuple(p.shape[:-1])} "
                "(p's shape without its last dimension)"
            )
    if _library.compiling() and p.numel():  # one graph node under torch.compile
        return _tvd_op(p, q, reduction, label, int(ignore_index))
    if not use_triton(p, q) or p.numel() == 0:
        return tvd_reference(p, q, reduction, label, ignore_index)
    return TVDFunction.apply(p, q, label, reduction, int(ignore_index))


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _tvd_fake(p, q, reduction, label, ignore_index):
    return p.new_empty(p.shape if reduction == "none" else (), dtype=torch.promote_types(p.dtype, q.dtype))


@_library.custom_op("tvd", _tvd_fake)
def _tvd_op(
    p: torch.Tensor, q: torch.Tensor, reduction: str, label: Optional[torch.Tensor], ignore_index: int
) -> torch.Tensor:
    if not use_triton(p, q):
        return tvd_reference(p, q, reduction, label, ignore_index).contiguous()
    return _tvd_forward(as_rows(p), as_rows(q), label, reduction, ignore_index, p.shape)[0]


def _tvd_backward_fake(grad, p, q, reduction, label, ignore_index, compute_dp, compute_dq):
    return (
        _library.fake_grad(p, compute_dp),
        _library.fake_grad(q, compute_dq),
    )


@_library.custom_op("tvd_backward", _tvd_backward_fake)
def _tvd_backward_op(
    grad: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    reduction: str,
    label: Optional[torch.Tensor],
    ignore_index: int,
    compute_dp: bool,
    compute_dq: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dp, dq), placeholders for those not asked for. The normalizer is recomputed from the labels
    (a small reduction) rather than kept from the forward."""
    if not use_triton(p, q):
        dp, dq = _library.reference_vjp(
            lambda p, q: tvd_reference(p, q, reduction, label, ignore_index), (p, q), grad
        )
        dp, dq = dp.contiguous(), dq.contiguous()
    else:
        p2, q2 = as_rows(p), as_rows(q)
        n_rows, n_cols = p2.shape
        reduce = reduction != "none"
        norm = _normalizer(reduction, label, ignore_index, n_rows, n_cols, p.device) if reduce else None
        dp, dq = _tvd_backward(grad, p2, q2, label, norm, ignore_index, compute_dp, compute_dq)
        dp = dp.view(p.shape) if compute_dp else None
        dq = dq.view(q.shape) if compute_dq else None
    return dp if compute_dp else _library.absent(p), dq if compute_dq else _library.absent(q)


def _tvd_setup(ctx, inputs, output):
    p, q, ctx.reduction, label, ctx.ignore_index = inputs
    ctx.save_for_backward(p, q, label)


def _tvd_grad(ctx, grad):
    p, q, label = ctx.saved_tensors
    compute_dp, compute_dq = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dp, dq = _tvd_backward_op(grad, p, q, ctx.reduction, label, ctx.ignore_index, compute_dp, compute_dq)
    return dp if compute_dp else None, dq if compute_dq else None, None, None, None


_tvd_op.register_autograd(_tvd_grad, setup_context=_tvd_setup)
