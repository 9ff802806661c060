"""Where the time of small ops goes on the GPU machine: host (Python) time per fwd+bwd vs GPU time,
the top Python functions (cProfile), and the CUDA kernels of one RoPE fwd+bwd at the anchor shape.

    python scripts/host_profile.py > host_profile.txt
"""

import cProfile
import pstats
import time

import torch

from liger_kernels.ops.layer_norm import layer_norm
from liger_kernels.ops.rms_norm import rms_norm
from liger_kernels.ops.rope import rope


def host_vs_total(name, step, iters=300):
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    print(f"{name}: host {host / iters * 1e6:.0f} us/iter, host+device {total / iters * 1e6:.0f} us/iter")


def main():
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(4096, 4096, device=dev, dtype=dt, requires_grad=True)
    w = torch.ones(4096, device=dev, dtype=dt, requires_grad=True)
    b = torch.zeros(4096, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn_like(x)

    def rms_step():
        x.grad = w.grad = None
        rms_norm(x, w).backward(g)

    def ln_step():
        x.grad = w.grad = b.grad = None
        layer_norm(x, w, b).backward(g)

    def torch_ln_step():
        x.grad = w.grad = b.grad = None
        torch.nn.functional.layer_norm(x, (4096,), w, b).backward(g)

    def rms_fwd():
        with torch.no_grad():
            rms_norm(x, w)

    host_vs_total("rms_norm 4096x4096 fwd+bwd", rms_step)
    host_vs_total("rms_norm 4096x4096 fwd (no grad)", rms_fwd)
    host_vs_total("layer_norm 4096x4096 fwd+bwd", ln_step)
    host_vs_total("torch layer_norm 4096x4096 fwd+bwd", torch_ln_step)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        rms_step()
    prof.disable()
    torch.cuda.synchronize()
    print("cProfile, 300 rms_norm fwd+bwd, by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)

    q = torch.randn(4, 4096, 32, 128, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(4, 4096, 8, 128, device=dev, dtype=dt, requires_grad=True)
    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=dev, dtype=torch.float32) / 128))
    ang = torch.arange(4096, device=dev, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat((ang, ang), -1)[None]
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    dq = torch.randn(4, 32, 4096, 128, device=dev, dtype=dt)
    dk = torch.randn(4, 8, 4096, 128, device=dev, dtype=dt)

    def rope_step():
        q.grad = k.grad = None
        qe, ke = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        torch.autograd.backward((qe, ke), (dq, dk))

    host_vs_total("rope anchor fwd+bwd", rope_step, 100)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            rope_step()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
