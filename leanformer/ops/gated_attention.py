"""Form (1) of :mod:`leanformer.ops.token_gates` as one op with a gradient: fla's forward kernel, three times more
for the backward.

    o_i = Σ_{j≤i} exp(G_i − G_j) (q_i·k_j) v_j,    G_i = g_0 + … + g_i                         (1, no initial state)

fla 0.6.0 computes (1) with ``chunk_simple_gla(g=…)``, but refuses its backward for a per-token gate on Hopper with
Triton < 3.7.1 (``chunk_bwd_dqkwg``). With the gates held constant (DiJiang's normaliser n is detached, and a
learnable decay's gradient goes through q and k, :func:`leanformer.ops.constant_decay.route_decay_gradient`), each
gradient is itself a pass of (1), forward in time or backward:

    dq_i = Σ_{j≤i} exp(G_i − G_j) (do_i·v_j) k_j   = (1) with (q, k, v) := (do, v, k)                     (B1)
    dk_j = Σ_{i≥j} exp(G_i − G_j) (v_j·do_i) q_i   = flip (1) on flipped (v, do, q) with gates g′          (B2)
    dv_j = Σ_{i≥j} exp(G_i − G_j) (k_j·q_i) do_i   = flip (1) on flipped (k, q, do) with gates g′          (B3)

where "flipped" reverses the time axis and g′_s = g_{T−s} for s ≥ 1 (g′_0 is never used: (1) has no initial
state), so that Σ_{s=i′+1..j′} g′_s = G_i − G_j for i′ = T−1−i ≤ j′ = T−1−j. Every pass reads and writes only
through fla's forward kernels, which Hopper runs correctly, and nothing is read back to the host: the op can be
captured in a CUDA graph and compiled without a break (``leanformer::gated_attention``, a ``custom_op``; the
reversed passes are ``leanformer::gated_attention_reversed``). The outputs stay in fla's (B, T, H, ·) memory, and
a reversed pass reverses its inputs in that layout (one copy each for the model's (B, T, H, ·) tensors, which fla
then reads without another) and computes no final state.

:data:`BACKWARD` ``"fla"`` (the default since its H100 check and timing) takes dk and dv instead from fla's
own backward kernels, which Hopper runs correctly (only ``chunk_bwd_dqkwg``, which computes dq, dk and the
gate's gradient together, is refused):
``chunk_bwd_dh`` sums the later tokens into a state per chunk, backward in time, and ``chunk_bwd_dv`` adds the
chunk's own tokens. With the roles of (B3) they give dv; with (q, k, do) := (do, v, q) they give dk (B2):

    dv_j = Σ_{i≥j} exp(G_i − G_j) (k_j·q_i) do_i,   dk_j = Σ_{i≥j} exp(G_i − G_j) (v_j·do_i) q_i

so no tensor is reversed (the reversed passes' flips took 3.5 of a 51.9 ms GPT-2 step at seq 4096, H100,
2026-12-07 14:08, docs/gpu/misc_2026-12-07/callO), and the states between chunks stay float32 as in fla's
backward (``leanformer::gated_attention_kv_grads``).

On the CPU (tests) the op runs :func:`leanformer.ops.token_gates.gated_recurrent` instead of fla, so the backward's
algebra is checked in float64 against the parallel form there. The final state comes back without a gradient
(training never reads it). In bf16 the passes keep fla's between-chunk states in bf16 (fla's own backward keeps
them in float32): on a CPU copy of fla's algorithm at T 1,024 the outputs' and q, k, v gradients' errors were
≈ 3e-3 like the other forms', a learnable decay's gradient 2.4e-2 against the parallel form's 9e-3 (a review,
2026-12-07).
"""

from __future__ import annotations

import torch

from leanformer.ops.constant_decay import route_decay_gradient
from leanformer.ops.token_gates import gated_recurrent, token_gates

BACKWARD = "fla"  # dk, dv from fla's own backward kernels with no reversal ("fla", :func:`gated_attention_kv_grads`) or
# as two reversed forward passes ("passes"). "fla" since its GPU check and timing (H100, 2026-12-07 16:37-16:45: q, k, v
# gradients against float64 in float32 and bf16 passed, docs/gpu/misc_2026-12-07/callQ; GPT-2 DiJiang at seq 4096 b 4
# under CUDA graphs 46.63 against 49.54 ms per step, the ATen flips gone, docs/gpu/misc_2026-12-07/callR).
# The CPU runs both as the reversed recurrences. Read by gated_form at each forward (so torch.compile guards on it)
# and passed to the op as its ``fla_backward`` argument.
FLA_CHUNK = 64  # fla's chunk length (its chunk_simple_gla default), for the backward kernels' chunk-local gate sums


