"""The integration scripts, launched as users launch them, 2 CPU processes over gloo.

- integrations/engine_train.py under torchrun: FSDP1, FSDP2 and (when deepspeed is installed) ZeRO-2 and
  ZeRO-3 (model built under zero.Init) driven directly; one more FSDP2 run with the Triton kernels under
  the interpreter;
- integrations/hf_train.py under `accelerate launch --config_file configs/accelerate/ddp.yaml` (the HF
  Trainer over gloo), with padding-free packed batches and gradient checkpointing; and with the FSDP2 and
  ZeRO-3 configs, which accelerate runs only on accelerators, through a test-only shim
  (accelerate_cpu_shim/) that lets accelerate's own FSDP2 / DeepSpeed preparation run on CPU;
- integrations/lightning_train.py: DDPStrategy and ModelParallelStrategy (FSDP2 in configure_model).
Each script trains with and without liger-plugins and checks the curves itself (see the scripts); the
tests check its summary. The children run the kernels' torch reference (no TRITON_INTERPRET) except the
interpreter run. The GPU-only combinations are in integrations/gpu_matrix.sh.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(cmd, out: Path, interpret=False, shim=False, timeout=600) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LIGER_POISON_OUTPUTS")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    paths = [str(Path(__file__).parent / "accelerate_cpu_shim")] if shim else []
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_engine_results(summary, engines):
    assert summary["ok"] and summary["world_size"] == 2 and sorted(summary["results"]) == sorted(engines)
    for engine, result in summary["results"].items():
        ours, base = result["liger"], result["base"]
        assert result["ok"], (engine, result["problems"])
        assert ours["param_identity_kept"] and ours["patched_after_wrap"], engine
        # The engine really sharded lm_head (outside forward: a FSDP1 flat-parameter shard view, a DTensor,
        # an empty ZeRO-3 partition; ZeRO-2 shards only gradients and optimizer state), and the fused
        # loss still got the whole (320, 64) matrix.
        assert ours["lm_head_weight"] == base["lm_head_weight"], engine
        if engine == "fsdp1":
            assert ours["lm_head_weight"].startswith("Parameter[") and ours["lm_head_weight"] != "Parameter[320, 64]"
        else:
            expected = {"fsdp2": "DTensor[320, 64]", "zero2": "Parameter[320, 64]", "zero3": "Parameter[0]"}[engine]
            assert ours["lm_head_weight"] == expected, engine
        assert [w["shape"] for w in ours["weights_seen"]] == [[320, 64]], engine
        assert ours["calls"]["fused_linear_cross_entropy"] == len(ours["loss"]) and not base["calls"]["rms_norm"]


@pytest.mark.multiprocess
def test_engines_directly(tmp_path):
    engines = ["fsdp1", "fsdp2"] + (["zero2", "zero3"] if HAS_DEEPSPEED else [])
    summary = run([*TORCHRUN, "integrations/engine_train.py", "--engines", ",".join(engines)], tmp_path / "s.json")
    assert_engine_results(summary, engines)
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed: ZeRO-2/3 not run (FSDP1/FSDP2 passed)")


@pytest.mark.multiprocess
def test_fsdp2_with_triton_interpreter(tmp_path):
    summary = run([*TORCHRUN, "integrations/engine_train.py", "--engines", "fsdp2", "--steps", "2", "--seq", "16"],
                  tmp_path / "s.json", interpret=True)
    assert_engine_results(summary, ["fsdp2"])


@pytest.mark.multiprocess
def test_hf_trainer_accelerate_ddp_packed_checkpointing(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
           "integrations/hf_train.py", "--cpu", "--packed", "--gradient-checkpointing", "--steps", "4"]
    summary = run(cmd, tmp_path / "s.json")
    assert summary["ok"] and summary["engine"] == "MULTI_CPU", summary["problems"]
    base, ours = summary["runs"]["fp32"]["base"], summary["runs"]["fp32"]["liger"]
    assert ours["world_size"] == 2 and len(ours["loss"]) == len(ours["grad_norm"]) == 4
    assert ours["patch_events"][0]["param_identity_kept"] and not ours["patch_events"][0]["wrapped_before_patch"]
    assert ours["calls"]["fused_linear_cross_entropy"] >= 4 * 2 and not base["calls"]["fused_linear_cross_entropy"]
    assert summary["runs"]["fp32"]["comparison"]["ok"] and summary["runs"]["fp32"]["comparison"]["eval_ok"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ["fsdp2", pytest.param("zero3", marks=pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed"))])
def test_hf_trainer_accelerate_sharded_engines_on_cpu(tmp_path, engine):
    """The HF Trainer with accelerate's own FSDP2 preparation (decoder layers, embedding, [final norm,
    lm_head] group, root) or ZeRO-3 (model built under zero.Init from TrainingArguments), on CPU through
    the test-only accelerate_cpu_shim (accelerate itself runs these engines only on accelerators)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{engine}.yaml",
           "integrations/hf_train.py", "--steps", "3"]
    summary = run(cmd, tmp_path / "s.json", shim=True)
    assert summary["ok"] and summary["engine"] == {"fsdp2": "FSDP2", "zero3": "ZeRO-3"}[engine], summary["problems"]
    runs = summary["runs"]["fp32"]
    event = runs["liger"]["patch_events"][0]
    assert event["param_identity_kept"] and not event["wrapped_before_patch"]
    assert event["zero3_partitioned"] == (engine == "zero3")  # patched an already partitioned model
    assert runs["liger"]["weights_seen"] == [{"class": "Parameter", "dtype": "torch.float32", "shape": [320, 64]}]
    assert runs["comparison"]["ok"] and runs["comparison"]["eval_ok"] and len(runs["liger"]["grad_norm"]) == 3


@pytest.mark.multiprocess
def test_lightning_ddp_and_model_parallel(tmp_path):
    summary = run([sys.executable, "integrations/lightning_train.py", "--strategies", "ddp,model_parallel",
                   "--steps", "3"], tmp_path / "s.json")
    assert summary["ok"], {k: r["problems"] for k, r in summary["results"].items()}
    ddp, fsdp2 = summary["results"]["ddp"]["liger"], summary["results"]["model_parallel"]["liger"]
    assert ddp["wrapper"] == "DistributedDataParallel" and ddp["world_size"] == 2
    assert fsdp2["wrapper"] == "Module"  # ModelParallelStrategy trains the module fully_shard sharded
    for result in (ddp, fsdp2):
        assert result["calls"]["fused_linear_cross_entropy"] == 3 and result["patched_after_wrap"]
