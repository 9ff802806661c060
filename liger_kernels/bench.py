"""Benchmark runner: our ops side by side with torch eager, torch.compile and Liger-Kernel (when installed).

    liger-plugins bench [--quick] [--ops rms_norm,rope] [--impls ours,eager,compile,liger] [--out docs/bench]
    liger-plugins bench --from-json docs/bench/results.json --out docs/bench   # table and plots again, no GPU
    liger-plugins selfcheck [--interpret]                                       # parity on small inputs

For every op and shape: forward, backward and forward+backward time (median of
`triton.testing.do_bench`, which clears the L2 cache between runs), peak memory beyond the inputs
(forward; forward+backward with the gradients), and the fraction of a ceiling measured in the same run:
device copy bandwidth (bytes read + written) for memory-bound ops, the bf16 8192^3 matrix-product rate
for the fused linear cross-entropy. The minimal work each op must do is in `OPS[name].formula`.
The core ops (DEFAULT_OPS) run by default; the fused-linear losses (LOSS_OPS) and the other ops
(EXTRA_OPS: distribution losses, more norms and activations, RoPE variants, MoE experts, ...) run
when named with --ops.

Implementations: "ours" (liger_kernels), "eager" (plain PyTorch, as Hugging Face models compute it),
"compile" (torch.compile of the eager function, static shapes) and "liger" (Liger-Kernel's public
functional API; the only place this project imports liger_kernel). Every implementation gets fresh
inputs drawn from the same seed, and its first forward output is compared with eager's.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import json
import math
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

IMPLS = ("ours", "eager", "compile", "liger")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RMS_EPS = 1e-6
LN_EPS = 1e-5


# --- torch eager baselines: what Hugging Face models run without any kernels --------------------------

def eager_rms_norm(x, weight):
    """LlamaRMSNorm.forward."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + RMS_EPS)
    return weight * h.to(input_dtype)


def eager_fused_add_rms_norm(x, residual, weight):
    """A decoder layer's `residual = residual + hidden; hidden = norm(residual)`."""
    s = x + residual
    return eager_rms_norm(s, weight), s


def eager_layer_norm(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LN_EPS)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def eager_swiglu(a, b):
    return F.silu(a) * b


def eager_geglu(a, b):
    return F.gelu(a, approximate="tanh") * b


def eager_cross_entropy(logits, target):
    """transformers' ForCausalLMLoss: logits upcast to fp32, then cross_entropy."""
    return F.cross_entropy(logits.float(), target, ignore_index=-100)


def eager_fused_linear_cross_entropy(x, weight, target):
    """lm_head, then the loss as above: the logits are materialized."""
    return F.cross_entropy(F.linear(x, weight).float(), target, ignore_index=-100)


# --- inputs -------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    leaves: list  # tensors that receive gradients
    consts: list  # tensors without gradients (cos/sin, targets)
    grads: list  # gradient for each output; None for a scalar loss
    assemble: Callable  # (leaves, consts) -> positional arguments of the op

    def args(self):
        return self.assemble(self.leaves, self.consts)

    def float64_cpu(self) -> "Inputs":
        """Float64 copies on the CPU, for the reference."""
        def up(t):
            return t.detach().cpu().double() if t.is_floating_point() else t.cpu()

        return Inputs([up(t).requires_grad_() for t in self.leaves], [up(t) for t in self.consts],
                      [None if g is None else up(g) for g in self.grads], self.assemble)


def _randn(*shape, device, dtype, scale=1.0, shift=0.0, grad=True):
    t = torch.randn(*shape, device=device, dtype=dtype)
    if scale != 1.0 or shift != 0.0:
        t.mul_(scale).add_(shift)
    return t.requires_grad_(grad)


def _targets(m, v, ignore_every, device):
    t = torch.randint(0, v, (m,), device=device)
    if ignore_every:
        t[ignore_every - 1::ignore_every] = -100
    return t


def _positional(leaves, consts):
    return (*leaves, *consts)


def make_norm(d, device, dtype, *, residual=False, bias=False):
    m, n = d["M"], d["N"]
    leaves = [_randn(m, n, device=device, dtype=dtype)]
    grads = [_randn(m, n, device=device, dtype=dtype, grad=False)]
    if residual:
        leaves.append(_randn(m, n, device=device, dtype=dtype))
        grads.append(_randn(m, n, device=device, dtype=dtype, grad=False))
    leaves.append(_randn(n, device=device, dtype=dtype, scale=0.1, shift=1.0))  # weight, not all ones
    if bias:
        leaves.append(_randn(n, device=device, dtype=dtype, scale=0.1))
    return Inputs(leaves, [], grads, _positional)


def _rope_views(leaves, consts):
    # q, k as a model makes them: (B, T, H, D) projections viewed as (B, H, T, D), not contiguous
    return leaves[0].transpose(1, 2), leaves[1].transpose(1, 2), consts[0], consts[1]


def make_rope(d, device, dtype):
    b, t, hq, hkv, dim = d["B"], d["T"], d["Hq"], d["Hkv"], d["D"]
    q = _randn(b, t, hq, dim, device=device, dtype=dtype)
    k = _randn(b, t, hkv, dim, device=device, dtype=dtype)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)[None]  # (1, T, D): one position row for the whole batch
    grads = [_randn(b, hq, t, dim, device=device, dtype=dtype, grad=False),
             _randn(b, hkv, t, dim, device=device, dtype=dtype, grad=False)]
    return Inputs([q, k], [emb.cos().to(dtype), emb.sin().to(dtype)], grads, _rope_views)


def make_glu(d, device, dtype):
    m, i = d["M"], d["I"]
    leaves = [_randn(m, i, device=device, dtype=dtype), _randn(m, i, device=device, dtype=dtype)]
    return Inputs(leaves, [], [_randn(m, i, device=device, dtype=dtype, grad=False)], _positional)


def make_cross_entropy(d, device, dtype):
    logits = _randn(d["M"], d["V"], device=device, dtype=dtype)
    return Inputs([logits], [_targets(d["M"], d["V"], d.get("ignore_every", 0), device)], [None], _positional)


def make_fused_linear_cross_entropy(d, device, dtype):
    m, h, v = d["M"], d["H"], d["V"]
    x = _randn(m, h, device=device, dtype=dtype)
    weight = _randn(v, h, device=device, dtype=dtype, scale=h ** -0.5)  # logits of order one
    return Inputs([x, weight], [_targets(m, v, d.get("ignore_every", 0), device)], [None], _positional)


# --- the ops: inputs, baselines, minimal work, shapes -----------------------------------------------

@dataclass(frozen=True)
class OpSpec:
    name: str
    module: str  # liger_kernels.ops.<module> holds `<name>` and `<name>_reference`
    kwargs: dict  # keyword arguments for ours and the reference
    make: Callable  # (dims, device, dtype) -> Inputs
    eager: Callable
    label: Callable  # dims -> shape text
    unit: str  # "bytes" (against copy bandwidth) or "flops" (against the bf16 matmul rate)
    formula: str
    work: Callable  # (dims, bytes per element) -> {"fwd": n, "fwd_bwd": n}
    anchors: tuple  # the shapes of ../shared/ANCHORS.md
    sweeps: dict  # sweep name -> shapes
    tiny: dict  # selfcheck shape


def _mn(d):
    return f"{d['M']}x{d['N']}"


def _norm_work(fwd, fwd_bwd):
    return lambda d, e: {"fwd": fwd * d["M"] * d["N"] * e, "fwd_bwd": fwd_bwd * d["M"] * d["N"] * e}


NORM_ANCHORS = ({"M": 32768, "N": 4096}, {"M": 4096, "N": 4096})
NORM_SWEEPS = {
    "tokens": tuple({"M": m, "N": 4096} for m in (4096, 16384, 32768, 65536)),
    "hidden": tuple({"M": 32768, "N": n} for n in (1024, 4096, 8192, 16384)),
}
NORM_SWEEPS_SHORT = {
    "tokens": tuple({"M": m, "N": 4096} for m in (4096, 32768, 65536)),
    "hidden": tuple({"M": 32768, "N": n} for n in (4096, 16384)),
}
_ROPE = {"B": 4, "T": 4096, "Hq": 32, "Hkv": 8, "D": 128}


def _rope_work(d, e):
    qk = d["B"] * d["T"] * d["D"] * (d["Hq"] + d["Hkv"])
    cs = 2 * d["T"] * d["D"]  # cos and sin, batch 1
    return {"fwd": (2 * qk + cs) * e, "fwd_bwd": (4 * qk + 2 * cs) * e}


def _glu_work(d, e):
    return {"fwd": 3 * d["M"] * d["I"] * e, "fwd_bwd": 8 * d["M"] * d["I"] * e}


_GLU_SWEEPS = {
    "tokens": tuple({"M": m, "I": 14336} for m in (4096, 16384, 32768)),
    "hidden": tuple({"M": 16384, "I": i} for i in (4096, 14336, 28672)),
}

