"""Axolotl end to end: train one config with and without liger_plugins.axolotl.LigerPlugin, compare losses.

    python integrations/axolotl/tiny.py          # once: tiny local model, tokenizer and data under out/
    python integrations/axolotl/compare.py       # configs/axolotl_tiny_cpu.yml: CPU, fp32, about a minute
    python integrations/axolotl/compare.py --config configs/axolotl_tiny_lora_cpu.yml

Both runs go through Axolotl's own entry points in one process (`load_cfg`, which registers the plugin
from the config's `plugins:` list and validates its keys; `load_datasets`; `axolotl.train.train`, whose
model loader calls the plugin's hooks). The baseline is the same config without the plugin and without
the liger_* keys; it runs first, because the plugin's class-level patch lasts for the process. Each run
starts from the same RNG state (as a fresh process would), so LoRA adapters start equal. Paths in
the configs are relative to the repository root. Exits 1 if the loss curves differ by more than
--rtol (default: 1e-4 in fp32, 3e-2 in bf16/fp16) relative to the largest loss.
On CPU the kernels run their torch reference (Triton needs CUDA tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

# No telemetry upload or Hub lookups: both hang or fail on machines without network access.
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "liger_plugins.axolotl.LigerPlugin"


def without_plugin(cfg: dict) -> dict:
    """`cfg` without liger_plugins' plugin entry and without liger_* keys."""
    baseline = {key: value for key, value in cfg.items() if not key.startswith("liger_")}
    plugins = [name for name in cfg.get("plugins") or [] if name != PLUGIN]
    if plugins:
        baseline["plugins"] = plugins
    else:
        baseline.pop("plugins", None)
    return baseline


def train(cfg: dict, run_dir: Path):
    """Train `cfg` with Axolotl, writing under `run_dir`; returns (losses per logged step, trainer)."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train as axolotl_train
    from transformers import set_seed

    # Axolotl seeds only when it builds the trainer, after LoRA adapters took their initial weights from
    # the process RNG: seed here so that every run in this process starts from the same RNG state.
    set_seed(cfg.get("seed", 42))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "output_dir": str(run_dir / "out"), "dataset_prepared_path": str(run_dir / "prepared")}
    path = run_dir / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    parsed = load_cfg(str(path))
    dataset_meta = load_datasets(cfg=parsed, cli_args=TrainerCliArgs())
    _, _, trainer = axolotl_train(cfg=parsed, dataset_meta=dataset_meta)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], trainer


def max_relative_difference(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        raise ValueError(f"loss curves of different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) for x, y in zip(a, b)) / max(abs(x) for x in a)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/axolotl_tiny_cpu.yml"))
    parser.add_argument("--out", type=Path, default=Path("out/axolotl_compare"))
    parser.add_argument("--rtol", type=float)
    args = parser.parse_args()
    cfg = yaml.safe_load(args.config.read_text())
    args.out = args.out.resolve()
    os.chdir(ROOT)  # the configs' own paths are relative to the repository root
    if PLUGIN not in (cfg.get("plugins") or []):
        sys.exit(f"{args.config} does not list {PLUGIN} in plugins:")
    baseline, _ = train(without_plugin(cfg), args.out / "baseline")
    patched, _ = train(cfg, args.out / "liger")
    rtol = args.rtol or (3e-2 if cfg.get("bf16") or cfg.get("fp16") else 1e-4)
    diff = max_relative_difference(baseline, patched)
    report = {"config": str(args.config), "baseline": baseline, "liger": patched, "max_rel_diff": diff, "rtol": rtol}
    (args.out / "losses.json").write_text(json.dumps(report, indent=1))
    for step, (a, b) in enumerate(zip(baseline, patched), 1):
        print(f"step {step:3d}  baseline {a:.6f}  liger {b:.6f}")
    print(f"max relative difference {diff:.2e} (rtol {rtol:g}): {'OK' if diff <= rtol else 'MISMATCH'}")
    sys.exit(0 if diff <= rtol else 1)


if __name__ == "__main__":
    main()
