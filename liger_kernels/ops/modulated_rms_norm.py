"""Modulated RMSNorm (AdaRMSNorm / FiLM / DiT's adaLN conditioning):

    y = rms_norm(x, weight, eps, offset, casting_mode) * (1 + scale) + shift

x (..., H), R rows. weight (H,) or None (no affine: the norm is x * rstd, rounded as the casting mode
rounds it; `offset` must then be 0). scale and shift (shift optional; same shape as scale) are shared
by groups of consecutive rows:
- (H,): one row for all R rows;
- (B, H) with B dividing R: batch item b's R / B consecutive rows share row b (x (B, T, H) or (B*T, H));
  the unsqueezed form (B, 1, ..., 1, H) of x's rank, leading dimensions equal to x's, is the same;
- x's shape: one row each (no sharing).

Rounding (the specification is `modulated_rms_norm_reference`): the norm part is exactly `rms_norm`
(its casting modes, its output dtype: x's, or in "llama" mode the promotion of x's and weight's), and
its output, rounded to that dtype as `rms_norm` returns it (what a model that calls its norm module
and then modulates sees), is modulated in fp32 (`n * (1 + scale) + shift`, scale and shift upcast)
with one rounding to the norm's output dtype. scale and shift must have x's dtype.

Backward: fp32 math with the forward's fp32 rstd, roundings taken as identity, n the (rounded) norm
output that scale multiplied:
    dscale = sum over the rows sharing a scale row of dy * n,   dshift = the same sum of dy,
and the gradient of the norm's output, dy * (1 + scale), goes through rms_norm's backward (dx,
dweight). A per-row scale gets dscale = dy * n directly and shift's gradient is dy itself.

Kernels (the rms_norm tile helpers, casting logic and partial-sum reduction, reused). Forward: one
program per [BLOCK_M, BLOCK_N] tile of rows (narrow rows packed, as rms_norm): reads x, weight,
scale, shift, writes y and a fp32 rstd per row. Backward: one pass on a grid of (groups x programs):
program (g, p) strides over the row tiles of group g (all rows for a shared or per-row scale), loads
its group's scale row once, reads dy, x and rstd, recomputes the norm output, writes dx (and the
per-row dscale), and accumulates dweight, dscale and dshift in fp32 registers; each program stores
one partial row per gradient. `rms_norm.sum_partials` adds them up in a fixed order per group (no
atomics: deterministic). Saved for backward: x, weight, scale and the rstd (not y, not shift).
Rows up to `_utils.MAX_FUSED_SIZE` wide (ValueError beyond; the reference, the CPU path, has none).
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import triton
import triton.language as tl

from liger_kernels import _library, _utils
from liger_kernels.ops._tiles import as_rows, from_rows
from liger_kernels.ops.rms_norm import (
    _CAST_CODES,
    CASTING_MODES,
    _effective_weight,
    _promote,
    _rms_norm_rows,
    _rms_norm_rows_backward,
    _round,
    backward_config,
    check_rms_norm_args,
    rms_norm_apply,
    rms_norm_reference,
    sum_partials,
    tile_config,
    tile_rows,
)


@triton.jit
def _weight_row(w_ptr, cols, col_ok, offset, CAST: tl.constexpr, X_DTYPE: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """offset + weight as rms_norm rounds it, or ones without a weight."""
    if HAS_WEIGHT:
        w_eff = _effective_weight(tl.load(w_ptr + cols, mask=col_ok, other=0.0), offset, CAST, X_DTYPE)
    else:
        w_eff = tl.full([BLOCK_N], 1.0, tl.float32)
    return w_eff


@triton.jit
def _mod_rms_norm_fwd_kernel(
    x_ptr, x_stride, w_ptr, s_ptr, s_stride, b_ptr, b_stride, y_ptr, rstd_ptr,
    n_rows, n_cols, rows_per_group, eps, offset,
    CAST: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SHIFT: tl.constexpr, SHARED: tl.constexpr,
    ROUND_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One tile of rows; row r takes scale/shift row r // rows_per_group (row 0 when SHARED). y and
    rstd are contiguous. ROUND_NORM: the norm's output dtype is x's (else fp32: no rounding)."""
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    rows, row_ok, mask = tile_rows(tl.program_id(0), n_rows, col_ok, BLOCK_M)
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
    x_dtype = x.dtype
    w_eff = _weight_row(w_ptr, cols, col_ok, offset, CAST, x_dtype, HAS_WEIGHT, BLOCK_N)
    n, rstd = _rms_norm_rows(x.to(tl.float32), w_eff, n_cols, eps, CAST, x_dtype)
    if ROUND_NORM:
        n = _round(n, x_dtype)
    if SHARED:
        s = tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        group = rows // rows_per_group
        s = tl.load(s_ptr + group[:, None] * s_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = n * (1.0 + s)
    if HAS_SHIFT:
        if SHARED:
            b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        else:
            b = tl.load(b_ptr + group[:, None] * b_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y += b
    tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _mod_rms_norm_bwd_kernel(
    dy_ptr, dy_stride, x_ptr, x_stride, w_ptr, s_ptr, s_stride, rstd_ptr, dx_ptr, ds_ptr,
    dw_partial_ptr, ds_partial_ptr, db_partial_ptr,
    n_cols, rows_per_group, eps, offset,
    CAST: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DS: tl.constexpr,
    COMPUTE_DB: tl.constexpr, PER_ROW: tl.constexpr, ROUND_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (g, p) of a (G, P) grid handles row tiles p, p + P, ... of group g (rows
    g * rows_per_group onwards; G = 1 and rows_per_group = n_rows for a shared or per-row scale) and
    writes row g * P + p of each (G * P, n_cols) partial buffer. PER_ROW: dscale = dy * n is stored
    (contiguous, scale's dtype) instead of accumulated, and no dshift is accumulated."""
    group = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n_programs = tl.num_programs(1)
    first = group * rows_per_group  # every group has rows_per_group rows
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    x_dtype = x_ptr.dtype.element_ty
    w_eff = _weight_row(w_ptr, cols, col_ok, offset, CAST, x_dtype, HAS_WEIGHT, BLOCK_N)
    if not PER_ROW:
        s_row = tl.load(s_ptr + group * s_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(rows_per_group, BLOCK_M), n_programs):
        local, row_ok, mask = tile_rows(tile, rows_per_group, col_ok, BLOCK_M)
        rows = first + local
        dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if PER_ROW:
            s = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            s = s_row[None, :]
        if COMPUTE_DS:
            n = rms_norm_apply(x, w_eff, rstd, n_cols, eps, CAST, x_dtype)
            if ROUND_NORM:
                n = _round(n, x_dtype)
            if PER_ROW:
                tl.store(ds_ptr + rows[:, None] * n_cols + cols[None, :], (dy * n).to(ds_ptr.dtype.element_ty),
                         mask=mask)
            else:
                ds += dy * n
        if COMPUTE_DB:
            db += dy
        dx, dw = _rms_norm_rows_backward(dy * (1.0 + s), x, w_eff, rstd, dw, n_cols, CAST, x_dtype, COMPUTE_DW)
        tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    partial_row = group * n_programs + pid
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + partial_row * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)
    if COMPUTE_DS and not PER_ROW:
        tl.store(ds_partial_ptr + partial_row * n_cols + cols, tl.sum(ds, axis=0), mask=col_ok)
    if COMPUTE_DB:
        tl.store(db_partial_ptr + partial_row * n_cols + cols, tl.sum(db, axis=0), mask=col_ok)


# ---- host side -------------------------------------------------------------------------------------


def scale_groups(x_shape, name: str, t: torch.Tensor) -> int:
    """Number of row groups G that `t` (scale or shift) gives x's R rows: 1 for (H,), R for x's shape,
    B for (B, H) or (B, 1, ..., 1, H). ValueError naming `name` for any other shape."""
    hidden = x_shape[-1]
    n_rows = math.prod(x_shape[:-1])
    shape = tuple(t.shape)
    if t.dim() == 0 or shape[-1] != hidden:
        raise ValueError(f"{name} must end in x's hidden size {hidden}, got shape {shape}")
    if t.dim() == 1:
        return 1
    if shape == tuple(x_shape):
        return n_rows
    if t.dim() == 2 and shape[0] > 0 and n_rows % shape[0] == 0:
        return shape[0]
    if t.dim() == len(x_shape):
        lead = shape[:-1]
        k = 0
        while k < len(lead) and lead[k] == x_shape[k]:
            k += 1
        if all(d == 1 for d in lead[k:]):
            return math.prod(x_shape[:k])
    raise ValueError(
        f"{name} must have shape (H,), (B, H) with B dividing x's {n_rows} rows, (B, 1, ..., H) or x's "
        f"shape {tuple(x_shape)}; got {shape}"
    )


def _norm_dtype(x: torch.Tensor, weight: Optional[torch.Tensor], casting_mode: str) -> torch.dtype:
    """rms_norm's output dtype (that of y too)."""
    if casting_mode == "llama" and weight is not None:
        return _promote(x.dtype, weight.dtype)
    return x.dtype


def _mod_forward(x2, weight, scale2, shift2, groups, eps, offset, casting_mode):
    """(y (R, H), fp32 rstd (R,)) of rows x2; scale2/shift2 (G or 1, H) rows, unit column stride."""
    n_rows, n_cols = x2.shape
    y_dtype = _norm_dtype(x2, weight, casting_mode)
    y = _utils.new_output((n_rows, n_cols), y_dtype, x2.device)
    rstd = _utils.new_output((n_rows,), torch.float32, x2.device)
    block_m, block_n, num_warps = tile_config(n_cols)
    shared = groups == 1
    _mod_rms_norm_fwd_kernel[(_utils.cdiv(n_rows, block_m),)](
        x2, x2.stride(0), weight if weight is not None else x2,
        scale2, scale2.stride(0), shift2 if shift2 is not None else scale2,
        shift2.stride(0) if shift2 is not None else 0, y, rstd,
        n_rows, n_cols, max(1, n_rows // max(groups, 1)), eps, offset,
        CAST=_CAST_CODES[casting_mode], HAS_WEIGHT=weight is not None, HAS_SHIFT=shift2 is not None,
        SHARED=shared, ROUND_NORM=y_dtype == x2.dtype, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, rstd


def _mod_backward(dy2, x2, weight, scale2, rstd, groups, eps, offset, casting_mode,
                  compute_dw, compute_ds, compute_db):
    """(dx (R, H), dweight (H,) or None, dscale (G, H) or None, dshift (G, H) or None) of rows dy2, x2
    (unit column stride). For a per-row scale (G = R > 1), dshift is dy2 in scale's dtype."""
    n_rows, n_cols = x2.shape
    device = x2.device
    per_row = groups == n_rows and n_rows > 1
    grid_groups = 1 if per_row or groups == 1 else groups
    rows_per_group = n_rows // grid_groups
    dx = _utils.new_output((n_rows, n_cols), x2.dtype, device)
    block_m, block_n, num_warps, _, per_sm = backward_config(n_cols, max(x2.element_size(), dy2.element_size()))
    block_m = min(block_m, triton.next_power_of_2(rows_per_group))  # tiles stay inside a group
    tiles_per_group = _utils.cdiv(rows_per_group, block_m)
    target = _utils.num_programs_for_rows(grid_groups * tiles_per_group, device, per_sm)
    n_programs = max(1, min(tiles_per_group, _utils.cdiv(target, grid_groups)))
    n_partials = grid_groups * n_programs
    dw_partial = _utils.new_output((n_partials, n_cols), torch.float32, device) if compute_dw else rstd
    reduce_ds = compute_ds and not per_row
    reduce_db = compute_db and not per_row
    sb_partial = None
    if reduce_ds or reduce_db:  # dscale's rows, then dshift's: one reduction for both
        sb_partial = _utils.new_output(((reduce_ds + reduce_db) * n_partials, n_cols), torch.float32, device)
    ds_partial = sb_partial if reduce_ds else rstd
    db_partial = sb_partial[n_partials * reduce_ds:] if reduce_db else rstd
    ds_rows = _utils.new_output((n_rows, n_cols), scale2.dtype, device) if compute_ds and per_row else rstd
    _mod_rms_norm_bwd_kernel[(grid_groups, n_programs)](
        dy2, dy2.stride(0), x2, x2.stride(0), weight if weight is not None else x2,
        scale2, scale2.stride(0), rstd, dx, ds_rows, dw_partial, ds_partial, db_partial,
        n_cols, rows_per_group, eps, offset,
        CAST=_CAST_CODES[casting_mode], HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw,
        COMPUTE_DS=compute_ds, COMPUTE_DB=reduce_db, PER_ROW=per_row,
        ROUND_NORM=_norm_dtype(x2, weight, casting_mode) == x2.dtype,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    dw = sum_partials(dw_partial, weight.dtype) if compute_dw else None
    ds = db = None
    if per_row:
        ds = ds_rows if compute_ds else None
        db = dy2.to(scale2.dtype) if compute_db else None
    elif sb_partial is not None:
        n_sums = (reduce_ds + reduce_db) * grid_groups
        if n_programs == 1:  # one partial row per group: already the sums
            sums = sb_partial.to(scale2.dtype)
        else:  # several programs per group only when G is below the grid size: n_sums << 65535
            sums = sum_partials(sb_partial, scale2.dtype, n_sums)
        sums = sums.view(reduce_ds + reduce_db, grid_groups, n_cols)
        ds = sums[0] if reduce_ds else None
        db = sums[-1] if reduce_db else None
    return dx, dw, ds, db


class ModulatedRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, scale, shift, groups, eps, offset, casting_mode):
        """x2: rows (M, H) with unit column stride; y (M, H)."""
        scale2 = as_rows(scale)
        y, rstd = _mod_forward(x2, weight, scale2, None if shift is None else as_rows(shift), groups, eps,
                               offset, casting_mode)
        ctx.save_for_backward(x2, weight, scale2, rstd)
        ctx.params = (groups, eps, offset, casting_mode)
        ctx.scale_shape = scale.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, scale2, rstd = ctx.saved_tensors
        scale_shape = ctx.scale_shape
        needs = ctx.needs_input_grad
        dx, dw, ds, db = _mod_backward(as_rows(dy), x2, weight, scale2, rstd, *ctx.params,
                                       needs[1], needs[2], needs[3])
        return (dx, dw, None if ds is None else ds.reshape(scale_shape),
                None if db is None else db.reshape(scale_shape), None, None, None, None)


def modulated_rms_norm_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    scale: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> torch.Tensor:
    """The specification (module docstring); also the CPU path. float64 inputs give exact math."""
    hidden = x.shape[-1]
    if weight is None:  # ones: every casting mode then returns x * rstd with the mode's rounding
        normed = rms_norm_reference(x, torch.ones(hidden, dtype=x.dtype, device=x.device), eps, 0.0, casting_mode)
    else:
        normed = rms_norm_reference(x, weight, eps, offset, casting_mode)
    groups = scale_groups(x.shape, "scale", scale)
    n_rows = math.prod(x.shape[:-1])
    compute = torch.promote_types(normed.dtype, torch.float32)
    n = normed.to(compute).reshape(groups, n_rows // groups if groups else 0, hidden)
    y = n * (1 + scale.to(compute).reshape(groups, 1, hidden))
    if shift is not None:
        y = y + shift.to(compute).reshape(groups, 1, hidden)
    return y.to(normed.dtype).reshape(x.shape)


def check_modulated_rms_norm_args(x, weight, scale, shift, offset, casting_mode, triton_path) -> int:
    """Argument checks; returns the number of row groups of scale (and shift)."""
    if weight is not None:  # x, weight, casting_mode and the row size as rms_norm checks them
        check_rms_norm_args(x, weight, casting_mode, triton_path)
    else:
        _utils.check_float("x", x)
        if casting_mode not in CASTING_MODES:
            raise ValueError(f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
        if x.dim() < 1:
            raise ValueError("x must have at least one dimension (the hidden size)")
        if offset != 0:
            raise ValueError(f"offset applies to the weight: with weight=None it must be 0, got {offset}")
        _utils.check_row_size("x", x.shape[-1], _utils.MAX_FUSED_SIZE if triton_path else sys.maxsize)
    _utils.check_float("scale", scale)
    if scale.dtype != x.dtype:
        raise TypeError(f"scale has dtype {scale.dtype} but x has {x.dtype}; they must match")
    groups = scale_groups(x.shape, "scale", scale)
    if shift is not None:
        _utils.check_float("shift", shift)
        if shift.dtype != scale.dtype:
            raise TypeError(f"shift has dtype {shift.dtype} but scale has {scale.dtype}; they must match")
        if shift.shape != scale.shape:
            raise ValueError(
                f"shift must have scale's shape {tuple(scale.shape)}, got {tuple(shift.shape)}"
            )
    _utils.check_same_device(x=x, weight=weight, scale=scale, shift=shift)
    return groups


@_utils.on_input_device
def modulated_rms_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    scale: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> torch.Tensor:
    """rms_norm(x, weight, eps, offset, casting_mode) * (1 + scale) + shift (adaLN / AdaRMSNorm).

    scale and shift (x's dtype, shift optional) are (H,), (B, H) or (B, 1, ..., H) for B groups of
    consecutive rows, or x's shape; weight (H,) or None. Output dtype: rms_norm's. See the module
    docstring for the rounding and the gradients. CPU tensors run the torch reference.
    """
    triton_path = _utils.use_triton(x, weight, scale, shift)
    groups = check_modulated_rms_norm_args(x, weight, scale, shift, offset, casting_mode, triton_path)
    if _library.compiling() and x.numel():  # one graph node under torch.compile
        return _modulated_rms_norm_op(x, weight, scale, shift, float(eps), float(offset), casting_mode)[0]
    if not triton_path or x.numel() == 0:
        return modulated_rms_norm_reference(x, weight, scale, shift, eps, offset, casting_mode)
    y = ModulatedRMSNormFunction.apply(as_rows(x), weight, scale, shift, groups, float(eps), float(offset),
                                       casting_mode)
    return from_rows(y, x)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _modulated_rms_norm_fake(x, weight, scale, shift, eps, offset, casting_mode):
    y = x.new_empty(x.shape, dtype=_norm_dtype(x, weight, casting_mode))
    return y, x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@_library.custom_op("modulated_rms_norm", _modulated_rms_norm_fake)
def _modulated_rms_norm_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    scale: torch.Tensor,
    shift: Optional[torch.Tensor],
    eps: float,
    offset: float,
    casting_mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, fp32 rstd per row)."""
    if not _utils.use_triton(x, weight, scale, shift):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + eps).reshape(-1)
        y = modulated_rms_norm_reference(x, weight, scale, shift, eps, offset, casting_mode)
        return y.contiguous(), rstd
    groups = scale_groups(x.shape, "scale", scale)
    y, rstd = _mod_forward(as_rows(x), weight, as_rows(scale), None if shift is None else as_rows(shift),
                           groups, eps, offset, casting_mode)
    return y.view(x.shape), rstd


def _modulated_rms_norm_backward_fake(dy, x, weight, scale, rstd, eps, offset, casting_mode,
                                      compute_dw, compute_ds, compute_db):
    dw = weight.new_empty(weight.shape) if compute_dw else _library.absent(x)
    ds = _library.fake_grad(scale, compute_ds)
    db = _library.fake_grad(scale, compute_db)
    return x.new_empty(x.shape), dw, ds, db


@_library.custom_op("modulated_rms_norm_backward", _modulated_rms_norm_backward_fake)
def _modulated_rms_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    scale: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    offset: float,
    casting_mode: str,
    compute_dw: bool,
    compute_ds: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dscale, dshift), placeholders for those not asked for (compute_db: the shift's
    gradient, in scale's shape)."""
    if not _utils.use_triton(x, weight, scale):
        # shift does not change any gradient: a zero one stands in, so its gradient comes out too
        shift = torch.zeros_like(scale)
        if weight is None:
            dx, ds, db = _library.reference_vjp(
                lambda x, s, b: modulated_rms_norm_reference(x, None, s, b, eps, offset, casting_mode),
                (x, scale, shift), dy,
            )
            dw = None
        else:
            dx, dw, ds, db = _library.reference_vjp(
                lambda x, w, s, b: modulated_rms_norm_reference(x, w, s, b, eps, offset, casting_mode),
                (x, weight, scale, shift), dy,
            )
    else:
        groups = scale_groups(x.shape, "scale", scale)
        dx, dw, ds, db = _mod_backward(
            as_rows(dy), as_rows(x).contiguous(), weight, as_rows(scale), rstd, groups, eps, offset,
            casting_mode, compute_dw, compute_ds, compute_db,
        )
    dw = dw if compute_dw else _library.absent(x)
    # views of one buffer (or of dy): custom op outputs must be new tensors that do not alias
    ds = ds.reshape(scale.shape).clone() if compute_ds else _library.absent(scale)
    db = db.reshape(scale.shape).clone() if compute_db else _library.absent(scale)
    return dx.reshape(x.shape).contiguous(), dw, ds, db


def _modulated_rms_norm_setup(ctx, inputs, output):
    x, weight, scale, shift, *ctx.params = inputs
    ctx.save_for_backward(x, weight, scale, output[1])


def _modulated_rms_norm_grad(ctx, dy, _drstd):
    x, weight, scale, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    compute_dw = weight is not None and needs[1]
    dx, dw, ds, db = _modulated_rms_norm_backward_op(
        dy, x, weight, scale, rstd, *ctx.params, compute_dw, needs[2], needs[3]
    )
    return (dx, dw if compute_dw else None, ds if needs[2] else None, db if needs[3] else None,
            None, None, None)


_modulated_rms_norm_op.register_autograd(_modulated_rms_norm_grad, setup_context=_modulated_rms_norm_setup)
