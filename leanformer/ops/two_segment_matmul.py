"""One matrix product over two pairs of operands: ``C = A1 B1 + A2 B2 (+ bias)``, read in place.

    A1 (M, K1), B1 (K1, N), A2 (M, K2), B2 (K2, N), bias (N,)  →  C (M, N)

It is ``[A1, A2] [B1; B2]`` without the concatenations: one Triton kernel whose inner loop runs over K1 and then
K2 (:mod:`leanformer.ops._two_segment_matmul_kernel`). NOBLE's training route
(:mod:`leanformer.ops.noble_train`) takes it twice per layer:

* forward, ``y = x Wᵀ + σ(z) W_upᵀ + b`` (A1 = x, B1 = Wᵀ, A2 = σ(z), B2 = W_upᵀ): the branch's up product
  joins the main product's inner axis, so the (tokens × d_out) branch output is never written and read back;
* backward, ``dx = dy W + dz W_down`` (A1 = dy, B1 = W, A2 = dz, B2 = W_down): the ``[dy, dz]`` concatenation
  of the stacked form is gone.

Both were full-width passes of the stacked form that cuBLAS alone cannot avoid (docs/benchmarks.md, "Issue #13's
NOBLE step ≤ +10%: a bound from the bytes"). The op is a ``torch.library`` op registered as
:mod:`leanformer.ops.fused_decay_attention`'s are, so ``torch.compile`` traces it; it has no autograd of its own
(NOBLE's route writes the backward).

Tile shapes: :func:`tile_config` (a heuristic, overridden per shape by :data:`CONFIGS`); the interpreter takes
small tiles. Supported (else :func:`two_segment_supported` says why): CUDA on sm_80+ or the CPU under the
interpreter; float32, bfloat16 or float16 operands of one dtype; 2-d operands.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leanformer.ops.fused_decay_attention import (_cdiv, _interpret, _on_device, _register, _triton_import_error,
                                                  _wrap, kernel_reason)

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, one_loop) for a product: CONFIGS[(M, N, K1, K2, B1's
# layout)] when present ("k": B1 contiguous along K, as the forward's Wᵀ; "n": along N, as the backward's W; "other";
# with "+tma", the tiles of the TMA form, :data:`TMA`), else :func:`tile_config`'s choice. benchmarks/noble_train_gpu.py
# times each of CANDIDATES with either loop form (one_loop: the kernel's ONE_LOOP) and by TMA per product and writes
# the fastest of each form.
CONFIGS: dict[tuple[int, int, int, int, str], tuple[int, int, int, int, int, int, bool]] = {}
CANDIDATES = (
    (128, 256, 64, 8, 8, 3),
    (128, 256, 64, 8, 8, 4),
    (256, 128, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 4),  # cuBLAS's choice for Pre-LN's products here (nvjet 256x128_64x4, H100 profiles)
    (128, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
    (128, 128, 128, 8, 8, 3),
)
ONE_LOOP = False  # the default loop form for shapes without a CONFIGS entry (one loop: 7-13% slower, H100, callAE)
PERSISTENT = False  # with TMA: one program per SM looping over tiles (two_segment_tma_persistent_kernel); not yet
# timed on a GPU
TMA = False  # tiles loaded and C stored through tensor descriptors (Hopper's bulk tensor copies) where the operands
# allow it (:func:`tma_reason`), by ``two_segment_tma_kernel``; else by pointers. Per product 5-11% faster than the
# pointer kernel (H100, 2026-12-08, callAK); off until NOBLE's step with it is timed
INTERPRETER_CONFIG = (32, 32, 32, 4, 4, 1, False)  # ONE_LOOP: tests/test_noble_train_kernel.py sets it


def configs_json(configs: dict) -> str:
    """``configs`` ({(M, N, K1, K2, layout): tile settings}, as :data:`CONFIGS`) as the JSON that
    :func:`load_configs` reads: keys "M,N,K1,K2,layout", values the 7 settings."""
    return json.dumps({",".join(map(str, key)): list(tiles) for key, tiles in configs.items()})


def load_configs(path: str | Path) -> dict[tuple[int, int, int, int, str], tuple[int, int, int, int, int, int, bool]]:
    """The tile table a file of :func:`configs_json` holds (benchmarks/noble_train_gpu.py writes one per run), for
    :data:`CONFIGS`. Raises ValueError naming the file and the entry that is not "M,N,K1,K2,layout": [7 settings]."""
    table = {}
    for key, tiles in json.loads(Path(path).read_text()).items():
        *sizes, layout = key.split(",")
        if (len(sizes) != 4 or not all(v.isdigit() for v in sizes) or layout.removesuffix("+tma") not in LAYOUTS
                or not isinstance(tiles, list) or len(tiles) != 7):
            raise ValueError(f"{path}: {key!r}: {tiles!r} is not 'M,N,K1,K2,layout[+tma]': [7 tile settings] "
                             "(benchmarks/noble_train_gpu.py writes these files)")
        table[(*(int(v) for v in sizes), layout)] = tuple(tiles)
    return table


LAYOUTS = ("k", "n", "other")


def b1_layout(b1: torch.Tensor) -> str:
    """B1 (K1, N)'s layout as :data:`CONFIGS` keys it: "k" (unit stride along K), "n" (along N) or "other"."""
    return "k" if b1.stride(0) == 1 else "n" if b1.stride(1) == 1 else "other"


