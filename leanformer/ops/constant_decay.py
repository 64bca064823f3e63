"""Decayed linear attention with a per-token log-normaliser, run exactly through a kernel that has none.

fla's fast kernels (``chunk_simple_gla`` with ``g_gamma``) compute only the *plain* form with a constant
per-head decay and give that decay no gradient:

    o'_i = Σ_{j≤i} γ^(i−j) (q_i·k_j) v_j + γ^(i+1) q_i S₀,     S' = γ^T S₀ + Σ_j γ^(T−1−j) k_jᵀ v_j.

The form wanted (:mod:`leanformer.ops.decayed_linear_attention`) has a per-token log-normaliser n (B, H, T)
and an initial state S₀ normalised at n₀ (B, H):

    o_i = Σ_{j≤i} exp((i−j)·logγ + n_j − n_i) (q_i·k_j) v_j + exp((i+1)·logγ + n₀ − n_i) q_i S₀,
    S   = its state after token T−1, normalised at n_{T−1}.

**The shift** (exact in real arithmetic). Take one constant per (batch row, head), c = max(max_j n_j, n₀)
(detached: its value cancels). With k'_j = k_j·exp(n_j − c) and S₀' = S₀·exp(n₀ − c), the plain form
gives o'_i = exp(n_i − c)·o_i and S' = exp(n_{T−1} − c)·S, so

    o_i = o'_i · exp(c − n_i),     S = S' · exp(c − n_{T−1}).

Every factor exp(n_j − c) is ≤ 1, every exp(c − n_i) ≥ 1; both are bounded by e^spread with
spread = c − min(n, n₀). The gradients to q, k, v, n, S₀ flow through these products unchanged.

**Range guard.** The shift costs ``spread`` nats of the float range (float32 and bfloat16 reach e^−87):
with spread ≤ ``limit`` (default 30) nothing of consequence underflows. A sequence whose keys'
log-features spread further (a jump of > 30 nats in the running maximum) is split in two halves, the
first half's final state (and its n at the last token) entering the second, recursively, until every
piece's spread is ≤ ``limit``. A piece of one token ends the recursion: there only S₀'s share can lose
range, and that share is below e^−limit of the output when n is a running maximum
(n_i ≥ n_{i−1} + logγ, which :func:`leanformer.layers.dijiang.running_log_norm` guarantees). The test
``spread > limit`` is one reduction on the device and one host read (one synchronisation per call).

**Decay gradient.** For a learnable decay, q_i and k_j are multiplied by exp(±(i+1)·δ) with
δ = logγ − logγ.detach() (= 0: the values do not change) and the final state by exp(T·δ), then the kernel
gets the detached decay. The form depends on logγ only through exp(G_i − G_j) with G_i = (i+1)·logγ
(S₀ sits at G_{−1} = 0), so the gradient that reaches δ through q and k is exactly ∂/∂logγ. (Positions
are centred, see :func:`_decay_gradient_through_qk`.) Its rounding: the gradient is a first moment of
q·dq − k·dk, terms that cancel; with bf16 dq, dk from the kernel it is good to ~1e-2, not 1e-3.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# kernel(q, k, v, log_gamma, initial_state) → (o, final_state) for the plain form; q, k: (B, H, T, m),
# v: (B, H, T, d), log_gamma: (H,) (detached), initial_state: (B, H, m, d) or None.
PlainKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
                       tuple[torch.Tensor, torch.Tensor]]

SHIFT_LIMIT = 30.0
RANGE_CHECK = True  # False skips the guard's host read: for timing its cost only (unsafe on wide inputs)


def via_constant_decay(kernel: PlainKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       log_gamma: torch.Tensor, initial_state: torch.Tensor | None = None,
                       log_norm: torch.Tensor | None = None, initial_log_norm: torch.Tensor | None = None,
                       *, limit: float = SHIFT_LIMIT) -> tuple[torch.Tensor, torch.Tensor]:
    """The decayed form with log-norm, decay gradient and state through ``kernel`` (the plain form).

    Arguments and result as :func:`leanformer.ops.decayed_linear_attention.recurrent`:
    q, k: (B, H, T, m); v: (B, H, T, d); log_gamma: (H,); initial_state: (B, H, m, d) or None;
    log_norm: (B, H, T) or None; initial_log_norm: (B, H) or None (0) → (o (B, H, T, d), state (B, H, m, d)).
    """
    if limit <= 0:
        raise ValueError(f"limit={limit} must be > 0 (nats of float range the shift may use)")
    q, k, initial_state, state_factor = route_decay_gradient(q, k, log_gamma, initial_state)
    lg = log_gamma.detach()
    if log_norm is None:
        o, S = kernel(q, k, v, lg, initial_state)
    else:
        n0 = None
        if initial_state is not None:
            n0 = initial_log_norm if initial_log_norm is not None else log_norm.new_zeros(log_norm.shape[:2])
        o, S = _shifted(kernel, q, k, v, lg, initial_state, log_norm, n0, limit)
    if state_factor is not None:
        S = S * state_factor
    return o, S


def route_decay_gradient(q: torch.Tensor, k: torch.Tensor, log_gamma: torch.Tensor,
                         initial_state: torch.Tensor | None):
    """(q, k, initial_state, state_factor) for a kernel that takes the decay detached: when ``log_gamma``
    requires grad (and T > 0), q, k and the initial state carry its gradient (:func:`_decay_gradient_through_qk`)
    and the caller multiplies the final state by ``state_factor`` (H, 1, 1); otherwise they come back
    unchanged with ``state_factor`` None."""
    if not (log_gamma.requires_grad and q.shape[2]):
        return q, k, initial_state, None
    q, k, initial_factor, state_factor = _decay_gradient_through_qk(q, k, log_gamma)
    if initial_state is not None:
        initial_state = initial_state * initial_factor
    return q, k, initial_state, state_factor


def _decay_gradient_through_qk(q: torch.Tensor, k: torch.Tensor, log_gamma: torch.Tensor):
    """q·e^{(i+1−c)δ}, k·e^{−(j+1−c)δ} and the factors for S₀ (e^{cδ}) and the final state (e^{(T−c)δ}),
    (H, 1, 1), with δ = logγ − logγ.detach() (every factor is 1) and c = (T+1)/2.

    Centring the positions (c) changes nothing in exact arithmetic (a common shift of all G cancels in
    G_i − G_j; S₀ and the final state get it back) and halves the rounding that the first moment
    Σ_t (t+1−c)(q_t·dq_t − k_t·dk_t) picks up; the products are taken in float32 for the same reason.
    """
    T = q.shape[2]
    dt = torch.promote_types(log_gamma.dtype, torch.float32)
    delta = (log_gamma - log_gamma.detach()).to(dt)[:, None]                        # (H, 1), value 0
    c = (T + 1) / 2
    G = delta * (torch.arange(1, T + 1, device=q.device, dtype=dt) - c)              # (H, T)
    q = (q.to(dt) * G.exp()[..., None]).to(q.dtype)
    k = (k.to(dt) * (-G).exp()[..., None]).to(k.dtype)
    return q, k, (delta * c).exp()[..., None], (delta * (T - c)).exp()[..., None]


def _shifted(kernel: PlainKernel, q, k, v, lg, S0, n, n0, limit: float):
    """o, S of the log-norm form (S0 normalised at n0; n0 None iff S0 None), one shift per piece."""
    T = q.shape[2]
    nd = n.detach()
    c, lo = nd.amax(dim=-1), nd.amin(dim=-1)                                        # (B, H)
    if S0 is not None:
        c, lo = torch.maximum(c, n0.detach()), torch.minimum(lo, n0.detach())
    if T > 1 and RANGE_CHECK and bool(((c - lo) > limit).any()):  # the one host read: a piece too wide for one shift
        h = T // 2
        o1, S1 = _shifted(kernel, q[:, :, :h], k[:, :, :h], v[:, :, :h], lg, S0, n[..., :h], n0, limit)
        o2, S2 = _shifted(kernel, q[:, :, h:], k[:, :, h:], v[:, :, h:], lg, S1, n[..., h:], n[..., h - 1], limit)
        return torch.cat((o1, o2), dim=2), S2
    sd = torch.promote_types(k.dtype, torch.float32)
    nf, c = n.to(sd), c.to(sd)
    k_shift = (nf - c[..., None]).exp()                                             # (B, H, T) ≤ 1
    ks = k * k_shift[..., None].to(k.dtype)  # in k's dtype: one pass (bf16: one more rounding, 2^-9)
    S0s = S0.to(sd) * (n0.to(sd) - c).exp()[..., None, None] if S0 is not None else None
    o, S = kernel(q, ks, v, lg, S0s)
    o_scale = (c[..., None] - nf).exp()[..., None]                                  # (B, H, T, 1) ≥ 1
    o = o * o_scale.to(o.dtype)
    S = S.to(sd) * (c - nf[..., -1]).exp()[..., None, None]
    return o, S
