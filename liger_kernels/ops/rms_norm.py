"""RMSNorm: y = x / rms(x) * (offset + weight), with the casting modes of the Hugging Face models.

    rstd = 1 / sqrt(mean(x^2) + eps)        per row, over the last dimension (hidden size H)
    y    = (x * rstd) * (offset + weight)

Casting modes (where the rounding to a narrow dtype happens; all three agree for float32):
- "llama" (LlamaRMSNorm, Mistral, Qwen, ...): rstd and x * rstd in fp32, rounded to x's dtype, then
  multiplied by (offset + weight), itself rounded to the weight's dtype. The output dtype is the type
  promotion of x and weight, exactly as `self.weight * hidden_states.to(input_dtype)` gives (bf16 for a
  bf16 model; fp32 when an fp32 weight meets bf16 activations).
- "gemma" (GemmaRMSNorm with offset=1.0, Olmo2 with offset=0.0): everything in fp32, one rounding at
  the end to x's dtype: `(x.float() * rstd * (offset + weight.float())).to(x.dtype)`.
- "none": no upcast; the torch expression
  `x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.to(x.dtype))` evaluated in
  x's dtype, i.e. every elementwise result (x^2, mean, + eps, rsqrt, x * rstd, offset + w, the product)
  rounded to x's dtype, and the mean accumulated in fp32 as torch's reductions do.

Backward (all modes): fp32 math with the fp32 rstd saved by the forward, the exact gradient of the
formula with the intermediate roundings taken as identity:
    dx = rstd * (g - xhat * mean(g * xhat)),  dweight = sum over rows of dy * xhat,
with xhat = x * rstd and g = dy * (offset + weight). In "llama" mode dweight uses xhat rounded to x's
dtype, the value the weight actually multiplied (as the Hugging Face autograd graph does).

Kernels. Rows are processed as [BLOCK_M, BLOCK_N] tiles: one row per tile when it is wide, several
narrow rows packed together otherwise, so every program moves a few KiB. The forward is one pass with
one program per tile (read x and w, write y and a fp32 rstd per row). The backward is one pass on a
persistent grid (`_utils.num_programs_for_rows`, as many programs as fit on the SMs at once): each
program strides over tiles, loading the next tile while it works on the current one (up to 8192 bf16
columns; wider rows leave no registers for that), writes dx and accumulates its share of dweight in
fp32 registers, then stores one partial row; `sum_partials` adds the partial rows up (one small launch, no
atomics). Only x and the fp32 rstd are saved for backward. The residual add of fused_add_rms_norm is a
constexpr mode of the same two kernels (see fused_add_rms_norm.py), so the math lives here once.

Hidden sizes up to `_utils.MAX_FUSED_SIZE` (65536) run in Triton; wider rows raise ValueError (the
torch reference, used for CPU tensors, has no limit).
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from liger_kernels import _library, _utils
from liger_kernels.ops._tiles import as_rows, from_rows

CASTING_MODES = ("llama", "gemma", "none")
# Values of the kernels' constexpr CAST.
_LLAMA = tl.constexpr(0)
_GEMMA = tl.constexpr(1)
_NONE = tl.constexpr(2)
_CAST_CODES = {"llama": _LLAMA.value, "gemma": _GEMMA.value, "none": _NONE.value}
# Narrow rows are packed into tiles of at least this many elements (BLOCK_M rows x BLOCK_N columns).
_TILE_ELEMENTS = 4096
# Largest tile (of dy or x) whose backward still has registers for the next tile's loads (see
# backward_config): 8192 bf16 columns. At 16384 two rows spilled (~1.3 KB of stack per thread with
# the residual gradient: 14 ms instead of ~1.5 ms for 32768 x 16384 on the H200).
_LOAD_AHEAD_MAX_BYTES = 16384
# Columns per program of the partial-sum reduction: small, so that even H=4096 spreads over 128 programs.
_SUM_BLOCK_N = 32
# Partial rows per loop step: the grid is about one program per SM, so each one keeps 16 KB in flight
# and the 264 partial rows of a 4096-wide backward take 3 steps.
_SUM_BLOCK_P = 128


@triton.jit
def _round(v, DTYPE: tl.constexpr):
    """Round fp32 values to DTYPE and back: what a torch op that stores its result in DTYPE does."""
    return v.to(DTYPE).to(tl.float32)


@triton.jit
def _effective_weight(w, offset, CAST: tl.constexpr, X_DTYPE: tl.constexpr):
    """offset + weight in fp32, rounded where the mode's torch expression rounds it."""
    if CAST == _LLAMA:
        w_eff = _round(w.to(tl.float32) + offset, w.dtype)
    elif CAST == _GEMMA:
        w_eff = w.to(tl.float32) + offset
    else:
        w_eff = _round(_round(w.to(tl.float32), X_DTYPE) + offset, X_DTYPE)
    return w_eff


