"""fused_add_rms_norm in pre-norm decoder layers: the residual joins in the norms' kernels (the layer
input's two gradients in input_layernorm's backward; `residual + attention` and post_attention_layernorm
as one kernel), only where the installed layer forward is the structure the replacement re-implements."""

import pytest
import torch
from patching_helpers import assert_same_training, batch
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3

from liger_kernels import functional as LF
from liger_plugins.patching import apply_liger
from liger_plugins.patching.forwards import is_liger, prenorm_layer_mismatch



@pytest.fixture
def fused_calls(monkeypatch):
    """The names of the residual-joining ops the patched layers called, in order."""
    calls = []
    for name in ("fused_add_rms_norm", "rms_norm_with_residual", "gated_mlp"):
        def counting(*args, _original=getattr(LF, name), _name=name, **kwargs):
            if _name != "gated_mlp":
                calls.append(_name)
            elif len(args) > 5 and args[5] is not None:  # the residual argument
                calls.append("gated_mlp+residual")
            return _original(*args, **kwargs)

        monkeypatch.setattr(LF, name, counting)
    return calls


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_one_fused_add_norm_per_layer_same_training(build, fused_calls, model_type):
    # Only this patch (the norms' own forwards stay transformers'): Gemma's offset-1 norm included.
    reference, model = build(model_type), build(model_type)
    summary = apply_liger(model, rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False,
                          fused_add_rms_norm=True)
    assert any(item.startswith("fused_add_rms_norm:") for item in summary.patched), str(summary)
    ids, labels = batch(model.config.vocab_size)
    assert_same_training(model, ids, labels, reference)
    assert fused_calls == ["rms_norm_with_residual", "fused_add_rms_norm"] * model.config.num_hidden_layers


def test_residual_joins_in_down_proj_with_our_mlp(build, fused_calls):
    """With the gated MLP patched too (one gated_mlp op), `residual + mlp` is summed in down_proj's
    product; a hook on the MLP (which would see the extra keyword) keeps the separate add. Same
    training either way."""
    reference, model = build("llama"), build("llama")
    apply_liger(model, rope=False, fused_linear_cross_entropy=False)
    ids, labels = batch(model.config.vocab_size)
    assert_same_training(model, ids, labels, reference)
    per_layer = ["rms_norm_with_residual", "fused_add_rms_norm", "gated_mlp+residual"]
    assert fused_calls == per_layer * model.config.num_hidden_layers
    fused_calls.clear()
    model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: None)
    assert_same_training(model, ids, labels, reference)
    assert fused_calls[:2] == per_layer[:2] and fused_calls[2:5] == per_layer


def test_layers_of_another_structure_keep_their_forward(build, monkeypatch, fused_calls):
    assert prenorm_layer_mismatch(modeling_llama.LlamaDecoderLayer) is None
    assert "resid_attn_dropout" in prenorm_layer_mismatch(modeling_phi3.Phi3DecoderLayer)

    original = modeling_llama.LlamaDecoderLayer.forward

    def scaled_residual(self, hidden_states, **kwargs):  # e.g. a version that scales the residual branch
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + 0.5 * hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", scaled_residual)
    reason = prenorm_layer_mismatch(modeling_llama.LlamaDecoderLayer)
    assert reason is not None and "statements" in reason
    model = build("llama")
    summary = apply_liger(model)
    assert not any(item.startswith("fused_add_rms_norm") for item in summary.patched), str(summary)
    assert any(item.startswith("fused_add_rms_norm") and "statements" in item for item in summary.skipped)
    assert not any(is_liger(layer.__dict__.get("forward")) for layer in model.model.layers)
    model(**dict(zip(("input_ids", "labels"), batch(model.config.vocab_size)))).loss.backward()
    assert not fused_calls
    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", original)
    summary = apply_liger("llama")  # class level: the same check
    assert any(item.startswith("fused_add_rms_norm") for item in summary.patched), str(summary)


