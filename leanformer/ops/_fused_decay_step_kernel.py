"""The Triton kernel of :mod:`leanformer.ops.fused_decay_step`: DiJiang's one-token decoding step, one program
per (batch row, head), from q, k, v (after RoPE, or rotated here: ``ROPE``) to the head's GroupNorm-ed output
(times silu of the output gate: ``GATE``).

Imported only by that module, on its first call, so that Triton is needed only when the kernel runs and
``TRITON_INTERPRET`` is read then. It sits at module level because Triton's interpreter runs a kernel's
source again with its module's globals. Equations, shapes and strides: :mod:`leanformer.ops.fused_decay_step`.

Every product is an element-wise multiply and a ``tl.sum`` in float32 (no ``tl.dot``: one token is a
matrix-vector product, and float32 sums keep the interpreter exact for bf16 inputs). The feature axis is
walked in chunks of ``BLOCK_F`` features, twice: the first pass takes the statistics that need every
feature (the maxima of z_q and z_k; the softmax sums of the official map), the second recomputes each
chunk's features, updates that chunk of the state S in place and accumulates o = fq·S. A (D, BLOCK_F)
projection tile and a (BLOCK_F, D) state tile are all a program holds at once.
"""

import triton
import triton.language as tl


@triton.jit
def _project(q, k, P, LD, h, offs_d, offs, spd, spm, sldh, sldm, PAPER: tl.constexpr):
    """z_q, z_k for the features ``offs``: (x · in_scale) @ P[:, offs] (+ log D[h, offs], paper), float32."""
    p = tl.load(P + offs_d[:, None] * spd + offs[None, :] * spm).to(tl.float32)  # (D, BLOCK_F)
    zq = tl.sum(q[:, None] * p, axis=0)
    zk = tl.sum(k[:, None] * p, axis=0)
    if PAPER:
        ld = tl.load(LD + h * sldh + offs * sldm).to(tl.float32)
        zq = zq + ld
        zk = zk + ld
    return zq, zk


@triton.jit
def _log_sigmoid(x):
    """log σ(x) = min(x, 0) − log1p(e^−|x|), the log1p accurate for a small argument (Goldberg's
    log(u)·y/(u − 1), u = 1 + y rounded): γ = σ(x) near 1 has a tiny log γ."""
    y = tl.exp(-tl.abs(x))
    u = 1.0 + y
    log1p = tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))
    return tl.minimum(x, 0.0) - log1p


@triton.jit
def _round(x, dt: tl.constexpr):
    """float32 x rounded to ``dt`` (to nearest, ties to even) and back to float32. bfloat16 is rounded on
    the bits: Triton's interpreter truncates a float32 → bfloat16 cast (checked with Triton 3.6), the GPU
    rounds it to nearest; done by hand both agree with PyTorch's rounding."""
    if dt == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536: 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN kept
    return x.to(dt).to(tl.float32)


@triton.jit
def _rotate(X, sxd, offs_d, c, s, R: tl.constexpr):
    """Rotary's rotate-half (:meth:`leanformer.layers.rope.Rotary.rotate`) of one head vector at ``X``: the
    first R channels as ``x·cos + (−x₂, x₁)·sin`` (c, s: (D,) float32, the cos/sin row padded with 1, 0), the
    rest unchanged; each product and the sum rounded to X's dtype as Rotary's eager ops round them (so the
    kernel's result is that of RoPE applied before it) → (D,) float32."""
    half: tl.constexpr = R // 2
    x = tl.load(X + offs_d * sxd).to(tl.float32)
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
    xp = tl.load(X + partner * sxd, mask=offs_d < R, other=0.0).to(tl.float32)
    rot = tl.where(offs_d < half, -xp, xp)
    dt = X.dtype.element_ty
    y = _round(_round(x * c, dt) + _round(rot * s, dt), dt)
    return tl.where(offs_d < R, y, x)