OPS = {
    "rms_norm": OpSpec(
        "rms_norm", "rms_norm", {"eps": RMS_EPS}, make_norm, eager_rms_norm, _mn, "bytes",
        "fwd 2*M*N*e (read x, write y); fwd+bwd 5*M*N*e (+ read dy, x, write dx); weight terms ignored",
        _norm_work(2, 5), NORM_ANCHORS, NORM_SWEEPS, {"M": 3, "N": 40}),
    "fused_add_rms_norm": OpSpec(
        "fused_add_rms_norm", "fused_add_rms_norm", {"eps": RMS_EPS},
        lambda d, dev, dt: make_norm(d, dev, dt, residual=True), eager_fused_add_rms_norm, _mn, "bytes",
        "fwd 4*M*N*e (read x, residual, write y, x+residual); fwd+bwd 8*M*N*e (+ read dy, dsum, sum, "
        "write one gradient: x and residual get the same one)",
        _norm_work(4, 8), NORM_ANCHORS, NORM_SWEEPS_SHORT, {"M": 3, "N": 40}),
    "layer_norm": OpSpec(
        "layer_norm", "layer_norm", {"eps": LN_EPS},
        lambda d, dev, dt: make_norm(d, dev, dt, bias=True), eager_layer_norm, _mn, "bytes",
        "fwd 2*M*N*e; fwd+bwd 5*M*N*e, as RMSNorm; weight and bias terms ignored",
        _norm_work(2, 5), NORM_ANCHORS, NORM_SWEEPS_SHORT, {"M": 3, "N": 40}),
    "rope": OpSpec(
        "rope", "rope", {}, make_rope, eager_rope,
        lambda d: f"B{d['B']} T{d['T']} Hq{d['Hq']} Hkv{d['Hkv']} D{d['D']}", "bytes",
        "fwd 2*(q+k)*e + cos,sin; fwd+bwd 4*(q+k)*e + 2*(cos,sin) (q, k in elements)",
        _rope_work, (_ROPE,),
        {"tokens": tuple(dict(_ROPE, T=t) for t in (1024, 4096, 16384)),
         "hidden": tuple(dict(_ROPE, Hq=hq, Hkv=hkv) for hq, hkv in ((16, 4), (32, 8), (64, 8)))},
        {"B": 2, "T": 3, "Hq": 2, "Hkv": 1, "D": 8}),
    "swiglu": OpSpec(
        "swiglu", "glu", {}, make_glu, eager_swiglu, lambda d: f"{d['M']}x{d['I']}", "bytes",
        "fwd 3*M*I*e (read a, b, write c); fwd+bwd 8*M*I*e (+ read dc, a, b, write da, db)",
        _glu_work, ({"M": 16384, "I": 14336},), _GLU_SWEEPS, {"M": 3, "I": 40}),
    "geglu": OpSpec(
        "geglu", "glu", {"approximate": "tanh"}, make_glu, eager_geglu, lambda d: f"{d['M']}x{d['I']}",
        "bytes", "as SwiGLU: fwd 3*M*I*e; fwd+bwd 8*M*I*e",
        _glu_work, ({"M": 16384, "I": 14336},), _GLU_SWEEPS, {"M": 3, "I": 40}),
    "cross_entropy": OpSpec(
        "cross_entropy", "cross_entropy", {}, make_cross_entropy, eager_cross_entropy,
        lambda d: f"{d['M']}x{d['V']}", "bytes",
        "fwd M*V*e (read logits); fwd+bwd 2*M*V*e (one pass: read logits, write their gradient)",
        lambda d, e: {"fwd": d["M"] * d["V"] * e, "fwd_bwd": 2 * d["M"] * d["V"] * e},
        ({"M": 8192, "V": 128256},),
        {"tokens": tuple({"M": m, "V": 128256} for m in (4096, 8192, 16384)),
         "vocab": tuple({"M": 8192, "V": v} for v in (32000, 128256, 256000))},
        {"M": 4, "V": 37, "ignore_every": 3}),
    "fused_linear_cross_entropy": OpSpec(
        "fused_linear_cross_entropy", "fused_linear_cross_entropy", {}, make_fused_linear_cross_entropy,
        eager_fused_linear_cross_entropy, lambda d: f"{d['M']}x{d['H']}x{d['V']}", "flops",
        "fwd 2*M*H*V FLOPs (logits); fwd+bwd 6*M*H*V (+ dX, dW)",
        lambda d, e: {"fwd": 2 * d["M"] * d["H"] * d["V"], "fwd_bwd": 6 * d["M"] * d["H"] * d["V"]},
        ({"M": 8192, "H": 4096, "V": 128256}, {"M": 8192, "H": 2304, "V": 256000}),
        {"tokens": tuple({"M": m, "H": 4096, "V": 128256} for m in (4096, 8192, 16384))},
        {"M": 4, "H": 16, "V": 37, "ignore_every": 3}),
}


# --- fused-linear losses: ours vs the same loss computed the plain PyTorch way -------------------------
# "eager" is the loss function with fused=False: lm_head over the whole batch, fp32 log-softmax over the
# full (B, T, V) logits, one autograd graph (what TRL computes without Liger). "compile" compiles that.
# Policy only (no reference model), as the ANCHORS.md alignment anchor: 8 pairs = 16 sequences x 1024.

LOSS_ANCHOR = {"B": 16, "T": 1024, "H": 4096, "V": 128256}
LOSS_FUNCTIONS = {  # op -> (liger_kernels.losses function, keyword arguments)
    "dpo_loss": ("fused_linear_dpo_loss", {"beta": 0.1}),
    "orpo_loss": ("fused_linear_orpo_loss", {"beta": 0.1}),
    "cpo_loss": ("fused_linear_cpo_loss", {"beta": 0.1}),
    "simpo_loss": ("fused_linear_simpo_loss", {"beta": 0.1}),
    "kto_loss": ("fused_linear_kto_loss", {"beta": 0.1}),
    "grpo_loss": ("fused_linear_grpo_loss", {"loss_type": "dapo"}),
    "jsd_loss": ("fused_linear_jsd_loss", {"beta": 0.5}),
    "cosine_loss": ("fused_linear_cosine_similarity_loss", {"beta": 0.5}),
}
TEACHER_LOSSES = ("jsd_loss", "cosine_loss")  # distillation: a teacher head too


def make_loss(op):
    def make(d, device, dtype):
        b, t, h, v = d["B"], d["T"], d["H"], d["V"]
        x = _randn(b, t, h, device=device, dtype=dtype)
        weight = _randn(v, h, device=device, dtype=dtype, scale=h ** -0.5)
        target = _targets(b * t, v, d.get("ignore_every", 0), device).view(b, t)
        if op in TEACHER_LOSSES:  # teacher: same tokens, its own head, no gradients
            teacher = [_randn(b, t, h, device=device, dtype=dtype, grad=False),
                       _randn(v, h, device=device, dtype=dtype, scale=h ** -0.5, grad=False)]
            return Inputs([x, weight], [*teacher, target], [None], _positional)
        extra = {"kto_loss": [torch.arange(b, device=device) % 2 == 0],  # desirable / undesirable
                 "grpo_loss": [torch.randn(b, device=device)]}.get(op, [])  # advantages
        return Inputs([x, weight], [target, *extra], [None], _positional)
    return make


def _loss_fn(op, **extra):
    from liger_kernels import losses

    name, kwargs = LOSS_FUNCTIONS[op]
    fn = getattr(losses, name)
    return lambda *args: fn(*args, **kwargs, **extra).loss


def _loss_work(op):
    heads = 4 if op in TEACHER_LOSSES else 3  # the teacher's logits: one more (M, H) x (H, V) product
    return lambda d, e: {"fwd": 2 * d["B"] * d["T"] * d["H"] * d["V"] * (heads - 1),
                         "fwd_bwd": 2 * d["B"] * d["T"] * d["H"] * d["V"] * heads}


for _op in LOSS_FUNCTIONS:
    OPS[_op] = OpSpec(
        _op, "losses", {}, make_loss(_op), _loss_fn(_op, fused=False),
        lambda d: f"{d['B']}x{d['T']}x{d['H']}x{d['V']}", "flops",
        "fwd+bwd 6*B*T*H*V FLOPs (logits, dX, dW; + 2*B*T*H*V for the teacher); fwd counts all but one: "
        "the fused losses compute their gradients in the forward",
        _loss_work(_op), (LOSS_ANCHOR,), {}, {"B": 4, "T": 5, "H": 16, "V": 37, "ignore_every": 3})
LOSS_OPS = tuple(LOSS_FUNCTIONS)


# --- more ops, run on request (--ops): losses on distributions, other norms and activations, RoPE
# variants, fused MLP pieces, MoE experts, multi-token attention and the fused linear JSD. Eager is the
# plain PyTorch (or transformers) formula; norms upcast to fp32 as transformers' norms do.

def eager_kl_div(input, target):
    return F.kl_div(input, target, reduction="batchmean")


