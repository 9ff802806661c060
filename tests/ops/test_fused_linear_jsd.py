"""fused_linear_jsd: chunked Triton path (interpreter on CPU) and the torch reference vs float64 math on
materialized logits, for the loss and the gradients of the student's input and weight."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops import fused_linear_jsd as fljsd_module
from liger_kernels.ops.fused_linear_jsd import fused_linear_jsd, fused_linear_jsd_reference
from tests.tolerances import DTYPES, assert_close

BETAS = [0.0, 0.5, 0.1, 1.0]
# 9 rows in chunks of 4 (two full chunks and a ragged one), student and teacher hidden sizes differ,
# a vocabulary of 37 in blocks of 16 (two full blocks and a ragged one).
N, HS, HT, V, CHUNK = 9, 16, 24, 37, 4


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(fljsd_module, "_MAX_BLOCK", 16)


def truth(xs, ws, xt, wt, label=None, beta=0.5, ignore_index=-100, temperature=1.0):
    """float64 loss from materialized logits, written from the distributions (M as a mixture of
    probabilities), independently of the op's log-space formulas."""
    v = ws.shape[0]
    log_q = torch.log_softmax((xs.double() @ ws.double().t()).reshape(-1, v) / temperature, -1)
    log_p = torch.log_softmax((xt.double() @ wt.double().t()).reshape(-1, v) / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    if beta == 0.0:
        rows = (p * (log_p - log_q)).sum(-1)
    elif beta == 1.0:
        rows = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    valid = torch.ones_like(rows, dtype=torch.bool) if label is None else label.reshape(-1) != ignore_index
    return (rows * valid).sum() / valid.sum().clamp_min(1)


def make_inputs(device, dtype, shape=(N,), hs=HS, ht=HT, vocab=V, teacher_dtype=None, ignore_index=-100):
    xs = torch.randn(*shape, hs, device=device).to(dtype)
    ws = (torch.randn(vocab, hs, device=device) / hs**0.5 * 2).to(dtype)
    teacher_dtype = teacher_dtype or dtype
    xt = torch.randn(*shape, ht, device=device).to(teacher_dtype)
    wt = (torch.randn(vocab, ht, device=device) / ht**0.5 * 2).to(teacher_dtype)
    label = torch.randint(0, vocab, shape, device=device)
    label.view(-1)[:: max(2, label.numel() // 3)] = ignore_index
    return xs, ws, xt, wt, label


def check(xs, ws, xt, wt, label, dtype, grad_scale=1.7, requires=(True, True), chunk_size=CHUNK, **kw):
    """Public op on leaf copies vs float64 truth: loss and the gradients of the student's input and
    weight; the teacher (requiring grad here) must get none."""
    xs_l, ws_l = (t.detach().clone().requires_grad_(r) for t, r in zip((xs, ws), requires))
    xt_l, wt_l = xt.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_()
    xs64, ws64 = (t.detach().double().requires_grad_(r) for t, r in zip((xs, ws), requires))
    accum_dtype = kw.pop("accum_dtype", None)
    loss = fused_linear_jsd(xs_l, ws_l, xt_l, wt_l, label, chunk_size=chunk_size, accum_dtype=accum_dtype,
                            **kw)
    loss64 = truth(xs64, ws64, xt, wt, label, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, loss64, dtype, reduction=True, name="loss")
    if not any(requires):
        assert not loss.requires_grad
        return
    loss.backward(torch.tensor(grad_scale, device=loss.device))
    loss64.backward(torch.tensor(grad_scale, dtype=torch.float64))
    assert xt_l.grad is None and wt_l.grad is None
    for name, leaf, leaf64 in (("dinput", xs_l, xs64), ("dweight", ws_l, ws64)):
        if leaf.requires_grad:
            assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
            # The weight gradient sums over all rows (chunks): reduction tolerances.
            assert_close(leaf.grad, leaf64.grad, dtype, reduction=name == "dweight", name=name)
        else:
            assert leaf.grad is None


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64(beta, dtype, device):
    xs, ws, xt, wt, label = make_inputs(device, dtype)
    check(xs, ws, xt, wt, label, dtype, beta=beta, temperature=1.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_temperature(temperature, beta, device):
    xs, ws, xt, wt, label = make_inputs(device, torch.float32)
    check(xs, ws, xt, wt, label, torch.float32, beta=beta, temperature=temperature)


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_no_labels_and_custom_ignore_index(beta, device):
    xs, ws, xt, wt, label = make_inputs(device, torch.float32, ignore_index=3)
    check(xs, ws, xt, wt, None, torch.float32, beta=beta)
    check(xs, ws, xt, wt, label, torch.float32, beta=beta, ignore_index=3)


@pytest.mark.parametrize(
    "shape, hs, ht, vocab, chunk",
    [((1,), 7, 5, 37, 4), ((5,), 1, 3, 1, 2), ((2, 3), 16, 8, 50, 4), ((4,), 12, 12, 1000, None)],
)
def test_shapes(shape, hs, ht, vocab, chunk, device, monkeypatch):
    # One row; hidden 1 and a vocabulary of 1 (divergence 0); (B, T) tokens; a wide vocabulary in
    # the default blocks (one automatic chunk).
    if vocab == 1000:
        monkeypatch.setattr(fljsd_module, "_MAX_BLOCK", 4096)
    xs, ws, xt, wt, label = make_inputs(device, torch.float32, shape, hs, ht, vocab)
    check(xs, ws, xt, wt, label, torch.float32, chunk_size=chunk, beta=0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_weight_grad_accumulation(dtype, device):
    xs, ws, xt, wt, label = make_inputs(device, dtype)
    check(xs, ws, xt, wt, label, dtype, accum_dtype=torch.float32, beta=0.5, temperature=2.0)


def test_teacher_dtype_differs(device):
    # A bf16 student distilled from an fp32 teacher: each head in its own dtype.
    xs, ws, xt, wt, label = make_inputs(device, torch.bfloat16, teacher_dtype=torch.float32)
    check(xs, ws, xt, wt, label, torch.bfloat16, beta=0.5)


@pytest.mark.parametrize("requires", [(True, False), (False, True), (False, False)])
def test_partial_requires_grad(requires, device):
    xs, ws, xt, wt, label = make_inputs(device, torch.float32)
    check(xs, ws, xt, wt, label, torch.float32, requires=requires, beta=1.0)


def test_all_ignored(device):
    xs, ws, xt, wt, label = make_inputs(device, torch.float32)
    xs_l, ws_l = xs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = fused_linear_jsd(xs_l, ws_l, xt, wt, torch.full_like(label, -100), chunk_size=CHUNK)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(xs_l.grad, torch.zeros_like(xs)) and torch.equal(ws_l.grad, torch.zeros_like(ws))


def test_identical_heads_give_zero(device):
    xs, ws, _, _, label = make_inputs(device, torch.float32)
    for beta in BETAS:
        loss = fused_linear_jsd(xs, ws, xs, ws, label, beta=beta, chunk_size=CHUNK)
        assert abs(loss.item()) < 1e-6


def test_autocast(device):
    device_type = "cuda" if device == "cuda" else "cpu"
    xs, ws, xt, wt, label = make_inputs(device, torch.float32)
    xs_l, ws_l = xs.clone().requires_grad_(), ws.clone().requires_grad_()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = fused_linear_jsd(xs_l, ws_l, xt, wt, label, chunk_size=CHUNK)
    loss.backward()
    rounded = [t.bfloat16().double() for t in (xs, ws, xt, wt)]
    rounded[0].requires_grad_(), rounded[1].requires_grad_()
    loss64 = truth(*rounded, label)
    loss64.backward()
    assert loss.dtype == torch.float32 and xs_l.grad.dtype == ws_l.grad.dtype == torch.float32
    assert_close(loss, loss64, torch.bfloat16, reduction=True, name="loss")
    assert_close(xs_l.grad, rounded[0].grad, torch.bfloat16, name="dinput")
    assert_close(ws_l.grad, rounded[1].grad, torch.bfloat16, reduction=True, name="dweight")


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_path(beta, dtype, device, monkeypatch):
    # Non-interpreted CPU dispatch runs fused_linear_jsd_reference; it must match float64 too.
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    xs, ws, xt, wt, label = make_inputs(device, dtype, shape=(2, 3))
    check(xs, ws, xt, wt, label, dtype, beta=beta, temperature=2.0)


def test_reference_is_jsd_of_log_softmax(device):
    # The specification is the jsd op on the two heads' log-probabilities.
    from liger_kernels.ops.jsd import jsd_reference

    xs, ws, xt, wt, label = make_inputs(device, torch.float64)
    x = torch.log_softmax(xs @ ws.t() / 2.0, -1)
    y = torch.log_softmax(xt @ wt.t() / 2.0, -1)
    torch.testing.assert_close(
        fused_linear_jsd_reference(xs, ws, xt, wt, label, 0.3, temperature=2.0),
        jsd_reference(x, y, label, 0.3),
    )


def test_empty(device):
    xs = torch.randn(0, HS, device=device, requires_grad=True)
    loss = fused_linear_jsd(xs, torch.randn(V, HS, device=device), torch.randn(0, HT, device=device),
                            torch.randn(V, HT, device=device))
    loss.backward()
    assert loss.item() == 0.0 and xs.grad.shape == (0, HS)


def test_backward_runs_once(device):
    xs, ws, xt, wt, label = make_inputs(device, torch.float32)
    loss = fused_linear_jsd(xs.requires_grad_(), ws, xt, wt, label, chunk_size=CHUNK)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_module(device):
    from liger_kernels.nn import LigerFusedLinearJSD

    xs, ws, xt, wt, label = make_inputs(device, torch.float32)
    module = LigerFusedLinearJSD(beta=0.2, ignore_index=-100, temperature=1.5)
    expected = fused_linear_jsd(xs, ws, xt, wt, label, 0.2, -100, 1.5)
    assert torch.equal(module(xs, ws, xt, wt, label), expected)


def test_errors(device):
    xs, ws, xt, wt, label = make_inputs(device, torch.float32)
    f = fused_linear_jsd
    cases = [
        ((xs.long(), ws, xt, wt), {}, TypeError, "student_input"),
        ((xs, ws, xt, wt.double()), {}, TypeError, "teacher_weight has dtype"),
        ((xs.bfloat16(), ws, xt, wt), {}, TypeError, "student_input .* and student_weight .* one dtype"),
        ((xs, ws, xt, wt.half()), {}, TypeError, "teacher_input .* and teacher_weight .* one dtype"),
        ((xs[:, :-1], ws, xt, wt), {}, ValueError, "student_input must have shape"),
        ((xs, ws, xt[:, :-1], wt), {}, ValueError, "teacher_input must have shape"),
        ((xs, ws[None], xt, wt), {}, ValueError, "student_weight must have non-empty shape"),
        ((xs, ws, xt, wt[:-1]), {}, ValueError, "share the vocabulary"),
        ((xs, ws, xt[:-1], wt), {}, ValueError, "same tokens"),
        ((xs, ws, xt, wt, label[:-1]), {}, ValueError, "label has shape"),
        ((xs, ws, xt, wt, label.float()), {}, TypeError, "label must be an integer"),
        ((xs, ws, xt, wt), {"beta": 1.5}, ValueError, "beta"),
        ((xs, ws, xt, wt), {"temperature": 0.0}, ValueError, "temperature"),
        ((xs, ws, xt, wt), {"chunk_size": 0}, ValueError, "chunk_size"),
        ((xs, ws, xt, wt), {"accum_dtype": torch.float16}, ValueError, "accum_dtype"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            f(*args, **kwargs)


@pytest.mark.parametrize("dispatch", ["triton", "reference"])
def test_opcheck(dispatch, device, monkeypatch):
    # Schema, fake vs real outputs, autograd registration and AOT dispatch of the custom op.
    if dispatch == "reference":
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
        device = "cpu"
    xs, ws, xt, wt, label = make_inputs(device, torch.float32, shape=(5,))
    xs.requires_grad_(), ws.requires_grad_()
    args = (xs, ws, xt, wt, label, 0.4, -100, 1.5, 2, False, True, True)
    torch.library.opcheck(torch.ops.liger.fused_linear_jsd, args)


def test_compiled(device):
    # Under torch.compile (aot_eager: Dynamo + AOTAutograd) the op is one graph node.
    torch._dynamo.reset()
    xs, ws, xt, wt, label = make_inputs(device, torch.float32)
    fn = torch.compile(lambda *a: fused_linear_jsd(*a, beta=0.3, temperature=2.0, chunk_size=CHUNK),
                       backend="aot_eager", fullgraph=True)
    xs_l, ws_l = xs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = fn(xs_l, ws_l, xt, wt, label)
    loss.backward(torch.tensor(1.7, device=device))
    xs64, ws64 = xs.double().requires_grad_(), ws.double().requires_grad_()
    loss64 = truth(xs64, ws64, xt, wt, label, beta=0.3, temperature=2.0)
    loss64.backward(torch.tensor(1.7, dtype=torch.float64))
    assert_close(loss, loss64, torch.float32, reduction=True, name="loss")
    assert_close(xs_l.grad, xs64.grad, torch.float32, name="dinput")
    assert_close(ws_l.grad, ws64.grad, torch.float32, reduction=True, name="dweight")
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_parity_gpu(beta, device, monkeypatch):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    # A real vocabulary in several automatic chunks, bf16 student and teacher of different widths.
    xs, ws, xt, wt, label = make_inputs(device, torch.bfloat16, (1024,), 1024, 2048, 128256)
    monkeypatch.setattr(fljsd_module, "_MAX_BLOCK", 4096)
    check(xs, ws, xt, wt, label, torch.bfloat16, chunk_size=None, beta=beta, temperature=2.0)
    check(xs, ws, xt, wt, label, torch.bfloat16, chunk_size=384, beta=beta, accum_dtype=torch.float32)
