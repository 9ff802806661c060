"""AdamW in one pass (ops/adamw.py, liger_kernels.optim.AdamW) against torch.optim.AdamW.

On CPU the kernel runs under the interpreter and must equal the op-by-op reference bit for bit (the
same fused multiply-adds, square roots and divisions, each rounded once); torch's own CPU step (other
fusions, a ~1 ulp vectorized sqrt) must agree to within a few roundings of the dtype. On CUDA torch's
kernels fuse the multiply-adds the kernel writes as fma: the optimizer must give torch's foreach
AdamW's parameters and states bit for bit (all three dtypes pass so on an H100, docs/e2e/h100_run13).
"""

import copy
import warnings

import pytest
import torch

from liger_kernels.ops.adamw import adamw_step_, adamw_step_reference_, launch_adamw_
from liger_kernels.optim import AdamW
from tests.tolerances import DTYPES

SIZES = [(1,), (4097,), (3, 5000), (7, 33, 2), (0, 3)]


@pytest.fixture(autouse=True)
def kernel_for_every_size(monkeypatch):
    """The tests' tensors are small: on CUDA they would take torch's own step (SMALL_TENSOR_ELEMENTS),
    which would leave the kernel untested there. test_small_tensors_* switches it back on."""
    import liger_kernels.optim as optim

    monkeypatch.setattr(optim, "_takes_torch_step", lambda t: False)


