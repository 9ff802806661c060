"""`AutoLigerKernelForCausalLM`: transformers' AutoModelForCausalLM that patches the architecture at
class level before building the model.

    model = AutoLigerKernelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, swiglu=False)
    model = AutoLigerKernelForCausalLM.from_config(config)

The kernel flags of `apply_liger` (rope, rms_norm, swiglu, cross_entropy, fused_linear_cross_entropy,
layer_norm, fused_moe, causal_sdpa_under_compile, fused_add_rms_norm) are taken out of the keyword
arguments; everything else goes to transformers. The patch is class level, so it stays on for that
model type afterwards (`unpatch(model_type)` reverts it).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

_KERNEL_FLAGS = (
    "rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy", "layer_norm", "fused_moe",
    "causal_sdpa_under_compile", "fused_add_rms_norm", "qkv_projections",
)
# from_pretrained arguments that also locate the config.
_CONFIG_LOCATION_KWARGS = (
    "cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code",
)


class AutoLigerKernelForCausalLM(AutoModelForCausalLM):
    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs):
        _patch(config, kwargs)
        return super().from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        flags = {k: kwargs.pop(k) for k in _KERNEL_FLAGS if k in kwargs}
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            location = {k: kwargs[k] for k in _CONFIG_LOCATION_KWARGS if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **location)
        _patch(config, flags)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def _patch(config: PretrainedConfig, kwargs: dict) -> None:
    """Patch the config's model type, and its text model's type when that is registered too: for a
    vision-language config (e.g. qwen3_5) AutoModelForCausalLM may build the text-only causal LM
    (Qwen3_5ForCausalLM, registered under qwen3_5_text), whose classes only the text type patches."""
    from liger_plugins.patching import SUPPORTED_MODEL_TYPES, apply_liger

    flags = {k: kwargs.pop(k) for k in _KERNEL_FLAGS if k in kwargs}
    apply_liger(config.model_type, **flags)
    text_type = config.get_text_config().model_type
    if text_type != config.model_type and text_type in SUPPORTED_MODEL_TYPES:
        apply_liger(text_type, **flags)
