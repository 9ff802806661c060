"""apply_liger / unpatch / AutoLigerKernelForCausalLM mechanics, the fused forward's arguments, PEFT.

Tests about the patching mechanics run the CPU dispatch of the kernels (the torch references:
`reference_dispatch`), which is fast; tests whose point is the kernels' numbers in a model run
the Triton kernels under the interpreter (the default in tests)."""

import inspect
import logging

import pytest
import torch
from patching_helpers import batch, kernel_patches, tiny_config
from tolerances import assert_model_close
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3

import liger_kernels._utils
from liger_plugins.patching import (
    SUPPORTED_MODEL_TYPES,
    AutoLigerKernelForCausalLM,
    apply_liger,
    revert_liger,
    unpatch,
)
from liger_plugins.patching.forwards import causal_lm_cross_entropy, is_liger, make_rotary

FP32 = torch.float32


@pytest.fixture
def reference_dispatch(monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)


def _loss_and_grads(model, **inputs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training(model, reference, **inputs):
    out_ref, grads_ref = _loss_and_grads(reference, **inputs)
    out, grads = _loss_and_grads(model, **inputs)
    assert_model_close(out.loss, out_ref.loss, FP32, "loss")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_model_close(grads[name], grads_ref[name], FP32, name)
    return out, out_ref


def _instance_forwards(model):
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


LLAMA_CLASS_ATTRS = [
    (modeling_llama.LlamaRMSNorm, "forward"),
    (modeling_llama.LlamaMLP, "forward"),
    (modeling_llama.LlamaDecoderLayer, "forward"),
    (modeling_llama.LlamaAttention, "forward"),
    (modeling_llama.LlamaForCausalLM, "forward"),
]


# ------------------------------------------------------------------------------------ errors


def test_unknown_model_type_lists_supported(build):
    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*llama.*qwen3_moe"):
        apply_liger("gpt2")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300))
    with pytest.raises(ValueError, match="supported model types"):
        apply_liger(gpt2)
    with pytest.raises(ValueError, match="supported model types"):
        AutoLigerKernelForCausalLM.from_config(gpt2.config)
    assert "llama" in SUPPORTED_MODEL_TYPES and "gemma3_text" in SUPPORTED_MODEL_TYPES


def test_bad_arguments(build):
    with pytest.raises(ValueError, match="exclusive"):
        apply_liger("llama", cross_entropy=True, fused_linear_cross_entropy=True)
    with pytest.raises(TypeError, match="model type"):
        apply_liger(42)
    assert not is_liger(modeling_llama.LlamaRMSNorm.forward)  # the refused call patched nothing


def test_refuses_modules_that_do_not_match(build):
    model = build("llama")
    del model.model.layers[1].mlp.up_proj
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp' \(LlamaMLP\).*up_proj"):
        apply_liger(model)
    model = build("qwen3")
    model.model.layers[0].self_attn.q_norm.variance_epsilon = "small"
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_norm'.*variance_epsilon"):
        apply_liger(model)
    # refused before touching anything
    assert not any(_instance_forwards(model).values())
    assert not is_liger(modeling_llama.apply_rotary_pos_emb)


# ------------------------------------------------------------------ idempotence and unpatch


def test_instance_patch_is_idempotent_and_reverts(build, reference_dispatch):
    reference, model = build("llama"), build("llama")
    params = [id(p) for p in model.parameters()]
    original_rope = modeling_llama.apply_rotary_pos_emb
    first = apply_liger(model)
    forwards = _instance_forwards(model)
    assert is_liger(modeling_llama.apply_rotary_pos_emb)
    second = apply_liger(model)
    assert second.patched == [] and all("already patched" in s for s in second.skipped), str(second)
    assert _instance_forwards(model) == forwards
    assert [id(p) for p in model.parameters()] == params  # parameters are never replaced
    ids, labels = batch(model.config.vocab_size)
    _assert_same_training(model, reference, input_ids=ids, labels=labels)
    assert "rms_norm: LlamaRMSNorm.forward (5 modules)" in first.patched

    unpatch(model)
    assert not any(_instance_forwards(model).values())
    assert modeling_llama.apply_rotary_pos_emb is original_rope
    out_ref, _ = _loss_and_grads(reference, input_ids=ids, labels=labels)
    out, _ = _loss_and_grads(model, input_ids=ids, labels=labels)
    assert torch.equal(out.logits, out_ref.logits) and torch.equal(out.loss, out_ref.loss)
    unpatch(model)  # unpatching twice is harmless


