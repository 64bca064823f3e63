"""DiJiang attention: frequency-domain kernelised linear attention (Chen et al., ICML 2024, arXiv 2403.19928).

Per head (head dim d, feature dim m), after RoPE on q and k (as the official code does):

* feature map ``paper`` (eq. 10-12): ``φ(x) = D ⊙ exp(T C x)``, C the orthonormal DCT-II matrix,
  T = diag(Φ⁻¹(t)) with t a scrambled Sobol (quasi-Monte Carlo) sequence in (0, 1), D > 0 learned
  per head and feature. x is scaled by d^(-1/4) first, so that φ(q)·φ(k) is a kernel of q·k/√d as in
  the parent's softmax. Feature f uses DCT row ``f mod d`` with its own point t_f: m < d keeps the m
  lowest frequencies, m > d cycles through the rows again with new points.
* feature map ``official`` (the released code): ``softmax(x C T)`` over the feature axis (no D, no scale;
  ours draws t from the same QMC points instead of plain uniform ones).
* decayed linear attention ``o_i = Σ_{j≤i} γ_h^(i−j) (φ(q_i)·φ(k_j)) v_j`` (eq. 13-14, RetNet decay
  γ_h = 1 − exp(linspace(log 1/32, log 1/512, H))), computed by :mod:`leanformer.ops.decayed_linear_attention`
  in one of its forms (parallel, chunk, recurrent, fla; :meth:`DiJiangAttention.form` picks it, the table
  ``dla.FORMS`` runs it);
* per-head GroupNorm (one group per head), the gate ``silu(x W_G) ⊙ o`` and the output projection.

Numerical safety of the ``paper`` map, exact and causal. Write z = log φ (so φ = exp(z)).
* Queries: φ(q_i) is divided by exp(max_f z_{q,i,f}). That multiplies o_i by a positive per-token,
  per-head scalar, which the per-head GroupNorm removes.
* Keys: a per-key scalar would *not* cancel, so keys get a running log-normaliser instead:
  ``n_i = max(n_{i−1} + logγ, max_f z_{k,i,f})`` (the xLSTM stabiliser). The op computes
  ``Σ_j exp((i−j)·logγ + n_j − n_i) (φ(q_i)·e^{z_{k,j} − n_j}) v_j`` = e^{−n_i} × the true o_i: again a
  per-query scalar, removed by the GroupNorm. n_i depends on tokens ≤ i only, every feature is ≤ 1 and
  every decay exponent is ≤ 0, so nothing overflows at any length in float32 or bfloat16.
* GroupNorm: GN(r·x, ε) ≠ GN(x, ε) when r·x is small against √ε, so the layer passes each token's
  log-rescale (−n_i − max_f z_{q,i,f}) to :func:`rescaled_group_norm`, which uses ε·r² (in log space):
  the output is the paper formula's, whatever the stabiliser did.
On CUDA the feature map (:func:`feature_pair`) and the GroupNorm run under ``torch.compile``; fla's kernel
takes the paper map through the exact shift of :mod:`leanformer.ops.constant_decay`.
The decoding state is S (B, H, m, d), n (B, H) and "pos": its size does not depend on the context.
A decoding step (T = 1 with a state; modes auto, parallel and fused) runs on CUDA as one Triton kernel per
layer from q, k, v to the GroupNorm's output (:mod:`leanformer.ops.fused_decay_step`; route ``fused_step``
of :meth:`DiJiangAttention.form`, switch :data:`FUSED_STEP`), the state updated in place.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.config import TransformerConfig
from leanformer.decoding import is_static, starts_afresh, store_state
from leanformer.layers.attention import add_projections, merge_heads, out_projection, project_qkv
from leanformer.layers.linear import make_linear
from leanformer.ops import constant_decay
from leanformer.ops import decayed_linear_attention as dla
from leanformer.ops import feature_map as fmk
from leanformer.ops import fused_decay_step as fds
from leanformer.ops.on_cuda import kernel_switch_allows, on_cuda_compiled


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix (n, n) in float64: ``C[k, i] = α_k cos(π (2i+1) k / 2n)``, C Cᵀ = I."""
    if n < 1:
        raise ValueError(f"dct_matrix: n={n} must be >= 1")
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def qmc_points(m: int, seed: int = 0) -> torch.Tensor:
    """m points of a scrambled 1-D Sobol sequence, strictly inside (0, 1), float64.

    torch's Sobol points are multiples of 2^-30 in [0, 1); adding 2^-31 moves each to the centre of its
    cell, so Φ⁻¹ is always finite.
    """
    if m < 1:
        raise ValueError(f"qmc_points: m={m} must be >= 1")
    eng = torch.quasirandom.SobolEngine(dimension=1, scramble=True, seed=seed)
    return eng.draw(m, dtype=torch.float64)[:, 0] + 2.0 ** -31


