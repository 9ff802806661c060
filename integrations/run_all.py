"""Run the integration matrix and report pass / fail per combination.

    python integrations/run_all.py                      # the CPU combinations (gloo, 2 processes)
    python integrations/run_all.py --device gpu         # the 2-GPU combinations (NCCL), see gpu_matrix.sh
    python integrations/run_all.py --list               # what would run
    python integrations/run_all.py --only hf_fsdp2,lightning_gpu --out-dir results/

Each combination is one launch of integrations/{hf_train,engine_train,lightning_train}.py, the way users
launch them; each script trains with and without liger-plugins and checks itself (exit status and a
JSON summary). Results: one line per combination here, and one file, <out-dir>/matrix.json, holding
every script's summary (the memory run's per-rank peak memory and step time included).
With --budget, combinations not started within that many seconds are reported as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def accelerate(config: str, *flags: str) -> list[str]:
    return [PY, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{config}.yaml",
            "integrations/hf_train.py", *flags]


# name -> (device, command, needs deepspeed). Order = run order: with --budget the last ones are skipped first.
MATRIX = {
    # CPU, gloo: what the engines allow there (see the scripts' docstrings)
    "engines_cpu": ("cpu", [*TORCHRUN, "integrations/engine_train.py", "--engines", "fsdp1,fsdp2,zero2,zero3"], True),
    "engines_cpu_nodeepspeed": ("cpu", [*TORCHRUN, "integrations/engine_train.py", "--engines", "fsdp1,fsdp2"], False),
    "hf_ddp_cpu": ("cpu", accelerate("ddp", "--cpu"), False),
    "hf_ddp_packed_ckpt_cpu": ("cpu", accelerate("ddp", "--cpu", "--packed", "--gradient-checkpointing"), False),
    "lightning_cpu": ("cpu", [PY, "integrations/lightning_train.py", "--strategies", "ddp,model_parallel"], False),
    # 2 GPUs, NCCL: the HF Trainer under every accelerate engine, fp32 (tight) and bf16 (as users train)
    "hf_ddp": ("gpu", accelerate("ddp", "--precision", "fp32,bf16"), False),
    "hf_fsdp1": ("gpu", accelerate("fsdp1", "--precision", "fp32,bf16"), False),
    "hf_fsdp2": ("gpu", accelerate("fsdp2", "--precision", "fp32,bf16"), False),
    "hf_zero2": ("gpu", accelerate("zero2", "--precision", "fp32,bf16"), True),
    "hf_zero3": ("gpu", accelerate("zero3", "--precision", "fp32,bf16"), True),
    # FSDP2 memory, the ANCHORS.md Llama (1.2 B, vocab 128256), 4 x 2048 tokens per GPU, bf16, AdamW
    "memory_fsdp2": ("gpu", accelerate("fsdp2", "--config", "llama", "--precision", "bf16", "--batch", "4", "--seq",
                                       "2048", "--accum", "1", "--steps", "6", "--warmup", "3", "--lr", "1e-4",
                                       "--memory"), False),
    "engines_gpu": ("gpu", [*TORCHRUN, "integrations/engine_train.py", "--device", "cuda"], True),
    "lightning_gpu": ("gpu", [PY, "integrations/lightning_train.py", "--accelerator", "gpu", "--precision", "bf16",
                              "--strategies", "ddp,fsdp,model_parallel"], False),
    "lightning_deepspeed_gpu": ("gpu", [PY, "integrations/lightning_train.py", "--accelerator", "gpu", "--precision",
                                        "bf16", "--strategies", "deepspeed_stage_2,deepspeed_stage_3"], True),
    "hf_fsdp2_offload_ckpt": ("gpu", accelerate("fsdp2_offload", "--precision", "bf16"), False),
    "hf_zero3_packed_ckpt": ("gpu", accelerate("zero3", "--precision", "bf16", "--packed", "--gradient-checkpointing"),
                             True),
    "hf_fsdp2_sdpa_flash": ("gpu", accelerate("fsdp2", "--precision", "bf16", "--sdpa-backend", "flash"), False),
    "hf_fsdp2_packed": ("gpu", accelerate("fsdp2", "--precision", "bf16", "--packed"), False),
    "hf_fsdp2_flash_attention_2": ("gpu", accelerate("fsdp2", "--precision", "bf16", "--packed", "--attn",
                                                     "flash_attention_2"), False),
}


def available(name: str) -> str | None:
    """Why `name` cannot run here, or None."""
    device, _, needs_deepspeed = MATRIX[name]
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    if needs_deepspeed and not has_deepspeed:
        return "deepspeed is not installed"
    if name == "engines_cpu_nodeepspeed" and has_deepspeed:
        return "engines_cpu covers it"
    if name == "hf_fsdp2_flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if device == "gpu":
        import torch

        if torch.cuda.device_count() < 2:
            return "needs 2 CUDA GPUs"
    return None


def stop(proc: subprocess.Popen) -> str:
    """Stop a launch that ran out of time, workers included, so that no orphaned rank keeps a GPU or a
    port for the next combination; its output so far. SIGTERM first: torchrun (also inside accelerate
    launch) then stops the workers it started in sessions of their own; the launch's own session
    (Lightning's second rank) gets SIGKILL after a grace period."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        return proc.communicate(timeout=10)[0]
    except subprocess.TimeoutExpired:  # a worker outside the session still holds the pipe
        proc.stdout.close()
        return "(output lost: a worker outside the launch's session did not stop)"


def run_one(name: str, scratch: Path, timeout: int) -> dict:
    _, cmd, _ = MATRIX[name]
    summary_path = scratch / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LIGER_POISON_OUTPUTS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--out", str(summary_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = "pass" if proc.returncode == 0 else "FAIL"
    except subprocess.TimeoutExpired:
        output, status = stop(proc), "TIMEOUT"
    tail = output[-3000:]
    result = {"status": status, "seconds": round(time.perf_counter() - start, 1), "command": " ".join(cmd)}
    if summary_path.exists():
        result["summary"] = json.loads(summary_path.read_text())
    if status != "pass":
        result["log_tail"] = tail
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--only", help="comma-separated combination names")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out-dir", default="out/integrations")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per combination")
    parser.add_argument(
        "--budget", type=int, default=0, help="start no combination after this many seconds (0: no limit)"
    )
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else [n for n, (d, _, _) in MATRIX.items() if d == args.device]
    unknown = [n for n in names if n not in MATRIX]
    if unknown:
        raise SystemExit(f"unknown combinations {unknown}; known: {', '.join(MATRIX)}")
    if args.list:
        for name in names:
            print(f"{name:28s} {MATRIX[name][0]}  {' '.join(MATRIX[name][1])}")
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="liger-integrations-"))  # per-run summaries, merged below
    results, start = {}, time.perf_counter()
    for name in names:
        reason = available(name)
        if reason is None and args.budget and time.perf_counter() - start > args.budget:
            reason = f"time budget of {args.budget} s spent"
        if reason:
            results[name] = {"status": "skipped", "reason": reason}
        else:
            results[name] = run_one(name, scratch, args.timeout)
        r = results[name]
        print(f"{r['status']:8s} {name:28s} {r.get('seconds', '')!s:>7} {r.get('reason', '')}", flush=True)
        if r["status"] not in ("pass", "skipped"):
            print(r.get("log_tail", ""), flush=True)
        # rewritten after every combination: a run stopped from outside keeps what finished
        (out_dir / "matrix.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    failed = [n for n, r in results.items() if r["status"] not in ("pass", "skipped")]
    passed = [n for n, r in results.items() if r["status"] == "pass"]
    print(f"{len(passed)} passed, {len(results) - len(passed) - len(failed)} skipped, {len(failed)} failed"
          f"{': ' + ', '.join(failed) if failed else ''}")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()
