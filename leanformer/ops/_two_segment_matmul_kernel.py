"""The Triton kernel of :mod:`leanformer.ops.two_segment_matmul`: ``C = A1 B1 + A2 B2 (+ bias)``.

Imported only by that module, on its first call (Triton needed only when the kernel runs; the interpreter
reruns a kernel's source with its module's globals, so the kernel sits at module level).

``A1 (M, K1)``, ``B1 (K1, N)``, ``A2 (M, K2)``, ``B2 (K2, N)``, ``bias (N,)``, ``C (M, N)``, any strides. It is one
matrix product whose inner axis runs over two pairs of operands held in separate buffers: the inner loop
steps through K1 in ``BLOCK_K`` tiles of (A1, B1), then through K2 in ``BLOCK_K2`` tiles of (A2, B2), into one
float32 accumulator (``ONE_LOOP``: one loop over both, see :func:`_one_loop`); the bias is added in float32
and C rounded once. Each program owns a ``BLOCK_M × BLOCK_N``
tile of C; programs are ordered in groups of ``GROUP_M`` row tiles (the ordering of Triton's matrix-product
tutorial), so that the B tiles a group streams stay in L2 while its rows are read once.

Rows past M and columns past N are clamped for loading (``% M``, ``% N``: valid addresses, values not
stored) and masked at the store; K1 and K2 tails are masked to zero when ``EVEN_K`` / ``EVEN_K2`` is off. With
``EVEN_N`` (N a multiple of BLOCK_N) the columns carry Triton's contiguity hints, so B's loads vectorise when B is
contiguous along N.
"""

import triton
import triton.language as tl

from leanformer.ops._fused_decay_kernels import mm


