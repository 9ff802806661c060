"""liger_plugins.axolotl with the real Axolotl (0.19, in .venv-axolotl; `make test` runs this file there).

Axolotl's own entry points do the work: `load_cfg` reads a YAML file, registers the plugins of its
`plugins:` list with Axolotl's plugin manager and validates the config against the schema the plugins
extend; `ModelLoader.load` calls the plugin hooks; `axolotl.train.train` trains. The model is a tiny
random Llama with a locally trained tokenizer (integrations/axolotl/tiny.py), so nothing is downloaded.
Patched-model parity runs the Triton kernels under the interpreter; the training runs use the kernels'
torch reference (`reference` fixture), counted by `kernel_calls`.
"""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from tests.patching.patching_helpers import kernel_patches
from tests.tolerances import REDUCTION_TOLERANCES, assert_model_close

# Before Axolotl: compare sets AXOLOTL_DO_NOT_TRACK and HF_HUB_OFFLINE (no network here).
from integrations.axolotl import compare, tiny  # isort: skip

from accelerate import Accelerator
from axolotl.cli.config import load_cfg
from axolotl.integrations import base as axolotl_base
from axolotl.integrations.base import PluginManager
from axolotl.loaders import ModelLoader, load_tokenizer
from axolotl.utils.dict import DictDefault
from pydantic import ValidationError
from transformers import LlamaForCausalLM
from transformers.models.llama import modeling_llama

from liger_plugins import axolotl as axolotl_plugin
from liger_plugins.axolotl import LigerPlugin, LigerPluginsArgs
from liger_plugins.patching import unpatch
from liger_plugins.patching.forwards import is_liger

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "liger_plugins.axolotl.LigerPlugin"
AXOLOTL_LIGER = "axolotl.integrations.liger.LigerPlugin"
ALL_KEYS = {"liger_rope": True, "liger_rms_norm": True, "liger_glu_activation": True,
            "liger_fused_linear_cross_entropy": True, "liger_qkv_projections": True}
KERNELS = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy", "cross_entropy")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A directory holding out/axolotl_tiny (model, tokenizer, data): the repo configs' relative paths."""
    root = tmp_path_factory.mktemp("axolotl")
    tiny.build(root / "out" / "axolotl_tiny")
    return root


@pytest.fixture(autouse=True)
def _clean():
    """Each test starts with no plugin registered and ends with no class patched. (Axolotl keeps one
    plugin manager per process and calls the hooks of every plugin it ever registered.)"""
    yield
    PluginManager.get_instance().plugins.clear()
    unpatch()
    assert not is_liger(modeling_llama.apply_rotary_pos_emb)


@pytest.fixture
def kernel_calls(spy_kernels):
    """How many times each liger kernel ran (tests/plugins/conftest.py)."""
    calls = dict.fromkeys(KERNELS, 0)
    spy_kernels(KERNELS, lambda name, kwargs: calls.__setitem__(name, calls[name] + 1))
    return calls


