"""Llama-4 rotary position embedding (complex form) for q and k in one launch.

Specification (`llama4_rope_reference`, Hugging Face's llama4 `apply_rotary_emb`): the head dimension
holds D/2 complex numbers as interleaved pairs (x[..., 2j], x[..., 2j + 1]) = (re, im), each multiplied
by freqs_cis[b, t, j] (complex; unit magnitude times the rope attention scaling), in fp32:
    out_re = x_re * f_re - x_im * f_im
    out_im = x_re * f_im + x_im * f_re
The backward is the transpose of this linear map, a multiplication by conj(f):
    dx_re = dy_re * f_re + dy_im * f_im,   dx_im = dy_im * f_re - dy_re * f_im
i.e. the forward with f_im negated, so one kernel serves both.

Layout (the one transformers uses, before the heads are transposed): q (B, T, Hq, D), k (B, T, Hkv, D),
any strides with a unit last-dimension stride; freqs_cis (B or 1, T, D/2) complex64 as transformers
passes it, or its real view (B or 1, T, D/2, 2) (`torch.view_as_real`) in any float dtype. A program
loads whole rows (contiguous, vectorized) and splits the pairs in registers. Outputs are new tensors
with the memory order of q and k; the gradients are written in that order too (see ops/rope.py).

Gradients: q and k only. freqs_cis comes from the rotary embedding's buffer in Hugging Face models; if
it requires grad, the torch reference runs instead so that its gradient is still exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, on_input_device, use_triton
from liger_kernels.ops.rope import _last_dim_contiguous, _launch_config, _new_like, _new_strided, _out_like


@triton.jit
def _load_pairs(x_ptr, x_sh, h0, d2, d2_mask, N_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """(re, im) in fp32, each (BLOCK_H, BLOCK_D), of heads h0 .. h0 + BLOCK_H - 1 of one token."""
    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask = (h < N_HEADS)[:, None] & d2_mask[None, :]
    x = tl.load(x_ptr + h[:, None] * x_sh + d2[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(x, (BLOCK_H, BLOCK_D, 2)))


@triton.jit
def _store_product(
    o_ptr, o_sh, h0, x_re, x_im, f_re, f_im, d2, d2_mask,
    N_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Multiply the pairs loaded by `_load_pairs` by f and store them, interleaved, at heads h0 .. of o_ptr."""
    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask = (h < N_HEADS)[:, None] & d2_mask[None, :]
    o_re = x_re * f_re[None, :] - x_im * f_im[None, :]
    o_im = x_re * f_im[None, :] + x_im * f_re[None, :]
    o = tl.reshape(tl.join(o_re, o_im), (BLOCK_H, 2 * BLOCK_D))
    tl.store(o_ptr + h[:, None] * o_sh + d2[None, :], o.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _llama4_rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    f_ptr,
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
    f_sb,
    f_st,
    N_QH: tl.constexpr,
    N_KH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    N_STEPS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # One program per token (batch, position): freqs are loaded once and applied to every q and k head.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d2 = tl.arange(0, 2 * BLOCK_D)  # interleaved (re, im) element offsets within a head
    d2_mask = d2 < HEAD_DIM

    f = tl.load(f_ptr + b * f_sb + t * f_st + d2, mask=d2_mask, other=0.0).to(tl.float32)
    f_re, f_im = tl.split(tl.reshape(f, (BLOCK_D, 2)))
    if BACKWARD:
        f_im = -f_im  # multiply by conj(f): the transposed map (module docstring)

    # As in ops/rope.py: head blocks unrolled, each step's q and k loads issued before its stores.
    q_in = q_ptr + b * q_sb + t * q_st
    k_in = k_ptr + b * k_sb + t * k_st
    q_out = qo_ptr + b * qo_sb + t * qo_st
    k_out = ko_ptr + b * ko_sb + t * ko_st
    for i in tl.static_range(N_STEPS):
        if i * BLOCK_QH < N_QH:
            q_re, q_im = _load_pairs(q_in, q_sh, i * BLOCK_QH, d2, d2_mask, N_QH, BLOCK_QH, BLOCK_D)
        if i * BLOCK_KH < N_KH:
            k_re, k_im = _load_pairs(k_in, k_sh, i * BLOCK_KH, d2, d2_mask, N_KH, BLOCK_KH, BLOCK_D)
        if i * BLOCK_QH < N_QH:
            _store_product(q_out, qo_sh, i * BLOCK_QH, q_re, q_im, f_re, f_im, d2, d2_mask, N_QH, BLOCK_QH, BLOCK_D)
        if i * BLOCK_KH < N_KH:
            _store_product(k_out, ko_sh, i * BLOCK_KH, k_re, k_im, f_re, f_im, d2, d2_mask, N_KH, BLOCK_KH, BLOCK_D)


def _llama4_rope_launch(q, k, freqs, backward: bool, out_strides=None):
    """Rotate q and k (or their gradients when backward=True) in one launch; returns new tensors.

    freqs: the real view (B or 1, T, D/2, 2) with unit strides over its last two dimensions. Output
    layout as in ops/rope.py `_rope_launch`: q's and k's memory order, or `out_strides`.
    """
    q = _last_dim_contiguous(q)
    k = _last_dim_contiguous(k)
    if out_strides is None:
        q_out, k_out = _new_like(q), _new_like(k)
    else:
        q_out = _new_strided(q.shape, out_strides[0], q)
        k_out = _new_strided(k.shape, out_strides[1], k)
    batch, seq_len, n_qh, dim = q.shape
    n_kh = k.shape[2]
    n_tokens = batch * seq_len
    if n_tokens == 0:
        return q_out, k_out
    block_d, block_qh, block_kh, n_steps, num_warps = _launch_config(dim // 2, n_qh, n_kh)
    _llama4_rope_kernel[(n_tokens,)](
        q,
        k,
        q_out,
        k_out,
        freqs,
        seq_len,
        *q.stride()[:3],
        *k.stride()[:3],
        *q_out.stride()[:3],
        *k_out.stride()[:3],
        freqs.stride(0) if freqs.shape[0] == batch else 0,  # a batch-1 table serves every sequence
        freqs.stride(1),
        N_QH=n_qh,
        N_KH=n_kh,
        HEAD_DIM=dim,
        BLOCK_D=block_d,
        BLOCK_QH=block_qh,
        BLOCK_KH=block_kh,
        N_STEPS=n_steps,
        BACKWARD=backward,
        num_warps=num_warps,
    )
    return q_out, k_out


def _pairs_contiguous(freqs: torch.Tensor) -> torch.Tensor:
    """The real view with unit strides over (D/2, 2), as the kernel reads it."""
    return freqs if freqs.stride(-1) == 1 and freqs.stride(-2) == 2 else freqs.contiguous()


class Llama4RoPEFunction(torch.autograd.Function):
    """q, k -> (q_out, k_out); freqs receive no gradient (see module docstring)."""

    @staticmethod
    def forward(ctx, q, k, freqs):
        freqs = _pairs_contiguous(freqs)
        ctx.save_for_backward(freqs)
        q_out, k_out = _llama4_rope_launch(q, k, freqs, backward=False)
        ctx.out_strides = (q_out.stride(), k_out.stride())  # q's and k's memory order
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        (freqs,) = ctx.saved_tensors
        dq, dk = _llama4_rope_launch(dq_out, dk_out, freqs, backward=True, out_strides=ctx.out_strides)
        return dq, dk, None


def llama4_rope_reference(q, k, freqs_cis):
    """Torch specification: Hugging Face llama4 `apply_rotary_emb` (complex product), math in fp32 (fp64
    for fp64 inputs). freqs_cis: complex (B or 1, T, D/2) or its real view (B or 1, T, D/2, 2)."""

    def apply(x):
        compute = torch.promote_types(x.dtype, torch.float32)
        if freqs_cis.is_complex():
            f = freqs_cis.to(torch.complex128 if compute == torch.float64 else torch.complex64)
        else:
            f = torch.view_as_complex(freqs_cis.to(compute).contiguous())
        x_ = torch.view_as_complex(x.to(compute).contiguous().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_ * f[:, :, None, :]).flatten(3).to(x.dtype)

    return apply(q), apply(k)


def _check_llama4_rope_inputs(q, k, freqs_cis) -> torch.Tensor:
    """Validate; return freqs_cis as a real (B or 1, T, D/2, 2) tensor (a view, no copy)."""
    check_float("q", q)
    check_float("k", k)
    if not isinstance(freqs_cis, torch.Tensor):
        raise TypeError(f"freqs_cis must be a torch.Tensor, got {type(freqs_cis).__name__}")
    if freqs_cis.is_complex():
        if freqs_cis.dtype != torch.complex64:
            raise TypeError(f"freqs_cis has dtype {freqs_cis.dtype}; a complex freqs_cis must be complex64")
        freqs = torch.view_as_real(freqs_cis)
    else:
        check_float("freqs_cis", freqs_cis)
        freqs = freqs_cis
    check_same_device(q=q, k=k, freqs_cis=freqs_cis)
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
    batch, seq_len, _, dim = q.shape
    if dim % 2:
        raise ValueError(f"q has head_dim {dim}; complex RoPE needs an even head_dim")
    if k.shape[0] != batch or k.shape[1] != seq_len or k.shape[-1] != dim:
        raise ValueError(
            f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head_dim "
            "(layout (batch, seq, heads, head_dim)); only the head count may differ"
        )
    if freqs.dim() != 4 or freqs.shape[0] not in (1, batch) or freqs.shape[1:] != (seq_len, dim // 2, 2):
        raise ValueError(
            f"freqs_cis must be complex (1 or batch={batch}, seq={seq_len}, head_dim/2={dim // 2}) or its "
            f"real view (..., {dim // 2}, 2), got {tuple(freqs_cis.shape)} {freqs_cis.dtype}"
        )
    return freqs


@on_input_device
def llama4_rope(q, k, freqs_cis):
    """Hugging Face llama4 `apply_rotary_emb` on q and k -> (q_out, k_out), new tensors.

    q: (B, T, Hq, D), k: (B, T, Hkv, D); freqs_cis: complex64 (B or 1, T, D/2) or its real view
    (B or 1, T, D/2, 2). Gradients flow to q and k; freqs_cis gets an exact one, via the torch
    reference, if it requires grad.
    """
    freqs = _check_llama4_rope_inputs(q, k, freqs_cis)
    freqs_needs_grad = torch.is_grad_enabled() and freqs_cis.requires_grad
    if _library.compiling() and not freqs_needs_grad:  # one graph node under torch.compile
        return _llama4_rope_op(q, k, freqs, False)
    if not use_triton(q, k, freqs) or freqs_needs_grad:
        return llama4_rope_reference(q, k, freqs_cis)
    return Llama4RoPEFunction.apply(q, k, freqs)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


@_library.custom_op("llama4_rope", lambda q, k, freqs, backward: (_out_like(q), _out_like(k)))
def _llama4_rope_op(
    q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out, k_out) for the real view `freqs`; with backward=True the transposed map of the gradients."""
    if not use_triton(q, k, freqs):
        rotate = lambda q, k: llama4_rope_reference(q, k, freqs)  # noqa: E731
        # The map is linear: its transpose at any point (here the gradients themselves) is the backward.
        outs = _library.reference_vjp(rotate, (q, k), (q, k)) if backward else rotate(q, k)
        q_out, k_out = _out_like(q), _out_like(k)
        return q_out.copy_(outs[0]), k_out.copy_(outs[1])
    return _llama4_rope_launch(q, k, _pairs_contiguous(freqs), backward)


def _llama4_rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _llama4_rope_grad(ctx, dq_out, dk_out):
    (freqs,) = ctx.saved_tensors
    dq, dk = _llama4_rope_op(dq_out, dk_out, freqs, True)
    return dq, dk, None, None


_llama4_rope_op.register_autograd(_llama4_rope_grad, setup_context=_llama4_rope_setup)
