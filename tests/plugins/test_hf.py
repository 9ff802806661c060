"""liger_plugins.hf with the real transformers.Trainer, on a tiny Llama built from a config (CPU).

Most runs use the kernels' torch-reference dispatch (`reference` fixture): they test the adapter (when and
what is patched, what reaches the patched forward), and the patched forwards still go through
`liger_kernels.functional`, counted by the `kernel_calls` fixture. One run uses the Triton kernels under
the interpreter end to end. One spawns a real 2-process DDP run (torchrun, gloo).
"""

import json
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tests.tolerances import REDUCTION_TOLERANCES

pytest.importorskip("transformers")
from accelerate import Accelerator  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.models.llama import modeling_llama  # noqa: E402

import liger_kernels._utils as kernel_utils  # noqa: E402
from liger_plugins import hf  # noqa: E402
from liger_plugins.patching import apply_liger, unpatch  # noqa: E402
from liger_plugins.patching.forwards import is_liger  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB, SEQ = 300, 16
KERNELS = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy", "cross_entropy")
ATOL_RTOL = REDUCTION_TOLERANCES[torch.float32]


class TokenData(torch.utils.data.Dataset):
    """Random tokens; labels copy them with ~1/4 of positions ignored (so micro-batches of a gradient
    accumulation step hold different numbers of target tokens)."""

    def __init__(self, n=16, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.labels = self.ids.masked_fill(torch.rand(n, SEQ, generator=g) < 0.25, -100)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.fixture
def make_model():
    """Tiny Llama with fixed initial weights; every model handed out is unpatched afterwards (an
    instance patch also holds the module-level rotary function of modeling_llama)."""
    assert not is_liger(modeling_llama.apply_rotary_pos_emb), "an earlier test left a Llama model patched"
    models = []

    def make():
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        )
        models.append(LlamaForCausalLM(config))
        return models[-1]

    yield make
    hf.disable()
    for model in models:
        unpatch(model)
    assert not is_liger(modeling_llama.apply_rotary_pos_emb)


@pytest.fixture
def kernel_calls(spy_kernels):
    """The keyword arguments of every call to each liger kernel (tests/plugins/conftest.py)."""
    calls = {name: [] for name in KERNELS}
    spy_kernels(KERNELS, lambda name, kwargs: calls[name].append(kwargs))
    return calls


def make_trainer(model, tmp_path, *, steps=3, batch=4, accum=1, callbacks=None, **overrides):
    args = dict(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=TokenData(),
                   eval_dataset=TokenData(8, seed=2), callbacks=callbacks)


def losses(trainer):
    return torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])