def tiny_config(tiny_root, tmp_path, **keys):
    """A full fine-tune config of the tiny model listing this plugin, plus `keys` (None removes a key)."""
    cfg = {
        "base_model": str(tiny_root / "out/axolotl_tiny/model"),
        "plugins": [PLUGIN],
        **ALL_KEYS,
        "datasets": [{"path": str(tiny_root / "out/axolotl_tiny/data.jsonl"), "ds_type": "json",
                      "type": "completion"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "val_set_size": 0, "sequence_len": 64, "micro_batch_size": 2, "num_epochs": 1, "max_steps": 2,
        "learning_rate": 1e-3, "optimizer": "adamw_torch", "bf16": False, "fp16": False, "tf32": False,
        "save_strategy": "no", "output_dir": str(tmp_path / "out"),
    }
    cfg.update(keys)
    return {key: value for key, value in cfg.items() if value is not None}


def load(cfg: dict, tmp_path) -> DictDefault:
    """Axolotl's own config loading, from a YAML file."""
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_cfg(str(path))


# ------------------------------------------------------------------------------------- config and schema


def test_yaml_plugins_entry_registers_and_validates(tiny_root, tmp_path):
    cfg = load(tiny_config(tiny_root, tmp_path, liger_layer_norm=False), tmp_path)
    assert isinstance(PluginManager.get_instance().plugins[PLUGIN], LigerPlugin)
    assert "liger_plugins.axolotl.LigerPluginsArgs" in PluginManager.get_instance().get_input_args()
    assert cfg.model_config_type == "llama"
    assert (cfg.liger_rope, cfg.liger_glu_activation, cfg.liger_layer_norm) == (True, True, False)
    assert cfg.liger_cross_entropy is None  # unset: that kernel stays off
    assert axolotl_plugin._kwargs(cfg)["qkv_projections"] is True
    unset = load(tiny_config(tiny_root, tmp_path, liger_qkv_projections=None), tmp_path)
    assert axolotl_plugin._kwargs(unset)["qkv_projections"] is False  # our own key: unset is off too


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"liger_rms_nrom": True}, r"unknown config key 'liger_rms_nrom' \(did you mean 'liger_rms_norm'\?\)"),
        ({"liger_swiglu": True}, r"'liger_swiglu' \(it is Axolotl's deprecated name for liger_glu_activation"),
        ({"liger_kernel_impl": "cutile"}, r"'liger_kernel_impl' \(it selects a liger-kernel backend"),
        ({"liger_rope": "yes"}, r"liger_rope\n  Input should be a valid boolean"),
        ({"liger_rms_norm": 1}, r"liger_rms_norm\n  Input should be a valid boolean"),
        ({"liger_cross_entropy": True}, "Only one cross entropy optimization can be enabled"),
        ({"plugins": [PLUGIN, AXOLOTL_LIGER]}, "list only one of them"),
    ],
)
def test_axolotl_validation_rejects_bad_keys(tiny_root, tmp_path, keys, match):
    with pytest.raises(ValidationError, match=match):
        load(tiny_config(tiny_root, tmp_path, **keys), tmp_path)


def test_config_not_listing_the_plugin_is_left_alone(tiny_root, tmp_path):
    load(tiny_config(tiny_root, tmp_path), tmp_path)  # registers this plugin in the process
    # A later config with Axolotl's own Liger plugin: its keys pass, and our hooks do nothing.
    cfg = load(tiny_config(tiny_root, tmp_path, plugins=[AXOLOTL_LIGER], liger_rms_norm_gated=True), tmp_path)
    ours = PluginManager.get_instance().plugins[PLUGIN]
    assert ours.pre_model_load(cfg) is None and not is_liger(modeling_llama.LlamaRMSNorm.forward)
    # A config with no plugins at all: unknown liger_* keys are Axolotl's business (ignored), not ours.
    cfg = load(tiny_config(tiny_root, tmp_path, plugins=None, liger_typo=True), tmp_path)
    assert ours.pre_model_load(cfg) is None


def test_entry_point_registration(monkeypatch):
    """Axolotl >= 0.21 loads `axolotl.plugins` entry points into every run (`get_builtin_plugins`) and
    merges their schemas into every config; simulated here on 0.19 (whose `validate_config` merges
    only listed plugins' schemas, hence the direct calls). Registered that way, the plugin acts on
    configs that do not list it, unless they list Axolotl's own Liger plugin."""
    entry_name = "liger_plugins.axolotl.LigerPlugin"  # 0.21 normalizes "module:Class" entry points to this
    monkeypatch.setattr(axolotl_base, "get_builtin_plugins", lambda: (entry_name,), raising=False)
    PluginManager.get_instance().register(entry_name)
    cfg = DictDefault({"model_config_type": "llama", "liger_rms_norm": True})
    assert LigerPlugin().pre_model_load(cfg).level == "class"
    assert is_liger(modeling_llama.LlamaRMSNorm.forward)
    with pytest.raises(ValidationError, match="liger_rms_nrom"):
        LigerPluginsArgs.model_validate({"liger_rms_nrom": True})

    cfg = DictDefault({"plugins": [AXOLOTL_LIGER], "model_config_type": "llama", "liger_rms_norm": True})
    PluginManager.get_instance().register(AXOLOTL_LIGER)
    assert LigerPlugin().post_model_build(cfg, None) is None
    LigerPluginsArgs.model_validate({"plugins": [AXOLOTL_LIGER], "liger_kernel_impl": "cutile"})