@triton.jit
def _rms_norm_rows(x, w_eff, n_cols, eps, CAST: tl.constexpr, X_DTYPE: tl.constexpr):
    """Forward math of a [BLOCK_M, BLOCK_N] fp32 tile (zeros past the row end).

    Returns y in fp32 (before its final rounding to the output dtype) and the fp32 rstd [BLOCK_M]
    that the backward uses (in "none" mode y is built from a rounded rstd, the backward is not).
    """
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    return rms_norm_apply(x, w_eff, rstd, n_cols, eps, CAST, X_DTYPE), rstd


@triton.jit
def rms_norm_apply(x, w_eff, rstd, n_cols, eps, CAST: tl.constexpr, X_DTYPE: tl.constexpr):
    """y in fp32 (before its final rounding) of a fp32 tile from its rows' fp32 rstd: the forward's
    values again, e.g. in a backward that needs the norm's output (modulated_rms_norm)."""
    if CAST == _NONE:
        mean_sq = _round(tl.sum(_round(x * x, X_DTYPE), axis=1) / n_cols, X_DTYPE)
        rstd_x = _round(tl.rsqrt(_round(mean_sq + eps, X_DTYPE)), X_DTYPE)
        y = _round(x * rstd_x[:, None], X_DTYPE) * w_eff[None, :]
    else:
        xhat = x * rstd[:, None]
        if CAST == _LLAMA:
            xhat = _round(xhat, X_DTYPE)
        y = xhat * w_eff[None, :]
    return y


@triton.jit
def _rms_norm_rows_backward(
    dy, x, w_eff, rstd, dw, n_cols, CAST: tl.constexpr, X_DTYPE: tl.constexpr, COMPUTE_DW: tl.constexpr
):
    """Backward math of a fp32 [BLOCK_M, BLOCK_N] tile: (dx, dw + dy * normalized).

    In the order that keeps the fewest row-sized values live across the row reduction (dy is dead
    once dweight's term and g are formed): 16384 columns on 16 warps then barely spill.
    """
    xhat = x * rstd[:, None]
    if COMPUTE_DW:
        if CAST == _LLAMA:  # the weight multiplied x * rstd rounded to x's dtype
            dw += dy * _round(xhat, X_DTYPE)
        else:
            dw += dy * xhat
    g = dy * w_eff[None, :]
    c = rstd * (tl.sum(g * xhat, axis=1) / n_cols)
    dx = rstd[:, None] * g - c[:, None] * xhat
    return dx, dw