SHARED_MEMORY = 220 * 1024  # bytes of pipelined tiles a config may take (an H100 block: 227 KB, less the epilogue's)


def fit_shared_memory(config: tuple, element_size: int, epilogue: int = 0, block_k2: int = 0) -> tuple:
    """``config`` with fewer stages (down to 2), then half the BLOCK_K, until its pipelined tiles
    ((BLOCK_M + BLOCK_N) · BLOCK_K · stages · element_size bytes) fit :data:`SHARED_MEMORY`: the table and the
    heuristic are for bf16, and float32 operands (TF32 training without autocast) need twice the bytes (128 × 256 ×
    64 in 3 stages: 294,912 B, over an H100 block's limit; the second review, 2026-12-07). ``epilogue``: bytes the
    kernel also holds for its output tile (the TMA form stores C from shared memory; counted beside the tiles,
    although Triton 3.9 shares one buffer between them: 3.6, the GPU's, not checked); ``block_k2``: the second
    segment's BLOCK_K, when it may be the wider."""
    bm, bn, bk, group, warps, stages, one_loop = config
    while ((bm + bn) * max(bk, block_k2) * stages * element_size + epilogue > SHARED_MEMORY
           and (stages > 2 or bk > 16)):
        if stages > 2:
            stages -= 1
        else:
            bk //= 2
    return (bm, bn, bk, group, warps, stages, one_loop)


def tile_config(M, N, K1, K2, layout: str = "k") -> tuple[int, int, int, int, int, int, bool]:
    """The tile shape for a product: :data:`CONFIGS`' entry for ``(M, N, K1, K2, layout)``, else 128 × 256 tiles of
    64 (Triton's matrix-product tutorial's fastest bf16 shape on Hopper), 128 × 128 when N < 256, 64 × 64 when
    M or N is small; :data:`INTERPRETER_CONFIG` under the interpreter. Sizes may be symbolic (a ``triton_op``
    traced with dynamic shapes): then the table is not consulted (a SymInt cannot be hashed: a dynamic token count
    never gets tuned tiles) and the heuristic's comparisons guard on them. The launch fits the choice to the
    operands' element size (:func:`fit_shared_memory`)."""
    if _interpret():
        return INTERPRETER_CONFIG
    key = (M, N, K1, K2, layout)
    if all(type(v) in (int, str) for v in key) and key in CONFIGS:
        return CONFIGS[key]
    if M < 128 or N < 128:
        return (64, 64, 64, 8, 4, 3, ONE_LOOP)
    if N < 256:
        return (128, 128, 64, 8, 8, 3, ONE_LOOP)
    return (*CANDIDATES[0], ONE_LOOP)


def two_segment_supported(*operands: torch.Tensor) -> str | None:
    """Why the kernel cannot run these operands (A1, B1, A2, B2), or None when it can."""
    a1 = operands[0]
    if any(t.dim() != 2 for t in operands):
        return "every operand must be 2-d"
    if any(t.dtype != a1.dtype or t.device != a1.device for t in operands):
        return "the operands must share one dtype and one device"
    reason = kernel_reason(a1.device, a1.dtype, ())
    return reason if reason is not None else _triton_import_error()