def eager_jsd(x, y, label, beta=0.5):
    """Generalized JSD of log-probabilities as TRL's GKD computes it: beta KL(P || M) + (1 - beta)
    KL(Q || M), M = beta P + (1 - beta) Q; mean over the rows whose label is not -100."""
    log_m = torch.logsumexp(torch.stack((x + math.log(1 - beta), y + math.log(beta))), dim=0)
    rows = (beta * F.kl_div(log_m, y, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(log_m, x, reduction="none", log_target=True)).sum(-1)
    valid = label != -100
    return (rows * valid).sum() / valid.sum().clamp_min(1)


def eager_tvd(p, q):
    return 0.5 * (p - q).abs().sum() / p.shape[0]


def eager_dyt(x, alpha, weight, bias):
    """DyT (Zhu et al., 2025): weight * tanh(alpha * x) + bias."""
    return weight * torch.tanh(alpha * x) + bias


def eager_relu_squared(x):
    return torch.square(F.relu(x))


def eager_softmax(x):
    return torch.softmax(x, dim=-1)


def eager_sparsemax(x):
    """Sparsemax (Martins & Astudillo, 2016) over the last dimension by sorting, in fp32 (the support
    count k must stay exact, which bf16 cannot hold past 256)."""
    z = x.float()
    z = z - z.max(-1, keepdim=True).values.detach()
    z_sorted = z.sort(dim=-1, descending=True).values
    cumsum = z_sorted.cumsum(-1)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    support = (1 + k * z_sorted > cumsum).sum(-1, keepdim=True)
    tau = (cumsum.gather(-1, support - 1) - 1) / support
    return torch.clamp(z - tau, min=0).to(x.dtype)


def eager_group_norm(x, num_groups, weight, bias):
    return F.group_norm(x, num_groups, weight, bias, LN_EPS)


def eager_poly_norm(x, weight, bias):
    """PolyNorm (Motif): weights times RMS-normalized x^3, x^2, x, plus a bias; fp32 inside."""
    h = x.float()

    def norm(u):
        return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + RMS_EPS)

    return (weight[0] * norm(h ** 3) + weight[1] * norm(h ** 2) + weight[2] * norm(h) + bias).to(x.dtype)


def eager_modulated_rms_norm(x, weight, scale, shift):
    """adaLN (DiT) after a LlamaRMSNorm: `norm(x) * (1 + scale) + shift` in x's dtype, the (B, H)
    scale and shift broadcast over each batch item's rows."""
    h = eager_rms_norm(x, weight)
    h = h.view(scale.shape[0], -1, h.shape[-1])
    return (h * (1 + scale[:, None]) + shift[:, None]).view(x.shape)


def eager_mrope(q, k, cos, sin, mrope_section):
    """transformers' apply_multimodal_rotary_pos_emb (Qwen2-VL): each run of the head dimension takes
    its cos/sin from the temporal, height or width table, then rotate-half RoPE."""
    sections = list(mrope_section) * 2
    cos = torch.cat([c[i % 3] for i, c in enumerate(cos.split(sections, dim=-1))], dim=-1)
    sin = torch.cat([s[i % 3] for i, s in enumerate(sin.split(sections, dim=-1))], dim=-1)
    return eager_rope(q, k, cos, sin)


def eager_llama4_rope(q, k, freqs_cis):
    """transformers' llama4 apply_rotary_emb: head-dimension pairs as complex numbers times freqs_cis."""
    def apply(x):
        x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_ * freqs_cis[:, :, None, :]).flatten(3).type_as(x)

    return apply(q), apply(k)


def eager_swiglu_gate_up(gate_up):
    """Phi-3's MLP: one gate_up projection, chunked."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def eager_gated_down_proj(a, b, weight):
    """A Llama MLP's down_proj(act(gate) * up): autograd keeps a, b and their product."""
    return F.linear(F.silu(a) * b, weight)


def eager_linear_projections(x, weights):
    """The attention's q/k/v projections as transformers calls them: autograd adds their input gradients."""
    return tuple(F.linear(x, w) for w in weights)