def test_unsupported_model_type_fails_before_loading():
    PluginManager.get_instance().register(PLUGIN)
    cfg = DictDefault({"plugins": [PLUGIN], "model_config_type": "gpt2", "liger_rms_norm": True})
    with pytest.raises(ValueError, match="llama"):
        LigerPlugin().pre_model_load(cfg)


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/axolotl_*.yml")) + [ROOT / "examples/axolotl.yml"],
                         ids=lambda p: p.name)
def test_repo_configs_are_valid(path, tiny_root, monkeypatch):
    monkeypatch.chdir(tiny_root)  # their paths are relative to the repository root
    cfg = load_cfg(str(path))
    assert PLUGIN in cfg.plugins and cfg.liger_rms_norm is True and cfg.model_config_type == "llama"


# ------------------------------------------------------------------------------------------------ hooks


def assert_patched(model):
    assert is_liger(model.forward)
    assert is_liger(model.model.norm.forward)
    assert all(is_liger(layer.mlp.forward) for layer in model.model.layers)
    assert is_liger(modeling_llama.apply_rotary_pos_emb)


@pytest.fixture
def hook_results(monkeypatch):
    """What each hook of LigerPlugin returned, by hook name."""
    results = {}
    for hook in ("pre_model_load", "post_model_build", "post_model_load"):
        original = getattr(LigerPlugin, hook)

        def spy(self, *args, _original=original, _hook=hook):
            results[_hook] = _original(self, *args)
            return results[_hook]

        monkeypatch.setattr(LigerPlugin, hook, spy)
    return results


def test_hooks_patch_the_model_axolotl_loads(tiny_root, tmp_path, hook_results):
    """Class level before the build, instance level after it; loss and gradients match the unpatched
    model (Triton kernels under the interpreter)."""
    torch.manual_seed(0)
    ids = torch.randint(4, 300, (2, 24))
    expected_model = LlamaForCausalLM.from_pretrained(tiny_root / "out/axolotl_tiny/model")
    expected = expected_model(input_ids=ids, labels=ids).loss
    expected.backward()

    cfg = load(tiny_config(tiny_root, tmp_path), tmp_path)
    model, lora_config = ModelLoader(cfg, load_tokenizer(cfg)).load()
    assert lora_config is None
    class_level = hook_results["pre_model_load"]
    assert class_level.level == "class" and len(kernel_patches(class_level)) == 6, str(class_level)
    # The class-level patch reached the built model: the instance level found everything patched.
    assert hook_results["post_model_build"].level == "instance" and not hook_results["post_model_build"].patched
    assert hook_results["post_model_load"] == []
    assert_patched(model)

    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert_model_close(loss, expected, torch.float32, "loss")
    grads = dict(expected_model.named_parameters())
    for name, param in model.named_parameters():
        assert_model_close(param.grad, grads[name].grad, torch.float32, name)


def test_keys_select_kernels(tiny_root, tmp_path):
    cfg = load(tiny_config(tiny_root, tmp_path, liger_rope=False, liger_glu_activation=None,
                           liger_fused_linear_cross_entropy=False, liger_cross_entropy=True), tmp_path)
    model, _ = ModelLoader(cfg, load_tokenizer(cfg)).load()
    assert is_liger(model.model.norm.forward) and is_liger(model.loss_function)
    assert not is_liger(model.model.layers[0].mlp.forward) and not is_liger(model.forward)
    assert not is_liger(modeling_llama.apply_rotary_pos_emb)