@torch.compiler.disable  # fla's Python and autotuned kernels run as they are (a traced prompt breaks around them)
def fla_gated_kernel(q, k, v, g, initial_state, reverse: bool = False, final_state: bool = True):
    """fla's ``chunk_simple_gla`` with a per-token head-wise gate g (B, H, T) (form (1) of
    :mod:`leanformer.ops.token_gates`) on our (B, H, T, ·) layout, forward only. q, k (B, H, T, m), v (B, H, T, d)
    → o (B, H, T, d), a view of (B, T, H, d) memory, in the inputs' dtype; final state (B, H, m, d) float32.
    ``reverse``: q, k, v and the output reversed in time (g as given: in the reversed order), each in fla's
    (B, T, H, ·) layout: one copy when the input is (B, T, H, ·) memory, as the model's are, and fla's own
    contiguity copy none. ``final_state`` False: none is computed (None). Callers send CUDA tensors."""
    from leanformer.ops.decayed_linear_attention import _import_fla

    qt, kt, vt, gt = (x.transpose(1, 2) for x in (q, k, v, g.float()))
    if reverse:  # the gates come in the reversed order already
        qt, kt, vt = (x.flip(1) for x in (qt, kt, vt))
    o, state = _import_fla()[0](qt, kt, vt, g=gt.contiguous(), scale=1.0,
                                initial_state=initial_state.float() if initial_state is not None else None,
                                output_final_state=final_state)
    return (o.flip(1) if reverse else o).transpose(1, 2), state


def reversed_gates(g: torch.Tensor) -> torch.Tensor:
    """g′ (B, H, T) of (B2, B3): g′_0 = 0 (unused), g′_s = g_{T−s} for 1 ≤ s < T."""
    return torch.cat((torch.zeros_like(g[..., :1]), g.flip(-1)[..., :-1]), dim=-1)


def _in_fla_layout(o: torch.Tensor) -> torch.Tensor:
    """o (B, H, T, d) as a view of (B, T, H, d) memory (the layout fla writes, which the ops return, with the
    strides their fake tensors have): o itself when it has those strides already, else a copy."""
    B, H, T, d = o.shape
    if o.stride() == (T * H * d, d, H * d, 1):
        return o
    return o.new_empty(B, T, H, d).transpose(1, 2).copy_(o)


def _run(q, k, v, g, reverse: bool):
    """(1), or with ``reverse`` flip ∘ (1 with the gates g′ of g) ∘ flip along time: (o in fla's layout, S)."""
    if reverse:
        g = reversed_gates(g)
    if q.is_cuda:  # a reversed pass asks for no final state (None)
        o, S = fla_gated_kernel(q, k, v, g, None, reverse=reverse, final_state=not reverse)
    else:
        flip = (lambda x: x.flip(2)) if reverse else (lambda x: x)
        o, S = gated_recurrent(flip(q), flip(k), flip(v), g, None)
        o = flip(o)
    S = None if S is None else S.to(torch.promote_types(q.dtype, torch.float32)).contiguous()
    return _in_fla_layout(o.to(v.dtype)), S


def _fake_output(q, v):
    B, H, T, _ = q.shape
    return v.new_empty(B, T, H, v.shape[-1]).transpose(1, 2)