def _assert_same(ours, theirs, *, exact: bool, name: str, ulps: int = 1):
    """Bit for bit, or (exact=False) within `ulps` roundings of the dtype at the tensor's scale."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
    if exact:
        assert torch.equal(ours, theirs), (
            f"{name}: {(ours != theirs).sum().item()} of {ours.numel()} differ, largest "
            f"{(ours.float() - theirs.float()).abs().max().item():.3g}")
    else:
        eps = torch.finfo(ours.dtype).eps
        scale = theirs.float().abs().max().item()
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=ulps * eps, atol=ulps * eps * scale,
                                   msg=lambda m: f"{name}: {m}")


def _tensors(shape, dtype, device):
    """A parameter, its gradient and states as after a few steps."""
    p = torch.randn(shape, device=device).to(dtype)
    g = (torch.randn(shape, device=device) * 1e-2).to(dtype)
    m = (torch.randn(shape, device=device) * 1e-3).to(dtype)
    v = (torch.rand(shape, device=device) * 1e-5).to(dtype)
    return p, g, m, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("beta1", [0.9, 0.3])  # 1 - beta1 >= 0.5 takes lerp's other form
def test_kernel_matches_reference(dtype, weight_decay, beta1, device):
    tensors = [_tensors(s, dtype, device) for s in SIZES]
    expected = [tuple(t.clone() for t in ts) for ts in tensors]
    hyper = dict(step=3.0, lr=1e-3, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=weight_decay)
    adamw_step_(*[list(x) for x in zip(*tensors)], **hyper)
    for p, g, m, v in expected:
        if device == "cuda":  # torch's CUDA step itself, from the same state (after 2 steps)
            param = torch.nn.Parameter(p)
            param.grad = g
            optimizer = torch.optim.AdamW([param], lr=hyper["lr"], betas=(beta1, 0.999), eps=1e-8,
                                          weight_decay=weight_decay, foreach=True)
            optimizer.state[param] = {"step": torch.tensor(2.0), "exp_avg": m, "exp_avg_sq": v}
            optimizer.step()
        else:
            adamw_step_reference_(p, g, m, v, **hyper)
    for (p, g, m, v), (p2, _, m2, v2) in zip(tensors, expected):
        _assert_same(p, p2, exact=True, name="param")
        _assert_same(m, m2, exact=True, name="exp_avg")
        _assert_same(v, v2, exact=True, name="exp_avg_sq")


def _model_params(dtype, device):
    torch.manual_seed(1)
    shapes = [(37, 19), (19,), (5, 4097), (1,), (64, 64)]
    return [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]


def _train(optimizer_cls, params, steps, grads_seed=2, **kwargs):
    optimizer = optimizer_cls(params, **kwargs)
    gen = torch.Generator().manual_seed(grads_seed)
    for i in range(steps):
        for j, p in enumerate(params):
            # the second parameter misses every other step: its step count falls behind
            p.grad = None if (j == 1 and i % 2 == 1) else (
                torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype).to(p.device)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_matches_torch_adamw(dtype, device):
    ours_params = _model_params(dtype, device)
    torch_params = copy.deepcopy(ours_params)
    hyper = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    ours = _train(AdamW, ours_params, 5, **hyper)
    theirs = _train(torch.optim.AdamW, torch_params, 5, **hyper)
    # torch's CPU step rounds differently (fused products, ~1 ulp sqrt); 5 steps compound it
    exact = device == "cuda"
    for a, b in zip(ours_params, torch_params):
        _assert_same(a.detach(), b.detach(), exact=exact, name="param", ulps=4)
        sa, sb = ours.state[a], theirs.state[b]
        assert sa["step"].item() == sb["step"].item() and sa["step"].dtype == sb["step"].dtype
        _assert_same(sa["exp_avg"], sb["exp_avg"], exact=exact, name="exp_avg", ulps=4)
        _assert_same(sa["exp_avg_sq"], sb["exp_avg_sq"], exact=exact, name="exp_avg_sq", ulps=4)
    assert ours.state[ours_params[1]]["step"].item() == 3.0  # skipped steps do not count


def test_optimizer_groups_bitwise(device):
    """Two groups with their own lr and weight decay, each step checked bit for bit: against the
    reference on CPU (interpreter), against torch's foreach AdamW on CUDA."""
    params = _model_params(torch.bfloat16, device)
    mirror = [torch.nn.Parameter(p.detach().clone()) for p in params]

    def groups(ps):
        return [dict(params=ps[:2], lr=1e-2, weight_decay=0.0), dict(params=ps[2:], lr=2e-3)]

    hyper = dict(betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    optimizer = AdamW(groups(params), **hyper)
    torch_optimizer = torch.optim.AdamW(groups(mirror), foreach=True, **hyper)
    states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step in range(1, 4):
        for p, q in zip(params, mirror):
            p.grad = torch.randn(p.shape, device=device).to(p.dtype)
            q.grad = p.grad.clone()
        optimizer.step()
        if device == "cuda":
            torch_optimizer.step()
        for i, (p, q) in enumerate(zip(params, mirror)):
            if device == "cpu":
                lr, wd = (1e-2, 0.0) if i < 2 else (2e-3, 0.1)
                with torch.no_grad():
                    adamw_step_reference_(q, p.grad, *states[i], step=float(step), lr=lr, beta1=0.8,
                                          beta2=0.95, eps=1e-7, weight_decay=wd)
            assert torch.equal(p.detach(), q.detach()), f"param {i} after step {step}"


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_interchanges_with_torch(direction, device):
    """A checkpoint of either optimizer continues in the other with the numbers of staying put."""
    first, second = (torch.optim.AdamW, AdamW) if direction == "torch_to_ours" else (AdamW, torch.optim.AdamW)
    params = _model_params(torch.float32, device)
    optimizer = _train(first, params, 2, lr=1e-2)
    saved_params, saved_state = copy.deepcopy(params), copy.deepcopy(optimizer.state_dict())
    _continue(optimizer, params)
    resumed = second(saved_params, lr=1e-2)
    resumed.load_state_dict(saved_state)
    _continue(resumed, saved_params)
    for a, b in zip(params, saved_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert resumed.state[saved_params[0]]["step"].item() == 4.0


def _continue(optimizer, params):
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.device)
        optimizer.step()


@pytest.mark.parametrize("option", [dict(amsgrad=True), dict(maximize=True)])
def test_uncovered_options_run_torch_step(option, device):
    """amsgrad / maximize: the whole step is torch's, so the numbers are torch's exactly."""
    ours_params = _model_params(torch.float32, device)
    torch_params = copy.deepcopy(ours_params)
    _train(AdamW, ours_params, 3, lr=1e-2, **option)
    _train(torch.optim.AdamW, torch_params, 3, lr=1e-2, **option)
    for a, b in zip(ours_params, torch_params):
        assert torch.equal(a, b)


def test_step_hooks_run_once_on_torch_path(device):
    """On torch's path (amsgrad), once a torch AdamW exists (torch then wraps its class's step with the
    hook runner too), the step hooks still run once per step."""
    params = _model_params(torch.float32, device)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # torch wraps torch.optim.AdamW.step now
    optimizer = AdamW(params, lr=1e-2, amsgrad=True)
    calls = []
    optimizer.register_step_pre_hook(lambda *a: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *a: calls.append("post"))
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert calls == ["pre", "post"]
    assert optimizer.state[params[0]]["step"].item() == 1.0


def test_mismatched_state_is_torch_steps_error(device, monkeypatch):
    """A state of another shape than its parameter (a state_dict of another model): the kernel would
    read past it, so the step is torch's, which refuses it."""
    import liger_kernels.optim as optim

    monkeypatch.setattr(optim, "launch_adamw_", lambda *a, **k: pytest.fail("the kernel ran"))
    params = _model_params(torch.float32, device)
    optimizer = AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.state[params[0]].update(step=torch.tensor(1.0), exp_avg=torch.zeros(3, device=device),
                                      exp_avg_sq=torch.zeros(3, device=device))
    with pytest.raises(RuntimeError):
        optimizer.step()


def test_closure_scheduler_and_no_fused_flag(device):
    params = _model_params(torch.float32, device)
    optimizer = AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def closure():
        for p in params:
            p.grad = torch.ones_like(p)
        return torch.tensor(1.5)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        assert optimizer.step(closure).item() == 1.5
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 5e-3
    with pytest.raises(ValueError, match="fused=True"):
        AdamW(params, fused=True)


def test_small_tensors_take_torch_foreach_step_in_one_call(device, monkeypatch):
    """On CUDA, tensors under SMALL_TENSOR_ELEMENTS go through torch's foreach step in one call (the
    same numbers there; one launch per small tensor would cost more host time than their update): the
    small ones get torch's numbers and step counts, the others the kernel's, each counted once."""
    import liger_kernels.optim as optim

    monkeypatch.setattr(optim, "_takes_torch_step", lambda t: t.numel() < 100)  # (19,) and (1,) here
    calls = []
    original = optim.torch_adam.adam
    monkeypatch.setattr(optim.torch_adam, "adam", lambda *a, **k: calls.append(len(a[0])) or original(*a, **k))
    hyper = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    mixed_params = _model_params(torch.float32, device)
    kernel_params, torch_params = copy.deepcopy(mixed_params), copy.deepcopy(mixed_params)
    mixed = _train(AdamW, mixed_params, 5, **hyper)
    assert calls == [2, 1, 2, 1, 2]  # the (19,) parameter has a gradient every other step
    monkeypatch.setattr(optim, "_takes_torch_step", lambda t: False)
    _train(AdamW, kernel_params, 5, **hyper)
    theirs = _train(torch.optim.AdamW, torch_params, 5, foreach=True, **hyper)
    for i, (a, b, c) in enumerate(zip(mixed_params, kernel_params, torch_params)):
        expected = c if a.numel() < 100 else b
        assert torch.equal(a, expected), i
        assert mixed.state[a]["step"].item() == theirs.state[c]["step"].item()


@pytest.fixture
def one_rank_mesh(device, tmp_path):
    """A device mesh of this one process (FSDP2 / tensor-parallel parameters are DTensors on a mesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo",
                                         init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield init_device_mesh(device, (1,))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_parameters_step_their_local_shards(dtype, device, one_rank_mesh, monkeypatch):
    """DTensor parameters (FSDP2's Shard(0)): the kernel steps the local shards, the numbers of the same
    step on plain tensors; a gradient with a reduction pending (Partial) runs torch's step instead."""
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    import liger_kernels.optim as optim

    calls = []
    monkeypatch.setattr(optim, "launch_adamw_", lambda *a, **k: calls.append(1) or launch_adamw_(*a, **k))
    plain = _model_params(dtype, device)
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), one_rank_mesh, [Shard(0)])) for p in plain]
    optimizer = AdamW(sharded, lr=1e-2)
    reference = AdamW(plain, lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, q in zip(plain, sharded):
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(dtype).to(device)
            q.grad = distribute_tensor(p.grad.clone(), one_rank_mesh, [Shard(0)])
        reference.step()
        optimizer.step()
    assert len(calls) == 6  # three steps each, all on the kernel
    for p, q in zip(plain, sharded):
        assert isinstance(q, DTensor) and torch.equal(q.full_tensor(), p)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[q][k].full_tensor(), reference.state[p][k])
    calls.clear()
    for q in sharded:
        q.grad = DTensor.from_local(torch.zeros_like(q.to_local()), one_rank_mesh, [Partial()])
    assert optimizer._fused_plan() is None  # torch's step, which handles the pending reduction
    assert calls == []