def qmc_scales(m: int, seed: int = 0) -> torch.Tensor:
    """The diagonal of T = diag(Φ⁻¹(t)): (m,) float64 Gaussian quantiles of :func:`qmc_points`."""
    return torch.special.ndtri(qmc_points(m, seed))


def feature_projection(d: int, m: int, kind: str, seed: int = 0) -> torch.Tensor:
    """(d, m) matrix P with ``x @ P`` = ``T C x`` (paper) or ``x C T`` (official), float64, on the
    current default device (computed on the CPU: Sobol points and Φ⁻¹ have no meta or CUDA kernels).
    """
    with torch.device("cpu"):
        table = _feature_projection(d, m, kind, seed)
    return table.to(torch.get_default_device())


def _feature_projection(d: int, m: int, kind: str, seed: int) -> torch.Tensor:
    C = dct_matrix(d)
    rows = torch.arange(m) % d
    t = qmc_scales(m, seed)
    if kind == "paper":
        return C[rows].T * t  # column f: Φ⁻¹(t_f) · C[f mod d, :]
    if kind == "official":
        return C[:, rows] * t  # column f: Φ⁻¹(t_f) · C[:, f mod d]
    raise ValueError(f"dijiang.feature_map={kind!r} is not valid; choose paper or official")


class DiJiangFeatureMap(nn.Module):
    """φ for one layer: (B, H, T, d) → log-features (paper) or features (official), (B, H, T, m).

    Computed in at least float32 whatever the input dtype (autocast is switched off inside).
    """

    def __init__(self, head_dim: int, feature_dim: int, n_heads: int, kind: str, seed: int = 0):
        super().__init__()
        self.kind, self.m = kind, feature_dim
        self.register_buffer("proj", feature_projection(head_dim, feature_dim, kind, seed).float())
        self.in_scale = head_dim ** -0.25 if kind == "paper" else 1.0
        # D = exp(log_d) > 0 (paper only); init 1/√m.
        self.log_d = nn.Parameter(torch.zeros(n_heads, feature_dim)) if kind == "paper" else None
        self.post_init()

    def optim_settings(self) -> dict[str, dict]:
        """D is a gain: weight decay would pull it towards 1, so it gets none (see leanformer.train.optim)."""
        return {"log_d": {"weight_decay": False}} if self.log_d is not None else {}

    def post_init(self) -> None:
        if self.log_d is not None:
            with torch.no_grad():
                self.log_d.fill_(-0.5 * math.log(self.m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = torch.promote_types(x.dtype, torch.float32)
        no_autocast = (torch.autocast(x.device.type, enabled=False)  # exp amplifies rounding: no bf16 matmul
                       if torch.amp.is_autocast_available(x.device.type) else nullcontext())  # (meta has none)
        with no_autocast:
            z = (x.to(cd) * self.in_scale) @ self.proj.to(cd)
        if self.kind == "official":
            return z.softmax(dim=-1)
        return z + self.log_d.to(cd)[None, :, None, :]  # log φ = log D + T C x


def running_log_norm(mk: torch.Tensor, log_gamma: torch.Tensor,
                     initial: torch.Tensor | None = None) -> torch.Tensor:
    """``n_i = max(n_{i−1} + logγ, mk_i)`` for all i at once: (B, H, T).

    Closed form: n_i = i·logγ + max(n_{−1} + logγ, cummax_j (mk_j − j·logγ)). The value of n only sets a
    per-query scale (removed by the GroupNorm), so rounding in it changes nothing but the range.
    """
    T = mk.shape[-1]
    pos = torch.arange(T, device=mk.device, dtype=mk.dtype)
    ramp = pos * log_gamma.to(mk.dtype)[:, None]  # (H, T)
    a = mk - ramp
    if initial is not None:
        first = (initial.to(mk.dtype) + log_gamma.to(mk.dtype))[..., None]
        return torch.cummax(torch.cat((first, a), dim=-1), dim=-1).values[..., 1:] + ramp
    return torch.cummax(a, dim=-1).values + ramp


def default_log_gamma(n_heads: int) -> torch.Tensor:
    """log γ_h with γ_h = 1 − exp(linspace(log 1/32, log 1/512, H)) (official schedule), float64, on the
    current default device."""
    with torch.device("cpu"):
        table = torch.log1p(-torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), n_heads,
                                                      dtype=torch.float64)))
    return table.to(torch.get_default_device())


