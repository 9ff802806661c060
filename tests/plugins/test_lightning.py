"""liger_plugins.lightning with the real lightning.Trainer on a tiny Llama built from a config (CPU).

As in test_hf.py, most runs use the kernels' torch-reference dispatch and count calls to
`liger_kernels.functional`; one run uses the Triton kernels under the interpreter; one launches real
2-process runs (gloo) with strategy="ddp" and ModelParallelStrategy (FSDP2).
"""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("transformers")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.strategies import Strategy  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

import liger_kernels._utils as kernel_utils  # noqa: E402
from liger_plugins import lightning as liger_lightning  # noqa: E402
from liger_plugins.lightning import LigerCallback, find_hf_models  # noqa: E402
from liger_plugins.patching import apply_liger, unpatch  # noqa: E402
from liger_plugins.patching.forwards import is_liger  # noqa: E402
from tests.tolerances import REDUCTION_TOLERANCES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB, SEQ = 300, 16
KERNELS = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")
BUILT = []  # every model the modules build, unpatched after each test


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )
    BUILT.append(LlamaForCausalLM(config))
    return BUILT[-1]


class InitModule(pl.LightningModule):
    """The Hugging Face model is built in __init__."""

    def __init__(self):
        super().__init__()
        self.losses = []
        self.build()

    def build(self):
        self.model = tiny_llama()

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SetupModule(InitModule):
    """Built in LightningModule.setup (runs after Callback.setup)."""

    def build(self):
        pass

    def setup(self, stage):
        if not hasattr(self, "model"):
            self.model = tiny_llama()


class ConfigureModelModule(InitModule):
    """Built in configure_model (after every setup hook, inside the strategy's init contexts)."""

    def build(self):
        pass

    def configure_model(self):
        if not hasattr(self, "model"):
            self.model = tiny_llama()


class NoHFModule(InitModule):
    def build(self):
        self.model = torch.nn.Linear(4, 4)


class GPT2Module(InitModule):
    def build(self):
        self.model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=SEQ))


def loader(batch_size, n=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def fit(module, *, steps=2, batch=4, accumulate=1, callbacks=()):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, loader(batch))
    return module


@pytest.fixture(autouse=True)
def _unpatch_models():
    assert not is_liger(modeling_llama.apply_rotary_pos_emb), "an earlier test left a Llama model patched"
    yield
    while BUILT:
        unpatch(BUILT.pop())
    assert not is_liger(modeling_llama.apply_rotary_pos_emb)


@pytest.fixture
def kernel_calls(spy_kernels):
    """How many times each liger kernel ran (tests/plugins/conftest.py)."""
    calls = dict.fromkeys(KERNELS, 0)
    spy_kernels(KERNELS, lambda name, kwargs: calls.__setitem__(name, calls[name] + 1))
    return calls


@pytest.fixture
def strategy_setup_sees(monkeypatch):
    """Whether the model was patched when the strategy set up (moved / wrapped) the module."""
    seen = []
    original = Strategy.setup

    def setup(self, trainer):
        seen.append(is_liger(trainer.lightning_module.model.forward))
        return original(self, trainer)

    monkeypatch.setattr(Strategy, "setup", setup)
    return seen