@pytest.mark.gpu
def test_step_needs_no_parameter_sized_temporaries():
    """torch's foreach step allocates a list the size of the parameters (sqrt(v)); this one does not."""
    params = [torch.nn.Parameter(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    peaks = {}
    for name, cls in (("ours", AdamW), ("torch", torch.optim.AdamW)):
        optimizer = cls(params, lr=1e-3)
        optimizer.step()  # states allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        optimizer.step()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
        del optimizer
    size = sum(p.numel() * p.element_size() for p in params)
    assert peaks["ours"] < 2**20, peaks
    assert peaks["torch"] >= size, peaks  # what the test guards against, measured on torch's step


class _TinyNet(torch.nn.Module):
    """Parameters of several sizes, one used twice (its gradient is the sum of two uses) and one frozen."""

    def __init__(self, dtype, device):
        super().__init__()
        torch.manual_seed(3)
        self.inner = torch.nn.Linear(33, 33, device=device, dtype=dtype)
        self.norm = torch.nn.LayerNorm(33, device=device, dtype=dtype)
        self.head = torch.nn.Linear(33, 7, bias=False, device=device, dtype=dtype)
        self.frozen = torch.nn.Linear(33, 33, device=device, dtype=dtype).requires_grad_(False)

    def forward(self, x):
        return self.head(self.norm(self.inner(self.frozen(self.inner(x))))).square().mean()


def _groups(net):
    return [dict(params=[net.inner.weight, net.head.weight], lr=1e-2),
            dict(params=[net.inner.bias, *net.norm.parameters()], lr=3e-3, weight_decay=0.0)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])  # float64: torch's step
def test_step_in_backward_equals_step_after_backward(dtype, device):
    """Stepping each parameter inside backward gives the parameters and states of backward + step(),
    bit for bit where both run the kernel, under a scheduler, with groups and a parameter used twice;
    no gradient is left after backward, and step() / zero_grad() then change nothing."""
    after_net, in_net = _TinyNet(dtype, device), _TinyNet(dtype, device)
    hyper = dict(betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    after = AdamW(_groups(after_net), **hyper)
    inside = AdamW(_groups(in_net), step_in_backward=True, **hyper)
    for o in (after, inside):  # new group dicts (as accelerate's wrapper does): the hooks must use these
        o.load_state_dict(o.state_dict())
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (after, inside)]
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(5, 33, generator=gen).to(device=device, dtype=dtype)
        after_net(x).backward()
        after.step()
        after.zero_grad()
        in_net(x).backward()
        assert all(p.grad is None for p in in_net.parameters())
        inside.step()
        inside.zero_grad()
        for s in schedulers:
            s.step()
    for (name, a), b in zip(after_net.named_parameters(), in_net.parameters()):
        exact = dtype != torch.float64  # torch's single-tensor step inside backward, its foreach after
        _assert_same(b.detach(), a.detach(), exact=exact, name=name, ulps=2)
        if a.requires_grad:
            sa, sb = after.state[a], inside.state[b]
            assert sa["step"].item() == sb["step"].item() == 3.0
            _assert_same(sb["exp_avg_sq"], sa["exp_avg_sq"], exact=exact, name=name + " exp_avg_sq", ulps=2)
    assert in_net.frozen.weight.grad is None and not inside.state.get(in_net.frozen.weight)


def test_step_in_backward_hooks_removed_or_optimizer_gone(device):
    net = _TinyNet(torch.float32, device)
    x = torch.randn(5, 33, device=device)
    optimizer = AdamW(net.parameters(), step_in_backward=True)
    optimizer.remove_backward_hooks()
    net(x).backward()
    assert net.head.weight.grad is not None  # back to the step after backward
    before = net.head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, net.head.weight)
    net.zero_grad()
    AdamW(net.parameters(), step_in_backward=True)  # dropped at once: its hooks must do nothing
    before = net.head.weight.detach().clone()
    net(x).backward()
    assert net.head.weight.grad is not None and torch.equal(before, net.head.weight)


