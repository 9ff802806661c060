"""The benchmark runner's CPU-side parts: work accounting, the plan, the measuring loop (with a wall-clock
timer, kernels under the interpreter), outputs (JSON, table, markdown, plots), selfcheck, and the CLI.

What needs a GPU (do_bench, CUDA memory stats, torch.compile and Liger-Kernel timings) runs in
scripts/gpu_session.sh.
"""

import inspect
import json
import math

import pytest
import torch

from liger_kernels import bench
from liger_plugins import cli

BF16 = 2  # bytes per element
H200_COPY = 4.25e12  # ../shared/ANCHORS.md: measured copy bandwidth and bf16 matmul rate
H200_MATMUL = 790e12


def _ideal_ms(op, dims):
    spec = bench.OPS[op]
    work = spec.work(dims, BF16)["fwd_bwd"]
    return work / (H200_COPY if spec.unit == "bytes" else H200_MATMUL) * 1e3


def test_work_matches_the_anchors():
    m, n = 32768, 4096
    assert bench.OPS["rms_norm"].work({"M": m, "N": n}, BF16) == {"fwd": 4 * m * n, "fwd_bwd": 10 * m * n}
    assert bench.OPS["layer_norm"].work({"M": m, "N": n}, BF16)["fwd_bwd"] == 10 * m * n
    assert bench.OPS["fused_add_rms_norm"].work({"M": m, "N": n}, BF16)["fwd_bwd"] == 16 * m * n
    assert bench.OPS["swiglu"].work({"M": 16384, "I": 14336}, BF16)["fwd_bwd"] == 16 * 16384 * 14336
    assert bench.OPS["cross_entropy"].work({"M": 8192, "V": 128256}, BF16)["fwd_bwd"] == 4 * 8192 * 128256
    flce = bench.OPS["fused_linear_cross_entropy"].work({"M": 8192, "H": 4096, "V": 128256}, BF16)
    assert flce == {"fwd": 2 * 8192 * 4096 * 128256, "fwd_bwd": 6 * 8192 * 4096 * 128256}
    rope = {"B": 4, "T": 4096, "Hq": 32, "Hkv": 8, "D": 128}
    qk_bytes = 4 * 4096 * 128 * (32 + 8) * BF16
    assert bench.OPS["rope"].work(rope, BF16)["fwd_bwd"] == 4 * qk_bytes + 4 * 4096 * 128 * BF16
    # the "ideal" column of ANCHORS.md
    assert _ideal_ms("rms_norm", {"M": m, "N": n}) == pytest.approx(0.31, abs=0.01)
    assert _ideal_ms("rope", rope) == pytest.approx(0.157, abs=0.002)
    assert _ideal_ms("swiglu", {"M": 16384, "I": 14336}) == pytest.approx(0.87, abs=0.02)
    assert _ideal_ms("cross_entropy", {"M": 8192, "V": 128256}) == pytest.approx(0.98, abs=0.01)
    assert _ideal_ms("fused_linear_cross_entropy", {"M": 8192, "H": 4096, "V": 128256}) == pytest.approx(32.7, abs=0.1)
    assert _ideal_ms("fused_linear_cross_entropy", {"M": 8192, "H": 2304, "V": 256000}) == pytest.approx(36, abs=1)


def test_plan_runs_anchors_first_once_each():
    full = bench.plan(bench.DEFAULT_OPS)
    quick = bench.plan(bench.DEFAULT_OPS, quick=True)
    anchors = [(op, d) for op in bench.DEFAULT_OPS for d in bench.OPS[op].anchors]
    assert [(op, d) for op, d, _ in quick] == anchors
    assert [(op, d) for op, d, _ in full[:len(anchors)]] == anchors
    keys = [(op, tuple(sorted(d.items()))) for op, d, _ in full]
    assert len(keys) == len(set(keys))  # a shape in several sweeps runs once, with every tag
    tags = {bench.OPS[op].label(d): t for op, d, t in full if op == "rms_norm"}
    assert tags["32768x4096"] == ["anchor", "tokens", "hidden"]
    assert tags["32768x16384"] == ["hidden"]
    assert all(tags for _, _, tags in full)
    assert set(op for op, _, _ in full) == set(bench.DEFAULT_OPS)
    assert set(bench.OPS) == set(bench.DEFAULT_OPS) | set(bench.LOSS_OPS) | set(bench.EXTRA_OPS)
    assert cli.LOSS_OPS == bench.LOSS_OPS and cli.EXTRA_OPS == bench.EXTRA_OPS
    extra = bench.plan(bench.EXTRA_OPS, quick=True)  # on request: every op has an anchor shape
    assert [op for op, _, _ in extra] == [op for op in bench.EXTRA_OPS for _ in bench.OPS[op].anchors]
    assert cli.OPS == bench.DEFAULT_OPS and cli.IMPLS == bench.IMPLS and set(cli.DTYPES) == set(bench.DTYPES)


