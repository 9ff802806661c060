"""Rotary position embedding (Hugging Face rotate-half layout) for q and k in one launch.

Specification (`rope_reference`, Hugging Face's `apply_rotary_pos_emb`):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    q_embed = q * cos + rotate_half(q) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
and the same for k. With h = D/2 and lo/hi the two halves of the last dimension:
    out_lo = x_lo * cos_lo - x_hi * sin_lo
    out_hi = x_hi * cos_hi + x_lo * sin_hi
The backward is the transpose of this linear map:
    dx_lo = dy_lo * cos_lo + dy_hi * sin_hi
    dx_hi = dy_hi * cos_hi - dy_lo * sin_lo
which is the forward map with sin replaced by -(sin with its halves swapped), so one kernel serves both.
(For Hugging Face's cos/sin, whose halves are equal, that is simply a rotation by -sin.)

Layouts: unsqueeze_dim=1 means q, k are (B, H, T, D) (the HF default); unsqueeze_dim=2 means
(B, T, H, D). cos/sin are (B or 1, T, D). q and k may have different head counts (GQA) and any
strides (typically transposed views from `view(B, T, H, D).transpose(1, 2)`): the kernel takes strides
and copies nothing unless the last dimension itself is strided. Outputs are new tensors with the same
memory order as the inputs (like the eager elementwise ops they replace).

Gradients: q and k only. cos/sin come from a non-trainable buffer in Hugging Face models; if they do
require grad, the torch reference runs instead so that their gradient is still exact.

The same kernel serves Qwen2-VL's M-RoPE (ops/mrope.py): with `section` = (s0, s1, s2), cos/sin hold one
table per position component, (3, B or 1, T, D), and each rotary pair takes its values from the component
its index falls in (a constexpr branch: plain RoPE compiles exactly as without it).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import (
    check_float,
    check_same_device,
    poison_enabled,
    use_triton,
    on_input_device,
)

# Elements of one half-head block a program rotates per loop step (per tensor half); more heads loop.
_MAX_BLOCK_ELEMS = 4096


@triton.jit
def _load_heads(x_ptr, x_sh, h0, d, d_mask, N_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Both halves (fp32) of heads h0 .. h0 + BLOCK_H - 1 of one token; x_ptr points at the token."""
    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask = (h < N_HEADS)[:, None] & d_mask[None, :]
    ptrs = x_ptr + h[:, None] * x_sh + d[None, :]
    x_lo = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    return x_lo, x_hi


