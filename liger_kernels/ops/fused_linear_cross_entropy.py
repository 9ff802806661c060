"""Fused linear + cross-entropy: loss = cross_entropy(input @ weight.T + bias, target, ...) without
ever materializing the (N, V) logits.

Semantics: exactly `cross_entropy` (see liger_kernels/ops/cross_entropy.py) applied to the logits of
the linear layer; `ce_weight` are the class weights. With `num_items_in_batch` (requires
reduction="sum", as Hugging Face does for gradient accumulation) the summed loss and z-loss are
divided by that number (an int or a tensor, read on device).

The loss (and z_loss) is returned in float32 whatever the input dtype, as Hugging Face's
ForCausalLMLoss computes it on logits upcast to fp32: a bf16 loss has 8 significant bits (steps of
1/64 near 2.5), too coarse for logged loss curves. It was always accumulated in fp32 per row and
reduced in fp32; only the final rounding to the input dtype is gone. Its gradient: autograd hands
the backward an fp32 grad_output, which multiplies the stored gradients in fp32 math (`scale_`, or
the per-row scale of reduction="none"); the gradients keep the dtypes of input, weight and bias.

Algorithm (forward pass, which also computes all the gradients):
    for each chunk of rows:
        logits = x_c @ W.T (+ b)                  cuBLAS, into one reused (chunk, V) buffer
        CE kernel: per-row loss, and d loss / d logits written over the logits (in place), already
                   divided by the global mean normalizer (computed once up front, on device)
        dX[c] = g @ W                             cuBLAS, straight into the preallocated dX rows
        dW   += g.T @ x_c                         cuBLAS addmm (or `DW_TRITON_MAX_ROWS`: Triton) into
                                                  one dW buffer (first chunk: no accumulation)
        db   += g.sum(0)                          fp32
With `DW_STREAM` the dW GEMM runs on a second stream, overlapping the dX GEMM (both only read g);
the next chunk's logits GEMM waits for it.
The backward multiplies the stored gradients by grad_output (skipped on device when it is 1).
Gradients of inputs that do not require grad are not computed (e.g. a frozen lm_head under LoRA).
reduction="none" needs a per-row grad_output, so there the forward computes only the losses and the
backward recomputes the chunks with the row weights folded into the kernel (one extra logits GEMM).

Memory beyond the inputs: dX + dW + one logits chunk of about `CHUNK_BYTES`. The dW update
`dW += g.T @ x_c` reads and writes all of dW once per chunk, so its time is
max(2|dW| / bandwidth, 2 V H rows / FLOPs): with fewer than ~400 rows per chunk on an H200 it is
memory-bound. 128 MiB of bf16 logits is 512 rows at V = 128256 (Llama 3: dW 0.98 GiB + dX 0.06 +
chunk 0.12 = 1.16 GiB at N=8192, H=4096) and 256 rows at V = 256000 (Gemma, H=2304: 1.26 GiB).
Gradients are computed unscaled in the forward: with fp16 and a loss scaler, tiny gradients can
flush to zero before grad_output (the loss scale) multiplies them.

`accum_dtype=torch.float32` accumulates dW in fp32 (a Triton GEMM adds each chunk's fp32 product
into an fp32 buffer) and rounds once at the end; the default accumulates in the weight's dtype
(one rounding per chunk). For 16-bit weights the option costs 2|dW| more memory at the end (the
fp32 buffer and its rounded copy) and is slower; it is for checking precision, not for speed.
Under autocast, input, weight and bias are cast to the autocast dtype first, as F.linear would be.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import INTERPRET, check_float, check_same_device, new_output, on_input_device, use_triton
from liger_kernels.ops.cross_entropy import (
    CrossEntropyOptions,
    check_class_weight,
    check_options,
    check_target,
    cross_entropy_reference,
    launch_cross_entropy,
    loss_outputs,
    mean_denominators,
    reduce_accuracy,
    reduce_loss,
    scale_,
)

# Schedule knobs, read at every call (scripts/flce_sweep.py tries others).
# Bytes of one chunk of logits (the only sizeable buffer besides dX and dW).
CHUNK_BYTES = 128 * 2**20
# Rows per chunk: at least this many (GEMM efficiency), and a multiple of it when chunking.
MIN_CHUNK_ROWS = 64
# Run each chunk's dW GEMM on a second CUDA stream, concurrently with its dX GEMM (both only read
# the chunk's gradient). The dW update is memory-bound when a chunk has few rows, the dX product
# compute-bound, so sharing the GPU between them can hide part of the dW traffic. No extra memory
# besides the second stream's cuBLAS workspace (allocated once per device).
DW_STREAM = False
# dW += g.T @ x_c has K = rows of a chunk: cuBLAS's addmm ran at 2.3-2.5 TB/s on the H200 (run 2:
# 1.0 ms per 256-row Gemma chunk against a 0.58 ms floor for reading and writing dW), its C tile
# read not overlapping the short product. Chunks of at most DW_TRITON_MAX_ROWS rows (0: none) run
# `_grad_weight_kernel` instead (16-bit weights; the fp32 accumulation of
# accum_dtype=torch.float32 always does), with DW_CONFIG = (BLOCK_V, BLOCK_H, BLOCK_K, num_warps,
# num_stages): 64 x 128 tiles, 4 warps, 3 stages fit 3 programs per SM (163 registers, 72 KB).
DW_TRITON_MAX_ROWS = 0
DW_CONFIG = (64, 128, 64, 4, 3)


def chunk_rows(n_rows: int, n_classes: int, element_size: int, chunk_bytes: int | None = None) -> int:
    """Automatic rows per chunk: about `chunk_bytes` (default CHUNK_BYTES) of logits, a multiple of
    MIN_CHUNK_ROWS."""
    rows = (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (n_classes * element_size)
    rows = max(MIN_CHUNK_ROWS, rows // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)
    return max(1, min(rows, n_rows))


@triton.jit
def _grad_weight_kernel(
    g_ptr,
    x_ptr,
    out_ptr,
    n_k,
    n_v,
    n_h,
    g_stride,
    x_stride,
    out_stride,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out (V, H) (+)= g (K, V).T @ x (K, H) of 16-bit g and x: fp32 products and sum, rounded once
    to out's dtype (fp32, or the inputs' dtype: the rounding of cuBLAS's addmm).

    K is short (one chunk's rows), so the kernel is bound by reading and writing out: the out tile's
    load is issued before the products so that it is in flight during them. Program p owns tile
    (p // tiles_h, p % tiles_h): the H tiles of one V block run side by side, so g's columns of that
    block come from HBM once (then from L2).
    """
    tiles_h = tl.cdiv(n_h, BLOCK_H)
    offs_v = (tl.program_id(0) // tiles_h) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = (tl.program_id(0) % tiles_h) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_v[:, None] < n_v) & (offs_h[None, :] < n_h)
    out = out_ptr + offs_v[:, None].to(tl.int64) * out_stride + offs_h[None, :]
    if ACCUMULATE:
        prev = tl.load(out, mask=mask, other=0.0)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        ks = (k0 + offs_k).to(tl.int64)
        g = tl.load(
            g_ptr + ks[None, :] * g_stride + offs_v[:, None],
            mask=(ks[None, :] < n_k) & (offs_v[:, None] < n_v),
            other=0.0,
        )
        x = tl.load(
            x_ptr + ks[:, None] * x_stride + offs_h[None, :],
            mask=(ks[:, None] < n_k) & (offs_h[None, :] < n_h),
            other=0.0,
        )
        if UPCAST:  # the interpreter's tl.dot multiplies bf16 bit patterns; fp32 products are exact
            g, x = g.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(g, x, acc=acc)
    if ACCUMULATE:
        acc += prev.to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _accumulate_grad_weight(grad_w: torch.Tensor, g: torch.Tensor, x: torch.Tensor, first: bool):
    """grad_w (V, H) = or += g.T @ x for g (rows, V), x (rows, H): cuBLAS, or the Triton kernel for
    an fp32 grad_w of 16-bit g and for chunks of at most `DW_TRITON_MAX_ROWS` rows (16-bit only:
    tl.dot would take fp32 as TF32)."""
    triton_16bit = g.dtype != torch.float32 and g.shape[0] <= DW_TRITON_MAX_ROWS
    if grad_w.dtype == g.dtype and not triton_16bit:
        if first:
            torch.mm(g.t(), x, out=grad_w)
        else:
            grad_w.addmm_(g.t(), x)
        return
    n_k, n_v = g.shape
    n_h = x.shape[1]
    block_v, block_h, block_k, num_warps, num_stages = DW_CONFIG
    grid = (triton.cdiv(n_v, block_v) * triton.cdiv(n_h, block_h),)
    _grad_weight_kernel[grid](
        g,
        x,
        grad_w,
        n_k,
        n_v,
        n_h,
        g.stride(0),
        x.stride(0),
        grad_w.stride(0),
        ACCUMULATE=not first,
        UPCAST=INTERPRET,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )


@dataclass(frozen=True)
class _Plan:
    opts: CrossEntropyOptions
    rows: int  # rows per chunk
    accum_dtype: torch.dtype  # of the weight gradient


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One extra stream per CUDA device, reused (a new stream per call would allocate a new cuBLAS
    workspace each time); None off CUDA."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def _chunked_pass(x, w, b, target, ce_weight, plan: _Plan, needs, denoms=None, row_scale=None,
                  acc_rows=None):
    """Per-row losses (fp32) and, as `needs` = (dX, dW, db) asks, the gradients, chunk by chunk;
    with `acc_rows` (fp32, one per row) also whether each row's target is an argmax."""
    n, h = x.shape
    v = w.shape[0]
    device = x.device
    opts, rows = plan.opts, plan.rows
    need_dx, need_dw, need_db = needs
    loss_rows = new_output((n,), torch.float32, device)
    z_rows = new_output((n,), torch.float32, device) if opts.lse_square_scale else None
    grad_x = new_output((n, h), x.dtype, device) if need_dx else None
    grad_w = new_output((v, h), plan.accum_dtype, device) if need_dw else None
    grad_b = torch.zeros((v,), dtype=torch.float32, device=device) if need_db else None
    need_grad = need_dx or need_dw or need_db
    logits_buf = new_output((min(rows, n), v), x.dtype, device)
    side = _side_stream(device) if DW_STREAM and need_dw and need_dx else None
    main = torch.cuda.current_stream(device) if side is not None else None
    for start in range(0, n, rows):
        end = min(start + rows, n)
        x_c = x[start:end]
        logits = logits_buf[: end - start]
        if side is not None and start > 0:
            main.wait_stream(side)  # the previous chunk's dW GEMM still reads the logits buffer
        if b is None:
            torch.mm(x_c, w.t(), out=logits)
        else:
            torch.addmm(b, x_c, w.t(), out=logits)
        launch_cross_entropy(
            logits,
            logits if need_grad else None,
            target[start:end],
            ce_weight,
            loss_rows[start:end],
            z_rows[start:end] if z_rows is not None else None,
            denoms,
            row_scale[start:end] if row_scale is not None else None,
            opts,
            acc_rows[start:end] if acc_rows is not None else None,
        )
        if side is not None:
            side.wait_stream(main)  # the gradient chunk is written
        if need_dx:
            torch.mm(logits, w, out=grad_x[start:end])
        if need_dw:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                _accumulate_grad_weight(grad_w, logits, x_c, first=start == 0)
        if need_db:
            grad_b += logits.sum(0, dtype=torch.float32)
    if side is not None:
        main.wait_stream(side)  # dW is complete before anyone on the caller's stream reads it
    return loss_rows, z_rows, grad_x, grad_w, grad_b


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, target, ce_weight, plan: _Plan, reduction, num_items, with_accuracy):
        out_shape = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).contiguous()
        w = w.contiguous()
        target = target.reshape(-1).contiguous()
        ce_weight = ce_weight.float().contiguous() if ce_weight is not None else None
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if reduction == "mean":
            denoms = mean_denominators(target, ce_weight, plan.opts.ignore_index)
        elif num_items is not None:
            denoms = (num_items, num_items)
        else:
            denoms = None

        ctx.reduction = reduction
        ctx.used = False
        ctx.w_dtype, ctx.b_dtype = w.dtype, (b.dtype if b is not None else None)
        acc_rows = new_output((x.shape[0],), torch.float32, x.device) if with_accuracy else None
        if reduction == "none":
            # Gradients need the per-row grad_output: computed in backward.
            no_grads = (False, False, False)
            loss_rows, z_rows, *_ = _chunked_pass(
                x, w, b, target, ce_weight, plan, no_grads, acc_rows=acc_rows
            )
            ctx.save_for_backward(x, w, b, target, ce_weight)
            ctx.plan, ctx.needs = plan, needs
        else:
            loss_rows, z_rows, grad_x, grad_w, grad_b = _chunked_pass(
                x, w, b, target, ce_weight, plan, needs, denoms, acc_rows=acc_rows
            )
            ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.x_shape = out_shape + (x.shape[-1],)
        loss, z_loss = reduce_loss(loss_rows, z_rows, reduction, denoms, out_shape, torch.float32)
        accuracy = reduce_accuracy(acc_rows, target, plan.opts.ignore_index) if with_accuracy else None
        # One call: each call replaces the set of non-differentiable outputs.
        ctx.mark_non_differentiable(*(t for t in (z_loss, accuracy) if t is not None))
        return loss, z_loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss, grad_accuracy):
        if ctx.reduction == "none":
            x, w, b, target, ce_weight = ctx.saved_tensors
            row_scale = grad_loss.reshape(-1).float().contiguous()
            _, _, grad_x, grad_w, grad_b = _chunked_pass(
                x, w, b, target, ce_weight, ctx.plan, ctx.needs, row_scale=row_scale
            )
        else:
            if ctx.used:
                raise RuntimeError(
                    "fused_linear_cross_entropy's backward scales its saved gradients in place "
                    "and can run only once"
                )
            ctx.used = True
            grad_x, grad_w, grad_b = ctx.saved_tensors
            for grad in (grad_x, grad_w, grad_b):
                if grad is not None:
                    scale_(grad, grad_loss)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.w_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def fused_linear_cross_entropy_reference(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    return_z_loss: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
    return_token_accuracy: bool = False,
):
    """Torch specification of `fused_linear_cross_entropy`: materialized logits in fp32 (fp64 for
    fp64 inputs), then `cross_entropy_reference`. Outputs in float32 (float64 for float64 inputs),
    whatever the input dtype (see the module docstring); the accuracy in float32. The CPU path."""
    compute = torch.promote_types(input.dtype, torch.float32)
    with torch.autocast(input.device.type, enabled=False):
        logits = input.to(compute) @ weight.to(compute).t()
    if bias is not None:
        logits = logits + bias.to(compute)
    loss, z_loss, *accuracy = cross_entropy_reference(
        logits, target, ce_weight, ignore_index, label_smoothing, lse_square_scale, softcap,
        logit_scale, reduction, return_z_loss=True, return_token_accuracy=return_token_accuracy,
    )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(device=loss.device, dtype=compute)
        loss, z_loss = loss / num_items_in_batch, z_loss / num_items_in_batch
    return loss_outputs(loss, z_loss, accuracy[0] if accuracy else None, return_z_loss)


