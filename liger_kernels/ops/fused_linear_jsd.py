"""Fused linear + generalized JSD (distillation): the divergence between the student's and the
teacher's token distributions without ever materializing their (N, V) logits.

Semantics (the specification is `fused_linear_jsd_reference`): for student rows x_s (N, Hs) with
head W_s (V, Hs) and teacher rows x_t (N, Ht) with head W_t (V, Ht),

    log Q = log_softmax(x_s @ W_s.T / temperature)      student
    log P = log_softmax(x_t @ W_t.T / temperature)      teacher
    loss  = jsd(log Q, log P, label, beta, ignore_index)

with `jsd` exactly as liger_kernels/ops/jsd.py defines it (beta = 0: KL(P || Q), beta = 1: KL(Q || P),
else beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q), averaged over the rows
whose label is not ignore_index (every row without labels; 0 when all are ignored). The teacher gets
no gradient. The loss is float32 whatever the input dtype (as fused_linear_cross_entropy's).

Algorithm (forward pass, which also computes the student's gradients):
    for each chunk of rows:
        s = x_s[c] @ W_s.T, t = x_t[c] @ W_t.T        cuBLAS, into two reused (chunk, V) buffers
        row kernel: per-row divergence, and d loss / d s written over s (in place), already divided
                    by the count of rows (a device scalar, no host sync)
        dX_s[c] = g @ W_s                              cuBLAS, into the preallocated dX rows
        dW_s   += g.T @ x_s[c]                         as fused_linear_cross_entropy accumulates dW
The backward multiplies the stored gradients by grad_output (skipped on device when it is 1).

Row kernel (one program per row, the vocabulary in blocks): pass 1, online max and sum of exponentials
of both rows (the two log-sum-exps); pass 2, the divergence and S = sum_j dD/dx_j, where x = log Q
and dD/dx is jsd.py's gradient in the log-probabilities; pass 3, the gradient in the logits through
the log-softmax: d loss / d s_j = (dD/dx_j - Q_j S) / temperature. For beta = 0, S = -1 exactly
(dD/dx = -P sums to -1), so pass 2 is skipped and pass 3 also sums the divergence:
d loss / d s = (Q - P) / temperature. Math in fp32; the gradient is stored in the student's dtype.

Memory beyond the inputs: dX_s + dW_s + the two logits buffers of about `CHUNK_BYTES` together
(fused_linear_cross_entropy's chunk size). `accum_dtype=torch.float32` accumulates dW_s in fp32.
Under autocast the four inputs are cast to the autocast dtype first, as F.linear would be.
Under torch.compile the op is one graph node (`torch.ops.liger.fused_linear_jsd`, see _library.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import (
    check_float,
    check_same_device,
    new_output,
    row_launch_config,
    use_triton,
    on_input_device,
)
from liger_kernels.ops.cross_entropy import scale_
from liger_kernels.ops.fused_linear_cross_entropy import _accumulate_grad_weight, chunk_rows
from liger_kernels.ops.jsd import jsd_reference

# Widest vocabulary block one loop iteration holds in registers (two rows' worth of fp32 values).
# The tests lower it to exercise the multi-block loops on small vocabularies.
_MAX_BLOCK = 2048
# Values of the kernel's constexpr MODE.
_FORWARD_KL, _REVERSE_KL, _MIXTURE = 0, 1, 2


@triton.jit
def _log_probs(s_row, t_row, offs, mask, lse_s, lse_t, inv_temp):
    """Student and teacher log-probabilities (fp32) of one block (0 where masked off)."""
    s = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
    return s * inv_temp - lse_s, t * inv_temp - lse_t


@triton.jit
def _mixture_terms(x, y, beta, log_beta, log_one_minus_beta):
    """(divergence term, dD/dx) of the mixture mode: beta P (y - log M) + (1 - beta) Q (x - log M)
    and (1 - beta) Q (x - log M), log M a two-term log-sum-exp (finite when both underflow)."""
    a = y + log_beta
    b = x + log_one_minus_beta
    hi = tl.maximum(a, b)
    log_m = hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))
    dx = (1.0 - beta) * tl.exp(x) * (x - log_m)
    return beta * tl.exp(y) * (y - log_m) + dx, dx


@triton.jit
def _fused_linear_jsd_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    label_ptr,
    loss_ptr,
    count_ptr,
    n_cols,
    ignore_index,
    inv_temp,
    beta,
    log_beta,
    log_one_minus_beta,
    MODE: tl.constexpr,
    HAS_LABEL: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Divergence of one row (un-normalized) and, with HAS_GRAD, d loss / d s written over s (the
    student logits), divided by the row count. Every block of s is read before it is overwritten."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    cols = tl.arange(0, BLOCK)
    ignored = False
    if HAS_LABEL:
        ignored = tl.load(label_ptr + row) == ignore_index
    if ignored:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            zeros = tl.zeros([BLOCK], dtype=s_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                tl.store(s_row + start + cols, zeros, mask=start + cols < n_cols)
    else:
        # Pass 1: online max / sum of exponentials of both rows (temperature-scaled logits).
        m_s = float("-inf")
        d_s = 0.0
        m_t = float("-inf")
        d_t = 0.0
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            t = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            m_s_new = tl.maximum(m_s, tl.max(s, axis=0))
            m_t_new = tl.maximum(m_t, tl.max(t, axis=0))
            d_s = d_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new), axis=0)
            d_t = d_t * tl.exp(m_t - m_t_new) + tl.sum(tl.exp(t - m_t_new), axis=0)
            m_s = m_s_new
            m_t = m_t_new
        lse_s = m_s + tl.log(d_s)
        lse_t = m_t + tl.log(d_t)

        # Pass 2: the divergence and S = sum_j dD/dx_j (known to be -1 for the forward KL).
        loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
        dx_sum = -1.0
        if MODE != 0:
            dx_acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                mask = offs < n_cols
                x, y = _log_probs(s_row, t_row, offs, mask, lse_s, lse_t, inv_temp)
                if MODE == 1:
                    q = tl.exp(x)
                    term = q * (x - y)
                    dx = term + q
                else:
                    term, dx = _mixture_terms(x, y, beta, log_beta, log_one_minus_beta)
                loss_acc += tl.where(mask, term, 0.0)
                dx_acc += tl.where(mask, dx, 0.0)
            dx_sum = tl.sum(dx_acc, axis=0)

        # Pass 3: d loss / d s = (dD/dx - Q S) / temperature / count (forward KL: also the loss).
        if HAS_GRAD or MODE == 0:
            grad_scale = 0.0
            if HAS_GRAD:
                grad_scale = inv_temp / tl.load(count_ptr)
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                mask = offs < n_cols
                x, y = _log_probs(s_row, t_row, offs, mask, lse_s, lse_t, inv_temp)
                q = tl.exp(x)
                if MODE == 0:
                    p = tl.exp(y)
                    loss_acc += tl.where(mask, p * (y - x), 0.0)
                    g = q - p
                elif MODE == 1:
                    g = q * (x - y + 1.0) - q * dx_sum
                else:
                    g = _mixture_terms(x, y, beta, log_beta, log_one_minus_beta)[1] - q * dx_sum
                if HAS_GRAD:
                    tl.store(s_row + offs, (g * grad_scale).to(s_ptr.dtype.element_ty), mask=mask)
        tl.store(loss_ptr + row, tl.sum(loss_acc, axis=0))


@dataclass(frozen=True)
class _Plan:
    beta: float
    ignore_index: int
    temperature: float
    rows: int  # rows per chunk
    accum_dtype: torch.dtype  # of the weight gradient


def _mode(beta: float) -> int:
    return _FORWARD_KL if beta == 0.0 else _REVERSE_KL if beta == 1.0 else _MIXTURE


def _launch(s, t, label, loss_rows, count, plan: _Plan, need_grad: bool) -> None:
    """The row kernel on one chunk: s, t (rows, V) with unit column stride; s receives the gradient."""
    n_rows, n_cols = s.shape
    block, num_warps = row_launch_config(min(n_cols, _MAX_BLOCK))
    mode = _mode(plan.beta)
    log_beta, log_one_minus_beta = (
        (math.log(plan.beta), math.log1p(-plan.beta)) if mode == _MIXTURE else (0.0, 0.0)
    )
    _fused_linear_jsd_kernel[(n_rows,)](
        s,
        s.stride(0),
        t,
        t.stride(0),
        label if label is not None else loss_rows,  # loss_rows stands in for the unused pointer
        loss_rows,
        count,
        n_cols,
        plan.ignore_index,
        1.0 / plan.temperature,
        float(plan.beta),
        log_beta,
        log_one_minus_beta,
        MODE=mode,
        HAS_LABEL=label is not None,
        HAS_GRAD=need_grad,
        BLOCK=block,
        num_warps=num_warps,
    )


def _chunked_pass(xs, ws, xt, wt, label, count, plan: _Plan, need_dx: bool, need_dw: bool):
    """Per-row divergences (fp32) and, as asked, the student's dX and dW, chunk by chunk."""
    n, hs = xs.shape
    v = ws.shape[0]
    device = xs.device
    rows = min(plan.rows, n)
    loss_rows = new_output((n,), torch.float32, device)
    grad_x = new_output((n, hs), xs.dtype, device) if need_dx else None
    grad_w = new_output((v, hs), plan.accum_dtype, device) if need_dw else None
    s_buf = new_output((rows, v), xs.dtype, device)
    t_buf = new_output((rows, v), xt.dtype, device)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        s, t = s_buf[: end - start], t_buf[: end - start]
        torch.mm(xs[start:end], ws.t(), out=s)
        torch.mm(xt[start:end], wt.t(), out=t)
        chunk_label = label[start:end] if label is not None else None
        _launch(s, t, chunk_label, loss_rows[start:end], count, plan, need_dx or need_dw)
        if need_dx:
            torch.mm(s, ws, out=grad_x[start:end])
        if need_dw:
            _accumulate_grad_weight(grad_w, s, xs[start:end], first=start == 0)
    return loss_rows, grad_x, grad_w


