"""`AutoLigerKernelForCausalLM`: transformers' AutoModelForCausalLM that patches the architecture at
class level before building the model.

    model = AutoLigerKernelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, swiglu=False)
    model = AutoLigerKernelForCausalLM.from_config(config)

The kernel flags of `apply_liger` (rope, rms_norm, swiglu, cross_entropy, fused_linear_cross_entropy,
layer_norm, fused_moe) are taken out of the keyword arguments; everything else goes to transformers. The patch is
class level, so it stays on for that model type afterwards (`unpatch(model_type)` reverts it).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

_KERNEL_FLAGS = (
    "rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy", "layer_norm", "fused_moe",
)
# from_pretrained arguments that also locate the config.
_CONFIG_LOCATION_KWARGS = (
    "cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code",
)


class AutoLigerKernelForCausalLM(AutoModelForCausalLM):
    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs):
        _patch(config.model_type, kwargs)
        return super().from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        flags = {k: kwargs.pop(k) for k in _KERNEL_FLAGS if k in kwargs}
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            location = {k: kwargs[k] for k in _CONFIG_LOCATION_KWARGS if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **location)
        _patch(config.model_type, flags)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def _patch(model_type: str, kwargs: dict) -> None:
    from liger_plugins.patching import apply_liger

    apply_liger(model_type, **{k: kwargs.pop(k) for k in _KERNEL_FLAGS if k in kwargs})
