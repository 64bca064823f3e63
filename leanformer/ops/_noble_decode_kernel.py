"""The Triton kernel of :mod:`leanformer.ops.noble_decode`: a NOBLE layer for a few rows of x in one launch.

One program per ``BLOCK_N`` output columns (as :mod:`leanformer.ops._skinny_linear_kernel`). It streams its
(BLOCK_N, K) slice of W and the whole (R, K) W_down beside it against the tiles of x, accumulating

    main = x Wᵀ (BLOCK_M, BLOCK_N)   and   z = x W_downᵀ (BLOCK_M, R)                     (float32)

then rounds ``main + b`` and ``z + b_down`` to the output dtype (as the layer's two ``F.linear``s do), runs
CosNet on z in float32 (:mod:`leanformer.ops._cosnet_kernels`' function: cos(ω₂ (cos(ω₁ z + φ₁) Mᵀ + c) + φ₂)),
rounds s, and adds the branch ``s W_upᵀ`` for its columns (rounded, as ``up(s)``) to the rounded main
output, rounding the sum once more (``main + branch`` of :meth:`NobleLinear._combine`). Every program
recomputes z: W_down is r·K elements (GPT-2 small, r 32: 48 KB in bf16), read from L2 after the first.

``noble_decode_grouped_kernel``: G layers on the same x (an attention's q, k, v) in one launch, stacked along
the output axis. W (ΣN_g, K), Bias (ΣN_g,), WU (ΣN_g, R) and Y (M, ΣN_g) hold group g's columns at
``OFFS[g] : OFFS[g + 1]`` (OFFS: (G + 1,) int32); WD (G·R, K) and BD (G·R,) its R rows from ``g·R``; W1, P1,
C, W2, P2 (G, R) and MM (G, R, R) its CosNet at row g. The grid is (G, column blocks of the widest group):
program (g, j) computes group g's z and its columns ``OFFS[g] + j·BLOCK_N ...`` below ``OFFS[g + 1]`` (a
narrower group's last programs store nothing) with the single-layer kernel's body (:func:`_noble_columns`):
each column is computed as that kernel computes it (bit for bit equal under the interpreter, tested).

The split-K route (:data:`leanformer.ops.noble_decode.SPLIT_K`) is two launches: ``noble_partials_kernel``
writes float32 partial products of W's columns and W_down's rows over S parts of K (grid (column blocks of
both, S): a long K on few column blocks runs on S times more programs), and ``noble_finish_kernel`` sums them
per output column block and runs the single-layer kernel's epilogue (:func:`_branch_and_store`).
"""

import triton
import triton.language as tl

from leanformer.ops._cosnet_kernels import _cosnet, _load_params
from leanformer.ops._fused_decay_kernels import mm
from leanformer.ops._fused_decay_step_kernel import _round
from leanformer.ops._skinny_linear_kernel import _activation, _load_w, _load_x, _product_tile


@triton.jit
def _noble_columns(X, W, Bias, WD, BD, W1, P1, MM, C, W2, P2, WU, Y, M, K, offs_n, n_ok,
                   sxm, sxk, swn, swk, sdr, sdk, sun, sur, sym, syn,
                   HAS_BIAS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
                   PREFETCH: tl.constexpr, ACT: tl.constexpr, COS_PRECISION: tl.constexpr):
    """One layer's output columns ``offs_n`` (BLOCK_N,) for every row of x (``n_ok``: the layer's columns).
    ``PREFETCH``: the epilogue's loads (CosNet's parameters, b_down and this program's (BLOCK_N, R) slice of
    W_up) are issued before the K loop, so their latency hides behind it instead of following it; the values
    and arithmetic are the same either way. ``ACT`` (0: none; the few-row kernel's codes: 1 GELU, 2 GELU tanh,
    3 ReLU): the activation of the rounded sum, rounded again (the layer, then the eager activation)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    r_ok = offs_r < R
    if PREFETCH:
        w1, p1, m, c, w2, p2, bd, wu = _epilogue_loads(BD, W1, P1, MM, C, W2, P2, WU, offs_n, n_ok, sun, sur, R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = _load_x(X, offs_m, m_ok, kk, K, sxm, sxk, EVEN_K)
        acc += mm(x, tl.trans(_load_w(W, offs_n, n_ok, kk, K, swn, swk, EVEN_K)), "ieee", INTERPRET)
        acc_z += mm(x, tl.trans(_load_w(WD, offs_r, r_ok, kk, K, sdr, sdk, EVEN_K)), "ieee", INTERPRET)
    dt = Y.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    main = _round(acc, dt)
    if not PREFETCH:
        w1, p1, m, c, w2, p2, bd, wu = _epilogue_loads(BD, W1, P1, MM, C, W2, P2, WU, offs_n, n_ok, sun, sur, R)
    _branch_and_store(main, _round(acc_z + bd[None, :], dt), w1, p1, m, c, w2, p2, wu, Y, offs_m, m_ok, offs_n, n_ok,
                      sym, syn, ACT, INTERPRET, COS_PRECISION)


@triton.jit
def _epilogue_loads(BD, W1, P1, MM, C, W2, P2, WU, offs_n, n_ok, sun, sur, R: tl.constexpr):
    """What the epilogue reads besides the products: CosNet's parameters (float32, :func:`_load_params`), b_down
    (R,) in float32 and W_up's (BLOCK_N, R) slice for columns ``offs_n`` (zero where not ``n_ok``)."""
    offs_r = tl.arange(0, R)
    w1, p1, m, c, w2, p2 = _load_params(W1, P1, MM, C, W2, P2, R)
    bd = tl.load(BD + offs_r).to(tl.float32)
    wu = tl.load(WU + offs_n[:, None] * sun + offs_r[None, :] * sur, mask=n_ok[:, None], other=0.0)
    return w1, p1, m, c, w2, p2, bd, wu


