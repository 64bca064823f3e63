"""leanformer::gated_attention (leanformer.ops.gated_attention): DiJiang's decayed form with no initial state through
a gated kernel's forward passes only, its backward three more of them (B1–B3). On the CPU the op runs the PyTorch
recurrence in place of fla's kernel, so the backward's algebra (the flips and the shifted gates) is checked here in
float64 against the parallel form, learnable decay included; fla's kernel in it runs on the GPU
(test_device_equivalence)."""

from __future__ import annotations

import pytest
import torch
from decayed_inputs import decayed_inputs

from leanformer.ops import decayed_linear_attention as dla
from leanformer.ops.gated_attention import gated_attention, gated_form, reversed_gates

F64 = torch.float64


def test_reversed_gates_sum_to_the_forward_decays():
    """Σ_{s=i′+1..j′} g′_s = G_i − G_j for i ≥ j (i′ = T−1−i, j′ = T−1−j)."""
    g = -torch.rand(1, 1, 7, dtype=F64)
    G, Gr = g.cumsum(-1)[0, 0], reversed_gates(g).cumsum(-1)[0, 0]
    T = 7
    for i in range(T):
        for j in range(i + 1):
            torch.testing.assert_close(Gr[T - 1 - j] - Gr[T - 1 - i], G[i] - G[j])


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("learnable_decay", [False, True])
def test_gated_form_equals_the_parallel_form_with_gradients(with_norm, learnable_decay):
    q, k, v, lg, n = decayed_inputs(T=11)
    n = n if with_norm else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    lg1 = lg.clone().requires_grad_(learnable_decay)
    ref, S_ref = dla.parallel(*leaves, lg1, log_norm=n)
    w = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves + ([lg1] if learnable_decay else []))
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v)]
    lg2 = lg.clone().requires_grad_(learnable_decay)
    out, S = gated_form(*leaves2, lg2, n)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(S, S_ref)
    assert not S.requires_grad
    grads = torch.autograd.grad((out * w).sum(), leaves2 + ([lg2] if learnable_decay else []))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("T", [1, 6])
def test_gated_attention_op_passes_gradcheck_and_opcheck(T):
    q, k, v, lg, n = decayed_inputs(B=1, H=2, T=T, m=3, d=2)
    g = lg[:, None] - n.diff(dim=-1, prepend=n[..., :1])
    leaves = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *x: gated_attention(*x, g)[0], leaves)
    torch.library.opcheck(gated_attention, (*leaves, g))  # schema, fake tensors, autograd registration, AOT


def test_the_final_state_carries_no_gradient_and_dtypes_must_match():
    q, k, v, lg, n = decayed_inputs(T=4)
    o, S = gated_attention(q.requires_grad_(), k, v, lg[:, None].expand(2, 3, 4))
    assert o.requires_grad and not S.requires_grad
    with pytest.raises(ValueError, match="one dtype"):
        gated_form(q.detach().float(), k, v, lg, n)


def test_gated_attention_compiles_without_a_graph_break():
    q, k, v, lg, n = decayed_inputs(B=1, H=2, T=6, m=4, d=4)
    g = lg[:, None] - n.diff(dim=-1, prepend=n[..., :1])
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: gated_attention(q, k, v, g)[0], backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.sum().backward()
    ref = dla.parallel(q, k, v, lg, log_norm=n)[0]
    torch.testing.assert_close(out, ref)


def test_reversed_pass_is_the_anticausal_sum_and_outputs_come_in_fla_layout():
    """gated_attention_reversed: o_j = Σ_{i≥j} exp(G_i − G_j) (q_j·k_i) v_i, by a double loop; both ops return
    (B, H, T, d) views of (B, T, H, d) memory, fla's layout."""
    from leanformer.ops.gated_attention import gated_attention_reversed

    q, k, v, lg, n = decayed_inputs(T=7)
    g = lg[:, None] - n.diff(dim=-1, prepend=n[..., :1])
    G = g.cumsum(-1)
    want = torch.zeros_like(v)
    for j in range(7):
        for i in range(j, 7):
            w = (G[..., i] - G[..., j]).exp()[..., None]
            want[:, :, j] += w * (q[:, :, j] * k[:, :, i]).sum(-1, keepdim=True) * v[:, :, i]
    out = gated_attention_reversed(q, k, v, g)
    torch.testing.assert_close(out, want)
    B, H, T, d = v.shape
    assert out.stride() == gated_attention(q, k, v, g)[0].stride() == (T * H * d, d, H * d, 1)