def assert_same_training(a, b):
    atol, rtol = REDUCTION_TOLERANCES[torch.float32]
    torch.testing.assert_close(torch.stack(a.losses), torch.stack(b.losses), atol=atol, rtol=rtol)
    params_b = dict(b.model.named_parameters())
    for name, param in a.model.named_parameters():
        torch.testing.assert_close(param, params_b[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("module_cls", [InitModule, SetupModule, ConfigureModelModule])
def test_patches_before_the_strategy_wraps(module_cls, reference, kernel_calls, strategy_setup_sees):
    baseline = fit(module_cls())
    assert not any(kernel_calls.values()) and strategy_setup_sees == [False]
    callback = LigerCallback()
    module = fit(module_cls(), callbacks=[callback])
    assert strategy_setup_sees == [False, True]
    assert list(callback.summaries) == ["model"]
    assert is_liger(module.model.model.norm.forward) and is_liger(module.model.model.layers[0].mlp.forward)
    # 2 steps x (2 layers x (2 norms + rope + mlp) + final norm + loss)
    assert kernel_calls == {"rms_norm": 2 * 5, "rope": 2 * 2, "swiglu": 2 * 2, "fused_linear_cross_entropy": 2}
    assert_same_training(module, baseline)
    # The hook wrappers are gone after fit; Lightning still sees the user's own configure_model.
    assert "setup" not in vars(module) and "configure_model" not in vars(module)


def test_flags_select_kernels(reference, kernel_calls):
    module = fit(InitModule(), steps=1, callbacks=[LigerCallback(rope=False, geglu=False)])
    assert kernel_calls["rope"] == 0 and kernel_calls["swiglu"] == 0 and kernel_calls["rms_norm"] == 5
    assert not is_liger(module.model.model.layers[0].mlp.forward)


def test_gradient_accumulation_matches_larger_batch(reference):
    big = fit(InitModule(), batch=4, callbacks=[LigerCallback()])
    accumulated = fit(InitModule(), steps=2, batch=2, accumulate=2, callbacks=[LigerCallback()])
    # Lightning averages the micro-batch means; every label is a target, so that is the batch mean.
    accumulated.losses = [torch.stack(accumulated.losses[i:i + 2]).mean() for i in (0, 2)]
    assert_same_training(accumulated, big)


def test_finds_outermost_hf_models():
    peft = pytest.importorskip("peft")
    module = torch.nn.Module()
    module.policy = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    module.reference = tiny_llama()
    models = find_hf_models(module)
    assert list(models) == ["policy.base_model.model", "reference"]
    assert all(isinstance(m, LlamaForCausalLM) for m in models.values())


def test_misconfiguration_fails_at_setup(reference, kernel_calls):
    with pytest.raises(ValueError, match="'rms_norms'"):
        LigerCallback(rms_norms=True)
    with pytest.raises(ValueError, match="no transformers.PreTrainedModel inside NoHFModule"):
        fit(NoHFModule(), callbacks=[LigerCallback()])
    with pytest.raises(ValueError, match=r"GPT2Module\.model \(GPT2LMHeadModel\).*'gpt2'"):
        fit(GPT2Module(), callbacks=[LigerCallback()])
    assert not any(kernel_calls.values())


class HparamsModule(pl.LightningModule):
    """The model passed to __init__ and kept by save_hyperparameters() (Lightning only warns)."""

    def __init__(self, model):
        super().__init__()
        self.save_hyperparameters()
        self.losses, self.model = [], model

    training_step = InitModule.training_step
    configure_optimizers = InitModule.configure_optimizers


def test_model_kept_in_hparams_is_refused_at_setup(tmp_path):
    # Checkpoints pickle hparams, and a patched model refuses to be pickled: said at setup, not at the
    # first checkpoint after an epoch of training.
    def trainer(checkpointing):
        return pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                          enable_checkpointing=checkpointing, default_root_dir=tmp_path,
                          callbacks=[LigerCallback()])

    module = HparamsModule(tiny_llama())
    with pytest.raises(ValueError, match=r"hparams\['model'\].*save_hyperparameters\(ignore=\['model'\]\)"):
        trainer(True).fit(module, loader(4))
    assert not module.losses
    with pytest.warns(UserWarning, match=r"save_hyperparameters\(ignore=\['model'\]\)"):
        trainer(False).fit(HparamsModule(tiny_llama()), loader(4))  # nothing pickles it: trains


def test_triton_interpreter_training_matches_unpatched(kernel_calls):
    assert kernel_utils.INTERPRET
    baseline = fit(InitModule(), steps=1, batch=1)
    module = fit(InitModule(), steps=1, batch=1, callbacks=[LigerCallback()])
    assert kernel_calls["rope"] == 2 and kernel_calls["fused_linear_cross_entropy"] == 1
    assert_same_training(module, baseline)


DISTRIBUTED_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM
import liger_kernels.functional as LF
from liger_plugins.lightning import LigerCallback
from liger_plugins.patching import unpatch
from liger_plugins.patching.forwards import is_liger

from integrations._common import COUNTED_AS

calls = {"rms_norm": 0, "fused_linear_cross_entropy": 0}
for name in (*calls, *(alias for alias, kernel in COUNTED_AS.items() if kernel in calls)):
    def spy(*args, _original=getattr(LF, name), _name=COUNTED_AS.get(name, name), **kwargs):
        calls[_name] += 1
        return _original(*args, **kwargs)
    setattr(LF, name, spy)


class Module(pl.LightningModule):
    def __init__(self, build_in):
        super().__init__()
        self.build_in, self.model, self.losses = build_in, None, []
        if build_in == "init":
            self.configure_model()

    def configure_model(self):
        if self.model is not None:
            return
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=64))
        if self.build_in == "fully_shard":  # ModelParallelStrategy: the module shards itself (FSDP2)
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        self.wrapper = type(self.trainer.strategy.model).__name__  # what the strategy trains
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(build_in, liger):
    before = dict(calls)
    strategy = "ddp"
    if build_in == "fully_shard":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[LigerCallback()] if liger else [])
    module = Module(build_in)
    ids = torch.randint(0, 300, (16, 16), generator=torch.Generator().manual_seed(1))
    trainer.fit(module, torch.utils.data.DataLoader([dict(input_ids=r, labels=r) for r in ids], batch_size=2))
    result = dict(
        losses=module.losses, calls={k: calls[k] - before[k] for k in calls}, patched=is_liger(module.model.forward),
        wrapper=module.wrapper, model_class=type(module.model).__name__, world_size=trainer.world_size)
    unpatch(module.model)
    return trainer.global_rank, result


