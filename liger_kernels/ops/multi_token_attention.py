"""Multi-token attention (Golovneva et al., 2025, arXiv:2504.00927): a key-query convolution over
the causally masked attention map.

    p   = softmax(scores with key j > query i set to -inf)         over the last dimension
          (sparse=True: sparsemax of the same masked scores, as Liger-Kernel's sparse mode)
    out = conv2d(p, weight, bias, stride, padding, dilation, groups), then out[..., i, j] = 0 for j > i

scores is (B, C_in, L, L) (C_in = heads), weight (C_out, C_in / groups, kH, kW); the convolution must
keep the L x L map (e.g. stride 1 and padding (k - 1) // 2 per side for odd kernels), otherwise the
causal mask of the output is undefined and a ValueError is raised.

The masked normalization and its backward are Triton kernels over tiles of (b, c, query) rows: they
read only the keys j <= i (the masked half of the map is never loaded) and write p with exact zeros
above the diagonal. Softmax takes one row per program; sparsemax calls the tile helpers of
liger_kernels/ops/sparsemax.py (bisection + Michelot threshold search, masked keys at -inf) with
sparsemax's tiling (several short rows per program). The convolution and its gradients are cuDNN's
(torch.nn.functional.conv2d and torch.nn.grad), run on p in the input dtype (fp32 in TF32 where
torch.backends.cudnn.allow_tf32 says so, as torch's conv2d). The backward masks the incoming gradient,
recomputes nothing and uses the saved p: dscores = p * (dp - sum(p * dp)) for softmax,
s * (dp - sum(s * dp) / sum(s)) with the support s = [p > 0] for sparsemax.

Under torch.compile the op is one graph node (`torch.ops.liger.multi_token_attention` and its
backward, see liger_kernels/_library.py): the same kernels and cuDNN calls, with p as an extra output.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.nn.modules.utils import _pair

from liger_kernels import _library
from liger_kernels._utils import (
    check_float,
    check_row_size,
    check_same_device,
    new_output,
    row_launch_config,
    use_triton,
    on_input_device,
)
from liger_kernels.ops.sparsemax import (
    _BISECTIONS,
    _MICHELOT_STEPS,
    sparsemax_reference,
    sparsemax_tile,
    sparsemax_tile_grad,
)
from liger_kernels.ops.sparsemax import _launch as _sparsemax_launch


@triton.jit
def _causal_fwd_kernel(
    x_ptr, p_ptr, n_rows, seq_len,
    SPARSE: tl.constexpr, BISECTIONS: tl.constexpr, MICHELOT_STEPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """p of BLOCK_M rows (b, c, query) of the maps: softmax or sparsemax over the keys j <= query."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    # Rows past the end read the last row (finite, never stored): the diagonal is always kept.
    src = tl.minimum(rows, n_rows - 1)
    keep = cols <= src % seq_len
    x = tl.load(x_ptr + src * seq_len + cols, mask=keep, other=-float("inf")).to(tl.float32)
    if SPARSE:
        p = sparsemax_tile(x, BISECTIONS, MICHELOT_STEPS)
    else:
        e = tl.exp(x - tl.max(x, axis=1)[:, None])  # the max is finite
        p = e / tl.sum(e, axis=1)[:, None]
    tl.store(p_ptr + rows * seq_len + cols, p.to(p_ptr.dtype.element_ty), mask=(rows < n_rows) & (cols < seq_len))


