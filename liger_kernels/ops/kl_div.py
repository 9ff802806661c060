"""KL divergence with the semantics of `torch.nn.functional.kl_div`.

For input x (log-probabilities) and target t of the same shape (..., V), elementwise
    log_target=False:  l = t * (log(max(t, eps)) - x)
    log_target=True:   l = exp(t) * (t - x)
Reductions (as torch): "none" -> l (input's shape); "sum" -> sum(l); "mean" -> sum(l) / l.numel();
"batchmean" -> sum(l) / x.shape[0] (the first dimension, as torch; for (B, T, V) inputs that is B).
The `eps` clamp stands for torch's convention 0 * log 0 = 0; it changes the loss only for targets
below eps, by at most eps * |log eps| (2.3e-9 for the default) per element.

Gradients (of the formula above, both inputs):
    dx = -t * g                                   (log_target: -exp(t) * g)
    dt = (log(max(t, eps)) + [t >= eps] - x) * g  (log_target: exp(t) * (t - x + 1) * g)
with g the incoming gradient times the reduction's scale. Output dtype: the promotion of the two
input dtypes (as torch); dx in x's dtype, dt in t's dtype. Math in fp32.

Kernels: rows of width V in 2-D tiles (`_tiles`), one pass over both inputs each way. The forward
writes l ("none") or one fp32 partial sum per program (no atomics), summed by torch. The backward
recomputes from x and t (nothing but the inputs is saved) and reads the scalar incoming gradient from
device memory (no host sync). It computes only the gradients autograd asks for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, new_output, on_input_device, use_triton
from liger_kernels.ops._tiles import as_rows, new_partials, store_partial, tile_config, tile_offsets

REDUCTIONS = ("none", "sum", "mean", "batchmean")


@triton.jit
def _kl_div_fwd_kernel(
    x_ptr,
    x_stride,
    t_ptr,
    t_stride,
    out_ptr,
    n_rows,
    n_cols,
    eps,
    LOG_TARGET: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = tile_offsets(n_rows, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows * t_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if LOG_TARGET:
        loss = tl.exp(t) * (t - x)
    else:
        loss = t * (tl.log(tl.maximum(t, eps)) - x)
    loss = tl.where(mask, loss, 0.0)
    if REDUCE:
        store_partial(out_ptr, tl.sum(loss))
    else:
        tl.store(out_ptr + rows * n_cols + cols, loss.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kl_div_bwd_kernel(
    x_ptr,
    x_stride,
    t_ptr,
    t_stride,
    g_ptr,
    g_stride,
    dx_ptr,
    dt_ptr,
    n_rows,
    n_cols,
    eps,
    scale,
    LOG_TARGET: tl.constexpr,
    SCALAR_GRAD: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = tile_offsets(n_rows, n_cols, BLOCK_M, BLOCK_N)
    if SCALAR_GRAD:  # reduced loss: one incoming gradient times the reduction's scale
        g = tl.load(g_ptr).to(tl.float32) * scale
    else:
        g = tl.load(g_ptr + rows * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows * t_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = rows * n_cols + cols
    if LOG_TARGET:
        p = tl.exp(t)
        if COMPUTE_DX:
            tl.store(dx_ptr + out, (-p * g).to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DT:
            x = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dt_ptr + out, (p * (t - x + 1.0) * g).to(dt_ptr.dtype.element_ty), mask=mask)
    else:
        if COMPUTE_DX:
            tl.store(dx_ptr + out, (-t * g).to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DT:
            x = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dlog = tl.where(t >= eps, tl.log(tl.maximum(t, eps)) + 1.0, tl.log(eps))
            tl.store(dt_ptr + out, ((dlog - x) * g).to(dt_ptr.dtype.element_ty), mask=mask)


def _scale(reduction: str, shape: torch.Size, numel: int) -> float:
    """Factor the summed loss is multiplied by (NaN for an empty mean, as torch's 0 / 0)."""
    divisor = {"mean": numel, "batchmean": shape[0]}.get(reduction, 1)
    return 1.0 / divisor if divisor else float("nan")


def _kl_div_forward(x2, t2, shape, reduction, log_target, eps):
    """The loss of rows x2, t2 (unit column stride) of inputs shaped `shape`."""
    n_rows, n_cols = x2.shape
    out_dtype = torch.promote_types(x2.dtype, t2.dtype)
    grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols)
    reduce = reduction != "none"
    # The unreduced loss is allocated in the inputs' shape (contiguous: the kernel's (M, N) rows), not
    # viewed into it: KLDivFunction returns it, and a view made there could not be modified in place.
    out = new_partials(grid, x2.device) if reduce else new_output(shape, out_dtype, x2.device)
    _kl_div_fwd_kernel[grid](
        x2, x2.stride(0), t2, t2.stride(0), out, n_rows, n_cols, eps,
        LOG_TARGET=log_target, REDUCE=reduce, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    if reduce:
        return (out.sum() * _scale(reduction, shape, x2.numel())).to(out_dtype)
    return out


def _kl_div_backward(grad, x2, t2, shape, reduction, log_target, eps, compute_dx, compute_dt):
    """(dx or None, dt or None), shaped `shape`, for the incoming gradient of the loss."""
    n_rows, n_cols = x2.shape
    scalar = reduction != "none"
    g = grad if scalar else as_rows(grad)
    dx = new_output((n_rows, n_cols), x2.dtype, x2.device) if compute_dx else None
    dt = new_output((n_rows, n_cols), t2.dtype, t2.device) if compute_dt else None
    grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols)
    _kl_div_bwd_kernel[grid](
        x2, x2.stride(0), t2, t2.stride(0), g, 0 if scalar else g.stride(0),
        dx if compute_dx else x2, dt if compute_dt else t2,  # unused pointers stand in
        n_rows, n_cols, eps, _scale(reduction, shape, x2.numel()),
        LOG_TARGET=log_target, SCALAR_GRAD=scalar, COMPUTE_DX=compute_dx, COMPUTE_DT=compute_dt,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dx.view(shape) if compute_dx else None, dt.view(shape) if compute_dt else None


class KLDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, reduction, log_target, eps):
        x2, t2 = as_rows(x), as_rows(t)
        ctx.save_for_backward(x2, t2)
        ctx.shape, ctx.reduction, ctx.log_target, ctx.eps = x.shape, reduction, log_target, eps
        return _kl_div_forward(x2, t2, x.shape, reduction, log_target, eps)

    @staticmethod
    def backward(ctx, grad):
        x2, t2 = ctx.saved_tensors
        dx, dt = _kl_div_backward(
            grad, x2, t2, ctx.shape, ctx.reduction, ctx.log_target, ctx.eps,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return dx, dt, None, None, None


def kl_div_reference(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "batchmean",
    log_target: bool = False,
    eps: float = 1e-10,
) -> torch.Tensor:
    """The specification (module docstring), in fp32 (fp64 for fp64 inputs); also the CPU path."""
    out_dtype = torch.promote_types(input.dtype, target.dtype)
    compute = torch.promote_types(out_dtype, torch.float32)
    x, t = input.to(compute), target.to(compute)
    if log_target:
        loss = torch.exp(t) * (t - x)
    else:
        loss = t * (torch.log(t.clamp_min(eps)) - x)
    if reduction != "none":
        loss = loss.sum() * _scale(reduction, input.shape, input.numel())
    return loss.to(out_dtype)


@on_input_device
def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "batchmean",
    log_target: bool = False,
    eps: float = 1e-10,
) -> torch.Tensor:
    """KL(target || exp(input)) as `torch.nn.functional.kl_div(input, target, reduction, log_target)`;
    input holds log-probabilities, target probabilities (log-probabilities with log_target=True).
    Gradients flow to both. See the module docstring for the exact formula and eps."""
    check_float("input", input)
    check_float("target", target)
    check_same_device(input=input, target=target)
    if input.shape != target.shape:
        raise ValueError(
            f"input {tuple(input.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if _library.compiling() and input.numel():  # one graph node under torch.compile
        return _kl_div_op(input, target, reduction, bool(log_target), float(eps))
    if not use_triton(input, target) or input.numel() == 0:
        return kl_div_reference(input, target, reduction, log_target, eps)
    return KLDivFunction.apply(input, target, reduction, bool(log_target), float(eps))


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _kl_div_fake(input, target, reduction, log_target, eps):
    shape = input.shape if reduction == "none" else ()
    return input.new_empty(shape, dtype=torch.promote_types(input.dtype, target.dtype))


@_library.custom_op("kl_div", _kl_div_fake)
def _kl_div_op(
    input: torch.Tensor, target: torch.Tensor, reduction: str, log_target: bool, eps: float
) -> torch.Tensor:
    if not use_triton(input, target):
        return kl_div_reference(input, target, reduction, log_target, eps).contiguous()
    return _kl_div_forward(as_rows(input), as_rows(target), input.shape, reduction, log_target, eps)


def _kl_div_backward_fake(grad, input, target, reduction, log_target, eps, compute_dx, compute_dt):
    return (
        _library.fake_grad(input, compute_dx),
        _library.fake_grad(target, compute_dt),
    )


@_library.custom_op("kl_div_backward", _kl_div_backward_fake)
def _kl_div_backward_op(
    grad: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str,
    log_target: bool,
    eps: float,
    compute_dx: bool,
    compute_dt: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dinput, dtarget), placeholders for those not asked for."""
    if not use_triton(input, target):
        dx, dt = _library.reference_vjp(
            lambda x, t: kl_div_reference(x, t, reduction, log_target, eps), (input, target), grad
        )
        dx, dt = dx.contiguous(), dt.contiguous()
    else:
        dx, dt = _kl_div_backward(
            grad, as_rows(input), as_rows(target), input.shape, reduction, log_target, eps,
            compute_dx, compute_dt,
        )
    return dx if compute_dx else _library.absent(input), dt if compute_dt else _library.absent(target)


def _kl_div_setup(ctx, inputs, output):
    input, target, *ctx.params = inputs
    ctx.save_for_backward(input, target)


def _kl_div_grad(ctx, grad):
    input, target = ctx.saved_tensors
    compute_dx, compute_dt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dt = _kl_div_backward_op(grad, input, target, *ctx.params, compute_dx, compute_dt)
    return dx if compute_dx else None, dt if compute_dt else None, None, None, None


_kl_div_op.register_autograd(_kl_div_grad, setup_context=_kl_div_setup)
