"""Outputs of the ops may be modified in place (`y *= s`, `y.add_(...)`), as the outputs of torch's own ops.

Autograd forbids in-place edits of a view made inside a custom autograd Function ("Output 0 of XFunction
is a view and is being modified inplace"), so no op may return one: the ops pass rows into their Function
and reshape its output outside it, or allocate the output in its final shape. Each case edits the
outputs in place and checks that the gradients match the same computation done out of place.

Outputs an op saves for its backward (softmax's and sparsemax's y, fused_add_rms_norm's new_residual)
may be edited too, but then backward refuses to run, as it does for torch's softmax: that is checked
against the torch reference.
"""

import math

import pytest
import torch

from liger_kernels.ops.cross_entropy import cross_entropy
from liger_kernels.ops.dyt import dyt
from liger_kernels.ops.fused_add_rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference
from liger_kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from liger_kernels.ops.fused_moe import fused_moe_experts
from liger_kernels.ops.gated_down_proj import gated_down_proj
from liger_kernels.ops.glu import geglu, swiglu, swiglu_gate_up
from liger_kernels.ops.group_norm import group_norm
from liger_kernels.ops.jsd import jsd
from liger_kernels.ops.kl_div import kl_div
from liger_kernels.ops.layer_norm import layer_norm
from liger_kernels.ops.llama4_rope import llama4_rope
from liger_kernels.ops.modulated_rms_norm import modulated_rms_norm
from liger_kernels.ops.mrope import mrope
from liger_kernels.ops.multi_token_attention import multi_token_attention
from liger_kernels.ops.poly_norm import poly_norm
from liger_kernels.ops.relu_squared import relu_squared
from liger_kernels.ops.rms_norm import rms_norm
from liger_kernels.ops.rope import rope
from liger_kernels.ops.softmax import softmax, softmax_reference
from liger_kernels.ops.sparsemax import sparsemax, sparsemax_reference
from liger_kernels.ops.tvd import tvd
from tests.tolerances import assert_close

H = 12  # hidden size / row width of the row-wise ops


def _leaf(*shape, device, grad=True, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).requires_grad_(grad)


def _probs(*shape, device):
    return torch.softmax(torch.randn(*shape, device=device), -1).requires_grad_()


def _log_probs(*shape, device):
    return torch.log_softmax(torch.randn(*shape, device=device), -1).requires_grad_()


