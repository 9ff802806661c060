"""Multimodal rotary position embedding (Qwen2-VL / Qwen2.5-VL M-RoPE) for q and k in one launch.

Specification (`mrope_reference`, Hugging Face's `apply_multimodal_rotary_pos_emb`): cos and sin carry
one table per position component, (3, B, T, D) for (temporal, height, width) position ids.
`mrope_section` = [s0, s1, s2] with s0 + s1 + s2 = D/2 splits each half of the head dimension into
three runs; run i of a half takes its cos/sin from component i:
    cos_sel[..., j] = cos[c(j % (D/2)), ..., j],   c(j) = 0 for j < s0, 1 for j < s0 + s1, else 2
(transformers writes this as `cat([m[i % 3] for i, m in enumerate(cos.split(mrope_section * 2, -1))])`),
then plain rotate-half RoPE with the selected tables (see ops/rope.py for the rotation and for why the
backward is the same rotation with sin's halves swapped and negated). Both halves of a pair (j, j + D/2)
use the same component, so the selection commutes with that swap.

The kernel selects the component per element while loading cos/sin: no selected table is materialized.
Layouts and strides are those of ops/rope.py (unsqueeze_dim=1: q, k as (B, H, T, D); 2: (B, T, H, D);
any strides with a unit last-dimension stride), and so is gradient handling: q and k get gradients;
if cos/sin require grad, the torch reference runs instead.

Transformers >= 5.2x applies the section selection inside Qwen2-VL's rotary embedding and then calls the
plain `apply_rotary_pos_emb` (ops/rope.py serves those versions); older versions call
`apply_multimodal_rotary_pos_emb`, which this op replaces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, use_triton
from liger_kernels.ops.rope import (
    _bth_strides,
    _last_dim_contiguous,
    _launch_config,
    _load_heads,
    _new_like,
    _new_strided,
    _out_like,
    _rotate_half,
    _store_rotated,
)


@triton.jit
def _mrope_kernel(
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
    SEC0: tl.constexpr,
    SEC01: tl.constexpr,
    N_QH: tl.constexpr,
    N_KH: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    N_STEPS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # One program per token (batch, position): the selected cos/sin are loaded once for all heads.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    # Position component (0 temporal, 1 height, 2 width) of each rotary pair.
    comp = (d >= SEC0).to(tl.int64) + (d >= SEC01).to(tl.int64)

    c_ptr = cos_ptr + comp * cos_sc + b * cos_sb + t * cos_st + d
    s_ptr = sin_ptr + comp * sin_sc + b * sin_sb + t * sin_st + d
    cos_lo = tl.load(c_ptr, mask=d_mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(c_ptr + HALF, mask=d_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transposed rotation: sin halves swapped and negated (ops/rope.py docstring).
        sin_lo = -tl.load(s_ptr + HALF, mask=d_mask, other=0.0).to(tl.float32)
        sin_hi = -tl.load(s_ptr, mask=d_mask, other=0.0).to(tl.float32)
    else:
        sin_lo = tl.load(s_ptr, mask=d_mask, other=0.0).to(tl.float32)
        sin_hi = tl.load(s_ptr + HALF, mask=d_mask, other=0.0).to(tl.float32)

    # As in ops/rope.py: head blocks unrolled, each step's q and k loads issued before its stores.
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


def _mrope_launch(q, k, cos, sin, section, seq_dim: int, head_dim: int, backward: bool, out_strides=None):
    """Rotate q and k (or their gradients when backward=True) in one launch; returns new tensors.

    Output layout as in ops/rope.py `_rope_launch`: q's and k's memory order, or `out_strides`.
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
    # A batch-1 table is shared by every sequence of the batch: stride 0 over batch.
    cos_sb = cos.stride(1) if cos.shape[1] == batch else 0
    sin_sb = sin.stride(1) if sin.shape[1] == batch else 0
    _mrope_kernel[(n_tokens,)](
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
        cos.stride(0),
        cos_sb,
        cos.stride(2),
        sin.stride(0),
        sin_sb,
        sin.stride(2),
        SEC0=section[0],
        SEC01=section[0] + section[1],
        N_QH=n_qh,
        N_KH=n_kh,
        HALF=dim // 2,
        BLOCK_D=block_d,
        BLOCK_QH=block_qh,
        BLOCK_KH=block_kh,
        N_STEPS=n_steps,
        BACKWARD=backward,
        num_warps=num_warps,
    )
    return q_out, k_out


