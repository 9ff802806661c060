"""torch.compile through the ops registered with torch.library (liger_kernels/_library.py).

Patched tiny models of three families compile to one graph in which every kernel is a single
`torch.ops.liger.*` node, with the loss and gradients of the eager patched model; explain() finds no
graph break in our code; a decoder layer compiles with fullgraph=True under Inductor; new sequence
lengths reuse the first (dynamic) compilation; each op passes torch.library.opcheck (schema, fake
implementation vs the real one, autograd registration, AOT dispatch with dynamic shapes); the ops a
patch does not use (losses, softmax/sparsemax, other norms and activations, multi-token attention,
fused MoE experts) each compile with fullgraph=True to one node with eager's values and gradients
(fused MoE with its routing traced around the experts' node, multi-token attention's sparse variant
too), and all of them together under Inductor.

Compiling is slow on CPU (Inductor's C++ code generation above all), so the model tests use the
aot_eager backend (Dynamo + AOTAutograd: every fake implementation and autograd formula is traced)
and one test runs Inductor. Inside the ops the kernels run under the Triton interpreter (the CUDA code
path) unless a test switches to the reference dispatch.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import liger_kernels._utils
from liger_kernels import functional as LF
from liger_plugins.patching import apply_liger, unpatch
from tests.patching.patching_helpers import batch, tiny_config
from tests.tolerances import assert_model_close

FAMILIES = ["llama", "qwen3", "gemma2"]
# The kernels a default patch of these families puts into the training graph (Gemma2's decoder layer
# has extra norms: no fused add + norm there).
PATCHED_OPS = {"rms_norm", "rope", "gated_down_proj", "fused_linear_cross_entropy"}
PRENORM_OPS = PATCHED_OPS | {"fused_add_rms_norm"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def reference_dispatch(monkeypatch):
    """CPU tensors run the torch reference inside the ops (no interpreter)."""
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)


@pytest.fixture
def patched(device):
    """patched(model_type) -> a tiny model with the default liger patch, unpatched at the end."""
    models = []

    def build(model_type):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type)).to(device)
        apply_liger(model)
        models.append(model)
        return model

    yield build
    for model in models:
        unpatch(model)


class RecordingBackend:
    """torch.compile backend: keeps every graph Dynamo hands over, then compiles it with aot_eager."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def sdpa_calls(self):
        """(attn_mask given?, is_causal) of every scaled_dot_product_attention call in the graphs."""
        return [
            (node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None) is not None,
             node.kwargs.get("is_causal", False))
            for gm in self.graphs
            for node in gm.graph.nodes
            if "scaled_dot_product_attention" in str(node.target)
        ]

    def liger_ops(self):
        """Names of the liger custom ops called in the recorded graphs."""
        return {
            str(node.target).split(".")[1]
            for gm in self.graphs
            for node in gm.graph.nodes
            if str(node.target).startswith("liger.")
        }


def model_batch(model, **kwargs):
    """input_ids and labels for `model`, on its device."""
    device = model.lm_head.weight.device
    return [t.to(device) for t in batch(model.config.vocab_size, **kwargs)]