@triton.jit
def _causal_bwd_kernel(
    p_ptr, dp_ptr, dx_ptr, n_rows, seq_len, SPARSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    in_rows = rows < n_rows
    keep = in_rows & (cols <= rows % seq_len)
    p = tl.load(p_ptr + rows * seq_len + cols, mask=keep, other=0.0).to(tl.float32)
    dp = tl.load(dp_ptr + rows * seq_len + cols, mask=keep, other=0.0).to(tl.float32)
    if SPARSE:
        dx = sparsemax_tile_grad(p, dp)  # the support p > 0 lies in the kept keys
    else:
        dx = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    tl.store(dx_ptr + rows * seq_len + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_rows & (cols < seq_len))


def _launch(n_rows: int, seq_len: int, sparse: bool):
    """grid, BLOCK_M, BLOCK_N, warps. Softmax: one row per program. Sparsemax: sparsemax's tiles
    (several short rows per program, so its bisection reductions fill the warps)."""
    if sparse:
        return _sparsemax_launch(n_rows, seq_len)
    block, num_warps = row_launch_config(seq_len)
    return (n_rows,), 1, block, num_warps


def _causal_normalize(x: torch.Tensor, sparse: bool) -> torch.Tensor:
    seq_len = x.shape[-1]
    n_rows = x.numel() // seq_len
    p = new_output(x.shape, x.dtype, x.device)
    grid, block_m, block_n, num_warps = _launch(n_rows, seq_len, sparse)
    _causal_fwd_kernel[grid](
        x, p, n_rows, seq_len, SPARSE=sparse, BISECTIONS=_BISECTIONS, MICHELOT_STEPS=_MICHELOT_STEPS,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return p


def _causal_normalize_backward(p: torch.Tensor, dp: torch.Tensor, sparse: bool) -> torch.Tensor:
    seq_len = p.shape[-1]
    n_rows = p.numel() // seq_len
    dx = new_output(p.shape, p.dtype, p.device)
    grid, block_m, block_n, num_warps = _launch(n_rows, seq_len, sparse)
    _causal_bwd_kernel[grid](
        p, dp, dx, n_rows, seq_len, SPARSE=sparse, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dx


def _future(seq_len: int, device) -> torch.Tensor:
    """(L, L) boolean mask of the keys after each query (j > i)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


class MultiTokenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, weight, bias, stride, padding, dilation, groups, sparse):
        p = _causal_normalize(scores, sparse)
        out = torch.nn.functional.conv2d(p, weight, bias, stride, padding, dilation, groups)
        future = _future(scores.shape[-1], scores.device)
        ctx.save_for_backward(p, weight, future)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.sparse = sparse
        return out.masked_fill_(future, 0.0)  # out is our own buffer

    @staticmethod
    def backward(ctx, dout):
        p, weight, future = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        dout = dout.masked_fill(future, 0.0)
        dscores = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dp = torch.nn.grad.conv2d_input(p.shape, weight, dout, stride, padding, dilation, groups)
            dscores = _causal_normalize_backward(p, dp.contiguous(), ctx.sparse)
        if ctx.needs_input_grad[1]:
            dweight = torch.nn.grad.conv2d_weight(p, weight.shape, dout, stride, padding, dilation, groups)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dout.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype)
        return dscores, dweight, dbias, None, None, None, None, None


def multi_token_attention_reference(
    scores, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, sparse=False
):
    """Torch specification: masked softmax (sparsemax if `sparse`, by sorting) and convolution in fp32
    (fp64 for fp64), input dtype out."""
    compute = torch.promote_types(scores.dtype, torch.float32)
    future = _future(scores.shape[-1], scores.device)
    masked = scores.to(compute).masked_fill(future, float("-inf"))
    p = sparsemax_reference(masked, dim=-1) if sparse else torch.softmax(masked, dim=-1)
    out = torch.nn.functional.conv2d(
        p, weight.to(compute), None if bias is None else bias.to(compute), stride, padding, dilation, groups
    )
    return out.masked_fill(future, 0.0).to(scores.dtype)


def _check_inputs(scores, weight, bias, stride, padding, dilation, groups):
    check_float("scores", scores)
    check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    check_same_device(scores=scores, weight=weight, bias=bias)
    if scores.dim() != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must be (batch, channels, L, L), got shape {tuple(scores.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be (out_channels, in_channels / groups, kH, kW), got {tuple(weight.shape)}")
    if not (scores.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)):
        raise TypeError("scores, weight and bias must have the same dtype")
    if scores.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(
            f"weight {tuple(weight.shape)} with groups={groups} does not fit scores with {scores.shape[1]} channels"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    seq_len = scores.shape[-1]
    check_row_size("scores", seq_len)
    for axis in range(2):
        s, p, d, k = (v if isinstance(v, int) else v[axis] for v in (stride, padding, dilation, weight.shape[2 + axis]))
        if (seq_len + 2 * p - d * (k - 1) - 1) // s + 1 != seq_len:
            raise ValueError(
                f"the convolution (kernel {tuple(weight.shape[2:])}, stride={stride}, padding={padding}, "
                f"dilation={dilation}) must keep the {seq_len} x {seq_len} attention map"
            )


@on_input_device
def multi_token_attention(scores, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, sparse=False):
    """Multi-token attention of the scores (B, C_in, L, L): causal softmax over keys (sparsemax if
    `sparse`), a 2-D key-query convolution (weight (C_out, C_in / groups, kH, kW), optional bias
    (C_out,)), and the causal mask applied to the result (zeros above the diagonal). Returns
    (B, C_out, L, L)."""
    _check_inputs(scores, weight, bias, stride, padding, dilation, groups)
    sparse = bool(sparse)
    if _library.compiling() and scores.numel():  # one graph node under torch.compile
        conv = [list(_pair(v)) for v in (stride, padding, dilation)]
        return _multi_token_attention_op(scores, weight, bias, *conv, int(groups), sparse)[0]
    if not use_triton(scores, weight, bias) or scores.numel() == 0:
        return multi_token_attention_reference(scores, weight, bias, stride, padding, dilation, groups, sparse)
    return MultiTokenAttentionFunction.apply(
        scores.contiguous(), weight, bias, stride, padding, dilation, groups, sparse
    )


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------
# The forward's second output is what the backward needs: p on the Triton path (as the Function
# saves), a copy of the scores on the reference path (whose gradients come from autograd through the
# reference). Both have the scores' shape and dtype, so the fake implementation needs no device logic.


def _multi_token_attention_fake(scores, weight, bias, stride, padding, dilation, groups, sparse):
    batch, _, seq_len, _ = scores.shape
    return scores.new_empty((batch, weight.shape[0], seq_len, seq_len)), scores.new_empty(scores.shape)


@_library.custom_op("multi_token_attention", _multi_token_attention_fake)
def _multi_token_attention_op(
    scores: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    sparse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, p): p on the Triton path, the scores on the reference path."""
    if not use_triton(scores, weight, bias):
        out = multi_token_attention_reference(scores, weight, bias, stride, padding, dilation, groups, sparse)
        return out.contiguous(), scores.clone(memory_format=torch.contiguous_format)
    p = _causal_normalize(scores.contiguous(), sparse)
    out = torch.nn.functional.conv2d(p, weight, bias, stride, padding, dilation, groups)
    out = out.contiguous().masked_fill_(_future(scores.shape[-1], scores.device), 0.0)
    return out, p


def _multi_token_attention_backward_fake(
    dout, saved, weight, bias, stride, padding, dilation, groups, sparse, compute_ds, compute_dw, compute_db
):
    return (
        _library.fake_grad(saved, compute_ds),
        _library.fake_grad(weight, compute_dw),
        bias.new_empty(bias.shape) if compute_db else _library.absent(weight),
    )


@_library.custom_op("multi_token_attention_backward", _multi_token_attention_backward_fake)
def _multi_token_attention_backward_op(
    dout: torch.Tensor,
    saved: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    sparse: bool,
    compute_ds: bool,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dscores, dweight, dbias) from the forward's second output `saved`; placeholders for the
    gradients not asked for."""
    dscores = dweight = dbias = None
    if not use_triton(saved, weight, bias):

        def reference(scores, weight, *maybe_bias):
            return multi_token_attention_reference(
                scores, weight, maybe_bias[0] if maybe_bias else None, stride, padding, dilation, groups, sparse
            )

        primals = (saved, weight) if bias is None else (saved, weight, bias)
        grads = _library.reference_vjp(reference, primals, dout)
        dscores = grads[0].contiguous() if compute_ds else None
        dweight = grads[1] if compute_dw else None
        dbias = grads[2] if compute_db else None
    else:
        p = saved
        dout = dout.masked_fill(_future(p.shape[-1], p.device), 0.0)
        if compute_ds:
            dp = torch.nn.grad.conv2d_input(p.shape, weight, dout, stride, padding, dilation, groups)
            dscores = _causal_normalize_backward(p, dp.contiguous(), sparse)
        if compute_dw:
            dweight = torch.nn.grad.conv2d_weight(p, weight.shape, dout, stride, padding, dilation, groups)
            dweight = dweight.contiguous()
        if compute_db:
            dbias = dout.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype)
    return (
        dscores if dscores is not None else _library.absent(saved),
        dweight if dweight is not None else _library.absent(weight),
        dbias if dbias is not None else _library.absent(weight),
    )


def _multi_token_attention_setup(ctx, inputs, output):
    _, weight, bias, *ctx.conv = inputs
    ctx.save_for_backward(output[1], weight, bias)


def _multi_token_attention_grad(ctx, dout, _dsaved):
    saved, weight, bias = ctx.saved_tensors
    compute_ds, compute_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    compute_db = bias is not None and ctx.needs_input_grad[2]
    dscores, dweight, dbias = _multi_token_attention_backward_op(
        dout, saved, weight, bias, *ctx.conv, compute_ds, compute_dw, compute_db
    )
    return (
        dscores if compute_ds else None,
        dweight if compute_dw else None,
        dbias if compute_db else None,
        None, None, None, None, None,
    )


_multi_token_attention_op.register_autograd(_multi_token_attention_grad, setup_context=_multi_token_attention_setup)
