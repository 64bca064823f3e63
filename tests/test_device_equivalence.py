"""The fast paths in float32 and bfloat16 against float64 references, on every device present (the CPU
always, CUDA where there is one: ``benchmarks/gpu.sh`` runs this file on the GPU machine).

Each check records its error (max |out − ref| / max |ref|) and tolerance as JUnit properties, which
``benchmarks/gpu_check.py`` tabulates: DiJiang's parallel / chunk / recurrent forms (and fla's kernels,
CUDA + fla only; our fused Triton kernel, CUDA or Triton's interpreter), forward and gradients; DiJiang's
cached decoding against its full forward; NOBLE's fused and plain products and its training route; shaped
attention's fast form against its materialised reference; the training head and loss through its Triton
kernel; the rotary tables a compiled graph builds.
"""

from __future__ import annotations

import pytest
import torch

from leanformer.ops import decayed_linear_attention as dla

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
FLA_FP32_TOL = 5e-3  # fla's Triton kernels compute float32 products in TF32 (10-bit mantissa)


@pytest.fixture(autouse=True)
def _true_float32(device):
    """Float32 checks in true float32 on CUDA (no TF32), restored afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / max |ref| (float64)."""
    ref = ref.double()
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.fixture
def check(record_property):
    """``check(err, tol)``: record the error and tolerance, then assert the error is within it."""
    def run(err: float, tol: float) -> None:
        record_property("max_rel_err", err)
        record_property("tol", tol)
        assert err <= tol, f"max relative error {err:.2e} > {tol}"
    return run


def _needs_fla(device: torch.device) -> None:
    if device.type != "cuda" or not dla.fla_available():
        pytest.skip("fla's kernels need CUDA and fla")


# ---------------------------------------------------------------------------- DiJiang's forms
def _dijiang_inputs(device: torch.device):
    """Feature-mapped q, k (the model's paper map and stabilisers), v, log γ and the keys' log-normaliser;
    T not a multiple of the chunk size, so the ragged tail is exercised."""
    from leanformer.config import TransformerConfig
    from leanformer.layers.dijiang import DiJiangAttention

    B, H, D, T = 2, 4, 64, (300 if device.type == "cuda" else 100)
    torch.manual_seed(0)
    attn = DiJiangAttention(TransformerConfig(d_model=H * D, n_heads=H, attention="dijiang").validate(), 0)
    attn = attn.to(device)
    q, k, v = (torch.randn(B, H, T, D, device=device) for _ in range(3))
    lg = attn.log_gamma().float()
    with torch.no_grad():
        fq, fk, n, _ = attn.features(q, k, lg, None)
    return fq.float(), fk.float(), v, lg, n.float()


FORMS = {"parallel": dla.parallel, "chunk": dla.chunk, "recurrent": dla.recurrent,
         "fla_chunk": dla.fla_chunk, "fla_recurrent": dla.fla_recurrent, "fla_gated": dla.fla_gated,
         "fused": dla.fused}
OURS = {"fla_chunk": "chunk", "fla_recurrent": "recurrent", "fla_gated": "chunk"}