def train_step(model, ids, labels, compiled=None):
    """(loss, {parameter name: gradient}) of one forward/backward of `model` (run through `compiled`,
    its torch.compile wrapper, if given); gradients are reset."""
    loss = (model if compiled is None else compiled)(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same_step(actual, expected):
    (loss, grads), (loss_ref, grads_ref) = actual, expected
    assert_model_close(loss, loss_ref, torch.float32, "loss")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        assert grad is not None, name
        assert_model_close(grads[name], grad, torch.float32, name)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_patched_model_compiles_to_one_graph_like_eager(patched, model_type):
    model = patched(model_type)
    ids, labels = model_batch(model)
    eager = train_step(model, ids, labels)

    backend = RecordingBackend()
    compiled = train_step(model, ids, labels, torch.compile(model, backend=backend))
    assert len(backend.graphs) == 1  # no graph break anywhere in the model
    assert backend.liger_ops() == (PATCHED_OPS if model_type == "gemma2" else PRENORM_OPS)
    assert_same_step(compiled, eager)


def test_compiled_attention_is_causal_without_a_mask(patched):
    from transformers import masking_utils

    model = patched("llama")
    ids, labels = model_batch(model)
    eager = train_step(model, ids, labels)
    backend = RecordingBackend()
    compiled = train_step(model, ids, labels, torch.compile(model, backend=backend))
    layers = model.config.num_hidden_layers
    assert backend.sdpa_calls() == [(False, True)] * layers  # no (B, 1, T, T) mask materialized
    assert_same_step(compiled, eager)

    # a padding mask keeps transformers' own decision (a materialized mask), with the same values
    torch._dynamo.reset()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    backend = RecordingBackend()
    loss = torch.compile(model, backend=backend)(input_ids=ids, labels=labels, attention_mask=mask).loss
    assert backend.sdpa_calls() == [(True, False)] * layers
    assert_model_close(loss, model(input_ids=ids, labels=labels, attention_mask=mask).loss, torch.float32, "loss")

    # reverted with the last patch that holds it
    assert masking_utils._ignore_causal_mask_sdpa.__name__ == "_ignore_causal_mask_sdpa"
    assert hasattr(masking_utils._ignore_causal_mask_sdpa, "__liger_original__")
    unpatch(model)
    assert not hasattr(masking_utils._ignore_causal_mask_sdpa, "__liger_original__")


def test_causal_mask_decision_under_compile():
    # transformers 5.17 (the H200's) refuses to skip the mask whenever Dynamo traces; 5.25 with
    # torch >= 2.14 decides as in eager. The replacement must skip it exactly where it is the plain
    # causal mask, and leave every other case to the original.
    from liger_plugins.patching.forwards import make_causal_mask_decision

    calls = []

    def refuses_while_tracing(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        calls.append((q_length, kv_length))
        return not torch.compiler.is_compiling() and padding_mask is None and q_length == kv_length

    decide = make_causal_mask_decision(refuses_while_tracing)

    def compiled(*args, grad=True):
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            return torch.compile(lambda x: x + 1 if decide(*args) else x - 1, backend="eager", fullgraph=True)(
                torch.zeros(()))

    assert compiled(None, 8, 8, 0, 0) == 1 and calls == []  # skipped by the replacement
    assert decide(None, 8, 8, 0, 0) and calls == [(8, 8)]  # eager: the original decides
    calls.clear()
    padding = torch.ones(2, 8, dtype=torch.bool)
    for args, grad in [((padding, 8, 8, 0, 0), True), ((None, 1, 8, 7, 0), True), ((None, 8, 8, 0, 0, 4), True),
                       ((None, 8, 8, 0, 0), False), ((None, 8, 8, torch.tensor(0), 0), True)]:
        assert compiled(*args, grad=grad) == -1, args  # the original's answer while tracing
    assert len(calls) == 5


def test_compiles_fullgraph_without_a_cache(patched):
    """use_cache=False (gradient checkpointing, TRL configs): transformers' packed-sequence check then
    runs while Dynamo traces, through our module-level wrapper of it, which must stay traceable."""
    model = patched("llama")
    ids, labels = model_batch(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    for extra in ({}, {"position_ids": positions}):
        out = compiled(input_ids=ids, labels=labels, use_cache=False, **extra)
        assert_model_close(out.loss, model(input_ids=ids, labels=labels, use_cache=False, **extra).loss,
                           torch.float32, "loss")


def test_explain_finds_no_graph_break_in_our_code(patched):
    model = patched("gemma2")  # softcapped loss, offset norms, geglu: the most patched code paths
    ids, labels = model_batch(model)
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=labels)
    ours = [
        reason
        for reason in explanation.break_reasons
        if any("liger_" in frame.filename for frame in reason.user_stack)  # liger_kernels, liger_plugins
    ]
    assert not ours, "\n".join(reason.reason for reason in ours)


def test_decoder_layer_fullgraph_inductor(patched, reference_dispatch, device):
    model = patched("llama")
    layer = model.model.layers[0]
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, model.config.hidden_size, device=device)
    position_ids = torch.arange(6, device=device).expand(2, -1)
    cos_sin = model.model.rotary_emb(hidden, position_ids)

    def step(fn):
        x = hidden.clone().requires_grad_()
        out = fn(x, position_ids=position_ids, position_embeddings=cos_sin)
        out.pow(2).sum().backward()
        grads = {name: p.grad for name, p in layer.named_parameters()}
        layer.zero_grad(set_to_none=True)
        return out.detach(), x.grad, grads

    out_ref, dx_ref, grads_ref = step(layer)
    out, dx, grads = step(torch.compile(layer, fullgraph=True))  # Inductor
    assert_model_close(out, out_ref, torch.float32, "output")
    assert_model_close(dx, dx_ref, torch.float32, "d hidden_states")
    for name, grad in grads_ref.items():
        assert_model_close(grads[name], grad, torch.float32, name)


def test_new_sequence_lengths_do_not_recompile(patched):
    model = patched("llama")
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend)
    for seq in (8, 11, 16):
        ids, labels = model_batch(model, seq=seq)
        torch._dynamo.mark_dynamic(ids, 1)
        torch._dynamo.mark_dynamic(labels, 1)
        step = train_step(model, ids, labels, compiled)
    assert len(backend.graphs) == 1
    assert_same_step(step, train_step(model, ids, labels))


