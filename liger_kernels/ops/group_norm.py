"""GroupNorm over (N, C, *) inputs: `torch.nn.functional.group_norm` semantics.

The C channels are split into G groups of C / G consecutive channels; per sample n and group g, over
its C/G * S elements (S = product of the spatial sizes):
    mean, var (biased), rstd = 1 / sqrt(var + eps),  y = (x - mean) * rstd * weight[c] + bias[c]
in fp32, one rounding at the end to x's dtype. weight and bias (C,) are optional (None: 1 and 0) and
may have another float dtype than x. Backward, with xhat = (x - mean) * rstd and h = dy * weight[c]:
    dx = rstd * (h - mean(h) - xhat * mean(h * xhat))   (means over the group)
    dweight[c] = sum over n, spatial of dy * xhat,   dbias[c] = sum over n, spatial of dy

Kernels: one program per (n, g); the group is a contiguous (C/G, S) block, walked in
[BLOCK_C, BLOCK_S] tiles (channels x spatial positions), so any group size works and narrow spatial
sizes (S = 1) still fill the tile. The forward makes three passes over the group (mean; centered
variance, exact where sum-of-squares would cancel; the write) and saves fp32 mean and rstd; the
backward makes two (per-channel sums of dy and dy * xhat, written as per-sample partials, and the
group sums; then dx). Passes after the first re-read the group, mostly from L2. The partials
(N, C) are summed by torch (deterministic; no atomics).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, new_output, on_input_device, use_triton

_TILE_ELEMENTS = 2048
_MAX_BLOCK_S = 1024


@triton.jit
def _tile(n_channels, n_spatial, c0, s0, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets (from the group's start), channel indices within the group, and mask of a tile."""
    ch = c0 + tl.arange(0, BLOCK_C)
    sp = s0 + tl.arange(0, BLOCK_S)
    mask = (ch < n_channels)[:, None] & (sp < n_spatial)[None, :]
    return ch[:, None].to(tl.int64) * n_spatial + sp[None, :], ch, mask