def _kernel(tma: bool = False, persistent: bool = False):
    from leanformer.ops import _two_segment_matmul_kernel as k

    if tma:
        return k.two_segment_tma_persistent_kernel if persistent else k.two_segment_tma_kernel
    return k.two_segment_matmul_kernel


def _tma_aligned(t: torch.Tensor) -> bool:
    """A 2-d tensor a tensor descriptor can cover: unit stride along its last axis, its row stride and start a
    multiple of 16 bytes (the start checked where the tensor has an address: not a fake one under compile, whose
    buffers Inductor allocates aligned)."""
    es = t.element_size()
    if t.stride(1) != 1 or (t.stride(0) * es) % 16 or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        return False  # (the last: rows that overlap, as an expand's or as_strided's)
    if torch.compiler.is_compiling():  # traced by dynamo: no address nor offset to read here; the op checks them
        return True  # again on the real tensors (_two_segment_tma_op)
    if (t.storage_offset() * es) % 16:
        return False
    try:
        return t.data_ptr() % 16 == 0
    except (RuntimeError, NotImplementedError):  # a fake or meta tensor: no address
        return True


def tma_reason(a1, b1, a2, b2) -> str | None:  # noqa: ANN001 - tensors
    """Why the TMA form cannot take these operands, or None when it can: Hopper or later (or the interpreter),
    K1 > 0 and K2 > 0, each operand, or for a B stored as its transpose (a weight's ``.t()``) that transpose,
    covered by a descriptor (:func:`_tma_aligned`), and C's rows (N elements, C made contiguous) a multiple of 16
    bytes. While dynamo traces, the device and the addresses are not checked (the op checks them at run time)."""
    if a1.shape[1] == 0 or a2.shape[1] == 0:
        return "K1 = 0 or K2 = 0"
    if (not torch.compiler.is_compiling() and not _interpret()
            and (not a1.is_cuda or torch.cuda.get_device_capability(a1.device)[0] < 9)):
        return "tensor descriptors need a Hopper GPU (sm_90) or later"
    if (b2.shape[1] * a1.element_size()) % 16 or not all(_tma_aligned(t) for t in (a1, a2, _tma_view(b1),
                                                                                    _tma_view(b2))):
        return "an operand is not contiguous along its last axis or not 16-byte aligned"
    return None


def _tma_view(b: torch.Tensor) -> torch.Tensor:
    """B (K, N) as its descriptor covers it: Bᵀ (N, K) when B has unit stride along K (a weight's ``.t()``)."""
    return b.t() if b.stride(0) == 1 and b.stride(1) != 1 else b


def _launch_tma(a1, b1, a2, b2, bias, c, config, bk2, precision) -> None:  # noqa: ANN001 - tensors
    """:func:`_two_segment_op`'s launch of the TMA form (``config`` fitted to shared memory already)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, group, warps, stages, _ = config
    (M, K1), (K2, N) = a1.shape, b2.shape
    descs = []
    for b, block_k in ((b1, bk), (b2, bk2)):
        view = _tma_view(b)
        nk = view is not b
        descs.append((TensorDescriptor.from_tensor(view, [bn, block_k] if nk else [block_k, bn]), nk))
    (b1_desc, b1_nk), (b2_desc, b2_nk) = descs
    tiles = _cdiv(M, bm) * _cdiv(N, bn)
    programs = min(tiles, _programs(c.device)) if PERSISTENT else tiles
    _kernel(tma=True, persistent=PERSISTENT)[(programs,)](
        TensorDescriptor.from_tensor(a1, [bm, bk]), b1_desc, TensorDescriptor.from_tensor(a2, [bm, bk2]), b2_desc,
        bias if bias is not None else c, c, TensorDescriptor.from_tensor(c, [bm, bn]), M, N, K1, K2,
        *((programs,) if PERSISTENT else ()),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_K2=bk2, GROUP_M=group,
        B1_NK=b1_nk, B2_NK=b2_nk, PRECISION=precision, INTERPRET=_interpret(),
        num_warps=warps, num_stages=stages)


def _programs(device: torch.device) -> int:
    """The persistent form's program count: one per SM (4 under the interpreter, so that its tile loop runs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _block_k2(K2) -> int:
    """The second segment's BLOCK_K: K2 rounded up to a power of two, 16 to 64 (r = 32: one step)."""
    return max(16, min(64, 1 << max(K2 - 1, 0).bit_length()))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: IEEE float32 unless TF32 matmuls are allowed (bf16 and fp16 ignore it)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _new_c(a1, b1, a2, b2, bias):
    return a1.new_empty(a1.shape[0], b1.shape[1])


