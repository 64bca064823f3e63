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
captured in a CUDA graph and compiled without a break (``leanformer::gated_attention``, a ``custom_op``).

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


@torch.compiler.disable  # fla's Python and autotuned kernels run as they are (a traced prompt breaks around them)
def fla_gated_kernel(q, k, v, g, initial_state):
    """fla's ``chunk_simple_gla`` with a per-token head-wise gate g (B, H, T) (form (1) of
    :mod:`leanformer.ops.token_gates`) on our (B, H, T, ·) layout, forward only. q, k (B, H, T, m), v (B, H, T, d)
    → o (B, H, T, d) in v's dtype, final state (B, H, m, d) float32."""
    from leanformer.ops.decayed_linear_attention import _import_fla

    if not q.is_cuda:
        raise RuntimeError(f"dijiang form 'fla_gated' needs CUDA tensors, got device {q.device}; use 'chunk'")
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    o, state = _import_fla()[0](qt, kt, vt, g=g.float().transpose(1, 2).contiguous(), scale=1.0,
                                initial_state=initial_state.float() if initial_state is not None else None,
                                output_final_state=True)
    return o.transpose(1, 2), state


def reversed_gates(g: torch.Tensor) -> torch.Tensor:
    """g′ (B, H, T) of (B2, B3): g′_0 = 0 (unused), g′_s = g_{T−s} for 1 ≤ s < T."""
    return torch.cat((torch.zeros_like(g[..., :1]), g.flip(-1)[..., :-1]), dim=-1)


@torch.library.custom_op("leanformer::gated_attention", mutates_args=())
def gated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1) for q, k (B, H, T, m), v (B, H, T, d) of one dtype, g (B, H, T) (no gradient) → o (B, H, T, d) in
    that dtype and the final state (B, H, m, d) in at least float32 (marked non-differentiable): fla on CUDA,
    the recurrence on the CPU."""
    o, S = (fla_gated_kernel if q.is_cuda else gated_recurrent)(q, k, v, g, None)
    return o.to(v.dtype).contiguous(), S.to(torch.promote_types(q.dtype, torch.float32)).contiguous()


@gated_attention.register_fake
def _(q, k, v, g):
    B, H, T, m = q.shape
    return (v.new_empty(B, H, T, v.shape[-1]),
            q.new_empty(B, H, m, v.shape[-1], dtype=torch.promote_types(q.dtype, torch.float32)))


def _setup(ctx, inputs, output):
    q, k, v, g = inputs
    ctx.save_for_backward(q, k, v, g)
    ctx.mark_non_differentiable(output[1])  # the final state: no gradient flows back through it


def _backward(ctx, do, dS):
    """(B1)–(B3); the final state's gradient ``dS`` is not propagated (the op's docstring)."""
    q, k, v, g = ctx.saved_tensors
    do = do.to(v.dtype)
    dq = gated_attention(do, v, k, g)[0]
    gr = reversed_gates(g)
    dk = gated_attention(v.flip(2), do.flip(2), q.flip(2), gr)[0].flip(2)
    dv = gated_attention(k.flip(2), q.flip(2), do.flip(2), gr)[0].flip(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv, None


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
    o, S = gated_attention(q, k, v, g)
    return o, S.detach()