@triton.jit
def step_kernel(Q, K, V, P, LD, LG, S, N, W, GB, O, COS, SIN, POS, G,
                sqb, sqh, sqd, skb, skh, skd, svb, svh, svd, spd, spm, sldh, sldm, slg,
                ssb, ssh, ssm, ssd, snb, snh, sw, sgb, sob, soc, scr, scc, ssr, ssc, sgtb, sgtc,
                H, REP, n_rows, in_scale, eps, log_eps,
                M: tl.constexpr, D: tl.constexpr, BLOCK_F: tl.constexpr, PAPER: tl.constexpr,
                DECAY_LOGIT: tl.constexpr, HAS_EPS: tl.constexpr, ROPE: tl.constexpr, R: tl.constexpr,
                POS_PTR: tl.constexpr, GATE: tl.constexpr, Y_ROUND: tl.constexpr, SINGLE: tl.constexpr = False,
                PDL: tl.constexpr = False):
    bh = tl.program_id(0).to(tl.int64)  # int64: b·stride may pass 2^31 for a large state
    b = bh // H
    h = bh % H
    hk = h // REP  # grouped-query: query head h reads key/value head h // REP (repeat_interleave's order)
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, BLOCK_F)
    s_base = S + b * ssb + h * ssh
    if PDL:  # a programmatic dependent launch: the next such kernel may launch now; every input (q, k, v, the
        tl.extra.cuda.gdc_launch_dependents()  # gate, and S itself: a first token's zeros or a copied state
        tl.extra.cuda.gdc_wait()  # are written by the kernel just before) is read after the previous one ends
    if SINGLE:  # one chunk (BLOCK_F = M): the state's read is issued first, beside q, k and v's
        s_ptr = s_base + offs_f[:, None] * ssm + offs_d[None, :] * ssd
        s_old = tl.load(s_ptr)
    if ROPE:  # the step's row of the cos/sin tables: row position[0] (clamped into the table), or row 0
        if POS_PTR:
            row = tl.minimum(tl.maximum(tl.load(POS).to(tl.int64), 0), n_rows - 1)
        else:
            row = 0
        cos = tl.load(COS + row * scr + offs_d * scc, mask=offs_d < R, other=1.0).to(tl.float32)
        sin = tl.load(SIN + row * ssr + offs_d * ssc, mask=offs_d < R, other=0.0).to(tl.float32)
        q = _rotate(Q + b * sqb + h * sqh, sqd, offs_d, cos, sin, R)
        k = _rotate(K + b * skb + hk * skh, skd, offs_d, cos, sin, R)
    else:
        q = tl.load(Q + b * sqb + h * sqh + offs_d * sqd).to(tl.float32)
        k = tl.load(K + b * skb + hk * skh + offs_d * skd).to(tl.float32)
    # float scalars are cast: Inductor declares a Python float argument float64 (Triton: float32), and a
    # float64 product would make the loop-carried maxima change type (a compile error under torch.compile)
    # (the casts come after the product: the interpreter passes a Python float, which has no ``.to``)
    q = (q * in_scale).to(tl.float32)
    k = (k * in_scale).to(tl.float32)
    v = tl.load(V + b * svb + hk * svh + offs_d * svd).to(tl.float32)
    lg = tl.load(LG + h * slg).to(tl.float32)
    if DECAY_LOGIT:
        lg = _log_sigmoid(lg)

    # pass 1: per-lane running statistics over the feature chunks, reduced after the loop (SINGLE: the one
    # chunk's z_q, z_k are kept for pass 2; its statistics are the loop's, value for value)
    mq_l = tl.full((BLOCK_F,), float("-inf"), tl.float32)
    mk_l = tl.full((BLOCK_F,), float("-inf"), tl.float32)
    sq_l = tl.zeros((BLOCK_F,), tl.float32)
    sk_l = tl.zeros((BLOCK_F,), tl.float32)
    if SINGLE:
        zq1, zk1 = _project(q, k, P, LD, h, offs_d, offs_f, spd, spm, sldh, sldm, PAPER)
    else:  # unused: the loop body below must see the names whichever branch is compiled
        zq1 = tl.zeros((BLOCK_F,), tl.float32)
        zk1 = zq1
    for f0 in range(0, M, BLOCK_F):
        if SINGLE:
            zq = zq1
            zk = zk1
        else:
            zq, zk = _project(q, k, P, LD, h, offs_d, f0 + offs_f, spd, spm, sldh, sldm, PAPER)
        if PAPER:
            mq_l = tl.maximum(mq_l, zq)
            mk_l = tl.maximum(mk_l, zk)
        else:  # online softmax sums (the lane's max is finite after the first chunk: no −inf − −inf)
            mq_new = tl.maximum(mq_l, zq)
            mk_new = tl.maximum(mk_l, zk)
            sq_l = sq_l * tl.exp(mq_l - mq_new) + tl.exp(zq - mq_new)
            sk_l = sk_l * tl.exp(mk_l - mk_new) + tl.exp(zk - mk_new)
            mq_l = mq_new
            mk_l = mk_new
    mq = tl.max(mq_l, axis=0)
    mk = tl.max(mk_l, axis=0)
    if PAPER:
        n_old = tl.load(N + b * snb + h * snh)  # −inf: no state yet
        n_new = tl.maximum(n_old + lg, mk)      # the keys' running log-normaliser
        carry = tl.exp(n_old + lg - n_new)      # ≤ 1; 0 for a first token
        q_den = 1.0
        k_den = 1.0
        k_shift = n_new
    else:
        carry = tl.exp(lg)
        q_den = tl.sum(sq_l * tl.exp(mq_l - mq), axis=0)
        k_den = tl.sum(sk_l * tl.exp(mk_l - mk), axis=0)
        k_shift = mk

    # pass 2: features, the state chunk by chunk (in place), o = fq · S
    if SINGLE:
        fq = tl.exp(zq1 - mq) / q_den
        fk = tl.exp(zk1 - k_shift) / k_den
        s = s_old * carry + fk[:, None] * v[None, :]
        tl.store(s_ptr, s)
        o = tl.sum(fq[:, None] * s, axis=0)
    else:
        o = tl.zeros((D,), tl.float32)
        for f0 in range(0, M, BLOCK_F):
            offs = f0 + offs_f
            zq, zk = _project(q, k, P, LD, h, offs_d, offs, spd, spm, sldh, sldm, PAPER)
            fq = tl.exp(zq - mq) / q_den
            fk = tl.exp(zk - k_shift) / k_den
            s_ptr = s_base + offs[:, None] * ssm + offs_d[None, :] * ssd
            s = tl.load(s_ptr) * carry + fk[:, None] * v[None, :]
            tl.store(s_ptr, s)
            o += tl.sum(fq[:, None] * s, axis=0)

    # GroupNorm of the head (one group), exact whatever the stabiliser's rescale (paper)
    if PAPER:
        tl.store(N + b * snb + h * snh, n_new)
        a = tl.maximum(tl.max(tl.abs(o), axis=0), 1.1754943508222875e-38)  # float32's smallest normal
        x = o / a
    else:
        x = o
    mean = tl.sum(x, axis=0) / D
    xc = x - mean
    var = tl.sum(xc * xc, axis=0) / D
    if PAPER:
        if HAS_EPS:  # ε·(r/a)², r = exp(log_scale) = exp(−n − max_f z_q), in log space, capped at e^80
            log_scale = -(n_new + mq)
            var = var + tl.exp(tl.minimum((log_eps + 2.0 * (log_scale - tl.log(a))).to(tl.float32), 80.0))
    else:
        var = (var + eps).to(tl.float32)
    y = xc / tl.sqrt(var)
    chan = h * D + offs_d
    w = tl.load(W + chan * sw).to(tl.float32)
    gb = tl.load(GB + chan * sgb).to(tl.float32)
    y = y * w + gb
    if GATE:  # silu(g) ⊙ y rounded as the layer's eager ops round them: silu(g) to g's dtype, y to the
        g = tl.load(G + b * sgtb + chan * sgtc).to(tl.float32)  # GroupNorm's output dtype (Y_ROUND: 0 float32,
        if Y_ROUND == 1:                                        # 1 bfloat16, 2 float16)
            y = _round(y, tl.bfloat16)
        elif Y_ROUND == 2:
            y = _round(y, tl.float16)
        y = _round(g / (1.0 + tl.exp(-g)), G.dtype.element_ty) * y
    out_dt = O.dtype.element_ty  # rounded by hand: the interpreter's cast would truncate where the GPU rounds
    tl.store(O + b * sob + chan * soc, _round(y, out_dt).to(out_dt))