def feature_pair(q: torch.Tensor, k: torch.Tensor, proj: torch.Tensor, log_d: torch.Tensor | None,
                 in_scale: float, log_gamma: torch.Tensor, n_init: torch.Tensor | None, out_dtype: torch.dtype):
    """φ(q), φ(k) with the stabilisers, as :class:`DiJiangFeatureMap` + :meth:`DiJiangAttention.features`
    define them, in one function (one fused graph under ``torch.compile``).

    q, k: (B, H, T, d); proj: (d, m); log_d: (H, m) (paper) or None (official) → fq, fk: (B, H, T, m) in
    ``out_dtype``, laid out in memory as (B, T, H, m) (the layout fla's kernels read, so passing them there
    copies nothing); n: keys' running log-normaliser (B, H, T) or None; log_scale (B, H, T) or None: the mix
    returns exp(log_scale_i) × the true o_i (paper: −n_i − max_f z_{q,i,f}).
    """
    cd = torch.promote_types(q.dtype, torch.float32)
    no_autocast = (torch.autocast(q.device.type, enabled=False)  # exp amplifies rounding: no bf16 matmul
                   if q.device.type in ("cuda", "cpu") else nullcontext())  # (meta has none; traceable test)
    with no_autocast:
        p = proj.to(cd)
        zq = (q.transpose(1, 2).to(cd) * in_scale) @ p                            # (B, T, H, m)
        zk = (k.transpose(1, 2).to(cd) * in_scale) @ p
    if log_d is None:  # official: softmax over the features, no stabiliser needed
        return (zq.softmax(-1).to(out_dtype).transpose(1, 2), zk.softmax(-1).to(out_dtype).transpose(1, 2),
                None, None)
    ld = log_d.to(cd)
    zq, zk = zq + ld, zk + ld                                                       # log φ = log D + T C x
    mq = zq.detach().amax(dim=-1)                                                   # (B, T, H)
    fq = (zq - mq[..., None]).exp()
    n = running_log_norm(zk.detach().amax(dim=-1).transpose(1, 2), log_gamma.detach(), n_init)  # (B, H, T)
    fk = (zk - n.transpose(1, 2)[..., None]).exp()
    return fq.to(out_dtype).transpose(1, 2), fk.to(out_dtype).transpose(1, 2), n, -(n + mq.transpose(1, 2))


def kernel_feature_pair(q: torch.Tensor, k: torch.Tensor, proj: torch.Tensor, log_d: torch.Tensor | None,
                        in_scale: float, log_gamma: torch.Tensor, n_init: torch.Tensor | None, out_dtype: torch.dtype,
                        constant_key_shift: bool = False):
    """:func:`feature_pair` through the Triton kernels of :mod:`leanformer.ops.feature_map` (same arguments and
    results): the paper map in three launches (queries with their row maxima; the keys' row maxima; the keys
    at the running log-normaliser n), the official map in two.

    ``constant_key_shift`` (paper map, no ``n_init``): the keys are taken at one shift per (batch row, head),
    c = max_t n_t, instead of n_t, and n comes back None: the features are then those that
    :func:`leanformer.ops.constant_decay.via_constant_decay` would give a plain kernel (keys ·exp(n − c)),
    and log_scale −(c + max_f z_q) gives the GroupNorm the output's scale, so fla's kernel runs with no
    element-wise pass before or after it. Exact as that shift is, under the same range guard: when n spreads
    over more than ``constant_decay.SHIFT_LIMIT`` nats in a row, the keys are taken at n (and the mix splits).
    """
    if log_d is None:
        return (fmk.softmax_features(q, proj, in_scale, out_dtype), fmk.softmax_features(k, proj, in_scale, out_dtype),
                None, None)
    fq, mq = fmk.exp_features(q, proj, log_d, in_scale, None, out_dtype)
    n = _running_log_norm(fmk.row_max(k, proj, log_d, in_scale), log_gamma.detach(), n_init)   # (B, H, T)
    if constant_key_shift and n_init is None and n.shape[-1]:
        c = n.amax(dim=-1, keepdim=True)
        if not (constant_decay.RANGE_CHECK and bool(((c - n.amin(dim=-1, keepdim=True))
                                                     > constant_decay.SHIFT_LIMIT).any())):
            fk, _ = fmk.exp_features(k, proj, log_d, in_scale, c.expand_as(n), out_dtype)
            return fq, fk, None, -(c + mq)
    fk, _ = fmk.exp_features(k, proj, log_d, in_scale, n, out_dtype)
    return fq, fk, n, -(n + mq)


FEATURE_KERNEL = "cuda"  # the feature map through leanformer.ops.feature_map's kernels: "cuda" on CUDA tensors,
# "always" also on the CPU under TRITON_INTERPRET=1 (tests), "never" (feature_pair, compiled on CUDA)


def use_feature_kernel(q: torch.Tensor, proj: torch.Tensor) -> bool:
    """Whether :meth:`DiJiangAttention.features` runs :func:`kernel_feature_pair` for q (B, H, T, d)."""
    if not kernel_switch_allows("FEATURE_KERNEL", FEATURE_KERNEL, q):
        return False
    return fmk.features_supported(q, proj) is None


COMPILE_ON_CUDA = True  # fuse the feature map and the GroupNorm with torch.compile on CUDA (False: eager)


