"""The shared chunking engine: its vocab-wide kernels (interpreter) and torch reference vs float64,
`chunked_logprobs`, gradient accumulation dtypes, and input errors."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.losses import chunked_logprobs
from liger_kernels.losses.chunked import (
    _logprob_grad_,
    _row_stats,
    chunked_fused_linear_loss,
    logprob_grad_reference,
    row_groups,
    row_stats_reference,
)
from tests.losses.reference import leaf64, logits64, make_inputs, token_logps, token_stats
from tests.tolerances import DTYPES, assert_close


def _stats64(x, target, temperature):
    z = x.double()
    lp, _, _ = token_logps(z, target, temperature=temperature)
    entropy, mean, top1 = token_stats(z, target, None, temperature)
    return torch.logsumexp(z / temperature, -1), lp, entropy, mean, top1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (5, 7), (70, 1000), (3, 4097)])
def test_row_stats_and_grad_kernels(dtype, rows, vocab, device):
    x = (torch.randn(rows, vocab, device=device) * 3).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device)
    g = torch.randn(rows, device=device)
    g[0] = 0.0  # an ignored row: its gradient must be exactly zero
    expected = _stats64(x, target, 0.7)
    for use_kernel in (True, False):
        stats = _row_stats(x, target, 1 / 0.7, True) if use_kernel else row_stats_reference(x, target, 1 / 0.7, True)
        for got, exp, name in zip(stats[:4], expected[:4], ("lse", "logp", "entropy", "mean")):
            assert_close(got, exp, torch.float32, reduction=True, name=name)
        assert torch.equal(stats[4], expected[4])

        grad = x.clone()
        lse = stats[0]
        if use_kernel:
            _logprob_grad_(grad, target, lse, g, 1 / 0.7)
        else:
            logprob_grad_reference(grad, target, lse, g, 1 / 0.7)
        x64 = x.double().requires_grad_()
        lp = torch.log_softmax(x64 / 0.7, -1).gather(1, target[:, None]).squeeze(1)
        (lp * g.double()).sum().backward()
        assert_close(grad, x64.grad, dtype, name="logits grad")
        assert torch.all(grad[0] == 0)


def test_top1_ties_pick_the_first_column(device):
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [3.0, 3.0, 1.0, 1.0]], device=device)
    target = torch.tensor([2, 0], device=device)
    for stats in (_row_stats(x, target, 1.0, True), row_stats_reference(x, target, 1.0, True)):
        assert stats[4].tolist() == [False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs(dtype, device):
    h, w, b, target = make_inputs(5, 9, 12, 301, dtype, device)
    out = chunked_logprobs(h, w, target, b, temperature=1.3, chunk_size=2, with_stats=True)
    h64, w64, b64 = leaf64(h, w, b)
    z = logits64(h64, w64, b64)
    lp, mask, _ = token_logps(z, target, temperature=1.3)
    entropy, mean, top1 = token_stats(z, target, mask, 1.3)
    assert_close(out["logps"], lp, dtype, reduction=True, name="logps")
    assert_close(out["entropy"], entropy, dtype, reduction=True, name="entropy")
    assert_close(out["mean_logits"], mean, dtype, reduction=True, name="mean_logits")
    assert torch.all(out["logps"][~mask] == 0)


def test_chunked_logprobs_torch_path_matches_kernels(monkeypatch, device):
    h, w, b, target = make_inputs(4, 6, 8, 50, torch.float32, device)
    kernel = chunked_logprobs(h, w, target, b, with_stats=True)
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    torch_path = chunked_logprobs(h, w, target, b, with_stats=True)
    for key in ("logps", "entropy", "mean_logits"):
        torch.testing.assert_close(kernel[key], torch_path[key], atol=1e-5, rtol=1e-5)
    assert torch.equal(kernel["is_top1"], torch_path["is_top1"])


def _nll_loss(h, w, b, target, accum_dtype, chunk_size):
    count = (target != -100).sum()
    return chunked_fused_linear_loss(
        h, w, target, lambda lp, chunk: -lp.sum() / count, row_groups(h.shape[0], chunk_size, h.device),
        bias=b, accum_dtype=accum_dtype,
    )[0]  # fmt: skip


@pytest.mark.parametrize("accum_dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_accumulation_dtype(accum_dtype, device):
    h, w, b, target = make_inputs(8, 5, 16, 40, torch.bfloat16, device)
    h, w, b = (t.detach().requires_grad_() for t in (h, w, b))
    _nll_loss(h, w, b, target, accum_dtype, chunk_size=1).backward()
    assert w.grad.dtype == torch.bfloat16
    h64, w64, b64 = leaf64(h, w, b)
    lp, mask, _ = token_logps(logits64(h64, w64, b64), target)
    (-lp.sum() / mask.sum()).backward()
    assert_close(w.grad, w64.grad, torch.bfloat16, reduction=True, name="grad weight")
    assert_close(b.grad, b64.grad, torch.bfloat16, reduction=True, name="grad bias")
    assert_close(h.grad, h64.grad, torch.bfloat16, name="grad input")


def test_non_contiguous_input(device):
    # TRL-style shifted hidden states: a strided view of the model's output.
    full, w, b, target = make_inputs(4, 8, 16, 30, torch.float32, device)
    full = full.detach().requires_grad_()
    h = full[:, :-1]
    _nll_loss(h, w, b, target[:, 1:], torch.float32, chunk_size=3).backward()
    f64 = full.detach().double().requires_grad_()
    lp, mask, _ = token_logps(logits64(f64[:, :-1], w.double(), b.double()), target[:, 1:])
    (-lp.sum() / mask.sum()).backward()
    assert_close(full.grad, f64.grad, torch.float32, name="grad input")


def test_engine_errors(device):
    h, w, b, target = make_inputs(2, 4, 8, 10, torch.float32, device)
    with pytest.raises(ValueError, match="temperature"):
        chunked_logprobs(h, w, target, b, temperature=0.0)
    with pytest.raises(ValueError, match=r"input must be \(batch, seq_len, hidden\)"):
        chunked_logprobs(h[0], w, target, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        chunked_logprobs(h, w, target, b[:-1])
    with pytest.raises(ValueError, match="outside"):
        chunked_logprobs(h, w, torch.full_like(target, -1), b)
    with pytest.raises(ValueError, match="empty batch"):
        chunked_logprobs(h[:0], w, target[:0], b)


@pytest.mark.parametrize("triton_path", [True, False])
def test_scaled_backward_rounds_once(triton_path, monkeypatch, device):
    # The saved gradients are scaled by grad_output in fp32 and rounded once: loss / 3 in bf16 gives
    # bf16(g * fp32(1/3)), not g * bf16(1/3) (0.2% high).
    if not triton_path:
        if device != "cpu":
            pytest.skip("the torch path is the CPU path")
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    h, w, b, target = make_inputs(3, 5, 16, 40, torch.bfloat16, device)
    grads = []
    for scale in (1.0, 3.0):
        leaves = [t.detach().requires_grad_() for t in (h, w, b)]
        (_nll_loss(*leaves, target, torch.float32, chunk_size=2) / scale).backward()
        grads.append([t.grad for t in leaves])
    third = torch.tensor(1.0, device=device) / 3.0
    for once, scaled in zip(*grads):
        exact = once.float() * third
        if triton_path and device == "cpu":  # the interpreter's fp32 -> bf16 conversion truncates
            exact = (exact.view(torch.int32) & -65536).view(torch.float32)
        assert torch.equal(scaled, exact.to(torch.bfloat16))


def test_second_backward_refused(device):
    # The forward made the gradients and the first backward handed them out: a second backward would
    # rescale tensors the caller already holds.
    h, w, b, target = make_inputs(2, 4, 8, 10, torch.float32, device)
    w = w.detach().requires_grad_()
    loss = _nll_loss(h, w, b, target, torch.float32, chunk_size=1)
    (first,) = torch.autograd.grad(loss, w, retain_graph=True)
    kept = first.clone()
    with pytest.raises(RuntimeError, match="backward can run only once"):
        (3 * loss).backward()
    assert torch.equal(first, kept)


@pytest.mark.parametrize("fused", [True, False])
def test_is_top1_false_where_ignored(fused, device):
    # Token 0 is every row's argmax, and ignored positions must not count as hits for it.
    h, w, b, target = make_inputs(3, 4, 8, 12, torch.float32, device)
    b = b.clone()
    b[0] = 100.0
    target[:, 0] = -100
    target[:, 1] = 0
    if fused:
        out = chunked_logprobs(h, w, target, b, with_stats=True)
    else:
        out = chunked_fused_linear_loss(
            h, w, target, None, row_groups(3, 1, h.device), bias=b, with_stats=True, fused=False
        )[1]
    assert not out["is_top1"][:, 0].any()
    assert out["is_top1"][:, 1].all()


def _all_losses(device):
    """(name, callable(h, w, b, fused) -> LossOutput) for every public loss, on one set of inputs."""
    from liger_kernels import losses as L

    h, w, b, target = make_inputs(4, 6, 16, 45, torch.float32, device)
    ref_h, _, _, _ = make_inputs(4, 6, 16, 45, torch.float32, device)
    teacher_h, teacher_w, _, _ = make_inputs(4, 6, 24, 45, torch.float32, device, bias=False)
    labels = torch.tensor([True, False, False, True], device=device)
    adv = torch.randn(4, device=device)
    old = chunked_logprobs(h, w, target, b)["logps"] + 0.2 * torch.randn(4, 6, device=device)
    cases = {
        "dpo": lambda h, w, b, f: L.fused_linear_dpo_loss(
            h, w, target, b, ref_input=ref_h, loss_type=["sigmoid", "sft"], chunk_size=1, fused=f
        ),
        "orpo": lambda h, w, b, f: L.fused_linear_orpo_loss(h, w, target, b, chunk_size=1, fused=f),
        "cpo": lambda h, w, b, f: L.fused_linear_cpo_loss(h, w, target, b, loss_type="ipo", chunk_size=1, fused=f),
        "simpo": lambda h, w, b, f: L.fused_linear_simpo_loss(h, w, target, b, chunk_size=1, fused=f),
        "kto": lambda h, w, b, f: L.fused_linear_kto_loss(
            h, w, target, labels, b, ref_input=ref_h, kl=0.1, chunk_size=3, fused=f
        ),
        "grpo": lambda h, w, b, f: L.fused_linear_grpo_loss(
            h, w, target, adv, b, old_logps=old, ref_input=ref_h, beta=0.1, chunk_size=3, fused=f
        ),
        "jsd": lambda h, w, b, f: L.fused_linear_jsd_loss(
            h, w, teacher_h, teacher_w, target, b, weight_hard_loss=0.5, chunk_size=7, fused=f
        ),
        "cosine": lambda h, w, b, f: L.fused_linear_cosine_similarity_loss(
            h, w, teacher_h, teacher_w, target, b, weight_hard_loss=0.5, temperature=2.0, chunk_size=7, fused=f
        ),
        "grpo_cispo": lambda h, w, b, f: L.fused_linear_grpo_loss(
            h, w, target, adv, b, old_logps=old, loss_type="cispo", epsilon_high=1.1, chunk_size=3, fused=f
        ),
        "grpo_vespo": lambda h, w, b, f: L.fused_linear_grpo_loss(
            h, w, target, adv, b, old_logps=old, ref_input=ref_h, beta=0.1, loss_type="vespo", chunk_size=3, fused=f
        ),
    }
    return (h, w, b), cases


@pytest.mark.parametrize(
    "name", ["dpo", "orpo", "cpo", "simpo", "kto", "grpo", "grpo_cispo", "grpo_vespo", "jsd", "cosine"]
)
def test_fused_matches_unfused(name, device):
    """`fused=False` (the benchmark baseline) computes the same loss, metrics and gradients."""
    inputs, cases = _all_losses(device)
    results = []
    for fused in (True, False):
        h, w, b = (t.detach().clone().requires_grad_() for t in inputs)
        out = cases[name](h, w, b, fused)
        out.loss.backward()
        results.append((out, (h.grad, w.grad, b.grad)))
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    torch.testing.assert_close(fused_out.loss, plain_out.loss, atol=1e-5, rtol=1e-5)
    for a, e in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
    assert fused_out.metrics.keys() == plain_out.metrics.keys()
    for key, value in fused_out.metrics.items():
        torch.testing.assert_close(value, plain_out.metrics[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.gpu
def test_gpu_dpo_at_llama3_vocabulary(device):
    """Real sizes on the GPU: 128k vocabulary, one pair per chunk, bf16. Same loss and gradients as the
    unfused loss computed in fp32, and a smaller memory peak than the unfused bf16 loss."""
    from liger_kernels.losses import fused_linear_dpo_loss

    pairs, seq_len, hidden, vocab = 2, 512, 1024, 128256
    h, w, _, target = make_inputs(2 * pairs, seq_len, hidden, vocab, torch.bfloat16, device, bias=False)
    ref_h, _, _, _ = make_inputs(2 * pairs, seq_len, hidden, vocab, torch.bfloat16, device, bias=False)

    def run(h, w, fused):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fused_linear_dpo_loss(h, w, target, ref_input=ref_h.to(h.dtype), chunk_size=1, fused=fused)
        out.loss.backward()
        torch.cuda.synchronize()
        return out, h.grad, w.grad, torch.cuda.max_memory_allocated() - base

    out, dh, dw, peak = run(h, w, fused=True)
    _, _, _, peak_unfused = run(h, w, fused=False)
    exact, dh32, dw32, _ = run(h.float(), w.float(), fused=False)
    assert peak < peak_unfused, (peak, peak_unfused)
    assert_close(out.loss, exact.loss, torch.bfloat16, reduction=True, name="loss")
    assert_close(dh, dh32, torch.bfloat16, reduction=True, name="grad input")
    assert_close(dw, dw32, torch.bfloat16, reduction=True, name="grad weight")
