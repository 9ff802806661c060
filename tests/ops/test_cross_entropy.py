"""cross_entropy: Triton kernel (interpreter on CPU) and the torch reference vs float64 torch math.

The float64 truth is written with torch.nn.functional.cross_entropy, independently of
`cross_entropy_reference`, so both the kernel and the reference are checked against torch.
"""

import pytest
import torch
import torch.nn.functional as F

import liger_kernels._utils
from liger_kernels.ops import cross_entropy as ce_module
from liger_kernels.ops.cross_entropy import cross_entropy, cross_entropy_reference
from tests.tolerances import DTYPES, assert_close

REDUCTIONS = ["mean", "sum", "none"]
CASES = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"lse_square_scale": 0.02},
    "softcap_scale": {"softcap": 4.0, "logit_scale": 0.7},
    "weight": {"weight": True},
    "weight_smoothing": {"weight": True, "label_smoothing": 0.25},
    "everything": {
        "weight": True,
        "label_smoothing": 0.05,
        "lse_square_scale": 1e-3,
        "softcap": 3.0,
        "logit_scale": 1.3,
        "ignore_index": 2,
    },
}


@pytest.fixture
def small_blocks(monkeypatch):
    # Vocabulary blocks of 32 so that small vocabularies run the multi-block loops, ragged tail.
    monkeypatch.setattr(ce_module, "_MAX_BLOCK", 32)


def truth(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
          lse_square_scale=0.0, softcap=None, logit_scale=1.0, reduction="mean"):
    """(loss, z_loss) in float64 from F.cross_entropy on the transformed logits."""
    n_cols = logits.shape[-1]
    z = logits.double().reshape(-1, n_cols) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = target.reshape(-1)
    w = weight.double() if weight is not None else None
    valid = t != ignore_index
    kw = dict(weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing)
    zl = lse_square_scale * torch.logsumexp(z, -1) ** 2 * valid
    if reduction == "none":
        ce = F.cross_entropy(z, t, reduction="none", **kw)
        shape = logits.shape[:-1]
        return (ce + zl).view(shape), zl.view(shape)
    if reduction == "sum":
        return F.cross_entropy(z, t, reduction="sum", **kw) + zl.sum(), zl.sum()
    if not valid.any():  # torch gives NaN; the op's convention is 0
        return torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    z_loss = zl.sum() / valid.sum()
    return F.cross_entropy(z, t, reduction="mean", **kw) + z_loss, z_loss


def make_inputs(shape, device, dtype, ignore_index=-100, n_ignored=1):
    n_cols = shape[-1]
    logits = (torch.randn(shape, device=device) * 3).to(dtype)
    target = torch.randint(0, n_cols, shape[:-1], device=device)
    target.view(-1)[:n_ignored] = ignore_index
    return logits, target


def check(logits, target, dtype, reduction="mean", grad_scale=1.0, in_place=False, **kw):
    """Public op on a leaf copy vs float64 truth: loss, z_loss and d loss / d logits."""
    leaf = logits.detach().clone().requires_grad_()
    loss, z_loss = cross_entropy(
        leaf * 1 if in_place else leaf, target, reduction=reduction, return_z_loss=True,
        in_place=in_place, **kw
    )
    leaf64 = logits.detach().double().requires_grad_()
    loss64, z64 = truth(leaf64, target, reduction=reduction, **kw)
    if reduction == "none":
        grad_out = torch.randn_like(loss64)
    else:
        grad_out = torch.tensor(grad_scale, dtype=torch.float64)
    (loss64 * grad_out).sum().backward()
    (loss * grad_out.to(loss.device, loss.dtype)).sum().backward()

    assert loss.dtype == dtype and loss.shape == loss64.shape
    assert_close(loss, loss64, dtype, reduction=True, name="loss")
    assert_close(z_loss, z64, dtype, reduction=True, name="z_loss")
    assert_close(leaf.grad, leaf64.grad, dtype, name="grad")


def case_kwargs(case, n_cols, device):
    kw = dict(CASES[case])
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(n_cols, device=device) + 0.5
    return kw


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64(case, reduction, dtype, device, small_blocks):
    kw = case_kwargs(case, 37, device)
    logits, target = make_inputs((4, 37), device, dtype, kw.get("ignore_index", -100))
    check(logits, target, dtype, reduction, **kw)