def test_the_cuda_branch_lays_out_and_reverses_as_the_cpu_branch(monkeypatch):
    """fla_gated_kernel (the CUDA branch) with a stand-in for fla's chunk_simple_gla that works in fla's (B, T, H, ·)
    layout: forward and reversed passes, inputs in the model's (B, T, H, ·) memory and plain (B, H, T, ·), equal
    the CPU branch's; its outputs are views of (B, T, H, d) memory."""
    from leanformer.ops import decayed_linear_attention as dla_mod
    from leanformer.ops.gated_attention import _run, fla_gated_kernel, reversed_gates
    from leanformer.ops.token_gates import gated_recurrent

    def stand_in(q, k, v, g, scale, initial_state, output_final_state):  # fla's signature, its layout
        assert scale == 1.0 and g.is_contiguous() and g.shape == q.shape[:3]
        o, S = gated_recurrent(*(x.transpose(1, 2) for x in (q, k, v, g)), initial_state)
        return o.transpose(1, 2).contiguous(), (S if output_final_state else None)
    monkeypatch.setattr(dla_mod, "_import_fla", lambda: (stand_in, None))
    q, k, v, lg, n = decayed_inputs(T=9)
    g = lg[:, None] - n.diff(dim=-1, prepend=n[..., :1])
    bth = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]  # the model's memory layout
    for inputs in ((q, k, v), bth):
        for reverse in (False, True):
            gates = reversed_gates(g) if reverse else g
            o, S = fla_gated_kernel(*inputs, gates, None, reverse=reverse, final_state=not reverse)
            ref = _run(*inputs, g, reverse)[0]
            torch.testing.assert_close(o, ref)
            assert o.stride() == ref.stride() and (S is None) == reverse


def _fla_backward_stand_ins(monkeypatch, chunk: int):
    """Stand-ins for the fla functions fla_kv_grads imports, in fla's (B, T, H, ·) layout and with the semantics its
    kernels have (the docstrings of fla.ops.common.chunk_h.chunk_bwd_dh and chunk_o.chunk_bwd_dv): log2 gate sums,
    chunk states of the later tokens, each chunk's own tokens added in chunk_bwd_dv. The gate sums are global
    rather than chunk-local: in exact arithmetic every weight the kernels form is the same either way."""
    import sys
    import types

    def cumsum(g, chunk_size, scale):
        assert chunk_size == chunk and g.is_contiguous() and g.dtype == torch.float32
        return g.double().cumsum(1) * scale

    def bwd_dh(q, k, v, do, h0, dht, scale, g, chunk_size, states_in_fp32):
        assert h0 is None and dht is None and scale == 1.0 and states_in_fp32 and chunk_size == chunk
        assert all(x.is_contiguous() for x in (q, k, v, do, g))
        B, T, H, K = k.shape
        nt = -(-T // chunk_size)
        dh = torch.zeros(B, nt, H, K, v.shape[-1], dtype=torch.float64)
        for t in range(nt):
            last = min(T, (t + 1) * chunk_size) - 1
            w = torch.exp2(g[:, last + 1:] - g[:, last:last + 1])  # (B, later, H)
            dh[:, t] = torch.einsum("bih,bihk,bihv->bhkv", w, q[:, last + 1:].double(), do[:, last + 1:].double())
        return dh.float(), None

    def bwd_dv(q, k, do, dh, g, scale, chunk_size):
        assert scale == 1.0 and chunk_size == chunk and all(x.is_contiguous() for x in (q, k, do, dh, g))
        B, T, H, _ = k.shape
        dv = torch.zeros(do.shape, dtype=torch.float64)
        for j in range(T):
            t = j // chunk_size
            last = min(T, (t + 1) * chunk_size) - 1
            own = slice(j, last + 1)
            w = torch.exp2(g[:, own] - g[:, j:j + 1]) * torch.einsum("bhk,bihk->bih", k[:, j].double(),
                                                                      q[:, own].double())
            dv[:, j] = torch.einsum("bih,bihv->bhv", w, do[:, own].double())
            dv[:, j] += torch.exp2(g[:, last] - g[:, j])[..., None] * torch.einsum(
                "bhk,bhkv->bhv", k[:, j].double(), dh[:, t].double())
        return dv.to(do.dtype)

    names = ["fla", "fla.ops", "fla.ops.common", "fla.ops.common.chunk_h", "fla.ops.common.chunk_o", "fla.ops.utils",
             "fla.ops.utils.constant"]
    mods = {n: types.ModuleType(n) for n in names}
    mods["fla.ops.common.chunk_h"].chunk_bwd_dh = bwd_dh
    mods["fla.ops.common.chunk_o"].chunk_bwd_dv = bwd_dv
    mods["fla.ops.utils"].chunk_local_cumsum = cumsum
    mods["fla.ops.utils.constant"].RCP_LN2 = 1.4426950216
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)


