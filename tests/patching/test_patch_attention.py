"""qkv_projections: the attention forward with its three input projection calls rewritten into one
op (linear_projections); the rest of the forward is the original's code. Same training as the
unpatched model; hooks, non-Linear projections and forwards of another shape keep the modules' calls."""

import traceback

import pytest
import torch
from patching_helpers import assert_same_training, batch, loss_and_grads
from torch import nn
from transformers.models.llama import modeling_llama

from liger_kernels import functional as LF
from liger_plugins.patching import apply_liger, unpatch
from liger_plugins.patching.forwards import attention_projections_mismatch, is_liger

ONLY_QKV = dict(rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False, qkv_projections=True)


@pytest.fixture
def projection_calls(monkeypatch):
    """How many weights each linear_projections call of the patched attentions took."""
    calls = []

    def counting(x, weights, biases=None, _original=LF.linear_projections):
        calls.append(len(weights))
        return _original(x, weights, biases)

    monkeypatch.setattr(LF, "linear_projections", counting)
    return calls


@pytest.mark.parametrize("model_type, bias", [("llama", False), ("qwen3", False), ("qwen2", True)])
def test_one_projection_op_per_layer_same_training(build, projection_calls, model_type, bias):
    """Llama; Qwen3 (q/k norms around the projections); Qwen2 (q/k/v biases)."""
    reference, model = build(model_type), build(model_type)
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == bias
    summary = apply_liger(model, **ONLY_QKV)
    assert any(item.startswith("qkv_projections:") for item in summary.patched), str(summary)
    assert_same_training(model, *batch(model.config.vocab_size), reference)
    assert projection_calls == [3] * model.config.num_hidden_layers


def test_class_level_and_unpatch(build, projection_calls):
    original = modeling_llama.LlamaAttention.forward
    reference = build("llama")
    expected = loss_and_grads(reference, *batch(reference.config.vocab_size))  # a class patch changes it too
    apply_liger("llama", **ONLY_QKV)
    assert is_liger(modeling_llama.LlamaAttention.forward)
    # the rewritten forward keeps the original's decorators (transformers' keyword deprecation) and name
    assert modeling_llama.LlamaAttention.forward.__liger_original__ is original
    model = build("llama")
    assert_same_training(model, *batch(model.config.vocab_size), expected=expected)
    assert projection_calls == [3] * model.config.num_hidden_layers
    unpatch("llama")
    assert modeling_llama.LlamaAttention.forward is original


def test_hooks_and_adapters_keep_the_module_calls(build, projection_calls):
    """A hook on a projection, or a projection that is not a plain Linear (a LoRA-style wrapper), is
    called as a module: the hook fires, the wrapper computes, the values stay the original's."""
    reference, model = build("llama"), build("llama")
    apply_liger(model, **ONLY_QKV)
    seen = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))

    class Scaled(nn.Module):  # not an nn.Linear: must be called
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x) * 1.0

    for m in (model, reference):
        m.model.layers[1].self_attn.v_proj = Scaled(m.model.layers[1].self_attn.v_proj)
    assert_same_training(model, *batch(model.config.vocab_size), reference)
    assert len(seen) == 1
    assert projection_calls == [3] * (model.config.num_hidden_layers - 2)


class _TwiceQ(nn.Module):
    def forward(self, hidden_states):
        return self.q_proj(hidden_states) + self.q_proj(hidden_states) + self.k_proj(hidden_states) + self.v_proj(
            hidden_states)


class _Reassigns(nn.Module):
    def forward(self, hidden_states):
        hidden_states = hidden_states * 2
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)


class _OtherInput(nn.Module):
    def forward(self, hidden_states, other):
        return self.q_proj(hidden_states), self.k_proj(other), self.v_proj(hidden_states)


class _InABlock(nn.Module):
    def forward(self, hidden_states, flag=False):
        q = self.q_proj(hidden_states)
        if flag:
            q = q + self.k_proj(hidden_states)
        return q, self.v_proj(hidden_states)


class _Super(nn.Module):
    def forward(self, hidden_states):
        super().forward
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)


@pytest.mark.parametrize("cls, reason", [(_TwiceQ, "calls self.q_proj other than once"),
                                         (_Reassigns, "reassigns hidden_states"),
                                         (_OtherInput, "calls self.k_proj other than once"),
                                         (_InABlock, "inside a block"), (_Super, "super()")])
def test_forwards_of_another_shape_are_not_rewritten(cls, reason):
    assert attention_projections_mismatch(modeling_llama.LlamaAttention) is None
    assert reason in attention_projections_mismatch(cls)


def test_an_attention_of_another_shape_keeps_its_forward(build, monkeypatch, projection_calls):
    def forward(self, hidden_states, *args, **kwargs):  # still correct, but projects differently
        return original(self, hidden_states + 0, *args, **kwargs)

    original = modeling_llama.LlamaAttention.forward
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    model = build("llama")
    summary = apply_liger(model, **ONLY_QKV)
    assert any("qkv_projections: LlamaAttention" in item and "kept the original" in item
               for item in summary.skipped), str(summary)
    model(input_ids=batch(model.config.vocab_size)[0])
    assert projection_calls == []


def test_float64_keeps_the_module_calls(build, projection_calls):
    """A dtype the kernels do not take (float64: gradcheck) runs the projections as modules."""
    reference, model = build("llama", dtype=torch.float64), build("llama", dtype=torch.float64)
    apply_liger(model, **ONLY_QKV)
    ids, labels = batch(model.config.vocab_size)
    loss, loss_ref = loss_and_grads(model, ids, labels)[0], loss_and_grads(reference, ids, labels)[0]
    assert projection_calls == [] and torch.equal(loss, loss_ref)


def test_errors_point_into_the_modeling_file(build):
    """The rewritten forward is compiled with the original's file name and line numbers."""
    model = build("llama")
    apply_liger(model, **ONLY_QKV)
    attention = model.model.layers[0].self_attn
    with pytest.raises(Exception) as info:
        attention(torch.randn(1, 3, model.config.hidden_size), position_embeddings=None, attention_mask=None)
    # unpacking position_embeddings=None fails: the frame shows that line of the modeling file
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert frame.filename == modeling_llama.__file__ and "= position_embeddings" in frame.line, frame