@triton.jit
def _store_rotated(
    o_ptr, o_sh, h0, x_lo, x_hi, cos_lo, cos_hi, sin_lo, sin_hi, d, d_mask,
    N_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Rotate the halves loaded by `_load_heads` and store them at heads h0 .. of o_ptr's token."""
    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask = (h < N_HEADS)[:, None] & d_mask[None, :]
    o_lo = x_lo * cos_lo[None, :] - x_hi * sin_lo[None, :]
    o_hi = x_hi * cos_hi[None, :] + x_lo * sin_hi[None, :]
    ptrs = o_ptr + h[:, None] * o_sh + d[None, :]
    tl.store(ptrs, o_lo.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF, o_hi.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    q_sb,
    q_st,
    q_sh,
    k_sb,
    k_st,
    k_sh,
    qo_sb,
    qo_st,
    qo_sh,
    ko_sb,
    ko_st,
    ko_sh,
    cos_sc,
    cos_sb,
    cos_st,
    sin_sc,
    sin_sb,
    sin_st,
    N_QH: tl.constexpr,
    N_KH: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    N_STEPS: tl.constexpr,
    BACKWARD: tl.constexpr,
    HAS_SECTIONS: tl.constexpr,
    SEC0: tl.constexpr,
    SEC01: tl.constexpr,
):
    # One program per token (batch, position): cos/sin are loaded once and applied to every q and k head.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF

    c_ptr = cos_ptr + b * cos_sb + t * cos_st + d
    s_ptr = sin_ptr + b * sin_sb + t * sin_st + d
    if HAS_SECTIONS:  # M-RoPE: position component (0 temporal, 1 height, 2 width) of each rotary pair
        comp = (d >= SEC0).to(tl.int64) + (d >= SEC01).to(tl.int64)
        c_ptr = c_ptr + comp * cos_sc
        s_ptr = s_ptr + comp * sin_sc
    cos_lo = tl.load(c_ptr, mask=d_mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(c_ptr + HALF, mask=d_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transposed rotation: sin halves swapped and negated (see module docstring).
        sin_lo = -tl.load(s_ptr + HALF, mask=d_mask, other=0.0).to(tl.float32)
        sin_hi = -tl.load(s_ptr, mask=d_mask, other=0.0).to(tl.float32)
    else:
        sin_lo = tl.load(s_ptr, mask=d_mask, other=0.0).to(tl.float32)
        sin_hi = tl.load(s_ptr + HALF, mask=d_mask, other=0.0).to(tl.float32)

    # Head blocks are unrolled (head counts are compile-time constants, one pair per model); in each
    # step the loads of q and k are issued before any store (the compiler may not move a load past a
    # store that could alias it), so a token's whole input is in flight at once.
    q_in = q_ptr + b * q_sb + t * q_st
    k_in = k_ptr + b * k_sb + t * k_st
    q_out = qo_ptr + b * qo_sb + t * qo_st
    k_out = ko_ptr + b * ko_sb + t * ko_st
    for i in tl.static_range(N_STEPS):
        if i * BLOCK_QH < N_QH:
            q_lo, q_hi = _load_heads(q_in, q_sh, i * BLOCK_QH, d, d_mask, N_QH, HALF, BLOCK_QH)
        if i * BLOCK_KH < N_KH:
            k_lo, k_hi = _load_heads(k_in, k_sh, i * BLOCK_KH, d, d_mask, N_KH, HALF, BLOCK_KH)
        if i * BLOCK_QH < N_QH:
            _store_rotated(q_out, qo_sh, i * BLOCK_QH, q_lo, q_hi, cos_lo, cos_hi, sin_lo, sin_hi, d, d_mask,
                           N_QH, HALF, BLOCK_QH)
        if i * BLOCK_KH < N_KH:
            _store_rotated(k_out, ko_sh, i * BLOCK_KH, k_lo, k_hi, cos_lo, cos_hi, sin_lo, sin_hi, d, d_mask,
                           N_KH, HALF, BLOCK_KH)


def _new_like(t: torch.Tensor) -> torch.Tensor:
    """Output with t's memory order (a transposed view's output stays transposed); NaN in poison mode."""
    out = torch.empty_like(t, memory_format=torch.preserve_format)
    if poison_enabled():
        out.fill_(float("nan"))
    return out


def _new_strided(shape, strides, like: torch.Tensor) -> torch.Tensor:
    """Output with the given strides (dense: those of a tensor the forward allocated); NaN in poison mode."""
    out = torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device)
    if poison_enabled():
        out.fill_(float("nan"))
    return out


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bth_strides(t: torch.Tensor, seq_dim: int, head_dim: int) -> tuple[int, int, int]:
    return t.stride(0), t.stride(seq_dim), t.stride(head_dim)


@functools.lru_cache(maxsize=None)
def _launch_config(half: int, n_qh: int, n_kh: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_D, BLOCK_QH, BLOCK_KH, N_STEPS, num_warps): head blocks of up to `_MAX_BLOCK_ELEMS`."""
    block_d = triton.next_power_of_2(half)
    max_heads = max(1, _MAX_BLOCK_ELEMS // block_d)
    block_qh = min(triton.next_power_of_2(n_qh), max_heads) if n_qh else 1
    block_kh = min(triton.next_power_of_2(n_kh), max_heads) if n_kh else 1
    n_steps = max(-(-n_qh // block_qh), -(-n_kh // block_kh))
    return block_d, block_qh, block_kh, n_steps, 4 if block_qh * block_d <= 2048 else 8


def _rope_launch(q, k, cos, sin, seq_dim: int, head_dim: int, backward: bool, out_strides=None, section=None):
    """Rotate q and k (or their gradients when backward=True) in one launch; returns new tensors.

    `section` (M-RoPE): three ints summing to D/2; cos/sin are then (3, B or 1, T, D), else (B or 1, T, D).

    The outputs have the memory order of q and k, or the strides `out_strides` = (q_out strides,
    k_out strides) when given: the backward writes dq, dk in the layout of the forward's q and k, so
    that autograd hands them on through the transpose/view back to the projections without a copy
    (the upstream gradients usually arrive in the (B, H, T, D) order of the attention's inputs).
    """
    q = _last_dim_contiguous(q)
    k = _last_dim_contiguous(k)
    if out_strides is None:
        q_out, k_out = _new_like(q), _new_like(k)
    else:
        q_out = _new_strided(q.shape, out_strides[0], q)
        k_out = _new_strided(k.shape, out_strides[1], k)
    batch, seq_len, dim = q.shape[0], q.shape[seq_dim], q.shape[-1]
    n_qh, n_kh = q.shape[head_dim], k.shape[head_dim]
    n_tokens = batch * seq_len
    if n_tokens == 0:
        return q_out, k_out
    block_d, block_qh, block_kh, n_steps, num_warps = _launch_config(dim // 2, n_qh, n_kh)
    # A batch-1 cos/sin is shared by every sequence of the batch: stride 0 over batch.
    lead = 0 if section is None else 1  # M-RoPE tables have the position component first
    cos_sb = cos.stride(lead) if cos.shape[lead] == batch else 0
    sin_sb = sin.stride(lead) if sin.shape[lead] == batch else 0
    sec0, sec1 = (0, 0) if section is None else (section[0], section[1])
    _rope_kernel[(n_tokens,)](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        seq_len,
        *_bth_strides(q, seq_dim, head_dim),
        *_bth_strides(k, seq_dim, head_dim),
        *_bth_strides(q_out, seq_dim, head_dim),
        *_bth_strides(k_out, seq_dim, head_dim),
        cos.stride(0) if section is not None else 0,
        cos_sb,
        cos.stride(lead + 1),
        sin.stride(0) if section is not None else 0,
        sin_sb,
        sin.stride(lead + 1),
        N_QH=n_qh,
        N_KH=n_kh,
        HALF=dim // 2,
        BLOCK_D=block_d,
        BLOCK_QH=block_qh,
        BLOCK_KH=block_kh,
        N_STEPS=n_steps,
        BACKWARD=backward,
        HAS_SECTIONS=section is not None,
        SEC0=sec0,
        SEC01=sec0 + sec1,
        num_warps=num_warps,
    )
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    """q, k -> (q_embed, k_embed); cos/sin receive no gradient (see module docstring).
    `section`: M-RoPE's three section sizes, or None for plain RoPE."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, seq_dim: int, head_dim: int, section=None):
        cos = _last_dim_contiguous(cos)
        sin = _last_dim_contiguous(sin)
        ctx.save_for_backward(cos, sin)
        ctx.args = (seq_dim, head_dim, section)
        q_embed, k_embed = _rope_launch(q, k, cos, sin, seq_dim, head_dim, False, section=section)
        ctx.out_strides = (q_embed.stride(), k_embed.stride())  # q's and k's memory order
        return q_embed, k_embed

    @staticmethod
    def backward(ctx, dq_embed, dk_embed):
        cos, sin = ctx.saved_tensors
        seq_dim, head_dim, section = ctx.args
        dq, dk = _rope_launch(
            dq_embed, dk_embed, cos, sin, seq_dim, head_dim, True, out_strides=ctx.out_strides, section=section
        )
        return dq, dk, None, None, None, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Torch specification: Hugging Face `apply_rotary_pos_emb`, math in fp32 (fp64 for fp64 inputs)."""

    def apply(x):
        compute = torch.promote_types(x.dtype, torch.float32)
        c = cos.unsqueeze(unsqueeze_dim).to(compute)
        s = sin.unsqueeze(unsqueeze_dim).to(compute)
        xf = x.to(compute)
        return (xf * c + _rotate_half(xf) * s).to(x.dtype)

    return apply(q), apply(k)


def _check_rope_inputs(q, k, cos, sin, unsqueeze_dim, section=None) -> tuple[int, int]:
    """Validate shapes; return the (seq, head) dimensions of q and k. With `section` (M-RoPE), cos/sin
    are (3, 1 or B, T, D) and `section` must be three non-negative ints summing to D/2."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t)
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    if unsqueeze_dim in (1, -3):
        seq_dim, head_dim, layout = 2, 1, "(batch, heads, seq, head_dim)"
    elif unsqueeze_dim in (2, -2):
        seq_dim, head_dim, layout = 1, 2, "(batch, seq, heads, head_dim)"
    else:
        raise ValueError(
            f"unsqueeze_dim must be 1 (q, k as (batch, heads, seq, head_dim)) or 2 "
            f"(q, k as (batch, seq, heads, head_dim)), got {unsqueeze_dim}"
        )
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    batch, seq_len, dim = q.shape[0], q.shape[seq_dim], q.shape[-1]
    if dim % 2:
        raise ValueError(f"q has head_dim {dim}; rotate-half RoPE needs an even head_dim")
    if k.shape[0] != batch or k.shape[seq_dim] != seq_len or k.shape[-1] != dim:
        raise ValueError(
            f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head_dim "
            f"(layout {layout}); only the head count may differ"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    if section is None:
        if cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1:] != (seq_len, dim):
            raise ValueError(
                f"cos/sin must be (1 or batch={batch}, seq={seq_len}, head_dim={dim}), "
                f"got {tuple(cos.shape)}"
            )
        return seq_dim, head_dim
    if cos.dim() != 4 or cos.shape[0] != 3 or cos.shape[1] not in (1, batch) or cos.shape[2:] != (seq_len, dim):
        raise ValueError(
            f"cos/sin must be (3, 1 or batch={batch}, seq={seq_len}, head_dim={dim}), got {tuple(cos.shape)}"
        )
    if len(section) != 3 or not all(isinstance(v, int) and v >= 0 for v in section) or sum(section) != dim // 2:
        raise ValueError(
            f"mrope_section must be three non-negative ints summing to head_dim / 2 = {dim // 2}, "
            f"got {list(section)}"
        )
    return seq_dim, head_dim


@on_input_device
def rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Hugging Face `apply_rotary_pos_emb` (rotate-half) on q and k -> (q_embed, k_embed), new tensors.

    q: (B, Hq, T, D) for unsqueeze_dim=1, (B, T, Hq, D) for unsqueeze_dim=2; k likewise with its own
    head count; cos, sin: (B or 1, T, D). Gradients flow to q and k; cos/sin get none on the Triton
    path (they get exact ones, via the torch reference, if they require grad).
    """
    seq_dim, head_dim = _check_rope_inputs(q, k, cos, sin, unsqueeze_dim)
    cos_needs_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if _library.compiling() and not cos_needs_grad:  # one graph node under torch.compile
        return _rope_op(q, k, cos, sin, unsqueeze_dim, False)
    if not use_triton(q, k, cos, sin) or cos_needs_grad:
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    return RoPEFunction.apply(q, k, cos, sin, seq_dim, head_dim)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _out_like(t: torch.Tensor) -> torch.Tensor:
    """An output with the layout the kernel path gives (`_new_like` of the last-dim-contiguous input)."""
    return torch.empty_like(_last_dim_contiguous(t), memory_format=torch.preserve_format)


@_library.custom_op("rope", lambda q, k, cos, sin, unsqueeze_dim, backward: (_out_like(q), _out_like(k)))
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_embed, k_embed); with backward=True the transposed rotation of the gradients (dq, dk)."""
    if not use_triton(q, k, cos, sin):
        rotate = lambda q, k: rope_reference(q, k, cos, sin, unsqueeze_dim)  # noqa: E731
        # The map is linear: its transpose at any point (here the gradients themselves) is the backward.
        outs = _library.reference_vjp(rotate, (q, k), (q, k)) if backward else rotate(q, k)
        q_out, k_out = _out_like(q), _out_like(k)
        return q_out.copy_(outs[0]), k_out.copy_(outs[1])
    seq_dim, head_dim = (2, 1) if unsqueeze_dim in (1, -3) else (1, 2)
    return _rope_launch(
        q, k, _last_dim_contiguous(cos), _last_dim_contiguous(sin), seq_dim, head_dim, backward
    )


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin, ctx.unsqueeze_dim, _ = inputs
    ctx.save_for_backward(cos, sin)


def _rope_grad(ctx, dq_embed, dk_embed):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_op(dq_embed, dk_embed, cos, sin, ctx.unsqueeze_dim, True)
    return dq, dk, None, None, None, None


_rope_op.register_autograd(_rope_grad, setup_context=_rope_setup)