def assert_same_training(a, b):
    """Two trained Trainers: same logged losses and same final parameters (fp32 tolerances)."""
    atol, rtol = ATOL_RTOL
    torch.testing.assert_close(losses(a), losses(b), atol=atol, rtol=rtol)
    params_b = dict(b.model.named_parameters())
    for name, param in a.model.named_parameters():
        torch.testing.assert_close(param, params_b[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_patched(model):
    assert is_liger(model.forward)
    assert is_liger(model.model.norm.forward)
    assert all(is_liger(layer.mlp.forward) for layer in model.model.layers)
    assert is_liger(modeling_llama.apply_rotary_pos_emb)


# ---------------------------------------------------------------------------------------- config keys


def test_config_keys_map_to_apply_liger():
    assert hf.liger_kwargs(None) == {}
    assert hf.liger_kwargs({"rope": False, "geglu": False, "fused_linear_cross_entropy": True}) == {
        "rope": False, "swiglu": False, "fused_linear_cross_entropy": True,
    }
    assert hf.liger_kwargs({"swiglu": True, "geglu": True}) == {"swiglu": True}
    assert hf.liger_kwargs({"fused_moe": True}) == {"fused_moe": True}  # ours only (opt-in MoE experts)


@pytest.mark.parametrize(
    "config, error, match",
    [
        ({"rope": True, "rms_norms": True}, ValueError, "'rms_norms'"),
        ({"relu_squared": True}, ValueError, "'relu_squared'"),
        ({"rope": 1}, TypeError, r"\['rope'\]"),
        ({"swiglu": True, "geglu": False}, ValueError, "geglu"),
        (["rope"], TypeError, "dict"),
    ],
)
def test_config_errors_name_the_key(config, error, match):
    with pytest.raises(error, match=match):
        hf.liger_kwargs(config)


# ------------------------------------------------------------------------------- use_liger_kernel flag


def test_enable_makes_use_liger_kernel_run_our_kernels(make_model, reference, kernel_calls, tmp_path, monkeypatch):
    baseline = make_trainer(make_model(), tmp_path, use_liger_kernel=False)
    baseline.train()
    assert not any(kernel_calls.values())

    # The patch must be in place before accelerate wraps the model (DDP / FSDP / DeepSpeed).
    prepared = []
    original_prepare = Accelerator.prepare

    def prepare(self, *args, **kwargs):
        for arg in args:
            if isinstance(arg, LlamaForCausalLM):
                prepared.append(is_liger(arg.forward) and is_liger(arg.model.norm.forward))
        return original_prepare(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    hf.enable()
    hf.enable()  # idempotent
    model = make_model()
    trainer = make_trainer(model, tmp_path, use_liger_kernel=True,
                           liger_kernel_config={"rope": True, "rms_norm": True, "swiglu": True})
    trainer.train()
    assert prepared == [True]
    assert_patched(model)
    # 3 steps x (2 layers x (2 norms + rope + mlp) + final norm + loss)
    assert len(kernel_calls["rms_norm"]) == 3 * 5
    assert len(kernel_calls["rope"]) == 3 * 2
    assert len(kernel_calls["swiglu"]) == 3 * 2
    assert len(kernel_calls["fused_linear_cross_entropy"]) == 3
    assert_same_training(trainer, baseline)

    hf.disable()
    import transformers.integrations.liger as hf_liger
    import transformers.trainer as hf_trainer

    assert hf_trainer.apply_liger_kernel is hf_liger.apply_liger_kernel is not hf.apply_liger_kernel


def test_config_selects_kernels(make_model, reference, kernel_calls, tmp_path):
    hf.enable()
    model = make_model()
    make_trainer(model, tmp_path, steps=1, use_liger_kernel=True,
                 liger_kernel_config={"rope": False, "geglu": False, "fused_linear_cross_entropy": False,
                                      "cross_entropy": True}).train()
    assert not kernel_calls["rope"] and not kernel_calls["swiglu"] and not kernel_calls["fused_linear_cross_entropy"]
    assert len(kernel_calls["rms_norm"]) == 5 and len(kernel_calls["cross_entropy"]) == 1
    assert not is_liger(model.model.layers[0].mlp.forward)


def test_gradient_accumulation_matches_larger_batch(make_model, reference, kernel_calls, tmp_path):
    baseline = make_trainer(make_model(), tmp_path, batch=4)
    baseline.train()
    hf.enable()
    big = make_trainer(make_model(), tmp_path, batch=4, use_liger_kernel=True)
    big.train()
    accumulated = make_trainer(make_model(), tmp_path, batch=2, accum=2, use_liger_kernel=True)
    accumulated.train()
    # num_items_in_batch reached the fused loss: it summed and divided by the item count.
    assert len(kernel_calls["fused_linear_cross_entropy"]) == 3 + 6
    assert all(call["reduction"] == "sum" for call in kernel_calls["fused_linear_cross_entropy"])
    assert_same_training(big, baseline)
    assert_same_training(accumulated, baseline)


def test_peft_with_gradient_checkpointing(make_model, reference, kernel_calls, tmp_path):
    peft = pytest.importorskip("peft")

    def lora_model():
        torch.manual_seed(0)  # same adapter initialisation in both runs
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])
        return peft.get_peft_model(make_model(), config)

    baseline = make_trainer(lora_model(), tmp_path, gradient_checkpointing=True)
    baseline.train()
    hf.enable()
    model = lora_model()
    trainer = make_trainer(model, tmp_path, gradient_checkpointing=True, use_liger_kernel=True)
    trainer.train()
    base = model.get_base_model()
    assert base.is_gradient_checkpointing
    assert_patched(base)
    # Checkpointing recomputes each decoder layer in backward, through the kernels again: per step
    # 2 layers x 2 passes x (2 norms, rope, mlp), + final norm. LoRA replaced gate_proj; the patched MLP
    # calls it as a module, so the adapter trains.
    assert len(kernel_calls["rms_norm"]) == 3 * (2 * 2 * 2 + 1)
    assert len(kernel_calls["rope"]) == len(kernel_calls["swiglu"]) == 3 * 2 * 2
    assert len(kernel_calls["fused_linear_cross_entropy"]) == 3
    assert_same_training(trainer, baseline)


def test_eval_prediction_loss_only(make_model, reference, kernel_calls, tmp_path):
    baseline = make_trainer(make_model(), tmp_path, steps=1, prediction_loss_only=True)
    baseline.train()
    expected = baseline.evaluate()["eval_loss"]
    hf.enable()
    trainer = make_trainer(make_model(), tmp_path, steps=1, prediction_loss_only=True, use_liger_kernel=True)
    trainer.train()
    n_norm_calls = len(kernel_calls["rms_norm"])
    # use_liger_kernel + prediction_loss_only: the Trainer adds skip_logits=True to the eval inputs.
    metrics = trainer.evaluate()
    assert len(kernel_calls["rms_norm"]) > n_norm_calls
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_ours_win_over_installed_liger_kernel(make_model, reference, tmp_path, monkeypatch):
    """With the liger-kernel package present, the stock flag uses it; after enable(), never."""
    import transformers.integrations.liger as hf_liger

    used = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model, **kwargs: used.append(kwargs)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(hf_liger, "is_liger_kernel_available", lambda: True)

    stock = make_model()
    make_trainer(stock, tmp_path, steps=1, use_liger_kernel=True, liger_kernel_config={"rope": True}).train()
    assert used == [{"rope": True}] and not is_liger(stock.forward)

    hf.enable()
    ours = make_model()
    make_trainer(ours, tmp_path, steps=1, use_liger_kernel=True, liger_kernel_config={"rope": True}).train()
    assert used == [{"rope": True}]
    assert_patched(ours)


# ------------------------------------------------------------------------------------------ callback


def test_callback_patches_at_init_and_logs_metrics(make_model, reference, kernel_calls, tmp_path, caplog):
    baseline = make_trainer(make_model(), tmp_path)
    baseline.train()
    model = make_model()
    callback = hf.LigerCallback(swiglu=False, log_metrics=True)
    with caplog.at_level("INFO", logger="liger_plugins.hf"):
        trainer = make_trainer(model, tmp_path, callbacks=[callback])
    # Patched when the Trainer is built: before train() wraps anything, and for evaluate()-only use.
    assert is_liger(model.forward) and is_liger(model.model.norm.forward)
    assert not is_liger(model.model.layers[0].mlp.forward)
    assert "rms_norm: LlamaRMSNorm.forward" in caplog.text
    assert any("rms_norm" in item for item in callback.summary.patched)
    trainer.train()
    assert len(kernel_calls["fused_linear_cross_entropy"]) == 3 and not kernel_calls["swiglu"]
    assert_same_training(trainer, baseline)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(entry["tokens_per_second"] > 0 for entry in logged)
    assert "peak_memory_gib" not in logged[0]  # CUDA only


def test_callback_counts_tokens_once_after_an_interrupted_train(make_model, tmp_path):
    # on_train_end never runs when train() raises: the next train() must not count every batch twice.
    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    callback = hf.LigerCallback(log_metrics=True)
    trainer = make_trainer(make_model(), tmp_path, steps=4, callbacks=[callback, Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.pop_callback(Interrupt)
    counted = []
    trainer.add_callback(type("Peek", (TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, **kw: counted.append(callback._tokens)}))
    trainer.train()
    assert counted == [4 * SEQ] * 4  # batch 4: one count per sequence
    assert not trainer.model._forward_pre_hooks  # on_train_end removed the only hook


def test_callback_patches_model_from_model_init(make_model, reference, kernel_calls, tmp_path):
    models = []

    def model_init():
        models.append(make_model())
        return models[-1]

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = Trainer(model_init=model_init, args=args, train_dataset=TokenData(), callbacks=[hf.LigerCallback()])
    trainer.train()
    assert len(models) == 2  # one in __init__, a fresh one in train()
    assert_patched(models[1])
    assert len(kernel_calls["fused_linear_cross_entropy"]) == 1


# ---------------------------------------------------------------------------------- misconfiguration


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=SEQ))


def test_flag_misconfiguration_fails_before_training(make_model, reference, kernel_calls, tmp_path):
    hf.enable()
    trainer = make_trainer(make_model(), tmp_path, use_liger_kernel=True, liger_kernel_config={"rms_norms": True})
    with pytest.raises(ValueError, match="'rms_norms'"):
        trainer.train()
    trainer = make_trainer(tiny_gpt2(), tmp_path, use_liger_kernel=True)
    with pytest.raises(ValueError, match="use_liger_kernel: cannot patch GPT2LMHeadModel: .*'gpt2'.*llama"):
        trainer.train()
    assert trainer.state.global_step == 0 and not any(kernel_calls.values())


def test_callback_misconfiguration_fails_when_the_trainer_is_built(make_model, reference, tmp_path):
    with pytest.raises(ValueError, match="'rms_norms'"):
        hf.LigerCallback(rms_norms=True)
    with pytest.raises(ValueError, match="'bogus'"):
        make_trainer(make_model(), tmp_path, liger_kernel_config={"bogus": True}, callbacks=[hf.LigerCallback()])
    with pytest.raises(ValueError, match="LigerCallback: cannot patch GPT2LMHeadModel: .*'gpt2'"):
        make_trainer(tiny_gpt2(), tmp_path, callbacks=[hf.LigerCallback()])
    with pytest.raises(ValueError, match="enable()"):
        make_trainer(make_model(), tmp_path, use_liger_kernel=True, callbacks=[hf.LigerCallback()])


# ----------------------------------------------------------------------------------- two processes

DDP_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
import liger_kernels.functional as LF
from liger_plugins import hf
from liger_plugins.patching import unpatch
from liger_plugins.patching.forwards import is_liger

from integrations._common import COUNTED_AS

calls = {"rms_norm": 0, "fused_linear_cross_entropy": 0}
for name in (*calls, *(alias for alias, kernel in COUNTED_AS.items() if kernel in calls)):
    def spy(*args, _original=getattr(LF, name), _name=COUNTED_AS.get(name, name), **kwargs):
        calls[_name] += 1
        return _original(*args, **kwargs)
    setattr(LF, name, spy)


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 300, (16, 16), generator=g)
        self.labels = self.ids.masked_fill(torch.rand(16, 16, generator=g) < 0.25, -100)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def run(liger):
    before = dict(calls)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=64))
    args = TrainingArguments(
        output_dir=sys.argv[1], max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0, use_liger_kernel=liger)
    trainer = Trainer(model=model, args=args, train_dataset=Data())
    trainer.train()
    result = dict(
        losses=[e["loss"] for e in trainer.state.log_history if "loss" in e],
        calls={k: calls[k] - before[k] for k in calls}, patched=is_liger(model.forward),
        wrapper=type(trainer.model_wrapped).__name__, world_size=trainer.args.world_size,
        params={n: p.detach().flatten().tolist() for n, p in model.named_parameters()})
    unpatch(model)
    return result