def test_rel_err():
    ref = torch.tensor([3.0, 4.0])
    assert bench.rel_err(ref, ref) == 0.0
    assert bench.rel_err(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert bench.rel_err((ref, ref * 2), (ref, ref)) == pytest.approx(1.0)  # worst output counts
    assert math.isnan(bench.rel_err((torch.tensor([math.nan, 4.0]), ref), (ref, ref)))


def test_ceilings_on_cpu():
    c = bench.measure_ceilings(bench.CpuTimer(1), "cpu", copy_bytes=1 << 20, matmul_n=64)
    assert c["copy_bytes_per_s"] == pytest.approx(2 * (1 << 20) / (c["copy_ms"] * 1e-3))
    assert c["matmul_flops_per_s"] == pytest.approx(2 * 64 ** 3 / (c["matmul_ms"] * 1e-3))
    assert c["copy_bytes_per_s"] > 0 and c["matmul_flops_per_s"] > 0


def test_inputs_are_fresh_random_and_shaped_like_a_model():
    torch.manual_seed(0)
    inp = bench.make_rope({"B": 2, "T": 5, "Hq": 4, "Hkv": 2, "D": 8}, "cpu", torch.float32)
    q, k, cos, sin = inp.args()
    assert q.shape == (2, 4, 5, 8) and k.shape == (2, 2, 5, 8) and cos.shape == (1, 5, 8)
    assert not q.is_contiguous()  # (B, T, H, D) projection viewed as (B, H, T, D)
    torch.testing.assert_close(cos.square() + sin.square(), torch.ones_like(cos))
    ce = bench.make_cross_entropy({"M": 7, "V": 11, "ignore_every": 3}, "cpu", torch.float32)
    assert ce.consts[0].tolist().count(-100) == 2
    assert ce.leaves[0].std() > 0.5
    w = bench.make_norm({"M": 2, "N": 64}, "cpu", torch.float32).leaves[-1]
    assert 0.0 < (w - 1).abs().max() < 1.0  # weight near one, not all ones


def _fake_ceilings():
    return {"copy_bytes_per_s": 1e9, "matmul_flops_per_s": 1e10, "copy_bytes": 1, "copy_ms": 1.0,
            "matmul_n": 1, "matmul_ms": 1.0}


def test_run_bench_on_cpu_writes_every_output(tmp_path):
    cases = [("rms_norm", {"M": 3, "N": 40}, ["anchor", "tokens"]), ("rms_norm", {"M": 5, "N": 40}, ["tokens"]),
             ("cross_entropy", {"M": 4, "V": 37}, ["anchor"])]
    env = bench.environment("cpu", torch.float32)
    lines = []
    result = bench.run_bench(cases, ("ours", "eager"), "cpu", torch.float32, bench.CpuTimer(1), _fake_ceilings(),
                             env, tmp_path, log=lines.append)
    records = result["results"]
    assert [(r["op"], r["label"], r["impl"]) for r in records] == [
        ("rms_norm", "3x40", "ours"), ("rms_norm", "3x40", "eager"), ("rms_norm", "5x40", "ours"),
        ("rms_norm", "5x40", "eager"), ("cross_entropy", "4x37", "ours"), ("cross_entropy", "4x37", "eager")]
    for r in records:
        assert "error" not in r, r
        assert set(r["ms"]) == {"fwd", "bwd", "fwd_bwd"} and all(v > 0 for v in r["ms"].values())
        assert r["rel_err_vs_eager"] < 1e-5
        work = r["work"]["fwd_bwd"]
        assert r["ideal_ms"]["fwd_bwd"] == pytest.approx(work / 1e9 * 1e3)
        assert r["frac_of_ceiling"]["fwd_bwd"] == pytest.approx(r["ideal_ms"]["fwd_bwd"] / r["ms"]["fwd_bwd"])
    assert records[0]["work"]["fwd_bwd"] == 5 * 3 * 40 * 4  # fp32: 4 bytes per element
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(result))
    assert len(lines) == 3 and "rms_norm 3x40" in lines[0]

    table = bench.format_table(result)
    assert "ceilings: copy" in table and "cross_entropy 4x37" in table
    assert [line.split()[0] for line in table.splitlines() if line.startswith(" ")] == ["eager"] * 3
    written = bench.write_outputs(result, tmp_path)
    assert {p.name for p in written} == {"results.json", "results.md", "bench.png", "rms_norm.png",
                                         "cross_entropy.png"}
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "results.md").read_text()
    assert "| rms_norm | 3x40 |" in md and "| cross_entropy | 4x37 |" in md
    assert "| rms_norm | 5x40 |" not in md  # not an anchor: only in the full per-op table
    assert "| 5x40 | ours |" in md

    # the same outputs again from the JSON alone (how docs/ is regenerated without a GPU)
    again = tmp_path / "again"
    assert cli.main(["bench", "--from-json", str(tmp_path / "results.json"), "--out", str(again),
                     "--plots", "none"]) == 0
    assert sorted(p.name for p in again.iterdir()) == ["results.json", "results.md"]
    assert (again / "results.md").read_text() == md