@torch.library.custom_op("leanformer::gated_attention", mutates_args=())
def gated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    fla_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(1) for q, k (B, H, T, m), v (B, H, T, d) of one dtype, g (B, H, T) (no gradient) → o (B, H, T, d) in
    that dtype, a view of (B, T, H, d) memory (fla's layout: no copy), and the final state (B, H, m, d) in at
    least float32 (marked non-differentiable): fla on CUDA, the recurrence on the CPU. ``fla_backward``: the
    gradient's dk, dv from fla's backward kernels (:func:`gated_attention_kv_grads`) instead of two reversed
    passes; an argument of the op, not a global read in its backward, so a compiled graph (and the AOTAutograd
    cache) keeps the route it was traced with apart from the other."""
    return _run(q, k, v, g, reverse=False)


@gated_attention.register_fake
def _(q, k, v, g, fla_backward=False):
    B, H, T, m = q.shape
    return _fake_output(q, v), q.new_empty(B, H, m, v.shape[-1], dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op("leanformer::gated_attention_reversed", mutates_args=())
def gated_attention_reversed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B2, B3)'s pass: (1) on q, k, v reversed in time with the gates g′ of ``g`` (:func:`reversed_gates`), its
    output reversed back: o_j = Σ_{i≥j} exp(G_i − G_j) (q_j·k_i) v_i. Shapes and layout as
    :func:`gated_attention`'s o; no gradient of its own (it is only a backward's pass)."""
    return _run(q, k, v, g, reverse=True)[0]


@gated_attention_reversed.register_fake
def _(q, k, v, g):
    return _fake_output(q, v)


def _setup(ctx, inputs, output):
    q, k, v, g, *route = inputs
    ctx.save_for_backward(q, k, v, g)
    ctx.fla_backward = bool(route and route[0])
    ctx.mark_non_differentiable(output[1])  # the final state: no gradient flows back through it


@torch.compiler.disable  # fla's Python and autotuned kernels run as they are
def fla_kv_grads(q, k, v, g, do):
    """(B2, B3) by fla's backward kernels on CUDA tensors in our (B, H, T, ·) layout: q, k (B, H, T, m), v and do
    (B, H, T, d) of one 16- or 32-bit dtype, g (B, H, T) → (dk, dv), views of (B, T, H, ·) memory in that dtype.
    ``chunk_bwd_dh(q, k, v, do)`` accumulates, backward in time, the chunk states Σ_{i later} exp(G_i − G_last)
    q_iᵀ do_i (float32); ``chunk_bwd_dv(q, k, do, dh)`` gives Σ_{i≥j} exp(G_i − G_j) (k_j·q_i) do_i from them and
    the chunk's own tokens. dk is the same with (q, k, v, do) := (do, v, q, q)."""
    from fla.ops.common.chunk_h import chunk_bwd_dh
    from fla.ops.common.chunk_o import chunk_bwd_dv
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    qt, kt, vt, dot = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))  # (B, T, H, ·): no copy for ours
    gc = chunk_local_cumsum(g.transpose(1, 2).float().contiguous(), chunk_size=FLA_CHUNK, scale=RCP_LN2)

    def later_terms(q_, k_, v_, do_):  # Σ_{i≥j} exp(G_i − G_j) (k_j·q_i) do_i, the shape of do_
        dh, _ = chunk_bwd_dh(q=q_, k=k_, v=v_, do=do_, h0=None, dht=None, scale=1.0, g=gc, chunk_size=FLA_CHUNK,
                             states_in_fp32=True)
        return chunk_bwd_dv(q=q_, k=k_, do=do_, dh=dh, g=gc, scale=1.0, chunk_size=FLA_CHUNK)

    dv = later_terms(qt, kt, vt, dot)
    dk = later_terms(dot, vt, qt, qt)
    return dk.transpose(1, 2), dv.transpose(1, 2)


@torch.library.custom_op("leanformer::gated_attention_kv_grads", mutates_args=())
def gated_attention_kv_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B2, B3): dk (B, H, T, m) and dv (B, H, T, d) of (1) for the output gradient do (B, H, T, d), in do's
    dtype, views of (B, T, H, ·) memory: fla's backward kernels on CUDA (:func:`fla_kv_grads`), the two
    reversed recurrences on the CPU."""
    if q.is_cuda:
        dk, dv = fla_kv_grads(q, k, v, g, do)
        return _in_fla_layout(dk), _in_fla_layout(dv)
    return _run(v, do, q, g, reverse=True)[0], _run(k, q, do, g, reverse=True)[0]


@gated_attention_kv_grads.register_fake
def _(q, k, v, g, do):
    B, H, T, m = q.shape
    return q.new_empty(B, T, H, m).transpose(1, 2), _fake_output(q, do)


def _backward(ctx, do, dS):
    """(B1)–(B3); the final state's gradient ``dS`` is not propagated (the op's docstring)."""
    q, k, v, g = ctx.saved_tensors
    do = do.to(v.dtype)
    dq = gated_attention(do, v, k, g)[0]
    if ctx.fla_backward:
        dk, dv = gated_attention_kv_grads(q, k, v, g, do)
    else:
        dk = gated_attention_reversed(v, do, q, g)
        dv = gated_attention_reversed(k, q, do, g)
    return dq.to(q.dtype), dk.to(k.dtype), dv, None, None


gated_attention.register_autograd(_backward, setup_context=_setup)


def gated_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
               log_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decayed form with no initial state through :func:`gated_attention`: q, k (B, H, T, m), v (B, H, T, d),
    log_gamma (H,) (its gradient through q and k), log_norm (B, H, T) or None (held constant) → (o (B, H, T, d),
    final state (B, H, m, d), normalised at n_{T−1}, without a gradient)."""
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype for the gated kernel, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, _, _ = route_decay_gradient(q, k, log_gamma, None)
    g = token_gates(log_gamma.detach(), q.shape[:3], None if log_norm is None else log_norm.detach())
    o, S = gated_attention(q, k, v, g, fla_backward_takes(q, v))
    return o, S.detach()


def fla_backward_takes(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the gradient of a pass on q (..., m), v (..., d) takes dk, dv from fla's backward kernels: under
    :data:`BACKWARD` "fla", unless fla's ``chunk_bwd_dv`` would refuse them (an odd m or d in a 16-bit dtype)."""
    odd = q.shape[-1] % 2 or v.shape[-1] % 2
    return BACKWARD == "fla" and not (odd and q.dtype.itemsize == 2)
