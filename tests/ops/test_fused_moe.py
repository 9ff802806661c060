"""fused_moe / fused_moe_experts: Triton grouped GEMMs (interpreter on CPU) and the torch reference vs
float64 math. Every output is a sum over hidden and intermediate products of rounded intermediates
(as in transformers' per-expert loop), so comparisons use the reduction tolerances."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.fused_moe import (
    fused_moe,
    fused_moe_experts,
    fused_moe_experts_reference,
    fused_moe_reference,
    moe_routing,
)
from tests.tolerances import assert_as_accurate_as_torch, assert_close


def _weights(n_experts, n_h, n_i, dtype, device):
    gate_up = torch.randn(n_experts, 2 * n_i, n_h, device=device) / n_h**0.5
    down = torch.randn(n_experts, n_h, n_i, device=device) / n_i**0.5
    return gate_up.to(dtype), down.to(dtype)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _check_moe(n_tokens, n_h, n_i, n_experts, top_k, dtype, device, normalize=True, logits=None):
    x = torch.randn(n_tokens, n_h, device=device).to(dtype)
    if logits is None:
        logits = torch.randn(n_tokens, n_experts, device=device)
    gate_up, down = _weights(n_experts, n_h, n_i, dtype, device)
    grad = torch.randn(n_tokens, n_h, device=device).to(dtype)

    inputs = _leaves(x, logits, gate_up, down)
    out = fused_moe(*inputs, top_k, normalize)
    out.backward(grad)
    ref_inputs = _leaves(*(t.double() for t in (x, logits, gate_up, down)))
    ref = fused_moe_reference(*ref_inputs, top_k, normalize)
    ref.backward(grad.double())

    assert out.dtype == dtype and out.shape == (n_tokens, n_h)
    assert_close(out, ref, dtype, reduction=True, name="out")
    for name, t, r in zip(("hidden", "router_logits", "gate_up", "down"), inputs, ref_inputs):
        assert_close(t.grad, r.grad, dtype, reduction=True, name=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n_tokens, n_h, n_i, n_experts, top_k",
    [(13, 24, 20, 5, 2), (7, 17, 9, 4, 1), (1, 7, 3, 8, 2)],
)
def test_fused_moe_matches_float64(n_tokens, n_h, n_i, n_experts, top_k, dtype, device):
    _check_moe(n_tokens, n_h, n_i, n_experts, top_k, dtype, device)


def test_fused_moe_unnormalized_fp16(device):
    _check_moe(11, 33, 18, 6, 2, torch.float16, device, normalize=False)


def test_fused_moe_wide_rows(device):
    # Hidden and intermediate sizes spanning several K and N tiles, hidden size 1 never a multiple of a block.
    _check_moe(9, 70, 41, 4, 2, torch.float32, device)
    _check_moe(5, 1, 1, 4, 2, torch.float32, device)


def test_fused_moe_expert_without_tokens(device):
    # Expert 2 is never chosen: its weight gradients are zeros, written by the kernel (outputs start NaN).
    logits = torch.randn(10, 5, device=device)
    logits[:, 2] = -30.0
    _check_moe(10, 19, 12, 5, 2, torch.float32, device, logits=logits)


def test_fused_moe_experts_no_expert_slots(device):
    # transformers marks slots of experts that live on other ranks with index E: they add nothing.
    n_tokens, n_h, n_i, n_experts, top_k = 9, 20, 11, 4, 2
    x = torch.randn(n_tokens, n_h, device=device)
    index = torch.randint(0, n_experts, (n_tokens, top_k), device=device)
    index[index == 1] = 0  # expert 1 gets no tokens
    index[::3, 1] = n_experts
    weights = torch.rand(n_tokens, top_k, device=device)
    gate_up, down = _weights(n_experts, n_h, n_i, torch.float32, device)
    grad = torch.randn(n_tokens, n_h, device=device)

    inputs = _leaves(x, weights, gate_up, down)
    out = fused_moe_experts(inputs[0], index, *inputs[1:])
    out.backward(grad)
    ref_inputs = _leaves(*(t.double() for t in (x, weights, gate_up, down)))
    ref = fused_moe_experts_reference(ref_inputs[0], index, *ref_inputs[1:])
    ref.backward(grad.double())
    assert_close(out, ref, torch.float32, reduction=True, name="out")
    for name, t, r in zip(("hidden", "top_k_weights", "gate_up", "down"), inputs, ref_inputs):
        assert_close(t.grad, r.grad, torch.float32, reduction=True, name=f"d{name}")
    assert torch.equal(inputs[1].grad[::3, 1], torch.zeros_like(inputs[1].grad[::3, 1]))
    assert torch.equal(inputs[2].grad[1], torch.zeros_like(inputs[2].grad[1]))


def test_fused_moe_non_contiguous(device):
    x = torch.randn(24, 10, device=device).t()  # (10, 24), column-major
    logits = torch.randn(4, 10, device=device).t()
    gate_up, down = _weights(4, 24, 16, torch.float32, device)
    out = fused_moe(x, logits, gate_up, down, 2)
    ref = fused_moe_reference(x.double(), logits.double(), gate_up.double(), down.double(), 2)
    assert_close(out, ref, torch.float32, reduction=True, name="out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_reference_path(dtype, device, monkeypatch):
    # CPU tensors without the interpreter dispatch to the torch reference; it must agree too.
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    _check_moe(12, 16, 10, 4, 2, dtype, device)


def test_fused_moe_empty(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    gate_up, down = _weights(4, 8, 6, torch.float32, device)
    out = fused_moe(x, torch.randn(0, 4, device=device), gate_up, down, 2)
    out.sum().backward()
    assert out.shape == (0, 8) and x.grad.shape == (0, 8)


def _bad(device, **overrides):
    args = dict(
        hidden=torch.randn(5, 8, device=device),
        router_logits=torch.randn(5, 4, device=device),
        gate_up_weight=torch.randn(4, 12, 8, device=device),
        down_weight=torch.randn(4, 8, 6, device=device),
        top_k=2,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"hidden": torch.randn(5, 9)}, ValueError, "hidden size"),
        ({"hidden": torch.randn(5, 8, dtype=torch.float64)}, TypeError, "hidden has dtype"),
        ({"hidden": torch.randn(5, 8, dtype=torch.bfloat16)}, TypeError, "same dtype"),
        ({"router_logits": torch.randn(5, 3)}, ValueError, "router_logits has 3 experts"),
        ({"router_logits": torch.randn(6, 4)}, ValueError, "router_logits must be"),
        ({"gate_up_weight": torch.randn(4, 11, 8)}, ValueError, "gate_up_weight must be"),
        ({"down_weight": torch.randn(4, 8, 5)}, ValueError, "down_weight must be"),
        ({"top_k": 5}, ValueError, "top_k"),
        ({"top_k": 0}, ValueError, "top_k"),
    ],
)
def test_fused_moe_bad_inputs(overrides, error, match, device):
    overrides = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()}
    with pytest.raises(error, match=match):
        fused_moe(**_bad(device, **overrides))


def test_fused_moe_experts_bad_index(device):
    x = torch.randn(3, 8, device=device)
    gate_up, down = _weights(4, 8, 6, torch.float32, device)
    weights = torch.rand(3, 2, device=device)
    if device == "cpu":  # on CUDA the range check is a device-side assert (no host sync): it ends the process
        with pytest.raises(ValueError, match=r"top_k_index values must be in \[0, 4\]"):
            fused_moe_experts(x, torch.tensor([[0, 1], [2, 5], [3, 3]], device=device), weights, gate_up, down)
    with pytest.raises(TypeError, match="top_k_index must be an integer"):
        fused_moe_experts(x, weights, weights, gate_up, down)
    with pytest.raises(ValueError, match="top_k_weights"):
        fused_moe_experts(x, torch.zeros(3, 2, dtype=torch.long, device=device), weights[:, :1], gate_up, down)


def _experts_loop_in_dtype(hidden, top_k_index, top_k_weights, gate_up, down):
    """transformers' per-expert loop without upcasting: what a bf16 model computes without our kernel."""
    F = torch.nn.functional
    out = torch.zeros_like(hidden)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(top_k_index == e)
        gate, up = F.linear(hidden[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e])
        out = out.index_add(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
    return out


def _check_moe_as_accurate_as_torch(n_tokens, n_h, n_i, n_experts, top_k, device, ref_dtype):
    """bf16 at sizes where each weight gradient sums hundreds of rounded rows: the error against the
    reference is held to plain bf16 torch's own error (fixed tolerances stop fitting there)."""
    x = torch.randn(n_tokens, n_h, device=device, dtype=torch.bfloat16)
    logits = torch.randn(n_tokens, n_experts, device=device)
    gate_up, down = _weights(n_experts, n_h, n_i, torch.bfloat16, device)
    grad = torch.randn(n_tokens, n_h, device=device, dtype=torch.bfloat16)
    runs = {
        "ours": (lambda h, r, g, d: fused_moe(h, r, g, d, top_k), None),
        "torch": (lambda h, r, g, d: _experts_loop_in_dtype(h, *moe_routing(r, top_k)[::-1], g, d), None),
        "reference": (lambda h, r, g, d: fused_moe_reference(h, r, g, d, top_k), ref_dtype),
    }
    results = {}
    for name, (fn, cast) in runs.items():
        inputs = _leaves(*(t.to(cast) if cast else t for t in (x, logits, gate_up, down)))
        out = fn(*inputs)
        out.backward(grad.to(out.dtype))
        results[name] = [out] + [t.grad for t in inputs]
    for i, name in enumerate(("out", "dhidden", "drouter_logits", "dgate_up", "ddown")):
        assert_as_accurate_as_torch(results["ours"][i], results["torch"][i], results["reference"][i], name=name)


def test_fused_moe_gpu_tiles(device, monkeypatch):
    # The GPU's tile sizes (BLOCK_M 64 at >= 64 rows per expert, BLOCK_N 128, BLOCK_K 64, weight-gradient
    # tiles 128 x 128 x 32) under the interpreter, where the tests otherwise use small tiles.
    import liger_kernels.ops.fused_moe as fm

    if liger_kernels._utils.INTERPRET:
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
        gpu_gemm, gpu_wgrad = fm._gemm_config(256 * 2, 4), fm._weight_grad_config()
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", True)
        monkeypatch.setattr(fm, "_gemm_config", lambda n_pairs, n_experts: (*gpu_gemm[:4], 1))
        monkeypatch.setattr(fm, "_weight_grad_config", lambda: (*gpu_wgrad[:4], 1))
    _check_moe_as_accurate_as_torch(256, 160, 96, 4, 2, device, torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("n_tokens, top_k", [(4096, 2), (8, 8)])
def test_fused_moe_gpu_sizes(n_tokens, top_k, device):
    # Qwen3-MoE-like expert sizes against the fp32 reference (float64 is slow on GPU).
    _check_moe_as_accurate_as_torch(n_tokens, 1024, 768, 32, top_k, device, torch.float32)


def test_fused_moe_experts_matches_transformers(device):
    # Same parameters in transformers' Qwen3-MoE experts module and in ours: the same output.
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from liger_kernels.nn import LigerFusedMoEExperts

    config = Qwen3MoeConfig(hidden_size=24, moe_intermediate_size=10, num_experts=6, num_experts_per_tok=2)
    ours = LigerFusedMoEExperts(6, 24, 10).to(device)
    theirs = Qwen3MoeExperts(config).to(device)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(11, 24, device=device)
    weights, index = torch.softmax(torch.randn(11, 6, device=device), -1).topk(2, dim=-1)
    assert_close(ours(x, index, weights), theirs(x, index, weights).double(), torch.float32, reduction=True, name="out")
