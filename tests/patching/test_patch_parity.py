"""Patched vs unpatched real transformers models (tiny random configs), Triton kernels under the
interpreter: training loss and every parameter's gradient, eval logits, generate()."""

import pytest
import torch
from patching_helpers import ARCHITECTURES, batch, expected_kinds, kernel_patches
from tolerances import assert_model_close

from liger_plugins.patching import apply_liger


def _train_step(model, ids, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out


def assert_grads_close(model, reference, dtype):
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p_ref.grad is not None:
            assert_model_close(p.grad, p_ref.grad, dtype, name)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_loss_gradients_and_logits_match(build, model_type):
    reference, model = build(model_type), build(model_type)
    summary = apply_liger(model)
    assert {item.split(":")[0] for item in kernel_patches(summary)} == expected_kinds(model_type), str(summary)

    ids, labels = batch(model.config.vocab_size)
    out_ref = _train_step(reference, ids, labels)
    out = _train_step(model, ids, labels)
    assert out.logits is None  # the fused loss never materialized them
    assert type(out) is type(out_ref)  # MoE models keep MoeCausalLMOutputWithPast
    assert_model_close(out.loss, out_ref.loss, torch.float32, "loss")
    assert_grads_close(model, reference, torch.float32)

    reference.eval()
    model.eval()
    with torch.no_grad():  # evaluation: the original forward, with the kernels inside the layers
        eval_ref = reference(input_ids=ids, labels=labels)
        eval_out = model(input_ids=ids, labels=labels)
    assert_model_close(eval_out.logits, eval_ref.logits, torch.float32, "logits")
    assert_model_close(eval_out.loss, eval_ref.loss, torch.float32, "eval loss")


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3_next", "nemotron"])
def test_bf16_is_bounded(build, model_type):
    reference = build(model_type, dtype=torch.bfloat16)
    model = build(model_type, dtype=torch.bfloat16)
    apply_liger(model)
    ids, labels = batch(model.config.vocab_size)
    loss_ref = _train_step(reference, ids, labels).loss.float()
    loss = _train_step(model, ids, labels).loss.float()
    assert abs(loss - loss_ref) <= 1e-2 * loss_ref  # the loss itself is rounded to bf16 (~0.4%)
    assert_grads_close(model, reference, torch.bfloat16)


# Hybrid caches (linear attention, Mamba), MoE, post-norms, complex rotary, logit multiplier, per-layer
# inputs (Gemma 4), compressed-attention caches (DeepSeek V4).
GENERATE_TYPES = ["llama", "gemma3_text", "phi3", "mixtral", "qwen3_next", "qwen3_5_moe_text", "falcon_h1",
                  "llama4_text", "gpt_oss", "nemotron", "exaone4", "hunyuan_v1_moe", "gemma4_text", "deepseek_v4"]


@pytest.mark.parametrize("model_type", GENERATE_TYPES)
def test_generate_is_unchanged(build, model_type):
    reference, model = build(model_type), build(model_type)
    apply_liger(model)
    ids, _ = batch(model.config.vocab_size, batch_size=1, seq=6)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = reference.eval().generate(ids, **kwargs)
    assert torch.equal(model.eval().generate(ids, **kwargs), expected)
