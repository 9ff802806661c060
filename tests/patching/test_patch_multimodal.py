"""Vision-language models (`*ForConditionalGeneration`): patched vs unpatched tiny random models, Triton
kernels under the interpreter, images fed through the vision tower where the model takes them simply.

Configs: configs/tiny/multimodal/<name>.json (text: 2 layers, hidden 64, vocab 320; vision: 1-2 layers,
hidden 32, 16x16 images of 4x4 patches). `llava_pixtral` is a Llava with a Pixtral vision tower and a
Mistral language model (Pixtral-12B's layout). Llama 4's own forward fails in this transformers version
(see BROKEN_FORWARD): its parts are checked by test_llama4_vision_and_language_parts_match."""

import json

import pytest
import torch
from patching_helpers import TINY, kernel_patches
from patching_helpers import batch as text_batch
from tolerances import assert_model_close
import transformers
from packaging.version import Version
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.llama import modeling_llama
from transformers.models.llama4 import modeling_llama4
from transformers.models.mistral import modeling_mistral
from transformers.models.pixtral import modeling_pixtral

from liger_plugins.patching import TRAITS, AutoLigerKernelForCausalLM, apply_liger, get_traits, unpatch
from liger_kernels import functional as LF
from liger_kernels.ops.rope import rope
from liger_plugins.patching.forwards import is_liger
from liger_plugins.patching.fused_forward import computes_default_loss

MULTIMODAL = TINY / "multimodal"
# Models whose unpatched forward itself fails in some transformers versions (no reference to compare with):
# name -> (the error, the first version that works).
BROKEN_FORWARD = {
    # transformers 5.24: Llama4ForConditionalGeneration.forward reads `image_outputs` off its language
    # model's MoeCausalLMOutputWithPast, which has no such field, with or without images; 5.25 works.
    "llama4": (AttributeError, "5.25"),
}
MODELS = [
    pytest.param(name, marks=pytest.mark.xfail(
        Version(transformers.__version__) < Version(BROKEN_FORWARD[name][1]), raises=BROKEN_FORWARD[name][0],
        reason="the unpatched forward fails in this transformers version", strict=True))
    if name in BROKEN_FORWARD else name
    for name in sorted(p.stem for p in MULTIMODAL.glob("*.json"))
]
IMAGE = 319  # image token id of every tiny config (the last of the vocabulary)
FP32 = torch.float32


def mm_config(name: str):
    spec = json.loads((MULTIMODAL / f"{name}.json").read_text())
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


@pytest.fixture
def build_mm():
    """build_mm(name, seed=0) -> a fresh model (the same seed gives the same weights); unpatched at the end."""
    built = []

    def _build(name, seed=0):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(mm_config(name), dtype=FP32)
        built.append(model)
        return model

    yield _build
    for model in built:
        unpatch(model)
    unpatch()


# Flattened patches with an image_grid_thw, image tokens marked in mm_token_type_ids.
_QWEN_STYLE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe")


