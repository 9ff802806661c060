"""Replacement forwards for the modules named by the traits: norms, gated MLPs, MoE expert gates
(or whole experts), the rotary functions, and the causal-LM loss function. Each is built by a `make_*`
factory from the traits entry and the original it replaces, and is marked with `__liger_original__` so
that patching can tell its own functions apart (idempotence) and restore the original.

They only rebind computation: weights are read from the module at call time (`self.weight`,
`self.gate_proj`...), nothing is created or replaced, so sharding wrappers and PEFT adapters that
replace sub-modules (LoRA on gate_proj) keep working.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
from torch import nn

from liger_kernels import functional as LF
from liger_kernels._utils import SUPPORTED_FLOAT_DTYPES
from liger_plugins.patching.registry import ArchitectureTraits, MLPSpec, NormSpec


def mark(fn, original, name: str):
    """Tag `fn` as a liger replacement of `original`."""
    fn.__liger_original__ = original
    fn.__name__ = name
    fn.__qualname__ = f"liger.{name}"
    return fn


def is_liger(fn) -> bool:
    return hasattr(getattr(fn, "__func__", fn), "__liger_original__")


def norm_eps(module: nn.Module) -> float:
    """HF norms keep eps as `variance_epsilon` (Llama family) or `eps` (Gemma family)."""
    eps = getattr(module, "variance_epsilon", None)
    return module.eps if eps is None else eps


def make_rms_norm_forward(spec: NormSpec, original):
    def forward(self, hidden_states):
        weight = getattr(self, "weight", None)
        # per-head weight, or none (Gemma 4's with_scale=False): not this kernel's layout
        if weight is None or weight.dim() != 1:
            return original(self, hidden_states)
        return LF.rms_norm(hidden_states, weight, norm_eps(self), spec.offset, spec.casting_mode, spec.in_place)

    return mark(forward, original, "rms_norm_forward")


def make_layer_norm_forward(original, offset: float = 0.0):
    """LayerNorm with weight `self.weight + offset` (Nemotron's LayerNorm1P: offset 1, added as it does)."""

    def forward(self, hidden_states):
        if self.weight.dim() != 1:  # Cohere's per-head q/k norms have a (heads, head_dim) weight
            return original(self, hidden_states)
        weight = self.weight + offset if offset else self.weight
        return LF.layer_norm(hidden_states, weight, getattr(self, "bias", None), norm_eps(self))

    return mark(forward, original, "layer_norm_forward")


def gated_activation(act) -> str | None:
    """The kernels' name for an activation module ("silu", "gelu_tanh", "gelu"), or None if none fits."""
    name = type(act).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation"):
        return "gelu_tanh"
    if name == "GELUActivation":  # exact (erf) gelu
        return "gelu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return None


def gated_kernel_for(activation: str):
    """The fused `act(gate) * up` kernel for a kernel activation name."""
    return {"silu": LF.swiglu, "gelu_tanh": LF.geglu, "gelu": _geglu_erf}[activation]


def gated_kernel(act):
    """The fused `act(gate) * up` kernel for an activation module, or None if there is none."""
    activation = gated_activation(act)
    return None if activation is None else gated_kernel_for(activation)


def _geglu_erf(a, b):
    return LF.geglu(a, b, approximate="none")


def _hooked(module: nn.Module) -> bool:
    """Forward hooks or an accelerate hook: calling the module does more than its forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _weight_readable(module: nn.Module) -> bool:
    """No hooks (accelerate offload, ZeRO-3 gathering, user hooks) and a full local `weight` (not a
    ZeRO-3 partition or a sharded DTensor): a forward may read the weight instead of calling the module."""
    if _hooked(module):
        return False
    weight = getattr(module, "weight", None)
    return type(weight) in (nn.Parameter, torch.Tensor) and not hasattr(weight, "ds_id")


def plain_linear(module: nn.Module) -> bool:
    """True if calling `module(x)` is exactly `F.linear(x, module.weight, module.bias)` and nothing else:
    a plain nn.Linear (not a PEFT/quantized layer) whose weight may be read directly."""
    return type(module) is nn.Linear and _weight_readable(module)


def _down_projection(self, gate, up, activation, residual):
    """down_proj(act(gate) * up) (+ residual): without saving act(gate) * up, and with the residual
    summed in the product, when down_proj is a plain Linear."""
    down = self.down_proj
    if plain_linear(down):
        return LF.gated_down_proj(gate, up, down.weight, down.bias, activation, residual)
    return _plus(residual, down(gated_kernel_for(activation)(gate, up)))


def _plus(residual, out):
    return out if residual is None else residual + out


def make_mlp_forward(spec: MLPSpec, original):
    """The gated MLP on the fused kernels. `residual` (keyword, passed only by our decoder layer
    forward, see `mlp_takes_residual`): returns residual + mlp(x), the sum in down_proj's product."""
    if spec.layout == "split":

        def forward(self, x, residual=None):
            activation = gated_activation(getattr(self, spec.act_attr))
            if activation is None:
                return _plus(residual, original(self, x))
            gate, up, down = self.gate_proj, self.up_proj, self.down_proj
            if all(plain_linear(m) and m.bias is None for m in (gate, up, down)):  # the whole MLP, one op
                return LF.gated_mlp(x, gate.weight, up.weight, down.weight, activation, residual)
            return _down_projection(self, gate(x), up(x), activation, residual)

    else:  # fused gate_up_proj, gate first (Phi3, GLM4)

        def forward(self, x, residual=None):
            activation = gated_activation(getattr(self, spec.act_attr))
            if activation is None:
                return _plus(residual, original(self, x))
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return _down_projection(self, gate, up, activation, residual)

    return mark(forward, original, "gated_mlp_forward")


def mlp_takes_residual(mlp: nn.Module) -> bool:
    """True if `mlp(x, residual=r)` is our gated MLP forward and reaches it without hooks (which would
    see the extra keyword)."""
    forward = getattr(mlp.forward, "__func__", mlp.forward)
    return is_liger(forward) and forward.__name__ == "gated_mlp_forward" and not _hooked(mlp)


# The statements of the pre-norm decoder layer forward that make_decoder_layer_forward re-implements
# (None: the attention call, checked separately). Comments, docstrings and decorators do not count.
_PRENORM_LAYER = (
    "residual = hidden_states",
    "hidden_states = self.input_layernorm(hidden_states)",
    None,
    "hidden_states = residual + hidden_states",
    "residual = hidden_states",
    "hidden_states = self.post_attention_layernorm(hidden_states)",
    "hidden_states = self.mlp(hidden_states)",
    "hidden_states = residual + hidden_states",
    "return hidden_states",
)


def prenorm_layer_mismatch(cls: type) -> str | None:
    """Why `cls.forward` is not the plain pre-norm layer (so replacing it would change what it computes),
    or None. The attention call must be `hidden_states, _ = self.self_attn(hidden_states=hidden_states,
    name=name, ..., **kwargs)` passing every other parameter of the forward by its own name: then calling
    the attention with the layer's keyword arguments is the same call."""
    return _prenorm_forward_mismatch(cls.forward)


def _parse_function(function):
    """(FunctionDef of the function's source, its file, its first line), or None without a source."""
    try:
        lines, first_line = inspect.getsourcelines(function)
        func = ast.parse(textwrap.dedent("".join(lines))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    return func, inspect.getsourcefile(function) or "<unknown>", first_line


@functools.lru_cache(maxsize=None)
def _prenorm_forward_mismatch(forward) -> str | None:
    """prenorm_layer_mismatch of one forward function, parsed once (an instance patch asks per layer)."""
    parsed = _parse_function(inspect.unwrap(forward))
    if parsed is None:
        return "its forward's source is not available to check"
    func = parsed[0]
    body = [st for st in func.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
    if len(body) != len(_PRENORM_LAYER):
        return f"its forward has {len(body)} statements, not the {len(_PRENORM_LAYER)} of a plain pre-norm layer"
    for statement, expected in zip(body, _PRENORM_LAYER):
        if expected is not None and ast.unparse(statement) != expected:
            return f"its forward runs {ast.unparse(statement)!r} where a plain pre-norm layer runs {expected!r}"
    attention, args = body[2], func.args
    call = attention.value if isinstance(attention, ast.Assign) else None
    passes_through = (
        isinstance(call, ast.Call)
        and ast.unparse(attention.targets[0]) in ("hidden_states, _", "(hidden_states, _)")
        and ast.unparse(call.func) == "self.self_attn"
        and not call.args
        and [a.arg for a in args.args[:2]] == ["self", "hidden_states"]
        and args.vararg is None
        and args.kwarg is not None
        and all(isinstance(k.value, ast.Name) and k.value.id == (k.arg or args.kwarg.arg) for k in call.keywords)
        and {k.arg for k in call.keywords} == {a.arg for a in args.args[2:] + args.kwonlyargs} | {"hidden_states", None}
    )
    if not passes_through:
        return f"its attention call {ast.unparse(attention)!r} does not pass the layer's arguments through unchanged"
    return None


def _checkpoints_in_forward() -> bool:
    """Whether transformers checkpoints a GradientCheckpointingLayer inside its class's `forward` (newer
    versions wrap it when the class is created) rather than in `__call__` (5.17)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    return "__call__" not in GradientCheckpointingLayer.__dict__


_CHECKPOINTS_IN_FORWARD = _checkpoints_in_forward()
# The name of the wrapper transformers (after 5.17) installs as a GradientCheckpointingLayer's forward.
_CHECKPOINT_WRAPPER = "forward_with_checkpointing"


def _is_checkpoint_wrapper(fn) -> bool:
    return getattr(getattr(fn, "__code__", None), "co_name", None) == _CHECKPOINT_WRAPPER


def _without_checkpoint_wrappers(fn):
    """The layer forward inside transformers' checkpointing wrappers (they keep it as `__wrapped__`)."""
    while _is_checkpoint_wrapper(fn):
        fn = fn.__wrapped__
    return fn


def _an_outer_wrapper_checkpoints(layer: nn.Module, fn) -> bool:
    """Whether a transformers checkpointing wrapper outside `fn` checkpoints this call: `fn` is installed
    on a class of the layer's MRO but the layer's own class forward is a wrapper, made for a subclass
    (FSDP2's `FSDP<Layer>`, or a user's subclass calling super().forward()). That wrapper, being
    `type(layer).forward`, checkpoints. Installed on the instance, or the class forward itself, `fn` is
    the outermost forward and checkpoints the call itself."""
    outer = type(layer).forward
    if outer is fn or not _is_checkpoint_wrapper(outer):
        return False
    return any(cls.__dict__.get("forward") is fn for cls in type(layer).__mro__)


def _checkpoint_layer(layer: nn.Module, body, hidden_states, args, kwargs):
    """What transformers' wrapper does for a checkpointed layer call: no cache writes (the recompute
    would repeat them), then `body` through the layer's checkpointing function."""
    kwargs = dict(kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not getattr(layer, "_can_checkpoint_with_cache", False):
        for name in ("cache", "layer_past"):
            if kwargs.get(name) is not None:
                kwargs[name] = None
    return layer._gradient_checkpointing_func(functools.partial(body, layer, **kwargs), hidden_states, *args)


def make_decoder_layer_forward(traits: ArchitectureTraits, original):
    """The pre-norm decoder layer with its two residual joins in the norms' kernels: the layer input
    goes through `rms_norm_with_residual` (its two gradients added in the norm's backward kernel) and
    `residual + attention` with post_attention_layernorm is one fused add + RMSNorm (one kernel each
    way); `residual + mlp` is summed in down_proj's product when the MLP is ours. The same values as
    the layer's forward (each sum rounded once); three bf16 adds and two gradient adds fewer.

    Gradient checkpointing: transformers after 5.17 checkpoints inside the class's forward, in a wrapper
    that checkpoints only while it is `type(layer).forward`. Installed on the class, or on an instance
    whose class FSDP2 then replaces, this forward is not that wrapper and the original's wrapper would not
    checkpoint (all activations kept, silently). So this forward checkpoints the layer itself, as the
    wrapper would, unless a subclass's wrapper outside it does (`_an_outer_wrapper_checkpoints`)."""
    specs = {traits.cls(name): spec for name, spec in traits.norms.items()}
    layer_forward = _without_checkpoint_wrappers(original)

    def fusable(norm):
        """The norm's NormSpec if the kernel may compute it from its weight, else None."""
        spec = specs.get(type(norm))
        own_forward = norm.__dict__.get("forward")
        if spec is None or not _weight_readable(norm) or norm.weight.dim() != 1:
            return None
        return None if own_forward is not None and not is_liger(own_forward) else spec

    def fused_layer(self, hidden_states, *args, **kwargs):
        first, second = self.input_layernorm, self.post_attention_layernorm
        first_spec, second_spec = fusable(first), fusable(second)
        if args or second_spec is None:
            return layer_forward(self, hidden_states, *args, **kwargs)
        if first_spec is None:
            residual, normed = hidden_states, first(hidden_states)
        else:
            normed, residual = LF.rms_norm_with_residual(
                hidden_states, first.weight, norm_eps(first), first_spec.offset, first_spec.casting_mode,
                first_spec.in_place,
            )
        hidden_states, _ = self.self_attn(hidden_states=normed, **kwargs)
        hidden_states, residual = LF.fused_add_rms_norm(
            hidden_states, residual, second.weight, norm_eps(second), second_spec.offset,
            second_spec.casting_mode, second_spec.in_place,
        )
        if mlp_takes_residual(self.mlp):  # residual + mlp in down_proj's product
            return self.mlp(hidden_states, residual=residual)
        return residual + self.mlp(hidden_states)

    def forward(self, hidden_states, *args, **kwargs):
        if (_CHECKPOINTS_IN_FORWARD and getattr(self, "gradient_checkpointing", False) and self.training
                and torch.is_grad_enabled() and not _an_outer_wrapper_checkpoints(self, forward)):
            return _checkpoint_layer(self, fused_layer, hidden_states, args, kwargs)
        return fused_layer(self, hidden_states, *args, **kwargs)

    return mark(forward, original, "prenorm_decoder_layer_forward")


# The attention's input projections, each called as `self.<name>(hidden_states)` in its forward.
_QKV = ("q_proj", "k_proj", "v_proj")


def attention_projections(self, hidden_states):
    """(self.q_proj(h), self.k_proj(h), self.v_proj(h)): one op, the three input gradients summed in
    the products, when all three are plain Linears (else each module is called, as the original does)."""
    modules = [getattr(self, name) for name in _QKV]
    if hidden_states.dtype in SUPPORTED_FLOAT_DTYPES and all(plain_linear(m) for m in modules):
        return LF.linear_projections(hidden_states, [m.weight for m in modules], [m.bias for m in modules])
    return tuple(m(hidden_states) for m in modules)


def attention_projections_mismatch(cls: type) -> str | None:
    """Why `cls.forward` cannot have its q/k/v projection calls replaced by `attention_projections`, or None."""
    rewritten = _rewrite_attention_forward(cls.forward)
    return rewritten if isinstance(rewritten, str) else None


@functools.lru_cache(maxsize=None)
def _rewrite_attention_forward(forward):
    """The attention forward's source with its three calls `self.q_proj(hidden_states)`, ... replaced by
    names bound one statement earlier by `attention_projections(self, hidden_states)`, compiled as a
    factory `_liger_make(attention_projections) -> forward` (decorators kept); or why it cannot be.
    Everything else (views, q/k norms, rotary, cache, the attention call) stays the original's code,
    so every attention whose forward projects `hidden_states` this way is covered, whatever follows."""
    function = inspect.unwrap(forward)
    if not inspect.isfunction(function):
        return "its forward is not a plain function"
    parsed = _parse_function(function)
    if parsed is None:
        return "its forward's source is not available to rewrite"
    func, filename, first_line = parsed
    if not isinstance(func, ast.FunctionDef) or [a.arg for a in func.args.args[:2]] != ["self", "hidden_states"]:
        return "its forward does not take (self, hidden_states, ...)"
    if function.__code__.co_freevars or any(isinstance(n, ast.Name) and n.id == "super" for n in ast.walk(func)):
        return "its forward uses super() or a closure"
    if any(isinstance(n, ast.Name) and n.id == "hidden_states" and not isinstance(n.ctx, ast.Load)
           for n in ast.walk(func)):
        return "its forward reassigns hidden_states"
    calls = {}
    for n in ast.walk(func):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in _QKV
                and isinstance(n.func.value, ast.Name) and n.func.value.id == "self"):
            if n.func.attr in calls or ast.unparse(n) != f"self.{n.func.attr}(hidden_states)":
                return f"its forward calls self.{n.func.attr} other than once as self.{n.func.attr}(hidden_states)"
            calls[n.func.attr] = n
    if len(calls) != len(_QKV):
        return f"its forward does not call all of {', '.join(_QKV)}"
    # the top-level statements holding the calls: plain statements (not inside a block, which might not
    # run them); the joint call goes right before the first of them
    holders = [i for i, st in enumerate(func.body) for n in ast.walk(st) if any(n is c for c in calls.values())]
    if any(not isinstance(func.body[i], (ast.Assign, ast.AnnAssign, ast.Expr)) for i in holders):
        return "its forward calls the projections inside a block"
    first = min(holders)
    names = {name: f"_liger_{name}" for name in _QKV}

    class Replace(ast.NodeTransformer):
        def visit_Call(self, node):
            for name, call in calls.items():
                if node is call:
                    return ast.copy_location(ast.Name(names[name], ast.Load()), node)
            return self.generic_visit(node)

    func = Replace().visit(func)
    joint = ast.parse(f"{', '.join(names.values())} = _liger_attention_projections(self, hidden_states)").body[0]
    func.body.insert(first, ast.copy_location(joint, func.body[first]))
    factory = ast.parse("def _liger_make(_liger_attention_projections):\n    pass").body[0]
    factory.body = [func, ast.Return(ast.Name(func.name, ast.Load()))]
    module = ast.Module([factory], type_ignores=[])
    ast.fix_missing_locations(module)
    ast.increment_lineno(module, first_line - 1)  # tracebacks point into the original file
    return compile(module, filename, "exec")


def make_attention_forward(original):
    """The attention forward with its q/k/v projections as one op (`attention_projections`), the rest
    its own code, run in its own module's namespace (patched rotary functions included)."""
    code = _rewrite_attention_forward(original)
    namespace = {}
    exec(code, inspect.unwrap(original).__globals__, namespace)  # defines _liger_make only in namespace
    forward = namespace["_liger_make"](attention_projections)
    return mark(forward, original, "attention_forward")


def make_apply_gate(original):
    """MoE experts' `_apply_gate(gate_up_out)`: `act(gate) * up` on the halves, fused."""

    def _apply_gate(self, gate_up_out):
        kernel = gated_kernel(self.act_fn)
        if kernel is None:
            return original(self, gate_up_out)
        gate, up = gate_up_out.chunk(2, dim=-1)
        return kernel(gate, up)

    return mark(_apply_gate, original, "experts_apply_gate")


def fused_experts_mismatch(module: nn.Module) -> str | None:
    """Why the fused MoE kernel does not compute `module`'s experts forward, or None if it does: SiLU
    gate, [gate; up] concatenated (E, 2I, H) `gate_up_proj` and (E, H, I) `down_proj` parameters,
    no bias, no post-expert norm (the flags transformers' `use_experts_implementation` sets), full
    local weights (not a sharded DTensor)."""
    if gated_activation(getattr(module, "act_fn", None)) != "silu":
        return f"activation {type(getattr(module, 'act_fn', None)).__name__} (the kernel is SiLU-gated)"
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
              "has_post_expert_norm": False}
    odd = [f"{name}={getattr(module, name)}" for name, default in layout.items()
           if getattr(module, name, default) != default]
    if odd:
        return f"expert layout {', '.join(odd)}"
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if type(gate_up) is not nn.Parameter or type(down) is not nn.Parameter:
        return "gate_up_proj / down_proj are not plain parameters"
    if gate_up.dim() != 3 or gate_up.shape[1] % 2:
        return f"gate_up_proj {tuple(gate_up.shape)} is not (E, 2I, H)"
    n_experts, two_i, hidden = gate_up.shape
    if tuple(down.shape) != (n_experts, hidden, two_i // 2):
        return f"down_proj {tuple(down.shape)} is not (E, H, I) = {(n_experts, hidden, two_i // 2)}"
    return None


def make_experts_forward(original):
    """MoE `*Experts.forward(hidden_states, top_k_index, top_k_weights)` on the fused MoE kernel
    (`fused_moe_experts`: grouped GEMMs over the tokens sorted by expert, instead of a Python loop
    over experts). Anything the kernel does not compute -- another layout or activation, weights of
    another dtype than the hidden states (autocast) -- runs the original (transformers' dispatcher
    to its `experts_implementation`)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        dtype = hidden_states.dtype
        if (fused_experts_mismatch(self) is not None or hidden_states.dim() != 2
                or self.gate_up_proj.dtype != dtype or self.down_proj.dtype != dtype):
            return original(self, hidden_states, top_k_index, top_k_weights)
        return LF.fused_moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)

    return mark(forward, original, "fused_experts_forward")


def make_rotary(original):
    """Module-level `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` on the rope kernel.

    A rotary dimension smaller than the head (Phi3's partial_rotary_factor) rotates the leading
    channels and passes the rest through, as Phi3's own function does. Pixtral's call, (T, D) tables
    with unsqueeze_dim=0, is the same rotation with the tables broadcast over the batch.
    """

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if cos.dim() == 2 and unsqueeze_dim == 0 and q.dim() == 4:
            # Pixtral: (T, D) tables unsqueezed to (1, T, D) against (B, H, T, D) q/k: the same
            # broadcast as (1, T, D) tables with unsqueeze_dim=1
            cos, sin, unsqueeze_dim = cos[None], sin[None], 1
        rot = cos.shape[-1]
        if cos.dim() != 3 or rot > q.shape[-1] or rot % 2:
            return original(q, k, cos, sin, unsqueeze_dim)
        if rot == q.shape[-1]:
            return LF.rope(q, k, cos, sin, unsqueeze_dim)
        q_rot, k_rot = LF.rope(q[..., :rot], k[..., :rot], cos, sin, unsqueeze_dim)
        return torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)

    return mark(apply_rotary_pos_emb, original, "apply_rotary_pos_emb")


def make_mrope(original):
    """Module-level `apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1)`
    (Qwen2-VL / Qwen2.5-VL in transformers 5.1x) on the M-RoPE kernel; cos/sin (3, B, T, head_dim)."""

    def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
        dim = q.shape[-1]
        if cos.dim() != 4 or cos.shape[0] != 3 or cos.shape[-1] != dim or 2 * sum(mrope_section) != dim:
            return original(q, k, cos, sin, mrope_section, unsqueeze_dim)
        return LF.mrope(q, k, cos, sin, mrope_section, unsqueeze_dim)

    return mark(apply_multimodal_rotary_pos_emb, original, "apply_multimodal_rotary_pos_emb")


def make_llama4_rope(original):
    """Llama 4's module-level `apply_rotary_emb(xq, xk, freqs_cis)` (complex product, q/k as
    (B, T, H, D), freqs_cis complex64 (B, T, D/2)) on the llama4_rope kernel."""

    def apply_rotary_emb(xq, xk, freqs_cis):
        if freqs_cis.dtype != torch.complex64 or xq.dim() != 4 or freqs_cis.dim() != 3:
            return original(xq, xk, freqs_cis)
        return LF.llama4_rope(xq, xk, freqs_cis)

    return mark(apply_rotary_emb, original, "apply_rotary_emb")


ROTARY_FACTORIES = {"rope": make_rotary, "mrope": make_mrope, "llama4_rope": make_llama4_rope}


_CAUSAL_MASK_DECISION_ARGUMENTS = ("padding_mask", "q_length", "kv_length", "q_offset", "kv_offset")


def takes_causal_mask_decision_arguments(fn) -> bool:
    return tuple(inspect.signature(fn).parameters)[:5] == _CAUSAL_MASK_DECISION_ARGUMENTS


def make_causal_mask_decision(original):
    """transformers' `masking_utils._ignore_causal_mask_sdpa`, which decides whether SDPA may run with
    is_causal=True instead of a materialized (B, 1, T, T) causal mask, taking that decision also while
    torch.compile traces a training forward.

    transformers refuses to skip the mask whenever Dynamo traces (before torch 2.14 it cannot tell
    torch.compile from torch.export, where a baked-in is_causal would be wrong for later decode
    shapes), so a compiled model attends through a materialized mask: its SDPA backward took 3x as
    long on an H100 (41.7 vs 13.6 ms per step in docs/e2e/h100_run6). The mask is skipped here only
    where it is exactly the causal mask whatever the values: no padding mask given, queries and keys
    of the same length from position 0, no local window, under torch.compile with autograd recording
    (training; exported inference graphs run without grad). Anything else is the original's decision.
    """

    def _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset,
                                 local_attention_size=None, *args, **kwargs):
        if (
            padding_mask is None
            and torch.compiler.is_compiling()
            and torch.is_grad_enabled()
            and not isinstance(q_offset, torch.Tensor)
            and q_offset == 0
            and q_length == kv_length
            and (local_attention_size is None or kv_length < local_attention_size)
        ):
            return True
        return original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size, *args, **kwargs)

    return mark(_ignore_causal_mask_sdpa, original, "_ignore_causal_mask_sdpa")


def shift_targets(labels, shift_labels, ignore_index: int):
    """Next-token targets exactly as transformers' ForCausalLMLoss builds them: the given
    `shift_labels`, else labels padded on the right with ignore_index and shifted left by one."""
    if shift_labels is not None:
        return shift_labels
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def divide_by_items(loss_sum, num_items_in_batch):
    """Gradient-accumulation normalization of transformers' fixed_cross_entropy."""
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch


def causal_lm_cross_entropy(
    logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100, shift_labels=None,
    **kwargs,
):
    """Drop-in for transformers' ForCausalLMLoss on the cross-entropy kernel (logits are not upcast
    to fp32 first: the kernel accumulates in fp32 anyway)."""
    targets = shift_targets(labels, shift_labels, ignore_index)
    logits = logits.reshape(-1, vocab_size)
    targets = targets.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return LF.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="mean")
    loss = LF.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return divide_by_items(loss, num_items_in_batch)


causal_lm_cross_entropy.__liger_original__ = None  # marks it as ours (see is_liger)
