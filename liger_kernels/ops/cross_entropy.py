"""Cross-entropy on logits, with the gradient computed in the forward pass.

Semantics (the specification is `cross_entropy_reference`): for logits x (N, V) and targets t (N,),

    z    = softcap * tanh(logit_scale * x / softcap)      (z = logit_scale * x without softcap)
    lse  = logsumexp(z)                                    per row
    ce_i = (1 - eps) * w[t_i] * (lse - z[t_i]) + eps / V * sum_j w[j] * (lse - z[j])
    zl_i = lse_square_scale * lse^2                        (z-loss; never class-weighted)

which is `torch.nn.functional.cross_entropy(z, t, w, ignore_index, reduction, label_smoothing=eps)`
plus a z-loss (w = 1 without class weights). Rows whose target is `ignore_index` contribute nothing.
Reductions:
- "none": ce_i + zl_i per row (0 for ignored rows), shape logits.shape[:-1].
- "sum":  sum_i ce_i + sum_i zl_i.
- "mean": sum_i ce_i / sum_{i not ignored} w[t_i]  +  sum_i zl_i / #{i not ignored}.
  The cross-entropy part normalizes exactly like torch (by the class weight of each counted target);
  the z-loss is a per-token regularizer, so it is averaged over counted rows whatever the weights.
  A zero normalizer counts as 1: when every target is ignored the loss is 0 (torch gives NaN) and
  all gradients are 0.
`return_z_loss=True` returns (loss, z_loss); `loss` already includes `z_loss`, which is reduced the
same way and is for logging only (no gradient flows through it).
`return_token_accuracy=True` appends the token accuracy: the fraction of rows not ignored whose
target's z equals the row max of z (ties count as correct), fp32, no gradient, 0 when all rows
are ignored. The kernel takes it from pass 1's row max (a compare and a store per row).

Kernel: one program per row (or a persistent grid looping over rows, `CE_PROGRAMS_PER_SM`), two
passes over the vocabulary in blocks. Pass 1 computes the running max and sum of exponentials
(online softmax) and, with label smoothing, the (weighted) sum of z. Pass 2 writes d loss / d x of
the row, already divided by the mean normalizer, which is read from device memory (no host sync).
A row (256 KB at V = 128256 in bf16) does not fit on one SM, so the row is read twice; to make the
second read come from L2, pass 2 walks the blocks in reverse order (the blocks read last in pass 1
first) and the loads carry eviction hints (`CE_L2_HINTS`). Minimal HBM traffic is then one read
and one write of the logits; the worst case (no L2 hits) two reads and one write.
On the H200 the old form of this kernel ran at the pace of the SM clock more than of memory (run 2
vs run 1: 11% slower at 14% lower clocks, same copy bandwidth), so the per-element work is kept
small: base-2 logits (one FFMA feeds the exp2 instruction), pass 1 keeps per-lane running max / sum
(lanes of 32 columns reduced within a warp, no block-wide synchronisation until the row's end),
whole blocks load and store without masks, and the target's extra term is one scalar store after
pass 2 instead of a compare per element. The backward
only multiplies the saved gradient by grad_output, and skips even that (inside the kernel, no host
sync) when grad_output is 1 (reduction="none": one fp32 multiply per row).
Target checks: see `check_target` (a device-side assert on CUDA, no host sync).

Memory: the default allocates one gradient buffer the size of the logits. `in_place=True` writes the
gradient into the logits buffer itself (no extra memory); the caller must not use the logits
afterwards. The version counter of the logits is bumped, so an earlier autograd op that saved them
(e.g. a tanh) fails loudly in backward instead of using overwritten values. For non-contiguous
logits `in_place` has no effect (a gradient buffer is allocated). On the CPU path (the torch
reference under autograd) `in_place` has no effect either.
"""

from __future__ import annotations

import functools
import os
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
    num_programs_for_rows,
    row_launch_config,
    use_triton,
    on_input_device,
)

