"""What the probes that time bench_e2e's training step on one model share (scripts/adamw_e2e_sweep.py,
scripts/adamw_overlap_probe.py): their command-line arguments and their JSON report."""

from __future__ import annotations

import argparse
import json

import torch


def parse_args(doc: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llama")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the variants")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", default=None, help="JSON report path")
    return parser.parse_args(argv)


def write_report(args: argparse.Namespace, results: list[dict], **extra) -> dict:
    """The run's setup, `extra` and `results`, written to args.out when given."""
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, family=args.family, batch=args.batch,
                  seq=args.seq, steps=args.steps, rounds=args.rounds, **extra, results=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report