@triton.jit
def tile_rows(tile, n_rows, col_ok, BLOCK_M: tl.constexpr):
    """Row indices (int64: element offsets may pass 2**31), row mask and element mask of a row tile."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    return rows.to(tl.int64), row_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    x_stride,
    res_ptr,
    res_stride,
    sum_ptr,
    y_ptr,
    w_ptr,
    rstd_ptr,
    n_rows,
    n_cols,
    eps,
    offset,
    CAST: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One tile of rows. With HAS_RESIDUAL, the normalized input is x + residual, rounded to (and
    stored as) sum_ptr's dtype; y, sum and rstd are contiguous."""
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    rows, row_ok, mask = tile_rows(tl.program_id(0), n_rows, col_ok, BLOCK_M)
    out = rows[:, None] * n_cols + cols[None, :]

    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * res_stride + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + out, s, mask=mask)
        x = s
    x_dtype = x.dtype
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    w_eff = _effective_weight(w, offset, CAST, x_dtype)
    y, rstd = _rms_norm_rows(x.to(tl.float32), w_eff, n_cols, eps, CAST, x_dtype)
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_loads(
    dy_ptr, dy_stride, x_ptr, x_stride, rstd_ptr, tile, n_rows, cols, col_ok, BLOCK_M: tl.constexpr
):
    """dy and x of a row tile (in their storage dtypes) and its rstd."""
    rows, row_ok, mask = tile_rows(tile, n_rows, col_ok, BLOCK_M)
    dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0)
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
    return dy, x, tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    dy_stride,
    x_ptr,
    x_stride,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dres_ptr,
    dres_stride,
    dw_partial_ptr,
    n_rows,
    n_cols,
    offset,
    CAST: tl.constexpr,
    HAS_DRES: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    LOAD_AHEAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Persistent: program p handles tiles p, p + P, p + 2P, ... and writes row p of the dweight partials.

    dx is contiguous and may alias dy (in-place backward): every element is read before it is
    written, by the same program. With HAS_DRES the gradient of the residual stream is added to dx.
    LOAD_AHEAD (tiles up to 16 KB): the weight stays in registers and the loads of the next
    tile are issued before this tile's math, so they are in flight while it is reduced and stored
    (~125 registers: 2 programs of 8 warps per SM). Wider rows have no registers to spare for that
    (the row itself is enough bytes in flight): the weight is reloaded per tile (L1/L2 hits).
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    x_dtype = x_ptr.dtype.element_ty
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if LOAD_AHEAD:
        w_eff = _effective_weight(tl.load(w_ptr + cols, mask=col_ok, other=0.0), offset, CAST, x_dtype)
        dy_next, x_next, rstd_next = _rms_norm_bwd_loads(
            dy_ptr, dy_stride, x_ptr, x_stride, rstd_ptr, pid, n_rows, cols, col_ok, BLOCK_M
        )
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), n_programs):
        rows, row_ok, mask = tile_rows(tile, n_rows, col_ok, BLOCK_M)
        if LOAD_AHEAD:
            dy = dy_next
            x = x_next
            rstd = rstd_next
            dy_next, x_next, rstd_next = _rms_norm_bwd_loads(  # masked off past the last tile
                dy_ptr, dy_stride, x_ptr, x_stride, rstd_ptr, tile + n_programs, n_rows, cols, col_ok, BLOCK_M
            )
        else:
            dy, x, rstd = _rms_norm_bwd_loads(
                dy_ptr, dy_stride, x_ptr, x_stride, rstd_ptr, tile, n_rows, cols, col_ok, BLOCK_M
            )
            w_eff = _effective_weight(tl.load(w_ptr + cols, mask=col_ok, other=0.0), offset, CAST, x_dtype)
        dy = dy.to(tl.float32)
        x = x.to(tl.float32)
        if HAS_DRES:
            dres = tl.load(dres_ptr + rows[:, None] * dres_stride + cols[None, :], mask=mask, other=0.0)
        dx, dw = _rms_norm_rows_backward(dy, x, w_eff, rstd, dw, n_cols, CAST, x_dtype, COMPUTE_DW)
        if HAS_DRES:
            dx += dres.to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