runs = {"base": run(False)}
hf.enable()
runs["liger"] = run(True)
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(runs, f)
"""


@pytest.mark.multiprocess
def test_ddp_two_processes_with_gradient_accumulation(tmp_path):
    """torchrun, 2 CPU processes (gloo), DDP, 2 x batch 2 accumulation with ignored labels: the flag
    path gives the same losses and parameters as the unpatched Trainer on every rank (the Trainer
    counts num_items_in_batch across ranks). Kernels run their torch reference in the children."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LIGER_POISON_OUTPUTS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    atol, rtol = ATOL_RTOL
    for rank in (0, 1):
        runs = json.loads((tmp_path / f"rank{rank}.json").read_text())
        base, ours = runs["base"], runs["liger"]
        assert base["calls"] == {"rms_norm": 0, "fused_linear_cross_entropy": 0} and not base["patched"]
        assert ours["patched"] and ours["wrapper"] == "DistributedDataParallel" and ours["world_size"] == 2
        assert ours["calls"] == {"rms_norm": 3 * 2 * 5, "fused_linear_cross_entropy": 3 * 2}
        torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(base["losses"]), atol=atol, rtol=rtol)
        for name, values in base["params"].items():
            torch.testing.assert_close(torch.tensor(ours["params"][name]), torch.tensor(values), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------- Triton kernels


def test_triton_interpreter_training_matches_unpatched(make_model, kernel_calls, tmp_path):
    """The Triton kernels (interpreter on CPU) inside the stock Trainer: same losses as eager."""
    assert kernel_utils.INTERPRET
    baseline = make_trainer(make_model(), tmp_path, steps=2, batch=1)
    baseline.train()
    hf.enable()
    trainer = make_trainer(make_model(), tmp_path, steps=2, batch=1, use_liger_kernel=True)
    trainer.train()
    assert len(kernel_calls["rope"]) == 2 * 2 and len(kernel_calls["fused_linear_cross_entropy"]) == 2
    assert_same_training(trainer, baseline)


def test_trainer_with_one_pass_adamw(make_model, tmp_path, monkeypatch):
    """liger_kernels.optim.AdamW through `optimizer_cls_and_kwargs` (its kernel under the interpreter):
    the Trainer's decay / no-decay groups reach it, and it trains as torch's AdamW does."""
    from liger_kernels import optim

    assert kernel_utils.INTERPRET
    launches = []
    original = optim.launch_adamw_
    monkeypatch.setattr(optim, "launch_adamw_", lambda *a, **k: launches.append(k["weight_decay"]) or original(*a, **k))
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    baseline = make_trainer(make_model(), tmp_path, optim="adamw_torch", learning_rate=1e-2, weight_decay=0.1)
    baseline.train()
    trainer = make_trainer(make_model(), tmp_path, weight_decay=0.1)
    trainer = Trainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                      optimizer_cls_and_kwargs=(optim.AdamW, hyper))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, optim.AdamW)
    assert sorted(set(launches)) == [0.0, 0.1] and len(launches) == 2 * 3  # two groups, three steps
    assert_same_training(trainer, baseline)