def test_lora_kernels_replacing_the_mlp_are_reported(tiny_root, tmp_path, hook_results):
    """Axolotl auto-enables its LoRA kernels for adapter: lora; lora_mlp_kernel replaces each MLP's forward
    after our hooks ran. (Only that one here: lora_qkv_kernel would rewrite LlamaAttention.forward for the
    rest of the process.)"""
    cfg = load(tiny_config(tiny_root, tmp_path, adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
                           lora_mlp_kernel=True, lora_qkv_kernel=False, lora_o_kernel=False,
                           lora_embedding_kernel=False), tmp_path)
    model, _ = ModelLoader(cfg, load_tokenizer(cfg)).load()
    assert hook_results["post_model_load"] == ["LlamaMLP"]
    assert not is_liger(model.get_base_model().model.layers[0].mlp.forward)
    assert is_liger(model.get_base_model().model.norm.forward)


# ------------------------------------------------------------------------------------------- end to end


def test_training_matches_without_plugin(tiny_root, reference, kernel_calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_root)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # the Liger-Kernel package must not be needed
    prepared = []
    original_prepare = Accelerator.prepare

    def prepare(self, *args, **kwargs):
        prepared.extend(is_liger(arg.forward) for arg in args if isinstance(arg, LlamaForCausalLM))
        return original_prepare(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    cfg = yaml.safe_load((ROOT / "configs/axolotl_tiny_cpu.yml").read_text())
    baseline, _ = compare.train(compare.without_plugin(cfg), tmp_path / "baseline")
    assert not any(kernel_calls.values()) and prepared == [False]
    losses, trainer = compare.train(cfg, tmp_path / "liger")
    assert prepared == [False, True]  # patched before accelerate wrapped it
    assert_patched(trainer.model)
    steps = cfg["max_steps"] * cfg["gradient_accumulation_steps"]  # micro-batches
    assert kernel_calls["fused_linear_cross_entropy"] == steps and kernel_calls["rope"] == 2 * steps
    assert len(losses) == cfg["max_steps"]
    atol, rtol = REDUCTION_TOLERANCES[torch.float32]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(baseline), atol=atol, rtol=rtol)


def test_lora_training_matches_without_plugin(tiny_root, reference, kernel_calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_root)
    cfg = yaml.safe_load((ROOT / "configs/axolotl_tiny_lora_cpu.yml").read_text())
    baseline, _ = compare.train(compare.without_plugin(cfg), tmp_path / "baseline")
    losses, trainer = compare.train(cfg, tmp_path / "liger")
    base = trainer.model.get_base_model()
    assert base.is_gradient_checkpointing
    assert_patched(base)
    assert kernel_calls["fused_linear_cross_entropy"] == cfg["max_steps"] * cfg["gradient_accumulation_steps"]
    atol, rtol = REDUCTION_TOLERANCES[torch.float32]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(baseline), atol=atol, rtol=rtol)


def test_liger_adamw_key_trains_with_our_adamw(tiny_root, reference, tmp_path, monkeypatch):
    """liger_adamw: true: the trainer's AdamW is liger_kernels.optim.AdamW, with Axolotl's groups and
    hyperparameters, and the run trains as with torch's AdamW (on CPU its step is torch's; the kernel
    with a Trainer is checked in test_hf.py); with another optimizer the key is refused by name."""
    from liger_kernels.optim import AdamW

    monkeypatch.chdir(tiny_root)
    cfg = {**yaml.safe_load((ROOT / "configs/axolotl_tiny_cpu.yml").read_text()), "max_steps": 3, "weight_decay": 0.1}
    baseline, torch_trainer = compare.train(cfg, tmp_path / "baseline")
    losses, trainer = compare.train({**cfg, "liger_adamw": True}, tmp_path / "adamw")
    assert type(trainer.optimizer.optimizer) is AdamW

    def groups(t):  # parameter name -> (weight decay, lr) of its group
        names = {id(p): n for n, p in t.model.named_parameters()}
        return {names[id(p)]: (g["weight_decay"], g["lr"]) for g in t.optimizer.param_groups for p in g["params"]}

    assert groups(trainer) == groups(torch_trainer) and {wd for wd, _ in groups(trainer).values()} == {0.0, 0.1}
    atol, rtol = REDUCTION_TOLERANCES[torch.float32]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(baseline), atol=atol, rtol=rtol)
    with pytest.raises(ValueError, match="liger_adamw"):
        compare.train({**cfg, "liger_adamw": True, "optimizer": "sgd"}, tmp_path / "sgd")
