"""Fused residual add + RMSNorm: (y, new_residual) = (rms_norm(x + residual), x + residual).

This is the `hidden_states = residual + hidden_states; hidden_states = norm(hidden_states)` step of a
pre-norm decoder layer. new_residual is x + residual in the promoted dtype of the two (what torch's
`residual + hidden_states` gives), and y is exactly rms_norm(new_residual) (casting modes, offset and
output dtype as in rms_norm.py).

Kernels: the RMSNorm kernels of rms_norm.py in their residual mode (the math is written once there).
The forward reads x and residual once and writes new_residual, y and a fp32 rstd per row. The backward
gets dy and d(new_residual) (either may be absent) and computes
    dx = dresidual = drms_norm(dy) + d(new_residual)
in one pass (reads dy, d(new_residual), new_residual, weight, rstd; writes dx and dweight partials).
Only new_residual (an output the caller keeps anyway), weight and rstd are saved for backward.

dx and dresidual are the same value; when x and residual share a dtype the backward returns one tensor
for both (no copy). `in_place=True` writes it into the buffer of dy (the gradient of y), which the
caller can no longer use afterwards; see rms_norm.rms_norm for when that is unsafe.
"""

from __future__ import annotations

import torch

from liger_kernels import _library, _utils
from liger_kernels.ops._tiles import as_rows, from_rows
from liger_kernels.ops.rms_norm import (
    check_rms_norm_args,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
    rms_norm_reference,
)


class FusedAddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, residual2, weight, eps, offset, casting_mode, in_place):
        """x2, residual2: rows (M, H) with unit column stride; y and new_residual (M, H). Without
        residual2, new_residual is x2 itself (rms_norm_with_residual)."""
        y, rstd, new_residual = rms_norm_forward(x2, weight, eps, offset, casting_mode, residual=residual2)
        ctx.save_for_backward(new_residual, weight, rstd)
        ctx.offset, ctx.casting_mode, ctx.in_place = offset, casting_mode, in_place
        ctx.x_dtype, ctx.residual_dtype = x2.dtype, None if residual2 is None else residual2.dtype
        # Absent gradients stay None instead of being materialized as zeros (no wasted pass).
        ctx.set_materialize_grads(False)
        return y, new_residual

    @staticmethod
    def backward(ctx, dy, dnew_residual):
        new_residual, weight, rstd = ctx.saved_tensors
        if dy is None:  # only the residual stream is used: the norm contributes nothing
            dx, dw = dnew_residual, None
        else:
            dx, dw = rms_norm_backward(
                as_rows(dy),
                new_residual,
                weight,
                rstd,
                ctx.offset,
                ctx.casting_mode,
                ctx.in_place,
                ctx.needs_input_grad[2],
                dres=None if dnew_residual is None else as_rows(dnew_residual),
            )
        if dx is None:
            return None, None, None, None, None, None, None
        dresidual = None if ctx.residual_dtype is None else dx.to(ctx.residual_dtype)
        return dx.to(ctx.x_dtype), dresidual, dw, None, None, None, None


def fused_add_rms_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification (module docstring); also the CPU path."""
    new_residual = residual + x
    return rms_norm_reference(new_residual, weight, eps, offset, casting_mode), new_residual


@_utils.on_input_device
def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one kernel each way; see the module docstring.

    x and residual have the same shape (..., H); weight is (H,).
    """
    triton_path = _utils.use_triton(x, residual, weight)
    check_rms_norm_args(x, weight, casting_mode, triton_path)
    _utils.check_float("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(
            f"residual has shape {tuple(residual.shape)} but x has shape {tuple(x.shape)}; they must match"
        )
    _utils.check_same_device(x=x, residual=residual, weight=weight)
    if _library.compiling():  # one graph node under torch.compile (in_place does not apply there)
        y, new_residual, _ = _fused_add_rms_norm_op(
            x, residual, weight, float(eps), float(offset), casting_mode
        )
        return y, new_residual
    if not triton_path or x.numel() == 0:
        return fused_add_rms_norm_reference(x, residual, weight, eps, offset, casting_mode)
    y, new_residual = FusedAddRMSNormFunction.apply(
        as_rows(x), as_rows(residual), weight, float(eps), float(offset), casting_mode, bool(in_place)
    )
    return from_rows(y, x), from_rows(new_residual, x)


