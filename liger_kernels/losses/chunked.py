"""The shared engine of every fused-linear loss: final linear layer + loss, a chunk of rows at a time.

Given hidden states ``(N, T, H)``, the ``lm_head`` weight ``(V, H)`` and optional bias, the engine walks
over groups of rows (sequences, pairs of sequences, or single tokens). For each group it

1. computes the group's logits with one matmul (``(n*T, V)``, the only vocab-sized buffer),
2. reduces them to what the loss needs, in fp32:
   - ``"logprob"`` mode (preference, KTO, GRPO): per-token log-probabilities of the targets at
     temperature ``t`` (log-softmax gather), plus per-token statistics for logging (entropy, mean logit,
     whether the target is the argmax). The loss is a function of the per-token log-probabilities only,
     so its gradient w.r.t. the logits is ``g * (onehot(target) - softmax(z)) / t`` where ``g`` is the
     gradient w.r.t. the log-probability, obtained with autograd on the small ``(n, T)`` tensor.
   - ``"logits"`` mode (distillation): the loss sees the fp32 logits themselves (and the teacher's);
     autograd on the chunk gives the logits gradient.
3. writes the logits gradient over the logits buffer (in place: nobody else sees it), then
   ``grad_input`` rows (written once per group), ``grad_weight`` and ``grad_bias`` (accumulated across
   groups in preallocated buffers).

All of this happens inside the forward of one ``torch.autograd.Function``; its backward only scales
the stored gradients by ``grad_output``. The loss of each group is its contribution to the total, so
losses normalized by a global quantity (a mean over all pairs, over all tokens) take that quantity as
a constant computed before the walk: the chunked loss equals the unchunked one up to float rounding.

Reference models (DPO, KTO, GRPO) and teachers (distillation) are projected the same way, chunk by chunk,
without gradients.

On CUDA (or under ``TRITON_INTERPRET=1``) two Triton kernels do the vocab-wide passes of the logprob
mode: one program per row (a few rows for narrow vocabularies) for the log-sum-exp and the statistics
(one read of the logits), and a 2-D grid for the in-place gradient (one read, one write). Elsewhere
``row_stats_reference`` and ``logprob_grad_reference`` do the same with torch ops: the specification.

Precision: matmuls in the compute dtype (the inputs' dtype, or the autocast dtype), every softmax-side
quantity in fp32, ``grad_bias`` accumulated in fp32, ``grad_weight`` accumulated in ``accum_dtype``:
the weight's dtype by default, as the fused linear cross-entropy does (each chunk's product is summed in
fp32 inside the matmul and rounded once per chunk; chunks are large, a few pairs or sequences, so there
are few roundings), or ``torch.float32`` for one rounding at the end at the cost of a ``V * H * 4``-byte
buffer (2 GiB for a 128k x 4096 head: more than the rest of the loss together).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from liger_kernels._utils import check_float, check_same_device, new_output, on_input_device, use_triton
from liger_kernels.ops.cross_entropy import scale_

# Elements (rows * vocab) of one group's logits buffer when the caller gives no chunk size: 2^28
# elements is 512 MiB in bf16, enough for one pair of 1024-token sequences over a 128k vocabulary.
DEFAULT_CHUNK_ELEMENTS = 1 << 28
# Rows * vocab of the fp32 temporaries of the torch reference path (memory, not speed).
_REFERENCE_BLOCK_ELEMENTS = 1 << 22
_STATS_BLOCK = 4096
_GRAD_BLOCK = 2048
# `torch.addmm(..., out_dtype=torch.float32)` from bf16/fp16 operands (CUDA only, torch >= 2.8).
_HAS_MM_OUT_DTYPE = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 8)


# ----------------------------------------------------------------------------------------------------
# Vocab-wide passes of the logprob mode: Triton kernels and their torch reference
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _row_stats_kernel(
    x_ptr,
    x_stride,
    target_ptr,
    lse_ptr,
    logp_ptr,
    entropy_ptr,
    mean_ptr,
    top1_ptr,
    n_rows,
    n_cols,
    inv_t,
    WITH_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """BLOCK_M rows of logits x, in one sweep over the columns: z = x * inv_t; lse = logsumexp(z);
    logp = z[target] - lse; and with WITH_STATS the entropy of softmax(z), mean(z) and whether the
    target is the (first) argmax of z. Wide vocabularies use BLOCK_M = 1; narrow ones pack rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride
    target = tl.load(target_ptr + rows, mask=row_mask, other=0)
    z_target = tl.load(x_rows + target[:, None], mask=row_mask[:, None], other=0.0)
    z_target = tl.sum(z_target, axis=1).to(tl.float32) * inv_t
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    ez = tl.zeros((BLOCK_M,), tl.float32)  # sum of exp(z - m) * z, rescaled with m like s
    z_sum = tl.zeros((BLOCK_M,), tl.float32)
    # a tie with an earlier column makes argmax pick that column
    max_before_target = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        z = tl.load(x_rows + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        new_m = tl.maximum(m, tl.max(z, axis=1))
        new_m = tl.where(row_mask, new_m, 0.0)  # rows past the end: keep the arithmetic finite
        scale = tl.exp(m - new_m)
        e = tl.exp(z - new_m[:, None])
        s = s * scale + tl.sum(e, axis=1)
        if WITH_STATS:
            z0 = tl.where(mask, z, 0.0)
            ez = ez * scale + tl.sum(e * z0, axis=1)
            z_sum += tl.sum(z0, axis=1)
            before = tl.where(cols[None, :] < target[:, None], z, float("-inf"))
            max_before_target = tl.maximum(max_before_target, tl.max(before, axis=1))
        m = new_m
    s = tl.where(row_mask, s, 1.0)
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, z_target - lse, mask=row_mask)
    if WITH_STATS:
        tl.store(entropy_ptr + rows, lse - ez / s, mask=row_mask)
        tl.store(mean_ptr + rows, z_sum / n_cols, mask=row_mask)
        is_top1 = (z_target >= m) & (z_target > max_before_target)
        tl.store(top1_ptr + rows, is_top1.to(tl.int8), mask=row_mask)