def _needs_form(form: str, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Skip fla without CUDA + fla, and the fused kernel where it cannot run (CPU without Triton's
    interpreter, which tests/conftest.py switches on when there is no CUDA)."""
    if form.startswith("fla"):
        _needs_fla(device)
    if form == "fused":
        pytest.importorskip("triton")
        x = torch.empty(1, 1, 1, 64, device=device, dtype=dtype)
        reason = dla.fused_supported(x, x)
        if reason is not None:
            pytest.skip(f"fused kernel: {reason}")


def _form_tol(form: str, dtype: torch.dtype) -> float:
    return FLA_FP32_TOL if form.startswith("fla") and dtype == torch.float32 else TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("form", list(FORMS))
def test_dijiang_form_forward_matches_float64(device, check, form, dtype):
    _needs_form(form, device, dtype)
    fq, fk, v, lg, n = _dijiang_inputs(device)
    ref = dla.parallel(fq.double(), fk.double(), v.double(), lg.double(), log_norm=n.double())[0]
    out = FORMS[form](fq.to(dtype), fk.to(dtype), v.to(dtype), lg, log_norm=n)[0]
    check(rel_err(out, ref), _form_tol(form, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("form", list(OURS))
def test_fla_kernel_matches_our_form_in_the_same_dtype(device, check, form, dtype):
    _needs_fla(device)
    fq, fk, v, lg, n = _dijiang_inputs(device)
    args = [t.to(dtype) for t in (fq, fk, v)]
    theirs = FORMS[form](*args, lg, log_norm=n)[0]
    ours = FORMS[OURS[form]](*args, lg, log_norm=n)[0]
    check(rel_err(theirs, ours), FLA_FP32_TOL if dtype == torch.float32 else TOL[dtype])


@pytest.mark.parametrize("form", list(FORMS))
def test_dijiang_form_float32_gradients_match_float64(device, check, form):
    _needs_form(form, device)
    fq, fk, v, lg, n = _dijiang_inputs(device)
    g = torch.randn_like(v)
    leaves64 = [t.double().requires_grad_() for t in (fq, fk, v)]
    dla.parallel(*leaves64, lg.double(), log_norm=n.double())[0].backward(g.double())
    leaves = [t.clone().requires_grad_() for t in (fq, fk, v)]
    FORMS[form](*leaves, lg, log_norm=n)[0].backward(g)
    check(max(rel_err(a.grad, b.grad) for a, b in zip(leaves, leaves64)),
          FLA_FP32_TOL if form.startswith("fla") else TOL[torch.float32])


def test_dijiang_model_trains_through_gated_fla_as_through_the_default(device, check, monkeypatch):
    """dijiang.GATED_FLA_TRAINING_FROM: a float32 model's loss and every parameter's gradient through fla with one
    gate per token (its backward three forward passes) against the default route, learnable decay included."""
    from leanformer.config import TransformerConfig
    from leanformer.layers import dijiang
    from leanformer.model import TransformerLM

    _needs_fla(device)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=2, attention="dijiang", max_seq_len=512)
    cfg.dijiang.learnable_decay = True
    model = TransformerLM(cfg).to(device)
    idx = torch.randint(0, 512, (2, 300), device=device)

    def loss_and_grads(gated: bool):
        monkeypatch.setattr(dijiang, "GATED_FLA_TRAINING_FROM", 2 if gated else None)
        model.zero_grad(set_to_none=True)
        loss = model(idx, idx)[1]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert grads.keys() == ref.keys()
    errs = {"loss": rel_err(loss, ref_loss), **{n: rel_err(grads[n], ref[n]) for n in ref}}
    print("largest relative errors:", sorted(errs.items(), key=lambda kv: -kv[1])[:5])  # shown when it fails
    # two routes, each within FLA_FP32_TOL of float64 op by op (TF32 products), so twice that between them: on an
    # H100 the largest was a q projection's gradient, 5.52e-3 (2026-12-07, docs/gpu/misc_2026-12-07/callU)
    check(max(errs.values()), 2 * FLA_FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("route", ["passes", "fla"])
def test_gated_backward_routes_match_float64(device, check, monkeypatch, route, dtype):
    """The gated form's q, k, v gradients through each backward route (gated_attention.BACKWARD: dk, dv as two
    reversed forward passes, or from fla's chunk_bwd_dh / chunk_bwd_dv) against the float64 parallel form, with
    48 features against v's 64 (the dk call swaps fla's K and V)."""
    from leanformer.ops import gated_attention

    _needs_fla(device)
    monkeypatch.setattr(gated_attention, "BACKWARD", route)
    fq, fk, v, lg, n = _dijiang_inputs(device)
    fq, fk = fq[..., :48].contiguous(), fk[..., :48].contiguous()
    g = torch.randn_like(v)
    leaves64 = [t.double().requires_grad_() for t in (fq, fk, v)]
    dla.parallel(*leaves64, lg.double(), log_norm=n.double())[0].backward(g.double())
    leaves = [t.to(dtype).requires_grad_() for t in (fq, fk, v)]
    dla.fla_gated(*leaves, lg, log_norm=n)[0].backward(g.to(dtype))
    check(max(rel_err(a.grad, b.grad) for a, b in zip(leaves, leaves64)),
          FLA_FP32_TOL if dtype == torch.float32 else TOL[dtype])


def test_fla_gated_prompt_continues_from_a_state(device, check):
    """fla with per-token gates (no gradient: a decoding prompt) in two pieces, the second from the first's
    state and n, against the float64 form over the whole sequence: outputs and final state."""
    _needs_fla(device)
    fq, fk, v, lg, n = _dijiang_inputs(device)
    ref, S_ref = dla.parallel(fq.double(), fk.double(), v.double(), lg.double(), log_norm=n.double())
    cut = 130
    with torch.no_grad():
        o1, S1 = dla.fla_gated(fq[:, :, :cut], fk[:, :, :cut], v[:, :, :cut], lg, None, n[..., :cut])
        o2, S2 = dla.fla_gated(fq[:, :, cut:], fk[:, :, cut:], v[:, :, cut:], lg, S1, n[..., cut:], n[..., cut - 1])
    check(max(rel_err(torch.cat((o1, o2), dim=2), ref), rel_err(S2, S_ref)), FLA_FP32_TOL)


@pytest.mark.parametrize("mode", ["chunk", "fla", "gated"])
def test_dijiang_model_decoding_matches_its_full_forward(device, check, mode, monkeypatch):
    """A multi-token prompt, then one token at a time through the recurrent state, float32 ("gated": mode
    auto with its prompts through fla's per-token gates, dijiang.GATED_FLA_PROMPTS)."""
    from leanformer.config import TransformerConfig
    from leanformer.layers import dijiang
    from leanformer.model import TransformerLM

    if mode in ("fla", "gated"):
        _needs_fla(device)
    if mode == "gated":
        monkeypatch.setattr(dijiang, "GATED_FLA_PROMPTS", "always")
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=2, attention="dijiang")
    cfg.dijiang.mode = "auto" if mode == "gated" else mode
    model = TransformerLM(cfg).to(device).eval()
    total, prompt = (160, 130) if mode == "gated" else (80, 40)  # gated: a prompt across fla's 64-token chunks
    idx = torch.randint(0, 512, (2, total), device=device)
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_cache()
        steps = [model(idx[:, :prompt], cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(prompt, total)]
    check(rel_err(torch.cat(steps, 1), full), FLA_FP32_TOL if mode != "chunk" else TOL[torch.float32])


# ---------------------------------------------------------------------------- NOBLE
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("fused", [True, False, "route"], ids=["fused", "plain", "route"])
def test_noble_output_and_gradients_match_float64(device, check, fused, dtype, monkeypatch):
    """Output, dx, dW and dW_down of one NobleLinear with a branch large enough to matter; "route": the training
    route of leanformer.ops.noble_train (two-segment products and CosNet kernels; noble.TRAIN_KERNEL)."""
    from leanformer.layers import noble
    from leanformer.layers.noble import NobleLinear

    if fused == "route":
        pytest.importorskip("triton")
        from leanformer.ops.two_segment_matmul import two_segment_supported

        probe = torch.empty(1, 1, device=device)
        reason = two_segment_supported(probe, probe, probe, probe)
        if reason is not None:
            pytest.skip(f"two-segment kernel: {reason}")
        monkeypatch.setattr(noble, "TRAIN_KERNEL", "always")

    d, tokens = (768, 8192) if device.type == "cuda" else (64, 256)
    torch.manual_seed(0)
    layer = NobleLinear(d, d, bias=True, rank=32).to(device)
    with torch.no_grad():
        layer.up.weight.normal_(0, 0.5 / 32 ** 0.5)
    x, g = torch.randn(tokens, d, device=device), torch.randn(tokens, d, device=device)

    def run(fused: bool | str, dtype: torch.dtype | None, double: bool = False):
        m = NobleLinear(d, d, bias=True, rank=32, fused=bool(fused)).to(device)
        m.load_state_dict(layer.state_dict())
        xin = x.clone()
        if double:
            m, xin = m.double(), xin.double()
        xin.requires_grad_()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            y = m(xin)
        y.backward(g.to(y.dtype))
        return y.detach(), xin.grad, m.weight.grad, m.down.weight.grad

    ref = run(False, None, double=True)
    out = run(fused, dtype)
    check(max(rel_err(a, b) for a, b in zip(out, ref)), 3e-2 if dtype is not None else 1e-5)


# ---------------------------------------------------------------------------- shaped attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_shaped_attention_fast_form_matches_float64_reference(device, check, dtype):
    from leanformer.layers.shaped import shaped_attention, shaped_attention_reference

    torch.manual_seed(0)
    B, H, T, D = 2, 4, 256, 64
    q, k, v = (torch.randn(B, H, T, D, device=device) for _ in range(3))
    a, b, c = (torch.rand(H, device=device) + 0.5 for _ in range(3))
    ref = shaped_attention_reference(*(t.double() for t in (q, k, v, a, b, c)))
    check(rel_err(shaped_attention(q.to(dtype), k.to(dtype), v.to(dtype), a, b, c), ref), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_shaped_mix_kernel_output_and_gradients_match_float64(device, check, dtype):
    """The full causal pass with its mix in leanformer.ops.shaped_mix's kernels (shaped.MIX_KERNEL): output
    and the gradients to q, k, v and the three gains against the materialised Eq. 5 in float64."""
    pytest.importorskip("triton")
    from leanformer.layers import shaped
    from leanformer.ops.shaped_mix import shaped_mix_supported

    x = torch.empty(1, 1, 1, 64, device=device, dtype=dtype)
    reason = shaped_mix_supported(x, x)
    if reason is not None:
        pytest.skip(f"shaped mix kernel: {reason}")
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 300, 64
    q, k, v = (torch.randn(B, H, T, D, device=device) for _ in range(3))
    gains = [torch.rand(H, device=device) + 0.5 for _ in range(3)]
    w = torch.randn(B, H, T, D, device=device, dtype=torch.float64)
    ref_in = [t.double().requires_grad_() for t in (q, k, v, *gains)]
    ref = shaped.shaped_attention_reference(*ref_in)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_in)
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [g.requires_grad_() for g in gains]
    old, shaped.MIX_KERNEL = shaped.MIX_KERNEL, "always"
    try:
        out = shaped.shaped_attention(*ins)
    finally:
        shaped.MIX_KERNEL = old
    grads = torch.autograd.grad((out.double() * w).sum(), ins)
    check(max([rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]), TOL[dtype])


@pytest.mark.parametrize("method", ["softmax", "shaped", "dijiang_fused",
                                    "dijiang_official_fla"])
def test_attention_bench_graph_replay_gives_the_eager_gradients(device, check, method):
    """``bench attention --graphs`` times a CUDA graph replay of its call: the replay must compute what the
    eager call computes (output and the gradients to q, k, v), else its time is of something else. The call
    is the bench's own (:func:`leanformer.bench.attention.build_call`)."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    from leanformer.arms import unavailable_reason
    from leanformer.bench.attention import build_call, captured, method_config

    B, H, T, D = 2, 4, 512, 64
    reason = unavailable_reason(method_config(method, H, D), device)
    if reason is not None:
        pytest.skip(reason)
    _, call, leaves = build_call(method, device, torch.bfloat16, B, H, T, D)
    eager = [t.clone() for t in (call(), *(x.grad for x in leaves[:3]))]
    results: list[torch.Tensor] = []

    def call_keeping_output():
        results[:] = [call()]

    replay = captured(call_keeping_output)
    replay()
    torch.cuda.synchronize()
    replayed = [results[0], *(x.grad for x in leaves[:3])]
    check(max(rel_err(a, b) for a, b in zip(replayed, eager)), 3e-3)  # atomics in some backward passes


# ---------------------------------------------------------------------------- the training head and loss
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_head_and_loss_kernel_match_float64(device, check, dtype, monkeypatch):
    """linear_cross_entropy through its Triton kernel (KERNEL "always": the GPU's, or the interpreter), the gradient
    written over the logits: the loss, ∂h and ∂W against the float64 plain route. On CUDA at GPT-2's vocabulary,
    with half the targets below the kernel's first column block (ids < 4,096: where a read of z[y] after the
    reductions raced with other warps' writes of z̄ before 2026-12-07 19:45) and some ignored."""
    pytest.importorskip("triton")
    from leanformer.ops import linear_cross_entropy as lce

    monkeypatch.setattr(lce, "KERNEL", "always")
    if not lce._kernel_takes(torch.empty(1, 8, device=device, dtype=dtype)):  # CPU tensors on a GPU machine: no
        pytest.skip(f"the loss kernel does not take {device.type} tensors here (no TRITON_INTERPRET)")  # interpreter
    N, C, V = (2048, 256, 50304) if device.type == "cuda" else (48, 32, 700)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, C, generator=g, dtype=torch.float64).to(device)
    w = (torch.randn(V, C, generator=g, dtype=torch.float64) / C ** 0.5).to(device)
    y = torch.randint(0, V, (N,), generator=g)
    y[: N // 2] = torch.randint(0, min(V, 4096) // 8, (N // 2,), generator=g)
    y[::7] = -100
    y = y.to(device)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(hh @ ww.T, y, ignore_index=-100)
    ref.backward()
    h2, w2 = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    assert lce._kernel_takes(torch.empty(1, V, device=device, dtype=dtype))
    loss = lce.linear_cross_entropy(h2, w2, None, y, chunk_tokens=N // 2)
    loss.backward()
    err = max(abs(float(loss) - float(ref)) / float(ref), rel_err(h2.grad, hh.grad), rel_err(w2.grad, ww.grad))
    check(err, TOL[dtype])


def test_compiled_rotary_tables_match_float64(device, check):
    """The tables a compiled training graph builds for float32 (by the ``leanformer::rotary_tables`` op: float64,
    then rounded), on the device, up to 32K positions, against float64's."""
    from leanformer.layers.rope import Rotary

    rot = Rotary(64)
    torch._dynamo.reset()
    cos, sin = torch.compile(lambda: rot.cos_sin(0, 32768, device, torch.float32), fullgraph=True)()
    torch._dynamo.reset()
    ref_cos, ref_sin = Rotary(64)._fresh(0, 32768, device, torch.float64)
    check(max(float((cos.double() - ref_cos).abs().max()), float((sin.double() - ref_sin).abs().max())), 1e-6)