@pytest.mark.parametrize("op", bench.LOSS_OPS)
def test_loss_cases_run_and_match_the_unfused_loss(op):
    """Each fused-linear loss case: ours (chunked, kernels in the interpreter) against the same loss
    unfused (fused=False), timed by the runner; the flop count is 6 (8 with a teacher) * B*T*H*V."""
    spec = bench.OPS[op]
    records = bench.run_case(op, spec.tiny, ["anchor"], bench.implementations(op, ("ours", "eager")), "cpu",
                             torch.float32, bench.CpuTimer(1), _fake_ceilings())
    assert [r["impl"] for r in records] == ["ours", "eager"]
    for r in records:
        assert "error" not in r, r
        assert r["rel_err_vs_eager"] < 1e-5
    d = spec.tiny
    heads = 4 if op in bench.TEACHER_LOSSES else 3
    assert records[0]["work"]["fwd_bwd"] == 2 * heads * d["B"] * d["T"] * d["H"] * d["V"]
    assert cli.build_parser().parse_args(["bench", "--ops", op]).ops == (op,)


def test_failing_implementation_is_recorded_not_fatal():
    def broken(x, w):
        raise RuntimeError("CUDA out of memory\nmore text")

    records = bench.run_case("rms_norm", {"M": 2, "N": 8}, ["anchor"], {"eager": bench.eager_rms_norm,
                             "broken": broken}, "cpu", torch.float32, bench.CpuTimer(1), _fake_ceilings())
    assert "ms" in records[0]
    assert records[1]["error"] == "RuntimeError: CUDA out of memory"
    assert "error: RuntimeError: CUDA out of memory" in bench.format_case(records)


def test_time_limit_skips_and_lists(tmp_path):
    cases = [("swiglu", {"M": 2, "I": 8}, ["anchor"]), ("geglu", {"M": 2, "I": 8}, ["anchor"])]
    result = bench.run_bench(cases, ("eager",), "cpu", torch.float32, bench.CpuTimer(1), _fake_ceilings(),
                             bench.environment("cpu", torch.float32), tmp_path, time_limit=-1, log=lambda _: None)
    assert result["results"] == []
    assert [s["op"] for s in result["skipped"]] == ["swiglu", "geglu"]
    assert "skipped geglu 2x8: time limit" in bench.format_table(result)


def test_selfcheck_passes_under_the_interpreter():
    from liger_kernels import _utils

    assert _utils.INTERPRET  # conftest: kernels run in the Triton interpreter on CPU tensors
    rows = bench.selfcheck(bench.DEFAULT_OPS, (torch.float32, torch.bfloat16), "cpu")
    assert len(rows) == 16
    assert all(r["ok"] and r["path"] == "triton interpreter" for r in rows), bench.format_selfcheck(rows)
    assert bench.format_selfcheck(rows).endswith("16 passed, 0 failed")


def test_selfcheck_catches_wrong_and_unwritten_outputs(monkeypatch, capsys):
    from liger_kernels.ops import glu

    monkeypatch.setattr(glu, "swiglu", lambda a, b: a * b)
    monkeypatch.setattr(glu, "geglu", lambda a, b, approximate: torch.full_like(a, math.nan) + 0 * a * b)
    rows = bench.selfcheck(["swiglu", "geglu"], (torch.float32,), "cpu")
    assert [r["ok"] for r in rows] == [False, False]
    assert math.isnan(rows[1]["out_err"])
    assert cli.main(["selfcheck", "--ops", "swiglu", "--dtypes", "fp32", "--interpret"]) == 1
    assert "0 passed, 1 failed" in capsys.readouterr().out