@triton.jit
def _logprob_grad_kernel(
    x_ptr, x_stride, target_ptr, lse_ptr, g_ptr, n_rows, n_cols, inv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """In place: x[row] <- g * (onehot(target) - softmax(x * inv_t)) * inv_t, the gradient of
    g * logp[target] w.r.t. the logits x (g = 0 on ignored rows gives zeros)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * x_stride + cols[None, :]
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)[:, None]
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)[:, None]
    target = tl.load(target_ptr + rows, mask=row_mask, other=0)[:, None]
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * inv_t
    p = tl.exp(z - lse)
    grad = (tl.where(cols[None, :] == target, g, 0.0) - g * p) * inv_t
    tl.store(ptrs, grad.to(x_ptr.dtype.element_ty), mask=mask)


def row_stats_reference(logits: torch.Tensor, target: torch.Tensor, inv_t: float, with_stats: bool):
    """Torch specification of `_row_stats_kernel`. `logits` (M, V), `target` (M,) valid column indices.

    Returns (lse, logp, entropy, mean_logit, is_top1), fp32 (bool for is_top1); the last three are
    None without `with_stats`. Works in row blocks so the fp32 temporaries stay small.
    """
    rows, vocab = logits.shape
    outs = [torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(4)]
    lse, logp, entropy, mean = outs
    top1 = torch.empty(rows, dtype=torch.bool, device=logits.device)
    step = max(1, _REFERENCE_BLOCK_ELEMENTS // vocab)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        z = logits[r0:r1].float() * inv_t
        block_lse = torch.logsumexp(z, dim=-1)
        lse[r0:r1] = block_lse
        logp[r0:r1] = z.gather(1, target[r0:r1, None]).squeeze(1) - block_lse
        if with_stats:
            p = torch.exp(z - block_lse[:, None])
            entropy[r0:r1] = block_lse - (p * z).sum(-1)
            mean[r0:r1] = z.mean(-1)
            top1[r0:r1] = z.argmax(-1) == target[r0:r1]  # argmax returns the first maximum
    if not with_stats:
        return lse, logp, None, None, None
    return lse, logp, entropy, mean, top1


def logprob_grad_reference(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, inv_t: float
) -> None:
    """Torch specification of `_logprob_grad_kernel`: overwrite `logits` with the logits gradient."""
    rows, vocab = logits.shape
    step = max(1, _REFERENCE_BLOCK_ELEMENTS // vocab)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        z = logits[r0:r1].float() * inv_t
        grad = torch.exp(z - lse[r0:r1, None]).mul_(-g[r0:r1, None])
        grad.scatter_add_(1, target[r0:r1, None], g[r0:r1, None])
        logits[r0:r1] = grad.mul_(inv_t)


def _tile(vocab: int, max_cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): up to `max_cols` columns per step; rows packed until a tile has that many."""
    block_n = min(max_cols, triton.next_power_of_2(vocab))
    return max(1, min(64, max_cols // block_n)), block_n


def _row_stats(logits, target, inv_t, with_stats):
    if not use_triton(logits):
        return row_stats_reference(logits, target, inv_t, with_stats)
    rows, vocab = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    lse, logp = torch.empty(rows, **f32), torch.empty(rows, **f32)
    entropy = mean = top1 = None
    if with_stats:
        entropy, mean = torch.empty(rows, **f32), torch.empty(rows, **f32)
        top1 = torch.empty(rows, dtype=torch.int8, device=logits.device)
    block_m, block_n = _tile(vocab, _STATS_BLOCK)
    _row_stats_kernel[(triton.cdiv(rows, block_m),)](
        logits, logits.stride(0), target, lse, logp,
        entropy if with_stats else lse, mean if with_stats else lse, top1 if with_stats else lse,
        rows, vocab, inv_t, WITH_STATS=with_stats, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8,
    )  # fmt: skip
    return lse, logp, entropy, mean, (top1.bool() if with_stats else None)


def _logprob_grad_(logits, target, lse, g, inv_t):
    if not use_triton(logits):
        return logprob_grad_reference(logits, target, lse, g, inv_t)
    rows, vocab = logits.shape
    block_m, block_n = _tile(vocab, _GRAD_BLOCK)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(vocab, block_n))
    _logprob_grad_kernel[grid](
        logits, logits.stride(0), target, lse, g, rows, vocab, inv_t,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Row groups
# ----------------------------------------------------------------------------------------------------


def auto_chunk_size(rows_per_unit: int, tokens_per_row: int, vocab: int) -> int:
    """Units (pairs, sequences, tokens) per group so that a group's logits hold about
    `DEFAULT_CHUNK_ELEMENTS` elements (at least one unit)."""
    per_unit = max(1, rows_per_unit * tokens_per_row * vocab)
    return max(1, DEFAULT_CHUNK_ELEMENTS // per_unit)


def row_groups(n_rows: int, chunk_size: int, device) -> list[torch.Tensor]:
    """Consecutive rows, `chunk_size` at a time."""
    return [
        torch.arange(s, min(s + chunk_size, n_rows), device=device)
        for s in range(0, n_rows, chunk_size)
    ]


def pair_groups(n_pairs: int, chunk_size: int, device) -> list[torch.Tensor]:
    """Rows of `chunk_size` pairs at a time, for a batch laid out as [chosen..., rejected...] (TRL's
    concatenation): each group holds its chosen rows first, then the matching rejected rows."""
    groups = []
    for s in range(0, n_pairs, chunk_size):
        chosen = torch.arange(s, min(s + chunk_size, n_pairs), device=device)
        groups.append(torch.cat([chosen, chosen + n_pairs]))
    return groups


# ----------------------------------------------------------------------------------------------------
# The walk over groups
# ----------------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """What a loss function sees of one group of rows.

    rows: (n,) indices of the group's rows in the batch.
    mask: (n, T) bool, valid (non-ignored) target positions.
    ref_logps: (n, T) fp32 reference log-probabilities (0 where ignored), or None.
    data: per-row tensors given to the engine (`row_data`), sliced to the group.
    target: (n*T,) targets with ignored positions set to 0 (logits mode).
    teacher_logits: (n*T, V) fp32 teacher logits, no grad (logits mode), or None.
    """

    rows: torch.Tensor
    mask: torch.Tensor
    ref_logps: torch.Tensor | None = None
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    target: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None


@dataclass
class Head:
    """A projection: hidden (N, T, H), weight (V, H), optional bias (V,)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class _Plan:
    target: torch.Tensor
    loss_fn: Callable | None
    groups: list[torch.Tensor]
    mode: str
    inv_t: float
    ignore_index: int
    ref: Head | None
    teacher: Head | None
    row_data: dict[str, torch.Tensor]
    with_stats: bool
    accum_dtype: torch.dtype
    # (input, ref, teacher) matmul dtypes, fixed before the walk disables autocast
    compute_dtypes: tuple
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, what: str) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"{what} hidden states are {hidden.dtype} but its weight is {weight.dtype}; "
            "cast one of them (or run under torch.autocast)"
        )
    return hidden.dtype


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor):
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, rounding only once into acc's dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _HAS_MM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _cast_head(head: Head | None, dtype):
    """The head's weight and bias in the matmul dtype, cast once per call (not per chunk)."""
    if head is None:
        return None, None
    return head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)


