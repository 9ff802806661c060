"""Time the glu kernels (forward; backward that also writes c) over tile sizes on a GPU.

    python scripts/glu_tile_sweep.py --out docs/bench/glu_tiles.json

The MLP activation of the ANCHORS.md Llama step (16384 x 8192 bf16, SiLU): the forward reads a and b
and writes c (3 x 256 MiB), the backward reads dc, a, b and writes da, db, c (6 x 256 MiB). Reports
ms (median of triton.testing.do_bench) and the fraction of the measured copy bandwidth for each
`glu.GLU_TILES` = (elements per tile, most warps).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from liger_kernels.ops import glu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--out", default="docs/bench/glu_tiles.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    shape = (args.rows, args.cols)
    a, b, dc = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(200):  # a few seconds of matmuls: clocks up before timing
        warm @ warm
    src = torch.empty(256 * 2**20, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=300)
    copy_gbps = 2 * src.numel() / copy_ms / 1e6  # read + write
    nbytes = a.numel() * a.element_size()
    rows = []
    original = glu.GLU_TILES
    for tiles in [(1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 16)]:
        glu.GLU_TILES = tiles
        fwd = triton.testing.do_bench(lambda: glu._glu_forward(a, b, glu._SILU), rep=300)
        buffer = dc.clone()
        bwd = triton.testing.do_bench(lambda: glu._glu_backward_and_output(buffer, a, b, glu._SILU), rep=300)
        row = {"tile_elements": tiles[0], "max_warps": tiles[1], "forward_ms": fwd, "backward_ms": bwd,
               "forward_of_copy_bw": 3 * nbytes / fwd / 1e6 / copy_gbps,
               "backward_of_copy_bw": 6 * nbytes / bwd / 1e6 / copy_gbps}
        rows.append(row)
        print(f"tiles {tiles}: forward {fwd:.3f} ms ({row['forward_of_copy_bw']:.0%} of copy bw), "
              f"backward {bwd:.3f} ms ({row['backward_of_copy_bw']:.0%})", flush=True)
    glu.GLU_TILES = original
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "shape": shape,
                                          "copy_gb_per_s": copy_gbps, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