runs = {}
for name, build_in, liger in [
    ("ddp_base", "init", False), ("ddp_init", "init", True), ("ddp_configure_model", "configure_model", True),
    ("fsdp2_base", "fully_shard", False), ("fsdp2", "fully_shard", True),
]:
    rank, runs[name] = run(build_in, liger)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(runs, f)
"""


@pytest.mark.multiprocess
def test_ddp_and_model_parallel_two_processes(tmp_path):
    """2 CPU processes (gloo); Lightning relaunches the script for rank 1. Each rank trains:
    strategy="ddp" without the callback, then with the model built in __init__, then in configure_model;
    ModelParallelStrategy (FSDP2: configure_model calls fully_shard, so the callback patches a sharded
    model) without and with the callback. The kernels run their torch reference (no TRITON_INTERPRET)."""
    script = tmp_path / "distributed_run.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LIGER_POISON_OUTPUTS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    atol, rtol = REDUCTION_TOLERANCES[torch.float32]
    for rank in (0, 1):
        runs = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, base, wrapper in [("ddp_init", "ddp_base", "DistributedDataParallel"),
                                    ("ddp_configure_model", "ddp_base", "DistributedDataParallel"),
                                    ("fsdp2", "fsdp2_base", "Module")]:
            run = runs[name]
            assert runs[base]["calls"] == {"rms_norm": 0, "fused_linear_cross_entropy": 0}
            assert run["world_size"] == 2 and run["wrapper"] == wrapper and run["patched"], name
            assert run["calls"] == {"rms_norm": 3 * 5, "fused_linear_cross_entropy": 3}, name
            torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(runs[base]["losses"]),
                                       atol=atol, rtol=rtol)
        assert runs["fsdp2"]["model_class"] == "FSDPLlamaForCausalLM"


def test_example_runs(reference, tmp_path, monkeypatch, capsys):
    """examples/lightning_train.py as a user runs it (in this process, with the kernels' CPU dispatch)."""
    monkeypatch.setattr(
        liger_lightning, "apply_liger", lambda model, **kw: BUILT.append(model) or apply_liger(model, **kw)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning_train.py", "--steps", "2"])
    runpy.run_path(str(ROOT / "examples" / "lightning_train.py"), run_name="__main__")
    assert len(BUILT) == 1
    assert "norm forward: liger.rms_norm_forward" in capsys.readouterr().out