# Each case: (lead) -> (op, inputs, indices of the outputs to edit). Float inputs that require grad are
# the leaves whose gradients are compared; the others (targets, tables) are passed as they are.
# `lead`: the leading dimensions of the row-wise ops' inputs ((2, 3): 3-D inputs; (6,): 2-D ones).
CASES = {
    "swiglu": lambda lead, d: (swiglu, [_leaf(*lead, H, device=d), _leaf(*lead, H, device=d)], [0]),
    "geglu_tanh": lambda lead, d: (geglu, [_leaf(*lead, H, device=d), _leaf(*lead, H, device=d)], [0]),
    "geglu_erf": lambda lead, d: (
        lambda a, b: geglu(a, b, "none"), [_leaf(*lead, H, device=d), _leaf(*lead, H, device=d)], [0]
    ),
    "swiglu_gate_up": lambda lead, d: (swiglu_gate_up, [_leaf(*lead, 2 * H, device=d)], [0]),
    "rms_norm": lambda lead, d: (rms_norm, [_leaf(*lead, H, device=d), _leaf(H, device=d)], [0]),
    "layer_norm": lambda lead, d: (
        layer_norm, [_leaf(*lead, H, device=d), _leaf(H, device=d), _leaf(H, device=d)], [0]
    ),
    # new_residual is saved for the backward: only y is edited here (see test_saved_output_...).
    "fused_add_rms_norm": lambda lead, d: (
        fused_add_rms_norm, [_leaf(*lead, H, device=d), _leaf(*lead, H, device=d), _leaf(H, device=d)], [0]
    ),
    # in_place=True: the backward writes dx into the buffer of y's gradient.
    "rms_norm_in_place": lambda lead, d: (
        lambda x, w: rms_norm(x, w, in_place=True), [_leaf(*lead, H, device=d), _leaf(H, device=d)], [0]
    ),
    "fused_add_rms_norm_in_place": lambda lead, d: (
        lambda x, r, w: fused_add_rms_norm(x, r, w, in_place=True),
        [_leaf(*lead, H, device=d), _leaf(*lead, H, device=d), _leaf(H, device=d)],
        [0],
    ),
    "dyt": lambda lead, d: (
        dyt, [_leaf(*lead, H, device=d), _leaf(1, device=d), _leaf(H, device=d), _leaf(H, device=d)], [0]
    ),
    "poly_norm": lambda lead, d: (
        poly_norm, [_leaf(*lead, H, device=d), _leaf(3, device=d, scale=0.5), _leaf(1, device=d)], [0]
    ),
    "relu_squared": lambda lead, d: (relu_squared, [_leaf(*lead, H, device=d)], [0]),
    "modulated_rms_norm": lambda lead, d: (
        modulated_rms_norm,
        [_leaf(*lead, H, device=d), _leaf(H, device=d), _leaf(lead[0], H, device=d), _leaf(lead[0], H, device=d)],
        [0],
    ),
    # (N, C, *): lead (2, 3) gives x (2, 4, 3, 5), lead (6,) x (6, 4).
    "group_norm": lambda lead, d: (
        lambda x, w, b: group_norm(x, 2, w, b),
        [_leaf(lead[0], 4, *((3, 5) if len(lead) > 1 else ()), device=d), _leaf(4, device=d), _leaf(4, device=d)],
        [0],
    ),
    "kl_div_none": lambda lead, d: (
        lambda x, t: kl_div(x, t, reduction="none"),
        [_log_probs(*lead, H, device=d), _probs(*lead, H, device=d)],
        [0],
    ),
    "kl_div_log_target_none": lambda lead, d: (
        lambda x, t: kl_div(x, t, reduction="none", log_target=True),
        [_log_probs(*lead, H, device=d), _log_probs(*lead, H, device=d)],
        [0],
    ),
    "kl_div_batchmean": lambda lead, d: (
        kl_div, [_log_probs(*lead, H, device=d), _probs(*lead, H, device=d)], [0]
    ),
    "tvd_none": lambda lead, d: (
        lambda p, q: tvd(p, q, reduction="none"), [_probs(*lead, H, device=d), _probs(*lead, H, device=d)], [0]
    ),
    "jsd": lambda lead, d: (jsd, [_log_probs(*lead, H, device=d), _log_probs(*lead, H, device=d)], [0]),
    "cross_entropy_none": lambda lead, d: (
        lambda z, t: cross_entropy(z, t, reduction="none"),
        [_leaf(*lead, H, device=d), torch.randint(0, H, lead, device=d)],
        [0],
    ),
    # z_loss has no gradient; editing it in place is fine either way.
    "cross_entropy_none_z_loss": lambda lead, d: (
        lambda z, t: cross_entropy(z, t, lse_square_scale=1e-2, reduction="none", return_z_loss=True),
        [_leaf(*lead, H, device=d), torch.randint(0, H, lead, device=d)],
        [0, 1],
    ),
    "cross_entropy_mean": lambda lead, d: (
        cross_entropy, [_leaf(*lead, H, device=d), torch.randint(0, H, lead, device=d)], [0]
    ),
    "fused_linear_cross_entropy_none": lambda lead, d: (
        lambda x, w, t: fused_linear_cross_entropy(x, w, t, reduction="none"),
        [_leaf(*lead, 8, device=d), _leaf(H, 8, device=d), torch.randint(0, H, lead, device=d)],
        [0],
    ),
    "gated_down_proj": lambda lead, d: (
        gated_down_proj,
        [_leaf(*lead, H, device=d), _leaf(*lead, H, device=d), _leaf(8, H, device=d), _leaf(8, device=d)],
        [0],
    ),
}