def test_fla_backward_route_gives_the_reversed_passes_gradients(monkeypatch):
    """fla_kv_grads (BACKWARD "fla") on stand-ins with fla's kernels' semantics: dk, dv equal the two reversed
    passes' (the roles (q, k, v, do) := (do, v, q, q) give dk), with T spanning three chunks and a ragged tail, in
    the model's (B, T, H, ·) memory; its outputs are views of (B, T, H, ·) memory. The custom op passes opcheck."""
    from leanformer.ops import gated_attention as ga

    monkeypatch.setattr(ga, "FLA_CHUNK", 4)
    _fla_backward_stand_ins(monkeypatch, chunk=4)
    q, k, v, lg, n = decayed_inputs(T=11)
    g = lg[:, None] - n.diff(dim=-1, prepend=n[..., :1])
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    do = torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(0))
    dk, dv = ga.fla_kv_grads(q, k, v, g, do)
    tol = dict(rtol=1e-5, atol=1e-5)  # fla takes the gates in float32 (the rest here is float64)
    torch.testing.assert_close(dk, ga.gated_attention_reversed(v, do, q, g), **tol)
    torch.testing.assert_close(dv, ga.gated_attention_reversed(k, q, do, g), **tol)
    B, H, T, d = v.shape
    assert dv.stride() == (T * H * d, d, H * d, 1)
    torch.library.opcheck(ga.gated_attention_kv_grads, (q, k, v, g, do))


def test_both_backward_routes_give_the_parallel_forms_gradients(monkeypatch):
    """BACKWARD "passes" and "fla" (the CPU runs the op's reversed recurrences for both) against the parallel form
    in float64, learnable decay included."""
    from leanformer.ops import gated_attention as ga

    q, k, v, lg, n = decayed_inputs(T=9)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, lg)]
    ref = dla.parallel(*leaves, log_norm=n)[0]
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), leaves)
    for route in ("passes", "fla"):
        monkeypatch.setattr(ga, "BACKWARD", route)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, lg)]
        got = torch.autograd.grad((gated_form(*leaves, n)[0] * w).sum(), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_the_backward_route_is_part_of_what_a_compiled_graph_is_traced_with(monkeypatch):
    """BACKWARD is read at the forward (gated_form) and passed to the op, so a compiled function recompiles when it
    changes and each graph's backward runs its own route's op (a global read only inside the backward would be
    traced once and cached); an odd feature dim in a 16-bit dtype keeps the reversed passes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from leanformer.ops import gated_attention as ga

    class OpNames(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    q, k, v, lg, n = decayed_inputs(B=1, H=2, T=6, m=4, d=4)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: gated_form(q, k, v, lg, n)[0], backend="aot_eager")
    for route, op in (("passes", "leanformer.gated_attention_reversed"), ("fla", "leanformer.gated_attention_kv_grads"),
                      ("passes", "leanformer.gated_attention_reversed")):
        monkeypatch.setattr(ga, "BACKWARD", route)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        with OpNames() as seen:
            out.sum().backward()
        assert op in seen.names, (route, seen.names)
    torch._dynamo.reset()
    monkeypatch.setattr(ga, "BACKWARD", "fla")
    assert ga.fla_backward_takes(q.float(), v.float())
    assert not ga.fla_backward_takes(q[..., :3].bfloat16(), v.bfloat16())  # fla's chunk_bwd_dv refuses odd dims