def test_hooked_norm_or_positional_arguments_run_the_original(build, fused_calls):
    reference, model = build("llama", num_hidden_layers=3), build("llama", num_hidden_layers=3)
    apply_liger(model, rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False,
                fused_add_rms_norm=True)
    seen = []
    model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *args: seen.append("post"))
    model.model.layers[1].input_layernorm.register_forward_hook(lambda *args: seen.append("input"))
    ids, labels = batch(model.config.vocab_size)
    assert_same_training(model, ids, labels, reference)
    assert seen == ["post", "input"]  # the hooks ran: those norms were called as modules
    # layer 0: the original forward; layer 1: its input norm as a module, then the fused add + norm
    assert fused_calls == ["fused_add_rms_norm", "rms_norm_with_residual", "fused_add_rms_norm"]

    # A positional argument after hidden_states: the original forward takes it.
    layer, layer_ref = model.model.layers[2], reference.model.layers[2]
    h = torch.randn(2, 5, model.config.hidden_size)
    cos_sin = model.model.rotary_emb(h, torch.arange(5)[None])
    fused_calls.clear()
    out = layer(h, None, position_embeddings=cos_sin)
    assert not fused_calls
    torch.testing.assert_close(out, layer_ref(h, None, position_embeddings=cos_sin))


def test_gradient_checkpointing_still_recomputes_the_layers(build, fused_calls):
    # transformers after 5.17 checkpoints inside the layer class's forward: a replaced forward must hand
    # checkpointed calls to it, or checkpointing would silently stop (all activations kept).
    reference, model = build("llama"), build("llama")
    apply_liger(model, rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False,
                fused_add_rms_norm=True)
    for m in (model, reference):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    attention_calls = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *args: attention_calls.append(1))
    ids, labels = batch(model.config.vocab_size)
    assert_same_training(model, ids, labels, reference)
    assert len(attention_calls) == 2 * model.config.num_hidden_layers  # forward, then the recompute
    model.gradient_checkpointing_disable()
    attention_calls.clear()
    fused_calls.clear()
    assert_same_training(model, ids, labels, reference)
    assert len(attention_calls) == model.config.num_hidden_layers
    assert fused_calls == ["rms_norm_with_residual", "fused_add_rms_norm"] * model.config.num_hidden_layers


def _checkpointed_calls(model):
    """Checkpointed layer calls in one training step of `model` (non-reentrant checkpointing)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []
    for layer in model.model.layers:
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=checkpoint, **k: calls.append(1) or _f(*a, **k)
    ids, labels = batch(model.config.vocab_size)
    model(input_ids=ids, labels=labels).loss.backward()
    return len(calls)


@pytest.mark.parametrize("fsdp2", [False, True])
@pytest.mark.parametrize("level", ["class", "instance"])
def test_checkpointing_survives_class_patches_and_fsdp2(build, level, fsdp2, tmp_path):
    """transformers' wrapper checkpoints only while it is the layer class's forward: the patched forward
    on the class, or FSDP2's subclass of a patched instance's class, must still checkpoint each layer once
    (none: all activations kept; twice: recomputed twice)."""
    if level == "class":
        apply_liger("llama", rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False,
                    fused_add_rms_norm=True)
        model = build("llama")
    else:
        model = build("llama")
        apply_liger(model, rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False,
                    fused_add_rms_norm=True)
    if not fsdp2:
        assert _checkpointed_calls(model) == model.config.num_hidden_layers
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model.model.layers[0]).__name__.startswith("FSDP")
        assert _checkpointed_calls(model) == model.config.num_hidden_layers
    finally:
        torch.distributed.destroy_process_group()


def test_subclass_of_a_patched_layer_checkpoints_once(build):
    # A subclass calling super().forward() gets transformers' wrapper, which checkpoints the call: the
    # class-level patched forward inside it must not checkpoint again (each layer recomputed twice).
    apply_liger("llama", rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False,
                fused_add_rms_norm=True)

    class Traced(modeling_llama.LlamaDecoderLayer):
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(hidden_states, *args, **kwargs)

    model = build("llama")
    for layer in model.model.layers:
        layer.__class__ = Traced
    assert _checkpointed_calls(model) == model.config.num_hidden_layers


def test_follows_the_rms_norm_flag_unless_given(build):
    def kinds(**flags):
        summary = apply_liger(build("llama"), **flags)
        return {item.split(":")[0] for item in summary.patched}

    assert "fused_add_rms_norm" not in kinds(rms_norm=False)  # "no RMSNorm kernel" means none
    assert "fused_add_rms_norm" in kinds(rms_norm=False, fused_add_rms_norm=True)
    assert "fused_add_rms_norm" not in kinds(fused_add_rms_norm=False)