def _image_inputs(name: str, config, g: torch.Generator):
    """(number of image tokens per image, extra forward inputs) for one 16x16 image per sequence, or
    (0, {}) for the models fed text only here (mllama's tiled cross-attention inputs)."""
    vision = config.vision_config
    if name in _QWEN_STYLE:
        # Flattened patches (temporal 2 x 4 x 4 x 3 channels) of a 4x4 grid, merged 2x2 into 4 tokens.
        width = 3 * vision.temporal_patch_size * vision.patch_size**2
        return 4, {"pixel_values": torch.randn(2 * 16, width, generator=g),
                   "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]])}
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    if name == "gemma3":
        return config.mm_tokens_per_image, {"pixel_values": pixels}
    if name == "gemma4":  # 16 flattened 4x4 patches with their (x, y) grid positions, pooled 2x2 into 4 tokens
        y, x = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        positions = torch.stack([x.flatten(), y.flatten()], dim=-1).expand(2, -1, -1)
        return 4, {"pixel_values": torch.rand(2, 16, 48, generator=g), "image_position_ids": positions}
    if name == "llama4":  # 16 patches, pixel-shuffled 2x2 into 4 tokens
        return 4, {"pixel_values": pixels}
    if name in ("paligemma", "llava"):
        return 16, {"pixel_values": pixels}  # one token per patch
    if name == "llava_pixtral":
        return 16, {"pixel_values": pixels, "image_sizes": torch.tensor([[16, 16], [16, 16]])}
    if name in ("internvl", "smolvlm"):  # 16 patches, pixel-shuffled 2x2 into 4 tokens
        return 4, {"pixel_values": pixels if name == "internvl" else pixels[:, None]}
    return 0, {}


def inputs(name: str, model, seed: int = 1):
    """Two sequences of 24 tokens, each with its image's tokens after 2 text tokens, labels with the
    image tokens and a few more positions ignored."""
    g = torch.Generator().manual_seed(seed)
    n_image, extra = _image_inputs(name, model.config, g)
    ids = torch.randint(3, 300, (2, 24), generator=g)  # clear of the special tokens 300-319
    ids[:, 2:2 + n_image] = IMAGE
    labels = ids.clone()
    labels[ids == IMAGE] = -100
    labels[0, :2] = -100
    if name in _QWEN_STYLE:
        extra["mm_token_type_ids"] = (ids == IMAGE).int()
    if name == "gemma3":
        extra["token_type_ids"] = (ids == IMAGE).long()
    if name == "gemma4":  # bidirectional attention over each image's tokens
        extra["mm_token_type_ids"] = (ids == IMAGE).long()
    return dict(input_ids=ids, labels=labels, **extra)


def _train_step(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out


def _assert_grads_close(model, reference):
    pairs = list(zip(model.named_parameters(), reference.named_parameters(), strict=True))
    largest = max(p_ref.grad.abs().max().item() for _, (_, p_ref) in pairs if p_ref.grad is not None)
    for (name, p), (_, p_ref) in pairs:
        assert (p.grad is None) == (p_ref.grad is None), name
        if p_ref.grad is None:
            continue
        if p_ref.grad.abs().max() <= 1e-7 * largest:
            # zero up to rounding (attention key biases: softmax ignores a shift of every score)
            assert p.grad.abs().max() <= 1e-7 * largest, name
        else:
            assert_model_close(p.grad, p_ref.grad, FP32, name)


def _all_traits(model):
    traits = get_traits(model.config.model_type)
    subs = [getattr(model.config, s).model_type for s in traits.sub_configs]
    return [traits] + [TRAITS[t] for t in subs if t in TRAITS]


def _expected_kinds(model):
    parts = _all_traits(model)
    head = parts[0].cls(parts[0].causal_lm)  # Llama 4's is its text Llama4ForCausalLM
    fused = isinstance(model, head) and computes_default_loss(type(model).forward)
    kinds = {"fused_linear_cross_entropy"} if fused else set()
    present = {type(m) for m in model.modules()}
    for part in parts:
        kinds |= {"rms_norm"} if any(part.cls(n) in present for n in part.norms) else set()
        kinds |= {"swiglu"} if any(part.cls(n) in present for n in (*part.mlps, *part.experts)) else set()
        kinds |= {"rope"} if part.rope else set()
        kinds |= {"fused_add_rms_norm"} if any(part.cls(n) in present for n in part.decoder_layers) else set()
        kinds |= {"qkv_projections"} if any(part.cls(n) in present for n in part.attentions) else set()
    kinds |= {"layer_norm"} if parts[0].torch_layer_norm and nn.LayerNorm in present else set()
    return kinds


@pytest.mark.parametrize("name", MODELS)
def test_loss_gradients_and_logits_match(build_mm, name):
    reference, model = build_mm(name), build_mm(name)
    summary = apply_liger(model)
    assert {item.split(":")[0] for item in kernel_patches(summary)} == _expected_kinds(model), str(summary)
    for path, module in model.named_modules():  # the whole vision tower too
        if type(module) is nn.LayerNorm:
            assert is_liger(module.forward), path

    batch = inputs(name, model)
    out_ref = _train_step(reference, batch)
    out = _train_step(model, batch)
    assert type(out) is type(out_ref)
    if "fused_linear_cross_entropy" in _expected_kinds(model):
        assert out.logits is None  # the fused loss never materialized them
    assert_model_close(out.loss, out_ref.loss, FP32, "loss")
    _assert_grads_close(model, reference)
    if "pixel_values" in batch:  # the image went through the vision tower / projector into the loss
        text = ("language_model", "text_model", "lm_head")
        image_grads = [p.grad for n, p in model.named_parameters() if not any(t in n for t in text)]
        assert any(g is not None and g.abs().sum() > 0 for g in image_grads)

    reference.eval()
    model.eval()
    with torch.no_grad():  # evaluation: the original forward, with the kernels inside the layers
        eval_ref = reference(**batch)
        eval_out = model(**batch)
    assert_model_close(eval_out.logits, eval_ref.logits, FP32, "logits")
    assert_model_close(eval_out.loss, eval_ref.loss, FP32, "eval loss")


@pytest.mark.parametrize("name", ["gemma3", "llava", "qwen2_vl", "qwen3_5", "gemma4"])
def test_generate_is_unchanged(build_mm, name):
    reference, model = build_mm(name), build_mm(name)
    apply_liger(model)
    batch = inputs(name, model)
    batch.pop("labels")
    per_sequence = ("input_ids", "token_type_ids", "mm_token_type_ids", "image_position_ids")
    batch = {k: v[:1] if k in per_sequence else v for k, v in batch.items()}
    if "image_grid_thw" in batch:  # one image: its 16 flattened patches
        batch["pixel_values"], batch["image_grid_thw"] = batch["pixel_values"][:16], batch["image_grid_thw"][:1]
    else:
        batch["pixel_values"] = batch["pixel_values"][:1]
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = reference.eval().generate(**batch, **kwargs)
    assert torch.equal(model.eval().generate(**batch, **kwargs), expected)


def test_wrapper_patches_its_language_model_and_reverts(build_mm):
    """Llava: the language model's architecture (Mistral here) comes from text_config; its rope is
    patched while the model is, and every function and forward is restored by unpatch."""
    model = build_mm("llava_pixtral")
    original_rope = modeling_mistral.apply_rotary_pos_emb
    summary = apply_liger(model)
    text = str(summary)
    assert "rms_norm: MistralRMSNorm.forward (5 modules)" in summary.patched, text
    assert "rms_norm: PixtralRMSNorm.forward (5 modules)" in summary.patched, text
    assert "swiglu: PixtralMLP.forward (2 modules)" in summary.patched, text
    assert is_liger(modeling_mistral.apply_rotary_pos_emb)
    assert not is_liger(modeling_pixtral.apply_rotary_pos_emb)  # Pixtral's 2-D rotary keeps its own
    unpatch(model)
    assert modeling_mistral.apply_rotary_pos_emb is original_rope
    assert not any(is_liger(m.__dict__.get("forward")) for m in model.modules())


def test_unsupported_language_model_is_reported(build_mm):
    config = mm_config("llava")
    config.text_config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=1, n_head=2, vocab_size=320)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    try:
        summary = apply_liger(model)
        assert "text_config: model type 'gpt2' is not supported (keeps its forwards)" in summary.skipped
        assert any(item.startswith("layer_norm: LayerNorm.forward") for item in summary.patched)
    finally:
        unpatch(model)


def test_class_level_patches_own_classes_and_says_what_it_cannot(build_mm):
    summary = apply_liger("llava")
    text = str(summary)
    assert is_liger(modeling_pixtral.PixtralRMSNorm.forward)
    assert any("text_config: that sub-model's architecture is known only" in s for s in summary.skipped), text
    assert any("torch.nn.LayerNorm (vision tower): patched on a built model only" in s
               for s in summary.skipped), text
    assert not is_liger(nn.LayerNorm.forward) and not is_liger(modeling_llama.LlamaRMSNorm.forward)
    unpatch("llava")
    assert not is_liger(modeling_pixtral.PixtralRMSNorm.forward)


def test_class_level_patch_of_a_vision_language_model_matches(build_mm):
    """Class level (before building), then the model trains as the unpatched one does."""
    reference = build_mm("qwen2_5_vl")
    apply_liger("qwen2_5_vl")
    model = build_mm("qwen2_5_vl")
    assert is_liger(model.forward) and is_liger(model.model.visual.blocks[0].mlp.forward)
    batch = inputs("qwen2_5_vl", model)
    out_ref, out = _train_step(reference, batch), _train_step(model, batch)
    assert out.logits is None
    assert_model_close(out.loss, out_ref.loss, FP32, "loss")


def test_own_loss_forward_is_not_replaced():
    """A head that computes its own loss (Gemma3ForConditionalGeneration before transformers 5.2x, on the
    attention mask's positions) keeps its forward."""

    def forward(self, input_ids=None, labels=None):
        logits = self.lm_head(self.model(input_ids)[0])
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    def default(self, input_ids=None, labels=None):
        return self.loss_function(self.lm_head(self.model(input_ids)[0]), labels, 320)

    assert not computes_default_loss(forward) and computes_default_loss(default)


def _llama4_inputs_embeds(model, batch):
    """What Llama4ForConditionalGeneration.forward feeds its language model: the token embeddings with the
    projected image features scattered over the image tokens."""
    features = model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).last_hidden_state
    projected = model.multi_modal_projector(features.reshape(-1, features.shape[-1]))
    embeds = model.get_input_embeddings()(batch["input_ids"])
    return embeds.masked_scatter((batch["input_ids"] == IMAGE)[..., None], projected)