@triton.jit
def _sum_partials_kernel(
    partial_ptr, out_ptr, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Program (c, g): columns block c of group g (rows g * n_partials ... of the partials)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    group = tl.program_id(1).to(tl.int64)
    partial_ptr += group * n_partials * n_cols
    out_ptr += group * n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        rows = (start + tl.arange(0, BLOCK_P)).to(tl.int64)
        mask = (rows < n_partials)[:, None] & col_ok[None, :]
        acc += tl.load(partial_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)


def sum_partials(partial: torch.Tensor, dtype: torch.dtype, groups: int = 1) -> torch.Tensor:
    """Column sums of a contiguous fp32 (P, N) tensor of per-program partials, returned in `dtype`:
    (N,); with `groups` G > 1, the sums of each of the G consecutive blocks of P / G rows: (G, N)."""
    n_partials, n_cols = partial.shape
    n_partials //= groups
    out = _utils.new_output((n_cols,) if groups == 1 else (groups, n_cols), dtype, partial.device)
    _sum_partials_kernel[(_utils.cdiv(n_cols, _SUM_BLOCK_N), groups)](
        partial, out, n_partials, n_cols, BLOCK_P=_SUM_BLOCK_P, BLOCK_N=_SUM_BLOCK_N, num_warps=4
    )
    return out


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if a == b else torch.promote_types(a, b)


@functools.lru_cache(maxsize=None)
def tile_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): a whole row per tile, narrow rows packed to `_TILE_ELEMENTS`."""
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, _TILE_ELEMENTS // block_n)
    _, num_warps = _utils.row_launch_config(block_m * block_n)
    return block_m, block_n, num_warps


@functools.lru_cache(maxsize=None)
def backward_config(n_cols: int, element_size: int = 2) -> tuple[int, int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, num_warps, LOAD_AHEAD, programs per SM) of the persistent backward kernels.

    They hold dy, x, the weight and the dweight accumulator (plus the next tile, in its storage
    dtype of `element_size` bytes, with LOAD_AHEAD) in registers: ~125 per thread (sm_90), so 16
    warps fill an SM's register file. A larger grid would only run as a second wave and add partial
    rows to reduce.
    """
    block_m, block_n, num_warps = tile_config(n_cols)
    load_ahead = block_m * block_n * element_size <= _LOAD_AHEAD_MAX_BYTES
    return block_m, block_n, num_warps, load_ahead, max(1, 16 // num_warps)


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    casting_mode: str,
    residual: torch.Tensor | None = None,
):
    """Launch the forward on (M, H) rows. Returns (y, rstd, normalized input).

    The normalized input is x itself, or with `residual` the new tensor x + residual in the promoted
    dtype of the two (what `residual + hidden_states` gives in torch).
    """
    n_rows, n_cols = x.shape
    if residual is None:
        normed = x
        res, res_stride = x, 0  # unused by the kernel
    else:
        normed = _utils.new_output((n_rows, n_cols), _promote(x.dtype, residual.dtype), x.device)
        res, res_stride = residual, residual.stride(0)
    y_dtype = _promote(normed.dtype, weight.dtype) if casting_mode == "llama" else normed.dtype
    y = _utils.new_output((n_rows, n_cols), y_dtype, x.device)
    rstd = _utils.new_output((n_rows,), torch.float32, x.device)
    block_m, block_n, num_warps = tile_config(n_cols)
    _rms_norm_fwd_kernel[(_utils.cdiv(n_rows, block_m),)](
        x,
        x.stride(0),
        res,
        res_stride,
        normed,
        y,
        weight,
        rstd,
        n_rows,
        n_cols,
        eps,
        offset,
        CAST=_CAST_CODES[casting_mode],
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, rstd, normed


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    casting_mode: str,
    in_place: bool,
    compute_dw: bool,
    dres: torch.Tensor | None = None,
):
    """Launch the backward on (M, H) rows (unit column stride); x is the normalized input. Returns
    (dx, dw or None).

    dx has x's dtype. With `in_place`, dx is written into dy's buffer when dy is contiguous and of
    x's dtype (else into a new tensor). `dres` (the gradient of the residual stream) is added to dx.
    """
    n_rows, n_cols = x.shape
    if in_place and dy.is_contiguous() and dy.dtype == x.dtype:
        dx = dy
    else:
        dx = _utils.new_output((n_rows, n_cols), x.dtype, x.device)
    block_m, block_n, num_warps, load_ahead, per_sm = backward_config(
        n_cols, max(x.element_size(), dy.element_size())
    )
    n_programs = _utils.num_programs_for_rows(_utils.cdiv(n_rows, block_m), x.device, per_sm)
    partial = (
        _utils.new_output((n_programs, n_cols), torch.float32, x.device) if compute_dw else rstd
    )  # rstd stands in for the unused pointer
    _rms_norm_bwd_kernel[(n_programs,)](
        dy,
        dy.stride(0),
        x,
        x.stride(0),
        weight,
        rstd,
        dx,
        dres if dres is not None else dy,
        dres.stride(0) if dres is not None else 0,
        partial,
        n_rows,
        n_cols,
        offset,
        CAST=_CAST_CODES[casting_mode],
        HAS_DRES=dres is not None,
        COMPUTE_DW=compute_dw,
        LOAD_AHEAD=load_ahead,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return dx, (sum_partials(partial, weight.dtype) if compute_dw else None)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting_mode, in_place):
        x2 = as_rows(x)
        y, rstd, _ = rms_norm_forward(x2, weight, eps, offset, casting_mode)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.casting_mode, ctx.in_place = offset, casting_mode, in_place
        return y if x.dim() == 2 else y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(
            as_rows(dy),
            x2,
            weight,
            rstd,
            ctx.offset,
            ctx.casting_mode,
            ctx.in_place,
            ctx.needs_input_grad[1],
        )
        return dx if dy.dim() == 2 else dx.view(dy.shape), dw, None, None, None, None


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> torch.Tensor:
    """The specification (module docstring); also the CPU path. float64 inputs give exact math."""
    if casting_mode == "none":
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * rstd * (offset + weight.to(x.dtype))
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    normalized = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "llama":
        return (offset + weight) * normalized.to(x.dtype)
    return (normalized * (offset + weight.to(compute))).to(x.dtype)


