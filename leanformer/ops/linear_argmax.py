"""A decoding step's last product and its greedy choice in one kernel: ``logits = x Wᵀ (+ b)`` and
``logits.argmax(-1)``.

In a compiled greedy decoding step the head's product (few-row kernel, :mod:`leanformer.ops.skinny_linear`)
writes the logits and Inductor's ``argmax`` reads them back in a second kernel, one program per row: 11.3 µs
for 8 rows of GPT-2's 50,304 logits, 2.9% of DiJiang's 0.389 ms step at 8K × 8 (H200, 2026-12-06 23:37,
``benchmarks/decode_profile.py``, docs/gpu/decode_2026-12-06/call4). Here each program of the product also
reduces its own columns to a (maximum, first column) pair per row
(:mod:`leanformer.ops._linear_argmax_kernel`), so the choice that remains is over one pair per column block
(786 for GPT-2's vocabulary in the few-row kernel's 64-column blocks) instead of over 50,304 logits.

``linear_argmax(x, weight, bias)``: (logits (M, N) in x's dtype, index (M,) int64), the logits bit for bit
the few-row kernel's and the index ``torch.argmax``'s (the first maximum; NaN above everything), or None
when :func:`linear_argmax_supported` refuses (the caller computes both as usual). x (M, K): 2-D, a 16-bit
dtype (the key that ranks NaN and +inf needs a value above every logit), at most ``skinny_linear.MAX_ROWS``
rows. Runs where ``skinny_linear.ROUTE`` routes the few-row kernel. Op: ``leanformer::linear_argmax``.

Timed (H100, 2026-12-07 02:44, DiJiang 8K × 8, docs/gpu/misc_2026-12-07/callG): 0.413 ms per step, as with the
two-pass argmax (``decoding.TWO_PASS_ARGMAX``, the default), against 0.419 with the one-pass one; so it stays
a switch, off (``decoding.ARGMAX_IN_HEAD``).
"""

from __future__ import annotations

import torch

from leanformer.ops import skinny_linear
from leanformer.ops.fused_decay_attention import _cdiv, _interpret, _on_device, _register, _wrap


def linear_argmax_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why :func:`linear_argmax` cannot take these inputs, or None when it can."""
    if x.dim() != 2:
        return f"x must be (M, K), got {tuple(x.shape)}"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x is {x.dtype}: the kernel takes bfloat16 or float16 (its key ranks +inf below NaN above every logit)"
    reason = skinny_linear.skinny_supported(x, weight, bias)
    if reason is None and skinny_linear.launch_config(*x.shape[:1], *weight.shape, x.dtype, fma=True)["FMA"]:
        return "skinny_linear.FMA_COLUMNS takes this product (the kernel has the tl.dot tiles only)"
    return reason


def _new_outputs(x, weight, bias):
    M, N = x.shape[0], weight.shape[0]
    blocks = _cdiv(N, skinny_linear.launch_config(M, N, x.shape[1], x.dtype)["BLOCK_N"])
    return (x.new_empty(M, N), x.new_empty(M, blocks, dtype=torch.float32),
            x.new_empty(M, blocks, dtype=torch.int32))


@_register("leanformer::linear_argmax", _new_outputs)
def _linear_argmax_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from leanformer.ops import _linear_argmax_kernel as kern

    (M, K), N = x.shape, weight.shape[0]
    cfg = skinny_linear.launch_config(M, N, K, x.dtype)  # the few-row kernel's tiles: the same logits
    y, pmax, pidx = _new_outputs(x, weight, bias)
    opts = {} if _interpret() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    with _on_device(x):
        _wrap(kern.linear_argmax_kernel)[(pmax.shape[1],)](
            x, weight, bias if bias is not None else weight, y, pmax, pidx, M, N, K, x.stride(0), x.stride(1),
            weight.stride(0), weight.stride(1), y.stride(0), y.stride(1), pmax.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            EVEN_K=K % cfg["BLOCK_K"] == 0, INTERPRET=_interpret(), **opts)
    return y, pmax, pidx


def linear_argmax(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(``F.linear(x, weight, bias)``, its ``argmax(-1)``) by one kernel and a reduction over the column
    blocks' pairs (module docstring), or None where ``skinny_linear.ROUTE`` or the checks refuse."""
    route = skinny_linear.ROUTE
    if route == "never" or (route == "cuda" and not x.is_cuda) or linear_argmax_supported(x, weight, bias):
        return None
    y, pmax, pidx = _linear_argmax_op(x, weight, bias)
    block = pmax.argmax(-1, keepdim=True)  # the first block holding the row's largest key
    return y, pidx.gather(-1, block).squeeze(-1).long()