def eager_fused_moe(hidden, router_logits, gate_up_weight, down_weight, top_k):
    """transformers' Mixtral / Qwen3-MoE block: fp32 softmax routing, top-k renormalized, then a loop
    over the experts that got tokens (host syncs to find and index them)."""
    weights, index = torch.topk(torch.softmax(router_logits, dim=-1, dtype=torch.float32), top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(hidden.dtype)
    out = torch.zeros_like(hidden)
    for e in index.unique():  # 0-d tensors, as transformers iterates over the experts hit
        token, slot = torch.where(index == e)
        gate, up = F.linear(hidden[token], gate_up_weight[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_weight[e]) * weights[token, slot, None]
        out.index_add_(0, token, y)
    return out


MTA_PADDING = 1  # 3 x 3 key-query convolution that keeps the L x L map


def eager_multi_token_attention(scores, weight, bias):
    """Causal softmax of the scores, 2-D convolution over the map, causal mask on the result."""
    seq_len = scores.shape[-1]
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=scores.device).triu(1)
    p = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return F.conv2d(p, weight, bias, padding=MTA_PADDING).masked_fill(future, 0.0)


def eager_fused_linear_jsd(student_x, student_w, teacher_x, teacher_w, label):
    """Both heads' logits materialized and upcast to fp32 (as eager_fused_linear_cross_entropy), then
    log-softmax and eager_jsd."""
    x = torch.log_softmax(F.linear(student_x, student_w).float(), dim=-1)
    y = torch.log_softmax(F.linear(teacher_x, teacher_w).float(), dim=-1)
    return eager_jsd(x, y, label)


def _probs(m, v, device, dtype, *, log, grad):
    """(Log-)probabilities of random logits, (m, v); a leaf that wants a gradient when grad."""
    logits = torch.randn(m, v, device=device, dtype=torch.float32)
    p = torch.log_softmax(logits, -1) if log else torch.softmax(logits, -1)
    return p.to(dtype).requires_grad_(grad)


def make_kl_div(d, device, dtype):  # log-probabilities against a constant target distribution
    m, v = d["M"], d["V"]
    return Inputs([_probs(m, v, device, dtype, log=True, grad=True)],
                  [_probs(m, v, device, dtype, log=False, grad=False)], [None], _positional)


def make_jsd(d, device, dtype):  # student log-probabilities, constant teacher, labels
    m, v = d["M"], d["V"]
    return Inputs([_probs(m, v, device, dtype, log=True, grad=True)],
                  [_probs(m, v, device, dtype, log=True, grad=False), _targets(m, v, d.get("ignore_every", 0), device)],
                  [None], _positional)


def make_tvd(d, device, dtype):
    m, v = d["M"], d["V"]
    return Inputs([_probs(m, v, device, dtype, log=False, grad=True)],
                  [_probs(m, v, device, dtype, log=False, grad=False)], [None], _positional)


def make_rows(d, device, dtype):
    m, n = d["M"], d["N"]
    return Inputs([_randn(m, n, device=device, dtype=dtype)], [],
                  [_randn(m, n, device=device, dtype=dtype, grad=False)], _positional)


def make_dyt(d, device, dtype):
    m, n = d["M"], d["N"]
    leaves = [_randn(m, n, device=device, dtype=dtype),
              _randn(1, device=device, dtype=dtype, scale=0.1, shift=0.5),  # alpha
              _randn(n, device=device, dtype=dtype, scale=0.1, shift=1.0),  # weight
              _randn(n, device=device, dtype=dtype, scale=0.1)]  # bias
    return Inputs(leaves, [], [_randn(m, n, device=device, dtype=dtype, grad=False)], _positional)


def make_poly_norm(d, device, dtype):
    m, n = d["M"], d["N"]
    leaves = [_randn(m, n, device=device, dtype=dtype), _randn(3, device=device, dtype=dtype, scale=0.1, shift=1 / 3),
              _randn(1, device=device, dtype=dtype, scale=0.1, shift=1.0)]
    return Inputs(leaves, [], [_randn(m, n, device=device, dtype=dtype, grad=False)], _positional)


def make_modulated_rms_norm(d, device, dtype):
    m, n, b = d["M"], d["N"], d["B"]
    leaves = [_randn(m, n, device=device, dtype=dtype), _randn(n, device=device, dtype=dtype, scale=0.1, shift=1.0),
              _randn(b, n, device=device, dtype=dtype, scale=0.1),  # scale (per batch item)
              _randn(b, n, device=device, dtype=dtype, scale=0.1)]  # shift
    return Inputs(leaves, [], [_randn(m, n, device=device, dtype=dtype, grad=False)], _positional)


def make_group_norm(d, device, dtype):
    n, c, s = d["N"], d["C"], d["S"]
    leaves = [_randn(n, c, s, device=device, dtype=dtype), _randn(c, device=device, dtype=dtype, scale=0.1, shift=1.0),
              _randn(c, device=device, dtype=dtype, scale=0.1)]
    return Inputs(leaves, [], [_randn(n, c, s, device=device, dtype=dtype, grad=False)],
                  lambda leaves, consts: (leaves[0], d["G"], leaves[1], leaves[2]))


def mrope_section(head_dim):
    """Qwen2-VL's split of head_dim / 2 into temporal, height, width runs ([16, 24, 24] for 128)."""
    hw = 3 * head_dim // 16
    return (head_dim // 2 - 2 * hw, hw, hw)


def make_mrope(d, device, dtype):
    b, t, dim = d["B"], d["T"], d["D"]
    inp = make_rope(d, device, dtype)  # q, k and their gradients as for rope; cos/sin replaced below
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    # (3, B, T) position ids: temporal, height and width differ (as for image tokens), and per sequence
    pos = (torch.arange(t, device=device)[None, None, :] + torch.arange(b, device=device)[None, :, None]
           + torch.tensor([0, 5, 11], device=device)[:, None, None]).float()
    angles = pos[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)  # (3, B, T, D)
    section = mrope_section(dim)
    return Inputs(inp.leaves, [emb.cos().to(dtype), emb.sin().to(dtype)], inp.grads,
                  lambda leaves, consts: (*_rope_views(leaves, consts), section))


def make_llama4_rope(d, device, dtype):
    b, t, hq, hkv, dim = d["B"], d["T"], d["Hq"], d["Hkv"], d["D"]
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[None]  # complex64 (1, T, D/2), as transformers'
    leaves = [_randn(b, t, hq, dim, device=device, dtype=dtype), _randn(b, t, hkv, dim, device=device, dtype=dtype)]
    grads = [_randn(b, t, hq, dim, device=device, dtype=dtype, grad=False),
             _randn(b, t, hkv, dim, device=device, dtype=dtype, grad=False)]
    return Inputs(leaves, [freqs_cis], grads, _positional)


def make_swiglu_gate_up(d, device, dtype):
    m, i = d["M"], d["I"]
    return Inputs([_randn(m, 2 * i, device=device, dtype=dtype)], [],
                  [_randn(m, i, device=device, dtype=dtype, grad=False)], _positional)


def make_gated_down_proj(d, device, dtype):
    m, i, h = d["M"], d["I"], d["H"]
    leaves = [_randn(m, i, device=device, dtype=dtype), _randn(m, i, device=device, dtype=dtype),
              _randn(h, i, device=device, dtype=dtype, scale=i ** -0.5)]
    return Inputs(leaves, [], [_randn(m, h, device=device, dtype=dtype, grad=False)], _positional)


def make_linear_projections(d, device, dtype):
    m, h, widths = d["M"], d["H"], (d["Q"], d["KV"], d["KV"])
    leaves = [_randn(m, h, device=device, dtype=dtype)]
    leaves += [_randn(n, h, device=device, dtype=dtype, scale=h ** -0.5) for n in widths]
    grads = [_randn(m, n, device=device, dtype=dtype, grad=False) for n in widths]
    return Inputs(leaves, [], grads, lambda leaves, consts: (leaves[0], leaves[1:]))


def make_fused_moe(d, device, dtype):
    m, h, i, e = d["M"], d["H"], d["I"], d["E"]
    leaves = [_randn(m, h, device=device, dtype=dtype), _randn(m, e, device=device, dtype=dtype),  # hidden, router
              _randn(e, 2 * i, h, device=device, dtype=dtype, scale=h ** -0.5),
              _randn(e, h, i, device=device, dtype=dtype, scale=i ** -0.5)]
    return Inputs(leaves, [], [_randn(m, h, device=device, dtype=dtype, grad=False)],
                  lambda leaves, consts: (*leaves, d["K"]))


def make_multi_token_attention(d, device, dtype):
    b, c, n = d["B"], d["C"], d["L"]
    leaves = [_randn(b, c, n, n, device=device, dtype=dtype),
              _randn(c, c, 3, 3, device=device, dtype=dtype, scale=(9 * c) ** -0.5),
              _randn(c, device=device, dtype=dtype, scale=0.1)]
    return Inputs(leaves, [], [_randn(b, c, n, n, device=device, dtype=dtype, grad=False)], _positional)


def make_fused_linear_jsd(d, device, dtype):
    m, hs, ht, v = d["M"], d["Hs"], d["Ht"], d["V"]
    leaves = [_randn(m, hs, device=device, dtype=dtype), _randn(v, hs, device=device, dtype=dtype, scale=hs ** -0.5)]
    teacher = [_randn(m, ht, device=device, dtype=dtype, grad=False),
               _randn(v, ht, device=device, dtype=dtype, scale=ht ** -0.5, grad=False)]
    return Inputs(leaves, [*teacher, _targets(m, v, d.get("ignore_every", 0), device)], [None], _positional)


def _mv(d):
    return f"{d['M']}x{d['V']}"


def _dist_work(d, e):
    return {"fwd": 2 * d["M"] * d["V"] * e, "fwd_bwd": 3 * d["M"] * d["V"] * e}


_DIST = ({"M": 8192, "V": 128256},)
_DIST_TINY = {"M": 4, "V": 37, "ignore_every": 3}
_DIST_FORMULA = "fwd 2*M*V*e (read both distributions); fwd+bwd 3*M*V*e (one pass: + write the gradient)"
_ROWS_FORMULA = "fwd 2*M*N*e (read x, write y); fwd+bwd 5*M*N*e (+ read dy and x or y, write dx); parameters ignored"
_ROWS_TINY = {"M": 3, "N": 40}


def _rope_label(d):
    return f"B{d['B']} T{d['T']} Hq{d['Hq']} Hkv{d['Hkv']} D{d['D']}"


def _mrope_work(d, e):
    qk = d["B"] * d["T"] * d["D"] * (d["Hq"] + d["Hkv"])
    cs = 2 * d["B"] * d["T"] * d["D"]  # the selected entries of cos and sin, per sequence
    return {"fwd": (2 * qk + cs) * e, "fwd_bwd": (4 * qk + 2 * cs) * e}


def _llama4_rope_work(d, e):
    qk = d["B"] * d["T"] * d["D"] * (d["Hq"] + d["Hkv"])
    freqs = d["T"] * d["D"] * 4  # complex64 (1, T, D/2)
    return {"fwd": 2 * qk * e + freqs, "fwd_bwd": 4 * qk * e + 2 * freqs}


def _moe_work(d, e):
    pair = 6 * d["H"] * d["I"]  # gate_up and down products of one (token, expert) pair
    return {"fwd": pair * d["M"] * d["K"], "fwd_bwd": 3 * pair * d["M"] * d["K"]}


def _mta_work(d, e):
    maps = d["B"] * d["C"] * d["L"] ** 2
    return {"fwd": 2 * maps * e, "fwd_bwd": 5 * maps * e}


def _fljsd_work(d, e):
    mv = 2 * d["M"] * d["V"]
    return {"fwd": mv * (d["Hs"] + d["Ht"]), "fwd_bwd": mv * (3 * d["Hs"] + d["Ht"])}


_EXTRA_SPECS = (
    OpSpec("kl_div", "kl_div", {}, make_kl_div, eager_kl_div, _mv, "bytes", _DIST_FORMULA, _dist_work, _DIST, {},
           _DIST_TINY),
    OpSpec("jsd", "jsd", {}, make_jsd, eager_jsd, _mv, "bytes", _DIST_FORMULA + "; the teacher gets no gradient",
           _dist_work, _DIST, {}, _DIST_TINY),
    OpSpec("tvd", "tvd", {}, make_tvd, eager_tvd, _mv, "bytes", _DIST_FORMULA, _dist_work, _DIST, {}, _DIST_TINY),
    OpSpec("dyt", "dyt", {}, make_dyt, eager_dyt, _mn, "bytes", _ROWS_FORMULA, _norm_work(2, 5),
           (NORM_ANCHORS[0],), {}, _ROWS_TINY),
    OpSpec("relu_squared", "relu_squared", {}, make_rows, eager_relu_squared, _mn, "bytes", _ROWS_FORMULA,
           _norm_work(2, 5), ({"M": 16384, "N": 14336},), {}, _ROWS_TINY),
    OpSpec("softmax", "softmax", {}, make_rows, eager_softmax, _mn, "bytes", _ROWS_FORMULA, _norm_work(2, 5),
           (NORM_ANCHORS[0],), {"width": tuple({"M": 8192, "N": n} for n in (1024, 4096, 16384, 65536))},
           _ROWS_TINY),
    OpSpec("sparsemax", "sparsemax", {}, make_rows, eager_sparsemax, _mn, "bytes", _ROWS_FORMULA,
           _norm_work(2, 5), ({"M": 16384, "N": 4096},), {}, _ROWS_TINY),
    OpSpec("group_norm", "group_norm", {"eps": LN_EPS}, make_group_norm, eager_group_norm,
           lambda d: f"{d['N']}x{d['C']}x{d['S']} G{d['G']}", "bytes",
           "fwd 2*N*C*S*e (read x, write y); fwd+bwd 5*N*C*S*e (+ read dy, x, write dx); weight, bias ignored",
           lambda d, e: {"fwd": 2 * d["N"] * d["C"] * d["S"] * e, "fwd_bwd": 5 * d["N"] * d["C"] * d["S"] * e},
           ({"N": 16, "C": 512, "S": 4096, "G": 32}, {"N": 8, "C": 512, "S": 16384, "G": 32}), {},
           {"N": 2, "C": 6, "S": 5, "G": 3}),
    OpSpec("poly_norm", "poly_norm", {"eps": RMS_EPS}, make_poly_norm, eager_poly_norm, _mn, "bytes",
           _ROWS_FORMULA, _norm_work(2, 5), (NORM_ANCHORS[0],), {}, _ROWS_TINY),
    OpSpec("modulated_rms_norm", "modulated_rms_norm", {"eps": RMS_EPS}, make_modulated_rms_norm,
           eager_modulated_rms_norm, lambda d: f"{d['M']}x{d['N']} B{d['B']}", "bytes",
           _ROWS_FORMULA + " (weight, (B, N) scale and shift)", _norm_work(2, 5),
           ({"M": 32768, "N": 4096, "B": 8},), {}, {"M": 6, "N": 40, "B": 2}),
    OpSpec("mrope", "mrope", {}, make_mrope, eager_mrope, _rope_label, "bytes",
           "fwd 2*(q+k)*e + cos,sin; fwd+bwd 4*(q+k)*e + 2*(cos,sin) (q, k in elements; of cos and sin "
           "(3, B, T, D) only the B*T*D selected entries each)",
           _mrope_work, ({"B": 4, "T": 4096, "Hq": 28, "Hkv": 4, "D": 128},), {},
           {"B": 2, "T": 3, "Hq": 2, "Hkv": 1, "D": 16}),
    OpSpec("llama4_rope", "llama4_rope", {}, make_llama4_rope, eager_llama4_rope, _rope_label, "bytes",
           "fwd 2*(q+k)*e + freqs_cis; fwd+bwd 4*(q+k)*e + 2*freqs_cis (complex64 (1, T, D/2): 4*T*D bytes)",
           _llama4_rope_work, ({"B": 4, "T": 4096, "Hq": 40, "Hkv": 8, "D": 128},), {},
           {"B": 2, "T": 3, "Hq": 2, "Hkv": 1, "D": 8}),
    OpSpec("swiglu_gate_up", "glu", {}, make_swiglu_gate_up, eager_swiglu_gate_up,
           lambda d: f"{d['M']}x{2 * d['I']}", "bytes",
           "as SwiGLU, with gate and up one (M, 2I) tensor: fwd 3*M*I*e; fwd+bwd 8*M*I*e",
           _glu_work, ({"M": 16384, "I": 8192},), {}, {"M": 3, "I": 40}),
    OpSpec("gated_down_proj", "gated_down_proj", {}, make_gated_down_proj, eager_gated_down_proj,
           lambda d: f"{d['M']}x{d['I']}x{d['H']}", "flops",
           "fwd 2*M*I*H FLOPs (the down projection); fwd+bwd 6*M*I*H (+ dX, dW); the point is peak memory",
           lambda d, e: {"fwd": 2 * d["M"] * d["I"] * d["H"], "fwd_bwd": 6 * d["M"] * d["I"] * d["H"]},
           ({"M": 16384, "I": 8192, "H": 2048}, {"M": 16384, "I": 14336, "H": 4096}), {},
           {"M": 3, "I": 40, "H": 24}),
    OpSpec("linear_projections", "linear_projections", {}, make_linear_projections, eager_linear_projections,
           lambda d: f"{d['M']}x{d['H']} -> {d['Q']}+2x{d['KV']}", "flops",
           "fwd 2*M*H*(Q+2KV) FLOPs (the q, k, v products); fwd+bwd 6*M*H*(Q+2KV) (+ dX, dW); the point is "
           "the two input-gradient adds autograd runs and this op does not",
           lambda d, e: {"fwd": 2 * d["M"] * d["H"] * (d["Q"] + 2 * d["KV"]),
                         "fwd_bwd": 6 * d["M"] * d["H"] * (d["Q"] + 2 * d["KV"])},
           ({"M": 16384, "H": 2048, "Q": 2048, "KV": 1024},), {}, {"M": 5, "H": 24, "Q": 16, "KV": 8}),
    OpSpec("fused_moe", "fused_moe", {}, make_fused_moe, eager_fused_moe,
           lambda d: f"{d['M']} H{d['H']} I{d['I']} E{d['E']} top{d['K']}", "flops",
           "fwd 6*M*K*H*I FLOPs (gate_up and down products of each token's K experts); fwd+bwd 18*M*K*H*I",
           _moe_work, ({"M": 8192, "H": 2048, "I": 768, "E": 128, "K": 8},  # Qwen3-MoE 30B-A3B
                       {"M": 8192, "H": 4096, "I": 14336, "E": 8, "K": 2}), {},  # Mixtral 8x7B
           {"M": 6, "H": 16, "I": 8, "E": 4, "K": 2}),
    OpSpec("multi_token_attention", "multi_token_attention", {"padding": MTA_PADDING}, make_multi_token_attention,
           eager_multi_token_attention, lambda d: f"B{d['B']} C{d['C']} L{d['L']}", "bytes",
           "fwd 2*B*C*L*L*e (read scores, write out); fwd+bwd 5*B*C*L*L*e (+ read dout, scores, write dscores); "
           "whole maps, masked halves included; 3x3 convolution, C to C channels",
           _mta_work, ({"B": 2, "C": 16, "L": 2048},), {}, {"B": 1, "C": 2, "L": 5}),
    OpSpec("fused_linear_jsd", "fused_linear_jsd", {}, make_fused_linear_jsd, eager_fused_linear_jsd,
           lambda d: f"{d['M']}x{d['Hs']}/{d['Ht']}x{d['V']}", "flops",
           "fwd 2*M*V*(Hs+Ht) FLOPs (student and teacher logits); fwd+bwd 2*M*V*(3*Hs+Ht) (+ student dX, dW)",
           _fljsd_work, ({"M": 8192, "Hs": 2048, "Ht": 4096, "V": 128256},), {},
           {"M": 4, "Hs": 16, "Ht": 12, "V": 37, "ignore_every": 3}),
)
OPS.update((spec.name, spec) for spec in _EXTRA_SPECS)
EXTRA_OPS = tuple(spec.name for spec in _EXTRA_SPECS)

# Run order: the headline ops first, so a time limit cuts the least important.
DEFAULT_OPS = ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy",
               "fused_add_rms_norm", "layer_norm", "geglu")


def plan(ops=DEFAULT_OPS, quick=False) -> list:
    """(op, dims, tags) for every case: all ops' anchor shapes first, then the sweeps (not with quick).

    A shape that is both an anchor and a sweep point is run once, with every tag.
    """
    cases = {}
    for phase in ("anchor", "sweep"):
        for op in ops:
            spec = OPS[op]
            groups = {"anchor": spec.anchors} if phase == "anchor" else ({} if quick else spec.sweeps)
            for tag, shapes in groups.items():
                for dims in shapes:
                    key = (op, tuple(sorted(dims.items())))
                    cases.setdefault(key, (op, dict(dims), []))[2].append(tag)
    return list(cases.values())


# --- implementations ----------------------------------------------------------------------------------

# Options only our implementation takes: cross-entropy writes its gradient over the logits (zero extra
# memory), which is how the fused forward and the patched models call it.
OURS_ONLY_KWARGS = {"cross_entropy": {"in_place": True}}


def _ours(spec: OpSpec) -> Callable:
    if spec.module == "losses":
        return _loss_fn(spec.name)
    mod = importlib.import_module(f"liger_kernels.ops.{spec.module}")
    kwargs = {**spec.kwargs, **OURS_ONLY_KWARGS.get(spec.name, {})}

    def call(*args):  # looked up at call time, so a patched module attribute is what runs
        return getattr(mod, spec.name)(*args, **kwargs)

    return call


def liger_kernel_version() -> str | None:
    """Liger-Kernel's version if `import liger_kernel` works here, else None."""
    try:
        import liger_kernel.transformers.functional  # noqa: F401
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return None


def _liger(op: str) -> Callable | None:
    """Liger-Kernel's public functional API (liger_kernel.transformers.functional, 0.8.x signatures);
    None where it has no equivalent."""
    from liger_kernel.transformers import functional as lf
    from liger_kernel.transformers import llama4_rope as l4

    table = {
        # liger_rms_norm(X, W, eps, offset=0.0, casting_mode="llama", in_place=True)
        "rms_norm": lambda x, w: lf.liger_rms_norm(x, w, RMS_EPS),
        # liger_fused_add_rms_norm(X, R, W, eps, offset=0.0, casting_mode="llama", in_place=True)
        "fused_add_rms_norm": lambda x, r, w: lf.liger_fused_add_rms_norm(x, r, w, RMS_EPS),
        # liger_layer_norm(X, W, B, eps)
        "layer_norm": lambda x, w, b: lf.liger_layer_norm(x, w, b, LN_EPS),
        # liger_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None)
        "rope": lambda q, k, cos, sin: lf.liger_rope(q, k, cos, sin),
        "swiglu": lambda a, b: lf.liger_swiglu(a, b),
        "geglu": lambda a, b: lf.liger_geglu(a, b),  # tanh approximation
        # liger_cross_entropy(input, target, weight=None, ..., ignore_index=-100, reduction="mean", ...)
        "cross_entropy": lambda logits, t: lf.liger_cross_entropy(logits, t),
        # liger_fused_linear_cross_entropy(input, weight, target, bias=None, ...)
        "fused_linear_cross_entropy": lambda x, w, t: lf.liger_fused_linear_cross_entropy(x, w, t),
        # liger_kl_div(input, target, size_average=True, reduce=True, reduction="mean", log_target=False, eps)
        "kl_div": lambda x, t: lf.liger_kl_div(x, t, reduction="batchmean"),
        # liger_jsd(input, target, shift_labels=None, beta=0.5, ignore_index=-100): the input's gradient only
        "jsd": lambda x, y, label: lf.liger_jsd(x, y, label),
        # liger_tvd(input, target, shift_labels=None, reduction="mean", ignore_index=-100)
        "tvd": lambda p, q: lf.liger_tvd(p, q, reduction="batchmean"),
        "dyt": lambda x, alpha, w, b: lf.liger_dyt(x, alpha, w, b),  # liger_dyt(x, alpha, gamma, beta)
        "relu_squared": lambda x: lf.liger_relu_squared(x),
        "softmax": lambda x: lf.liger_softmax(x),  # the last dimension
        "sparsemax": lambda x: lf.liger_sparsemax(x),  # liger_sparsemax(input, dim=-1)
        # liger_group_norm(X, affine_scaling_weight, affine_shifting_bias, num_channels, num_groups, eps)
        "group_norm": lambda x, g, w, b: lf.liger_group_norm(x, w, b, x.shape[1], g, LN_EPS),
        "poly_norm": lambda x, w, b: lf.liger_poly_norm(x, w, b, RMS_EPS),  # (X, W, B, eps, in_place=True)
        # liger_qwen2vl_mrope(q, k, cos, sin, mrope_section, unsqueeze_dim=1)
        "mrope": lambda q, k, cos, sin, section: lf.liger_qwen2vl_mrope(q, k, cos, sin, section),
        # not in `functional`: liger_kernel.transformers.liger_llama4_text_rotary_pos_emb(xq, xk, freqs_cis)
        "llama4_rope": lambda q, k, freqs: l4.liger_llama4_text_rotary_pos_emb(q, k, freqs),
        # as Liger's Phi-3 MLP calls it: the chunks of gate_up (it makes them contiguous)
        "swiglu_gate_up": lambda gate_up: lf.liger_swiglu(*gate_up.chunk(2, dim=-1)),
        # liger_multi_token_attention(scores, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, sparse)
        "multi_token_attention": lambda s, w, b: lf.liger_multi_token_attention(s, w, b, padding=MTA_PADDING),
        # liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels=None,
        #                        jsd_beta=0.5, ignore_index=-100, temperature=1.0, accum_dtype=None)
        "fused_linear_jsd": lambda xs, ws, xt, wt, label: lf.liger_fused_linear_jsd(xs, ws, xt, wt, label),
    }
    if op in table:
        return table[op]
    return _liger_loss(op) if op in LOSS_FUNCTIONS else None


def _liger_loss(op: str) -> Callable:
    """Liger-Kernel's chunked losses (liger_kernel.chunked_loss, 0.8.x): policy only, default options."""
    import liger_kernel.chunked_loss as cl

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if op == "dpo_loss":
        f = cl.LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False)
        return lambda x, w, t: first(f(w, x, t))
    if op in ("orpo_loss", "cpo_loss", "simpo_loss"):
        cls = {"orpo_loss": cl.LigerFusedLinearORPOLoss, "cpo_loss": cl.LigerFusedLinearCPOLoss,
               "simpo_loss": cl.LigerFusedLinearSimPOLoss}[op]
        f = cls(beta=0.1)
        return lambda x, w, t: first(f(w, x, t))
    if op == "kto_loss":
        f = cl.LigerFusedLinearKTOLoss(beta=0.1, use_ref_model=False)
        return lambda x, w, t, labels: first(f(x, w, t, preference_labels=labels))
    if op == "grpo_loss":
        f = cl.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")
        return lambda x, w, t, adv: first(f(x, w, t, t != -100, adv))
    if op == "jsd_loss":
        f = cl.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)
        return lambda x, w, tx, tw, t: first(f(x.flatten(0, 1), w, tx.flatten(0, 1), tw, t.flatten()))
    if op == "cosine_loss":
        f = cl.LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)
        return lambda x, w, tx, tw, t: first(f(x.flatten(0, 1), w, tx.flatten(0, 1), tw, t.flatten()))
    raise KeyError(op)