def _check_num_items(num_items_in_batch, reduction: str) -> None:
    if num_items_in_batch is None:
        return
    if reduction != "sum":
        raise ValueError(
            f'num_items_in_batch requires reduction="sum" (the summed loss is divided by it), '
            f"got reduction={reduction!r}"
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a number or a 1-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        kind = type(num_items_in_batch).__name__
        raise TypeError(f"num_items_in_batch must be an int or a tensor, got {kind}")
    elif num_items_in_batch <= 0:
        raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")


@on_input_device
def fused_linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    return_z_loss: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
    return_token_accuracy: bool = False,
    *,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
):
    """cross_entropy(input @ weight.T + bias, target, ...) for input (..., H), weight (V, H).

    `chunk_size`: rows per chunk (None: automatic, see `chunk_rows`). `accum_dtype`: None (the
    weight's dtype) or torch.float32 for the weight-gradient accumulation. See the module docstring.
    `return_token_accuracy`: also return the token accuracy, as `cross_entropy` defines it, of the
    logits the kernel sees (in the input dtype), from the loss kernel's pass (no extra pass).
    Returns loss, or (loss, z_loss) with `return_z_loss=True`, in float32 whatever the input dtype;
    the accuracy (fp32) comes last: (loss, accuracy) or (loss, z_loss, accuracy).
    """
    check_float("input", input)
    check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    n_classes, hidden = weight.shape
    if n_classes == 0 or hidden == 0:
        raise ValueError(f"weight must have non-empty shape (V, H), got {tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != hidden:
        raise ValueError(
            f"input must have shape (..., {hidden}) to match weight {tuple(weight.shape)}, "
            f"got {tuple(input.shape)}"
        )
    if bias is not None and bias.shape != (n_classes,):
        raise ValueError(f"bias must have shape ({n_classes},), got {tuple(bias.shape)}")
    check_class_weight("ce_weight", ce_weight, n_classes)
    check_same_device(input=input, weight=weight, target=target, bias=bias, ce_weight=ce_weight)
    opts = CrossEntropyOptions(
        ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale
    )
    check_options(opts, reduction)
    _check_num_items(num_items_in_batch, reduction)
    if accum_dtype not in (None, torch.float32, weight.dtype):
        raise ValueError(f"accum_dtype must be None or torch.float32, got {accum_dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n_rows = input.numel() // hidden
    check_target(target, n_rows, n_classes, ignore_index)

    if torch.is_autocast_enabled(input.device.type):
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        bias_dtype = bias.dtype if bias is not None else None
        raise TypeError(
            f"input ({input.dtype}), weight ({weight.dtype}) and bias ({bias_dtype}) must have "
            "one dtype (or run under autocast)"
        )

    if _library.compiling() and n_rows:  # one graph node under torch.compile
        loss, z_loss, accuracy = _compiled_fused_linear_cross_entropy(
            input, weight, target, bias, ce_weight, opts, reduction, num_items_in_batch, chunk_size,
            accum_dtype, return_token_accuracy,
        )
        return loss_outputs(loss, z_loss, accuracy if return_token_accuracy else None, return_z_loss)
    if n_rows == 0 or not use_triton(input, weight, target, bias, ce_weight):
        return fused_linear_cross_entropy_reference(
            input, weight, target, bias, ce_weight, ignore_index, label_smoothing,
            lse_square_scale, softcap, logit_scale, reduction, return_z_loss, num_items_in_batch,
            return_token_accuracy,
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items = num_items_in_batch.reshape(()).to(device=input.device, dtype=torch.float32)
    elif num_items_in_batch is not None:
        num_items = torch.full((), float(num_items_in_batch), device=input.device)
    else:
        num_items = None
    plan = _Plan(
        opts,
        chunk_size or chunk_rows(n_rows, n_classes, input.element_size()),
        accum_dtype or weight.dtype,
    )
    loss, z_loss, accuracy = FusedLinearCrossEntropyFunction.apply(
        input, weight, bias, target, ce_weight, plan, reduction, num_items, return_token_accuracy
    )
    return loss_outputs(loss, z_loss, accuracy, return_z_loss)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _compiled_fused_linear_cross_entropy(
    input, weight, target, bias, ce_weight, opts, reduction, num_items_in_batch, chunk_size, accum_dtype,
    compute_accuracy,
):
    """(loss, z_loss, accuracy or a placeholder) through the custom op; gradients are computed in
    the forward where asked for."""
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items = num_items_in_batch.reshape(()).to(device=input.device, dtype=torch.float32)
    elif num_items_in_batch is not None:
        num_items = torch.full((), float(num_items_in_batch), device=input.device)
    else:
        num_items = None
    # reduction="none" needs the per-row grad_output: its gradients are computed in backward.
    grads = torch.is_grad_enabled() and reduction != "none"
    needs = [grads and t is not None and t.requires_grad for t in (input, weight, bias)]
    softcap = None if opts.softcap is None else float(opts.softcap)
    loss, z_loss, *_, accuracy = _fused_linear_cross_entropy_op(
        input, weight, bias, target, ce_weight, num_items, None, opts.ignore_index,
        float(opts.label_smoothing), float(opts.lse_square_scale), softcap, float(opts.logit_scale),
        reduction, chunk_size, accum_dtype == torch.float32, *needs, compute_accuracy,
    )
    return loss, z_loss, accuracy


def _fused_linear_cross_entropy_fake(x, weight, bias, target, ce_weight, num_items, row_scale, ignore_index,
                                     label_smoothing, lse_square_scale, softcap, logit_scale, reduction,
                                     chunk_size, accum_fp32, need_dx, need_dw, need_db, compute_accuracy):
    loss_shape = x.shape[:-1] if reduction == "none" else ()
    dw_dtype = torch.float32 if accum_fp32 else weight.dtype
    return (
        x.new_empty(loss_shape, dtype=torch.float32),
        x.new_empty(loss_shape, dtype=torch.float32),
        _library.fake_grad(x, need_dx),
        weight.new_empty(weight.shape, dtype=dw_dtype) if need_dw else _library.absent(x),
        weight.new_empty(weight.shape[0], dtype=torch.float32) if need_db else _library.absent(x),
        x.new_empty((), dtype=torch.float32) if compute_accuracy else _library.absent(x),
    )


@_library.custom_op("fused_linear_cross_entropy", _fused_linear_cross_entropy_fake)
def _fused_linear_cross_entropy_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    ce_weight: Optional[torch.Tensor],
    num_items: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    logit_scale: float,
    reduction: str,
    chunk_size: Optional[int],
    accum_fp32: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    compute_accuracy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z_loss, dx, dweight, dbias, accuracy): the gradients asked for (placeholders
    otherwise) for a unit grad_output, or with `row_scale` (reduction="none") for that per-row
    grad_output; the token accuracy if asked for. dweight is fp32 with accum_fp32, dbias always fp32."""
    needs = (need_dx, need_dw, need_db)
    accuracy = _library.absent(x)
    if not use_triton(x, weight, target, bias, ce_weight):
        def loss_fn(x, w, b=None):
            return fused_linear_cross_entropy_reference(
                x, w, target, b, ce_weight, ignore_index, label_smoothing, lse_square_scale, softcap,
                logit_scale, reduction, True, num_items, compute_accuracy,
            )

        primals = (x, weight) if bias is None else (x, weight, bias)
        if any(needs):
            outputs, grads = _library.reference_value_and_grads(loss_fn, primals, row_scale)
            dx, dw, db = (*grads, None)[:3]
            dw = dw.to(torch.float32 if accum_fp32 else weight.dtype)
            db = db.float() if db is not None else None
        else:
            outputs, dx, dw, db = loss_fn(*primals), None, None, None
        loss, z_loss = outputs[:2]
        if compute_accuracy:
            accuracy = outputs[2]
    else:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        target = target.reshape(-1).contiguous()
        ce_weight = ce_weight.float().contiguous() if ce_weight is not None else None
        if reduction == "mean":
            denoms = mean_denominators(target, ce_weight, ignore_index)
        else:
            denoms = (num_items, num_items) if num_items is not None else None
        opts = CrossEntropyOptions(ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale)
        rows = chunk_size or chunk_rows(x2.shape[0], weight.shape[0], x.element_size())
        plan = _Plan(opts, rows, torch.float32 if accum_fp32 else weight.dtype)
        acc_rows = new_output((x2.shape[0],), torch.float32, x.device) if compute_accuracy else None
        loss_rows, z_rows, dx, dw, db = _chunked_pass(
            x2, weight.contiguous(), bias, target, ce_weight, plan, needs, denoms, row_scale, acc_rows
        )
        loss, z_loss = reduce_loss(loss_rows, z_rows, reduction, denoms, x.shape[:-1], torch.float32)
        if compute_accuracy:
            accuracy = reduce_accuracy(acc_rows, target, ignore_index)
    return (
        loss,
        z_loss,
        dx.view(x.shape) if need_dx else _library.absent(x),
        dw if need_dw else _library.absent(x),
        db if need_db else _library.absent(x),
        accuracy,
    )


def _fused_linear_cross_entropy_setup(ctx, inputs, output):
    x, weight, bias, target, ce_weight, num_items, _, *ctx.params = inputs
    ctx.reduction = ctx.params[5]
    ctx.dtypes = x.dtype, weight.dtype, bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(*output[1:])
    if ctx.reduction == "none":  # recomputed in backward with the per-row grad_output
        ctx.save_for_backward(x, weight, bias, target, ce_weight, num_items)
    else:
        ctx.save_for_backward(*output[2:5])


def _fused_linear_cross_entropy_grad(ctx, dloss, *_):
    needs = ctx.needs_input_grad[:3]
    if ctx.reduction == "none":
        row_scale = dloss.reshape(-1).float().contiguous()
        _, _, *grads, _ = _fused_linear_cross_entropy_op(
            *ctx.saved_tensors, row_scale, *ctx.params[:-4], *needs, False
        )
    else:
        grads = [g.float() * dloss.float() if need else None for g, need in zip(ctx.saved_tensors, needs)]
    grads = [g.to(dtype) if g is not None and need else None
             for g, dtype, need in zip(grads, ctx.dtypes, needs)]
    return (*grads,) + (None,) * 16


_fused_linear_cross_entropy_op.register_autograd(
    _fused_linear_cross_entropy_grad, setup_context=_fused_linear_cross_entropy_setup
)