_REDUCTIONS = ("mean", "sum", "none")
# Launch knobs of the row kernel, read at every launch (scripts/flce_sweep.py tries others).
# Widest vocabulary block one loop iteration holds in registers. The tests lower it to exercise
# the multi-block loops on small vocabularies.
_MAX_BLOCK = 16384
# Warps per program; 0: `row_launch_config`'s choice (16 at 16384 columns: ~94 registers on
# sm_90a, one program per SM; run 3: 1.456 ms at 8192 x 128256). 32 warps: ~44 registers.
CE_NUM_WARPS = 0
# Persistent grid: this many programs per SM, each looping over rows; 0: one program per row.
# Fewer rows in flight means fewer bytes between a row's two reads, so more of pass 2 hits L2.
CE_PROGRAMS_PER_SM = 0
# L2 hints: pass 1 loads with evict_last (the row is read again soon), pass 2 loads and the
# gradient stores with evict_first (never read again by this kernel), so that the rows still
# waiting for their second read are the last lines L2 gives up.
CE_L2_HINTS = True
# Software pipelining of the vocabulary loops (`tl.range(num_stages=...)`): 1 = none; 2 keeps the
# next block's loads in flight (through shared memory: BLOCK * element size bytes per stage,
# fewer stages when that passes ~200 KB) while the current block is reduced. With one or two
# programs per SM the loads otherwise pause during the arithmetic of each block.
CE_STAGES = 1
# Elements per iteration of the backward's scale kernel.
_SCALE_BLOCK = 4096
# Checking targets on CUDA with a host sync (clear ValueError) instead of a device-side assert.
_SYNC_TARGET_CHECK = os.environ.get("LIGER_CHECK_TARGETS", "0") == "1"
_LOG2E_F = 1.4426950408889634  # log2(e): the kernel works with base-2 logits
_LN2 = tl.constexpr(0.6931471805599453)  # back to natural units
# Columns per lane in pass 1 (reduced within a warp; the lanes of a block are combined once a row).
_LANE = 32


@dataclass(frozen=True)
class CrossEntropyOptions:
    """Scalar options shared by cross_entropy and fused_linear_cross_entropy."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0


@triton.jit
def _tanh(u):
    # tanh from exp(-2|u|) in (0, 1]: no overflow, exact sign, saturates to +-1.
    e = tl.exp2(tl.abs(u) * -2.8853900817779268)  # 2 * log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _logits2(x, in_scale, out_scale, HAS_SOFTCAP: tl.constexpr):
    """(z * log2(e), tanh factor) for raw fp32 logits x: z2 = x * in_scale, or with softcap
    z2 = out_scale * tanh(x * in_scale) (the tanh is returned for the derivative; else x)."""
    if HAS_SOFTCAP:
        th = _tanh(x * in_scale)
        return out_scale * th, th
    else:
        return x * in_scale, x


@triton.jit
def _stats_block(x_ptrs, w_ptrs, mask, m, d, sum_z, sum_w, in_scale, out_scale,
                 MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, KEEP: tl.constexpr):
    """Online softmax statistics of one block seen as (lanes, LANE) base-2 logits: per-lane running
    max m and sum d of 2^(z2 - m), reduced along the short axis only (within a warp), so the loop
    needs no block-wide synchronisation. With smoothing also per-lane sums of w z2 and w."""
    if MASKED:
        x = tl.load(x_ptrs, mask=mask, other=0.0, eviction_policy=KEEP)
    else:
        x = tl.load(x_ptrs, eviction_policy=KEEP)
    z2, _ = _logits2(x.to(tl.float32), in_scale, out_scale, HAS_SOFTCAP)
    if MASKED:
        z2 = tl.where(mask, z2, float("-inf"))
    m_new = tl.maximum(m, tl.max(z2, axis=1))
    # A lane with nothing but -inf so far keeps m = -inf: exponentiate against 0 there, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp2(m - m_safe) + tl.sum(tl.exp2(z2 - m_safe[:, None]), axis=1)
    if HAS_SMOOTHING:
        if MASKED:
            z2 = tl.where(mask, z2, 0.0)
        if HAS_WEIGHT:
            if MASKED:
                w = tl.load(w_ptrs, mask=mask, other=0.0)
            else:
                w = tl.load(w_ptrs)
            sum_z += tl.sum(w * z2, axis=1)
            sum_w += tl.sum(w, axis=1)
        else:
            sum_z += tl.sum(z2, axis=1)
    return m_new, d, sum_z, sum_w


@triton.jit
def _grad_values(x, w, lse2, coef_p, coef_s, in_scale, out_scale, HAS_SOFTCAP: tl.constexpr,
                 HAS_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """(coef_p 2^(z2 - lse2) - coef_s w) dz/dx for raw fp32 logits x: d loss / d x except the
    target's term; the coefficients are already times logit_scale (dz/dx without softcap)."""
    z2, th = _logits2(x, in_scale, out_scale, HAS_SOFTCAP)
    g = coef_p * tl.exp2(z2 - lse2)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            g -= coef_s * w
        else:
            g -= coef_s
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    return g