def test_llama4_vision_and_language_parts_match(build_mm):
    """Llama 4 (its own forward fails in this transformers version, see BROKEN_FORWARD): the instance patch
    reaches the vision encoder's LayerNorms and the text norms, MLPs and rotary; the vision tower, projector
    and language model, wired as its forward wires them, train as the unpatched ones do."""
    reference, model = build_mm("llama4"), build_mm("llama4")
    summary = apply_liger(model)
    assert {item.split(":")[0] for item in kernel_patches(summary)} == _expected_kinds(model), str(summary)
    assert "loss: the model is not a Llama4ForCausalLM" in summary.skipped, str(summary)
    assert is_liger(modeling_llama4.apply_rotary_emb)
    assert all(is_liger(m.forward) for m in model.modules() if type(m) is nn.LayerNorm)

    batch = inputs("llama4", model)
    for m in (reference, model):
        m.train()
    loss_ref = reference.language_model(inputs_embeds=_llama4_inputs_embeds(reference, batch),
                                        labels=batch["labels"]).loss
    loss = model.language_model(inputs_embeds=_llama4_inputs_embeds(model, batch), labels=batch["labels"]).loss
    loss_ref.backward()
    loss.backward()
    assert_model_close(loss, loss_ref, FP32, "loss")
    _assert_grads_close(model, reference)
    assert model.vision_model.layernorm_pre.weight.grad.abs().sum() > 0  # the image reached the loss


