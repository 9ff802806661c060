"""Kernels launch on their inputs' GPU, not the current one (`_utils.on_input_device`): Triton launches on
the current CUDA device, so a model spread over GPUs (device_map="auto") needs every launching entry
point to switch to its inputs' device first."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import liger_kernels.functional as LF
from liger_kernels import _library, _utils
from liger_kernels.losses import chunked


class _OnSecondGpu(torch.Tensor):
    """A CPU tensor that reports itself on cuda:1: what the guard reads, without a GPU."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


@pytest.fixture
def fake_devices(monkeypatch):
    """torch.cuda.current_device / torch.cuda.device over a fake current index (starts at 0); the
    entries into torch.cuda.device are recorded."""
    state = {"current": 0, "entered": []}

    @contextlib.contextmanager
    def device(d):
        state["entered"].append(d.index)
        before, state["current"] = state["current"], d.index
        try:
            yield
        finally:
            state["current"] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


def _recording(state):
    @_utils.on_input_device
    def launch(*args, **kwargs):
        return state["current"]

    return launch


def test_switches_to_the_inputs_gpu_and_back(fake_devices):
    launch = _recording(fake_devices)
    on_gpu1 = torch.zeros(3).as_subclass(_OnSecondGpu)
    assert launch(on_gpu1, 2.0) == 1  # ran with cuda:1 current
    assert launch(1e-6, weight=on_gpu1) == 1  # the first tensor may come by keyword
    assert fake_devices["current"] == 0 and fake_devices["entered"] == [1, 1]


def test_no_switch_when_not_needed(fake_devices, monkeypatch):
    launch = _recording(fake_devices)
    assert launch(torch.zeros(3)) == 0  # a CPU tensor (interpreter or reference path)
    assert launch(3, "x") == 0  # no tensor at all
    fake_devices["current"] = 1
    assert launch(torch.zeros(3).as_subclass(_OnSecondGpu)) == 1  # already current
    monkeypatch.setattr(_utils, "compiling", lambda: True)  # Dynamo traces: the graph launches
    fake_devices["current"] = 0
    assert launch(torch.zeros(3).as_subclass(_OnSecondGpu)) == 0
    assert fake_devices["entered"] == []


@pytest.mark.parametrize("name", LF.__all__)
def test_every_public_op_is_guarded(name):
    assert getattr(LF, name).__code__ is _utils.on_input_device(lambda: None).__code__, name


@pytest.mark.parametrize("fn", [chunked.chunked_fused_linear_loss, chunked.chunked_logprobs])
def test_chunked_losses_are_guarded(fn):
    assert fn.__code__ is _utils.on_input_device(lambda: None).__code__


def test_public_op_runs_inside_the_switch(fake_devices, monkeypatch):
    """rms_norm given tensors on the second GPU: its body (where the kernels launch) runs with that GPU
    current. The body is stopped at its first call (there is no GPU here)."""
    import liger_kernels.ops.rms_norm as rms_norm_module

    seen = []

    def stop(*args):
        seen.append(fake_devices["current"])
        raise RuntimeError("stop")

    monkeypatch.setattr(rms_norm_module, "check_rms_norm_args", stop)
    with pytest.raises(RuntimeError, match="stop"):
        LF.rms_norm(torch.zeros(2, 4).as_subclass(_OnSecondGpu), torch.ones(4).as_subclass(_OnSecondGpu))
    assert seen == [1] and fake_devices["current"] == 0


def test_adamw_launches_on_the_parameters_gpu(fake_devices, monkeypatch):
    from liger_kernels.ops import adamw

    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(fake_devices["current"])

    monkeypatch.setattr(adamw, "_adamw_kernel", Kernel())
    p = torch.zeros(5).as_subclass(_OnSecondGpu)
    adamw.launch_adamw_([p], [p], [p], [p], step=1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    assert seen == [1] and fake_devices["current"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_a_second_gpu_match_the_first():
    """Real kernels on cuda:1 with cuda:0 current: the same values as on cuda:0, gradients too."""
    x0 = torch.randn(37, 257, device="cuda:0", dtype=torch.bfloat16, requires_grad=True)
    w0 = torch.randn(257, device="cuda:0", dtype=torch.bfloat16, requires_grad=True)
    x1 = x0.detach().to("cuda:1").requires_grad_()
    w1 = w0.detach().to("cuda:1").requires_grad_()
    torch.cuda.set_device(0)
    y0, y1 = LF.rms_norm(x0, w0), LF.rms_norm(x1, w1)
    y0.float().square().sum().backward()
    y1.float().square().sum().backward()
    assert torch.equal(y0, y1.to("cuda:0"))
    assert torch.equal(x0.grad, x1.grad.to("cuda:0")) and torch.equal(w0.grad, w1.grad.to("cuda:0"))


@functools.lru_cache(maxsize=None)
def _current_device_probe():
    """A custom op (registered once) returning the current CUDA device index, filled into its input's shape."""

    def fake(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    @_library.custom_op("test_device_guard_probe", fake)
    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float(torch.cuda.current_device()))

    return probe


def test_custom_ops_run_on_their_inputs_gpu(fake_devices):
    """Under torch.compile the graph calls the custom ops (torch.ops.liger.*), not the public
    functions: `_library.custom_op` registers the guarded implementation as their CUDA kernel."""
    from torch._library.custom_ops import OPDEFS  # every torch.library.custom_op, by qualified name

    import liger_kernels.functional  # noqa: F401  (imports every op file, registering its ops)

    cuda_kernel = _current_device_probe()._backend_fns["cuda"]  # what the dispatcher runs for CUDA inputs
    assert float(cuda_kernel(torch.zeros(2).as_subclass(_OnSecondGpu))[0]) == 1.0
    assert fake_devices["current"] == 0 and fake_devices["entered"] == [1]
    ops = [op for name, op in OPDEFS.items() if name.startswith(f"{_library.NAMESPACE}::")]
    assert len(ops) > 40
    for op in ops:  # each has a CUDA kernel in the dispatcher, the guarded one
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op._qualname, "CUDA"), op._qualname
        assert "cuda" in op._backend_fns, op._qualname