def test_example_runs(make_model, reference, tmp_path, monkeypatch, capsys):
    """examples/hf_trainer.py as a user runs it (in this process, with the kernels' CPU dispatch)."""
    patched = []
    monkeypatch.setattr(hf, "apply_liger", lambda model, **kw: patched.append(model) or apply_liger(model, **kw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["hf_trainer.py", "--steps", "2"])
    try:
        runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"), run_name="__main__")
    finally:
        for model in patched:
            unpatch(model)
    assert len(patched) == 1
    assert "norm forward: liger.rms_norm_forward" in capsys.readouterr().out


def test_adamw_key_makes_the_trainers_adamw_ours(make_model, tmp_path, monkeypatch):
    """enable() + liger_kernel_config={"adamw": True}: the Trainer's optim="adamw_torch" AdamW is
    liger_kernels.optim.AdamW, its kernel running (under the interpreter), with the Trainer's groups and
    hyperparameters, and it trains as torch's does; disable() puts the Trainer's own method back."""
    from liger_kernels import optim

    launches = []
    original = optim.launch_adamw_
    monkeypatch.setattr(optim, "launch_adamw_", lambda *a, **k: launches.append(k["weight_decay"]) or original(*a, **k))
    train = dict(optim="adamw_torch", learning_rate=1e-2, weight_decay=0.1)
    baseline = make_trainer(make_model(), tmp_path, **train)
    baseline.train()
    assert launches == []
    own_method = vars(Trainer)["get_optimizer_cls_and_kwargs"]
    hf.enable()
    try:
        trainer = make_trainer(make_model(), tmp_path, use_liger_kernel=True,
                               liger_kernel_config={"adamw": True, "rope": False}, **train)
        trainer.train()
        assert type(trainer.optimizer.optimizer) is optim.AdamW
        assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.0]
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
        assert sorted(set(launches)) == [0.0, 0.1] and len(launches) == 2 * 3  # two groups, three steps
        assert_same_training(trainer, baseline)
        fused = make_trainer(make_model(), tmp_path, use_liger_kernel=True, liger_kernel_config={"adamw": True},
                             **dict(train, optim="adamw_torch_fused"))
        fused.create_optimizer()  # torch's fused=True is dropped (ours refuses it)
        assert type(fused.optimizer) is optim.AdamW
        plain = make_trainer(make_model(), tmp_path, use_liger_kernel=True, **train)
        plain.create_optimizer()
        assert type(plain.optimizer) is torch.optim.AdamW  # without the key: torch's
        refused = make_trainer(make_model(), tmp_path, use_liger_kernel=True, liger_kernel_config={"adamw": True})
        with pytest.raises(ValueError, match="optim='sgd'"):
            refused.create_optimizer()
    finally:
        hf.disable()
    assert vars(Trainer)["get_optimizer_cls_and_kwargs"] is own_method