@_register("leanformer::two_segment_matmul", _new_c)
def _two_segment_op(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """C (M, N) in A1's dtype; shapes checked by :func:`two_segment_matmul`."""
    M, K1 = a1.shape
    K2, N = b2.shape
    c = _new_c(a1, b1, a2, b2, bias)
    if M == 0 or N == 0:
        return c
    bk2, precision = _block_k2(K2), _precision(a1.dtype)
    bm, bn, bk, group, warps, stages, one_loop = fit_shared_memory(tile_config(M, N, K1, K2, b1_layout(b1)),
                                                                   a1.element_size(), block_k2=bk2)
    with _on_device(a1):
        _wrap(_kernel())[(_cdiv(M, bm) * _cdiv(N, bn),)](
            a1, b1, a2, b2, bias if bias is not None else c, c, M, N, K1, K2,
            *a1.stride(), *b1.stride(), *a2.stride(), *b2.stride(), *c.stride(),
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_K2=bk2, GROUP_M=group,
            EVEN_K=K1 % bk == 0, EVEN_K2=K2 % bk2 == 0, EVEN_N=N % bn == 0, ONE_LOOP=one_loop,
            PRECISION=precision, INTERPRET=_interpret(),
            num_warps=warps, num_stages=stages)
    return c


@torch.library.custom_op("leanformer::two_segment_matmul_tma", mutates_args=())
def _two_segment_tma_op(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """The TMA form (:data:`TMA`), as an op a compiled graph calls as it is: Inductor (torch 2.11) could not take
    the descriptors from a ``triton_op`` ("tolist() shouldn't be called on a tensor with unallocated storage",
    H100, callAK), so this launch stays outside its code generation."""
    (M, K1), (K2, N) = a1.shape, b2.shape
    c = _new_c(a1, b1, a2, b2, bias)
    if M == 0 or N == 0:
        return c
    if tma_reason(a1, b1, a2, b2) is not None:  # the real tensors (a compiled graph chose this op from their shapes
        return _two_segment_op(a1, b1, a2, b2, bias)  # and strides): the pointer kernel
    es = a1.element_size()
    config = tile_config(M, N, K1, K2, b1_layout(b1) + "+tma")
    bk2 = _block_k2(K2)
    with _on_device(a1):
        _launch_tma(a1, b1, a2, b2, bias, c, fit_shared_memory(config, es, config[0] * config[1] * es, bk2), bk2,
                    _precision(a1.dtype))
    return c


_two_segment_tma_op.register_fake(_new_c)


def two_segment_matmul(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a1 @ b1 + a2 @ b2 (+ bias)``: A1 (M, K1), B1 (K1, N), A2 (M, K2), B2 (K2, N), bias (N,) → (M, N) in their
    dtype (float32 accumulation; K2 may be 0). Any strides (a transposed weight is a view). Raises ValueError
    naming the problem when the shapes disagree or :func:`two_segment_supported` refuses the operands. Not
    differentiable by itself."""
    reason = two_segment_supported(a1, b1, a2, b2)
    if reason is not None:
        raise ValueError(f"two_segment_matmul cannot run these operands: {reason}")
    (M, K1), (K1b, N), (M2, K2), (K2b, N2) = a1.shape, b1.shape, a2.shape, b2.shape
    if K1b != K1 or K2b != K2 or M2 != M or N2 != N:
        raise ValueError(f"two_segment_matmul needs A1 (M, K1), B1 (K1, N), A2 (M, K2), B2 (K2, N); got "
                         f"{tuple(a1.shape)}, {tuple(b1.shape)}, {tuple(a2.shape)}, {tuple(b2.shape)}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != a1.dtype or bias.device != a1.device):
        raise ValueError(f"two_segment_matmul's bias must be ({N},) in the operands' dtype and device; got "
                         f"{tuple(bias.shape)}, {bias.dtype}, {bias.device}")
    if bias is not None:
        bias = bias.contiguous()  # the kernels read it with unit stride
    if TMA and tma_reason(a1, b1, a2, b2) is None:
        return _two_segment_tma_op(a1, b1, a2, b2, bias)
    return _two_segment_op(a1, b1, a2, b2, bias)