def test_cross_entropy_under_compile(device):
    """in_place does not apply under compile (the logits stay intact); a bad target still fails,
    through the device-side assert (no host sync, no graph break)."""
    logits = torch.randn(6, 11, device=device, requires_grad=True)
    target = torch.tensor([1, 2, -100, 4, 10, 0], device=device)

    def loss_fn(x, t):
        return LF.cross_entropy(x * 2, t, label_smoothing=0.1, in_place=True)

    expected = loss_fn(logits, target)
    (dx_ref,) = torch.autograd.grad(expected, logits)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(logits, target)
    (dx,) = torch.autograd.grad(loss, logits)
    assert_model_close(loss, expected, torch.float32, "loss")
    assert_model_close(dx, dx_ref, torch.float32, "dlogits")
    if device == "cpu":  # on CUDA a failed device-side assert poisons the context
        with pytest.raises(RuntimeError, match="target values must be in"):
            compiled(logits, torch.tensor([1, 2, -100, 4, 11, 0]))


def _opcheck_cases(device):
    def _r(*shape, grad=True):
        return torch.randn(*shape, device=device, requires_grad=grad)

    target = torch.tensor([1, 2, -100, 4, 10], device=device)
    ops = torch.ops.liger
    return {
        "rms_norm": lambda: (ops.rms_norm, (_r(3, 8), _r(8), 1e-6, 0.0, "llama")),
        "fused_add_rms_norm": lambda: (
            ops.fused_add_rms_norm, (_r(3, 8), _r(3, 8), _r(8), 1e-6, 1.0, "gemma")
        ),
        "layer_norm": lambda: (ops.layer_norm, (_r(3, 8), _r(8), _r(8), 1e-5)),
        "glu": lambda: (ops.glu, (_r(3, 8), _r(3, 8), 1)),
        "gated_down_proj": lambda: (ops.gated_down_proj, (_r(2, 3, 8), _r(2, 3, 8), _r(5, 8), _r(5), 0)),
        "gated_down_proj_no_bias": lambda: (ops.gated_down_proj, (_r(3, 8), _r(3, 8), _r(5, 8), None, 2)),
        "rope": lambda: (
            ops.rope,
            (_r(2, 4, 3, 8), _r(2, 2, 3, 8), _r(1, 3, 8, grad=False), _r(1, 3, 8, grad=False), 1, False),
        ),
        "cross_entropy": lambda: (
            ops.cross_entropy,
            (_r(5, 11), target, None, -100, 0.1, 1e-3, 3.0, 1.0, "none", True, True),
        ),
        "fused_linear_cross_entropy": lambda: (
            ops.fused_linear_cross_entropy,
            (_r(5, 8), _r(11, 8), _r(11), target, None, None, None, -100, 0.0, 1e-3, None, 1.0, "mean", 2,
             False, True, True, True, True),
        ),
        "kl_div": lambda: (ops.kl_div, (_r(3, 7), _r(3, 7), "batchmean", False, 1e-10)),
        "jsd": lambda: (ops.jsd, (_r(5, 7), _r(5, 7), target, 0.3, -100)),
        "tvd": lambda: (ops.tvd, (_r(5, 7), _r(5, 7), "none", target, -100)),
        "dyt": lambda: (ops.dyt, (_r(3, 8), _r(()), _r(8), _r(8))),
        "relu_squared": lambda: (ops.relu_squared, (_r(3, 8),)),
        "softmax": lambda: (ops.softmax, (_r(3, 5, 4), 1)),
        "sparsemax": lambda: (ops.sparsemax, (_r(4, 6), 0)),
        "group_norm": lambda: (ops.group_norm, (_r(2, 6, 3), 3, _r(6), _r(6), 1e-5)),
        "poly_norm": lambda: (ops.poly_norm, (_r(3, 8), _r(3), _r(1), 1e-6)),
        "modulated_rms_norm": lambda: (
            ops.modulated_rms_norm, (_r(2, 3, 8), _r(8), _r(2, 8), _r(2, 8), 1e-6, 0.0, "llama")
        ),
        "modulated_rms_norm_no_weight": lambda: (
            ops.modulated_rms_norm, (_r(3, 8), None, _r(8), None, 1e-6, 0.0, "gemma")
        ),
        "multi_token_attention": lambda: (
            ops.multi_token_attention, (_r(2, 3, 5, 5), _r(3, 3, 3, 3), _r(3), [1, 1], [1, 1], [1, 1], 1, False)
        ),
        "multi_token_attention_sparse_grouped": lambda: (
            ops.multi_token_attention, (_r(1, 4, 6, 6), _r(2, 2, 1, 3), None, [1, 1], [0, 1], [1, 1], 2, True)
        ),
        # Indices below E only: gu's rows of "no expert" slots are never written (NaN in the tests), so
        # opcheck's comparison of every output would fail there; the standalone case below has them.
        "fused_moe_experts": lambda: (
            ops.fused_moe_experts,
            (_r(5, 8), torch.tensor([[0, 2], [1, 2], [2, 0], [1, 1], [0, 1]], device=device), _r(5, 2),
             _r(3, 6, 8), _r(3, 8, 3)),
        ),
    }