@triton.jit
def _accumulate(acc, a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a b in float32: the accumulator as the product's own input (wgmma accumulates in place), or under the
    interpreter :func:`mm`'s widened product added to it."""
    if INTERPRET:
        return acc + mm(a, b, PRECISION, INTERPRET)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _segment(acc, A, B, offs_m, offs_n, K, sam, sak, sbk, sbn, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
             PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + A[offs_m, :K] B[:K, offs_n], the inner axis in tiles of BLOCK_K (float32 accumulation)."""
    kk = tl.arange(0, BLOCK_K)
    a_ptr = A + offs_m[:, None] * sam + kk[None, :] * sak
    b_ptr = B + kk[:, None] * sbk + offs_n[None, :] * sbn
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr)
        else:
            k_ok = kk < K - k0 * BLOCK_K
            a = tl.load(a_ptr, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptr, mask=k_ok[:, None], other=0.0)
        acc = _accumulate(acc, a, b, PRECISION, INTERPRET)
        a_ptr += BLOCK_K * sak
        b_ptr += BLOCK_K * sbk
    return acc


@triton.jit
def _one_loop(acc, A1, B1, A2, B2, offs_m, offs_n, K1, K2, sa1m, sa1k, sb1k, sb1n, sa2m, sa2k, sb2k, sb2n,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """The same sum as two :func:`_segment` calls, in one loop of cdiv(K1) + cdiv(K2) steps of BLOCK_K that picks
    each step's pointers and K limit: one software pipeline over both segments (two loops drain the pipeline and
    wait on memory between them; sm_90 TTGIR, review of 2026-12-07), for select instructions in every step and K2
    padded to BLOCK_K with masked loads."""
    kk = tl.arange(0, BLOCK_K)
    n1 = tl.cdiv(K1, BLOCK_K)
    a1_ptr = A1 + offs_m[:, None] * sa1m + kk[None, :] * sa1k
    b1_ptr = B1 + kk[:, None] * sb1k + offs_n[None, :] * sb1n
    a2_ptr = A2 + offs_m[:, None] * sa2m + kk[None, :] * sa2k
    b2_ptr = B2 + kk[:, None] * sb2k + offs_n[None, :] * sb2n
    for i in range(0, n1 + tl.cdiv(K2, BLOCK_K)):
        first = i < n1
        j = i - n1
        a_ptr = tl.where(first, a1_ptr + i * BLOCK_K * sa1k, a2_ptr + j * BLOCK_K * sa2k)
        b_ptr = tl.where(first, b1_ptr + i * BLOCK_K * sb1k, b2_ptr + j * BLOCK_K * sb2k)
        k_ok = kk < tl.where(first, K1 - i * BLOCK_K, K2 - j * BLOCK_K)
        a = tl.load(a_ptr, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None], other=0.0)
        acc = _accumulate(acc, a, b, PRECISION, INTERPRET)
    return acc


@triton.jit
def two_segment_matmul_kernel(A1, B1, A2, B2, Bias, C, M, N, K1, K2,
                              sa1m, sa1k, sb1k, sb1n, sa2m, sa2k, sb2k, sb2n, scm, scn,
                              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr, GROUP_M: tl.constexpr,
                              EVEN_K: tl.constexpr, EVEN_K2: tl.constexpr, EVEN_N: tl.constexpr,
                              ONE_LOOP: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of C = A1 B1 + A2 B2 (+ bias); see the module docstring."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    load_rows = (rows % M).to(tl.int64)  # clamped (int32 remainder): every load in bounds, extra rows never stored
    if EVEN_N:  # every tile whole: its columns are BLOCK_N in a row from a multiple of BLOCK_N (the hint is true)
        load_cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)
    else:
        load_cols = cols % N
    if HAS_BIAS:  # loaded before the inner loop, so its latency hides behind the products
        bias = tl.load(Bias + load_cols).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ONE_LOOP:
        acc = _one_loop(acc, A1, B1, A2, B2, load_rows, load_cols, K1, K2, sa1m, sa1k, sb1k, sb1n, sa2m, sa2k,
                        sb2k, sb2n, BLOCK_K, PRECISION, INTERPRET)
    else:
        acc = _segment(acc, A1, B1, load_rows, load_cols, K1, sa1m, sa1k, sb1k, sb1n, BLOCK_K, EVEN_K,
                       PRECISION, INTERPRET)
        acc = _segment(acc, A2, B2, load_rows, load_cols, K2, sa2m, sa2k, sb2k, sb2n, BLOCK_K2, EVEN_K2,
                       PRECISION, INTERPRET)
    if HAS_BIAS:
        acc += bias[None, :]
    rows64 = rows.to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(C + rows64[:, None] * scm + cols[None, :] * scn, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _tma_segment(acc, a_desc, b_desc, off_m, off_n, K, BLOCK_K: tl.constexpr, B_NK: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + A[off_m:, :K] B[:K, off_n:] with both tiles loaded by TMA (zero past each edge, so no masks); B's
    descriptor is over B (K, N) or, with ``B_NK``, over Bᵀ (N, K), as the weight is stored."""
    for k in range(0, K, BLOCK_K):
        k0 = tl.cast(k, tl.int32)  # descriptor offsets are int32 (K arrives as i64 from a compiled graph)
        a = a_desc.load([off_m, k0])
        if B_NK:
            b = b_desc.load([off_n, k0]).T
        else:
            b = b_desc.load([k0, off_n])
        acc = _accumulate(acc, a, b, PRECISION, INTERPRET)
    return acc


@triton.jit
def _tma_tile(tile, a1_desc, b1_desc, a2_desc, b2_desc, Bias, C, c_desc, M, N, K1, K2, HAS_BIAS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
              GROUP_M: tl.constexpr, B1_NK: tl.constexpr, B2_NK: tl.constexpr, PRECISION: tl.constexpr,
              INTERPRET: tl.constexpr):
    """Tile number ``tile`` of C, in :func:`two_segment_matmul_kernel`'s grouped order, by tensor descriptors."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    off_m = ((first_m + (tile % per_group) % group_rows) * BLOCK_M).to(tl.int32)  # descriptor offsets: int32
    off_n = (((tile % per_group) // group_rows) * BLOCK_N).to(tl.int32)
    if HAS_BIAS:  # loaded before the inner loop, so its latency hides behind the products
        cols = off_n + tl.arange(0, BLOCK_N)
        bias = tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _tma_segment(acc, a1_desc, b1_desc, off_m, off_n, K1, BLOCK_K, B1_NK, PRECISION, INTERPRET)
    acc = _tma_segment(acc, a2_desc, b2_desc, off_m, off_n, K2, BLOCK_K2, B2_NK, PRECISION, INTERPRET)
    if HAS_BIAS:
        acc += bias[None, :]
    c_desc.store([off_m, off_n], acc.to(C.dtype.element_ty))


@triton.jit
def two_segment_tma_kernel(a1_desc, b1_desc, a2_desc, b2_desc, Bias, C, c_desc, M, N, K1, K2,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr, GROUP_M: tl.constexpr,
                           B1_NK: tl.constexpr, B2_NK: tl.constexpr, PRECISION: tl.constexpr,
                           INTERPRET: tl.constexpr):
    """:func:`two_segment_matmul_kernel`'s tile with its operands read and C written through tensor descriptors
    (Hopper's bulk tensor copies: no address arithmetic or masks in the loop, fewer registers); ``C`` is passed
    for its element type only. One program per tile (:func:`_tma_tile`)."""
    _tma_tile(tl.program_id(0), a1_desc, b1_desc, a2_desc, b2_desc, Bias, C, c_desc, M, N, K1, K2, HAS_BIAS,
              BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_K2, GROUP_M, B1_NK, B2_NK, PRECISION, INTERPRET)


@triton.jit
def two_segment_tma_persistent_kernel(a1_desc, b1_desc, a2_desc, b2_desc, Bias, C, c_desc, M, N, K1, K2,
                                      PROGRAMS, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
                                      GROUP_M: tl.constexpr, B1_NK: tl.constexpr, B2_NK: tl.constexpr,
                                      PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """:func:`two_segment_tma_kernel` with ``PROGRAMS`` programs (one per SM) that each loop over tiles
    ``pid, pid + PROGRAMS, …``: one launch's prologue per SM instead of per tile, and a tile's TMA store drains
    while the next tile's loads start."""
    for tile in range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), PROGRAMS):
        _tma_tile(tile, a1_desc, b1_desc, a2_desc, b2_desc, Bias, C, c_desc, M, N, K1, K2, HAS_BIAS,
                  BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_K2, GROUP_M, B1_NK, B2_NK, PRECISION, INTERPRET)