@triton.jit
def _branch_and_store(main, z, w1, p1, m, c, w2, p2, wu, Y, offs_m, m_ok, offs_n, n_ok, sym, syn,
                      ACT: tl.constexpr, INTERPRET: tl.constexpr, COS_PRECISION: tl.constexpr):
    """The layer's output from its rounded main product (BLOCK_M, BLOCK_N) and its rounded z (BLOCK_M, R), both
    float32: CosNet (float32, rounded once), the branch ``s W_upᵀ`` (rounded), their sum (rounded), ``ACT``'s
    activation (rounded again), stored to Y."""
    dt = Y.dtype.element_ty
    s = _round(_cosnet(z, w1, p1, m, c, w2, p2, COS_PRECISION), dt)  # CosNet's output in the layer's dtype
    branch = _round(mm(s.to(dt), tl.trans(wu), "ieee", INTERPRET), dt)  # up(s)
    y = _round(main + branch, dt)
    if ACT != 0:
        y = _round(_activation(y, ACT), dt)
    tl.store(Y + offs_m[:, None] * sym + offs_n[None, :] * syn, y.to(dt), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def noble_decode_kernel(X, W, Bias, WD, BD, W1, P1, MM, C, W2, P2, WU, Y, M, N, K,
                        sxm, sxk, swn, swk, sdr, sdk, sun, sur, sym, syn,
                        HAS_BIAS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
                        PREFETCH: tl.constexpr = False, ACT: tl.constexpr = 0, COS_PRECISION: tl.constexpr = "ieee"):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    _noble_columns(X, W, Bias, WD, BD, W1, P1, MM, C, W2, P2, WU, Y, M, K, offs_n, offs_n < N,
                   sxm, sxk, swn, swk, sdr, sdk, sun, sur, sym, syn, HAS_BIAS, R, BLOCK_M, BLOCK_N, BLOCK_K,
                   EVEN_K, INTERPRET, PREFETCH, ACT, COS_PRECISION)


@triton.jit
def noble_decode_grouped_kernel(X, W, Bias, WD, BD, W1, P1, MM, C, W2, P2, WU, Y, OFFS, M, K,
                                sxm, sxk, swn, swk, sdr, sdk, sun, sur, sym, syn,
                                HAS_BIAS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                                INTERPRET: tl.constexpr, PREFETCH: tl.constexpr = False,
                                ACT: tl.constexpr = 0, COS_PRECISION: tl.constexpr = "ieee"):
    g = tl.program_id(0)
    offs_n = tl.load(OFFS + g) + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    _noble_columns(X, W, Bias, WD + g * R * sdr, BD + g * R, W1 + g * R, P1 + g * R, MM + g * R * R, C + g * R,
                   W2 + g * R, P2 + g * R, WU, Y, M, K, offs_n, offs_n < tl.load(OFFS + g + 1),
                   sxm, sxk, swn, swk, sdr, sdk, sun, sur, sym, syn, HAS_BIAS, R, BLOCK_M, BLOCK_N, BLOCK_K,
                   EVEN_K, INTERPRET, PREFETCH, ACT, COS_PRECISION)


@triton.jit
def noble_decode_shared_kernel(X, W, Bias, WD, BD, W1, P1, MM, C, W2, P2, WU, Y, OFFS, Z, SYNC, M, K, G, BLOCKS,
                               sxm, sxk, swn, swk, sdr, sdk, sun, sur, sym, syn, szm,
                               HAS_BIAS: tl.constexpr, R: tl.constexpr, RZ: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                               INTERPRET: tl.constexpr, ACT: tl.constexpr = 0,
                               COS_PRECISION: tl.constexpr = "ieee"):
    """G layers (one for the single-layer op) with z computed once per layer instead of once per program.

    SYNC (G + 2,) int32, zero at launch: a ready count per layer, a ticket and a count of finished programs.
    Each program first takes a ticket (an atomic add on SYNC[G]), and the ticket, not the program id, gives
    its part, so a program only ever waits for programs that started before it:

    * the first G·(R / RZ) tickets are producers: ticket t computes RZ columns of layer g = t // (R / RZ)'s
      z = x W_downᵀ + b_down (rounded to Y's dtype, as :func:`_noble_columns` rounds it), stores them in Z
      (M, G·R), and counts itself in SYNC[g] (release, after a barrier: every thread's stores first);
    * the other G·BLOCKS tickets are column blocks (layer g = c // BLOCKS, block c % BLOCKS) computed as
      :func:`_noble_columns` does, but with no W_down in their K loop: after the main product each waits until
      SYNC[g] counts all R / RZ producers of its layer (acquire), reads z from Z (from L2) and runs CosNet and
      the branch.

    A producer never waits, and every producer a block waits for holds an earlier ticket, so it has started:
    no program waits on one that may not be running (no co-residency needed). Each program counts itself in
    SYNC[G + 1] last; the one that completes the count (every other program has read SYNC for the last time)
    stores zeros over SYNC for the next launch. One launch at a time per SYNC buffer (one decoder per model
    copy on one stream, as a CUDA graph replays it).
    """
    parts = R // RZ
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    dt = Y.dtype.element_ty
    ticket = tl.atomic_add(SYNC + G, 1, sem="relaxed")
    if ticket < G * parts:  # a producer (its names differ from the block's: a branch's types are its own)
        group = ticket // parts
        rows = group * R + (ticket % parts) * RZ + tl.arange(0, RZ)
        rows_ok = rows < G * R
        acc_part = tl.zeros((BLOCK_M, RZ), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kp = k0 + offs_k
            xp = _load_x(X, offs_m, m_ok, kp, K, sxm, sxk, EVEN_K)
            acc_part += mm(xp, tl.trans(_load_w(WD, rows, rows_ok, kp, K, sdr, sdk, EVEN_K)), "ieee", INTERPRET)
        z_part = _round(acc_part + tl.load(BD + rows).to(tl.float32)[None, :], dt)
        tl.store(Z + offs_m[:, None] * szm + rows[None, :], z_part.to(dt), mask=m_ok[:, None])
        tl.debug_barrier()  # every thread's stores before the one thread's release (a scalar atomic runs once)
        tl.atomic_add(SYNC + group, 1, sem="release")
    else:
        c = ticket - G * parts
        g = c // BLOCKS
        offs_n = tl.load(OFFS + g) + (c % BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < tl.load(OFFS + g + 1)
        offs_r = tl.arange(0, R)
        w1, p1, m, cc, w2, p2 = _load_params(W1 + g * R, P1 + g * R, MM + g * R * R, C + g * R, W2 + g * R,
                                             P2 + g * R, R)
        wu = tl.load(WU + offs_n[:, None] * sun + offs_r[None, :] * sur, mask=n_ok[:, None], other=0.0)
        main = _round(_product_tile(X, W, Bias, offs_m, m_ok, offs_n, n_ok, K, sxm, sxk, swn, swk, HAS_BIAS,
                                    BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INTERPRET), dt)
        ready = tl.atomic_add(SYNC + g, 0, sem="acquire")
        while ready < parts:
            ready = tl.atomic_add(SYNC + g, 0, sem="acquire")
        tl.debug_barrier()  # every thread's reads of Z after the acquire
        z = tl.load(Z + offs_m[:, None] * szm + (g * R + offs_r)[None, :], mask=m_ok[:, None], other=0.0,
                    cache_modifier=".cg").to(tl.float32)  # from L2: written by other programs of this launch
        _branch_and_store(main, z, w1, p1, m, cc, w2, p2, wu, Y, offs_m, m_ok, offs_n, n_ok, sym, syn, ACT,
                          INTERPRET, COS_PRECISION)
    tl.debug_barrier()  # the program's work (its reads of SYNC included) before it counts itself finished
    finished = tl.atomic_add(SYNC + G + 1, 1, sem="acq_rel")
    if finished == G * parts + G * BLOCKS - 1:  # the last program: zero SYNC for the next launch
        slots = tl.arange(0, 16)
        tl.store(SYNC + slots, tl.zeros((16,), dtype=tl.int32), mask=slots < G + 2)


@triton.jit
def noble_partials_kernel(X, W, WD, P, M, N, K, K_SPLIT, sxm, sxk, swn, swk, sdr, sps, spm, spn,
                          R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr, INTERPRET: tl.constexpr):
    """The split-K route's first launch: float32 partial products of the stacked rows [W; W_down] over parts of
    K, ``P[s] = x[:, K_s] [W; W_down][:, K_s]ᵀ`` (P: (S, M, N + R)), K_s = [s·K_SPLIT, min(K, (s+1)·K_SPLIT)).
    Grid (cdiv(N, BLOCK_N) + cdiv(R, BLOCK_N), S): program (j, s) takes W's columns ``j·BLOCK_N ...`` for the
    first cdiv(N, BLOCK_N) blocks, W_down's rows (P's columns N ...) for the last ones, so neither weight is
    copied into a stacked one. Selects pick only scalars (a base pointer, strides, rows), so the program has one
    K loop: two loops, one per branch, would each reserve pipeline buffers, twice the shared memory that
    ``skinny_linear.launch_config`` budgets (a review compiled both for sm_90, 2026-12-07). As
    :func:`leanformer.ops._skinny_linear_kernel.skinny_partials_kernel`: K_SPLIT is whole BLOCK_K tiles, so
    ``EVEN_K`` (K a multiple of BLOCK_K) leaves every part unmasked along K. W and W_down share their stride
    along K, ``swk`` (1 for both as the op passes them), so Triton keeps it a constant: the loads stay vectorised."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    k_lo = pid_s * K_SPLIT
    k_len = tl.minimum(K - k_lo, K_SPLIT)
    main_blocks = tl.cdiv(N, BLOCK_N)
    main = pid_n < main_blocks  # W's columns; else W_down's rows, P's columns N ... (selects: no branch types)
    base = tl.where(main, W, WD)
    srow = tl.where(main, swn, sdr)
    limit = tl.where(main, N, R)
    col0 = tl.where(main, 0, N)
    rows = tl.where(main, pid_n, pid_n - main_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < limit
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    acc = _product_tile(X + k_lo * sxk, base + k_lo * swk, base, offs_m, m_ok, rows, rows_ok, k_len, sxm, sxk,
                        srow, swk, False, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INTERPRET)
    tl.store(P + pid_s * sps + offs_m[:, None] * spm + (col0 + rows)[None, :] * spn, acc,
             mask=m_ok[:, None] & rows_ok[None, :])


@triton.jit
def noble_finish_kernel(P, Bias, BD, W1, P1, MM, C, W2, P2, WU, Y, M, N, S, sps, spm, spn, sun, sur, sym, syn,
                        HAS_BIAS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        INTERPRET: tl.constexpr, ACT: tl.constexpr, COS_PRECISION: tl.constexpr = "ieee"):
    """The split-K route's second launch: one program per ``BLOCK_N`` output columns sums the S partials
    (:func:`noble_partials_kernel`'s P (S, M, N + R), in order s = 0, 1, …) of its main columns and of all R
    columns of z (every program sums z again: R ≤ 128 columns of a few rows), then finishes as
    :func:`_noble_columns` does after its K loop: bias, rounding, CosNet, the branch, the sum, ``ACT``. The
    only difference from the one-launch kernel is where the float32 K-sum is re-associated (at the parts)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_z = N + tl.arange(0, R)  # z's columns in P
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for s in range(0, S):
        part = P + s * sps + offs_m[:, None] * spm
        acc += tl.load(part + offs_n[None, :] * spn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc_z += tl.load(part + offs_z[None, :] * spn, mask=m_ok[:, None], other=0.0)
    w1, p1, m, c, w2, p2, bd, wu = _epilogue_loads(BD, W1, P1, MM, C, W2, P2, WU, offs_n, n_ok, sun, sur, R)
    dt = Y.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    _branch_and_store(_round(acc, dt), _round(acc_z + bd[None, :], dt), w1, p1, m, c, w2, p2, wu, Y, offs_m, m_ok,
                      offs_n, n_ok, sym, syn, ACT, INTERPRET, COS_PRECISION)
