"""Architecture traits: what to swap in each supported Hugging Face causal LM, as data, not model code.

Each `ArchitectureTraits` names the classes of one modeling module (`transformers.models.<x>.modeling_<x>`)
and how they compute, read from the module's source for transformers 5.x:

- norms: RMSNorm classes with their flavour (instances built without a weight, Gemma 4's
  `with_scale=False`, keep their own forward). `offset` is 1.0 for Gemma's `x * (1 + w)`; `casting_mode`
  "llama" normalizes in fp32, casts to the input dtype, then multiplies by the weight
  (`w * x.to(dtype)`), "gemma" does everything in fp32 and casts at the end (`(x * w).to(dtype)`;
  Olmo2 is "gemma" with offset 0). `in_place` lets the kernel's backward overwrite the incoming
  gradient; it is off where some instance of the class feeds its output straight into a residual
  add (Gemma2/3 and Olmo2/3 post-norms, GLM4's post-sublayer norms), because autograd hands that same
  gradient tensor to the residual branch too.
- layer_norms: LayerNorm classes (weight, optional bias) and the offset added to their weight: 0 for
  Cohere's, 1 for Nemotron's LayerNorm1P (`layer_norm(x, weight + 1, bias)`).
- mlps: gated MLP classes and their layout: "split" (gate_proj, up_proj, down_proj) or "fused"
  (Phi3/GLM4 gate_up_proj whose first half is the gate), and the attribute holding the activation.
  The activation decides the kernel at call time (silu -> swiglu, gelu tanh -> geglu tanh,
  gelu erf -> geglu none); any other activation runs the original forward.
- decoder_layers: decoder layer classes whose forward is the plain pre-norm layer (`residual +
  self_attn(input_layernorm(h))`, then `post_attention_layernorm`, `residual + mlp(...)`): with the
  `fused_add_rms_norm` flag the attention's residual add and the post-attention RMSNorm run as one
  kernel each way. The installed forward's statements are checked against that structure before it
  is replaced (forwards.prenorm_layer_mismatch), so a transformers version that changes it keeps its own.
- attentions: attention classes whose forward calls `self.q_proj(hidden_states)`, `self.k_proj(...)` and
  `self.v_proj(...)` once each: with the `qkv_projections` flag those three calls become one op that sums
  their input gradients in the products (forwards.make_attention_forward rewrites just those calls; a
  forward of another shape is checked and kept, forwards.attention_projections_mismatch).
- experts: MoE expert classes with 3-D `gate_up_proj` weights; their `_apply_gate(gate_up_out)` hook
  (used by transformers' grouped_mm/batched_mm expert implementations) gets the fused activation, and
  with the opt-in `fused_moe` flag their whole `forward(hidden_states, top_k_index, top_k_weights)`
  runs the fused MoE kernel where the experts are SiLU-gated in the default layout ([gate; up]
  (E, 2I, H) gate_up_proj, (E, H, I) down_proj, no bias; checked per module).
- rope: the module-level rotary function the attention calls by name, and the kernel that replaces it:
  "rope" (rotate-half `apply_rotary_pos_emb`), "mrope" (Qwen2-VL's `apply_multimodal_rotary_pos_emb`),
  "llama4_rope" (Llama 4's complex `apply_rotary_emb`). Alternatives, in order: the first function
  the installed modeling module defines is patched (transformers moved Qwen2-VL's M-RoPE section
  selection into its rotary embedding, whose attention then calls plain `apply_rotary_pos_emb`).
  Empty where no kernel fits the rotary layout (GLM4 and Cohere interleave pairs).
- causal_lm: the `*ForCausalLM` class; its logit post-processing: `softcap_config` (config attribute
  of the final tanh softcap) and `logit_scale` (a function of the model giving the multiplier applied
  to the logits: Granite divides by `config.logits_scaling`, Cohere multiplies by `model.logit_scale`).
- moe: the causal LM adds the router load-balancing loss (`load_balancing_loss_func` of the module).
- causal_lm may also be a `*ForConditionalGeneration` class (vision-language models): the same
  `base model -> lm_head` shape, its text settings (vocab, softcap, MoE) read from `config.get_text_config()`.
  None for a model type without a language-model head (Pixtral's vision encoder): no loss to patch.
- sub_configs: config attributes (e.g. "text_config") naming sub-models of another registered
  architecture (Llava's language model may be Llama, Mistral, Qwen2...): patching a built model also
  applies that architecture's module patches (norms, MLPs, experts, rope); class level cannot know it.
- torch_layer_norm: the model's plain `torch.nn.LayerNorm` modules (SigLIP/CLIP/ViT vision towers) get the
  layer-norm kernel on a built model; class level would change every LayerNorm in the process, so it
  leaves them.
- Class names are those of `module`; "pixtral.PixtralRMSNorm" names a class of another modeling module
  (a vision tower such as Pixtral's, used inside Llava).
- unpatched: components of the model that keep their own forward because no kernel computes them
  exactly (a different norm or activation formula, hybrid linear-attention / state-space layers); listed
  in the README support table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable


@dataclass(frozen=True)
class NormSpec:
    offset: float = 0.0
    casting_mode: str = "llama"
    in_place: bool = True


@dataclass(frozen=True)
class MLPSpec:
    layout: str = "split"  # "split": gate_proj/up_proj/down_proj; "fused": gate_up_proj/down_proj
    act_attr: str = "act_fn"


@dataclass(frozen=True)
class RopeSpec:
    function: str  # module-level function of the modeling module, called by name by the attention
    kernel: str = "rope"  # "rope" (rotate-half), "mrope" (multimodal sections), "llama4_rope" (complex)


_ROTATE_HALF = (RopeSpec("apply_rotary_pos_emb"),)
# Transformers 5.1x: `apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section)` on (3, B, T, D) tables;
# later versions select the sections in the rotary embedding and call plain `apply_rotary_pos_emb`.
_MROPE = (RopeSpec("apply_multimodal_rotary_pos_emb", "mrope"), RopeSpec("apply_rotary_pos_emb"))


@dataclass(frozen=True)
class ArchitectureTraits:
    model_type: str
    module: str
    causal_lm: str | None
    norms: dict[str, NormSpec] = field(default_factory=dict)
    layer_norms: dict[str, float] = field(default_factory=dict)
    mlps: dict[str, MLPSpec] = field(default_factory=dict)
    decoder_layers: tuple[str, ...] = ()
    attentions: tuple[str, ...] = ()
    experts: tuple[str, ...] = ()
    rope: tuple[RopeSpec, ...] = _ROTATE_HALF
    softcap_config: str | None = None
    logit_scale: Callable | None = None
    moe: bool = False
    unpatched: tuple[str, ...] = ()
    sub_configs: tuple[str, ...] = ()
    torch_layer_norm: bool = False

    def modeling_module(self) -> ModuleType:
        return importlib.import_module(self.module)

    def cls(self, name: str) -> type:
        if "." in name:  # a class of another modeling module: "pixtral.PixtralRMSNorm"
            other, name = name.split(".")
            module = importlib.import_module(_modeling(other))
        else:
            module = self.modeling_module()
        if not hasattr(module, name):
            raise ValueError(
                f"{module.__name__} has no class {name}: this transformers version does not match the "
                f"{self.model_type!r} traits of liger_plugins.patching"
            )
        return getattr(module, name)


def _granite_scale(model) -> float:
    return 1.0 / model.config.logits_scaling


def _cohere_scale(model) -> float:
    return float(model.logit_scale)


def _falcon_h1_scale(model) -> float:
    return float(model.model.lm_head_multiplier)


_VISION_ROPE = "vision rotary (apply_rotary_pos_emb_vision)"
_LLAMA = NormSpec()
_LLAMA_NOT_IN_PLACE = NormSpec(in_place=False)
_GEMMA = NormSpec(offset=1.0, casting_mode="gemma")
_GEMMA_NOT_IN_PLACE = NormSpec(offset=1.0, casting_mode="gemma", in_place=False)
_OLMO2 = NormSpec(offset=0.0, casting_mode="gemma", in_place=False)
_GEMMA4 = NormSpec(casting_mode="gemma", in_place=False)
_DEEPSEEK_V4 = NormSpec(casting_mode="gemma", in_place=False)  # fp32 weights: (w * x).to(dtype)
_SPLIT = MLPSpec()
_GEMMA4_UNPATCHED = (
    "rotary (apply_rotary_pos_emb rotates one tensor at a time)",
    "weightless Gemma4RMSNorm instances (with_scale=False: v_norm, router norm)",
)
_FUSED = MLPSpec(layout="fused", act_attr="activation_fn")


def _modeling(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


def _dense(model_type: str, prefix: str, norm: NormSpec = _LLAMA, module: str | None = None,
           prenorm_layer: bool = False, **extra):
    """Traits of a dense model whose classes follow the `<Prefix>RMSNorm / <Prefix>MLP` naming;
    `prenorm_layer`: its `<Prefix>DecoderLayer` is the plain pre-norm layer (see decoder_layers)."""
    return ArchitectureTraits(
        model_type=model_type,
        module=_modeling(module or model_type),
        causal_lm=f"{prefix}ForCausalLM",
        norms={f"{prefix}RMSNorm": norm},
        mlps={f"{prefix}MLP": extra.pop("mlp", _SPLIT)},
        decoder_layers=(f"{prefix}DecoderLayer",) if prenorm_layer else (),
        attentions=(f"{prefix}Attention",) if prenorm_layer else (),
        **extra,
    )


TRAITS: dict[str, ArchitectureTraits] = {
    t.model_type: t
    for t in [
        _dense("llama", "Llama", prenorm_layer=True),
        _dense("mistral", "Mistral", prenorm_layer=True),
        _dense("ministral", "Ministral", prenorm_layer=True),
        _dense("qwen2", "Qwen2", prenorm_layer=True),
        _dense("qwen3", "Qwen3", prenorm_layer=True),  # the same class also serves as q_norm/k_norm over head_dim
        _dense("smollm3", "SmolLM3", prenorm_layer=True),
        _dense("gemma", "Gemma", _GEMMA, prenorm_layer=True),
        _dense("gemma2", "Gemma2", _GEMMA_NOT_IN_PLACE, softcap_config="final_logit_softcapping"),
        _dense("gemma3_text", "Gemma3", _GEMMA_NOT_IN_PLACE, module="gemma3",
               softcap_config="final_logit_softcapping"),
        _dense("phi3", "Phi3", mlp=_FUSED),  # partial rotary handled by the rope wrapper
        _dense("granite", "Granite", logit_scale=_granite_scale),
        _dense("olmo2", "Olmo2", _OLMO2),
        _dense("olmo3", "Olmo3", _OLMO2),
        _dense("glm4", "Glm4", _LLAMA_NOT_IN_PLACE, mlp=_FUSED, rope=()),  # interleaved rotary
        ArchitectureTraits(
            model_type="mixtral",
            module=_modeling("mixtral"),
            causal_lm="MixtralForCausalLM",
            norms={"MixtralRMSNorm": _LLAMA},
            experts=("MixtralExperts",),
            moe=True,
        ),
        ArchitectureTraits(
            model_type="qwen3_moe",
            module=_modeling("qwen3_moe"),
            causal_lm="Qwen3MoeForCausalLM",
            norms={"Qwen3MoeRMSNorm": _LLAMA},
            mlps={"Qwen3MoeMLP": _SPLIT},  # dense layers (mlp_only_layers)
            decoder_layers=("Qwen3MoeDecoderLayer",),
            attentions=("Qwen3MoeAttention",),
            experts=("Qwen3MoeExperts",),
            moe=True,
        ),
        ArchitectureTraits(
            model_type="cohere",
            module=_modeling("cohere"),
            causal_lm="CohereForCausalLM",
            layer_norms={"CohereLayerNorm": 0.0},  # per-head q/k norms (2-D weight) keep their forward
            mlps={"CohereMLP": _SPLIT},
            rope=(),  # interleaved rotary
            logit_scale=_cohere_scale,
        ),
        # --- text models added for issue #11 (C1) ---
        ArchitectureTraits(
            model_type="llama4_text",  # Llama4ForCausalLM (the text part of Llama 4)
            module=_modeling("llama4"),
            causal_lm="Llama4ForCausalLM",
            norms={"Llama4TextRMSNorm": _LLAMA},
            mlps={"Llama4TextMLP": MLPSpec(act_attr="activation_fn")},  # dense layers and the shared expert
            rope=(RopeSpec("apply_rotary_emb", "llama4_rope"),),  # complex rotary on freqs_cis
            unpatched=(
                "Llama4TextExperts (bmm on a (experts, hidden, 2 * intermediate) gate_up_proj, no _apply_gate hook)",
                "Llama4TextL2Norm (weightless q/k norm)",
            ),
        ),
        ArchitectureTraits(
            model_type="qwen3_next",
            module=_modeling("qwen3_next"),
            causal_lm="Qwen3NextForCausalLM",
            norms={"Qwen3NextRMSNorm": _GEMMA},  # also the per-head q_norm/k_norm
            mlps={"Qwen3NextMLP": _SPLIT},  # dense layers and the shared expert
            experts=("Qwen3NextExperts",),
            moe=True,  # partial rotary handled by the rope wrapper
            unpatched=("Qwen3NextGatedDeltaNet linear-attention layers with their Qwen3NextRMSNormGated",),
        ),
        _dense("qwen3_5_text", "Qwen3_5", _GEMMA, module="qwen3_5",
               unpatched=("Qwen3_5GatedDeltaNet linear-attention layers with their Qwen3_5RMSNormGated",)),
        ArchitectureTraits(
            model_type="qwen3_5_moe_text",
            module=_modeling("qwen3_5_moe"),
            causal_lm="Qwen3_5MoeForCausalLM",
            norms={"Qwen3_5MoeRMSNorm": _GEMMA},
            mlps={"Qwen3_5MoeMLP": _SPLIT},  # the shared expert
            experts=("Qwen3_5MoeExperts",),
            moe=True,
            unpatched=("Qwen3_5MoeGatedDeltaNet linear-attention layers with their Qwen3_5MoeRMSNormGated",),
        ),
        ArchitectureTraits(
            model_type="gpt_oss",
            module=_modeling("gpt_oss"),
            causal_lm="GptOssForCausalLM",
            norms={"GptOssRMSNorm": NormSpec(casting_mode="gemma")},  # (w * x).to(dtype), no offset
            rope=(),
            moe=True,
            unpatched=(
                "GptOssExperts (clamped swiglu with alpha on interleaved gate/up, (up + 1) * glu)",
                "rotary (rotate-half, but cos/sin of half the head width)",
            ),
        ),
        ArchitectureTraits(
            model_type="nemotron",
            module=_modeling("nemotron"),
            causal_lm="NemotronForCausalLM",
            layer_norms={"NemotronLayerNorm1P": 1.0},
            unpatched=("NemotronMLP (relu² on up_proj, not gated)",),  # partial rotary: rope wrapper
        ),
        ArchitectureTraits(
            model_type="falcon_h1",
            module=_modeling("falcon_h1"),
            causal_lm="FalconH1ForCausalLM",
            norms={"FalconH1RMSNorm": _LLAMA},
            logit_scale=_falcon_h1_scale,
            unpatched=(
                "FalconH1MLP (multipliers on the gate input and the output)",
                "FalconH1Mixer Mamba-2 layers with their FalconH1RMSNormGated",
            ),
        ),
        _dense("hunyuan_v1_dense", "HunYuanDenseV1", prenorm_layer=True),  # also the per-head query/key_layernorm
        ArchitectureTraits(
            model_type="hunyuan_v1_moe",
            module=_modeling("hunyuan_v1_moe"),
            causal_lm="HunYuanMoEV1ForCausalLM",
            norms={"HunYuanMoEV1RMSNorm": _LLAMA},
            mlps={"HunYuanMoEV1MLP": _SPLIT},  # the shared MLP
            decoder_layers=("HunYuanMoEV1DecoderLayer",),
            attentions=("HunYuanMoEV1Attention",),
            experts=("HunYuanMoEV1Experts",),  # no router aux loss in its causal LM
        ),
        _dense("exaone4", "Exaone4", _LLAMA_NOT_IN_PLACE),  # post-sublayer norms feed the residual add
        # --- text models added for issue #11 (C3) ---
        ArchitectureTraits(
            model_type="gemma4_text",
            module=_modeling("gemma4"),
            causal_lm="Gemma4ForCausalLM",
            # (x * w).to(dtype), no offset; also the per-head q/k norms; post-norms feed the residual add
            norms={"Gemma4RMSNorm": _GEMMA4},
            mlps={"Gemma4TextMLP": _SPLIT},  # gelu tanh: geglu
            experts=("Gemma4TextExperts",),  # the MoE block of 26B-A4B (enable_moe_block)
            rope=(),
            softcap_config="final_logit_softcapping",
            unpatched=_GEMMA4_UNPATCHED,
        ),
        ArchitectureTraits(
            model_type="deepseek_v4",
            module=_modeling("deepseek_v4"),
            causal_lm="DeepseekV4ForCausalLM",
            norms={"DeepseekV4RMSNorm": _DEEPSEEK_V4},
            rope=(),
            moe=True,
            unpatched=(
                "DeepseekV4MLP shared experts and DeepseekV4Experts (SwiGLU on gate/up clamped to swiglu_limit)",
                "DeepseekV4UnweightedRMSNorm (weightless; q and hyper-connection inputs)",
                "rotary (interleaved pairs on the trailing rope slice, one tensor at a time)",
                "compressed sparse / heavily compressed attention with its indexer; mHC hyper-connections",
            ),
        ),
        # --- vision-language models added for issue #11 (C2): *ForConditionalGeneration heads ---
        ArchitectureTraits(
            model_type="gemma3",
            module=_modeling("gemma3"),
            causal_lm="Gemma3ForConditionalGeneration",  # applies no final softcap (unlike Gemma3ForCausalLM)
            norms={"Gemma3RMSNorm": _GEMMA_NOT_IN_PLACE},  # also the projector's mm_soft_emb_norm
            mlps={"Gemma3MLP": _SPLIT},
            torch_layer_norm=True,  # SigLIP vision tower
            unpatched=("SiglipMLP (fc1/fc2, not gated)",),
        ),
        ArchitectureTraits(
            model_type="mllama",
            module=_modeling("mllama"),
            causal_lm="MllamaForConditionalGeneration",  # (MllamaForCausalLM, text only, gets the module patches)
            norms={"MllamaTextRMSNorm": _LLAMA},  # also the cross-attention q/k norms
            mlps={"MllamaTextMLP": _SPLIT},
            torch_layer_norm=True,  # vision encoder
            unpatched=("MllamaVisionMLP (fc1/fc2, not gated)",),
        ),
        ArchitectureTraits(
            model_type="qwen2_vl",
            module=_modeling("qwen2_vl"),
            causal_lm="Qwen2VLForConditionalGeneration",
            norms={"Qwen2VLRMSNorm": _LLAMA},
            mlps={"Qwen2MLP": _SPLIT},  # the text MLP (this module's own class)
            rope=_MROPE,
            torch_layer_norm=True,  # vision blocks and patch merger
            unpatched=("VisionMlp (fc1/fc2, not gated)", _VISION_ROPE),
        ),
        ArchitectureTraits(
            model_type="qwen2_5_vl",
            module=_modeling("qwen2_5_vl"),
            causal_lm="Qwen2_5_VLForConditionalGeneration",
            norms={"Qwen2_5_VLRMSNorm": _LLAMA},  # text and vision blocks (pre-norms), patch merger
            mlps={"Qwen2MLP": _SPLIT, "Qwen2_5_VLMLP": _SPLIT},  # text MLP, gated vision MLP (with bias)
            rope=_MROPE,
            unpatched=(_VISION_ROPE,),
        ),
        ArchitectureTraits(
            model_type="qwen3_vl",
            module=_modeling("qwen3_vl"),
            causal_lm="Qwen3VLForConditionalGeneration",
            norms={"Qwen3VLTextRMSNorm": _LLAMA},  # also the per-head q_norm/k_norm
            mlps={"Qwen3VLTextMLP": _SPLIT},
            decoder_layers=("Qwen3VLTextDecoderLayer",),
            attentions=("Qwen3VLTextAttention",),
            rope=_ROTATE_HALF,  # sections interleaved by the rotary embedding
            torch_layer_norm=True,  # vision blocks and patch mergers
            unpatched=("Qwen3VLVisionMLP (not gated)", _VISION_ROPE),
        ),
        ArchitectureTraits(
            model_type="qwen3_vl_moe",
            module=_modeling("qwen3_vl_moe"),
            causal_lm="Qwen3VLMoeForConditionalGeneration",
            norms={"Qwen3VLMoeTextRMSNorm": _LLAMA},
            mlps={"Qwen3VLMoeTextMLP": _SPLIT},
            decoder_layers=("Qwen3VLMoeTextDecoderLayer",),
            attentions=("Qwen3VLMoeTextAttention",),
            experts=("Qwen3VLMoeTextExperts",),
            moe=True,
            rope=_ROTATE_HALF,  # sections interleaved by the rotary embedding
            torch_layer_norm=True,
            unpatched=("Qwen3VLMoeVisionMLP (not gated)", _VISION_ROPE),
        ),
        ArchitectureTraits(
            model_type="glm4v",
            module=_modeling("glm4v"),
            causal_lm="Glm4vForConditionalGeneration",
            # text post-sublayer norms feed the residual add; the vision post-conv norm feeds an add
            norms={"Glm4vRMSNorm": _LLAMA_NOT_IN_PLACE},
            mlps={"Glm4vTextMLP": _FUSED, "Glm4VisionMlp": _SPLIT},
            rope=(),
            torch_layer_norm=True,  # patch merger
            unpatched=("text rotary (interleaved pairs, M-RoPE sections)", _VISION_ROPE),
        ),
        ArchitectureTraits(
            model_type="glm4v_moe",
            module=_modeling("glm4v_moe"),
            causal_lm="Glm4vMoeForConditionalGeneration",
            norms={"Glm4vMoeTextRMSNorm": _LLAMA, "Glm4vMoeRMSNorm": _LLAMA_NOT_IN_PLACE},  # text, vision
            mlps={"Glm4vMoeTextMLP": _SPLIT, "Glm4vMoeisionMlp": _SPLIT},  # (sic: transformers' name)
            decoder_layers=("Glm4vMoeTextDecoderLayer",),
            attentions=("Glm4vMoeTextAttention",),
            experts=("Glm4vMoeTextExperts",),
            moe=True,
            rope=(),
            torch_layer_norm=True,
            unpatched=("text rotary (M-RoPE sections, partial)", _VISION_ROPE),
        ),
        # --- vision-language models added for issue #11 (C3) ---
        ArchitectureTraits(
            model_type="qwen3_5",
            module=_modeling("qwen3_5"),
            causal_lm="Qwen3_5ForConditionalGeneration",
            norms={"Qwen3_5RMSNorm": _GEMMA},
            mlps={"Qwen3_5MLP": _SPLIT},
            rope=_ROTATE_HALF,  # sections interleaved by the rotary embedding; partial rotary
            torch_layer_norm=True,  # vision blocks and patch merger
            unpatched=(
                "Qwen3_5GatedDeltaNet linear-attention layers with their Qwen3_5RMSNormGated",
                "Qwen3_5VisionMLP (not gated)",
                _VISION_ROPE,
            ),
        ),
        ArchitectureTraits(
            model_type="qwen3_5_moe",
            module=_modeling("qwen3_5_moe"),
            causal_lm="Qwen3_5MoeForConditionalGeneration",
            norms={"Qwen3_5MoeRMSNorm": _GEMMA},
            mlps={"Qwen3_5MoeMLP": _SPLIT},  # the shared expert
            experts=("Qwen3_5MoeExperts",),
            moe=True,
            rope=_ROTATE_HALF,
            torch_layer_norm=True,
            unpatched=(
                "Qwen3_5MoeGatedDeltaNet linear-attention layers with their Qwen3_5MoeRMSNormGated",
                "Qwen3_5MoeVisionMLP (not gated)",
                _VISION_ROPE,
            ),
        ),
        ArchitectureTraits(
            model_type="gemma4",
            module=_modeling("gemma4"),
            causal_lm="Gemma4ForConditionalGeneration",
            norms={"Gemma4RMSNorm": _GEMMA4},  # text, vision (and audio) towers
            mlps={"Gemma4TextMLP": _SPLIT, "Gemma4VisionMLP": _SPLIT},  # vision: on clippable linears
            experts=("Gemma4TextExperts",),
            rope=(),
            softcap_config="final_logit_softcapping",  # of the text config
            unpatched=(*_GEMMA4_UNPATCHED, "vision 2-D rotary (apply_multidimensional_rope)",
                       "audio tower's LayerNorms, feed-forwards (not gated) and convolutions"),
        ),
        ArchitectureTraits(
            model_type="llama4",
            module=_modeling("llama4"),
            # AutoModelForCausalLM builds Llama4ForCausalLM from a Llama 4 checkpoint: that one gets the fused loss.
            causal_lm="Llama4ForCausalLM",
            norms={"Llama4TextRMSNorm": _LLAMA},
            mlps={"Llama4TextMLP": MLPSpec(act_attr="activation_fn")},
            rope=(RopeSpec("apply_rotary_emb", "llama4_rope"),),
            torch_layer_norm=True,  # vision encoder
            unpatched=(
                "Llama4ForConditionalGeneration's loss (on the logits its language_model returns: no base "
                "model -> lm_head to fuse)",
                "Llama4TextExperts (bmm on a (experts, hidden, 2 * intermediate) gate_up_proj, no _apply_gate hook)",
                "Llama4TextL2Norm (weightless q/k norm)",
                "Llama4VisionMLP / Llama4VisionMLP2 (fc1/fc2, not gated)",
                "vision rotary (vision_apply_rotary_emb)",
            ),
        ),
        # Wrappers: the language model is another registered architecture (text_config.model_type).
        ArchitectureTraits(
            model_type="paligemma",
            module=_modeling("paligemma"),
            causal_lm="PaliGemmaForConditionalGeneration",
            rope=(),
            softcap_config="final_logit_softcapping",  # of the text config (Gemma2)
            sub_configs=("text_config",),
            torch_layer_norm=True,  # SigLIP
            unpatched=("SiglipMLP (fc1/fc2, not gated)",),
        ),
        ArchitectureTraits(
            model_type="llava",
            module=_modeling("llava"),
            causal_lm="LlavaForConditionalGeneration",
            # Pixtral vision tower (Pixtral-12B is a Llava): ln_pre's output is the first residual
            norms={"pixtral.PixtralRMSNorm": _LLAMA_NOT_IN_PLACE},
            mlps={"pixtral.PixtralMLP": _SPLIT},
            rope=(),
            sub_configs=("text_config",),
            torch_layer_norm=True,  # CLIP / SigLIP vision towers
            unpatched=("CLIPMLP / SiglipMLP (not gated)", "Pixtral's 2-D rotary"),
        ),
        ArchitectureTraits(
            model_type="pixtral",  # PixtralVisionModel on its own (inside Llava it is patched with llava)
            module=_modeling("pixtral"),
            causal_lm=None,  # a vision encoder: no language-model head, no loss
            norms={"PixtralRMSNorm": _LLAMA_NOT_IN_PLACE},  # ln_pre's output is the first residual
            mlps={"PixtralMLP": _SPLIT},
            rope=_ROTATE_HALF,  # rotate-half on (patches, head_dim) tables of its 2-D positions
        ),
        ArchitectureTraits(
            model_type="internvl",
            module=_modeling("internvl"),
            causal_lm="InternVLForConditionalGeneration",
            norms={"InternVLVisionRMSNorm": _LLAMA_NOT_IN_PLACE},  # vision norm_type="rms_norm"
            rope=(),
            sub_configs=("text_config",),
            torch_layer_norm=True,  # vision norm_type="layer_norm", projector
            unpatched=("InternVLVisionMLP (fc1/fc2, not gated)",),
        ),
        ArchitectureTraits(
            model_type="smolvlm",
            module=_modeling("smolvlm"),
            causal_lm="SmolVLMForConditionalGeneration",
            rope=(),
            sub_configs=("text_config",),
            torch_layer_norm=True,  # vision encoder
            unpatched=("SmolVLMVisionMLP (fc1/fc2, not gated)",),
        ),
    ]
}

SUPPORTED_MODEL_TYPES = tuple(sorted(TRAITS))


def get_traits(model_type: str) -> ArchitectureTraits:
    """Traits of `model_type`; ValueError listing the supported types for anything else."""
    try:
        return TRAITS[model_type]
    except KeyError:
        raise ValueError(
            f"model type {model_type!r} is not supported by liger_plugins.patching; supported model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None
