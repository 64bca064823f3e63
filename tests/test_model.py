"""The LM: cache decoding equals the full forward pass (float64), shapes, generate, accounting."""

import pytest
import torch

from leanformer import TransformerConfig, TransformerLM

VARIANTS = {
    "preln": dict(),
    "parallel": dict(block="parallel"),
    "neox": dict(block="neox_parallel", rotary_pct=0.25, bias=True),
    "llama": dict(norm="rmsnorm", ffn_act="swiglu", n_kv_heads=2, tie_embeddings=False),
    "gpt2": dict(pos="learned", bias=True, ffn_act="gelu_tanh"),
}


def tiny(**kw) -> TransformerConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cache_decoding_equals_full_forward(name):
    torch.manual_seed(0)
    model = TransformerLM(tiny(**VARIANTS[name])).double().eval()
    idx = torch.randint(0, 61, (3, 17))
    full, _ = model(idx)
    cache = model.new_cache()
    pieces = [model(idx[:, :6], cache=cache)[0]]  # a prompt, then a chunk, then single tokens
    pieces.append(model(idx[:, 6:9], cache=cache)[0])
    for t in range(9, 17):
        pieces.append(model(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.pos == 17


def test_loss_and_shapes():
    model = TransformerLM(tiny())
    idx = torch.randint(0, 61, (2, 9))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 9, 61)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_loss_without_logits_equals_the_loss_with_them_and_leaves_them_out_of_a_compiled_graph():
    """return_logits=False: (None, the same loss, the same gradients) in float64, and a compiled graph with no
    (B, T, V) output (so its backward gets no zero gradient for the logits); without targets, a named error."""
    torch.manual_seed(0)
    model = TransformerLM(tiny()).double()
    idx = torch.randint(0, 61, (2, 9))
    grads = []
    for keep in (True, False):
        model.zero_grad(set_to_none=True)
        logits, loss = model(idx, idx, return_logits=keep)
        assert (logits is None) != keep
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        model(idx, return_logits=False)

    outputs = []

    def record_outputs(gm, example_inputs):  # a dynamo backend: note the graph's output shapes, run it eagerly
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        outputs.extend(tuple(n.meta["example_value"].shape) for n in leaves if isinstance(n, torch.fx.Node))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record_outputs, fullgraph=True)(idx, idx, return_logits=False)
    assert outputs and (2, 9, 61) not in outputs, outputs
    outputs.clear()
    torch._dynamo.reset()
    torch.compile(model, backend=record_outputs, fullgraph=True)(idx, idx)
    assert (2, 9, 61) in outputs, outputs  # the check sees logits where they are returned
    torch._dynamo.reset()


def test_generate_greedy_matches_argmax_of_full_forward():
    torch.manual_seed(1)
    model = TransformerLM(tiny()).double().eval()
    prompt = torch.randint(0, 61, (2, 4))
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 10)
    for t in range(4, 10):  # each generated token is the argmax of the full forward pass on its prefix
        logits, _ = model(out[:, :t])
        assert torch.equal(logits[:, -1].argmax(-1), out[:, t])


def test_generate_top_k_sampling_is_seeded():
    model = TransformerLM(tiny()).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_tied_embeddings_and_param_count():
    model = TransformerLM(tiny())
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    untied = TransformerLM(tiny(tie_embeddings=False))
    assert untied.num_params() == model.num_params() + 61 * 32


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = tiny()
    model = TransformerLM(cfg)
    n = model.num_params(non_embedding=True) + cfg.vocab_size * cfg.d_model
    assert model.flops_per_token(64) == 6 * n + 12 * cfg.n_layers * cfg.d_model * 64


