"""Class-level patching of every architecture that has a tiny config: each class the traits name
exists in the installed transformers and gets its replacement (no missing hook), and unpatching
restores exactly what was there. Numbers are checked by test_patch_parity.py; this is fast (no model
is built), so it catches a renamed class or hook of a new transformers release at once."""

import pytest
import torch
from patching_helpers import ARCHITECTURES, batch, expected_kinds, kernel_patches
from tolerances import assert_model_close
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from liger_plugins.patching import apply_liger, get_traits, unpatch
from liger_plugins.patching.forwards import is_liger
from liger_plugins.patching.fused_forward import base_model


def _patched_classes(traits):
    names = (*traits.norms, *traits.layer_norms, *traits.mlps, *traits.experts, *traits.decoder_layers,
             *traits.attentions, traits.causal_lm)
    return [traits.cls(name) for name in names]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_class_level_patch_finds_every_component(model_type):
    traits = get_traits(model_type)
    classes = _patched_classes(traits)
    module = traits.modeling_module()
    before = {cls: dict(vars(cls)) for cls in classes}
    rope = next((r.function for r in traits.rope if hasattr(module, r.function)), None)
    rope_before = getattr(module, rope) if rope else None
    try:
        summary = apply_liger(model_type)
        assert {item.split(":")[0] for item in kernel_patches(summary)} == expected_kinds(model_type), str(summary)
        assert len(kernel_patches(summary)) == len(classes) + (rope is not None), str(summary)
        assert not [item for item in summary.skipped if "hook" in item], str(summary)
    finally:
        unpatch(model_type)
    assert {cls: dict(vars(cls)) for cls in classes} == before
    if rope:
        assert getattr(module, rope) is rope_before


def test_base_model_under_another_name(build):
    # Llama4ForCausalLM declares base_model_prefix "language_model" but calls self.model.
    model = build("llama4_text")
    assert model.base_model_prefix == "language_model" and not hasattr(model, "language_model")
    assert base_model(model) is model.model
    llama = build("llama")
    assert base_model(llama) is llama.model


@pytest.mark.parametrize("model_type", ["llama4_text", "hunyuan_v1_moe"])
def test_moe_without_aux_loss_keeps_router_logits(build, model_type):
    model = build(model_type)
    apply_liger(model)
    assert not get_traits(model_type).moe  # their causal LM adds no load-balancing loss
    ids, labels = batch(model.config.vocab_size)
    out = model(input_ids=ids, labels=labels, output_router_logits=True)
    assert isinstance(out, MoeCausalLMOutputWithPast) and out.aux_loss is None
    assert out.router_logits is not None and len(out.router_logits) >= 1


def test_weightless_norms_keep_their_forward(build):
    """Gemma 4 builds some Gemma4RMSNorm without a weight (with_scale=False: the attention's v_norm, the
    router's norm): at class level their patched forward falls back to the original, and the model trains
    as before."""
    reference = build("gemma4_text")
    ids, labels = batch(reference.config.vocab_size)
    expected = reference(input_ids=ids, labels=labels).loss  # before any patch
    apply_liger("gemma4_text")
    model = build("gemma4_text")
    v_norm = model.model.layers[0].self_attn.v_norm
    assert not hasattr(v_norm, "weight") and is_liger(type(v_norm).forward)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None  # the fused loss
    assert_model_close(out.loss, expected, torch.float32, "loss")