def _walk(hidden, weight, bias, plan: _Plan, need_grad: tuple[bool, bool, bool]):
    """Runs every group; returns (loss, grad_input, grad_weight, grad_bias) (grads None unless needed)
    and fills `plan.outputs`."""
    n_rows, seq_len, hid = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    cdt, ref_cdt, teacher_cdt = plan.compute_dtypes
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    ref_w, ref_b = _cast_head(plan.ref, ref_cdt)
    teacher_w, teacher_b = _cast_head(plan.teacher, teacher_cdt)
    any_grad = any(need_grad)

    grad_input = new_output(hidden.shape, hidden.dtype, device) if need_grad[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=plan.accum_dtype, device=device) if need_grad[1] else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_grad[2] else None

    out = plan.outputs
    if plan.mode == "logprob":
        f32 = dict(dtype=torch.float32, device=device)
        out["logps"] = torch.zeros(n_rows, seq_len, **f32)
        if plan.ref is not None:
            out["ref_logps"] = torch.zeros(n_rows, seq_len, **f32)
        if plan.with_stats:
            out["entropy"] = torch.zeros(n_rows, seq_len, **f32)
            out["mean_logits"] = torch.zeros(n_rows, seq_len, **f32)
            out["is_top1"] = torch.zeros(n_rows, seq_len, dtype=torch.bool, device=device)

    # The one vocab-sized buffer: each group's logits, then (in place) their gradient.
    max_rows = max(g.numel() for g in plan.groups) * seq_len
    buf = torch.empty(max_rows, vocab, dtype=cdt, device=device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for rows in plan.groups:
        n = rows.numel()
        m = n * seq_len
        target = plan.target.index_select(0, rows).reshape(m)
        valid = target != plan.ignore_index
        safe_target = torch.where(valid, target, 0)
        chunk = Chunk(
            rows=rows,
            mask=valid.view(n, seq_len),
            data={k: v.index_select(0, rows) for k, v in plan.row_data.items()},
        )
        if plan.ref is not None:  # before the policy's logits, so it can borrow their buffer
            with torch.no_grad():
                ref_h = plan.ref.hidden.index_select(0, rows).reshape(m, -1).to(ref_cdt)
                ref_buf = buf[:m] if ref_cdt == cdt else torch.empty(m, vocab, dtype=ref_cdt, device=device)
                _, ref_logp, *_ = _row_stats(_project(ref_h, ref_w, ref_b, ref_buf), safe_target, plan.inv_t, False)
                chunk.ref_logps = torch.where(valid, ref_logp, 0.0).view(n, seq_len)
                out["ref_logps"][rows] = chunk.ref_logps
        h = hidden.index_select(0, rows).reshape(m, hid).to(cdt)
        logits = _project(h, w, b, buf[:m])

        if plan.mode == "logprob":
            lse, logp, entropy, mean, top1 = _row_stats(logits, safe_target, plan.inv_t, plan.with_stats)
            logp = torch.where(valid, logp, 0.0).view(n, seq_len)
            out["logps"][rows] = logp
            if plan.with_stats:
                out["entropy"][rows] = entropy.view(n, seq_len)
                out["mean_logits"][rows] = mean.view(n, seq_len)
                out["is_top1"][rows] = (top1 & valid).view(n, seq_len)  # False where ignored
            if plan.loss_fn is None:
                continue
            if any_grad:
                leaf = logp.detach().requires_grad_()
                with torch.enable_grad():
                    loss = plan.loss_fn(leaf, chunk)
                (g,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
                # Ignored positions never contribute, whatever the loss function did with them.
                g = torch.where(valid, g.reshape(m).float(), 0.0).contiguous()
                _logprob_grad_(logits, safe_target, lse, g, plan.inv_t)
            else:
                loss = plan.loss_fn(logp, chunk)
        else:  # logits mode
            chunk.target = safe_target
            if plan.teacher is not None:
                with torch.no_grad():
                    teacher_h = plan.teacher.hidden.index_select(0, rows).reshape(m, -1).to(teacher_cdt)
                    teacher_buf = torch.empty(m, vocab, dtype=teacher_cdt, device=device)
                    chunk.teacher_logits = _project(teacher_h, teacher_w, teacher_b, teacher_buf).float()
            if any_grad:
                leaf = logits.float().requires_grad_()
                with torch.enable_grad():
                    loss = plan.loss_fn(leaf, chunk)
                (g,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
                logits.copy_(g)
                del g, leaf
            else:
                loss = plan.loss_fn(logits.float(), chunk)
            chunk.teacher_logits = None

        total += loss.detach().float()
        if need_grad[0]:
            grad_input.index_copy_(0, rows, torch.mm(logits, w).view(n, seq_len, hid).to(hidden.dtype))
        if need_grad[1]:
            _addmm_into(grad_weight, logits.t(), h)
        if need_grad[2]:
            grad_bias += logits.sum(0, dtype=torch.float32)

    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return total, grad_input, grad_weight, grad_bias


def _unfused(hidden, weight, bias, plan: _Plan):
    """The whole batch as one chunk through plain autograd: materializes the (N, T, V) logits."""
    n_rows, seq_len, _ = hidden.shape
    target = plan.target
    valid = target != plan.ignore_index
    safe_target = torch.where(valid, target, 0)
    chunk = Chunk(rows=torch.arange(n_rows, device=hidden.device), mask=valid, data=plan.row_data)
    logits = F.linear(hidden, weight, bias)
    out = plan.outputs
    if plan.mode == "logits":
        chunk.target = safe_target.reshape(-1)
        if plan.teacher is not None:
            t = plan.teacher
            chunk.teacher_logits = F.linear(t.hidden, t.weight, t.bias).reshape(n_rows * seq_len, -1).float()
        return plan.loss_fn(logits.reshape(n_rows * seq_len, -1).float(), chunk), out
    z = logits.float() * plan.inv_t
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1) * valid
    out["logps"] = logp.detach()
    if plan.ref is not None:
        with torch.no_grad():
            r = plan.ref
            ref_z = F.linear(r.hidden, r.weight, r.bias).float() * plan.inv_t
            ref_logp = torch.log_softmax(ref_z, dim=-1).gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
            chunk.ref_logps = out["ref_logps"] = ref_logp * valid
    if plan.with_stats:
        with torch.no_grad():
            out["entropy"] = -(log_probs.exp() * log_probs).sum(-1)
            out["mean_logits"] = z.mean(-1)
            out["is_top1"] = z.argmax(-1) == target
    loss = plan.loss_fn(logp, chunk) if plan.loss_fn is not None else torch.zeros((), device=hidden.device)
    return loss, out


class _ChunkedFusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan, need_grad):
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_input, grad_weight, grad_bias = _walk(hidden, weight, bias, plan, need_grad)
        ctx.save_for_backward(grad_input, grad_weight, grad_bias)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        # The gradients were made for this call alone and are handed out (scaled in place), so a
        # second backward would rescale tensors autograd already gave away: refused, as the ops do.
        if ctx.used:
            raise RuntimeError(
                "the chunked fused-linear losses compute their gradients in the forward and hand them "
                "out in the first backward, so backward can run only once per forward (run the forward "
                "again instead of backward(retain_graph=True) twice)"
            )
        ctx.used = True
        grads = ctx.saved_tensors
        for g in grads:
            if g is not None:
                _scale_(g, grad_output)
        return *grads, None, None


def _scale_(g: torch.Tensor, grad_output: torch.Tensor) -> None:
    """g *= grad_output in place, in fp32 (a bf16 1/3 would bias every gradient by 0.2%)."""
    if use_triton(g):
        scale_(g, grad_output)  # nothing to do when grad_output is 1, decided on the GPU (no sync)
    elif not torch.equal(grad_output, torch.ones_like(grad_output)):
        g.copy_(g.float() * grad_output.float())


# ----------------------------------------------------------------------------------------------------
# Entry point and input checks
# ----------------------------------------------------------------------------------------------------


def check_head(name: str, hidden, weight, bias, n_rows: int | None = None, seq_len: int | None = None):
    """Checks one projection: hidden (N, T, H), weight (V, H), bias (V,) or None."""
    check_float(f"{name}input", hidden)
    check_float(f"{name}weight", weight)
    if bias is not None:
        check_float(f"{name}bias", bias)
    check_same_device(**{f"{name}input": hidden, f"{name}weight": weight, f"{name}bias": bias})
    if hidden.dim() != 3:
        raise ValueError(f"{name}input must be (batch, seq_len, hidden), got shape {tuple(hidden.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError(f"{name}input has an empty batch (0 sequences): there is no loss to compute")
    if weight.dim() != 2:
        raise ValueError(f"{name}weight must be (vocab, hidden), got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}input has hidden size {hidden.shape[-1]} but {name}weight has {weight.shape[1]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if n_rows is not None and tuple(hidden.shape[:2]) != (n_rows, seq_len):
        raise ValueError(
            f"{name}input has batch/seq shape {tuple(hidden.shape[:2])}, expected {(n_rows, seq_len)}"
        )


def check_target(name: str, target, hidden, vocab: int, ignore_index: int) -> None:
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64/int32 tensor of token ids")
    if tuple(target.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"{name} has shape {tuple(target.shape)} but the input's (batch, seq_len) is {tuple(hidden.shape[:2])}"
        )
    if target.device != hidden.device:
        raise ValueError(f"{name} is on {target.device} but the input is on {hidden.device}")
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"{name} has ids outside [0, {vocab}) that are not ignore_index={ignore_index}"
        )


@on_input_device
def chunked_fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    loss_fn: Callable | None,
    groups: list[torch.Tensor],
    *,
    bias: torch.Tensor | None = None,
    mode: str = "logprob",
    temperature: float = 1.0,
    ignore_index: int = -100,
    ref: Head | None = None,
    teacher: Head | None = None,
    row_data: dict[str, torch.Tensor] | None = None,
    with_stats: bool = False,
    accum_dtype: torch.dtype | None = None,
    fused: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Runs `loss_fn` over `groups` of rows (a partition of the batch) and returns (loss, outputs).

    `loss_fn(x, chunk) -> scalar` is the group's contribution to the total loss; `x` is the (n, T) fp32
    per-token log-probabilities (0 where ignored) in "logprob" mode, the (n*T, V) fp32 logits in
    "logits" mode. `loss` is differentiable w.r.t. hidden, weight and bias. `outputs` (detached) holds in
    logprob mode "logps" (N, T), "ref_logps" with `ref`, and with `with_stats` "entropy", "mean_logits"
    (per-token mean over the vocabulary of the temperature-scaled logits) and "is_top1".
    Callers check their inputs (`check_head`, `check_target`) before.

    `fused=False` computes the same loss the plain PyTorch way (`_unfused`): full logits, one
    autograd graph. It is the unfused baseline for benchmarks and a whole-loss reference for tests.
    """
    if mode not in ("logprob", "logits"):
        raise ValueError(f"mode must be 'logprob' or 'logits', got {mode!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if ref is not None:
        ref = Head(ref.hidden.detach(), ref.weight.detach(), None if ref.bias is None else ref.bias.detach())
    if teacher is not None:
        teacher = Head(
            teacher.hidden.detach(),
            teacher.weight.detach(),
            None if teacher.bias is None else teacher.bias.detach(),
        )
    plan = _Plan(
        target=target.long(),
        loss_fn=loss_fn,
        groups=groups,
        mode=mode,
        inv_t=1.0 / temperature,
        ignore_index=ignore_index,
        ref=ref,
        teacher=teacher,
        row_data={k: v.detach() for k, v in (row_data or {}).items()},
        with_stats=with_stats,
        accum_dtype=accum_dtype or weight.dtype,
        compute_dtypes=(
            _compute_dtype(hidden, weight, "input"),
            None if ref is None else _compute_dtype(ref.hidden, ref.weight, "ref"),
            None if teacher is None else _compute_dtype(teacher.hidden, teacher.weight, "teacher"),
        ),
    )
    if not fused:
        return _unfused(hidden, weight, bias, plan)
    grad_on = torch.is_grad_enabled() and loss_fn is not None
    need_grad = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if any(need_grad):
        loss = _ChunkedFusedLinearFunction.apply(hidden, weight, bias, plan, need_grad)
    else:
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            loss, *_ = _walk(hidden, weight, bias, plan, need_grad)
    return loss, plan.outputs


@on_input_device
def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    with_stats: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token log-probabilities of `target` under `hidden @ weight.T + bias` (no gradient), chunked
    over sequences: "logps" (N, T), 0 where ignored, and with `with_stats` the per-token statistics.
    For reference-model and KL-completion passes."""
    check_head("", hidden, weight, bias)
    check_target("target", target, hidden, weight.shape[0], ignore_index)
    n_rows, seq_len = target.shape
    chunk_size = chunk_size or auto_chunk_size(1, seq_len, weight.shape[0])
    with torch.no_grad():
        _, outputs = chunked_fused_linear_loss(
            hidden, weight, target, None, row_groups(n_rows, chunk_size, hidden.device),
            bias=bias, temperature=temperature, ignore_index=ignore_index, with_stats=with_stats,
        )  # fmt: skip
    return outputs


class LossOutput(NamedTuple):
    """What every fused-linear loss returns: the scalar loss (differentiable) and detached metrics."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `mask` (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


class FusedLossModule(torch.nn.Module):
    """Base of the loss modules: options (the functional form's keyword-only arguments that are not
    per-call tensors) are fixed at construction and checked there; tensors are given at call time."""

    # set by subclasses: the functional form, and its keyword-only arguments given per call
    function: Callable
    call_keywords: tuple[str, ...] = ()

    def __init__(self, **options):
        super().__init__()
        params = inspect.signature(type(self).function).parameters
        allowed = {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY} - set(self.call_keywords)
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown options {unknown}; allowed: {sorted(allowed)}")
        self.options = options

    def forward(self, *tensors, **call_tensors) -> LossOutput:
        unknown = sorted(set(call_tensors) - set(self.call_keywords))
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward got unknown arguments {unknown}")
        return type(self).function(*tensors, **call_tensors, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
