"""LayerNorm over the last dimension: y = (x - mean) * rstd * weight + bias.

mean, var (biased) and rstd = 1 / sqrt(var + eps) per row in fp32, the whole formula in fp32, one
rounding at the end to x's dtype: `F.layer_norm(x.float(), (H,), weight.float(), bias.float(), eps)
.to(x.dtype)`, which is what nn.LayerNorm computes for a bf16/fp16 input. weight and bias may have
another float dtype than x (their gradients come back in their own dtypes).

Backward, in fp32 with xhat = (x - mean) * rstd and g = dy * weight:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dweight = sum_rows dy * xhat,  dbias = sum_rows dy.

Kernels (same layout as rms_norm.py): the forward is one pass over [BLOCK_M, BLOCK_N] row tiles (read
x, weight, bias; write y and fp32 mean and rstd per row); the backward is one pass on a persistent grid
(read dy, x, weight, mean, rstd; write dx and per-program fp32 partial rows of dweight and dbias;
the next tile's loads in flight during this one's math, as in rms_norm.py), then one small launch
adds the partial rows up. Rows up to `_utils.MAX_FUSED_SIZE` wide.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from liger_kernels import _library, _utils
from liger_kernels.ops._tiles import as_rows, from_rows
from liger_kernels.ops.rms_norm import backward_config, sum_partials, tile_config, tile_rows


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,
    x_stride,
    y_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    n_rows,
    n_cols,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    rows, row_ok, mask = tile_rows(tl.program_id(0), n_rows, col_ok, BLOCK_M)
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    y = xc * rstd[:, None] * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_loads(
    dy_ptr, dy_stride, x_ptr, x_stride, mean_ptr, rstd_ptr, tile, n_rows, cols, col_ok, BLOCK_M: tl.constexpr
):
    """dy and x of a row tile (in their storage dtypes), its mean and rstd."""
    rows, row_ok, mask = tile_rows(tile, n_rows, col_ok, BLOCK_M)
    dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0)
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    return dy, x, mean, tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,
    dy_stride,
    x_ptr,
    x_stride,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    partial_ptr,
    partial_stride,
    n_rows,
    n_cols,
    HAS_BIAS: tl.constexpr,
    COMPUTE_DWB: tl.constexpr,
    LOAD_AHEAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Persistent: program p handles tiles p, p + P, ...; dx is contiguous. Program p writes row p of
    the partials: dweight in columns [0, n_cols), dbias in [n_cols, 2 n_cols) with HAS_BIAS.
    LOAD_AHEAD: as in rms_norm's backward (next tile's loads in flight during this tile's math)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if LOAD_AHEAD:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dy_next, x_next, mean_next, rstd_next = _layer_norm_bwd_loads(
            dy_ptr, dy_stride, x_ptr, x_stride, mean_ptr, rstd_ptr, pid, n_rows, cols, col_ok, BLOCK_M
        )
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), n_programs):
        rows, row_ok, mask = tile_rows(tile, n_rows, col_ok, BLOCK_M)
        if LOAD_AHEAD:
            dy = dy_next
            x = x_next
            mean = mean_next
            rstd = rstd_next
            dy_next, x_next, mean_next, rstd_next = _layer_norm_bwd_loads(  # masked off past the end
                dy_ptr, dy_stride, x_ptr, x_stride, mean_ptr, rstd_ptr, tile + n_programs, n_rows, cols,
                col_ok, BLOCK_M
            )
        else:
            dy, x, mean, rstd = _layer_norm_bwd_loads(
                dy_ptr, dy_stride, x_ptr, x_stride, mean_ptr, rstd_ptr, tile, n_rows, cols, col_ok, BLOCK_M
            )
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dy = dy.to(tl.float32)
        x = x.to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if COMPUTE_DWB:  # before the row sums: dy is then dead while they reduce (fewer live registers)
            dw += dy * xhat
            if HAS_BIAS:
                db += dy
        g = dy * w[None, :]
        c_g = tl.sum(g, axis=1) / n_cols
        c_gx = tl.sum(g * xhat, axis=1) / n_cols
        dx = rstd[:, None] * (g - c_g[:, None] - xhat * c_gx[:, None])
        tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DWB:
        tl.store(partial_ptr + pid * partial_stride + cols, tl.sum(dw, axis=0), mask=col_ok)
        if HAS_BIAS:
            tl.store(partial_ptr + pid * partial_stride + n_cols + cols, tl.sum(db, axis=0), mask=col_ok)


def _layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
    """Forward on (M, H) rows. Returns (y, mean, rstd)."""
    n_rows, n_cols = x.shape
    y = _utils.new_output((n_rows, n_cols), x.dtype, x.device)
    mean = _utils.new_output((n_rows,), torch.float32, x.device)
    rstd = _utils.new_output((n_rows,), torch.float32, x.device)
    block_m, block_n, num_warps = tile_config(n_cols)
    _layer_norm_fwd_kernel[(_utils.cdiv(n_rows, block_m),)](
        x,
        x.stride(0),
        y,
        weight,
        bias if bias is not None else weight,  # unused pointer without HAS_BIAS
        mean,
        rstd,
        n_rows,
        n_cols,
        eps,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, mean, rstd


def _layer_norm_backward(dy, x, weight, bias, mean, rstd, compute_dwb: bool):
    """Backward on (M, H) rows (unit column stride). Returns (dx, dweight or None, dbias or None)."""
    n_rows, n_cols = x.shape
    dx = _utils.new_output((n_rows, n_cols), x.dtype, x.device)
    block_m, block_n, num_warps, load_ahead, per_sm = backward_config(
        n_cols, max(x.element_size(), dy.element_size())
    )
    n_programs = _utils.num_programs_for_rows(_utils.cdiv(n_rows, block_m), x.device, per_sm)
    has_bias = bias is not None
    n_out = 2 * n_cols if has_bias else n_cols
    partial = (
        _utils.new_output((n_programs, n_out), torch.float32, x.device) if compute_dwb else rstd
    )  # rstd stands in for the unused pointer
    _layer_norm_bwd_kernel[(n_programs,)](
        dy,
        dy.stride(0),
        x,
        x.stride(0),
        weight,
        mean,
        rstd,
        dx,
        partial,
        n_out,
        n_rows,
        n_cols,
        HAS_BIAS=has_bias,
        COMPUTE_DWB=compute_dwb,
        LOAD_AHEAD=load_ahead,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    if not compute_dwb:
        return dx, None, None
    # One launch sums dweight and dbias together (they share the weight's dtype in every HF model).
    sums = sum_partials(partial, weight.dtype)
    db = sums[n_cols:].to(bias.dtype) if has_bias else None
    return dx, sums[:n_cols], db


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = as_rows(x)
        y, mean, rstd = _layer_norm_forward(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        return y if x.dim() == 2 else y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        compute_dwb = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, dw, db = _layer_norm_backward(as_rows(dy), x2, weight, bias, mean, rstd, compute_dwb)
        return dx if dy.dim() == 2 else dx.view(dy.shape), dw, db, None


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """The specification (module docstring); also the CPU path. float64 inputs give exact math."""
    compute = torch.promote_types(x.dtype, torch.float32)
    b = bias.to(compute) if bias is not None else None
    return F.layer_norm(x.to(compute), (x.shape[-1],), weight.to(compute), b, eps).to(x.dtype)


@_utils.on_input_device
def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension of x (..., H) with weight (H,) and optional bias (H,).

    Output in x's dtype; see the module docstring. CPU tensors run the torch reference.
    """
    triton_path = _utils.use_triton(x, weight, bias)
    _utils.check_float("x", x)
    _utils.check_float("weight", weight)
    if bias is not None:
        _utils.check_float("bias", bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (hidden_size,), got shape {tuple(t.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the hidden size)")
    _utils.check_last_dim("x", x, weight.shape[0], "weight's size")
    if bias is not None:
        _utils.check_last_dim("x", x, bias.shape[0], "bias's size")
    _utils.check_same_device(x=x, weight=weight, bias=bias)
    _utils.check_row_size("x", x.shape[-1], _utils.MAX_FUSED_SIZE if triton_path else sys.maxsize)
    if _library.compiling():  # one graph node under torch.compile
        return _layer_norm_op(x, weight, bias, float(eps))[0]
    if not triton_path or x.numel() == 0:
        return layer_norm_reference(x, weight, bias, eps)
    return from_rows(LayerNormFunction.apply(as_rows(x), weight, bias, float(eps)), x)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _layer_norm_fake(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    stats = [x.new_empty(rows, dtype=torch.float32) for _ in range(2)]  # mean, rstd
    return x.new_empty(x.shape), *stats


@_library.custom_op("layer_norm", _layer_norm_fake)
def _layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, fp32 mean and rstd per row)."""
    if not _utils.use_triton(x, weight, bias) or x.numel() == 0:
        var, mean = torch.var_mean(x.float(), -1, correction=0)
        rstd = torch.rsqrt(var + eps).reshape(-1)
        return layer_norm_reference(x, weight, bias, eps).contiguous(), mean.reshape(-1), rstd
    y, mean, rstd = _layer_norm_forward(as_rows(x), weight, bias, eps)
    return y.view(x.shape), mean, rstd


def _layer_norm_backward_fake(dy, x, weight, bias, mean, rstd, eps, compute_dwb):
    if not compute_dwb:
        return x.new_empty(x.shape), _library.absent(weight), _library.absent(weight)
    db = bias.new_empty(bias.shape) if bias is not None else _library.absent(weight)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


@_library.custom_op("layer_norm_backward", _layer_norm_backward_fake)
def _layer_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    compute_dwb: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); placeholders for dweight and dbias unless compute_dwb (and a bias)."""
    if not _utils.use_triton(x, weight, bias) or x.numel() == 0:
        params = (weight,) if bias is None else (weight, bias)
        dx, dw, *db = _library.reference_vjp(
            lambda x, w, *b: layer_norm_reference(x, w, b[0] if b else None, eps), (x, *params), dy
        )
        db = db[0] if db else None
    else:
        dx, dw, db = _layer_norm_backward(
            as_rows(dy), as_rows(x).contiguous(), weight, bias, mean, rstd, compute_dwb
        )
        if db is not None:  # a view of dw's buffer: custom op outputs must not alias each other
            db = db.clone()
    if not compute_dwb:
        dw = db = None
    dw = _library.absent(weight) if dw is None else dw
    return dx.reshape(x.shape).contiguous(), dw, _library.absent(weight) if db is None else db


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, ctx.eps = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])


def _layer_norm_grad(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    compute_dwb = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dx, dw, db = _layer_norm_backward_op(dy, x, weight, bias, mean, rstd, ctx.eps, compute_dwb)
    return dx, dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None, None


_layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)