def test_learned_positions_reject_overlong_sequences():
    model = TransformerLM(tiny(pos="learned", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_rotary_tables_kept_between_calls_equal_fresh_ones():
    from leanformer.layers.rope import Rotary

    x = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    kept = Rotary(16, rotary_pct=0.5)
    kept.rotate(x, 0)  # builds the first tables
    for start in (3, 250, 700, 2):  # inside, across and beyond them (they grow), then back
        fresh = Rotary(16, rotary_pct=0.5)
        assert torch.equal(kept.rotate(x, start), fresh.rotate(x, start))
    assert kept._tables[0] >= 705
    # relative positions: <rot(q, i), rot(k, j)> depends on i - j only (rotary_pct=1)
    r = Rotary(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    a = (r.rotate(q, 10) * r.rotate(k, 7)).sum()
    b = (r.rotate(q, 503) * r.rotate(k, 500)).sum()
    torch.testing.assert_close(a, b)


def test_a_compiled_step_takes_no_cpu_tensor_for_its_rotary_tables():
    """Under torch.compile the tables are built inside the graph from the frequencies as constants: no layer's CPU
    ``inv_freq`` tensor is a graph input (on a GPU each was copied to the device at every step: pageable host-to-
    device copies at the step's start, docs/benchmarks.md, callV's idle gaps), and the loss is the eager one."""
    torch.manual_seed(0)
    model = TransformerLM(tiny()).double()
    idx = torch.randint(0, 61, (2, 9))
    inputs = []

    def record_inputs(gm, example_inputs):  # a dynamo backend: note the graph's tensor inputs, run it eagerly
        inputs.extend((n.name, n.meta["example_value"].device) for n in gm.graph.nodes if n.op == "placeholder"
                      and isinstance(n.meta.get("example_value"), torch.Tensor))
        return gm.forward

    torch._dynamo.reset()
    loss = torch.compile(model, backend=record_inputs, fullgraph=True)(idx, idx, return_logits=False)[1]
    torch._dynamo.reset()
    assert inputs and not [name for name, _ in inputs if "inv_freq" in name], inputs
    torch.testing.assert_close(loss, model(idx, idx, return_logits=False)[1], rtol=1e-12, atol=1e-12)


def test_rotation_compiles_with_a_symbolic_start():
    """``rotate`` at a symbolic start (``dynamic=True``, fullgraph): dynamo cannot trace ``hasattr`` on a SymInt,
    which the check for a static cache's positions asked (found by a review, 2026-12-08)."""
    from leanformer.layers.rope import Rotary

    rot = Rotary(16)
    x = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    torch._dynamo.reset()
    f = torch.compile(lambda t, s: rot.rotate(t, s), fullgraph=True, dynamic=True)
    for start in (3, 7, 11):
        torch.testing.assert_close(f(x, start), rot.rotate(x, start))
    torch._dynamo.reset()


def test_compiled_rotary_tables_equal_the_eager_ones_and_are_built_once():
    """Under torch.compile the tables come from one opaque op (``leanformer::rotary_tables``): equal to the eager
    tables (float64, then rounded) up to 32K positions, and the compiled rotation's kernels, forward and backward,
    compute no cos or sin of their own (Inductor had fused the table into every element of q and k); the tables
    kept for decoding stay the float64 ones rounded, compiled or not."""
    import re

    from torch._inductor.utils import run_and_get_code

    from leanformer.layers import rope
    from leanformer.layers.rope import Rotary

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        rot = Rotary(64)
        torch._dynamo.reset()
        cos, sin = torch.compile(lambda r=rot, dt=dtype: r.cos_sin(0, 32768, "cpu", dt), fullgraph=True)()
        ref_cos, ref_sin = Rotary(64)._fresh(0, 32768, "cpu", dtype)
        assert cos.dtype == dtype and torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    # the inline form, kept for benchmarks: float32 of the angle reduced modulo 2π, within 1e-6 of float64's
    rope.COMPILED_TABLES = "inline"
    try:
        torch._dynamo.reset()
        inline = Rotary(64)
        cos, sin = torch.compile(lambda: inline.cos_sin(0, 32768, "cpu", torch.float32), fullgraph=True)()
    finally:
        rope.COMPILED_TABLES = "op"
    ref_cos, ref_sin = Rotary(64)._fresh(0, 32768, "cpu", torch.float64)
    assert max(float((cos.double() - ref_cos).abs().max()), float((sin.double() - ref_sin).abs().max())) <= 1e-6
    rot = Rotary(16)
    q, k = (torch.randn(2, 3, 40, 16, requires_grad=True) for _ in range(2))

    def step():
        out = torch.compile(lambda a, b: (lambda qr, kr: (qr * kr).sum())(*rot(a, b, 0)), fullgraph=True)(q, k)
        out.backward()
        return out

    torch._dynamo.reset()
    out, codes = run_and_get_code(step)
    torch._dynamo.reset()
    code = "\n".join(codes)
    assert "rotary_tables" in code and not re.search(r"\b(std::)?(sin|cos)\(|\.(sin|cos)\(", code)
    q_ref, k_ref = rot(q.detach().double(), k.detach().double(), 0)
    torch.testing.assert_close(out.double(), (q_ref * k_ref).sum(), rtol=1e-5, atol=1e-4)
    # tables kept for decoding (reserve()) are the float64 ones rounded, even when a compiled call builds them
    kept, eager = Rotary(64), Rotary(64)
    for r in (kept, eager):
        r.reserve(4096)
    torch._dynamo.reset()
    torch.compile(lambda: kept.cos_sin(0, 1, "cpu", torch.float32), fullgraph=True)()
    eager.cos_sin(0, 1, "cpu", torch.float32)
    assert kept._tables[0] == eager._tables[0] and all(torch.equal(a, b) for a, b in zip(kept._tables[1:],
                                                                                      eager._tables[1:]))
    torch._dynamo.reset()


def test_bad_input_shapes_are_named():
    model = TransformerLM(tiny())
    with pytest.raises(ValueError, match=r"idx must be \(B, T\) integer token ids, got shape \(7,\)"):
        model(torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.float32"):
        model(torch.zeros(1, 7))