@pytest.mark.parametrize("dispatch", ["triton", "reference"])
@pytest.mark.parametrize("name", sorted(_opcheck_cases("cpu")))
def test_opcheck(name, dispatch, device, monkeypatch):
    """Schema, fake vs real outputs, autograd registration and AOT dispatch of each op. "triton": the
    kernels (the interpreter on CPU); "reference": CPU tensors through the torch reference."""
    if dispatch == "reference":
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
        device = "cpu"
    op, args = _opcheck_cases(device)[name]()
    torch.library.opcheck(op, args)


def _standalone_op_cases(device):
    """name -> (function of the public API, its tensor inputs): the ops a patch does not put into a
    model, each compiled on its own. Sizes are small and odd; every input gets a gradient."""

    def _r(*shape):
        return torch.randn(*shape, device=device)

    label = torch.tensor([[1, -100, 3], [0, 2, -100]], device=device)
    top_k_index = torch.tensor([[0, 2], [1, 3], [3, 0], [2, 2], [1, 0]], device=device)  # 3: no expert
    return {
        "kl_div": (lambda x, t: LF.kl_div(x, t), (_r(2, 3, 7).log_softmax(-1), _r(2, 3, 7).softmax(-1))),
        "jsd": (
            lambda x, y: LF.jsd(x, y, label, beta=0.3),
            (_r(2, 3, 7).log_softmax(-1), _r(2, 3, 7).log_softmax(-1)),
        ),
        "tvd": (lambda p, q: LF.tvd(p, q, "mean", label), (_r(2, 3, 7).softmax(-1), _r(2, 3, 7).softmax(-1))),
        "dyt": (LF.dyt, (_r(2, 3, 8), _r(()), _r(8), _r(8))),
        "relu_squared": (LF.relu_squared, (_r(2, 3, 8),)),
        "softmax": (lambda x: LF.softmax(x, dim=1), (_r(2, 5, 3),)),
        "sparsemax": (LF.sparsemax, (_r(3, 6),)),
        "group_norm": (lambda x, w, b: LF.group_norm(x, 2, w, b), (_r(2, 4, 3), _r(4), _r(4))),
        "poly_norm": (LF.poly_norm, (_r(3, 8), _r(3), _r(1))),
        "modulated_rms_norm": (LF.modulated_rms_norm, (_r(2, 3, 8), _r(8), _r(2, 1, 8), _r(2, 1, 8))),
        "gated_down_proj": (lambda a, b, w, bias: LF.gated_down_proj(a, b, w, bias, "gelu_tanh"),
                            (_r(2, 3, 8), _r(2, 3, 8), _r(5, 8), _r(5))),
        "multi_token_attention": (
            lambda s, w, b: LF.multi_token_attention(s, w, b, padding=1), (_r(2, 3, 5, 5), _r(3, 3, 3, 3), _r(3))
        ),
        "fused_moe_experts": (
            lambda x, w, gate_up, down: LF.fused_moe_experts(x, top_k_index, w, gate_up, down),
            (_r(5, 8), _r(5, 2), _r(3, 6, 8), _r(3, 8, 3)),
        ),
    }