def test_cli_parses_and_dispatches(monkeypatch):
    args = cli.build_parser().parse_args(["bench", "--quick", "--ops", "rope,swiglu", "--impls", "ours,liger"])
    assert args.ops == ("rope", "swiglu") and args.impls == ("ours", "liger") and args.quick
    assert args.out == "docs/bench" and args.plots == "both" and args.time_limit is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--ops", "rms_norm,no_such_op"])
    assert cli.build_parser().parse_args(["bench", "--ops", "softmax,fused_moe"]).ops == ("softmax", "fused_moe")
    assert cli.build_parser().parse_args(["selfcheck", "--ops", "mrope"]).ops == ("mrope",)

    from liger_plugins import bench_e2e, demo

    seen = {}
    monkeypatch.setattr(demo, "main", lambda argv: seen.setdefault("demo", argv) and 0)
    monkeypatch.setattr(bench_e2e, "main", lambda argv: seen.setdefault("e2e", argv) and 0)
    assert cli.main(["demo", "--steps", "3"]) == 0
    assert cli.main(["bench", "--e2e", "--out", "x"]) == 0
    assert seen == {"demo": ["--steps", "3"], "e2e": ["--out", "x"]}
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--quick"]) == 2  # no GPU: a clear message, no traceback


def test_liger_kernel_calls_bind_to_its_signatures(monkeypatch):
    """Only where liger_kernel is installed (e.g. PYTHONPATH holding the carried wheel)."""
    lf = pytest.importorskip("liger_kernel.transformers.functional")
    calls = {}
    for name, fn in inspect.getmembers(lf, inspect.isfunction):
        if name.startswith("liger_"):
            sig = inspect.signature(fn)
            monkeypatch.setattr(lf, name, lambda *a, _n=name, _s=sig, **k: calls.setdefault(_n, _s.bind(*a, **k)))
    x = object()
    for op in bench.DEFAULT_OPS:  # called with as many arguments as our inputs hold
        spec = bench.OPS[op]
        torch.manual_seed(0)
        bench._liger(op)(*[x] * len(spec.make(spec.tiny, "cpu", torch.float32).args()))
    assert calls["liger_rms_norm"].arguments["eps"] == bench.RMS_EPS
    assert calls["liger_layer_norm"].arguments["eps"] == bench.LN_EPS
    assert calls["liger_fused_linear_cross_entropy"].arguments["target"] is x
    assert len(calls) == 8


def test_extra_work_formulas():
    """Minimal bytes (bf16) or FLOPs of the extra ops at their anchor shapes."""
    m, v = 8192, 128256
    for op in ("kl_div", "jsd", "tvd"):  # read input and target, write the input's gradient
        assert bench.OPS[op].work({"M": m, "V": v}, BF16) == {"fwd": 4 * m * v, "fwd_bwd": 6 * m * v}
    for op in ("dyt", "relu_squared", "softmax", "sparsemax", "poly_norm", "modulated_rms_norm"):
        assert bench.OPS[op].work({"M": 3, "N": 5, "B": 1}, BF16)["fwd_bwd"] == 5 * 15 * BF16
    assert bench.OPS["group_norm"].work({"N": 2, "C": 4, "S": 3, "G": 2}, BF16)["fwd_bwd"] == 5 * 24 * BF16
    assert bench.OPS["swiglu_gate_up"].work({"M": 16384, "I": 8192}, BF16)["fwd_bwd"] == 16 * 16384 * 8192
    qk = 4 * 4096 * 128 * (28 + 4)
    assert bench.OPS["mrope"].work({"B": 4, "T": 4096, "Hq": 28, "Hkv": 4, "D": 128}, BF16)["fwd_bwd"] == (
        (4 * qk + 4 * 4 * 4096 * 128) * BF16)
    assert bench.OPS["llama4_rope"].work({"B": 1, "T": 2, "Hq": 3, "Hkv": 1, "D": 8}, BF16) == {
        "fwd": 2 * 64 * BF16 + 64, "fwd_bwd": 4 * 64 * BF16 + 128}  # freqs_cis: complex64, 4*T*D bytes
    assert bench.OPS["gated_down_proj"].work({"M": 2, "I": 3, "H": 5}, BF16) == {"fwd": 60, "fwd_bwd": 180}
    moe = {"M": 8192, "H": 2048, "I": 768, "E": 128, "K": 8}
    assert bench.OPS["fused_moe"].work(moe, BF16)["fwd_bwd"] == 18 * 8192 * 8 * 2048 * 768
    assert bench.OPS["multi_token_attention"].work({"B": 2, "C": 3, "L": 4}, BF16)["fwd_bwd"] == 5 * 96 * BF16
    fljsd = bench.OPS["fused_linear_jsd"].work({"M": 8192, "Hs": 2048, "Ht": 4096, "V": v}, BF16)
    assert fljsd == {"fwd": 2 * 8192 * v * (2048 + 4096), "fwd_bwd": 2 * 8192 * v * (3 * 2048 + 4096)}
    assert _ideal_ms("kl_div", {"M": m, "V": v}) == pytest.approx(1.48, abs=0.01)