@triton.jit
def _grad_block(x_ptrs, g_ptrs, w_ptrs, mask, lse2, coef_p, coef_s, in_scale, out_scale,
                MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, STREAM: tl.constexpr):
    """Write `_grad_values` of one block (the target's column is fixed after the pass)."""
    if MASKED:
        x = tl.load(x_ptrs, mask=mask, other=0.0, eviction_policy=STREAM)
    else:
        x = tl.load(x_ptrs, eviction_policy=STREAM)
    w = 1.0
    if HAS_SMOOTHING and HAS_WEIGHT:
        if MASKED:
            w = tl.load(w_ptrs, mask=mask, other=0.0)
        else:
            w = tl.load(w_ptrs)
    g = _grad_values(x.to(tl.float32), w, lse2, coef_p, coef_s, in_scale, out_scale, HAS_SOFTCAP,
                     HAS_SMOOTHING, HAS_WEIGHT)
    g = g.to(g_ptrs.dtype.element_ty)
    if MASKED:
        tl.store(g_ptrs, g, mask=mask, eviction_policy=STREAM)
    else:
        tl.store(g_ptrs, g, eviction_policy=STREAM)


@triton.jit
def _cross_entropy_kernel(
    x_ptr,
    x_stride,
    grad_ptr,
    grad_stride,
    target_ptr,
    weight_ptr,
    loss_ptr,
    z_loss_ptr,
    acc_ptr,
    ce_denom_ptr,
    z_denom_ptr,
    row_scale_ptr,
    n_rows,
    n_cols,
    ignore_index,
    label_smoothing,
    lse_square_scale,
    logit_scale,
    in_scale,
    out_scale,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DENOM: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    LANE: tl.constexpr,
    KEEP: tl.constexpr,
    STREAM: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Loss of each row (un-normalized) and, with HAS_GRAD, d loss / d x of the row (normalized).

    Works on base-2 logits z2 = z log2(e) (exp2 is the hardware instruction; in_scale / out_scale
    carry logit_scale, softcap and log2(e), see `launch_cross_entropy`). Whole blocks run without
    masks; the last, partial block with them. Rows are strided over the programs (one row per
    program when the grid has n_rows programs).
    KEEP / STREAM: eviction policies of the first-pass loads / second-pass loads and stores.
    STAGES > 1: the compiler prefetches the next blocks (through shared memory) while the current
    one is reduced, so that loads stay in flight during the arithmetic.
    grad_ptr may equal x_ptr (in place): every element is read before the program writes it.
    HAS_ACC: also store 1.0 per row whose target's logit equals the row max (ties count as correct),
    else 0.0 (ignored rows 0), from pass 1's max: no extra pass.
    """
    cols = tl.arange(0, BLOCK)
    # Pass 1 sees a block as (BLOCK // LANE, LANE): lanes of LANE consecutive columns.
    cols2 = tl.arange(0, BLOCK // LANE)[:, None] * LANE + tl.arange(0, LANE)[None, :]
    n_full = n_cols // BLOCK * BLOCK  # columns in whole blocks
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)  # (the interpreter's loop variable is a Python int)
        x_row = x_ptr + row64 * x_stride
        grad_row = grad_ptr + row64 * grad_stride
        t = tl.load(target_ptr + row)
        if t == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            if HAS_Z:
                tl.store(z_loss_ptr + row, 0.0)
            if HAS_ACC:
                tl.store(acc_ptr + row, 0.0)
            if HAS_GRAD:
                zeros = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
                for start in range(0, n_cols, BLOCK):
                    tl.store(grad_row + start + cols, zeros, mask=start + cols < n_cols,
                             eviction_policy=STREAM)
        else:
            # Pass 1: per-lane online max / sum of 2^z2 (with smoothing: sums of w z2 and w).
            m = tl.full([BLOCK // LANE], float("-inf"), tl.float32)
            d = tl.zeros([BLOCK // LANE], tl.float32)
            sum_z = tl.zeros([BLOCK // LANE], tl.float32)
            sum_w = tl.zeros([BLOCK // LANE], tl.float32)
            for start in tl.range(0, n_full, BLOCK, num_stages=STAGES):
                m, d, sum_z, sum_w = _stats_block(
                    x_row + start + cols2, weight_ptr + start + cols2, None, m, d, sum_z, sum_w,
                    in_scale, out_scale, False, HAS_SOFTCAP, HAS_SMOOTHING, HAS_WEIGHT, KEEP,
                )
            if n_full < n_cols:
                m, d, sum_z, sum_w = _stats_block(
                    x_row + n_full + cols2, weight_ptr + n_full + cols2, n_full + cols2 < n_cols,
                    m, d, sum_z, sum_w, in_scale, out_scale, True, HAS_SOFTCAP, HAS_SMOOTHING,
                    HAS_WEIGHT, KEEP,
                )
            m_row = tl.max(m, axis=0)
            lse2 = m_row + tl.log2(tl.sum(d * tl.exp2(m - m_row), axis=0))
            lse = lse2 * _LN2

            # The target's logit, read before pass 2 may overwrite it (in place).
            t_col = tl.where((t >= 0) & (t < n_cols), t, 0).to(tl.int32)
            x_t = tl.load(x_row + t_col).to(tl.float32)
            z2_t = _logits2(x_t, in_scale, out_scale, HAS_SOFTCAP)[0]
            z_t = z2_t * _LN2
            if HAS_ACC:
                # Same fp32 math as pass 1 on the same element, so equal to m_row iff it is a max.
                tl.store(acc_ptr + row, tl.where(z2_t >= m_row, 1.0, 0.0))
            w_t = 1.0
            if HAS_WEIGHT:
                w_t = tl.load(weight_ptr + t_col)
            # Smoothing term eps / V * sum_j w_j (lse - z_j) = smooth_coef * lse - eps / V * sum_z.
            eps_over_v = label_smoothing / n_cols
            smooth_coef = label_smoothing  # eps / V * sum_j w_j, with w = 1
            if HAS_WEIGHT:
                smooth_coef = eps_over_v * tl.sum(sum_w, axis=0)
            loss = w_t * (lse - z_t)
            if HAS_SMOOTHING:
                sum_z_row = tl.sum(sum_z, axis=0) * _LN2
                loss = (1.0 - label_smoothing) * loss + smooth_coef * lse - eps_over_v * sum_z_row
            tl.store(loss_ptr + row, loss)
            if HAS_Z:
                tl.store(z_loss_ptr + row, lse_square_scale * lse * lse)

            if HAS_GRAD:
                ce_scale = 1.0
                z_scale = 1.0
                if HAS_DENOM:
                    ce_scale = 1.0 / tl.load(ce_denom_ptr)
                    z_scale = 1.0 / tl.load(z_denom_ptr)
                if HAS_ROW_SCALE:
                    row_scale = tl.load(row_scale_ptr + row).to(tl.float32)
                    ce_scale = ce_scale * row_scale
                    z_scale = z_scale * row_scale
                # d loss / d z_j = p_coef * p_j - c_smooth * w_j - [j == t] * c_target
                c_target = ce_scale * w_t
                p_coef = c_target
                c_smooth = 0.0
                if HAS_SMOOTHING:
                    c_target = c_target * (1.0 - label_smoothing)
                    c_smooth = ce_scale * eps_over_v
                    p_coef = c_target + ce_scale * smooth_coef
                if HAS_Z:
                    p_coef += z_scale * 2.0 * lse_square_scale * lse
                # dz/dx = logit_scale (times 1 - tanh^2 with softcap, in _grad_block)
                coef_p = p_coef * logit_scale
                coef_s = c_smooth * logit_scale
                coef_t = c_target * logit_scale
                # Pass 2, last block first (it is the most recently read, likeliest still in L2).
                if n_full < n_cols:
                    offs = n_full + cols
                    _grad_block(
                        x_row + offs, grad_row + offs, weight_ptr + offs, offs < n_cols, lse2, coef_p,
                        coef_s, in_scale, out_scale, True, HAS_SOFTCAP, HAS_SMOOTHING, HAS_WEIGHT,
                        STREAM,
                    )
                for i in tl.range(0, n_full // BLOCK, num_stages=STAGES):
                    offs = n_full - (i + 1) * BLOCK + cols
                    _grad_block(
                        x_row + offs, grad_row + offs, weight_ptr + offs, None, lse2, coef_p, coef_s,
                        in_scale, out_scale, False, HAS_SOFTCAP, HAS_SMOOTHING, HAS_WEIGHT, STREAM,
                    )
                # The target's column gets its extra -coef_t dz/dx here, not in the loop: one
                # scalar store, ordered after the block stores of every thread by the barrier.
                g_t = _grad_values(x_t, w_t, lse2, coef_p, coef_s, in_scale, out_scale, HAS_SOFTCAP,
                                   HAS_SMOOTHING, HAS_WEIGHT)
                dz_t = 1.0
                if HAS_SOFTCAP:
                    th_t = _logits2(x_t, in_scale, out_scale, HAS_SOFTCAP)[1]
                    dz_t = 1.0 - th_t * th_t
                tl.debug_barrier()
                tl.store(grad_row + t_col, (g_t - coef_t * dz_t).to(grad_ptr.dtype.element_ty))


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """x *= scale in place (fp32 math); does nothing when scale == 1, so no host check is needed."""
    s = tl.load(scale_ptr).to(tl.float32)
    if s != 1.0:
        cols = tl.arange(0, BLOCK)
        first = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(first, n, step):
            offs = start + cols
            mask = offs < n
            v = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            tl.store(x_ptr + offs, (v * s).to(x_ptr.dtype.element_ty), mask=mask)


def scale_(t: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Multiply a contiguous gradient in place by grad_output (1 element); free when that is 1."""
    if t.numel():
        n_blocks = triton.cdiv(t.numel(), _SCALE_BLOCK)
        grid = (num_programs_for_rows(n_blocks, t.device),)
        _scale_kernel[grid](t, grad_output.reshape(()), t.numel(), BLOCK=_SCALE_BLOCK, num_warps=8)
    return t


def check_target(target: torch.Tensor, n_rows: int, n_classes: int, ignore_index: int) -> None:
    """Type/shape checks, then every target is ignore_index or in [0, n_classes).

    On CPU (reference and interpreter) the range check is a cheap host-side ValueError. On CUDA it
    would need a device->host sync per call, so by default it is a device-side assert
    (`torch._assert_async`): no sync, and a bad target stops the process with a CUDA error naming
    the problem. Set LIGER_CHECK_TARGETS=1 to get the synchronous ValueError on CUDA (debugging).
    Under torch.compile it is the device-side assert on every device (a host check would break the
    graph); on CPU a bad target then raises RuntimeError naming the problem.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if target.numel() != n_rows:
        raise ValueError(
            f"target has {target.numel()} elements (shape {tuple(target.shape)}) but there are "
            f"{n_rows} rows of logits"
        )
    if n_rows == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    message = f"target values must be in [0, {n_classes}) or equal ignore_index={ignore_index}"
    if (target.is_cuda and not _SYNC_TARGET_CHECK) or _library.compiling():
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        raise ValueError(f"{message}; got {target[bad].flatten()[:5].tolist()}")


def check_options(opts: CrossEntropyOptions, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
    if not 0.0 <= opts.label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {opts.label_smoothing}")
    if opts.softcap is not None and not opts.softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {opts.softcap}")
    if opts.lse_square_scale < 0:
        raise ValueError(f"lse_square_scale must be >= 0, got {opts.lse_square_scale}")


def check_class_weight(name: str, weight: torch.Tensor | None, n_classes: int) -> None:
    if weight is None:
        return
    check_float(name, weight)
    if weight.shape != (n_classes,):
        raise ValueError(f"{name} must have shape ({n_classes},), got {tuple(weight.shape)}")


def mean_denominators(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int):
    """Device scalars (fp32) dividing the summed cross-entropy and z-loss for reduction="mean".

    Cross-entropy: sum of weight[target] over counted rows (their count without weights), as torch.
    Z-loss: count of counted rows. Zero becomes 1 (all ignored -> loss 0, not NaN). No host sync.
    """
    valid = target != ignore_index
    count = valid.sum(dtype=torch.float32)
    z_denom = torch.where(count == 0, 1.0, count)
    if weight is None:
        return z_denom, z_denom
    w_sum = (weight.float()[torch.where(valid, target, 0)] * valid).sum()
    return torch.where(w_sum == 0, 1.0, w_sum), z_denom


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_cross_entropy(
    x: torch.Tensor,
    grad: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    loss_rows: torch.Tensor,
    z_rows: torch.Tensor | None,
    denoms: tuple[torch.Tensor, torch.Tensor] | None,
    row_scale: torch.Tensor | None,
    opts: CrossEntropyOptions,
    acc_rows: torch.Tensor | None = None,
) -> None:
    """Run the row kernel on x (rows with unit column stride). grad may be x itself (in place).
    acc_rows (fp32, one per row): filled with 1.0 where the target is an argmax (see the kernel)."""
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    block, num_warps = row_launch_config(min(n_cols, _MAX_BLOCK))
    num_warps = CE_NUM_WARPS or num_warps
    n_programs = n_rows
    if CE_PROGRAMS_PER_SM:
        n_programs = min(n_rows, CE_PROGRAMS_PER_SM * _sm_count(x.device))
    keep, stream = ("evict_last", "evict_first") if CE_L2_HINTS else ("", "")
    # Base-2 logits z2 = log2(e) z: x * in_scale, or with softcap out_scale * tanh(x * in_scale).
    if opts.softcap is None:
        in_scale, out_scale = float(opts.logit_scale) * _LOG2E_F, 1.0
    else:
        in_scale = float(opts.logit_scale) / float(opts.softcap)
        out_scale = float(opts.softcap) * _LOG2E_F
    # Each pipeline stage buffers a block of logits (and of fp32 class weights when smoothing
    # reads them) in shared memory: fewer stages rather than a launch failure past ~200 KB.
    stage_bytes = block * (x.element_size() + (4 if weight is not None and opts.label_smoothing else 0))
    stages = CE_STAGES
    while stages > 1 and stages * stage_bytes > 200 * 1024:
        stages -= 1
    dummy = loss_rows  # pointer for arguments a constexpr flag disables
    _cross_entropy_kernel[(n_programs,)](
        x,
        x.stride(0),
        grad if grad is not None else dummy,
        grad.stride(0) if grad is not None else 0,
        target,
        weight if weight is not None else dummy,
        loss_rows,
        z_rows if z_rows is not None else dummy,
        acc_rows if acc_rows is not None else dummy,
        denoms[0] if denoms is not None else dummy,
        denoms[1] if denoms is not None else dummy,
        row_scale if row_scale is not None else dummy,
        n_rows,
        n_cols,
        opts.ignore_index,
        float(opts.label_smoothing),
        float(opts.lse_square_scale),
        float(opts.logit_scale),
        in_scale,
        out_scale,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=opts.label_smoothing > 0,
        HAS_Z=z_rows is not None,
        HAS_SOFTCAP=opts.softcap is not None,
        HAS_DENOM=denoms is not None,
        HAS_ROW_SCALE=row_scale is not None,
        HAS_GRAD=grad is not None,
        HAS_ACC=acc_rows is not None,
        BLOCK=block,
        LANE=min(block, _LANE),
        KEEP=keep,
        STREAM=stream,
        STAGES=stages,
        num_warps=num_warps,
    )


def reduce_accuracy(acc_rows, target, ignore_index):
    """Token accuracy from the kernel's per-row 0/1 values: their sum over the count of rows not
    ignored (fp32 scalar, 0 when every row is ignored; no host sync)."""
    count = (target.reshape(-1) != ignore_index).sum(dtype=torch.float32)
    return acc_rows.sum() / count.clamp_min(1.0)


def reduce_loss(loss_rows, z_rows, reduction, denoms, out_shape, dtype):
    """(loss, z_loss) from the per-row fp32 terms: loss includes z_loss; both in `dtype`."""
    if reduction == "none":
        # Shaped before the add: the loss is then a new tensor, not a view (autograd Functions return it,
        # and a view made inside one could not be modified in place). z_loss has no gradient: a view is fine.
        loss_rows = loss_rows.view(out_shape)
        z = z_rows.view(out_shape) if z_rows is not None else torch.zeros_like(loss_rows)
        return (loss_rows + z).to(dtype), z.to(dtype)
    ce = loss_rows.sum()
    z = z_rows.sum() if z_rows is not None else torch.zeros_like(ce)
    if denoms is not None:
        ce, z = ce / denoms[0], z / denoms[1]
    return (ce + z).to(dtype), z.to(dtype)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, opts: CrossEntropyOptions, reduction: str, in_place,
                with_accuracy: bool):
        n_cols = logits.shape[-1]
        x = logits.reshape(-1, n_cols)
        if x.stride(-1) != 1:
            x = x.contiguous()
        target = target.reshape(-1).contiguous()
        weight = weight.float().contiguous() if weight is not None else None
        n_rows = x.shape[0]
        denoms = None
        if reduction == "mean":
            denoms = mean_denominators(target, weight, opts.ignore_index)

        grad = saved = None
        if ctx.needs_input_grad[0]:
            if in_place and logits.is_contiguous():
                # Save the logits themselves, not the view x (autograd forbids saving a view made
                # here once its base's version is bumped).
                grad, saved = x, logits
                torch.autograd.graph.increment_version(logits)
            else:
                grad = saved = new_output((n_rows, n_cols), x.dtype, x.device)
        loss_rows = new_output((n_rows,), torch.float32, x.device)
        z_rows = new_output((n_rows,), torch.float32, x.device) if opts.lse_square_scale else None
        acc_rows = new_output((n_rows,), torch.float32, x.device) if with_accuracy else None
        launch_cross_entropy(x, grad, target, weight, loss_rows, z_rows, denoms, None, opts, acc_rows)

        loss, z_loss = reduce_loss(
            loss_rows, z_rows, reduction, denoms, logits.shape[:-1], logits.dtype
        )
        accuracy = reduce_accuracy(acc_rows, target, opts.ignore_index) if with_accuracy else None
        # One call: each call replaces the set of non-differentiable outputs.
        ctx.mark_non_differentiable(*(t for t in (z_loss, accuracy) if t is not None))
        ctx.save_for_backward(saved)
        ctx.reduction = reduction
        ctx.logits_shape = logits.shape
        ctx.used = False
        return loss, z_loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss, grad_accuracy):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None, None
        if ctx.used:
            raise RuntimeError(
                "cross_entropy's backward scales its saved gradient in place and can run only once"
            )
        ctx.used = True
        if ctx.reduction == "none":
            # Per-row grad_output: fp32 math, result written back into the saved gradient.
            rows = grad.view(-1, ctx.logits_shape[-1])
            torch.mul(rows, grad_loss.reshape(-1, 1).float(), out=rows)
        else:
            scale_(grad, grad_loss)
        return grad.view(ctx.logits_shape), None, None, None, None, None, None


def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
):
    """Torch specification of `cross_entropy` (see the module docstring); fp32 math (fp64 for fp64
    inputs), outputs in the logits dtype (the accuracy in fp32). Differentiable by autograd; used as
    the CPU path."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    n_cols = logits.shape[-1]
    z = logits.reshape(-1, n_cols).to(compute) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    target = target.reshape(-1)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    if weight is not None:
        w = weight.to(compute)
    else:
        w = torch.ones(n_cols, dtype=compute, device=z.device)
    w_t = w[safe_target]
    ce = -w_t * logp.gather(1, safe_target[:, None]).squeeze(1)
    if label_smoothing > 0:
        smooth = -(logp * w).sum(-1)
        ce = (1 - label_smoothing) * ce + label_smoothing / n_cols * smooth
    zero = torch.zeros((), dtype=compute, device=z.device)
    ce = torch.where(valid, ce, zero)
    zl = torch.where(valid, lse_square_scale * lse * lse, zero)
    if reduction == "none":
        loss, z_loss = (ce + zl).view(logits.shape[:-1]), zl.view(logits.shape[:-1])
    elif reduction == "sum":
        loss, z_loss = ce.sum() + zl.sum(), zl.sum()
    else:
        count = valid.sum().to(compute)
        w_sum = (w_t * valid).sum() if weight is not None else count
        ce_mean = ce.sum() / torch.where(w_sum == 0, 1.0, w_sum)
        z_loss = zl.sum() / torch.where(count == 0, 1.0, count)
        loss = ce_mean + z_loss
    loss, z_loss = loss.to(logits.dtype), z_loss.detach().to(logits.dtype)
    accuracy = None
    if return_token_accuracy:
        # The target is correct iff its (transformed) logit equals the row max: ties count.
        hit = (z.gather(1, safe_target[:, None]).squeeze(1) >= z.max(-1).values) & valid
        accuracy = (hit.sum() / valid.sum().clamp_min(1)).detach().float()
    return loss_outputs(loss, z_loss, accuracy, return_z_loss)


def loss_outputs(loss, z_loss, accuracy, return_z_loss):
    """What the cross-entropy functions return: loss, then z_loss if asked for, then the accuracy
    if it was computed (not None)."""
    out = (loss, z_loss) if return_z_loss else (loss,)
    if accuracy is not None:
        out = out + (accuracy,)
    return out if len(out) > 1 else loss


@on_input_device
def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    return_z_loss: bool = False,
    in_place: bool = False,
    return_token_accuracy: bool = False,
):
    """Cross-entropy of (optionally soft-capped and scaled) logits (..., V) against class indices.

    See the module docstring for the exact formula, the reductions and the memory behaviour.
    `logit_scale` multiplies the logits before the softcap (Granite: 1 / logits_scaling).
    `in_place=True` overwrites `logits` with its gradient during the forward pass.
    `return_token_accuracy=True` also returns the fraction of rows not ignored whose target has the
    largest transformed logit z (ties count as correct): an fp32 scalar without gradient (0 when
    every row is ignored), computed by the loss kernel's first pass (no extra pass over the logits).
    Returns loss, (loss, z_loss) with `return_z_loss=True`, (loss, accuracy) with
    `return_token_accuracy=True`, (loss, z_loss, accuracy) with both.
    """
    check_float("logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    n_cols = logits.shape[-1]
    n_rows = logits.numel() // n_cols
    opts = CrossEntropyOptions(
        ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale
    )
    check_options(opts, reduction)
    check_class_weight("weight", weight, n_cols)
    check_same_device(logits=logits, target=target, weight=weight)
    check_target(target, n_rows, n_cols, ignore_index)
    if _library.compiling() and n_rows:  # one graph node under torch.compile (in_place does not apply)
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, z_loss, _, accuracy = _cross_entropy_op(
            logits, target, weight, ignore_index, float(label_smoothing), float(lse_square_scale),
            None if softcap is None else float(softcap), float(logit_scale), reduction, compute_grad,
            return_token_accuracy,
        )
        return loss_outputs(loss, z_loss, accuracy if return_token_accuracy else None, return_z_loss)
    if n_rows == 0 or not use_triton(logits, target, weight):
        return cross_entropy_reference(
            logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap,
            logit_scale, reduction, return_z_loss, return_token_accuracy,
        )
    loss, z_loss, accuracy = CrossEntropyFunction.apply(
        logits, target, weight, opts, reduction, in_place, return_token_accuracy
    )
    return loss_outputs(loss, z_loss, accuracy, return_z_loss)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _cross_entropy_fake(logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap,
                        logit_scale, reduction, compute_grad, compute_accuracy):
    loss_shape = logits.shape[:-1] if reduction == "none" else ()
    n_cols = logits.shape[-1]
    grad = logits.new_empty((logits.numel() // n_cols, n_cols)) if compute_grad else _library.absent(logits)
    accuracy = logits.new_empty((), dtype=torch.float32) if compute_accuracy else _library.absent(logits)
    return logits.new_empty(loss_shape), logits.new_empty(loss_shape), grad, accuracy


@_library.custom_op("cross_entropy", _cross_entropy_fake)
def _cross_entropy_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    logit_scale: float,
    reduction: str,
    compute_grad: bool,
    compute_accuracy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z_loss, d loss / d logits as (rows, V) or a placeholder, token accuracy or a
    placeholder), the gradient for a unit grad_output; with reduction="none" row i holds the
    gradient of loss i."""
    opts = CrossEntropyOptions(ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale)
    n_cols = logits.shape[-1]
    if not use_triton(logits, target, weight):
        loss_fn = functools.partial(
            cross_entropy_reference, target=target, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
            logit_scale=logit_scale, reduction=reduction, return_z_loss=True,
            return_token_accuracy=compute_accuracy,
        )
        if not compute_grad:
            outputs, grad = loss_fn(logits), _library.absent(logits)
        else:
            outputs, (grad,) = _library.reference_value_and_grads(loss_fn, (logits,))
            grad = grad.reshape(-1, n_cols)
        accuracy = outputs[2] if compute_accuracy else _library.absent(logits)
        return outputs[0], outputs[1], grad, accuracy
    x = logits.reshape(-1, n_cols)
    if x.stride(-1) != 1:
        x = x.contiguous()
    target = target.reshape(-1).contiguous()
    weight = weight.float().contiguous() if weight is not None else None
    denoms = mean_denominators(target, weight, ignore_index) if reduction == "mean" else None
    grad = new_output(x.shape, x.dtype, x.device) if compute_grad else None
    loss_rows = new_output((x.shape[0],), torch.float32, x.device)
    z_rows = new_output((x.shape[0],), torch.float32, x.device) if lse_square_scale else None
    acc_rows = new_output((x.shape[0],), torch.float32, x.device) if compute_accuracy else None
    launch_cross_entropy(x, grad, target, weight, loss_rows, z_rows, denoms, None, opts, acc_rows)
    loss, z_loss = reduce_loss(loss_rows, z_rows, reduction, denoms, logits.shape[:-1], logits.dtype)
    accuracy = _library.absent(logits)
    if compute_accuracy:
        accuracy = reduce_accuracy(acc_rows, target, ignore_index)
    return loss, z_loss, grad if compute_grad else _library.absent(logits), accuracy


def _cross_entropy_setup(ctx, inputs, output):
    ctx.logits_shape, ctx.reduction = inputs[0].shape, inputs[8]
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    ctx.save_for_backward(output[2])


def _cross_entropy_grad(ctx, dloss, _dz_loss, _dgrad, _daccuracy):
    (grad,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 11
    scale = dloss.reshape(-1, 1) if ctx.reduction == "none" else dloss
    dlogits = (grad.float() * scale.float()).to(grad.dtype)
    return (dlogits.view(ctx.logits_shape),) + (None,) * 10


_cross_entropy_op.register_autograd(_cross_entropy_grad, setup_context=_cross_entropy_setup)