def _row_count(label, ignore_index, n_rows, device) -> torch.Tensor:
    """Rows averaged over, as an fp32 device scalar (no host sync); at least 1."""
    if label is None:
        return torch.full((), float(max(n_rows, 1)), dtype=torch.float32, device=device)
    return (label != ignore_index).sum(dtype=torch.float32).clamp_min(1.0)


class FusedLinearJSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, xt, wt, label, plan: _Plan):
        x_shape = xs.shape
        xs = xs.reshape(-1, xs.shape[-1]).contiguous()
        xt = xt.reshape(-1, xt.shape[-1]).contiguous()
        ws, wt = ws.contiguous(), wt.contiguous()
        label = label.reshape(-1).contiguous() if label is not None else None
        count = _row_count(label, plan.ignore_index, xs.shape[0], xs.device)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_rows, grad_x, grad_w = _chunked_pass(xs, ws, xt, wt, label, count, plan, need_dx, need_dw)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.x_shape, ctx.w_dtype = x_shape, ws.dtype
        ctx.used = False
        return loss_rows.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError(
                "fused_linear_jsd's backward scales its saved gradients in place and can run only once"
            )
        ctx.used = True
        grad_x, grad_w = ctx.saved_tensors
        if grad_x is not None:
            grad_x = scale_(grad_x, grad_loss).view(ctx.x_shape)
        if grad_w is not None:
            grad_w = scale_(grad_w, grad_loss).to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None, None