def _assert_compiles_to_one_node_like_eager(name, fn, inputs):
    """fullgraph=True (no graph break) forward and backward; the graph holds the op as one node; the
    output and every input gradient equal eager's (the autograd.Function path or the reference)."""

    def step(f, cotangent=None):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = f(*leaves)
        cotangent = torch.randn_like(out) if cotangent is None else cotangent
        return out.detach(), torch.autograd.grad(out, leaves, cotangent), cotangent

    out_ref, grads_ref, cotangent = step(fn)
    backend = RecordingBackend()
    out, grads, _ = step(torch.compile(fn, backend=backend, fullgraph=True), cotangent)
    assert len(backend.graphs) == 1
    assert backend.liger_ops() == {name}
    assert_model_close(out, out_ref, torch.float32, "output")
    for i, (grad, grad_ref) in enumerate(zip(grads, grads_ref)):
        assert_model_close(grad, grad_ref, torch.float32, f"grad of input {i}")


@pytest.mark.parametrize("dispatch", ["triton", "reference"])
@pytest.mark.parametrize("name", sorted(_standalone_op_cases("cpu")))
def test_standalone_op_compiles_to_one_node_like_eager(name, dispatch, device, monkeypatch):
    if dispatch == "reference":
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
        device = "cpu"
    fn, inputs = _standalone_op_cases(device)[name]
    _assert_compiles_to_one_node_like_eager(name, fn, inputs)


@pytest.mark.parametrize("dispatch", ["triton", "reference"])
@pytest.mark.parametrize(
    "name, fn, shapes",
    [
        # The routing (softmax, top-k) is traced into the graph; the experts are one node.
        ("fused_moe_experts", lambda x, logits, gate_up, down: LF.fused_moe(x, logits, gate_up, down, top_k=2),
         [(5, 8), (5, 3), (3, 6, 8), (3, 8, 3)]),
        ("multi_token_attention", lambda s, w: LF.multi_token_attention(s, w, padding=(0, 1), groups=2, sparse=True),
         [(1, 4, 6, 6), (2, 2, 1, 3)]),
    ],
    ids=["fused_moe", "multi_token_attention_sparse_grouped"],
)
def test_op_variants_compile_to_one_node_like_eager(name, fn, shapes, dispatch, device, monkeypatch):
    """Variants of the standalone cases, checked the same way."""
    if dispatch == "reference":
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
        device = "cpu"
    _assert_compiles_to_one_node_like_eager(name, fn, [torch.randn(*shape, device=device) for shape in shapes])


def test_explain_finds_no_graph_break_in_standalone_ops(device):
    cases = _standalone_op_cases(device)

    def all_ops():
        return [fn(*inputs) for fn, inputs in cases.values()]

    explanation = torch._dynamo.explain(all_ops)()
    assert explanation.graph_break_count == 0, "\n".join(r.reason for r in explanation.break_reasons)
    called = {
        str(node.target).split(".")[1]
        for gm in explanation.graphs
        for node in gm.graph.nodes
        if str(node.target).startswith("liger.")
    }
    assert called == set(cases)


def test_standalone_ops_fullgraph_inductor(reference_dispatch, device):
    """All of them in one function under Inductor (the reference dispatch inside the ops on CPU)."""
    cases = _standalone_op_cases(device)
    leaves = [[t.detach().clone().requires_grad_() for t in inputs] for _, inputs in cases.values()]
    flat_leaves = [t for inputs in leaves for t in inputs]

    def all_ops():
        return [fn(*inputs) for (fn, _), inputs in zip(cases.values(), leaves)]

    cotangents = [torch.randn_like(out) for out in all_ops()]

    def step(f):
        outs = f()
        loss = sum((out * cotangent).sum() for out, cotangent in zip(outs, cotangents))
        return [out.detach() for out in outs], torch.autograd.grad(loss, flat_leaves)

    outs_ref, grads_ref = step(all_ops)
    outs, grads = step(torch.compile(all_ops, fullgraph=True))
    for name, out, out_ref in zip(cases, outs, outs_ref):
        assert_model_close(out, out_ref, torch.float32, name)
    for i, (grad, grad_ref) in enumerate(zip(grads, grads_ref)):
        assert_model_close(grad, grad_ref, torch.float32, f"grad of input {i}")
