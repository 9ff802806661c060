"""The main job: fine-tune a small Llama-architecture model with the Hugging Face Trainer, once plain and
once with `use_liger_kernel=True` served by liger-plugins, and compare loss curves, speed and memory.

Everything is local: the model is built from a config shipped in liger_plugins/data/ (demo_llama_*.json,
also at configs/demo/; random init) and the text is the small corpus shipped beside it, tokenized byte
by byte (no tokenizer download). Installed from a wheel: pip install 'liger-plugins[demo]'.

    liger-plugins demo                     # CPU: tiny model, a few minutes; CUDA: a bigger model
    liger-plugins demo --steps 60 --seq 256 --batch 8 --out demo_out
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"  # package data: the corpus and the model configs
BYTE_OFFSET = 0  # token id = byte value; configs have vocab >= 256


def load_corpus_tokens() -> list[int]:
    texts = sorted(DATA_DIR.glob("*.txt"))
    if not texts:
        raise FileNotFoundError(f"no corpus (*.txt) found in {DATA_DIR}")
    data = b"\n".join(p.read_bytes() for p in texts)
    return [b + BYTE_OFFSET for b in data]


class ByteBlocks:
    """Consecutive blocks of `seq` byte tokens; labels = input_ids (the model shifts them)."""

    def __init__(self, tokens: list[int], seq: int):
        import torch

        n = len(tokens) // seq
        if n < 1:
            raise ValueError(f"corpus has {len(tokens)} tokens, fewer than one block of --seq {seq}")
        self.blocks = torch.tensor(tokens[: n * seq]).view(n, seq)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone()}


def _make_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []
            self._start = None

        def on_step_begin(self, args, state, control, **kwargs):
            _sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_once(use_liger: bool, config_path: Path, dataset, args, out_dir: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    from liger_plugins import hf

    cuda = torch.cuda.is_available() and not args.cpu
    spec = json.loads(config_path.read_text())
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    if use_liger:
        hf.enable()  # makes the stock Trainer's use_liger_kernel=True apply liger-plugins
    timer = _make_timer_callback()
    training_args = TrainingArguments(
        output_dir=str(out_dir / ("liger" if use_liger else "baseline")),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        bf16=cuda,
        use_cpu=not cuda,
        use_liger_kernel=use_liger,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[timer])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    step_times = timer.times[2:] or timer.times  # first steps include warm-up / compilation
    median_step = sorted(step_times)[len(step_times) // 2]
    result = dict(
        run="liger-plugins" if use_liger else "baseline",
        losses=losses,
        step_s=median_step,
        tokens_per_s=args.batch * args.seq / median_step,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        device="cuda" if cuda else "cpu",
    )
    if use_liger:
        hf.disable()
        from liger_plugins.patching import unpatch

        unpatch(model)
    return result


def report(results: list[dict], out_dir: Path) -> str:
    base, ours = results
    diff = max(abs(a - b) for a, b in zip(base["losses"], ours["losses"]))
    rows = [("run", "final loss", "time/step", "tokens/s", "peak memory")]
    for r in results:
        mem = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
        rows.append((r["run"], f"{r['losses'][-1]:.4f}", f"{r['step_s'] * 1e3:.1f} ms",
                     f"{r['tokens_per_s']:,.0f}", mem))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"max |loss difference| over {len(base['losses'])} steps: {diff:.2e}")
    if base["device"] == "cpu":
        lines.append("(CPU: the kernels ran their torch reference; Triton runs on CUDA tensors)")
    text = "\n".join(lines)
    (out_dir / "demo.json").write_text(json.dumps(dict(results=results, max_loss_diff=diff), indent=1))
    _plot(results, out_dir / "demo.png")
    return text


def _plot(results, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r, style in zip(results, ["-", "--"]):
        ax1.plot(range(1, len(r["losses"]) + 1), r["losses"], style, label=r["run"])
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.legend()
    names = [r["run"] for r in results]
    if results[0]["peak_gib"] is not None:
        ax2.bar(names, [r["peak_gib"] for r in results], color=["tab:gray", "tab:green"])
        ax2.set_ylabel("peak GPU memory (GiB)")
    else:
        ax2.bar(names, [r["step_s"] * 1e3 for r in results], color=["tab:gray", "tab:green"])
        ax2.set_ylabel("median time per step (ms, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import logging

    import torch

    # Show what use_liger_kernel=True patched (liger_plugins.hf logs the patch summary at INFO).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[liger-plugins] %(message)s"))
    logging.getLogger("liger_plugins").addHandler(handler)
    logging.getLogger("liger_plugins").setLevel(logging.INFO)

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="liger-plugins demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="model config JSON (default: the shipped demo_llama_gpu.json on CUDA, "
                             "demo_llama_cpu.json on CPU)")
    parser.add_argument("--steps", type=int, default=40 if cuda else 30)
    parser.add_argument("--batch", type=int, default=8 if cuda else 4)
    parser.add_argument("--seq", type=int, default=1024 if cuda else 128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is available")
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    args = parser.parse_args(argv)
    # Before two training runs, not after them: the runs need transformers, the plot matplotlib.
    missing = [name for name in ("transformers", "accelerate", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"the demo needs {', '.join(missing)}: pip install 'liger-plugins[demo]'")
    on_gpu = cuda and not args.cpu
    config_path = args.config or DATA_DIR / ("demo_llama_gpu.json" if on_gpu else "demo_llama_cpu.json")
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = ByteBlocks(load_corpus_tokens(), args.seq)
    print(f"demo: {config_path.name}, {args.steps} steps of {args.batch} x {args.seq} tokens on "
          f"{'CUDA' if on_gpu else 'CPU'}; corpus {len(dataset)} blocks", flush=True)
    results = [train_once(use_liger, config_path, dataset, args, args.out) for use_liger in (False, True)]
    print()
    print(report(results, args.out))
    print(f"\nwrote {args.out / 'demo.json'} and {args.out / 'demo.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