def rescaled_group_norm(o: torch.Tensor, log_scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """GroupNorm (one group per head) of the true output, given o = exp(log_scale) × true o.

    o: (B, H, T, d); log_scale: (B, H, T) (detached); weight, bias: (H·d,) → (B, T, H·d) in at least float32.
    GroupNorm is scale-free except for ε: GN(r·x, ε·r²) = GN(x, ε). Each group is first divided by its
    own max |o| = a (so its values are O(1)), and gets ε·(r/a)² = ε·exp(2·(log_scale − log a)), computed
    in log space (capped at e^80, where the group is already 0 to within e^−40).
    """
    B, H, T, d = o.shape
    x = o.to(torch.promote_types(o.dtype, torch.float32))
    a = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    xs = x / a
    var, mean = torch.var_mean(xs, dim=-1, unbiased=False, keepdim=True)
    log_eps = (math.log(eps) + 2 * (log_scale.to(x.dtype)[..., None] - a.log())).clamp(max=80.0) if eps > 0 \
        else None
    y = (xs - mean) * torch.rsqrt(var + log_eps.exp() if log_eps is not None else var)
    return merge_heads(y) * weight.to(x.dtype) + bias.to(x.dtype)


_feature_pair = on_cuda_compiled(feature_pair, lambda: COMPILE_ON_CUDA)
_rescaled_group_norm = on_cuda_compiled(rescaled_group_norm, lambda: COMPILE_ON_CUDA)
COMPILE_NORMALISER_ON_CUDA = True  # the keys' running log-normaliser on the feature kernels' path, compiled on CUDA
# (its own switch: new on 2026-12-07 and not timed, unlike COMPILE_ON_CUDA's functions)
_running_log_norm = on_cuda_compiled(running_log_norm, lambda: COMPILE_NORMALISER_ON_CUDA)


@functools.lru_cache(maxsize=1)
def _fla_usable() -> bool:
    """fla imports (checked once); a broken install counts as absent."""
    try:
        return dla.fla_available()
    except Exception:  # noqa: BLE001 - fla present but broken (version mismatch with torch/triton)
        return False


FUSED_MAX_LEN = 4096  # auto's default for dijiang.fused_max_len (read at each call: a benchmark may change it)
GATED_FLA_PROMPTS = "replayed"  # auto: which prompts with a decoding state (T > 1: a prefill or its chunk) go through
# fla's chunk kernel with one gate per token (dla.fla_gated: no host read, so a CUDA graph can capture it) before the
# fused kernel, on CUDA when fla imports: "always", "never", or "replayed": those inside replayed_prompts(), which
# leanformer.decoding.StaticDecoder opens around a prefill it replays from a CUDA graph (prefill_graph=True).
# Timed on an H100 (2026-12-07 13:56, prefill_profile.py, GPT-2 DiJiang, an 8K prompt in one chunk,
# docs/gpu/misc_2026-12-07/callM): replayed from a graph 9.1 ms eager and 6.2 compiled whole, against the fused
# kernel's 11.5 and 8.5-8.9 (11:18-11:21) and softmax's 6.7 compiled whole in the same call; but run eagerly without
# a graph 50.4 ms of wall time (8.9 of kernels: fla's Python per call) against the fused kernel's 21.5. fla's gated
# forward matched float64 there (float32)
_REPLAYED_PROMPTS = False  # set by replayed_prompts(): the prompts run now are captured in a CUDA graph


@contextmanager
def replayed_prompts(on: bool = True):
    """Within it (``on``), auto sends prompts with a state through fla's gated kernel under
    :data:`GATED_FLA_PROMPTS` "replayed": a prefill that a CUDA graph replays pays no host time for fla's Python,
    which an eager prefill does. The warm-up prefills before a capture run inside it too, so fla's kernels are
    compiled and autotuned before the capture."""
    global _REPLAYED_PROMPTS
    before, _REPLAYED_PROMPTS = _REPLAYED_PROMPTS, bool(on)
    try:
        yield
    finally:
        _REPLAYED_PROMPTS = before


def _gated_prompts() -> bool:
    """Whether auto's prompts with a state take the gated route now (:data:`GATED_FLA_PROMPTS`)."""
    if GATED_FLA_PROMPTS not in ("always", "never", "replayed"):
        raise ValueError(f"dijiang.GATED_FLA_PROMPTS={GATED_FLA_PROMPTS!r}: choose 'always', 'never' or 'replayed'")
    return GATED_FLA_PROMPTS == "always" or (GATED_FLA_PROMPTS == "replayed" and _REPLAYED_PROMPTS)
GATED_FLA_TRAINING_FROM: int | None = 1024  # auto: a full pass (training) of at least this many tokens through fla's
# kernel with one gate per token (dla.fla_gated: exact, no host read, leanformer.ops.gated_attention), before the
# fused kernel, on CUDA when fla imports; None: never. Timed on an H100 (train_profile.py, GPT-2 DiJiang b16 compiled
# under CUDA graphs): with the reversed backward passes 0.964x the fused kernel's tokens/s at seq 1024, 1.102x at
# seq 4096 (2026-12-07 14:02, docs/gpu/misc_2026-12-07/callO); with gated_attention.BACKWARD "fla" the 4K step took
# 46.63 ms, 0.965x Pre-LN's (16:41, callR), and at seq 1024 45.42 against the fused kernel's 45.90 ms, 1.011x (44.59
# against 45.09 back to back, 1.011x; 18:54, callW), for a compile of 188 s against 98 (fla's autotuning). Its
# gradients passed on the H100 (q, k, v against float64, callQ; a model's against the fused route within 5.5e-3 in
# float32, TF32 in both, callU)


def _gated_takes(stateful: bool) -> bool:
    """Whether the gated route (dla.fla_gated) may take a pass: a full pass always; a prompt with a state only
    while no gradient is recorded, since the gated route gives the state it leaves no gradient."""
    return not (stateful and torch.is_grad_enabled())


HALF_DTYPES = (torch.bfloat16, torch.float16)  # the feature dtypes ``auto`` sends to the fused kernel
FUSED_STEP = True  # a decoding step through the one-kernel fused step when it can run (False: the unfused
# feature map + recurrent form + GroupNorm); read at each call (a captured CUDA graph keeps the route it was
# captured with), so a benchmark can time both in one process


class DiJiangAttention(nn.Module):
    """DiJiang token mixer obeying the attention contract; (B, T, C) → (B, T, C).

    Projections ``q, k, v, o`` have the names and shapes of :class:`SoftmaxAttention` (so a converted
    model inherits them); new parameters: ``gate`` (W_G), ``group_norm``, ``feature_map.log_d`` (paper)
    and ``decay_logit`` (learnable decay only).
    """

    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg.dijiang
        self.feature_dim = self.cfg.feature_dim or cfg.head_dim
        if self.feature_dim < 1:
            raise ValueError(f"dijiang.feature_dim={self.cfg.feature_dim} must be >= 1 (or None = head dim)")
        C = cfg.d_model
        add_projections(self, cfg)  # q, k, v, o and RoPE, named as SoftmaxAttention's
        self.feature_map = DiJiangFeatureMap(cfg.head_dim, self.feature_dim, cfg.n_heads, self.cfg.feature_map,
                                             seed=layer_idx)
        gamma0 = default_log_gamma(cfg.n_heads)
        if self.cfg.learnable_decay:  # γ = sigmoid(θ) stays in (0, 1)
            self.decay_logit = nn.Parameter((gamma0 - torch.log(-torch.expm1(gamma0))).float())  # 1-d: no decay
        else:
            self.register_buffer("log_gamma_fixed", gamma0.float())
        self.group_norm = nn.GroupNorm(cfg.n_heads, C, eps=cfg.norm_eps)
        self.gate = make_linear(cfg, "gate", C, C, bias=False)
        self.post_init()

    def post_init(self) -> None:
        """Init of the new parameters (after the model's generic init): W_G as the official code."""
        if isinstance(self.gate, nn.Linear):
            nn.init.xavier_uniform_(self.gate.weight, gain=2 ** -2.5)
        self.group_norm.reset_parameters()
        if self.cfg.learnable_decay:
            with torch.no_grad():
                g = default_log_gamma(self.n_heads)
                self.decay_logit.copy_(g - torch.log(-torch.expm1(g)))

    def input_linears(self) -> tuple[str, ...]:
        """The linears that read the block input x (fused into one product in a decoding copy)."""
        return ("q", "k", "v", "gate")

    def log_gamma(self) -> torch.Tensor:
        """(H,) log γ_h ≤ 0."""
        if self.cfg.learnable_decay:
            return F.logsigmoid(self.decay_logit)
        return self.log_gamma_fixed

    def features(self, q: torch.Tensor, k: torch.Tensor, log_gamma: torch.Tensor, n_init: torch.Tensor | None,
                 out_dtype: torch.dtype | None = None, constant_key_shift: bool = False):
        """(B, H, T, d) q, k → φ(q), φ(k) (B, H, T, m) in ``out_dtype`` (default q's), the keys'
        log-normaliser n (B, H, T) or None, and the output's log-scale (B, H, T) or None: the mix then
        returns exp(log_scale_i) × the true o_i (paper: −n_i − max_f z_{q,i,f}; official: None).
        Through the Triton kernels where :func:`use_feature_kernel` says so (:func:`kernel_feature_pair`,
        which alone takes ``constant_key_shift``), else :func:`feature_pair` (compiled on CUDA)."""
        fm = self.feature_map
        out_dtype = out_dtype or q.dtype
        if use_feature_kernel(q, fm.proj):
            return kernel_feature_pair(q, k, fm.proj, fm.log_d, fm.in_scale, log_gamma, n_init, out_dtype,
                                       constant_key_shift=constant_key_shift)
        return _feature_pair(q, k, fm.proj, fm.log_d, fm.in_scale, log_gamma, n_init, out_dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
               state: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and mix for q, k, v (B, H, T, ·) after RoPE (heads repeated): (o, log_scale), o = exp(log_scale)
        × the true output (B, H, T, d) (log_scale None: o is the output). ``state`` is updated in place.
        A full pass through fla's kernel takes the paper map's keys at a constant shift
        (:func:`kernel_feature_pair`), which needs the route known before the features."""
        B, H, T, _ = v.shape
        features_like = v.new_empty(()).expand(B, H, T, self.feature_dim)  # the features' shape and dtype
        name = self.form(T, v.device, state is not None, features_like, v)
        n_init = state.get("n") if state is not None and not starts_afresh(state) else None
        fq, fk, n, log_scale = self.features(q, k, log_gamma, n_init, v.dtype,
                                             constant_key_shift=name == "fla_chunk" and state is None)
        return self.mix(fq, fk, v, log_gamma, n, state, name), log_scale

    def form(self, T: int, device: torch.device, stateful: bool, q: torch.Tensor | None = None,
             v: torch.Tensor | None = None, state: dict | None = None) -> str:
        """The name in :data:`dla.FORMS` that runs ``T`` tokens on ``device`` (cfg.dijiang.mode), or
        ``"fused_step"``: the layer's one-kernel decoding step (:meth:`fused_step`, not a form of ``dla``).

        ``auto``, ``parallel`` and ``fused``: a decoding step (``stateful``, T = 1) is ``fused_step`` when
        :data:`FUSED_STEP` is on, the caller passes q, v (B, H(_kv), 1, d) *and* the layer's ``state`` (its
        dict, empty before the first token), :meth:`fused_step_reason` finds nothing against them, and the
        device is CUDA (mode ``fused``: also the CPU under ``TRITON_INTERPRET=1``); else ``recurrent``, with
        no warning (it is the reference). A prompt with a state (T > 1) runs ``fla_gated`` on CUDA when
        :data:`GATED_FLA_PROMPTS` sends it there (:func:`replayed_prompts`), fla imports and no gradient is
        recorded; a full pass of at least :data:`GATED_FLA_TRAINING_FROM` tokens likewise.
        Otherwise, on CUDA, for bf16/fp16 features (the kernel's float32 runs without tensor cores and was not
        timed), when Triton imports and the fused kernel takes ``q`` (B, H, T, m) and ``v`` (B, H, T, d)
        (:func:`dla.fused_supported`; not considered when they are not given), the fused kernel up to
        ``fused_max_len`` (None: FUSED_MAX_LEN), for a full pass and for a prompt continuing a state alike.
        Otherwise a prompt with a state runs ``chunk``; a full pass runs ``parallel`` up to ``parallel_max_len``
        (None: 256 tokens on CPU, 1024 on CUDA) and beyond it fla's kernel on CUDA when fla imports, else the fused
        kernel when it takes the inputs (never the unfused PyTorch chunk form on a GPU that can run it), else
        ``chunk``. Measured on an H200 (docs/benchmarks.md, 2026-12-04; fwd+bwd, B 4, H 12, paper map): the first
        kernel 3.32 ms against fla's 4.17 at 4K and 7.90 against 4.17 at 8K; today's default (factored) 2.90 against
        3.82 at 4K and 19.71 against 6.54 at 16K. With the feature-map kernels (H100, 2026-12-05, paper map at 4K):
        a lone call's wall time 3.54 (fused) against 4.03 ms (fla), but its GPU time 1.39 against 0.75 ms; which of
        the two a training step at 4K prefers is not measured yet, so the default stays. Mode ``fla``: its
        recurrent kernel for a step, its chunk kernel otherwise; mode ``gated``: ``fla_gated`` for a full pass and
        for a prompt without gradients (a step: ``recurrent``; a prompt with a state under gradients: ``chunk``);
        modes ``parallel`` and ``fused`` with a state: ``recurrent`` for a step, else chunk (parallel) or the
        fused kernel (fused); mode ``fused`` on inputs the kernel refuses runs ``parallel`` (``chunk`` with a
        state), with a warning."""
        mode = self.cfg.mode
        if stateful and T == 1 and mode in ("auto", "parallel", "fused"):
            if (state is not None and q is not None and v is not None and (device.type == "cuda" or mode == "fused")
                    and self.fused_step_reason(q, v, state) is None):
                return "fused_step"
            return "recurrent"
        if mode == "auto":
            gated = _gated_prompts() if stateful else (GATED_FLA_TRAINING_FROM is not None
                                                        and T >= GATED_FLA_TRAINING_FROM)
            if T > 1 and gated and _gated_takes(stateful) and device.type == "cuda" and _fla_usable():
                return "fla_gated"
            fused = (device.type == "cuda" and q is not None and v is not None and q.dtype in HALF_DTYPES
                     and dla.fused_supported(q, v) is None)
            if fused and T <= (self.cfg.fused_max_len or FUSED_MAX_LEN):
                return "fused"
            if stateful:
                return "chunk"
            limit = self.cfg.parallel_max_len or (1024 if device.type == "cuda" else 256)
            if T <= limit:
                return "parallel"
            if device.type == "cuda" and _fla_usable():
                return "fla_chunk"
            return "fused" if fused else "chunk"
        if mode == "fla":
            return "fla_recurrent" if stateful and T == 1 else "fla_chunk"
        if mode == "gated":  # a step: the recurrent form; what the gated route cannot take: chunk
            if stateful and T == 1:
                return "recurrent"
            return "fla_gated" if _gated_takes(stateful) else "chunk"
        if stateful and mode == "parallel":  # a prompt with a state: chunkwise, continuing from it
            return "chunk"
        if mode == "fused" and q is not None and v is not None:
            reason = dla.fused_supported(q, v)
            if reason is not None:
                import warnings  # shown once per call site by Python's default filter

                fallback = "chunk" if stateful else "parallel"
                warnings.warn(f"dijiang mode='fused' cannot run these inputs ({reason}); using '{fallback}'",
                              stacklevel=3)
                return fallback
        return mode

    def fused_step_reason(self, q: torch.Tensor, v: torch.Tensor, state: dict) -> str | None:
        """Why :meth:`fused_step` cannot run a step with q (B, H, 1, d), v (B, H_kv, 1, d) and this layer's
        decoding ``state`` (:func:`leanformer.ops.fused_decay_step.step_supported`, plus: the switch
        :data:`FUSED_STEP`, a gradient that would be needed, a state of another layout), or None."""
        if not FUSED_STEP:
            return "switched off (leanformer.layers.dijiang.FUSED_STEP = False)"
        fm, gn = self.feature_map, self.group_norm
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
                q, v, fm.log_d, getattr(self, "decay_logit", None), gn.weight, gn.bias)):
            return "a gradient is needed (the fused step is for inference: run under torch.no_grad())"
        if gn.weight is None or gn.bias is None:
            return "the GroupNorm has no affine weight and bias"
        S, n = state.get("S"), state.get("n")
        B, H, m, d = q.shape[0], q.shape[1], self.feature_dim, v.shape[-1]
        if S is not None and tuple(S.shape) != (B, H, m, d):
            return f"state S has shape {tuple(S.shape)}, expected {(B, H, m, d)}"
        if fm.log_d is not None and (S is None) != (n is None):
            return "the state holds only one of S and n"
        if n is not None and tuple(n.shape) != (B, H):
            return f"state n has shape {tuple(n.shape)}, expected {(B, H)}"
        decay = self.decay_logit if self.cfg.learnable_decay else self.log_gamma_fixed
        return fds.step_supported(q, q, v, fm.proj, S, n if fm.log_d is not None else None,  # k: q's projection
                                  dict(log_d=fm.log_d, log_gamma=decay, weight=gn.weight, bias=gn.bias))

    def fused_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: dict,
                   out_dtype: torch.dtype, start=0, gate: torch.Tensor | None = None) -> torch.Tensor:
        """One decoding step in one kernel (:func:`leanformer.ops.fused_decay_step.decay_step`): q (B, H, 1, d),
        k, v (B, H_kv, 1, d) *before* RoPE (not repeated for grouped-query heads), at position ``start`` (as
        :meth:`leanformer.layers.rope.Rotary.rotate` reads it: an int, a (1,) tensor, static positions) →
        the GroupNorm-ed heads (B, 1, H·d) in ``out_dtype``. With rotary embeddings the kernel rotates q and k
        (:data:`leanformer.ops.fused_decay_step.ROPE_IN_KERNEL`; False: :class:`Rotary` rotates them first).
        A static state's S and n (:func:`leanformer.decoding.is_static`: what a CUDA graph reads and writes)
        are updated in place; an eager state gets new tensors, as the unfused path gives it (the kernel writes
        copies), so that tensors taken from it earlier keep their values. Before a first token S = 0 and
        n = −inf. ``gate`` (B, 1, H·d): the kernel returns silu(gate) ⊙ the heads instead (the layer's output
        gate, :data:`leanformer.ops.fused_decay_step.GATE_IN_KERNEL`)."""
        fm, gn = self.feature_map, self.group_norm
        paper = fm.log_d is not None
        S, n = state.get("S"), state.get("n") if paper else None
        first = S is None
        if first:
            B, H, _, d = q.shape
            S = q.new_zeros(B, H, self.feature_dim, d, dtype=torch.float32)
            n = q.new_full((B, H), float("-inf"), dtype=torch.float32) if paper else None
        elif not is_static(state):
            S, n = S.clone(), n.clone() if n is not None else None
        elif starts_afresh(state):  # a rewound static cache: a new sequence, its buffers zeroed in place
            S.zero_()
            if n is not None:
                n.fill_(float("-inf"))
        learnable = self.cfg.learnable_decay
        rope = {}
        if self.rotary is not None and self.rotary.rotary_dim > 0:
            if fds.ROPE_IN_KERNEL and self.rotary.rotary_dim % 2 == 0:
                rope = dict(zip(("cos", "sin", "position"), self.rotary.step_tables(start, q.device, q.dtype)))
            else:
                q, k = self.rotary(q, k, start)
        o = fds.decay_step(q, k, v, fm.proj, fm.log_d, self.decay_logit if learnable else self.log_gamma_fixed,
                           S, n, gn.weight, gn.bias, in_scale=fm.in_scale, eps=gn.eps, decay_logit=learnable,
                           out_dtype=out_dtype, gate=gate, **rope)
        if first or not is_static(state):
            store_state(state, "S", S)
            if n is not None:
                store_state(state, "n", n)
        return o

    def mix(self, fq, fk, v, log_gamma, n, state: dict | None, name: str | None = None) -> torch.Tensor:
        """Run the form ``name`` (default: the one :meth:`form` names; one lookup in :data:`dla.FORMS`);
        updates ``state`` in place."""
        name = name or self.form(v.shape[2], v.device, state is not None, fq, v)
        fn = dla.FORMS[name]
        kw = {"chunk_size": self.cfg.chunk_size} if name == "chunk" else {}
        if state is None:
            if name == "fused":  # a full pass never reads the final state
                kw["output_final_state"] = False
            return fn(fq, fk, v, log_gamma, log_norm=n, **kw)[0]
        prior = {} if starts_afresh(state) else state  # a rewound static cache's buffers hold an earlier sequence
        o, S = fn(fq, fk, v, log_gamma, prior.get("S"), n, prior.get("n"), **kw)
        store_state(state, "S", S)  # in place when the state is static (pre-allocated, CUDA graphs)
        if n is not None:
            store_state(state, "n", n[..., -1])
        return o

    def normalise(self, o: torch.Tensor, log_scale: torch.Tensor | None) -> torch.Tensor:
        """Per-head GroupNorm of o (B, H, T, d) → (B, T, C), independent of the stabiliser's rescale."""
        B, H, T, d = o.shape
        if log_scale is None:
            return self.group_norm(merge_heads(o).reshape(B * T, H * d)).view(B, T, H * d)
        gn = self.group_norm
        return _rescaled_group_norm(o, log_scale, gn.weight, gn.bias, gn.eps)

    def forward(self, x: torch.Tensor, state: dict | None = None, attention_mask: torch.Tensor | None = None,
                input_norm: nn.Module | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C); state: this layer's decoding cache or None → (B, T, C). ``input_norm``, ``residual``:
        as :meth:`leanformer.layers.attention.SoftmaxAttention.forward` (a decoding copy's Pre-LN block).

        ``attention_mask`` (B, T), 1 = token, 0 = padding, may only pad at the end of each row: causal
        attention never lets a token see a later position, so the tokens' outputs are those of the
        unpadded sequence without masking anything. Padding before a token would change the decay
        distances γ^(i−j) across the gap, and is refused."""
        if attention_mask is not None:
            if state is not None:
                raise ValueError("DiJiang attention: attention_mask is for a full pass, not with a decoding cache")
            keep = attention_mask.bool()
            if bool((keep[:, 1:] & ~keep[:, :-1]).any()):
                raise ValueError("DiJiang attention takes padding only at the end of each sequence (right "
                                 "padding: attention_mask rows of 1s then 0s)")
        B, T, C = x.shape
        static = is_static(state)
        # a static cache's shared positions (their rotary tables are gathered once per call for all layers);
        # it publishes every call's positions itself (decoding.py), so ``pos`` is advanced only otherwise
        start = state["positions"] if static else state.get("pos", 0) if state is not None else 0
        step = state is not None and T == 1
        # a step rotates q and k below, or in the fused kernel
        q, k, v, g = project_qkv(self, x, start, rotate=not step, extra=("gate",), norm=input_norm)
        if step and self.form(1, v.device, True, q, v, state) == "fused_step":
            gate_inside = fds.GATE_IN_KERNEL
            o = self.fused_step(q, k, v, state, x.dtype, start, gate=g if gate_inside else None)
            if not static:
                state["pos"] = start + T
            return out_projection(self.o, o if gate_inside else F.silu(g) * o, residual)
        if step and self.rotary is not None:
            q, k = self.rotary(q, k, start)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o, log_scale = self.attend(q, k, v, self.log_gamma(), state)
        if state is not None and not static:
            state["pos"] = start + T
        o = self.normalise(o, log_scale)
        return out_projection(self.o, F.silu(g) * o.to(x.dtype), residual)