# Ops whose inputs have a fixed structure: run once.
FIXED_CASES = {
    "rope": lambda d: (
        rope,
        [_leaf(2, 3, 5, 8, device=d), _leaf(2, 1, 5, 8, device=d),
         torch.randn(2, 5, 8, device=d), torch.randn(2, 5, 8, device=d)],
        [0, 1],
    ),
    "mrope": lambda d: (
        lambda q, k, cos, sin: mrope(q, k, cos, sin, [1, 1, 2]),
        [_leaf(2, 3, 5, 8, device=d), _leaf(2, 1, 5, 8, device=d),
         torch.randn(3, 2, 5, 8, device=d), torch.randn(3, 2, 5, 8, device=d)],
        [0, 1],
    ),
    "llama4_rope": lambda d: (
        llama4_rope,
        [_leaf(2, 5, 3, 8, device=d), _leaf(2, 5, 1, 8, device=d),
         torch.polar(torch.ones(2, 5, 4, device=d), torch.randn(2, 5, 4, device=d))],
        [0, 1],
    ),
    "multi_token_attention": lambda d: (
        lambda s, w, b: multi_token_attention(s, w, b, padding=1),
        [_leaf(2, 2, 5, 5, device=d), _leaf(2, 2, 3, 3, device=d, scale=1 / 3), _leaf(2, device=d)],
        [0],
    ),
    "fused_moe_experts": lambda d: (
        fused_moe_experts,
        [_leaf(6, 8, device=d), torch.randint(0, 3, (6, 2), device=d), _leaf(6, 2, device=d),
         _leaf(3, 2 * 4, 8, device=d, scale=1 / math.sqrt(8)), _leaf(3, 8, 4, device=d, scale=0.5)],
        [0],
    ),
}


def _grads(op, inputs, edit, scales, weights, in_place):
    """Gradients of the leaves after op's outputs `edit` were scaled (in place or not) and weighted-summed."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = op(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    for i in edit:
        if in_place:
            outs[i].mul_(scales[i])
        else:
            outs[i] = outs[i] * scales[i]
    sum(((y.double() * w).sum() for y, w in zip(outs, weights) if y.requires_grad)).backward()
    return [t.grad for t in leaves if t.requires_grad]


def _check(op, inputs, edit):
    with torch.no_grad():
        out = op(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    device = outs[0].device
    scales = [torch.rand(y.shape, device=device) + 0.5 for y in outs]
    weights = [torch.randn(y.shape, dtype=torch.float64, device=device) for y in outs]
    expected = _grads(op, inputs, edit, scales, weights, in_place=False)
    actual = _grads(op, inputs, edit, scales, weights, in_place=True)
    assert len(actual) == len(expected) > 0
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None and a.shape == e.shape
        assert_close(a, e, torch.float32, name=f"grad {i}")


@pytest.mark.parametrize("lead", [(2, 3), (6,)], ids=["3d", "2d"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_output_modified_in_place(case, lead, device):
    _check(*CASES[case](lead, device))


@pytest.mark.parametrize("case", sorted(FIXED_CASES))
def test_output_modified_in_place_fixed_shapes(case, device):
    _check(*FIXED_CASES[case](device))


SAVED_OUTPUT_CASES = {
    # (op, its torch reference, inputs, index of the output the backward needs)
    "softmax": (softmax, softmax_reference, lambda d: [_leaf(2, 3, H, device=d)], 0),
    "softmax_dim1": (
        lambda x: softmax(x, 1), lambda x: softmax_reference(x, 1), lambda d: [_leaf(2, 3, H, device=d)], 0
    ),
    "sparsemax": (sparsemax, sparsemax_reference, lambda d: [_leaf(2, 3, H, device=d)], 0),
    "fused_add_rms_norm_new_residual": (
        fused_add_rms_norm,
        fused_add_rms_norm_reference,
        lambda d: [_leaf(2, 3, H, device=d), _leaf(2, 3, H, device=d), _leaf(H, device=d)],
        1,
    ),
}


@pytest.mark.parametrize("case", sorted(SAVED_OUTPUT_CASES))
def test_saved_output_modified_in_place(case, device):
    # The edit itself is allowed (no view made inside the Function); the backward then refuses, as the
    # torch reference's does, because the output it saved has changed.
    op, reference, make_inputs, index = SAVED_OUTPUT_CASES[case]
    inputs = make_inputs(device)
    for fn in (reference, op):
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        outs[index].mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            sum(y.sum() for y in outs).backward()
