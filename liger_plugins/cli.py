"""`liger-plugins` command line: bench, selfcheck, demo.

    liger-plugins bench [--quick] [--ops OPS] [--impls IMPLS] [--out docs/bench] [--time-limit S]
    liger-plugins bench --from-json docs/bench/results.json --out docs/bench
    liger-plugins bench --e2e [bench_e2e options]      end-to-end training throughput (liger_plugins.bench_e2e)
    liger-plugins selfcheck [--interpret] [--dtypes fp32,bf16] [--ops OPS]
    liger-plugins demo [demo options]

torch, triton and the kernels are imported only inside the subcommands: `selfcheck --interpret` must
set TRITON_INTERPRET before triton is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

OPS = ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy",
       "fused_add_rms_norm", "layer_norm", "geglu")  # = liger_kernels.bench.DEFAULT_OPS, without importing torch
# = liger_kernels.bench.LOSS_OPS: the fused-linear losses, on request (--ops dpo_loss,...)
LOSS_OPS = ("dpo_loss", "orpo_loss", "cpo_loss", "simpo_loss", "kto_loss", "grpo_loss", "jsd_loss",
            "cosine_loss")
# = liger_kernels.bench.EXTRA_OPS: more ops, on request (--ops kl_div,...)
EXTRA_OPS = ("kl_div", "jsd", "tvd", "dyt", "relu_squared", "softmax", "sparsemax", "group_norm", "poly_norm",
             "modulated_rms_norm", "mrope", "llama4_rope", "swiglu_gate_up", "gated_down_proj", "linear_projections",
             "fused_moe", "multi_token_attention", "fused_linear_jsd")
IMPLS = ("ours", "eager", "compile", "liger")
DTYPES = ("bf16", "fp16", "fp32")


def _choices(allowed):
    """argparse type: comma-separated names, each one of `allowed`, in the order given."""
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}")
        return tuple(names)
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liger-plugins", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time the ops against torch eager, torch.compile and Liger-Kernel (GPU)")
    bench.add_argument("--out", default="docs/bench", help="folder for results.json, results.md and plots")
    bench.add_argument("--quick", action="store_true", help="the anchor shapes only (no sweeps)")
    bench.add_argument("--ops", type=_choices(OPS + LOSS_OPS + EXTRA_OPS), default=OPS,
                       help=f"comma-separated, from {','.join(OPS + LOSS_OPS + EXTRA_OPS)} "
                            f"(default: {','.join(OPS)})")
    bench.add_argument("--impls", type=_choices(IMPLS), default=IMPLS,
                       help="comma-separated implementations (liger runs only where liger_kernel imports)")
    bench.add_argument("--dtype", choices=DTYPES, default="bf16")
    bench.add_argument("--time-limit", type=float, default=None,
                       help="seconds; shapes not started by then are skipped (and listed)")
    bench.add_argument("--warmup", type=float, default=3.0, help="seconds of matrix products before measuring")
    bench.add_argument("--plots", choices=("both", "per-op", "combined", "none"), default="both",
                       help="per-op: <op>.png each; combined: bench.png with one panel per op")
    bench.add_argument("--from-json", help="re-make the table, results.md and plots from a results.json")
    bench.add_argument("--e2e", action="store_true",
                       help="end-to-end training benchmark instead; other options go to liger_plugins.bench_e2e")

    check = sub.add_parser("selfcheck", help="each op vs its torch reference on small random inputs")
    check.add_argument("--interpret", action="store_true", help="run the Triton kernels in the interpreter (CPU)")
    check.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    check.add_argument("--dtypes", type=_choices(DTYPES), default=("fp32", "bf16"))
    check.add_argument("--ops", type=_choices(OPS + EXTRA_OPS), default=OPS,
                       help=f"comma-separated, from {','.join(OPS + EXTRA_OPS)} (default: {','.join(OPS)})")

    sub.add_parser("demo", add_help=False,
                   help="train a tiny model with and without the kernels (its options: demo --help)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # demo and bench --e2e take their own options: hand them over unparsed
    if argv[:1] == ["demo"]:
        from liger_plugins import demo

        return demo.main(argv[1:])
    if argv[:1] == ["bench"] and "--e2e" in argv:
        from liger_plugins import bench_e2e

        return bench_e2e.main([a for a in argv[1:] if a != "--e2e"]) or 0

    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from liger_kernels import bench

        return bench.bench_main(args)
    if args.command == "selfcheck":
        if args.interpret:
            os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        import torch

        from liger_kernels import _utils, bench

        if args.interpret and not _utils.INTERPRET:
            print("selfcheck --interpret: triton was imported before TRITON_INTERPRET was set", file=sys.stderr)
            return 2
        dtypes = tuple(bench.DTYPES[d] for d in args.dtypes)
        device = "cpu" if args.interpret else args.device
        if device == "cuda" and not torch.cuda.is_available():
            print("selfcheck --device cuda: no CUDA device here", file=sys.stderr)
            return 2
        rows = bench.selfcheck(args.ops, dtypes, device)
        print(bench.format_selfcheck(rows))
        return 0 if all(r["ok"] for r in rows) else 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