class MRoPEFunction(torch.autograd.Function):
    """q, k -> (q_embed, k_embed); cos/sin receive no gradient (see module docstring)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, section, seq_dim: int, head_dim: int):
        cos = _last_dim_contiguous(cos)
        sin = _last_dim_contiguous(sin)
        ctx.save_for_backward(cos, sin)
        ctx.args = (section, seq_dim, head_dim)
        q_embed, k_embed = _mrope_launch(q, k, cos, sin, section, seq_dim, head_dim, backward=False)
        ctx.out_strides = (q_embed.stride(), k_embed.stride())  # q's and k's memory order
        return q_embed, k_embed

    @staticmethod
    def backward(ctx, dq_embed, dk_embed):
        cos, sin = ctx.saved_tensors
        section, seq_dim, head_dim = ctx.args
        dq, dk = _mrope_launch(
            dq_embed, dk_embed, cos, sin, section, seq_dim, head_dim, backward=True, out_strides=ctx.out_strides
        )
        return dq, dk, None, None, None, None, None


def mrope_reference(q, k, cos, sin, mrope_section, unsqueeze_dim: int = 1):
    """Torch specification: Hugging Face `apply_multimodal_rotary_pos_emb`, math in fp32 (fp64 for fp64)."""
    sections = list(mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(sections, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(sections, dim=-1))], dim=-1)

    def apply(x):
        compute = torch.promote_types(x.dtype, torch.float32)
        c = cos.unsqueeze(unsqueeze_dim).to(compute)
        s = sin.unsqueeze(unsqueeze_dim).to(compute)
        xf = x.to(compute)
        return (xf * c + _rotate_half(xf) * s).to(x.dtype)

    return apply(q), apply(k)


def _check_mrope_inputs(q, k, cos, sin, mrope_section, unsqueeze_dim) -> tuple[tuple[int, int, int], int, int]:
    """Validate; return (the section as a tuple of ints, seq dimension, head dimension) of q and k."""
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
    if cos.dim() != 4 or cos.shape[0] != 3 or cos.shape[1] not in (1, batch) or cos.shape[2:] != (seq_len, dim):
        raise ValueError(
            f"cos/sin must be (3, 1 or batch={batch}, seq={seq_len}, head_dim={dim}), got {tuple(cos.shape)}"
        )
    section = tuple(mrope_section)
    if (
        len(section) != 3
        or not all(isinstance(s, int) and s >= 0 for s in section)
        or sum(section) != dim // 2
    ):
        raise ValueError(
            f"mrope_section must be three non-negative ints summing to head_dim / 2 = {dim // 2}, "
            f"got {list(mrope_section)}"
        )
    return section, seq_dim, head_dim


def mrope(q, k, cos, sin, mrope_section, unsqueeze_dim: int = 1):
    """Qwen2-VL multimodal RoPE (`apply_multimodal_rotary_pos_emb`) on q and k -> (q_embed, k_embed).

    q: (B, Hq, T, D) for unsqueeze_dim=1, (B, T, Hq, D) for unsqueeze_dim=2; k likewise with its own head
    count; cos, sin: (3, B or 1, T, D) for the temporal/height/width position ids; mrope_section: three
    ints summing to D/2 (Qwen2-VL: [16, 24, 24]). New tensors; gradients flow to q and k (cos/sin get
    exact ones, via the torch reference, if they require grad).
    """
    section, seq_dim, head_dim = _check_mrope_inputs(q, k, cos, sin, mrope_section, unsqueeze_dim)
    cos_needs_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if _library.compiling() and not cos_needs_grad:  # one graph node under torch.compile
        return _mrope_op(q, k, cos, sin, list(section), unsqueeze_dim, False)
    if not use_triton(q, k, cos, sin) or cos_needs_grad:
        return mrope_reference(q, k, cos, sin, section, unsqueeze_dim)
    return MRoPEFunction.apply(q, k, cos, sin, section, seq_dim, head_dim)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


@_library.custom_op(
    "mrope", lambda q, k, cos, sin, mrope_section, unsqueeze_dim, backward: (_out_like(q), _out_like(k))
)
def _mrope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mrope_section: list[int],
    unsqueeze_dim: int,
    backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_embed, k_embed); with backward=True the transposed rotation of the gradients (dq, dk)."""
    if not use_triton(q, k, cos, sin):
        rotate = lambda q, k: mrope_reference(q, k, cos, sin, mrope_section, unsqueeze_dim)  # noqa: E731
        # The map is linear: its transpose at any point (here the gradients themselves) is the backward.
        outs = _library.reference_vjp(rotate, (q, k), (q, k)) if backward else rotate(q, k)
        q_out, k_out = _out_like(q), _out_like(k)
        return q_out.copy_(outs[0]), k_out.copy_(outs[1])
    seq_dim, head_dim = (2, 1) if unsqueeze_dim in (1, -3) else (1, 2)
    return _mrope_launch(
        q, k, _last_dim_contiguous(cos), _last_dim_contiguous(sin), tuple(mrope_section), seq_dim, head_dim,
        backward,
    )


def _mrope_setup(ctx, inputs, output):
    _, _, cos, sin, ctx.mrope_section, ctx.unsqueeze_dim, _ = inputs
    ctx.save_for_backward(cos, sin)


def _mrope_grad(ctx, dq_embed, dk_embed):
    cos, sin = ctx.saved_tensors
    dq, dk = _mrope_op(dq_embed, dk_embed, cos, sin, ctx.mrope_section, ctx.unsqueeze_dim, True)
    return dq, dk, None, None, None, None, None


_mrope_op.register_autograd(_mrope_grad, setup_context=_mrope_setup)