def test_adamw_in_backward_key_trains_as_the_step_after_backward(make_model, tmp_path, monkeypatch):
    """liger_kernel_config={"adamw_in_backward": True}: our AdamW stepping inside backward, which trains
    as torch's AdamW does where nothing reads the gradients (max_grad_norm=0); refused with clipping
    (the Trainer's default) or gradient accumulation, each named."""
    from liger_kernels import optim

    train = dict(optim="adamw_torch", learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.0)
    baseline = make_trainer(make_model(), tmp_path, **train)
    baseline.train()
    stepped_in_backward = []
    step_now = optim.AdamW._step_now
    monkeypatch.setattr(optim.AdamW, "_step_now", lambda self, group, param: stepped_in_backward.append(param)
                        or step_now(self, group, param))
    hf.enable()
    try:
        trainer = make_trainer(make_model(), tmp_path, use_liger_kernel=True,
                               liger_kernel_config={"adamw_in_backward": True, "rope": False}, **train)
        trainer.train()
        adamw = trainer.optimizer.optimizer
        assert type(adamw) is optim.AdamW and adamw._step_in_backward and adamw._backward_hooks
        trained = [p for p in trainer.model.parameters() if p.requires_grad]
        assert len(stepped_in_backward) == 3 * len(trained)  # every parameter, each of the three steps
        assert_same_training(trainer, baseline)
        clipped = make_trainer(make_model(), tmp_path, use_liger_kernel=True,
                               liger_kernel_config={"adamw_in_backward": True}, **dict(train, max_grad_norm=1.0))
        with pytest.raises(ValueError, match="max_grad_norm=1.0"):
            clipped.create_optimizer()
        accumulating = make_trainer(make_model(), tmp_path, use_liger_kernel=True, accum=2,
                                    liger_kernel_config={"adamw_in_backward": True}, **train)
        with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
            accumulating.create_optimizer()
    finally:
        hf.disable()


def test_adamw_key_with_callback_alone_is_refused(make_model, tmp_path):
    """A callback cannot choose the Trainer's optimizer: adamw in liger_kernel_config without enable()
    + use_liger_kernel is refused, and adamw is no callback flag (HF's or Lightning's), enabled or not."""
    from liger_plugins import lightning as liger_lightning

    with pytest.raises(ValueError, match="cannot choose the Trainer's optimizer"):
        make_trainer(make_model(), tmp_path, liger_kernel_config={"adamw": True}, callbacks=[hf.LigerCallback()])
    hf.enable()
    try:
        with pytest.raises(ValueError, match="only in the Trainer's liger_kernel_config"):
            hf.LigerCallback(adamw=True)
    finally:
        hf.disable()
    with pytest.raises(ValueError, match="only in the Trainer's liger_kernel_config"):
        liger_lightning.LigerCallback(adamw=True)
