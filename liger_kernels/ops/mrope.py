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

The rotation runs on ops/rope.py's kernel, which selects the component per element while loading cos/sin
(no selected table is materialized). Layouts and strides are those of ops/rope.py (unsqueeze_dim=1:
q, k as (B, H, T, D); 2: (B, T, H, D); any strides with a unit last-dimension stride), and so is
gradient handling: q and k get gradients; if cos/sin require grad, the torch reference runs instead.

Transformers >= 5.2x applies the section selection inside Qwen2-VL's rotary embedding and then calls the
plain `apply_rotary_pos_emb` (ops/rope.py serves those versions); older versions call
`apply_multimodal_rotary_pos_emb`, which this op replaces.
"""

from __future__ import annotations

import torch

from liger_kernels import _library
from liger_kernels._utils import on_input_device, use_triton
from liger_kernels.ops.rope import (
    RoPEFunction,
    _check_rope_inputs,
    _last_dim_contiguous,
    _out_like,
    _rope_launch,
    rope_reference,
)


def mrope_reference(q, k, cos, sin, mrope_section, unsqueeze_dim: int = 1):
    """Torch specification: Hugging Face `apply_multimodal_rotary_pos_emb`, math in fp32 (fp64 for fp64)."""
    sections = list(mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(sections, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(sections, dim=-1))], dim=-1)
    return rope_reference(q, k, cos, sin, unsqueeze_dim)


@on_input_device
def mrope(q, k, cos, sin, mrope_section, unsqueeze_dim: int = 1):
    """Qwen2-VL multimodal RoPE (`apply_multimodal_rotary_pos_emb`) on q and k -> (q_embed, k_embed).

    q: (B, Hq, T, D) for unsqueeze_dim=1, (B, T, Hq, D) for unsqueeze_dim=2; k likewise with its own head
    count; cos, sin: (3, B or 1, T, D) for the temporal/height/width position ids; mrope_section: three
    ints summing to D/2 (Qwen2-VL: [16, 24, 24]). New tensors; gradients flow to q and k (cos/sin get
    exact ones, via the torch reference, if they require grad).
    """
    section = tuple(mrope_section)
    seq_dim, head_dim = _check_rope_inputs(q, k, cos, sin, unsqueeze_dim, section)
    cos_needs_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if _library.compiling() and not cos_needs_grad:  # one graph node under torch.compile
        return _mrope_op(q, k, cos, sin, list(section), unsqueeze_dim, False)
    if not use_triton(q, k, cos, sin) or cos_needs_grad:
        return mrope_reference(q, k, cos, sin, section, unsqueeze_dim)
    return RoPEFunction.apply(q, k, cos, sin, seq_dim, head_dim, section)


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
    return _rope_launch(
        q, k, _last_dim_contiguous(cos), _last_dim_contiguous(sin), seq_dim, head_dim, backward,
        section=tuple(mrope_section),
    )


def _mrope_setup(ctx, inputs, output):
    _, _, cos, sin, ctx.mrope_section, ctx.unsqueeze_dim, _ = inputs
    ctx.save_for_backward(cos, sin)


def _mrope_grad(ctx, dq_embed, dk_embed):
    cos, sin = ctx.saved_tensors
    dq, dk = _mrope_op(dq_embed, dk_embed, cos, sin, ctx.mrope_section, ctx.unsqueeze_dim, True)
    return dq, dk, None, None, None, None, None


_mrope_op.register_autograd(_mrope_grad, setup_context=_mrope_setup)
