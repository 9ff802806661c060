"""The rotary variants (Qwen2-VL M-RoPE, Llama 4 complex RoPE) and the opt-in fused MoE experts in real
tiny models: which function each architecture gets patched in the installed transformers, that the
model really calls the kernel, the patched model's loss / every gradient / logits against the
unpatched one, and that unpatching restores the originals.

Transformers 5.1x (the axolotl virtualenv) has Qwen2-VL's `apply_multimodal_rotary_pos_emb`; later
versions call plain `apply_rotary_pos_emb`. Both branches run here: the installed one in the models,
the other on a stand-in function set on the modeling module."""

import json

import pytest
import torch
from patching_helpers import TINY, batch
from tolerances import assert_model_close
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.models.mixtral import modeling_mixtral
from transformers.models.qwen2_vl import modeling_qwen2_vl

import liger_kernels.functional as LF
from liger_plugins.patching import apply_liger, get_traits, unpatch
from liger_plugins.patching.forwards import is_liger

FP32 = torch.float32


def _installed_rope(model_type: str):
    """(modeling module, the rotary function name patched in this transformers, its kernel)."""
    traits = get_traits(model_type)
    module = traits.modeling_module()
    spec = next(spec for spec in traits.rope if hasattr(module, spec.function))
    return module, spec.function, spec.kernel


def _count_calls(monkeypatch, name: str) -> list:
    """Count the calls of `liger_kernels.functional.<name>` (the patched functions look it up per call)."""
    calls = []
    kernel = getattr(LF, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(LF, name, counted)
    return calls


def _train_step(model, **inputs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out


def _assert_same_training(model, reference, **inputs):
    out_ref, out = _train_step(reference, **inputs), _train_step(model, **inputs)
    assert_model_close(out.loss, out_ref.loss, FP32, "loss")
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p_ref.grad is not None:
            assert_model_close(p.grad, p_ref.grad, FP32, name)
    reference.eval()
    model.eval()
    with torch.no_grad():
        assert_model_close(model(**inputs).logits, reference(**inputs).logits, FP32, "logits")


# ------------------------------------------------------------------------------------------------ rope


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llama4_text"])
def test_installed_rotary_function_is_patched_and_restored(model_type):
    module, name, kernel = _installed_rope(model_type)
    original = getattr(module, name)
    summary = apply_liger(model_type)
    try:
        assert f"rope: {module.__name__}.{name} (module level, {kernel} kernel)" in summary.patched, str(summary)
        assert is_liger(getattr(module, name)) and getattr(module, name).__name__ == name
    finally:
        unpatch(model_type)
    assert getattr(module, name) is original


def test_qwen2_vl_model_calls_its_rotary_kernel(monkeypatch):
    _, _, kernel = _installed_rope("qwen2_vl")  # mrope on transformers 5.1x, rope after
    calls = _count_calls(monkeypatch, kernel)
    spec = json.loads((TINY / "multimodal" / "qwen2_vl.json").read_text())
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    apply_liger(model)
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 300, (1, 6)))
    finally:
        unpatch(model)
    assert calls == [kernel] * spec["text_config"]["num_hidden_layers"]


def _hf_multimodal_rotary(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    """Transformers 5.1x's Qwen2-VL formula: component i % 3 of the tables for run i of each half."""
    sections = list(mrope_section) * 2

    def select(t):
        return torch.cat([m[i % 3] for i, m in enumerate(t.split(sections, dim=-1))], dim=-1).unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = select(cos), select(sin)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def test_multimodal_rotary_branch_uses_the_mrope_kernel(monkeypatch):
    """Where the module defines `apply_multimodal_rotary_pos_emb` (transformers 5.1x), it is the one
    patched, with the M-RoPE kernel; the patched function matches the original, gradients included."""
    monkeypatch.setattr(modeling_qwen2_vl, "apply_multimodal_rotary_pos_emb", _hf_multimodal_rotary, raising=False)
    calls = _count_calls(monkeypatch, "mrope")
    summary = apply_liger("qwen2_vl")
    try:
        patched = modeling_qwen2_vl.apply_multimodal_rotary_pos_emb
        assert is_liger(patched), str(summary)
        assert not any(item.startswith("rope") and "apply_rotary_pos_emb " in item for item in summary.patched)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 3, 5, 16, generator=g, requires_grad=True)
        k = torch.randn(2, 1, 5, 16, generator=g, requires_grad=True)
        angle = torch.rand(3, 2, 5, 16, generator=g) * 6
        section = [2, 3, 3]
        out = patched(q, k, angle.cos(), angle.sin(), section)
        q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
        ref = _hf_multimodal_rotary(q64, k64, angle.double().cos(), angle.double().sin(), section)
        dq, dk = torch.randn_like(ref[0]), torch.randn_like(ref[1])
        torch.autograd.backward(out, (dq.float(), dk.float()))
        torch.autograd.backward(ref, (dq, dk))
        for name, actual, expected in (("q_embed", out[0], ref[0]), ("k_embed", out[1], ref[1]),
                                       ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad)):
            assert_model_close(actual, expected, FP32, name)
        assert calls == ["mrope"]
    finally:
        unpatch("qwen2_vl")
    assert modeling_qwen2_vl.apply_multimodal_rotary_pos_emb is _hf_multimodal_rotary


