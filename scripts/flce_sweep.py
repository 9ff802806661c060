"""Sweep of the cross-entropy and fused linear cross-entropy launch / schedule knobs on the GPU.

    python3 scripts/flce_sweep.py --out $OUT/flce.json [--sections ce,flce,parts] [--time-limit 150]
    python3 scripts/flce_sweep.py --smoke --out /tmp/flce_smoke.json   # tiny shapes, CPU, interpreter

Run from the repository root. Sections (each writes the JSON again, so a killed run keeps what it
measured):
- ce:    cross_entropy on 8192 x 128256 bf16 logits, in place (as the bench), for a grid of CE knobs.
- flce:  fused_linear_cross_entropy at 8192x4096x128256 (Llama 3) and 8192x2304x256000 (Gemma) for a
         grid of schedule knobs, then a "combo" of the best knob of each group that fits the memory
         target.
- parts: the four per-chunk kernels of the fused loss timed alone at its chunk shape (and at twice
         the rows), the Triton dW configurations, dX and dW on two streams: where the time goes,
         against the bf16 matmul rate and copy bandwidth.
Times: forward+backward, `triton.testing.do_bench` median (L2 cleared before each run), grad_output 1.
Memory: peak allocated beyond what was allocated before the call, gradients included (MiB); "kept":
memory a variant's first call leaves allocated for good (e.g. a second stream's cuBLAS workspace).
Errors: relative (L2 norm) error of the loss and every gradient against the "ref" variant (the
module defaults) and against fp32 torch math on the same inputs ("fp32").
Knobs are module constants of liger_kernels.ops.cross_entropy / fused_linear_cross_entropy, set for
one variant and restored after it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from liger_kernels.bench import warm_up_gpu  # noqa: E402
from liger_kernels.ops import cross_entropy as ce  # noqa: E402
from liger_kernels.ops import fused_linear_cross_entropy as flce  # noqa: E402

MiB = 2**20
# Issue 3 targets: ms, and MiB in the unit of ../shared/ANCHORS.md ("1.2 GB" = 1200 MiB; see
# docs/perf_notes_ce.md).
TARGETS = {"ce": (1.4, 0), "llama3": (38.0, 1200), "gemma": (45.0, 1300)}
CE_SHAPE = (8192, 128256)
FLCE_SHAPES = {"llama3": (8192, 4096, 128256), "gemma": (8192, 2304, 256000)}
SMOKE_CE_SHAPE = (6, 300)
SMOKE_FLCE_SHAPES = {"llama3": (9, 32, 300), "gemma": (9, 16, 500)}

CE_VARIANTS = [
    ("ref", {}),  # the defaults: 16384-column blocks, 16 warps, L2 hints
    ("nohint", {"CE_L2_HINTS": False}),
    ("w32", {"CE_NUM_WARPS": 32}),
    ("b8k", {"_MAX_BLOCK": 8192}),  # 16 warps
    ("b8k_w8", {"_MAX_BLOCK": 8192, "CE_NUM_WARPS": 8}),
    ("b4k", {"_MAX_BLOCK": 4096}),  # 8 warps
    ("b4k_w4", {"_MAX_BLOCK": 4096, "CE_NUM_WARPS": 4}),
    ("b32k", {"_MAX_BLOCK": 32768}),  # 32 warps
    ("s2", {"CE_STAGES": 2}),
    ("s3", {"CE_STAGES": 3}),
    ("b8k_s2", {"_MAX_BLOCK": 8192, "CE_STAGES": 2}),
    ("p1", {"CE_PROGRAMS_PER_SM": 1}),
    ("b8k_p3", {"_MAX_BLOCK": 8192, "CE_PROGRAMS_PER_SM": 3}),
]
# Groups for the "combo" variant: the best member of each group (within the memory target) is merged.
ALL_ROWS = 1 << 30  # DW_TRITON_MAX_ROWS that sends every chunk to the Triton dW kernel
FLCE_GROUPS = {
    "streams": [("stream", {"DW_STREAM": True})],
    "dw": [
        ("dw_triton", {"DW_TRITON_MAX_ROWS": ALL_ROWS}),  # DW_CONFIG default (64, 128, 64, 4, 3)
        ("dw_triton_s2", {"DW_TRITON_MAX_ROWS": ALL_ROWS, "DW_CONFIG": (64, 128, 64, 4, 2)}),
        ("dw_triton_64", {"DW_TRITON_MAX_ROWS": ALL_ROWS, "DW_CONFIG": (64, 64, 64, 4, 3)}),
        ("dw_triton_128", {"DW_TRITON_MAX_ROWS": ALL_ROWS, "DW_CONFIG": (128, 128, 64, 8, 3)}),
    ],
    "ce": [("ce_best", None)],  # the fastest correct CE variant of the ce section (else b8k)
    "chunk": [
        ("chunk96", {"CHUNK_BYTES": 96 * MiB}),
        ("chunk160", {"CHUNK_BYTES": 160 * MiB}),
        ("chunk256", {"CHUNK_BYTES": 256 * MiB}),
    ],
}
KNOB_MODULES = (ce, flce)
KNOB_NAMES = ("_MAX_BLOCK", "CE_NUM_WARPS", "CE_PROGRAMS_PER_SM", "CE_L2_HINTS", "CE_STAGES",
              "CHUNK_BYTES", "MIN_CHUNK_ROWS", "DW_STREAM", "DW_TRITON_MAX_ROWS", "DW_CONFIG")


def _module_of(name):
    for mod in KNOB_MODULES:
        if hasattr(mod, name):
            return mod
    raise KeyError(f"no knob named {name}")


def knob_state() -> dict:
    return {name: getattr(_module_of(name), name) for name in KNOB_NAMES}


@contextlib.contextmanager
def knobs(values: dict):
    saved = []
    try:
        for name, value in values.items():
            mod = _module_of(name)
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, old in reversed(saved):
            setattr(mod, name, old)


class Gpu:
    """Timing and memory on CUDA."""

    device = "cuda"

    @staticmethod
    def ms(fn, grad_to_none=None, warmup=25, rep=100) -> float:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))

    @staticmethod
    def sync():
        torch.cuda.synchronize()

    @staticmethod
    def allocated() -> int:
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    @classmethod
    def peak_mib(cls, fn) -> float:
        base = cls.allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MiB


class Cpu:
    """--smoke: one timed call, no memory numbers (checks the script's logic, not speed)."""

    device = "cpu"

    @staticmethod
    def ms(fn, grad_to_none=None, warmup=0, rep=0) -> float:
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    @staticmethod
    def sync():
        pass

    @staticmethod
    def allocated() -> int:
        return 0

    @staticmethod
    def peak_mib(fn):
        fn()
        return None


def rel_err(a: torch.Tensor, b: torch.Tensor, rows: int = 1024) -> float:
    """||a - b|| / ||b|| in fp64 sums over row blocks (no full-size fp32 temporaries)."""
    a, b = (t.detach().reshape(-1, t.shape[-1] if t.dim() else 1) for t in (a, b))
    num = torch.zeros((), dtype=torch.float64, device=a.device)
    den = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], rows):
        x, y = a[i:i + rows].float(), b[i:i + rows].float()
        num += (x - y).square().sum(dtype=torch.float64)
        den += y.square().sum(dtype=torch.float64)
    return (num.sqrt() / den.sqrt().clamp_min(1e-300)).item()