def implementations(op: str, impls=IMPLS) -> dict:
    """name -> callable for the requested implementations that exist here (liger only when installed and
    where it has the op)."""
    spec = OPS[op]
    out = {}
    for impl in impls:
        if impl == "ours":
            out[impl] = _ours(spec)
        elif impl == "eager":
            out[impl] = spec.eager
        elif impl == "compile":
            out[impl] = torch.compile(spec.eager, dynamic=False)
        elif impl == "liger" and liger_kernel_version() is not None:
            fn = _liger(op)
            if fn is not None:  # Liger-Kernel has no such op: its column says n/a
                out[impl] = fn
    return out


# --- measuring ----------------------------------------------------------------------------------------

class CudaTimer:
    """Median times from CUDA events, L2 flushed before every timed run (as triton.testing.do_bench).

    `ms` is do_bench itself. `ms_after` times `fn(setup())` with `setup` untimed: the backward alone,
    after a fresh forward each time. (Repeating one backward with retain_graph=True would not do:
    torch.compile's backward refuses retain_graph when it donates buffers, and in-place kernels
    would keep rewriting their own saved inputs.) Each op runs at least `min_reps` times and for at
    least `min_rep_ms` milliseconds of timed work, except that `ms_after` stops after about
    `max_after_ms` of wall time (min_reps still run).
    """

    def __init__(self, min_rep_ms: float = 40.0, min_reps: int = 10, max_after_ms: float = 1000.0):
        # max_after_ms matters where the untimed forward dwarfs the backward (a fused loss computes
        # its gradients in the forward: its backward is only a scaling)
        self.min_rep_ms, self.min_reps, self.max_after_ms = min_rep_ms, min_reps, max_after_ms

    def _estimate(self, run) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        run(start, end)
        end.synchronize()
        return max(start.elapsed_time(end), 1e-3)

    def ms(self, fn, grad_to_none=None) -> float:
        from triton.testing import do_bench

        fn()

        def once(start, end):
            start.record()
            fn()
            end.record()

        estimate = self._estimate(once)
        rep = max(self.min_rep_ms, self.min_reps * estimate)
        warmup = max(10.0, 2 * estimate)
        return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))

    def ms_after(self, setup, fn, grad_to_none=None) -> float:
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # larger than the H200's L2

        def once(start, end):
            for t in grad_to_none or ():
                t.grad = None
            state = setup()
            flush.zero_()
            start.record()
            fn(state)
            end.record()

        fn(setup())
        torch.cuda.synchronize()
        wall = time.perf_counter()
        estimate = self._estimate(once)
        wall = (time.perf_counter() - wall) * 1e3
        n = max(self.min_reps, min(math.ceil(self.min_rep_ms / estimate), math.ceil(self.max_after_ms / wall)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            once(start, end)
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)

    def peak_bytes(self, fn) -> int:
        """Peak allocation while `fn` runs, beyond what was allocated before (the inputs)."""
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


class CpuTimer:
    """Wall-clock median on the CPU (tests, and machines without a GPU); memory is not measured."""

    def __init__(self, reps: int = 3):
        self.reps = reps

    def ms_after(self, setup, fn, grad_to_none=None) -> float:
        fn(setup())
        times = []
        for _ in range(self.reps):
            for t in grad_to_none or ():
                t.grad = None
            state = setup()
            start = time.perf_counter()
            fn(state)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def ms(self, fn, grad_to_none=None) -> float:
        return self.ms_after(lambda: None, lambda _: fn(), grad_to_none)

    def peak_bytes(self, fn):
        fn()
        return None


def warm_up_gpu(seconds: float) -> None:
    """Large matrix products until the clocks have ramped up."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()


def _copy_ms(timer, device, nbytes) -> float:
    src = torch.randn(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return timer.ms(lambda: dst.copy_(src))


def _matmul_ms(timer, device, n) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    return timer.ms(lambda: torch.mm(a, b, out=c))


def measure_ceilings(timer, device, copy_bytes: int = 4 << 30, matmul_n: int = 8192) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, on random data."""
    copy_ms = _copy_ms(timer, device, copy_bytes)
    mm_ms = _matmul_ms(timer, device, matmul_n)
    return {
        "copy_bytes_per_s": 2 * copy_bytes / (copy_ms * 1e-3),
        "matmul_flops_per_s": 2 * matmul_n ** 3 / (mm_ms * 1e-3),
        "copy_bytes": copy_bytes, "copy_ms": copy_ms, "matmul_n": matmul_n, "matmul_ms": mm_ms,
    }


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def rel_err(actual, expected) -> float:
    """max over outputs of ||a - b|| / ||b|| in float32 (NaN stays NaN)."""
    worst = 0.0
    for a, b in zip(_as_tuple(actual), _as_tuple(expected), strict=True):
        a, b = a.detach().float(), b.detach().to(a.device).float()
        err = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()
        worst = err if math.isnan(err) else max(worst, err)
        if math.isnan(worst):
            break
    return worst


def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


def measure(fn, inp: Inputs, timer, reference=None) -> dict:
    """Times (fwd, bwd, fwd_bwd), peak memory beyond the inputs, and the first output's error vs eager."""
    args, grads, leaves = inp.args(), inp.grads, inp.leaves

    def fwd():
        return fn(*args)

    def fwd_bwd():
        torch.autograd.backward(_as_tuple(fn(*args)), grads)

    # First call (torch.compile compiles here) on the untouched inputs: check it against eager.
    outs = _as_tuple(fwd())
    err = rel_err(outs, reference) if reference is not None else None
    torch.autograd.backward(outs, grads)
    del outs
    _clear_grads(leaves)
    peak = {"fwd": timer.peak_bytes(fwd), "fwd_bwd": timer.peak_bytes(fwd_bwd)}
    _clear_grads(leaves)
    ms = {"fwd": timer.ms(fwd),
          "bwd": timer.ms_after(lambda: _as_tuple(fwd()), lambda outs: torch.autograd.backward(outs, grads),
                                leaves),
          "fwd_bwd": timer.ms(fwd_bwd, leaves)}
    _clear_grads(leaves)
    return {"ms": ms, "peak_bytes": peak, "rel_err_vs_eager": err}


def _error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _free(device) -> None:
    """Return the last case's memory to the device, so a big case cannot fail on fragmentation."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_case(op: str, dims: dict, tags, impl_fns: dict, device, dtype, timer, ceilings, seed=0) -> list:
    spec = OPS[op]
    elt = torch.empty((), dtype=dtype).element_size()
    work = spec.work(dims, elt)
    ceiling = ceilings["copy_bytes_per_s" if spec.unit == "bytes" else "matmul_flops_per_s"]
    ideal = {m: w / ceiling * 1e3 for m, w in work.items()}
    reference = None
    try:  # eager's forward output: every implementation's first output is compared with it
        torch.manual_seed(seed)
        inp = spec.make(dims, device, dtype)
        with torch.no_grad():
            reference = tuple(t.detach() for t in _as_tuple(spec.eager(*inp.args())))
        del inp
    except Exception:
        reference = None  # eager itself failed (e.g. out of memory); its row records why
    _free(device)
    records = []
    for impl, fn in impl_fns.items():
        rec = {"op": op, "impl": impl, "label": spec.label(dims), "dims": dict(dims), "tags": list(tags),
               "work": work, "unit": spec.unit, "ideal_ms": ideal}
        start = time.perf_counter()
        try:
            torch.manual_seed(seed)
            rec.update(measure(fn, spec.make(dims, device, dtype), timer, reference))
            rec["frac_of_ceiling"] = {m: ideal[m] / rec["ms"][m] for m in ideal}
        except Exception as e:  # one failing implementation (OOM, compile error) must not stop the run
            rec["error"] = _error_text(e)
        _free(device)
        rec["seconds"] = time.perf_counter() - start  # wall time of this row, compilation included
        records.append(rec)
    return records


def environment(device, dtype) -> dict:
    import triton

    import liger_kernels

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "liger_kernels": liger_kernels.__version__,
        "liger_kernel": liger_kernel_version(), "dtype": str(dtype).replace("torch.", ""),
        "device": str(device), "git_commit": _git_commit(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sms=props.multi_processor_count, gpu_memory_gib=props.total_memory / 2 ** 30)
    else:
        env["gpu"] = None
    return env


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except Exception:
        return None


def run_bench(cases, impls, device, dtype, timer, ceilings, env, out_dir=None, time_limit=None, log=print) -> dict:
    """Run every case; write results.json after each one (a killed run keeps what it measured)."""
    ops_in_plan = list(dict.fromkeys(op for op, _, _ in cases))
    result = {
        "env": env, "ceilings": ceilings, "impls": list(impls),
        "ops": {op: {"unit": OPS[op].unit, "formula": OPS[op].formula} for op in ops_in_plan},
        "results": [], "skipped": [], "elapsed_s": 0.0,
    }
    # torch.compile(dynamic=False) compiles once per shape; keep it from falling back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    impl_fns = {op: implementations(op, impls) for op in ops_in_plan}
    start = time.perf_counter()
    for op, dims, tags in cases:
        if time_limit is not None and time.perf_counter() - start > time_limit:
            result["skipped"].append({"op": op, "label": OPS[op].label(dims), "why": "time limit"})
            continue
        t0 = time.perf_counter()
        records = run_case(op, dims, tags, impl_fns[op], device, dtype, timer, ceilings)
        result["results"].extend(records)
        result["elapsed_s"] = time.perf_counter() - start
        log(format_case(records) + f"   [{time.perf_counter() - t0:.1f} s]")
        if out_dir is not None:
            write_json(result, out_dir)
    return result


# --- output -------------------------------------------------------------------------------------------

def _fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _fmt_mib(b):
    return "-" if b is None else f"{b / 2 ** 20:.0f}"


def _fmt_pct(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def _fmt_err(v):
    return "-" if v is None else f"{v:.1e}"


def _ours_fwd_bwd(records):
    for r in records:
        if r["impl"] == "ours" and "ms" in r:
            return r["ms"]["fwd_bwd"]
    return None


TABLE_HEADER = (f"{'shape':<28} {'impl':<8} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'ideal':>7} "
                f"{'%ceil':>6} {'MiB f+b':>8} {'x ours':>7} {'err/eager':>9}")


def format_case(records) -> str:
    """Rows of one shape, one per implementation; `x ours` = its fwd+bwd time over ours."""
    ours = _ours_fwd_bwd(records)
    lines = []
    for i, r in enumerate(records):
        shape = f"{r['op']} {r['label']}" if i == 0 else ""
        if "error" in r:
            lines.append(f"{shape:<28} {r['impl']:<8} error: {r['error']}")
            continue
        ms, fb = r["ms"], r["ms"]["fwd_bwd"]
        ratio = f"{fb / ours:.2f}" if ours else "-"
        lines.append(
            f"{shape:<28} {r['impl']:<8} {_fmt_ms(ms['fwd']):>8} {_fmt_ms(ms['bwd']):>8} {_fmt_ms(fb):>8} "
            f"{_fmt_ms(r['ideal_ms']['fwd_bwd']):>7} {_fmt_pct(r['frac_of_ceiling']['fwd_bwd']):>6} "
            f"{_fmt_mib(r['peak_bytes']['fwd_bwd']):>8} {ratio:>7} {_fmt_err(r.get('rel_err_vs_eager')):>9}")
    return "\n".join(lines)


def _by_case(result, op):
    groups = {}
    for r in result["results"]:
        if r["op"] == op:
            groups.setdefault(r["label"], []).append(r)
    return groups


def format_ceilings(c) -> str:
    return (f"ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
            f"bf16 matmul {c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s ({c['matmul_n']}^3)")


def format_table(result) -> str:
    env = result["env"]
    out = [f"{env.get('gpu') or env['device']}  torch {env['torch']}  triton {env['triton']}  "
           f"dtype {env['dtype']}  liger-kernel {env.get('liger_kernel') or 'not installed'}",
           format_ceilings(result["ceilings"]), ""]
    for op, info in result["ops"].items():
        out.append(f"{op}: minimal {info['unit']}: {info['formula']}")
        out.append(TABLE_HEADER)
        out.extend(format_case(records) for records in _by_case(result, op).values())
        out.append("")
    for s in result.get("skipped", []):
        out.append(f"skipped {s['op']} {s['label']}: {s['why']}")
    return "\n".join(out)


def format_headline(result) -> str:
    """Markdown table of forward+backward at the anchor shapes: ms (+ peak MiB) per implementation."""
    impls = result["impls"]
    lines = ["| op | shape | ideal ms | " + " | ".join(impls) + " | ours % |",
             "|---|---|---|" + "---|" * len(impls) + "---|"]
    for op in result["ops"]:
        for label, records in _by_case(result, op).items():
            if "anchor" not in records[0]["tags"]:
                continue
            by_impl = {r["impl"]: r for r in records}
            cells = []
            for impl in impls:
                r = by_impl.get(impl)
                if r is None:
                    cells.append("n/a")
                elif "error" in r:
                    cells.append("error")
                else:
                    peak = r["peak_bytes"]["fwd_bwd"]
                    cells.append(_fmt_ms(r["ms"]["fwd_bwd"]) + ("" if peak is None else f" (+{_fmt_mib(peak)})"))
            ours = by_impl.get("ours", {})
            pct = _fmt_pct(ours["frac_of_ceiling"]["fwd_bwd"]) if "ms" in ours else "-"
            lines.append(f"| {op} | {label} | {_fmt_ms(records[0]['ideal_ms']['fwd_bwd'])} | "
                         + " | ".join(cells) + f" | {pct} |")
    return "\n".join(lines)


def format_markdown(result) -> str:
    """Headline table (anchor shapes, fwd+bwd) and one full table per op, for docs/ and the README."""
    env = result["env"]
    lines = [f"# Benchmarks: {env.get('gpu') or env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['dtype']}, liger-kernel "
             f"{env.get('liger_kernel') or 'not installed'}, {env['date_utc']}, commit {env.get('git_commit')}. "
             "Medians: `triton.testing.do_bench` (fwd, fwd+bwd); CUDA events around the backward alone "
             f"after an untimed forward (bwd); L2 flushed before each run. {format_ceilings(result['ceilings'])}.",
             "", "## Forward+backward at the anchor shapes", "",
             "ms (peak MiB beyond the inputs, gradients included). Ideal: minimal work over the measured ceiling; "
             "ours %: ideal / our time.", "", format_headline(result), ""]
    for op, info in result["ops"].items():
        lines += [f"## {op}", "", f"Minimal {info['unit']}: {info['formula']}.", "",
                  "| shape | impl | fwd ms | bwd ms | f+b ms | ideal / f+b | MiB fwd | MiB f+b | err vs eager |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, records in _by_case(result, op).items():
            for r in records:
                if "error" in r:
                    lines.append(f"| {label} | {r['impl']} | error: {r['error'].replace('|', '/')} | | | | | | |")
                    continue
                ms, pk = r["ms"], r["peak_bytes"]
                lines.append(f"| {label} | {r['impl']} | {_fmt_ms(ms['fwd'])} | {_fmt_ms(ms['bwd'])} | "
                             f"{_fmt_ms(ms['fwd_bwd'])} | {_fmt_pct(r['frac_of_ceiling']['fwd_bwd'])} | "
                             f"{_fmt_mib(pk['fwd'])} | {_fmt_mib(pk['fwd_bwd'])} | "
                             f"{_fmt_err(r.get('rel_err_vs_eager'))} |")
        lines.append("")
    return "\n".join(lines)


IMPL_STYLE = {"ours": ("C0", 2.5), "eager": ("C1", 1.2), "compile": ("C2", 1.2), "liger": ("C3", 1.2)}


def plot(result, path, ops=None) -> None:
    """Forward+backward time vs minimal work, one panel per op, one line per implementation and sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(ops or result["ops"])
    cols = min(len(ops), 4)
    rows = math.ceil(len(ops) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        unit = result["ops"][op]["unit"]
        scale, xlabel = (1e9, "minimal traffic, GB") if unit == "bytes" else (1e12, "work, TFLOP")
        records = [r for r in result["results"] if r["op"] == op and "ms" in r]
        # one line per sweep; anchor shapes outside every sweep form a group of their own
        groups = sorted({t for r in records for t in r["tags"] if t != "anchor"})
        if any(r["tags"] == ["anchor"] for r in records):
            groups.append("anchor")

        for gi, group in enumerate(groups):
            style = ("-", "--", ":", "-.")[gi % 4]
            members = [r for r in records if (r["tags"] == ["anchor"] if group == "anchor" else group in r["tags"])]
            for impl, (color, width) in IMPL_STYLE.items():
                pts = sorted((r["work"]["fwd_bwd"] / scale, r["ms"]["fwd_bwd"]) for r in members if r["impl"] == impl)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=color, lw=width, label=f"{impl} ({group})")
            ideal = sorted({(r["work"]["fwd_bwd"] / scale, r["ideal_ms"]["fwd_bwd"]) for r in members})
            ax.plot(*zip(*ideal), style, color="k", lw=0.8, label=f"ideal ({group})")
        ax.set(title=op, xlabel=xlabel, ylabel="fwd+bwd ms", xscale="log", yscale="log")
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    env = result["env"]
    fig.suptitle(f"{env.get('gpu') or env['device']}, {env['dtype']}, torch {env['torch']}, "
                 f"triton {env['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result, out_dir) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def write_outputs(result, out_dir, plots: str = "both") -> list:
    """results.json, results.md and the plots (per op: <op>.png; combined: bench.png)."""
    out_dir = Path(out_dir)
    written = [write_json(result, out_dir), out_dir / "results.md"]
    written[1].write_text(format_markdown(result))
    ops = [op for op in result["ops"] if any(r["op"] == op and "ms" in r for r in result["results"])]
    if ops and plots in ("both", "combined"):
        written.append(out_dir / "bench.png")
        plot(result, written[-1], ops)
    if ops and plots in ("both", "per-op"):
        for op in ops:
            written.append(out_dir / f"{op}.png")
            plot(result, written[-1], [op])
    return written


def bench_main(args, log=print) -> int:
    """`liger-plugins bench` (args from liger_plugins.cli)."""
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        log(format_table(result))
    else:
        if not torch.cuda.is_available():
            log("bench needs a CUDA GPU (use `liger-plugins selfcheck` on the CPU)")
            return 2
        device, dtype = "cuda", DTYPES[args.dtype]
        cases = plan(args.ops, quick=args.quick)
        env = environment(device, dtype)
        log(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  liger-kernel "
            f"{env['liger_kernel'] or 'not installed'}; {len(cases)} shapes, implementations {','.join(args.impls)}")
        warm_up_gpu(args.warmup)
        timer = CudaTimer()
        ceilings = measure_ceilings(timer, device)
        log(format_ceilings(ceilings))
        log(TABLE_HEADER)
        result = run_bench(cases, args.impls, device, dtype, timer, ceilings, env, args.out,
                           args.time_limit, log)
        # the rows above are the full table; end with the headline (a log's tail is what gets read)
        log("\n" + format_headline(result))
        for s in result["skipped"]:
            log(f"skipped {s['op']} {s['label']}: {s['why']}")
        log(f"total {result['elapsed_s']:.0f} s")
    for path in write_outputs(result, args.out, args.plots):
        log(f"wrote {path}")
    return 0


# --- selfcheck ----------------------------------------------------------------------------------------

SELFCHECK_TOL = {torch.float32: 5e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # ||err|| / ||ref||


def selfcheck(ops=DEFAULT_OPS, dtypes=(torch.float32, torch.bfloat16), device=None, seed=0) -> list:
    """Each op (forward and every gradient) on small random inputs vs its torch reference in float64.

    Outputs are poisoned with NaN (unwritten elements fail). Returns one row per (op, dtype).
    """
    from liger_kernels import _utils

    device = device or ("cuda" if torch.cuda.is_available() and not _utils.INTERPRET else "cpu")
    rows = []
    with _utils.poisoned_outputs():
        for op in ops:
            for dtype in dtypes:
                rows.append(_selfcheck_one(op, dtype, device, seed, _utils))
    return rows


def _selfcheck_one(op, dtype, device, seed, _utils) -> dict:
    spec = OPS[op]
    row = {"op": op, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
           "path": ("triton interpreter" if _utils.INTERPRET else "triton") if _utils.use_triton(
               torch.empty(0, device=device)) else "torch reference",
           "tol": SELFCHECK_TOL[dtype]}
    try:
        mod = importlib.import_module(f"liger_kernels.ops.{spec.module}")
        torch.manual_seed(seed)
        inp = spec.make(spec.tiny, device, dtype)
        ref = inp.float64_cpu()
        out = _as_tuple(getattr(mod, op)(*inp.args(), **spec.kwargs))
        torch.autograd.backward(out, inp.grads)
        expected = _as_tuple(getattr(mod, f"{op}_reference")(*ref.args(), **spec.kwargs))
        torch.autograd.backward(expected, ref.grads)
        row["out_err"] = rel_err(out, expected)
        grad_errs = [rel_err(a.grad if a.grad is not None else torch.full_like(a, math.nan), b.grad)
                     for a, b in zip(inp.leaves, ref.leaves)]
        row["grad_err"] = max(grad_errs, key=lambda e: math.inf if math.isnan(e) else e)
        row["ok"] = row["out_err"] <= row["tol"] and row["grad_err"] <= row["tol"]  # False for NaN
    except Exception as e:
        row.update(ok=False, error=_error_text(e))
    return row


def format_selfcheck(rows) -> str:
    lines = [f"{'op':<28} {'dtype':<9} {'path':<20} {'out err':>9} {'grad err':>9} {'tol':>8}  result"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:<28} {r['dtype']:<9} {r['path']:<20} {'':>9} {'':>9} {r['tol']:>8.0e}  "
                         f"FAIL {r['error']}")
        else:
            lines.append(f"{r['op']:<28} {r['dtype']:<9} {r['path']:<20} {r['out_err']:>9.1e} "
                         f"{r['grad_err']:>9.1e} {r['tol']:>8.0e}  {'ok' if r['ok'] else 'FAIL'}")
    failed = sum(not r["ok"] for r in rows)
    lines.append(f"{len(rows) - failed} passed, {failed} failed")
    return "\n".join(lines)