def check_rms_norm_args(x, weight, casting_mode: str, triton_path: bool) -> None:
    """Shared argument checks of rms_norm and fused_add_rms_norm."""
    _utils.check_float("x", x)
    _utils.check_float("weight", weight)
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
    if weight.dim() != 1:
        raise ValueError(f"weight must be 1-D (hidden_size,), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the hidden size)")
    _utils.check_last_dim("x", x, weight.shape[0], "weight's size")
    _utils.check_same_device(x=x, weight=weight)
    _utils.check_row_size("x", x.shape[-1], _utils.MAX_FUSED_SIZE if triton_path else sys.maxsize)


@_utils.on_input_device
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
    in_place: bool = False,
) -> torch.Tensor:
    """RMSNorm over the last dimension of x (..., H) with weight (H,); see the module docstring.

    Output dtype: x's dtype, except "llama" mode which gives the promotion of x's and weight's dtypes
    (as LlamaRMSNorm does). `in_place=True` lets the backward write dx into the buffer of the upstream
    gradient dy, saving an allocation: only safe when nothing else reads that gradient afterwards. It
    is NOT safe where the caller reuses the gradient of the norm's output, e.g. Gemma2/Gemma3/Olmo2
    blocks whose post-norms feed the residual stream directly: use in_place=False there.
    CPU tensors run the torch reference (in_place is then irrelevant).
    """
    triton_path = _utils.use_triton(x, weight)
    check_rms_norm_args(x, weight, casting_mode, triton_path)
    if _library.compiling():  # one graph node under torch.compile (in_place does not apply there)
        return _rms_norm_op(x, weight, float(eps), float(offset), casting_mode)[0]
    if not triton_path or x.numel() == 0:
        return rms_norm_reference(x, weight, eps, offset, casting_mode)
    y = RMSNormFunction.apply(as_rows(x), weight, float(eps), float(offset), casting_mode, bool(in_place))
    return from_rows(y, x)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _rms_norm_fake(x, weight, eps, offset, casting_mode):
    y_dtype = torch.promote_types(x.dtype, weight.dtype) if casting_mode == "llama" else x.dtype
    return x.new_empty(x.shape, dtype=y_dtype), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@_library.custom_op("rms_norm", _rms_norm_fake)
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, fp32 rstd per row)."""
    if not _utils.use_triton(x, weight) or x.numel() == 0:
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + eps).reshape(-1)
        return rms_norm_reference(x, weight, eps, offset, casting_mode).contiguous(), rstd
    y, rstd, _ = rms_norm_forward(as_rows(x), weight, eps, offset, casting_mode)
    return y.view(x.shape), rstd


def _rms_norm_backward_fake(dy, x, weight, rstd, eps, offset, casting_mode, compute_dw):
    return x.new_empty(x.shape), _library.fake_grad(weight, compute_dw)


@_library.custom_op("rms_norm_backward", _rms_norm_backward_fake)
def _rms_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    offset: float,
    casting_mode: str,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight or a placeholder)."""
    if not _utils.use_triton(x, weight) or x.numel() == 0:
        dx, dw = _library.reference_vjp(
            lambda x, w: rms_norm_reference(x, w, eps, offset, casting_mode), (x, weight), dy
        )
    else:
        dx, dw = rms_norm_backward(
            as_rows(dy), as_rows(x).contiguous(), weight, rstd, offset, casting_mode, False, compute_dw
        )
    return dx.reshape(x.shape).contiguous(), dw if compute_dw else _library.absent(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, *ctx.params = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    compute_dw = ctx.needs_input_grad[1]
    dx, dw = _rms_norm_backward_op(dy, x, weight, rstd, *ctx.params, compute_dw)
    return dx, dw if compute_dw else None, None, None, None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)
