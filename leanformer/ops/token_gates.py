"""Decayed linear attention with a per-token log-normaliser as a *gated* form: one scalar gate per token and head.

The form wanted (:mod:`leanformer.ops.decayed_linear_attention`, DiJiang's Eq. 12 with the stabiliser) weighs
key j at query i ≥ j by exp((i−j)·logγ + n_j − n_i), and the initial state S₀ (normalised at n₀) by
exp((i+1)·logγ + n₀ − n_i). With G_i = (i+1)·logγ − n_i and G_{−1} = −n₀ both weights are exp(G_i − G_j), so
the form is the plain gated recurrence

    S_t = exp(g_t) S_{t−1} + k_tᵀ v_t,    o_t = q_t S_t,    g_t = G_t − G_{t−1} = logγ − (n_t − n_{t−1})      (1)

with n_{−1} = n₀, whose final state is already normalised at n_{T−1}. Because
:func:`leanformer.layers.dijiang.running_log_norm` keeps n_t ≥ n_{t−1} + logγ (n₀ the state's own n), every
gate is ≤ 0 up to rounding (a state handed in without its n is taken at n₀ = 0, and then g_0 may be positive):
a kernel for (1) multiplies only by factors ≤ 1, so nothing overflows and no range guard is needed.
fla's ``chunk_simple_gla(g=...)`` computes (1) (its head-wise gate, B T H), so unlike
:func:`leanformer.ops.constant_decay.via_constant_decay` (the constant-decay kernel with one shift per row)
this route reads nothing back to the host: a CUDA graph can capture it.

The first gate is floored at :data:`FIRST_GATE_FLOOR`: an initial n₀ of −inf (the state before any token, as
the one-kernel decoding step keeps it) would give g_0 = −inf, and fla's cumulative sum −inf − (−inf) = NaN;
at e^−100 the initial state's weight is already far below float32's resolution of the output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# kernel(q, k, v, g, initial_state) → (o, final_state) for form (1): q, k (B, H, T, m), v (B, H, T, d),
# g (B, H, T) in at least float32, initial_state (B, H, m, d) or None → o (B, H, T, d), final state (B, H, m, d)
GatedKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
                       tuple[torch.Tensor, torch.Tensor]]


FIRST_GATE_FLOOR = -100.0  # g_0's floor (module docstring)


def token_gates(log_gamma: torch.Tensor, shape: torch.Size, log_norm: torch.Tensor | None = None,
                initial_log_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The gates g (B, H, T) of form (1), in at least float32 (fla's kernel reads float32).

    Without ``log_norm``: ``log_gamma`` (H,) for every token. With ``log_norm`` n (B, H, T):
    g_t = logγ − (n_t − n_{t−1}), with n_{−1} = ``initial_log_norm`` (B, H), the initial state's. None:
    n_{−1} = n_0, so g_0 = logγ (no initial state: g_0 weighs nothing, and taking n_{−1} = 0 could make
    exp(g_0) overflow, and inf·0 NaN, when n_0 < −88). g_0 is floored at :data:`FIRST_GATE_FLOOR`.
    ``shape``: (B, H, T)."""
    dt = torch.promote_types(log_gamma.dtype if log_norm is None else log_norm.dtype, torch.float32)
    lg = log_gamma.to(dt)[:, None]                                                    # (H, 1)
    if log_norm is None:
        return lg.expand(shape)
    n = log_norm.to(dt)
    first = initial_log_norm.to(dt)[..., None] if initial_log_norm is not None else n[..., :1]
    g = lg - (n - torch.cat((first, n[..., :-1]), dim=-1))
    return torch.cat((g[..., :1].clamp_min(FIRST_GATE_FLOOR), g[..., 1:]), dim=-1)


def via_token_gates(kernel: GatedKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    log_gamma: torch.Tensor, initial_state: torch.Tensor | None = None,
                    log_norm: torch.Tensor | None = None,
                    initial_log_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decayed form through ``kernel`` (form (1)). Arguments and result as
    :func:`leanformer.ops.decayed_linear_attention.recurrent`: q, k (B, H, T, m); v (B, H, T, d); log_gamma
    (H,); initial_state (B, H, m, d) or None; log_norm (B, H, T) or None; initial_log_norm (B, H) or None
    → (o (B, H, T, d), state (B, H, m, d) normalised at n_{T−1})."""
    if initial_state is not None and log_norm is not None and initial_log_norm is None:
        initial_log_norm = log_norm.new_zeros(log_norm.shape[:2])  # a state without its n: normalised at 0
    if initial_state is None:
        initial_log_norm = None  # nothing to weigh: g_0 = logγ (token_gates)
    return kernel(q, k, v, token_gates(log_gamma, q.shape[:3], log_norm, initial_log_norm), initial_state)


def gated_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Form (1) step by step in PyTorch (the reference a kernel is tested against; any device, any float
    dtype, states in at least float32). Shapes as :data:`GatedKernel`."""
    B, H, T, m = q.shape
    cd = torch.promote_types(q.dtype, torch.float32)
    S = (initial_state.to(cd) if initial_state is not None else q.new_zeros(B, H, m, v.shape[-1], dtype=cd))
    outs = []
    for t in range(T):
        S = g[..., t, None, None].to(cd).exp() * S + k[..., t, :, None].to(cd) * v[..., t, None, :].to(cd)
        outs.append((q[..., t, None, :].to(cd) @ S).squeeze(-2))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1], dtype=cd)
    return o.to(v.dtype), S