def test_pickling_a_patched_model_is_refused_deepcopy_is_not(build, tmp_path):
    import copy

    model = build("llama")
    apply_liger(model, rope=False)
    with pytest.raises(TypeError, match=r"cannot be pickled whole .*unpatch\(model\)"):
        torch.save(model, tmp_path / "model.pt")
    twin = copy.deepcopy(model)  # e.g. TRL's reference model: patched like the original, bound to itself
    assert is_liger(twin.model.norm.forward) and twin.model.norm.forward.__self__ is twin.model.norm
    ids, labels = batch(model.config.vocab_size)
    assert torch.equal(twin(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss)
    unpatch(twin)
    unpatch(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss)


def test_rope_stays_while_another_model_holds_it(build, reference_dispatch):
    first, second = build("llama"), build("llama")
    original_rope = modeling_llama.apply_rotary_pos_emb
    apply_liger(first)
    apply_liger(second)
    revert_liger(first)
    assert is_liger(modeling_llama.apply_rotary_pos_emb)  # `second` still holds the module function
    unpatch(second)
    assert modeling_llama.apply_rotary_pos_emb is original_rope


def test_class_level_patch_then_build(build, reference_dispatch):
    originals = {(cls, attr): cls.__dict__[attr] for cls, attr in LLAMA_CLASS_ATTRS}
    original_rope = modeling_llama.apply_rotary_pos_emb
    reference = build("llama")
    ids, labels = batch(reference.config.vocab_size)
    out_ref, grads_ref = _loss_and_grads(reference, input_ids=ids, labels=labels)

    summary = apply_liger("llama")
    assert summary.level == "class" and len(kernel_patches(summary)) == 6, str(summary)
    assert all(is_liger(cls.__dict__[attr]) for cls, attr in LLAMA_CLASS_ATTRS)
    assert apply_liger("llama").patched == []  # idempotent
    model = build("llama")
    assert apply_liger(model).patched == []  # the instance already runs the class-level patches
    assert not any(_instance_forwards(model).values())
    out, grads = _loss_and_grads(model, input_ids=ids, labels=labels)
    assert out.logits is None
    assert_model_close(out.loss, out_ref.loss, FP32, "loss")
    for name in grads_ref:
        assert_model_close(grads[name], grads_ref[name], FP32, name)

    unpatch("llama")
    assert {(cls, attr): cls.__dict__[attr] for cls, attr in LLAMA_CLASS_ATTRS} == originals
    assert modeling_llama.apply_rotary_pos_emb is original_rope


def test_shared_patches_stay_while_another_model_type_holds_them(build):
    # transformers.masking_utils' functions serve every architecture, and Llava patches Pixtral's classes:
    # undoing one model type's class patches must leave what another patched model relies on.
    from transformers import masking_utils
    from transformers.models.pixtral import modeling_pixtral

    shared = ("_ignore_causal_mask_sdpa", "find_packed_sequence_indices")
    originals = {name: getattr(masking_utils, name) for name in shared}
    apply_liger("llama")
    mistral = build("mistral")
    apply_liger(mistral)  # instance level, while Llama's classes hold the shared functions
    unpatch("llama")
    assert all(is_liger(getattr(masking_utils, name)) for name in shared)
    unpatch(mistral)
    assert {name: getattr(masking_utils, name) for name in shared} == originals

    norm_forward = modeling_pixtral.PixtralRMSNorm.__dict__["forward"]
    apply_liger("llava")
    apply_liger("pixtral")  # Pixtral's norm class: already patched, for Llava
    unpatch("llava")
    assert is_liger(modeling_pixtral.PixtralRMSNorm.__dict__["forward"])  # still Pixtral's patch
    unpatch("pixtral")
    assert modeling_pixtral.PixtralRMSNorm.__dict__["forward"] is norm_forward


def test_summary_is_printable_and_logged(build, caplog, reference_dispatch):
    caplog.set_level(logging.INFO, logger="liger_plugins.patching")
    summary = apply_liger(build("glm4"), verbose=True)
    text = str(summary)
    assert "Glm4ForCausalLM instance" in text and "rms_norm: Glm4RMSNorm.forward" in text
    assert "rope: no rotary kernel fits this architecture's rotary layout" in text
    assert text in caplog.text


def test_activation_without_kernel_keeps_original(build):
    reference, model = build("llama", hidden_act="relu"), build("llama", hidden_act="relu")
    summary = apply_liger(model, rope=False)
    assert any("activation ReLU has no fused kernel" in s for s in summary.skipped), str(summary)
    assert not any(s.startswith("swiglu") for s in summary.patched)
    ids, labels = batch(model.config.vocab_size, seq=4)
    _assert_same_training(model, reference, input_ids=ids, labels=labels)


def test_gelu_erf_mlp_uses_geglu(build):
    reference, model = build("llama", hidden_act="gelu"), build("llama", hidden_act="gelu")
    summary = apply_liger(model, rope=False)
    assert "swiglu: LlamaMLP.forward (2 modules)" in summary.patched
    ids, labels = batch(model.config.vocab_size, seq=4)
    _assert_same_training(model, reference, input_ids=ids, labels=labels)


def test_partial_rotary_matches_phi3():
    rotary = make_rotary(modeling_phi3.apply_rotary_pos_emb)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    angles = torch.randn(1, 5, 4).repeat(1, 1, 2)  # rotary dim 8 of head dim 16, HF layout
    q_rot, k_rot = rotary(q, k, angles.cos(), angles.sin())
    q_ref, k_ref = modeling_phi3.apply_rotary_pos_emb(q, k, angles.cos(), angles.sin())
    assert_model_close(q_rot, q_ref, FP32, "q")
    assert_model_close(k_rot, k_ref, FP32, "k")
    assert torch.equal(q_rot[..., 8:], q[..., 8:])


# ------------------------------------------------------------------------- the fused forward


def test_fused_forward_arguments(build):
    reference, model = build("llama"), build("llama")
    apply_liger(model, rope=False)  # rope (slowest under the interpreter) is covered by the parity tests
    ids, labels = batch(model.config.vocab_size)
    # gradient accumulation: summed loss / items of the whole accumulated batch
    _assert_same_training(model, reference, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(23))
    # pre-shifted labels (context parallelism) over the positions kept by logits_to_keep
    shift = torch.randint(3, model.config.vocab_size, (2, 3))
    out, out_ref = _assert_same_training(
        model, reference, input_ids=ids, labels=labels, shift_labels=shift, logits_to_keep=3
    )
    assert out.logits is None and out_ref.logits.shape == (2, 3, model.config.vocab_size)
    # positional arguments and return_dict=False
    out_ref = reference(ids, None, None, None, None, labels, return_dict=False)
    out = model(ids, None, None, None, None, labels, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(out_ref) - 1 and out[1] is None  # no logits, no KV cache
    assert_model_close(out[0], out_ref[0], FP32, "loss")
    out = model(ids, None, None, None, None, labels, use_cache=True, return_dict=False)
    assert len(out) == len(out_ref) and out[1] is None and type(out[2]) is type(out_ref[2])  # the cache in place
    # A training loss builds no KV cache unless the caller asks for one, or passes position_ids (which
    # transformers would then search for packed sequences: the cache decides whether it does).
    assert model(input_ids=ids, labels=labels).past_key_values is None
    assert reference(input_ids=ids, labels=labels).past_key_values is not None
    cached = model(input_ids=ids, labels=labels, use_cache=True).past_key_values
    assert cached is not None and cached.get_seq_length() == ids.shape[1]
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    out, out_ref = _assert_same_training(model, reference, input_ids=ids, labels=labels, position_ids=packed)
    assert out.past_key_values is not None
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        model(ids, input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match="labels must cover exactly the kept positions"):
        model(input_ids=ids, labels=labels, logits_to_keep=2)


def test_no_packed_sequence_sync_for_the_models_own_positions(build, monkeypatch):
    """With the KV cache off, transformers searches position_ids for packed sequences with a host sync;
    the loss path answers "not packed" itself where the decoder made its own 0..T-1 positions, and
    leaves every other call to transformers' function."""
    from transformers import masking_utils

    calls = []
    original = masking_utils.find_packed_sequence_indices

    def counting(position_ids, *args, **kwargs):
        calls.append(position_ids.shape)
        return original(position_ids, *args, **kwargs)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", counting)
    reference, model = build("llama"), build("llama")
    ids, labels = batch(model.config.vocab_size)
    reference(input_ids=ids, labels=labels, use_cache=False)  # transformers' own: the check runs
    assert len(calls) == 1
    apply_liger(model, rope=False)
    assert is_liger(masking_utils.find_packed_sequence_indices)
    _assert_same_training(model, reference, input_ids=ids, labels=labels)  # ours: loss path, cache off
    assert len(calls) == 1  # the patched model's own positions skipped the check (the reference kept its cache)
    model(input_ids=ids, use_cache=False)  # not the loss path: transformers decides
    assert len(calls) == 2
    unpatch(model)
    assert masking_utils.find_packed_sequence_indices is counting


def test_fused_loss_chunks_by_the_model_budget(build, reference_dispatch, monkeypatch):
    from liger_kernels import functional as LF
    from liger_plugins.patching import fused_forward

    reference, model = build("llama"), build("llama")
    apply_liger(model, rope=False)
    seen = []
    fused = LF.fused_linear_cross_entropy
    monkeypatch.setattr(
        LF, "fused_linear_cross_entropy", lambda *a, **kw: seen.append(kw["chunk_size"]) or fused(*a, **kw)
    )
    ids, labels = batch(model.config.vocab_size, batch_size=4, seq=40)  # 160 rows (the last of each sequence ignored)
    vocab = model.config.vocab_size
    monkeypatch.setattr(fused_forward, "MODEL_LOSS_CHUNK_BYTES", 64 * vocab * 4)  # 64 rows of fp32 logits
    _assert_same_training(model, reference, input_ids=ids, labels=labels)
    monkeypatch.setattr(fused_forward, "MODEL_LOSS_CHUNK_BYTES", 10**9)
    _assert_same_training(model, reference, input_ids=ids, labels=labels)
    assert seen == [64, 160]


def test_patched_forward_keeps_the_signature(build):
    # HF Trainer drops the dataset columns that the model's forward does not name.
    model = build("llama")
    expected = inspect.signature(model.forward)
    apply_liger(model)
    assert inspect.signature(model.forward) == expected and "input_ids" in expected.parameters


def test_without_labels_or_grad_returns_logits(build, reference_dispatch):
    reference, model = build("gemma2"), build("gemma2")
    apply_liger(model)
    ids, labels = batch(model.config.vocab_size)
    out_ref = reference(input_ids=ids, logits_to_keep=1)
    out = model(input_ids=ids, logits_to_keep=1)
    assert out.logits.shape == (2, 1, model.config.vocab_size)
    assert_model_close(out.logits, out_ref.logits, FP32, "softcapped logits")
    with torch.no_grad():
        out_ref = reference(input_ids=ids, labels=labels)
        out = model(input_ids=ids, labels=labels)
    assert_model_close(out.logits, out_ref.logits, FP32, "logits")
    assert_model_close(out.loss, out_ref.loss, FP32, "loss")


def test_moe_router_aux_loss(build):
    reference, model = build("mixtral"), build("mixtral")
    apply_liger(model, rope=False)
    ids, labels = batch(model.config.vocab_size)
    out, out_ref = _assert_same_training(
        model, reference, input_ids=ids, labels=labels, output_router_logits=True
    )
    assert isinstance(out, MoeCausalLMOutputWithPast) and out.router_logits is not None
    assert_model_close(out.aux_loss, out_ref.aux_loss, FP32, "aux_loss")


def test_lm_head_hooks_wrap_the_fused_loss(build):
    # Sharding engines (FSDP2 on lm_head, ZeRO-3) gather the weight in forward hooks of lm_head.
    reference, model = build("qwen2"), build("qwen2")
    apply_liger(model, rope=False)
    calls = []
    model.lm_head.register_forward_pre_hook(lambda module, args: calls.append(type(args[0])))
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    ids, labels = batch(model.config.vocab_size, seq=4)
    out, _ = _assert_same_training(model, reference, input_ids=ids, labels=labels)
    assert calls == [torch.Tensor, torch.Size([])] and out.logits is None
    assert "forward" not in model.lm_head.__dict__


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_cross_entropy_on_logits(build, model_type):
    reference, model = build(model_type), build(model_type)
    summary = apply_liger(model, cross_entropy=True, fused_linear_cross_entropy=False, rope=False)
    assert f"cross_entropy: {type(model).__name__}.loss_function (1 module)" in summary.patched
    assert model.loss_function is causal_lm_cross_entropy
    ids, labels = batch(model.config.vocab_size, seq=4)
    out, out_ref = _assert_same_training(model, reference, input_ids=ids, labels=labels)
    assert_model_close(out.logits, out_ref.logits, FP32, "logits")
    _assert_same_training(model, reference, input_ids=ids, labels=labels, num_items_in_batch=5)
    unpatch(model)
    assert "_loss_function" not in model.__dict__


# ------------------------------------------------------------------------------ Auto class, PEFT


def test_auto_class_from_config_and_pretrained(build, tmp_path, reference_dispatch):
    model = AutoLigerKernelForCausalLM.from_config(tiny_config("qwen3"), swiglu=False)
    from transformers.models.qwen3 import modeling_qwen3

    assert type(model) is modeling_qwen3.Qwen3ForCausalLM
    assert is_liger(modeling_qwen3.Qwen3RMSNorm.forward) and not is_liger(modeling_qwen3.Qwen3MLP.forward)

    saved = build("smollm3")
    saved.save_pretrained(tmp_path)
    ids, labels = batch(saved.config.vocab_size)
    out_ref, _ = _loss_and_grads(saved, input_ids=ids, labels=labels)
    loaded = AutoLigerKernelForCausalLM.from_pretrained(tmp_path, rope=False)
    assert is_liger(type(loaded).forward)
    out, _ = _loss_and_grads(loaded, input_ids=ids, labels=labels)
    assert_model_close(out.loss, out_ref.loss, FP32, "loss")


@pytest.mark.parametrize("lora_on_lm_head", [False, True])
def test_peft_lora_model_is_patched_and_trains(build, lora_on_lm_head):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "gate_proj"] + (["lm_head"] if lora_on_lm_head else [])

    def lora_model():
        base = build("llama")
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        return get_peft_model(base, config)

    reference, model = lora_model(), lora_model()
    summary = apply_liger(model, rope=False)
    assert "fused_linear_cross_entropy: LlamaForCausalLM.forward (1 module)" in summary.patched
    assert isinstance(model.get_base_model().lm_head, nn.Linear) != lora_on_lm_head
    ids, labels = batch(model.config.vocab_size)
    _assert_same_training(model, reference, input_ids=ids, labels=labels)

    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.zero_grad()
    assert torch.isfinite(model(input_ids=ids, labels=labels).loss)
