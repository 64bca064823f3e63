"""The Triton kernel of :mod:`leanformer.ops.two_segment_matmul`: ``C = A1 B1 + A2 B2 (+ bias)``.

Imported only by that module, on its first call (Triton needed only when the kernel runs; the interpreter
reruns a kernel's source with its module's globals, so the kernel sits at module level).

``A1 (M, K1)``, ``B1 (K1, N)``, ``A2 (M, K2)``, ``B2 (K2, N)``, ``bias (N,)``, ``C (M, N)``, any strides. It is one
matrix product whose inner axis runs over two pairs of operands held in separate buffers: the inner loop
steps through K1 in ``BLOCK_K`` tiles of (A1, B1), then through K2 in ``BLOCK_K2`` tiles of (A2, B2), into one
float32 accumulator; the bias is added in float32 and C rounded once. Each program owns a ``BLOCK_M × BLOCK_N``
tile of C; programs are ordered in groups of ``GROUP_M`` row tiles (the ordering of Triton's matrix-product
tutorial), so that the B tiles a group streams stay in L2 while its rows are read once.

Rows past M and columns past N are clamped for loading (``% M``, ``% N``: valid addresses, values not
stored) and masked at the store; K1 and K2 tails are masked to zero when ``EVEN_K`` / ``EVEN_K2`` is off.
"""

import triton
import triton.language as tl

from leanformer.ops._fused_decay_kernels import mm


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
        acc += mm(a, b, PRECISION, INTERPRET)
        a_ptr += BLOCK_K * sak
        b_ptr += BLOCK_K * sbk
    return acc


@triton.jit
def two_segment_matmul_kernel(A1, B1, A2, B2, Bias, C, M, N, K1, K2,
                              sa1m, sa1k, sb1k, sb1n, sa2m, sa2k, sb2k, sb2n, scm, scn,
                              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr, GROUP_M: tl.constexpr,
                              EVEN_K: tl.constexpr, EVEN_K2: tl.constexpr, PRECISION: tl.constexpr,
                              INTERPRET: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of C = A1 B1 + A2 B2 (+ bias); see the module docstring."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    load_rows = rows % M  # clamped: every load in bounds, the extra rows and columns never stored
    load_cols = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _segment(acc, A1, B1, load_rows, load_cols, K1, sa1m, sa1k, sb1k, sb1n, BLOCK_K, EVEN_K,
                   PRECISION, INTERPRET)
    acc = _segment(acc, A2, B2, load_rows, load_cols, K2, sa2m, sa2k, sb2k, sb2n, BLOCK_K2, EVEN_K2,
                   PRECISION, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(Bias + load_cols).to(tl.float32)[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(C + rows[:, None] * scm + cols[None, :] * scn, acc.to(C.dtype.element_ty), mask=mask)
