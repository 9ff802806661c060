"""AdamW step in one pass: the same numbers as torch.optim.AdamW's default (foreach) step.

torch's foreach AdamW runs eight list operations per step, each reading and writing whole tensors and
rounding its result to the parameter's dtype (bf16 states round after every one of them):
    p  = p * (1 - lr * wd)                          _foreach_mul_
    m  = lerp(m, g, 1 - beta1)                      _foreach_lerp_
    v  = v * beta2;  v = v + (1 - beta2) * (g * g)  _foreach_mul_, _foreach_addcmul_
    d  = sqrt(v);  d = d / sqrt(1 - beta2^t);  d = d + eps          a new list, then div_, add_
    p  = p + (-lr / (1 - beta1^t)) * (m / d)        _foreach_addcdiv_
This kernel does the same arithmetic in the same order, in fp32, with the same rounding after each
step (round-to-nearest-even to the parameter dtype, IEEE division and square root), reading p, g, m,
v once and writing p, m, v once: 14 bytes per bf16 parameter instead of 42, and no temporary list
of the parameters' size. One launch per tensor: the tensors' addresses are kernel arguments, which
Triton specializes on their 16-byte alignment, so loads are vectorized (a first version found each
tensor's address in a table read by the kernel: its loads could not be proven aligned and it ran
at 11% of the copy bandwidth on an H100, docs/bench/adamw_h100_run1; this one: 84% in bf16, 96% in
fp32, docs/bench/adamw_h100_run2).

Exactness: torch's CUDA kernels contract each `a + b * c` to one fused multiply-add (nvcc's default);
this kernel writes those as `tl.fma` and leaves no other product feeding a sum (see the kernel). The
torch reference below (the specification, used by the CPU tests) evaluates each fma in float64 and
rounds to fp32, as the interpreter's fma rounds once. The GPU tests compare bitwise with torch.optim.AdamW.

Memory: updates p, m and v in place (they are the optimizer's own state); reads g.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from liger_kernels._utils import INTERPRET


# Elements per program and warps, as timed inside the e2e training step (scripts/adamw_e2e_sweep.py,
# H200, docs/e2e/h200_run1/adamw_sweep.json): 1024 x 4 warps 7.65 ms per step against 10.33 ms for the
# 4096 x 8 chosen from the step alone; 2048 x 8: 7.86, 2048 x 4: 8.52, 4096 x 4: 11.19, 8192 x 16: 11.09.
_BLOCK = 1024
_NUM_WARPS = 4
ADAMW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, ROUND_BY_BITS: tl.constexpr):
    """x (fp32) rounded to the nearest DTYPE value (ties to even), kept in fp32: what torch's
    `static_cast<DTYPE>(float)` stores. On the GPU the conversion instruction rounds so; the
    interpreter's fp32 -> bf16 conversion truncates, so there (ROUND_BY_BITS) bf16 rounds by bit
    arithmetic, the same values at ~6 integer operations per rounding: on the GPU those made the bf16
    step compute-bound (seven roundings per element). NaN stays NaN."""
    if DTYPE == tl.float32:
        return x
    elif DTYPE == tl.bfloat16 and ROUND_BY_BITS:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
        return tl.where(x != x, x, u.to(tl.float32, bitcast=True))
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n,
                  decay, lerp_weight, beta2, one_minus_beta2, bias_correction2_sqrt, eps, step_size,
                  APPLY_DECAY: tl.constexpr, SMALL_LERP_WEIGHT: tl.constexpr, ROUND_BY_BITS: tl.constexpr,
                  BLOCK: tl.constexpr):
    DTYPE = p_ptr.dtype.element_ty  # of p, g, m and v alike (checked by adamw_step_ / optim.AdamW._fused_plan)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=1.0).to(tl.float32)

    # Every `a + b * c` of torch's kernels (nvcc contracts them) is an explicit fma here, and no other
    # product feeds an addition: the compiler then has no contraction left to choose, also in fp32,
    # where no rounding step sits between the operations (p * decay + step_size * q could otherwise
    # become fma(p, decay, ...), which torch, rounding p * decay first, never computes).
    if APPLY_DECAY:
        p = _round_to(p * decay, DTYPE, ROUND_BY_BITS)
    # torch's lerp: the form with the smaller weight, for accuracy (ATen Lerp.h)
    if SMALL_LERP_WEIGHT:
        m = _round_to(tl.fma(lerp_weight, g - m, m), DTYPE, ROUND_BY_BITS)
    else:
        m = _round_to(tl.fma(m - g, 1.0 - lerp_weight, g), DTYPE, ROUND_BY_BITS)
    v = _round_to(v * beta2, DTYPE, ROUND_BY_BITS)
    v = _round_to(tl.fma(one_minus_beta2, g * g, v), DTYPE, ROUND_BY_BITS)
    d = _round_to(tl.math.sqrt_rn(v), DTYPE, ROUND_BY_BITS)
    d = _round_to(tl.math.div_rn(d, bias_correction2_sqrt), DTYPE, ROUND_BY_BITS)
    d = _round_to(d + eps, DTYPE, ROUND_BY_BITS)
    p = _round_to(tl.fma(step_size, tl.math.div_rn(m, d), p), DTYPE, ROUND_BY_BITS)

    tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], *, step: float, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float) -> None:
    """One AdamW step of torch.optim.AdamW (decoupled weight decay, no amsgrad/maximize), in place,
    over tensors of one dtype and device that share the step count `step` (after its increment).
    All tensors contiguous, each state the size of its parameter."""
    if not params:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in ADAMW_DTYPES:
        raise TypeError(f"AdamW kernel: parameters have dtype {dtype}; supported: {ADAMW_DTYPES}")
    for name, tensors in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs),
                          ("exp_avg_sqs", exp_avg_sqs)):
        if len(tensors) != len(params):
            raise ValueError(f"AdamW kernel: {len(tensors)} {name} for {len(params)} params")
        for t, p in zip(tensors, params):
            if t.dtype != dtype or t.device != device or t.numel() != p.numel() or not t.is_contiguous():
                raise ValueError(
                    f"AdamW kernel: every one of {name} must be contiguous, of the parameters' dtype "
                    f"({dtype}), device ({device}) and size; got {t.dtype}, {t.device}, shape "
                    f"{tuple(t.shape)} for a parameter of shape {tuple(p.shape)}")
    launch_adamw_(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay)


def launch_adamw_(params, grads, exp_avgs, exp_avg_sqs, *, step: float, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    """adamw_step_ without its checks, for callers that have made them (liger_kernels.optim.AdamW checks
    every tensor once per step already): a launch per tensor then costs only Triton's launch, which on
    the GPU must keep ahead of kernels as short as ~10 us (a 1024 x 2048 bf16 projection's step)."""
    if not params:
        return
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    lerp_weight = 1 - beta1
    scalars = (1 - lr * weight_decay, lerp_weight, beta2, 1 - beta2, bias_correction2**0.5, eps,
               (lr / bias_correction1) * -1)
    constants = dict(APPLY_DECAY=weight_decay != 0, SMALL_LERP_WEIGHT=abs(lerp_weight) < 0.5,
                     ROUND_BY_BITS=INTERPRET, BLOCK=_BLOCK,
                     num_warps=_NUM_WARPS)
    device = params[0].device  # Triton launches on the current GPU (see _utils.on_input_device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            n = p.numel()
            if n == 0:
                continue
            _adamw_kernel[(triton.cdiv(n, _BLOCK),)](p, g, m, v, n, *scalars, **constants)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c in float64 (the product of fp32 values is exact there), then rounded to fp32: a fused
    multiply-add but for rare double-rounding ties, far too rare to meet in the tests' sizes."""
    return (a.double() * b.double() + c.double()).float()


def adamw_step_reference_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                          exp_avg_sq: torch.Tensor, *, step: float, lr: float, beta1: float, beta2: float,
                          eps: float, weight_decay: float) -> None:
    """The specification: torch's foreach AdamW step on one tensor, op by op, each in fp32 (scalars
    rounded to fp32) and rounded to the parameter dtype. Fused multiply-adds, square root and division
    go through float64 and one rounding to fp32: correctly rounded, as on CUDA (torch's vectorized CPU
    fp32 sqrt is not: ~1 ulp)."""
    dtype = param.dtype

    def f32(x: float) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32)

    p, g, m, v = param.float(), grad.float(), exp_avg.float(), exp_avg_sq.float()
    if weight_decay != 0:
        p = (p * f32(1 - lr * weight_decay)).to(dtype).float()
    w = f32(1 - beta1)
    if abs(1 - beta1) < 0.5:
        m = _fma(w, g - m, m).to(dtype).float()
    else:
        m = _fma(m - g, 1 - w, g).to(dtype).float()
    v = (v * f32(beta2)).to(dtype).float()
    v = _fma(f32(1 - beta2), g * g, v).to(dtype).float()
    d = v.double().sqrt().float().to(dtype).float()
    d = (d.double() / f32((1 - beta2**step) ** 0.5).double()).float().to(dtype).float()
    d = (d + f32(eps)).to(dtype).float()
    p = _fma(f32((lr / (1 - beta1**step)) * -1), (m.double() / d.double()).float(), p).to(dtype)
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