@_utils.on_input_device
def rms_norm_with_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x), x): a decoder layer's input goes to its norm and, unchanged, to the residual stream.
    The values are rms_norm's; the backward adds the residual stream's gradient to the norm's input
    gradient inside the norm's backward kernel (the fused_add_rms_norm backward), instead of autograd
    adding the two afterwards. Under torch.compile (which fuses such adds itself) and on CPU it is
    (rms_norm(x), x) as written."""
    if _library.compiling() or not _utils.use_triton(x, weight) or x.numel() == 0:
        return rms_norm(x, weight, eps, offset, casting_mode), x  # (rms_norm checks the arguments)
    check_rms_norm_args(x, weight, casting_mode, True)
    _utils.check_same_device(x=x, weight=weight)
    y, residual = FusedAddRMSNormFunction.apply(
        as_rows(x), None, weight, float(eps), float(offset), casting_mode, bool(in_place)
    )
    return from_rows(y, x), from_rows(residual, x)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _fused_add_rms_norm_fake(x, residual, weight, eps, offset, casting_mode):
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    y_dtype = torch.promote_types(sum_dtype, weight.dtype) if casting_mode == "llama" else sum_dtype
    rstd = x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=y_dtype), x.new_empty(x.shape, dtype=sum_dtype), rstd


@_library.custom_op("fused_add_rms_norm", _fused_add_rms_norm_fake)
def _fused_add_rms_norm_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    casting_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, new_residual, fp32 rstd per row)."""
    if not _utils.use_triton(x, residual, weight) or x.numel() == 0:
        y, new_residual = fused_add_rms_norm_reference(x, residual, weight, eps, offset, casting_mode)
        rstd = torch.rsqrt(new_residual.float().pow(2).mean(-1) + eps).reshape(-1)
        return y.contiguous(), new_residual.contiguous(), rstd
    y, rstd, new_residual = rms_norm_forward(
        as_rows(x), weight, eps, offset, casting_mode, residual=as_rows(residual)
    )
    return y.view(x.shape), new_residual.view(x.shape), rstd


def _fused_add_rms_norm_backward_fake(dy, dnew_residual, new_residual, weight, rstd, eps, offset,
                                      casting_mode, compute_dw):
    dw = _library.fake_grad(weight, compute_dw)
    return new_residual.new_empty(new_residual.shape), dw


@_library.custom_op("fused_add_rms_norm_backward", _fused_add_rms_norm_backward_fake)
def _fused_add_rms_norm_backward_op(
    dy: torch.Tensor,
    dnew_residual: torch.Tensor,
    new_residual: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    offset: float,
    casting_mode: str,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d new_residual in total = dx = dresidual, dweight or a placeholder)."""
    if not _utils.use_triton(new_residual, weight) or new_residual.numel() == 0:
        dx, dw = _library.reference_vjp(
            lambda r, w: rms_norm_reference(r, w, eps, offset, casting_mode), (new_residual, weight), dy
        )
        dx = dx + dnew_residual
    else:
        dx, dw = rms_norm_backward(
            as_rows(dy), as_rows(new_residual), weight, rstd, offset, casting_mode, False, compute_dw,
            dres=as_rows(dnew_residual),
        )
    return dx.reshape(new_residual.shape).contiguous(), dw if compute_dw else _library.absent(weight)


def _fused_add_rms_norm_setup(ctx, inputs, output):
    x, residual, weight, *ctx.params = inputs
    ctx.dtypes = x.dtype, residual.dtype
    ctx.save_for_backward(output[1], weight, output[2])


def _fused_add_rms_norm_grad(ctx, dy, dnew_residual, _drstd):
    new_residual, weight, rstd = ctx.saved_tensors
    compute_dw = ctx.needs_input_grad[2]
    dx, dw = _fused_add_rms_norm_backward_op(
        dy, dnew_residual, new_residual, weight, rstd, *ctx.params, compute_dw
    )
    x_dtype, residual_dtype = ctx.dtypes
    return dx.to(x_dtype), dx.to(residual_dtype), dw if compute_dw else None, None, None, None


_fused_add_rms_norm_op.register_autograd(_fused_add_rms_norm_grad, setup_context=_fused_add_rms_norm_setup)
