"""Tolerances per dtype, in one place. Every parity test compares against float64 math.

The error of a kernel in dtype D against float64 is bounded by the rounding of its output to D
(plus fp32 accumulation error); the torch reference in the same dtype has the same bound, so tests
check the kernel at least as tightly as the reference itself passes.
"""

import torch

# (atol, rtol) for outputs and gradients compared with the float64 reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
# Reductions over long rows (losses, weight gradients summed over many rows) get a looser absolute term.
REDUCTION_TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close(actual, expected, dtype, *, reduction=False, name=""):
    """Compare `actual` (any dtype) with a float64 `expected`; NaN never passes."""
    atol, rtol = (REDUCTION_TOLERANCES if reduction else TOLERANCES)[dtype]
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert not torch.isnan(actual).any(), f"{name}: NaN in output (unwritten element or bad math)"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_as_accurate_as_torch(actual, torch_same_dtype, expected, *, factor=2.0, name=""):
    """For large 16-bit reductions, where fixed tolerances stop fitting: `actual`'s largest error against
    the float64 `expected` is at most `factor` times that of plain torch computing in the same dtype
    (the code a user would otherwise run), plus 1e-3 of the largest magnitude."""
    actual, baseline, expected = (t.detach().to(torch.float64).cpu() for t in (actual, torch_same_dtype, expected))
    assert not torch.isnan(actual).any(), f"{name}: NaN in output"
    ours = (actual - expected).abs().max().item()
    theirs = (baseline - expected).abs().max().item()
    bound = factor * theirs + 1e-3 * expected.abs().max().item()
    assert ours <= bound, f"{name}: max error {ours:.4g} > {factor} x torch's {theirs:.4g} (+1e-3 of the scale)"


# Whole-model parity (patched vs unpatched model in the same dtype, tests/patching): the largest
# elementwise difference relative to the largest magnitude of the tensor. bf16: both models round
# every activation to bf16, in different orders, through every layer and back.
MODEL_RTOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def assert_model_close(actual, expected, dtype, name=""):
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= MODEL_RTOL[dtype] * scale, f"{name}: max error {err:.3g} > {MODEL_RTOL[dtype]} * {scale:.3g}"