@pytest.mark.parametrize("n_cols", [1, 7, 1000, 4097])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_sizes(n_cols, dtype, device):
    # Default block sizes: one block per row up to 16384 columns.
    logits, target = make_inputs((3, n_cols), device, dtype)
    check(logits, target, dtype, label_smoothing=0.1, lse_square_scale=1e-3)


@pytest.mark.parametrize(
    "programs_per_sm, hints, warps, stages", [(2, True, 0, 2), (1, False, 4, 3), (0, False, 8, 1)]
)
def test_launch_knobs(programs_per_sm, hints, warps, stages, device, small_blocks, monkeypatch):
    # Persistent grid (fewer programs than rows, each looping over rows; on CPU one "SM"), L2 hints
    # off, other warp counts, pipelined loops: same results, in place and not, ignored rows included.
    monkeypatch.setattr(ce_module, "CE_PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(ce_module, "CE_L2_HINTS", hints)
    monkeypatch.setattr(ce_module, "CE_NUM_WARPS", warps)
    monkeypatch.setattr(ce_module, "CE_STAGES", stages)
    logits, target = make_inputs((7, 70), device, torch.bfloat16, n_ignored=2)
    check(logits, target, torch.bfloat16, label_smoothing=0.1, lse_square_scale=1e-3)
    check(logits, target, torch.bfloat16, "none", in_place=True, softcap=5.0)
    logits, target = make_inputs((3, 64), device, torch.float32)  # whole blocks only, no tail
    check(logits, target, torch.float32, weight=torch.rand(64, device=device), label_smoothing=0.2)


def test_minus_inf_logits(device, small_blocks):
    # Masked-out classes (-inf logits), a whole block of them first: probability and gradient 0,
    # no NaN from a running max that is still -inf.
    logits, _ = make_inputs((4, 100), device, torch.float32)
    logits[:, :40] = float("-inf")
    logits[1, 70:] = float("-inf")
    target = torch.tensor([-100, 50, 99, 60], device=device)
    for reduction in REDUCTIONS:
        check(logits, target, torch.float32, reduction, lse_square_scale=1e-3)


def test_many_blocks_one_row(device, small_blocks):
    # One row, 1000 columns in 32 blocks (the last one holds 8 columns).
    logits, target = make_inputs((1, 1000), device, torch.float32, n_ignored=0)
    weight = torch.rand(1000, device=device)
    check(logits, target, torch.float32, weight=weight, label_smoothing=0.2)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_output_not_one(reduction, device, small_blocks):
    logits, target = make_inputs((5, 40), device, torch.float32)
    check(logits, target, torch.float32, reduction, grad_scale=2.5, lse_square_scale=0.01)


def test_leading_dims_and_strides(device, small_blocks):
    base = torch.randn(40, 2, 3, device=device) * 2
    logits = base.permute(1, 2, 0)  # (2, 3, 40), column stride 6
    assert logits.stride(-1) != 1
    target = torch.randint(0, 40, (2, 3), device=device)
    for reduction in REDUCTIONS:
        check(logits, target, torch.float32, reduction, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place(reduction, dtype, device, small_blocks):
    logits, target = make_inputs((4, 50), device, dtype)
    check(logits, target, dtype, reduction, in_place=True, softcap=5.0)


def test_in_place_writes_gradient_into_logits(device, small_blocks):
    leaf = torch.randn(4, 50, device=device).requires_grad_()
    target = torch.randint(0, 50, (4,), device=device)
    logits = leaf * 1.0
    loss = cross_entropy(logits, target, in_place=True)
    loss.backward()
    leaf64 = leaf.detach().double().requires_grad_()
    truth(leaf64, target)[0].backward()
    # The logits buffer now holds the gradient (no extra buffer was allocated for it).
    assert_close(logits.detach(), leaf64.grad, torch.float32, name="logits buffer")
    assert_close(leaf.grad, leaf64.grad, torch.float32, name="grad")


def test_in_place_refuses_logits_saved_by_autograd(device):
    # tanh saves its output; overwriting it must fail loudly in backward, not corrupt gradients.
    leaf = torch.randn(3, 20, device=device).requires_grad_()
    logits = torch.tanh(leaf)
    loss = cross_entropy(logits, torch.randint(0, 20, (3,), device=device), in_place=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored(reduction, weighted, device, small_blocks):
    logits, target = make_inputs((4, 30), device, torch.float32, n_ignored=4)
    weight = torch.rand(30, device=device) if weighted else None
    leaf = logits.clone().requires_grad_()
    loss, z_loss = cross_entropy(leaf, target, weight, lse_square_scale=0.1, reduction=reduction,
                                 label_smoothing=0.1, return_z_loss=True)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(z_loss, torch.zeros_like(z_loss))
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_zero_z_loss_when_disabled(device):
    logits, target = make_inputs((3, 9), device, torch.float32)
    loss, z_loss = cross_entropy(logits, target, return_z_loss=True)
    assert z_loss.item() == 0.0
    assert_close(loss, truth(logits, target)[0], torch.float32, reduction=True, name="loss")


def test_no_grad_inputs(device, small_blocks):
    # Logits that do not require grad: loss only (the gradient pass is skipped).
    logits, target = make_inputs((5, 33), device, torch.bfloat16)
    before = logits.clone()
    loss = cross_entropy(logits, target, in_place=True, label_smoothing=0.1)
    expected = truth(logits, target, label_smoothing=0.1)[0]
    assert_close(loss, expected, torch.bfloat16, reduction=True, name="loss")
    assert torch.equal(logits, before)


def test_backward_runs_once(device):
    logits, target = make_inputs((3, 9), device, torch.float32)
    leaf = logits.requires_grad_()
    loss = cross_entropy(leaf, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_path(case, dtype, device, monkeypatch):
    # Non-interpreted CPU dispatch runs cross_entropy_reference; it must match float64 torch too.
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    kw = case_kwargs(case, 23, device)
    for reduction in REDUCTIONS:
        logits, target = make_inputs((2, 3, 23), device, dtype, kw.get("ignore_index", -100))
        check(logits, target, dtype, reduction, **kw)


def test_reference_all_ignored_is_zero(device):
    logits, target = make_inputs((3, 5), device, torch.float32, n_ignored=3)
    leaf = logits.requires_grad_()
    loss = cross_entropy_reference(leaf, target, torch.rand(5, device=device), lse_square_scale=1.0)
    loss.backward()
    assert loss.item() == 0.0 and not leaf.grad.isnan().any()


def test_target_out_of_range(device):
    if device == "cuda":
        pytest.skip("on CUDA an out-of-range target is a device-side assert (kills the context)")
    logits = torch.randn(3, 10)
    for bad in (10, -1, -100):
        target = torch.tensor([1, bad, 2])
        with pytest.raises(ValueError, match="target values must be in"):
            cross_entropy(logits, target, ignore_index=-5)
    # ignore_index itself is fine anywhere, even inside [0, V).
    cross_entropy(logits, torch.tensor([1, 3, 3]), ignore_index=3)


def test_errors(device):
    logits = torch.randn(3, 10, device=device)
    target = torch.randint(0, 10, (3,), device=device)
    with pytest.raises(TypeError, match="logits"):
        cross_entropy(logits.long(), target)
    with pytest.raises(TypeError, match="logits"):
        cross_entropy(logits.double(), target)
    with pytest.raises(TypeError, match="target"):
        cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match="target has 2 elements"):
        cross_entropy(logits, target[:2])
    with pytest.raises(ValueError, match="V >= 1"):
        cross_entropy(torch.randn(3, 0, device=device), target)
    with pytest.raises(ValueError, match=r"weight must have shape \(10,\)"):
        cross_entropy(logits, target, weight=torch.ones(9, device=device))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(logits, target, softcap=0.0)
    with pytest.raises(ValueError, match="lse_square_scale"):
        cross_entropy(logits, target, lse_square_scale=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_llama3_vocab_gpu(in_place, persistent, device, monkeypatch):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    # Real size: 4096 rows of Llama-3 logits in bf16, vs float64 torch; in place adds no memory.
    # persistent: one program per SM looping over ~30 rows, with pipelined vocabulary loops.
    if persistent:
        monkeypatch.setattr(ce_module, "CE_PROGRAMS_PER_SM", 1)
        monkeypatch.setattr(ce_module, "CE_STAGES", 2)
    logits, target = make_inputs((4096, 128256), device, torch.bfloat16, n_ignored=100)
    kw = dict(label_smoothing=0.1, lse_square_scale=1e-4)
    check(logits, target, torch.bfloat16, in_place=in_place, **kw)
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = cross_entropy(x, target, in_place=in_place)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert (extra < 2**20) if in_place else (extra <= x.numel() * 2 + 2**20), extra
    loss.backward()


# ---- token accuracy (return_token_accuracy) --------------------------------------------------------


def accuracy_truth(logits, target, ignore_index=-100, softcap=None, logit_scale=1.0, **_):
    """float64 fraction of counted rows whose target's z equals the row max (ties count)."""
    z = logits.detach().double().reshape(-1, logits.shape[-1]) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = target.reshape(-1)
    valid = t != ignore_index
    hit = (z.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1) == z.max(-1).values) & valid
    return hit.sum().double() / valid.sum().clamp_min(1)


def accuracy_inputs(shape, device, dtype, ignore_index=-100):
    """Logits and targets with every kind of row: target = argmax, target = runner-up, target tied
    with another column for the max (correct), and ignored rows."""
    logits, _ = make_inputs(shape, device, dtype)
    n_rows = logits.numel() // shape[-1]
    rows = logits.view(n_rows, shape[-1])
    top2 = rows.float().topk(2, dim=-1).indices
    target = torch.where(torch.arange(n_rows, device=device) % 2 == 0, top2[:, 0], top2[:, 1])
    rows[1, 3] = rows[1].max()  # row 1: the runner-up target becomes a tie for the max
    target[1] = 3
    target[2::5] = ignore_index
    return logits, target.view(shape[:-1])


@pytest.mark.parametrize(
    "reduction, return_z_loss, kw",
    [
        ("mean", False, {}),
        ("sum", True, {"softcap": 4.0, "logit_scale": 0.7}),
        ("none", True, {"in_place": True, "ignore_index": 5}),
        ("mean", True, {"weight": True, "label_smoothing": 0.1}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_accuracy(dtype, reduction, return_z_loss, kw, device, small_blocks):
    # 12 rows of 70 columns in blocks of 32: loss and gradient unchanged, accuracy as defined.
    kw = dict(kw, lse_square_scale=1e-3)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(70, device=device) + 0.5
    logits, target = accuracy_inputs((12, 70), device, dtype, kw.get("ignore_index", -100))
    expected = accuracy_truth(logits, target, **kw)
    assert 0 < expected < 1
    leaf = logits.clone().requires_grad_()
    out = cross_entropy(leaf * 1, target, reduction=reduction, return_z_loss=return_z_loss,
                        return_token_accuracy=True, **kw)
    assert len(out) == (3 if return_z_loss else 2)
    accuracy = out[-1]
    assert accuracy.dtype == torch.float32 and accuracy.shape == () and not accuracy.requires_grad
    torch.testing.assert_close(accuracy.double(), expected)
    out[0].sum().backward()
    plain = logits.clone().requires_grad_()
    loss, z_loss = cross_entropy(plain * 1, target, reduction=reduction, return_z_loss=True, **kw)
    loss.sum().backward()
    assert torch.equal(out[0], loss) and torch.equal(leaf.grad, plain.grad)
    if return_z_loss:
        assert torch.equal(out[1], z_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_accuracy_reference_path(dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    logits, target = accuracy_inputs((3, 4, 23), device, dtype)
    loss, accuracy = cross_entropy(logits, target, return_token_accuracy=True, softcap=3.0)
    torch.testing.assert_close(accuracy.double(), accuracy_truth(logits, target, softcap=3.0))
    assert accuracy.dtype == torch.float32
    assert torch.equal(loss, cross_entropy(logits, target, softcap=3.0))


def test_token_accuracy_all_ignored_and_module(device, small_blocks):
    from liger_kernels.nn import LigerCrossEntropyLoss

    logits, target = make_inputs((4, 40), device, torch.float32, n_ignored=4)
    _, accuracy = cross_entropy(logits, target, return_token_accuracy=True)
    assert accuracy.item() == 0.0
    logits, target = accuracy_inputs((6, 40), device, torch.float32)
    loss, z_loss, accuracy = LigerCrossEntropyLoss(return_z_loss=True, return_token_accuracy=True)(
        logits, target
    )
    torch.testing.assert_close(accuracy.double(), accuracy_truth(logits, target))


def test_token_accuracy_compiled(device, small_blocks):
    # Under torch.compile the accuracy comes out of the cross_entropy custom op.
    torch._dynamo.reset()
    logits, target = accuracy_inputs((6, 40), device, torch.float32)
    fn = torch.compile(
        lambda x, t: cross_entropy(x, t, return_token_accuracy=True), backend="aot_eager", fullgraph=True
    )
    leaf = logits.clone().requires_grad_()
    loss, accuracy = fn(leaf, target)
    loss.backward()
    torch.testing.assert_close(accuracy.double(), accuracy_truth(logits, target))
    assert_close(loss, truth(logits, target)[0], torch.float32, reduction=True, name="loss")
    torch._dynamo.reset()