def fused_linear_jsd_reference(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    label: torch.Tensor | None = None,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Torch specification of `fused_linear_jsd`: materialized logits in fp32 (fp64 for fp64
    inputs), log-softmax, then `jsd_reference`; the teacher is detached. Output in float32 (float64
    for float64 inputs). Differentiable by autograd; the CPU path."""
    compute = torch.promote_types(
        torch.promote_types(student_input.dtype, teacher_input.dtype), torch.float32
    )
    n_classes = student_weight.shape[0]
    with torch.autocast(student_input.device.type, enabled=False):
        s = student_input.to(compute) @ student_weight.to(compute).t()
        t = teacher_input.detach().to(compute) @ teacher_weight.detach().to(compute).t()
    x = torch.log_softmax(s.reshape(-1, n_classes) / temperature, dim=-1)
    y = torch.log_softmax(t.reshape(-1, n_classes) / temperature, dim=-1)
    label = label.reshape(-1) if label is not None else None
    return jsd_reference(x, y, label, beta, ignore_index)


def _check_inputs(student_input, student_weight, teacher_input, teacher_weight, label, beta, temperature):
    for name, t in (("student_input", student_input), ("student_weight", student_weight),
                    ("teacher_input", teacher_input), ("teacher_weight", teacher_weight)):
        check_float(name, t)
    for who, x, w in (("student", student_input, student_weight), ("teacher", teacher_input, teacher_weight)):
        if w.dim() != 2 or 0 in w.shape:
            raise ValueError(f"{who}_weight must have non-empty shape (V, H), got {tuple(w.shape)}")
        if x.dim() == 0 or x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"{who}_input must have shape (..., {w.shape[1]}) to match {who}_weight "
                f"{tuple(w.shape)}, got {tuple(x.shape)}"
            )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight has {teacher_weight.shape[0]} classes but student_weight has "
            f"{student_weight.shape[0]}: they must share the vocabulary"
        )
    if teacher_input.shape[:-1] != student_input.shape[:-1]:
        raise ValueError(
            f"teacher_input {tuple(teacher_input.shape)} and student_input {tuple(student_input.shape)} "
            "must hold the same tokens (equal shapes but for the hidden size)"
        )
    if label is not None:
        if not isinstance(label, torch.Tensor):
            raise TypeError(f"label must be a torch.Tensor or None, got {type(label).__name__}")
        if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
            raise TypeError(f"label must be an integer tensor, got {label.dtype}")
        if label.shape != student_input.shape[:-1]:
            raise ValueError(
                f"label has shape {tuple(label.shape)}; expected {tuple(student_input.shape[:-1])} "
                "(student_input's shape without its hidden size)"
            )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_same_device(student_input=student_input, student_weight=student_weight,
                      teacher_input=teacher_input, teacher_weight=teacher_weight, label=label)


@on_input_device
def fused_linear_jsd(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    label: torch.Tensor | None = None,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generalized JSD between softmax(student_input @ student_weight.T / temperature) and the
    teacher's (see the module docstring), averaged over the rows whose label is not ignore_index.

    student_input (..., Hs), student_weight (V, Hs), teacher_input (..., Ht), teacher_weight (V, Ht),
    label (...) or None. Gradients flow to the student's input and weight only. `chunk_size`: rows
    per chunk (None: automatic); `accum_dtype`: None (the weight's dtype) or torch.float32 for the
    weight-gradient accumulation. Returns a float32 scalar.
    """
    _check_inputs(student_input, student_weight, teacher_input, teacher_weight, label, beta, temperature)
    if accum_dtype not in (None, torch.float32, student_weight.dtype):
        raise ValueError(f"accum_dtype must be None or torch.float32, got {accum_dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    device_type = student_input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        student_input, student_weight = student_input.to(dtype), student_weight.to(dtype)
        teacher_input, teacher_weight = teacher_input.to(dtype), teacher_weight.to(dtype)
    for who, x, w in (("student", student_input, student_weight), ("teacher", teacher_input, teacher_weight)):
        if x.dtype != w.dtype:
            raise TypeError(
                f"{who}_input ({x.dtype}) and {who}_weight ({w.dtype}) must have one dtype "
                "(or run under autocast)"
            )
    teacher_input, teacher_weight = teacher_input.detach(), teacher_weight.detach()
    n_rows = student_input.numel() // student_input.shape[-1]
    tensors = (student_input, student_weight, teacher_input, teacher_weight, label)
    if _library.compiling() and n_rows:  # one graph node under torch.compile
        needs = [torch.is_grad_enabled() and t.requires_grad for t in (student_input, student_weight)]
        loss, _, _ = _fused_linear_jsd_op(
            *tensors, float(beta), int(ignore_index), float(temperature), chunk_size,
            accum_dtype == torch.float32, *needs,
        )
        return loss
    if n_rows == 0 or not use_triton(*tensors):
        return fused_linear_jsd_reference(*tensors, beta, ignore_index, temperature)
    # Both logits buffers together take about fused_linear_cross_entropy's chunk of bytes.
    row_bytes = student_input.element_size() + teacher_input.element_size()
    plan = _Plan(
        float(beta),
        int(ignore_index),
        float(temperature),
        chunk_size or chunk_rows(n_rows, student_weight.shape[0], row_bytes),
        accum_dtype or student_weight.dtype,
    )
    return FusedLinearJSDFunction.apply(*tensors, plan)


# ---- torch.library op: what torch.compile records (see liger_kernels/_library.py) -----------------


def _fused_linear_jsd_fake(xs, ws, xt, wt, label, beta, ignore_index, temperature, chunk_size, accum_fp32,
                           need_dx, need_dw):
    dw_dtype = torch.float32 if accum_fp32 else ws.dtype
    return (
        xs.new_empty((), dtype=torch.float32),
        _library.fake_grad(xs, need_dx),
        ws.new_empty(ws.shape, dtype=dw_dtype) if need_dw else _library.absent(xs),
    )


@_library.custom_op("fused_linear_jsd", _fused_linear_jsd_fake)
def _fused_linear_jsd_op(
    xs: torch.Tensor,
    ws: torch.Tensor,
    xt: torch.Tensor,
    wt: torch.Tensor,
    label: Optional[torch.Tensor],
    beta: float,
    ignore_index: int,
    temperature: float,
    chunk_size: Optional[int],
    accum_fp32: bool,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d student_input, d loss / d student_weight) for a unit grad_output; the
    gradients not asked for are placeholders. dweight is fp32 with accum_fp32."""
    dw_dtype = torch.float32 if accum_fp32 else ws.dtype
    dx = dw = None
    if not use_triton(xs, ws, xt, wt, label):
        def loss_fn(a, b):
            return (fused_linear_jsd_reference(a, b, xt, wt, label, beta, ignore_index, temperature),)

        if need_dx or need_dw:
            (loss,), (dx, dw) = _library.reference_value_and_grads(loss_fn, (xs, ws))
            dw = dw.to(dw_dtype)
        else:
            (loss,) = loss_fn(xs, ws)
    else:
        xs2 = xs.reshape(-1, xs.shape[-1]).contiguous()
        label = label.reshape(-1).contiguous() if label is not None else None
        count = _row_count(label, ignore_index, xs2.shape[0], xs.device)
        rows = chunk_size or chunk_rows(xs2.shape[0], ws.shape[0], xs.element_size() + xt.element_size())
        plan = _Plan(beta, ignore_index, temperature, rows, dw_dtype)
        loss_rows, dx, dw = _chunked_pass(
            xs2, ws.contiguous(), xt.reshape(-1, xt.shape[-1]).contiguous(), wt.contiguous(), label,
            count, plan, need_dx, need_dw,
        )
        loss = loss_rows.sum() / count
    return (
        loss,
        dx.view(xs.shape) if need_dx else _library.absent(xs),
        dw if need_dw else _library.absent(xs),
    )


def _fused_linear_jsd_setup(ctx, inputs, output):
    ctx.dtypes = inputs[0].dtype, inputs[1].dtype
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2])


def _fused_linear_jsd_grad(ctx, dloss, _ddx, _ddw):
    grads = [
        (g.float() * dloss.float()).to(dtype) if need else None
        for g, dtype, need in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:2])
    ]
    return (*grads,) + (None,) * 10


_fused_linear_jsd_op.register_autograd(_fused_linear_jsd_grad, setup_context=_fused_linear_jsd_setup)