@pytest.mark.parametrize("op", bench.EXTRA_OPS)
def test_extra_cases_run_and_match_eager(op):
    """Each extra op's case through the runner on its tiny shape (ours: kernels in the interpreter)
    against eager; and eager itself, forward and every gradient in float64, against our reference,
    so that the baseline computes the same function."""
    import importlib

    spec = bench.OPS[op]
    records = bench.run_case(op, spec.tiny, ["anchor"], bench.implementations(op, ("ours", "eager")), "cpu",
                             torch.float32, bench.CpuTimer(1), _fake_ceilings())
    assert [r["impl"] for r in records] == ["ours", "eager"]
    for r in records:
        assert "error" not in r, r
        assert r["rel_err_vs_eager"] < 1e-5
        assert r["frac_of_ceiling"]["fwd_bwd"] > 0

    torch.manual_seed(0)
    eager_inp = spec.make(spec.tiny, "cpu", torch.float32).float64_cpu()
    torch.manual_seed(0)
    ref_inp = spec.make(spec.tiny, "cpu", torch.float32).float64_cpu()
    reference = getattr(importlib.import_module(f"liger_kernels.ops.{spec.module}"), f"{op}_reference")
    out, expected = spec.eager(*eager_inp.args()), reference(*ref_inp.args(), **spec.kwargs)
    assert bench.rel_err(out, expected) < 1e-6  # rel_err works in float32; eager may too
    torch.autograd.backward(bench._as_tuple(out), eager_inp.grads)
    torch.autograd.backward(bench._as_tuple(expected), ref_inp.grads)
    for a, b in zip(eager_inp.leaves, ref_inp.leaves):
        assert bench.rel_err(a.grad, b.grad) < 1e-6


def test_selfcheck_covers_the_extra_ops():
    rows = bench.selfcheck(bench.EXTRA_OPS, (torch.float32, torch.bfloat16), "cpu")
    assert [r["op"] for r in rows] == [op for op in bench.EXTRA_OPS for _ in range(2)]
    assert all(r["ok"] and r["path"] == "triton interpreter" for r in rows), bench.format_selfcheck(rows)


def test_liger_kernel_calls_bind_for_the_extra_ops(monkeypatch):
    """As above, for the extra ops (called with their tiny inputs); Liger-Kernel has no fused MoE, no
    gated down projection, no modulated RMSNorm and no joint projections."""
    lf = pytest.importorskip("liger_kernel.transformers.functional")
    from liger_kernel.transformers import llama4_rope as l4

    calls = {}
    for mod in (lf, l4):
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if name.startswith("liger_"):
                sig = inspect.signature(fn)
                monkeypatch.setattr(mod, name, lambda *a, _n=name, _s=sig, **k: calls.setdefault(_n, _s.bind(*a, **k)))
    with_liger = [op for op in bench.EXTRA_OPS if bench._liger(op) is not None]
    assert set(bench.EXTRA_OPS) - set(with_liger) == {"gated_down_proj", "fused_moe", "modulated_rms_norm",
                                                      "linear_projections"}
    for op in with_liger:
        spec = bench.OPS[op]
        torch.manual_seed(0)
        bench._liger(op)(*spec.make(spec.tiny, "cpu", torch.float32).args())
    assert calls["liger_kl_div"].arguments["reduction"] == "batchmean"
    assert calls["liger_tvd"].arguments["reduction"] == "batchmean"
    assert calls["liger_group_norm"].arguments["num_groups"] == bench.OPS["group_norm"].tiny["G"]
    assert calls["liger_qwen2vl_mrope"].arguments["mrope_section"] == bench.mrope_section(16)
    assert calls["liger_multi_token_attention"].arguments["padding"] == bench.MTA_PADDING
    assert calls["liger_fused_linear_jsd"].arguments["shift_labels"].dtype == torch.int64
    assert len(calls) == 14  # one function per op (swiglu_gate_up: liger_swiglu on its chunks)