@triton.jit
def _group_norm_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, n_groups, n_channels, n_spatial, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """n_channels: channels per group. Program (n * n_groups + g) normalizes group g of sample n."""
    group = tl.program_id(0).to(tl.int64)
    size = n_channels * n_spatial
    x_grp = x_ptr + group * size
    y_grp = y_ptr + group * size
    first_channel = (group % n_groups) * n_channels
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for c0 in range(0, n_channels, BLOCK_C):
        for s0 in range(0, n_spatial, BLOCK_S):
            offs, ch, mask = _tile(n_channels, n_spatial, c0, s0, BLOCK_C, BLOCK_S)
            acc += tl.load(x_grp + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc) / size
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for c0 in range(0, n_channels, BLOCK_C):
        for s0 in range(0, n_spatial, BLOCK_S):
            offs, ch, mask = _tile(n_channels, n_spatial, c0, s0, BLOCK_C, BLOCK_S)
            xc = tl.where(mask, tl.load(x_grp + offs, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            acc += xc * xc
    rstd = tl.rsqrt(tl.sum(acc) / size + eps)
    for c0 in range(0, n_channels, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
        if HAS_WEIGHT:
            scale *= tl.load(w_ptr + first_channel + ch, mask=ch < n_channels, other=0.0).to(tl.float32)
        shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_BIAS:
            shift += tl.load(b_ptr + first_channel + ch, mask=ch < n_channels, other=0.0).to(tl.float32)
        for s0 in range(0, n_spatial, BLOCK_S):
            offs, ch, mask = _tile(n_channels, n_spatial, c0, s0, BLOCK_C, BLOCK_S)
            x = tl.load(x_grp + offs, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * scale[:, None] + shift[:, None]
            tl.store(y_grp + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + group, mean)
    tl.store(rstd_ptr + group, rstd)


@triton.jit
def _group_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
    n_groups, n_channels, n_spatial,
    HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n * n_groups + g): dx of the group, and the group's channels of row n of the (N, C)
    dweight/dbias partials (dy, x, dx contiguous (N, C, S))."""
    group = tl.program_id(0).to(tl.int64)
    size = n_channels * n_spatial
    dy_grp = dy_ptr + group * size
    x_grp = x_ptr + group * size
    dx_grp = dx_ptr + group * size
    first_channel = (group % n_groups) * n_channels
    # The partials' row n is contiguous over all channels: its group g starts at group * n_channels.
    part_off = group * n_channels
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    sum_h = 0.0
    sum_h_xhat = 0.0
    for c0 in range(0, n_channels, BLOCK_C):
        acc_dy = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        acc_dy_xhat = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, n_spatial, BLOCK_S):
            offs, ch, mask = _tile(n_channels, n_spatial, c0, s0, BLOCK_C, BLOCK_S)
            dy = tl.load(dy_grp + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_grp + offs, mask=mask, other=0.0).to(tl.float32)
            acc_dy += dy
            acc_dy_xhat += dy * ((x - mean) * rstd)
        ch = c0 + tl.arange(0, BLOCK_C)
        ch_ok = ch < n_channels
        dy_c = tl.sum(acc_dy, axis=1)
        dy_xhat_c = tl.sum(acc_dy_xhat, axis=1)
        if COMPUTE_DW:
            tl.store(dw_partial_ptr + part_off + ch, dy_xhat_c, mask=ch_ok)
        if COMPUTE_DB:
            tl.store(db_partial_ptr + part_off + ch, dy_c, mask=ch_ok)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + first_channel + ch, mask=ch_ok, other=0.0).to(tl.float32)
            dy_c *= w
            dy_xhat_c *= w
        sum_h += tl.sum(dy_c, axis=0)
        sum_h_xhat += tl.sum(dy_xhat_c, axis=0)
    mean_h = sum_h / size
    mean_h_xhat = sum_h_xhat / size
    for c0 in range(0, n_channels, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + first_channel + ch, mask=ch < n_channels, other=0.0).to(tl.float32)
        for s0 in range(0, n_spatial, BLOCK_S):
            offs, ch, mask = _tile(n_channels, n_spatial, c0, s0, BLOCK_C, BLOCK_S)
            dy = tl.load(dy_grp + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_grp + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            dx = rstd * (dy * w[:, None] - mean_h - xhat * mean_h_xhat)
            tl.store(dx_grp + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch(n_channels: int, n_spatial: int):
    """(BLOCK_C, BLOCK_S, num_warps) of the group tiles."""
    block_s = min(triton.next_power_of_2(n_spatial), _MAX_BLOCK_S)
    block_c = max(1, min(_TILE_ELEMENTS // block_s, triton.next_power_of_2(n_channels)))
    num_warps = max(1, min(8, block_c * block_s // 256))
    return block_c, block_s, num_warps


def _group_norm_forward(x3, num_groups, weight, bias, eps):
    """(y, mean, rstd) of the contiguous (N, C, S) x3: y like x3, fp32 statistics (N * G,)."""
    n, c, s = x3.shape
    cg = c // num_groups
    y = new_output(x3.shape, x3.dtype, x3.device)
    mean = new_output((n * num_groups,), torch.float32, x3.device)
    rstd = new_output((n * num_groups,), torch.float32, x3.device)
    block_c, block_s, num_warps = _launch(cg, s)
    _group_norm_fwd_kernel[(n * num_groups,)](
        x3, y, weight if weight is not None else x3, bias if bias is not None else x3, mean, rstd,
        num_groups, cg, s, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps,
    )
    return y, mean, rstd


def _group_norm_backward(dy3, x3, weight, mean, rstd, num_groups, bias_dtype, compute_dw, compute_db):
    """(dx like x3, dweight or None, dbias or None) from the contiguous (N, C, S) dy3 and x3."""
    n, c, s = x3.shape
    cg = c // num_groups
    dx = new_output(x3.shape, x3.dtype, x3.device)
    dw_partial = new_output((n, c), torch.float32, x3.device) if compute_dw else mean
    db_partial = new_output((n, c), torch.float32, x3.device) if compute_db else mean
    block_c, block_s, num_warps = _launch(cg, s)
    _group_norm_bwd_kernel[(n * num_groups,)](
        dy3, x3, weight if weight is not None else x3, mean, rstd, dx, dw_partial, db_partial,
        num_groups, cg, s,
        HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps,
    )
    dweight = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
    dbias = db_partial.sum(0).to(bias_dtype) if compute_db else None
    return dx, dweight, dbias


def _as_groups(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> contiguous (N, C, S)."""
    return x.contiguous().view(x.shape[0], x.shape[1], -1)


class GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, num_groups, weight, bias, eps):
        """x3: the contiguous (N, C, S) of `_as_groups`; y (N, C, S)."""
        y, mean, rstd = _group_norm_forward(x3, num_groups, weight, bias, eps)
        ctx.save_for_backward(x3, weight, mean, rstd)
        ctx.num_groups = num_groups
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x3, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _group_norm_backward(
            dy.contiguous(), x3, weight, mean, rstd, ctx.num_groups, ctx.bias_dtype,
            ctx.needs_input_grad[2], ctx.needs_input_grad[3],
        )
        return dx, None, dweight, dbias, None


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


@on_input_device
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
    # (N, C, S) in and out, reshaped here: a view made inside the Function could not be modified in place.
    y = GroupNormFunction.apply(
        _as_groups(x), num_groups,
        weight.contiguous() if weight is not None else None,
        bias.contiguous() if bias is not None else None,
        float(eps),
    )
    return y if x.dim() == 3 else y.view(x.shape)


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