def ceilings(env) -> dict:
    """Copy bandwidth (read + write) and bf16 matmul rate measured now, for the parts section."""
    src = torch.empty(2**30 // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = env.ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    mm_ms = env.ms(lambda: torch.mm(a, a, out=c))
    return {"copy_bytes_per_s": 2 * 2**30 / (copy_ms * 1e-3),
            "matmul_flops_per_s": 2 * 8192**3 / (mm_ms * 1e-3)}


class Clock:
    def __init__(self, limit_s):
        self.start, self.limit_s = time.perf_counter(), limit_s

    def out(self) -> bool:
        return time.perf_counter() - self.start > self.limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _errors(got: dict, ref: dict | None, truth: dict) -> dict:
    out = {"vs_fp32": {k: rel_err(v, truth[k]) for k, v in got.items()}}
    if ref is not None:
        out["vs_ref"] = {k: rel_err(v, ref[k]) for k, v in got.items()}
    return out


def _ok(errors: dict, ref_errors: dict | None) -> bool:
    """Correct: no NaN, and every error vs fp32 at most twice the defaults' own (plus 1e-3)."""
    for k, e in errors["vs_fp32"].items():
        if e != e:
            return False
        if ref_errors is not None and e > 2 * ref_errors["vs_fp32"][k] + 1e-3:
            return False
    return True


def run_variant(name, values, env, make_call, leaves, truth, ref_out, reps, keep=False):
    """Correctness, memory and time of one variant; returns (record, its outputs if `keep`)."""
    rec = {"variant": name, "knobs": dict(values)}
    outputs = None
    try:
        with knobs(values):
            rec["settings"] = knob_state()
            for t in leaves:
                t.grad = None
            before = env.allocated()
            outputs = make_call(fresh=True)()  # compilation; fresh inputs for the error check
            for t in leaves:
                t.grad = None
            rec["errors"] = _errors(outputs, ref_out, truth)
            if not keep:
                outputs = None
            held = sum(t.numel() * t.element_size() for t in (outputs or {}).values())
            rec["kept_mib"] = (env.allocated() - before - held) / MiB if env.device == "cuda" else None
            call = make_call(fresh=False)
            rec["peak_mib"] = env.peak_mib(call)
            for t in leaves:
                t.grad = None
            rec["ms"] = env.ms(call, grad_to_none=leaves, **reps)
    except Exception as e:  # one failing variant (compile error, OOM) must not stop the sweep
        text = str(e).strip()
        rec["error"] = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
        outputs = None
    for t in leaves:
        t.grad = None
    gc.collect()
    if env.device == "cuda":
        torch.cuda.empty_cache()
    return rec, outputs


# --- sections -------------------------------------------------------------------------------------

def ce_section(env, clock, smoke, log) -> dict:
    m, v = SMOKE_CE_SHAPE if smoke else CE_SHAPE
    torch.manual_seed(0)
    base = torch.randn(m, v, device=env.device, dtype=torch.bfloat16)
    target = torch.randint(0, v, (m,), device=env.device)
    logits = base.clone().requires_grad_()
    leaf32 = base.float().requires_grad_()
    loss32 = F.cross_entropy(leaf32, target)
    loss32.backward()
    truth = {"loss": loss32.detach(), "grad": leaf32.grad}
    del leaf32, loss32

    def make_call(fresh):
        if fresh:
            def first():
                leaf = base.clone().requires_grad_()
                loss = ce.cross_entropy(leaf, target, in_place=True)
                loss.backward()
                return {"loss": loss.detach(), "grad": leaf.grad}
            return first

        def call():  # as the bench: in place over the leaf (its values are then gradients)
            ce.cross_entropy(logits, target, in_place=True).backward()
        return call

    records, ref_out, ref_errors, skipped = [], None, None, []
    reps = {"warmup": 25, "rep": 150}
    for name, values in CE_VARIANTS:
        if clock.out():
            skipped.append(name)
            continue
        rec, out = run_variant(name, values, env, make_call, [logits], truth, ref_out, reps,
                               keep=name == "ref")
        if name == "ref" and out is not None:
            ref_out, ref_errors = out, rec["errors"]
        rec["ok"] = "errors" in rec and _ok(rec["errors"], ref_errors)
        records.append(rec)
        log(_row(rec, TARGETS["ce"]))
    best = _best(records)
    return {"shape": [m, v], "records": records, "skipped": skipped, "best": best}


def _best(records, mib_limit=None):
    good = [r for r in records if "ms" in r and r.get("ok")
            and (mib_limit is None or r.get("peak_mib") is None or r["peak_mib"] <= mib_limit)]
    return min(good, key=lambda r: r["ms"])["variant"] if good else None


def flce_truth(x, w, target):
    """fp32 torch math (no TF32) on the same inputs: loss and both gradients."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        xf = x.detach().float().requires_grad_()
        wf = w.detach().float().requires_grad_()
        loss = F.cross_entropy(xf @ wf.t(), target)
        loss.backward()
        return {"loss": loss.detach(), "dx": xf.grad, "dw": wf.grad}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def flce_section(env, clock, smoke, log, ce_best_knobs) -> dict:
    shapes = SMOKE_FLCE_SHAPES if smoke else FLCE_SHAPES
    out = {}
    for shape_name, (m, h, v) in shapes.items():
        torch.manual_seed(0)
        x = torch.randn(m, h, device=env.device, dtype=torch.bfloat16).requires_grad_()
        w = (torch.randn(v, h, device=env.device) * h**-0.5).to(torch.bfloat16).requires_grad_()
        target = torch.randint(0, v, (m,), device=env.device)
        truth = flce_truth(x, w, target)
        gc.collect()
        if env.device == "cuda":
            torch.cuda.empty_cache()

        def make_call(fresh):
            def call():
                loss = flce.fused_linear_cross_entropy(x, w, target)
                loss.backward()
                if fresh:
                    return {"loss": loss.detach(), "dx": x.grad, "dw": w.grad}
            return call

        target_ms, target_mib = TARGETS[shape_name]
        reps = {"warmup": 100, "rep": 500}
        variants = [("ref", {})] + [
            (name, dict(ce_best_knobs) if values is None else values)
            for group in FLCE_GROUPS.values() for name, values in group
        ]
        records, ref_out, ref_errors, skipped = [], None, None, []
        log(f"-- fused_linear_cross_entropy {shape_name} {m}x{h}x{v} (target {target_ms} ms, "
            f"{target_mib} MiB)")
        for name, values in variants:
            if clock.out():
                skipped.append(name)
                continue
            rec, got = run_variant(name, values, env, make_call, [x, w], truth, ref_out, reps,
                                   keep=name == "ref")
            rec["chunk_rows"] = _chunk_rows(m, v, values)
            if name == "ref" and got is not None:
                ref_out, ref_errors = got, rec["errors"]
            rec["ok"] = "errors" in rec and _ok(rec["errors"], ref_errors)
            records.append(rec)
            log(_row(rec, (target_ms, target_mib)))
        combo = _combo(records, target_mib if not smoke else None, ce_best_knobs)
        if combo is not None and not clock.out():
            rec, _ = run_variant("combo", combo, env, make_call, [x, w], truth, ref_out, reps)
            rec["chunk_rows"] = _chunk_rows(m, v, combo)
            rec["ok"] = "errors" in rec and _ok(rec["errors"], ref_errors)
            records.append(rec)
            log(_row(rec, (target_ms, target_mib)))
        out[shape_name] = {"shape": [m, h, v], "records": records, "skipped": skipped,
                           "best_within_memory": _best(records, None if smoke else target_mib)}
        del x, w, target, truth, ref_out
        gc.collect()
        if env.device == "cuda":
            torch.cuda.empty_cache()
    return out


def _chunk_rows(m, v, values):
    with knobs({k: val for k, val in values.items() if k in ("CHUNK_BYTES", "MIN_CHUNK_ROWS")}):
        return flce.chunk_rows(m, v, 2)


def _combo(records, mib_limit, ce_best_knobs):
    """Knobs of the fastest correct member of each group that beats ref and fits the memory target."""
    by_name = {r["variant"]: r for r in records}
    ref = by_name.get("ref")
    if ref is None or "ms" not in ref:
        return None
    merged = {}
    for group in FLCE_GROUPS.values():
        names = [name for name, _ in group]
        members = [by_name[n] for n in names if n in by_name and "ms" in by_name[n]]
        good = [r for r in members if r.get("ok") and r["ms"] < ref["ms"]
                and (mib_limit is None or r["peak_mib"] is None or r["peak_mib"] <= mib_limit)]
        if good:
            merged.update(min(good, key=lambda r: r["ms"])["knobs"])
    return merged if len(merged) > 0 else None


def parts_section(env, smoke, log, rates) -> dict:
    """The per-chunk kernels alone at the default chunk rows and at twice that."""
    shapes = SMOKE_FLCE_SHAPES if smoke else FLCE_SHAPES
    out = {}
    for shape_name, (m, h, v) in shapes.items():
        base_rows = flce.chunk_rows(m, v, 2)
        for rows in (base_rows, 2 * base_rows):
            torch.manual_seed(0)
            dev, bf16 = env.device, torch.bfloat16
            x = torch.randn(rows, h, device=dev, dtype=bf16)
            w = (torch.randn(v, h, device=dev) * h**-0.5).to(bf16)
            buf = torch.empty(rows, v, device=dev, dtype=bf16)
            dx = torch.empty(rows, h, device=dev, dtype=bf16)
            dw = torch.empty(v, h, device=dev, dtype=bf16)
            target = torch.randint(0, v, (rows,), device=dev)
            loss_rows = torch.empty(rows, device=dev)
            denoms = ce.mean_denominators(target, None, -100)
            opts = ce.CrossEntropyOptions()
            torch.mm(x, w.t(), out=buf)
            ce.launch_cross_entropy(buf, buf, target, None, loss_rows, None, denoms, None, opts)
            items = {
                "logits_mm": ({}, lambda: torch.mm(x, w.t(), out=buf)),
                "ce_kernel": ({}, lambda: ce.launch_cross_entropy(buf, buf, target, None, loss_rows, None,
                                                                   denoms, None, opts)),
                "dx_cublas": ({}, lambda: torch.mm(buf, w, out=dx)),
                "dw_addmm": ({}, lambda: dw.addmm_(buf.t(), x)),
            }
            if rows == base_rows:
                for name, values in FLCE_GROUPS["dw"]:
                    items[name] = (values, lambda: flce._accumulate_grad_weight(dw, buf, x, False))
                if env.device == "cuda":
                    side = torch.cuda.Stream()

                    def both():
                        main = torch.cuda.current_stream()
                        side.wait_stream(main)
                        torch.mm(buf, w, out=dx)
                        with torch.cuda.stream(side):
                            dw.addmm_(buf.t(), x)
                        main.wait_stream(side)

                    items["dx_dw_2streams"] = ({}, both)
            flops = 2 * rows * h * v
            rec = {}
            for name, (values, fn) in items.items():
                try:
                    with knobs(values):
                        fn()
                        ms = env.ms(fn, warmup=25, rep=100)
                except Exception as e:
                    rec[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    continue
                entry = {"ms": ms}
                if name != "ce_kernel":
                    n_flops = 2 * flops if name == "dx_dw_2streams" else flops
                    entry["tflops"] = n_flops / (ms * 1e-3) / 1e12
                if name == "ce_kernel" or name.startswith("dw_"):
                    # bytes at least: CE reads the chunk once and writes it; dW read and written
                    moved = 2 * rows * v * 2 if name == "ce_kernel" else 2 * v * h * 2 + rows * v * 2
                    entry["gb_per_s"] = moved / (ms * 1e-3) / 1e9
                rec[name] = entry
            n_chunks = triton.cdiv(m, rows)
            step = sum(rec[k]["ms"] for k in ("logits_mm", "ce_kernel", "dx_cublas", "dw_addmm")
                       if "ms" in rec.get(k, {}))
            dw_best = min((val["ms"] for k, val in rec.items() if k.startswith("dw_") and "ms" in val),
                          default=None)
            if dw_best is not None and "ms" in rec.get("dw_addmm", {}):
                rec["projected_total_best_dw_ms"] = (step - rec["dw_addmm"]["ms"] + dw_best) * n_chunks
            rec["chunks"] = n_chunks
            rec["projected_total_ms"] = step * n_chunks
            if rates:  # one chunk's three GEMMs at the matmul rate; dW read + written at copy speed
                rec["ideal_step_ms"] = {"flops": 3 * flops / rates["matmul_flops_per_s"] * 1e3,
                                        "dw_bytes": 4 * v * h / rates["copy_bytes_per_s"] * 1e3}
            out[f"{shape_name}_rows{rows}"] = rec
            log(f"parts {shape_name} rows={rows} ({n_chunks} chunks): " + ", ".join(
                f"{k} {val['ms']:.3f} ms" + (f" {val['tflops']:.0f} TF/s" if "tflops" in val else "")
                + (f" {val['gb_per_s']:.0f} GB/s" if "gb_per_s" in val else "")
                for k, val in rec.items() if isinstance(val, dict) and "ms" in val)
                + f"; sum x chunks {rec['projected_total_ms']:.2f} ms"
                + (f" ({rec['projected_total_best_dw_ms']:.2f} with the best dW)"
                   if "projected_total_best_dw_ms" in rec else ""))
            del x, w, buf, dx, dw
            gc.collect()
            if env.device == "cuda":
                torch.cuda.empty_cache()
    return out


# --- output ---------------------------------------------------------------------------------------

def _row(rec, target) -> str:
    target_ms, target_mib = target
    if "error" in rec:
        return f"  {rec['variant']:<16} ERROR {rec['error']}"
    e = rec["errors"]
    worst_fp32 = max(e["vs_fp32"].values())
    worst_ref = max(e["vs_ref"].values()) if "vs_ref" in e else 0.0
    mib = rec["peak_mib"]
    fits = "" if mib is None else ("" if mib <= target_mib + 0.5 else " OVER-MEM")
    fast = "" if rec["ms"] > target_ms else " <=target"
    rows = f" rows={rec['chunk_rows']}" if "chunk_rows" in rec else ""
    kept = f" kept={rec['kept_mib']:.0f}" if rec.get("kept_mib") else ""
    mem = "-" if mib is None else f"{mib:.0f}"
    return (f"  {rec['variant']:<16} {rec['ms']:8.3f} ms  {mem:>6} MiB{kept}{rows}  err vs ref "
            f"{worst_ref:.1e}  vs fp32 {worst_fp32:.1e}{'' if rec['ok'] else ' NOT-OK'}{fast}{fits}")


def environment(env) -> dict:
    info = {"torch": torch.__version__, "triton": triton.__version__, "device": env.device,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "defaults": knob_state()}
    if env.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--sections", default="ce,flce,parts")
    parser.add_argument("--time-limit", type=float, default=150.0,
                        help="seconds after which no new variant starts")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of GPU warm-up")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    if not args.smoke and not torch.cuda.is_available():
        print("needs CUDA (or --smoke)", file=sys.stderr)
        return 2
    env = Cpu() if args.smoke else Gpu()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"env": environment(env), "targets": TARGETS}

    def save():
        result["elapsed_s"] = clock.elapsed()
        out_path.write_text(json.dumps(result, indent=1, default=str))

    def log(line):
        print(line, flush=True)

    log(json.dumps(result["env"]))
    if not args.smoke:
        warm_up_gpu(args.warmup)
        result["ceilings"] = ceilings(env)
        log(f"ceilings: copy {result['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
            f"{result['ceilings']['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    clock = Clock(args.time_limit)
    ce_best_knobs = {"_MAX_BLOCK": 8192}
    if "ce" in sections:
        log(f"-- cross_entropy {SMOKE_CE_SHAPE if args.smoke else CE_SHAPE} bf16 in place "
            f"(target {TARGETS['ce'][0]} ms)")
        result["ce"] = ce_section(env, clock, args.smoke, log)
        best = result["ce"]["best"]
        if best is not None:
            ce_best_knobs = next(r["knobs"] for r in result["ce"]["records"] if r["variant"] == best)
            log(f"  best: {best} {ce_best_knobs}")
        save()
    if "flce" in sections:
        result["flce"] = flce_section(env, clock, args.smoke, log, ce_best_knobs)
        for shape_name, sec in result["flce"].items():
            log(f"  {shape_name}: best within memory target: {sec['best_within_memory']}")
        save()
    if "parts" in sections:
        result["parts"] = parts_section(env, args.smoke, log, result.get("ceilings"))
        save()
    save()
    log(f"done in {clock.elapsed():.0f} s -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