@pytest.mark.parametrize("name", ["llama4", "qwen3_5", "qwen3_5_moe"])
def test_vl_config_as_causal_lm_gets_the_fused_loss(name, build_mm):
    """AutoModelForCausalLM builds the text-only causal LM from these vision-language configs (e.g.
    Llama4ForCausalLM from a Llama 4 config). AutoLigerKernelForCausalLM patches the config's model type and
    its text model's type (which the qwen3_5 text classes belong to): the fused loss runs and matches.
    (build_mm: its teardown unpatches every class.)"""
    config = mm_config(name)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, dtype=FP32)
    torch.manual_seed(0)
    model = AutoLigerKernelForCausalLM.from_config(config, dtype=FP32)
    assert type(model).__name__.endswith("ForCausalLM") and is_liger(model.forward)
    if name == "llama4":
        assert type(model) is modeling_llama4.Llama4ForCausalLM
    ids, labels = text_batch(model.config.vocab_size)
    out_ref = _train_step(reference, {"input_ids": ids, "labels": labels})
    out = _train_step(model, {"input_ids": ids, "labels": labels})
    assert out.logits is None
    assert_model_close(out.loss, out_ref.loss, FP32, "loss")
    _assert_grads_close(model, reference)


def test_gemma4_audio_tower_norm_outputs_modified_in_place():
    """Gemma 4's audio feed-forward scales its post-norm's output in place (`h *= post_layer_scale`): the
    patched norm must return a tensor autograd lets it modify, and the tower must train as before."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel

    config = AutoConfig.for_model("gemma4_audio", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  subsampling_conv_channels=[8, 4], output_proj_dims=32, conv_kernel_size=3)
    torch.manual_seed(0)
    reference = Gemma4AudioModel(config).float()
    torch.manual_seed(0)
    model = Gemma4AudioModel(config).float()
    features = torch.randn(2, 32, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 32, dtype=torch.bool)
    reference(features, attention_mask=mask).last_hidden_state.square().sum().backward()
    apply_liger("gemma4")
    try:
        assert is_liger(model.layers[0].feed_forward1.post_layer_norm.forward)
        out = model(features, attention_mask=mask).last_hidden_state
        out.square().sum().backward()
    finally:
        unpatch("gemma4")
    assert_model_close(out, reference(features, attention_mask=mask).last_hidden_state, FP32, "audio output")
    _assert_grads_close(model, reference)


def test_pixtral_vision_encoder_alone(monkeypatch):
    """Pixtral's vision encoder as its own model type (no language-model head): norms, gated MLPs and
    its rotate-half rotary on (patches, head_dim) tables of 2-D positions; outputs and gradients match."""
    config = AutoConfig.for_model(**json.loads((MULTIMODAL / "llava_pixtral.json").read_text())["vision_config"])
    pixels = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(3))  # 4 x 3 patches
    sizes = torch.tensor([[16, 12], [8, 12]])

    def run(model):
        model.zero_grad(set_to_none=True)
        out = model(pixels.clone(), image_sizes=sizes).last_hidden_state
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach()

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(AutoModel.from_config(config))
    reference, model = models
    original_rope = modeling_pixtral.apply_rotary_pos_emb
    summary = apply_liger(model)
    try:
        assert set(kernel_patches(summary)) == {
            "rms_norm: PixtralRMSNorm.forward (5 modules)", "swiglu: PixtralMLP.forward (2 modules)",
            "rope: transformers.models.pixtral.modeling_pixtral.apply_rotary_pos_emb (module level, rope kernel)",
        }, str(summary)
        skipped = "loss: model type 'pixtral' has no language-model head (a vision encoder): nothing to fuse"
        assert skipped in summary.skipped
        expected = run(reference)  # the rope patch is module level: the reference runs it too
        rope_calls = []
        monkeypatch.setattr(LF, "rope", lambda *a: rope_calls.append(a[4]) or rope(*a))
        assert_model_close(run(model), expected, FP32, "last_hidden_state")
        assert rope_calls == [1, 1]  # both layers, on the (1, patches, head_dim) tables
        _assert_grads_close(model, reference)
    finally:
        unpatch(model)
    assert modeling_pixtral.apply_rotary_pos_emb is original_rope
    assert_model_close(expected, run(reference), FP32, "rope kernel vs transformers' rotary")

    apply_liger("pixtral")  # class level: the same classes
    try:
        assert is_liger(modeling_pixtral.PixtralRMSNorm.forward) and is_liger(modeling_pixtral.apply_rotary_pos_emb)
    finally:
        unpatch("pixtral")
    assert not is_liger(modeling_pixtral.PixtralRMSNorm.forward)