def test_step_in_backward_one_optimizer_per_parameter_and_copies(device):
    """A second live in-backward optimizer on the same parameters is refused (its hook would find the
    gradients gone) until the first is dropped; a deep copy of model and optimizer steps in backward."""
    import gc

    net = _TinyNet(torch.float32, device)
    first = AdamW(net.parameters(), step_in_backward=True)
    with pytest.raises(ValueError, match="another such optimizer"):
        AdamW(net.parameters(), step_in_backward=True)
    del first
    gc.collect()
    second = AdamW(net.parameters(), step_in_backward=True)
    net_copy, copied = copy.deepcopy((net, second))
    x = torch.randn(5, 33, device=device)
    net_copy(x).backward()
    assert net_copy.head.weight.grad is None and copied.state[net_copy.head.weight]["step"].item() == 1.0
    assert not second.state  # the original's parameters took no gradient
    second.remove_backward_hooks()
    AdamW(net.parameters(), step_in_backward=True)  # free again


def test_step_in_backward_refusals(device, monkeypatch):
    params = _model_params(torch.float32, device)
    optimizer = AdamW(params[:1], step_in_backward=True)
    with pytest.raises(ValueError, match="amsgrad"):
        optimizer.add_param_group(dict(params=params[1:], amsgrad=True))
    assert len(optimizer.param_groups) == 1  # the refused group is not left half added
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW(params, amsgrad=True, step_in_backward=True)
    with pytest.raises(ValueError, match="tensor lr"):
        AdamW(params, lr=torch.tensor(1e-3), step_in_backward=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="2 processes"):
        AdamW(params, step_in_backward=True)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_step_in_backward_under_checkpointing(use_reentrant, device):
    """Checkpointed segments recompute with their own parameters before those are stepped: the
    in-backward step equals the step after backward, both checkpoint implementations."""
    from torch.utils.checkpoint import checkpoint

    class Segmented(_TinyNet):
        def forward(self, x):
            h = checkpoint(lambda t: self.norm(self.inner(t)), x, use_reentrant=use_reentrant)
            return checkpoint(self.head, h, use_reentrant=use_reentrant).square().mean()

    after_net, in_net = Segmented(torch.float32, device), Segmented(torch.float32, device)
    after = AdamW(after_net.parameters(), lr=1e-2)
    inside = AdamW(in_net.parameters(), lr=1e-2, step_in_backward=True)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = torch.randn(5, 33, generator=gen).to(device).requires_grad_(use_reentrant)
        after_net(x).backward()
        after.step()
        after.zero_grad()
        in_net(x).backward()
    for (name, a), b in zip(after_net.named_parameters(), in_net.parameters()):
        assert torch.equal(a, b), name