def test_llama4_model_calls_the_complex_rope_kernel(build, monkeypatch):
    calls = _count_calls(monkeypatch, "llama4_rope")
    model = build("llama4_text")
    apply_liger(model)
    with torch.no_grad():
        model(input_ids=batch(model.config.vocab_size)[0])
    n_rope_layers = sum(1 for layer in model.model.layers if layer.self_attn.use_rope)
    assert n_rope_layers >= 1 and calls == ["llama4_rope"] * n_rope_layers


# ----------------------------------------------------------------------------------------------- fused MoE


@pytest.mark.parametrize("model_type, experts", [("qwen3_moe", "Qwen3MoeExperts"), ("mixtral", "MixtralExperts")])
def test_fused_moe_matches_and_unpatches(build, monkeypatch, model_type, experts):
    calls = _count_calls(monkeypatch, "fused_moe_experts")
    reference, model = build(model_type), build(model_type)
    modules = [m for m in model.modules() if type(m).__name__ == experts]
    summary = apply_liger(model, fused_moe=True, rope=False)  # rope: covered by the parity tests
    assert f"fused_moe: {experts}.forward ({len(modules)} module{'s' * (len(modules) > 1)})" in summary.patched
    ids, labels = batch(model.config.vocab_size)
    _assert_same_training(model, reference, input_ids=ids, labels=labels)
    assert len(calls) == 2 * len(modules)  # the patched model's train step and eval
    unpatch(model)
    assert not any("forward" in m.__dict__ for m in modules)


def test_fused_moe_is_off_by_default(build):
    summary = apply_liger(build("qwen3_moe"), rope=False)
    assert not any(item.startswith("fused_moe") for item in summary.patched + summary.skipped), str(summary)


def test_fused_moe_skips_experts_it_does_not_compute(build):
    model = build("qwen3_moe", hidden_act="gelu")
    summary = apply_liger(model, fused_moe=True, rope=False)
    assert any("fused_moe: Qwen3MoeExperts.forward: activation GELUActivation (the kernel is SiLU-gated)" in s
               for s in summary.skipped), str(summary)
    unpatch(model)
    model = build("qwen3_moe")
    next(m for m in model.modules() if type(m).__name__ == "Qwen3MoeExperts").is_transposed = True
    summary = apply_liger(model, fused_moe=True, rope=False)
    assert any("expert layout is_transposed=True (kept the original)" in s for s in summary.skipped), str(summary)


def test_fused_moe_class_level(build):
    """Patched before building (the class is shared, so the reference runs before the patch)."""
    original = modeling_mixtral.MixtralExperts.__dict__["forward"]
    reference = build("mixtral")
    ids, labels = batch(reference.config.vocab_size)
    loss_ref = _train_step(reference, input_ids=ids, labels=labels).loss
    summary = apply_liger("mixtral", fused_moe=True, rope=False)
    assert "fused_moe: MixtralExperts.forward" in summary.patched, str(summary)
    model = build("mixtral")
    assert is_liger(model.model.layers[0].mlp.experts.forward)
    assert_model_close(_train_step(model, input_ids=ids, labels=labels).loss, loss_ref, FP32, "loss")
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert_model_close(p.grad, p_ref.grad, FP32, name)
    unpatch("mixtral")
    assert modeling_mixtral.MixtralExperts.__dict__["forward"] is original
