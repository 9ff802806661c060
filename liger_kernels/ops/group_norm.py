"""GroupNorm over (N, C, *) inputs: `torch.nn.functional.group_norm` semantics.

The C channels are split into G groups of C / G consecutive channels; per sample n and group g, over
its C/G * S elements (S = product of the spatial sizes):
    mean, var (biased), rstd = 1 / sqrt(var + eps),  y = (x - mean) * rstd * weight[c] + bias[c]
in fp32, one rounding at the end to x's dtype. weight and bias (C,) are optional (None: 1 and 0) and
may have another float dtype than x. Backward, with xhat = (x - mean) * rstd and h = dy * weight[c]:
    dx = rstd * (h - mean(h) - xhat * mean(h * xhat))   (means over the group)
    dweight[c] = sum over n, spatial of dy * xhat,   dbias[c] = sum over n, spatial of dy

Layout: a group is a contiguous (C/G, S) block, cut into [BLOCK_C, BLOCK_S] tiles (channels x spatial
positions; narrow spatial sizes, S = 1, still fill a tile), numbered channel-block-major. Each group's
tiles are split into SPLIT contiguous ranges, one program per (group, range): with few, large groups
(N * G small next to the SM count) the group is spread over many programs instead of walked serially by
one. SPLIT comes from the shapes alone (`_plan`: about `_PROGRAMS_PER_SM` programs per SM), no host sync.

Forward, two kernels. (1) per (group, range): count, mean and centered sum of squares M2 of the range;
each tile is reduced in registers (corrected two-pass: its mean, then sums of x - mean and its square)
and the tiles are merged with Chan's parallel formula on offsets from a reference mean (see
`_range_stats`): no sum-of-squares cancellation, and large means do not cost variance precision.
(2) per (group, range): merge the group's SPLIT partials in a fixed order (mean = sum(n_i mean_i) / n,
M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2)), normalize the range, write y; range 0 saves fp32 mean and
rstd. x is read twice from memory (once per kernel) and y written once; kernel (2) runs its programs in
reverse order so that it starts on the data kernel (1) read last, still in L2.
Backward, two kernels plus a small one. (1) per (group, range): per tile and channel, sum dy and
dy * xhat (written to (N, S-tiles, C) fp32 partials for dweight/dbias) and the range's sums of h and
h * xhat. (2) per (group, range), in reverse order: merge the group's range sums (fixed order) and
write dx. (3) dweight/dbias: fixed-order column sums of the partials, cast to the parameters' dtypes.
No atomics: every result is deterministic.
Small groups (one range, at most `_FUSED_MAX_TILES` tiles) take a fused path instead: one program per
group computes the statistics (or the backward sums) itself and then makes its output pass, re-reading
the group from L1/L2; one launch instead of two.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import (
    cdiv,
    check_float,
    check_same_device,
    new_output,
    sm_count,
    use_triton,
)

# Tile shape: at most _TILE_ELEMENTS elements, at most _MAX_BLOCK_S spatial positions wide.
_TILE_ELEMENTS = 4096
_MAX_BLOCK_S = 4096
# Split heuristic: aim for this many programs per SM over the whole grid (several resident per SM,
# and a few waves, so that the last wave is short). Off CUDA (the interpreter) the SM count is 1.
_PROGRAMS_PER_SM = 16
# Upper bound on the ranges per group (each program of kernel (2) merges all of its group's partials).
_MAX_SPLIT = 512
# One-range groups of at most this many tiles use the fused one-launch kernels.
_FUSED_MAX_TILES = 4
# Tests: force SPLIT (still capped by the number of tiles); None = heuristic.
_FORCE_SPLIT: Optional[int] = None
# Column block of the dweight/dbias reduction kernel, and its row block.
_SUM_BLOCK_N = 32
_SUM_BLOCK_R = 64


@triton.jit
def _tile_at(t, n_tiles_s, n_channels, n_spatial, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Tile t of a group: element offsets from the group's start, channel indices within the group,
    their mask, the element mask, the number of valid elements (fp32) and the tile's spatial index."""
    ts = t % n_tiles_s
    c0 = (t // n_tiles_s) * BLOCK_C
    s0 = ts * BLOCK_S
    ch = c0 + tl.arange(0, BLOCK_C)
    sp = s0 + tl.arange(0, BLOCK_S)
    ch_ok = ch < n_channels
    mask = ch_ok[:, None] & (sp < n_spatial)[None, :]
    offs = ch[:, None].to(tl.int64) * n_spatial + sp[None, :]
    count = (tl.minimum(n_channels - c0, BLOCK_C) * tl.minimum(n_spatial - s0, BLOCK_S)).to(tl.float32)
    return offs, ch, ch_ok, mask, count, ts


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _range_stats(x_grp, n_channels, n_spatial, n_tiles_s, t_lo, t_hi,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, ref, offset, M2) of tiles [t_lo, t_hi) of a group: mean = ref + offset, ref the first
    tile's (rounded) mean. Per tile in registers: its rounded mean m, then s1 = sum(x - m) and
    s2 = sum((x - m)^2), so that its exact mean is m + s1 / n and its M2 is s2 - s1^2 / n (corrected
    two-pass). Tiles are merged with Chan's formula on offsets from ref: m - ref is exact for nearby
    means (Sterbenz), so the rounding of large means does not enter the merged M2."""
    count = 0.0
    ref = 0.0
    offset = 0.0
    m2 = 0.0
    for t in range(t_lo, t_hi):
        offs, ch, ch_ok, mask, n_t, ts = _tile_at(t, n_tiles_s, n_channels, n_spatial, BLOCK_C, BLOCK_S)
        x = tl.load(x_grp + offs, mask=mask, other=0.0).to(tl.float32)
        mean_t = tl.sum(x) / n_t
        ref = tl.where(t == t_lo, mean_t, ref)
        xc = tl.where(mask, x - mean_t, 0.0)
        s1, s2 = tl.reduce(tl.reduce((xc, xc * xc), 1, _add_pair), 0, _add_pair)  # both sums at once
        total = count + n_t
        delta = ((mean_t - ref) + s1 / n_t) - offset
        frac = n_t / total
        offset += delta * frac
        m2 += (s2 - s1 * s1 / n_t) + delta * delta * count * frac
        count = total
    return count, ref, offset, m2


@triton.jit
def _group_stats_kernel(
    x_ptr, part_ptr, n_channels, n_spatial, n_tiles_s, n_tiles, tiles_per_split, split, n_programs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Forward kernel (1). Program group * split + j: (count, ref, offset, M2) of range j of the group
    into the planes of the (4, n_programs) fp32 partials."""
    pid = tl.program_id(0)
    j = pid % split
    group = (pid // split).to(tl.int64)
    t_lo = j * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    count, ref, offset, m2 = _range_stats(
        x_ptr + group * (n_channels * n_spatial), n_channels, n_spatial, n_tiles_s, t_lo, t_hi, BLOCK_C, BLOCK_S
    )
    out = part_ptr + pid.to(tl.int64)
    tl.store(out, count)
    tl.store(out + n_programs, ref)
    tl.store(out + 2 * n_programs, offset)
    tl.store(out + 3 * n_programs, m2)


@triton.jit
def _group_norm_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, mean_ptr, rstd_ptr,
    n_groups, n_channels, n_spatial, n_tiles_s, n_tiles, tiles_per_split, split, n_programs, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Forward kernel (2), programs in reverse order: program group * split + j writes y on range j of
    the group. FUSED (split == 1): the program computes the group's statistics itself."""
    pid = n_programs - 1 - tl.program_id(0)
    j = pid % split
    group = (pid // split).to(tl.int64)
    size = n_channels * n_spatial
    x_grp = x_ptr + group * size
    y_grp = y_ptr + group * size
    if FUSED:
        count, ref, offset, m2 = _range_stats(x_grp, n_channels, n_spatial, n_tiles_s, 0, n_tiles, BLOCK_C, BLOCK_S)
        mean = ref + offset
        var = m2 / size
    else:
        # Fixed-order merge of the group's partials (identical in every program of the group), on
        # offsets from the first range's ref (exact differences of nearby refs, as in _range_stats).
        idx = tl.arange(0, SPLIT_BLOCK)
        ok = idx < split
        parts = part_ptr + group * split + idx
        cnt = tl.load(parts, mask=ok, other=0.0)
        refs = tl.load(parts + n_programs, mask=ok, other=0.0)
        offsets = tl.load(parts + 2 * n_programs, mask=ok, other=0.0)
        m2s = tl.load(parts + 3 * n_programs, mask=ok, other=0.0)
        ref = tl.load(part_ptr + n_programs + group * split)
        d = tl.where(ok, (refs - ref) + offsets, 0.0)
        offset = tl.sum(cnt * d) / size
        dev = d - offset
        mean = ref + offset
        var = (tl.sum(m2s) + tl.sum(cnt * dev * dev)) / size
    rstd = tl.rsqrt(var + eps)
    tl.store(mean_ptr + group, mean, mask=j == 0)
    tl.store(rstd_ptr + group, rstd, mask=j == 0)
    first_channel = (group % n_groups) * n_channels
    t_lo = j * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        offs, ch, ch_ok, mask, n_t, ts = _tile_at(t, n_tiles_s, n_channels, n_spatial, BLOCK_C, BLOCK_S)
        scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
        if HAS_WEIGHT:
            scale *= tl.load(w_ptr + first_channel + ch, mask=ch_ok, other=0.0).to(tl.float32)
        shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_BIAS:
            shift += tl.load(b_ptr + first_channel + ch, mask=ch_ok, other=0.0).to(tl.float32)
        x = tl.load(x_grp + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * scale[:, None] + shift[:, None]
        tl.store(y_grp + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _range_grad_sums(
    dy_grp, x_grp, w_ptr, dw_part_ptr, db_part_ptr, mean, rstd, first_channel, part_row,
    n_channels, n_spatial, n_channels_total, n_tiles_s, t_lo, t_hi,
    HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Over tiles [t_lo, t_hi) of a group: per tile and channel, the sums of dy and dy * xhat into rows
    part_row + (tile's spatial index) of the (N * S-tiles, C) partials; returns the range's sums of
    h = dy * w and h * xhat."""
    sum_h = 0.0
    sum_h_xhat = 0.0
    for t in range(t_lo, t_hi):
        offs, ch, ch_ok, mask, n_t, ts = _tile_at(t, n_tiles_s, n_channels, n_spatial, BLOCK_C, BLOCK_S)
        dy = tl.load(dy_grp + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_grp + offs, mask=mask, other=0.0).to(tl.float32)
        dy_c, dy_xhat_c = tl.reduce((dy, dy * ((x - mean) * rstd)), 1, _add_pair)
        part = (part_row + ts) * n_channels_total + first_channel + ch
        if COMPUTE_DW:
            tl.store(dw_part_ptr + part, dy_xhat_c, mask=ch_ok)
        if COMPUTE_DB:
            tl.store(db_part_ptr + part, dy_c, mask=ch_ok)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + first_channel + ch, mask=ch_ok, other=0.0).to(tl.float32)
            dy_c *= w
            dy_xhat_c *= w
        h_t, h_xhat_t = tl.reduce((dy_c, dy_xhat_c), 0, _add_pair)
        sum_h += h_t
        sum_h_xhat += h_xhat_t
    return sum_h, sum_h_xhat


@triton.jit
def _group_norm_bwd_sums_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dw_part_ptr, db_part_ptr, sums_ptr,
    n_groups, n_channels, n_spatial, n_tiles_s, n_tiles, tiles_per_split, split, n_programs,
    HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Backward kernel (1). Program group * split + j: dweight/dbias partials of range j of the group,
    and its sums of h and h * xhat into the planes of the (2, n_programs) fp32 sums."""
    pid = tl.program_id(0)
    j = pid % split
    group = (pid // split).to(tl.int64)
    size = n_channels * n_spatial
    t_lo = j * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    sum_h, sum_h_xhat = _range_grad_sums(
        dy_ptr + group * size, x_ptr + group * size, w_ptr, dw_part_ptr, db_part_ptr,
        tl.load(mean_ptr + group), tl.load(rstd_ptr + group),
        (group % n_groups) * n_channels, (group // n_groups) * n_tiles_s,
        n_channels, n_spatial, n_groups * n_channels, n_tiles_s, t_lo, t_hi,
        HAS_WEIGHT, COMPUTE_DW, COMPUTE_DB, BLOCK_C, BLOCK_S,
    )
    out = sums_ptr + pid.to(tl.int64)
    tl.store(out, sum_h)
    tl.store(out + n_programs, sum_h_xhat)


@triton.jit
def _group_norm_bwd_dx_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, sums_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    n_groups, n_channels, n_spatial, n_tiles_s, n_tiles, tiles_per_split, split, n_programs,
    HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FUSED: tl.constexpr, SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Backward kernel (2), programs in reverse order: program group * split + j writes dx on range j
    of the group. FUSED (split == 1): the program computes the group's sums (and partials) itself."""
    pid = n_programs - 1 - tl.program_id(0)
    j = pid % split
    group = (pid // split).to(tl.int64)
    size = n_channels * n_spatial
    dy_grp = dy_ptr + group * size
    x_grp = x_ptr + group * size
    dx_grp = dx_ptr + group * size
    first_channel = (group % n_groups) * n_channels
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    if FUSED:
        sum_h, sum_h_xhat = _range_grad_sums(
            dy_grp, x_grp, w_ptr, dw_part_ptr, db_part_ptr, mean, rstd,
            first_channel, (group // n_groups) * n_tiles_s,
            n_channels, n_spatial, n_groups * n_channels, n_tiles_s, 0, n_tiles,
            HAS_WEIGHT, COMPUTE_DW, COMPUTE_DB, BLOCK_C, BLOCK_S,
        )
    else:
        idx = tl.arange(0, SPLIT_BLOCK)
        ok = idx < split
        parts = sums_ptr + group * split + idx
        sum_h = tl.sum(tl.load(parts, mask=ok, other=0.0))
        sum_h_xhat = tl.sum(tl.load(parts + n_programs, mask=ok, other=0.0))
    mean_h = sum_h / size
    mean_h_xhat = sum_h_xhat / size
    t_lo = j * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        offs, ch, ch_ok, mask, n_t, ts = _tile_at(t, n_tiles_s, n_channels, n_spatial, BLOCK_C, BLOCK_S)
        w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + first_channel + ch, mask=ch_ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_grp + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_grp + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        dx = rstd * (dy * w[:, None] - mean_h - xhat * mean_h_xhat)
        tl.store(dx_grp + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_sums_kernel(
    dw_part_ptr, db_part_ptr, dw_ptr, db_ptr, n_rows, n_cols,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward kernel (3): dweight/dbias = column sums of the (n_rows, C) fp32 partials, rows added in
    a fixed order, cast to the parameters' dtypes."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    acc_w = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        if COMPUTE_DW:
            acc_w += tl.load(dw_part_ptr + offs, mask=mask, other=0.0)
        if COMPUTE_DB:
            acc_b += tl.load(db_part_ptr + offs, mask=mask, other=0.0)
    if COMPUTE_DW:
        tl.store(dw_ptr + cols, tl.sum(acc_w, axis=0).to(dw_ptr.dtype.element_ty), mask=col_ok)
    if COMPUTE_DB:
        tl.store(db_ptr + cols, tl.sum(acc_b, axis=0).to(db_ptr.dtype.element_ty), mask=col_ok)


class _Plan(NamedTuple):
    block_c: int
    block_s: int
    num_warps: int
    n_tiles_s: int  # spatial tiles per channel row
    n_tiles: int  # tiles per group
    tiles_per_split: int
    split: int  # programs per group
    fused: bool


def _plan(n_groups_total: int, n_channels: int, n_spatial: int, device: torch.device) -> _Plan:
    """Tiles and split of the (n_channels, n_spatial) groups, from the shapes and the SM count only."""
    block_s = min(triton.next_power_of_2(n_spatial), _MAX_BLOCK_S)
    block_c = max(1, min(_TILE_ELEMENTS // block_s, triton.next_power_of_2(n_channels)))
    num_warps = max(1, min(8, block_c * block_s // 256))
    n_tiles_s = cdiv(n_spatial, block_s)
    n_tiles = cdiv(n_channels, block_c) * n_tiles_s
    if _FORCE_SPLIT is not None:
        wanted = _FORCE_SPLIT
    else:
        wanted = cdiv(sm_count(device) * _PROGRAMS_PER_SM, n_groups_total)
    wanted = max(1, min(wanted, n_tiles, _MAX_SPLIT))
    tiles_per_split = cdiv(n_tiles, wanted)
    split = cdiv(n_tiles, tiles_per_split)  # every range holds at least one tile
    fused = split == 1 and n_tiles <= _FUSED_MAX_TILES
    return _Plan(block_c, block_s, num_warps, n_tiles_s, n_tiles, tiles_per_split, split, fused)


def _group_norm_forward(x3, num_groups, weight, bias, eps):
    """(y, mean, rstd) of the contiguous (N, C, S) x3: y like x3, fp32 statistics (N * G,)."""
    n, c, s = x3.shape
    cg = c // num_groups
    plan = _plan(n * num_groups, cg, s, x3.device)
    n_programs = n * num_groups * plan.split
    y = new_output(x3.shape, x3.dtype, x3.device)
    mean = new_output((n * num_groups,), torch.float32, x3.device)
    rstd = new_output((n * num_groups,), torch.float32, x3.device)
    geometry = (cg, s, plan.n_tiles_s, plan.n_tiles, plan.tiles_per_split, plan.split, n_programs)
    part = mean  # unused when fused
    if not plan.fused:
        part = new_output((4, n_programs), torch.float32, x3.device)
        _group_stats_kernel[(n_programs,)](
            x3, part, *geometry, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps,
        )
    _group_norm_fwd_kernel[(n_programs,)](
        x3, y, weight if weight is not None else x3, bias if bias is not None else x3, part, mean, rstd,
        num_groups, *geometry, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, FUSED=plan.fused,
        SPLIT_BLOCK=triton.next_power_of_2(plan.split),
        BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps,
    )
    return y, mean, rstd


def _group_norm_backward(dy3, x3, weight, mean, rstd, num_groups, bias_dtype, compute_dw, compute_db):
    """(dx like x3, dweight or None, dbias or None) from the contiguous (N, C, S) dy3 and x3."""
    n, c, s = x3.shape
    cg = c // num_groups
    plan = _plan(n * num_groups, cg, s, x3.device)
    n_programs = n * num_groups * plan.split
    dx = new_output(x3.shape, x3.dtype, x3.device)
    # Per (sample, spatial tile) rows of per-channel partials; each element written by exactly one tile.
    part_rows = n * plan.n_tiles_s
    dw_part = new_output((part_rows, c), torch.float32, x3.device) if compute_dw else mean
    db_part = new_output((part_rows, c), torch.float32, x3.device) if compute_db else mean
    w_arg = weight if weight is not None else x3
    geometry = (num_groups, cg, s, plan.n_tiles_s, plan.n_tiles, plan.tiles_per_split, plan.split, n_programs)
    flags = dict(HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db)
    sums = mean  # unused when fused
    if not plan.fused:
        sums = new_output((2, n_programs), torch.float32, x3.device)
        _group_norm_bwd_sums_kernel[(n_programs,)](
            dy3, x3, w_arg, mean, rstd, dw_part, db_part, sums, *geometry, **flags,
            BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps,
        )
    _group_norm_bwd_dx_kernel[(n_programs,)](
        dy3, x3, w_arg, mean, rstd, sums, dx, dw_part, db_part, *geometry, **flags,
        FUSED=plan.fused, SPLIT_BLOCK=triton.next_power_of_2(plan.split),
        BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps,
    )
    dweight = new_output((c,), weight.dtype, x3.device) if compute_dw else None
    dbias = new_output((c,), bias_dtype, x3.device) if compute_db else None
    if compute_dw or compute_db:
        _column_sums_kernel[(cdiv(c, _SUM_BLOCK_N),)](
            dw_part, db_part, dweight if compute_dw else mean, dbias if compute_db else mean, part_rows, c,
            COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, BLOCK_R=_SUM_BLOCK_R, BLOCK_N=_SUM_BLOCK_N,
            num_warps=4,
        )
    return dx, dweight, dbias


def _as_groups(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> contiguous (N, C, S)."""
    return x.contiguous().view(x.shape[0], x.shape[1], -1)


class GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        x3 = _as_groups(x)
        y, mean, rstd = _group_norm_forward(x3, num_groups, weight, bias, eps)
        ctx.save_for_backward(x3, weight, mean, rstd)
        ctx.shape, ctx.num_groups = x.shape, num_groups
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x3, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _group_norm_backward(
            dy.contiguous().view(x3.shape), x3, weight, mean, rstd, ctx.num_groups, ctx.bias_dtype,
            ctx.needs_input_grad[2], ctx.needs_input_grad[3],
        )
        return dx.view(ctx.shape), None, dweight, dbias, None


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The specification (module docstring) in fp32 (fp64 for fp64 inputs); x's dtype out."""
    compute = torch.promote_types(x.dtype, torch.float32)
    group_size = math.prod(x.shape[1:]) // num_groups
    groups = x.to(compute).reshape(x.shape[0], num_groups, group_size)
    mean = groups.mean(-1, keepdim=True)
    var = (groups - mean).square().mean(-1, keepdim=True)
    y = ((groups - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    channel_shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(compute).reshape(channel_shape)
    if bias is not None:
        y = y + bias.to(compute).reshape(channel_shape)
    return y.to(x.dtype)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """GroupNorm of x (N, C, *) with C / num_groups channels per group and optional per-channel
    weight and bias (C,), as `torch.nn.functional.group_norm`. Output in x's dtype."""
    check_float("x", x)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_float(name, param)
    check_same_device(x=x, weight=weight, bias=bias)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *), got {tuple(x.shape)}")
    channels = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"num_groups must be a positive divisor of the {channels} channels, got {num_groups}"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) (x's channels), got {tuple(param.shape)}")
    if _library.compiling() and x.numel():  # one graph node under torch.compile
        return _group_norm_op(x, num_groups, weight, bias, float(eps))[0]
    if not use_triton(x, weight, bias) or x.numel() == 0:
        return group_norm_reference(x, num_groups, weight, bias, eps)
    return GroupNormFunction.apply(
        x, num_groups,
        weight.contiguous() if weight is not None else None,
        bias.contiguous() if bias is not None else None,
        float(eps),
    )


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.contiguous() if t is not None else None


def _group_norm_fake(x, num_groups, weight, bias, eps):
    stats = [x.new_empty(x.shape[0] * num_groups, dtype=torch.float32) for _ in range(2)]  # mean, rstd
    return x.new_empty(x.shape), *stats


@_library.custom_op("group_norm", _group_norm_fake)
def _group_norm_op(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, fp32 mean and rstd per (sample, group))."""
    if not use_triton(x, weight, bias):
        var, mean = torch.var_mean(x.float().reshape(x.shape[0] * num_groups, -1), -1, correction=0)
        y = group_norm_reference(x, num_groups, weight, bias, eps).contiguous()
        return y, mean, torch.rsqrt(var + eps)
    weight, bias = _contiguous(weight), _contiguous(bias)
    y, mean, rstd = _group_norm_forward(_as_groups(x), num_groups, weight, bias, eps)
    return y.view(x.shape), mean, rstd


def _group_norm_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, eps, compute_dw, compute_db):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape) if compute_dw else _library.absent(x),
        bias.new_empty(bias.shape) if compute_db else _library.absent(x),
    )


@_library.custom_op("group_norm_backward", _group_norm_backward_fake)
def _group_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    eps: float,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); placeholders for the parameter gradients not asked for."""
    if not use_triton(x, weight, bias):
        params = [p for p in (weight, bias) if p is not None]

        def reference(x, *params):
            given = iter(params)
            w = next(given) if weight is not None else None
            b = next(given) if bias is not None else None
            return group_norm_reference(x, num_groups, w, b, eps)

        dx, *grads = _library.reference_vjp(reference, (x, *params), dy)
        dweight = grads[0] if compute_dw else None
        dbias = grads[-1] if compute_db else None
        dx = dx.contiguous()
    else:
        dx, dweight, dbias = _group_norm_backward(
            _as_groups(dy), _as_groups(x), _contiguous(weight), mean, rstd, num_groups,
            bias.dtype if bias is not None else None, compute_dw, compute_db,
        )
        dx = dx.view(x.shape)
    return (
        dx,
        dweight if dweight is not None else _library.absent(x),
        dbias if dbias is not None else _library.absent(x),
    )


def _group_norm_setup(ctx, inputs, output):
    x, ctx.num_groups, weight, bias, ctx.eps = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])


def _group_norm_grad(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    compute_dw, compute_db = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    dx, dweight, dbias = _group_norm_backward_op(
        dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.eps, compute_dw, compute_db
    )
    return dx, None, dweight if compute_dw else None, dbias if compute_db else None, None


_group_norm_op.register_autograd(_group_norm_grad, setup_context=_group_norm_setup)
