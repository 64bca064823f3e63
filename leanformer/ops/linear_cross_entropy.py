"""The LM head's product and the mean cross-entropy over tokens in chunks, with their gradients taken in the
forward pass, so the (N, V) logits never exist whole.

    loss = 1/n Σ_t [lse(z_t) − z_t[y_t]],  z_t = W h_t + b,  n = #{t : y_t ≠ −100}
    ∂loss/∂z_t = (softmax(z_t) − e_{y_t}) / n,   ∂h_t = W ᵀ∂z_t,   ∂W = Σ_t ∂z_t h_tᵀ,   ∂b = Σ_t ∂z_t

A training step that reads only the loss stores the logits in bf16 (1.65 GB at GPT-2's vocabulary and 16,384
tokens), their float32 log-softmax pass reads them, and the backward writes a gradient of the same size: at batch
16 the fused log-softmax forward and backward kernels took 1.10 and 1.74 ms of a 39.8 ms step (H100, 2026-12-07,
docs/gpu/misc_2026-12-07/callO). Here each chunk of :data:`CHUNK_TOKENS` tokens computes its logits, its share of
the loss and its gradient z̄ at once, turns z̄ into ∂h and adds its ∂W, ∂b, and lets the logits go; the backward
only scales the stored gradients by the loss's gradient (the loss is the graph's last node in a training step).
The products are those of the plain route (the head's forward, its input gradient, its weight gradient), in the
dtype autocast gives them; ∂W and ∂b add up in float32 across chunks. For float32 and bf16 training: under float16
with a loss scaler, z̄ (≈ 1/n) would underflow before the scale reaches it. Targets are class ids or −100 (another
negative id counts as class 0 here, where the plain route raises). No double backward (∂h carries no graph).

:data:`FUSED` ("cuda": on CUDA since its timing) makes :meth:`leanformer.model.TransformerLM.forward` take this
route when it returns no logits and its head is a plain ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanformer.ops.fused_decay_attention import (_interpret, _on_device, _register, _triton_import_error, _wrap,
                                                  kernel_reason)
from leanformer.ops.on_cuda import kernel_switch_allows

FUSED = "cuda"  # TransformerLM's loss through linear_cross_entropy when it returns no logits: "cuda" for a model on
# CUDA (the default), "always" also on the CPU, "never" not. On CUDA since timed with KERNEL's in-place gradient, the
# whole batch in one chunk (H100, 2026-12-07 19:21, train_profile.py, GPT-2 Pre-LN b32 under CUDA graphs: 68.30
# against 69.52 ms, 1.018x, peak memory 0.998x; docs/gpu/misc_2026-12-07/callAA). By PyTorch's float32 ops each
# chunk was slower (0.957x at b16, 16:38, callQ), so the CPU, where KERNEL does not run, keeps the plain route
CHUNK_TOKENS = 32768  # tokens per chunk: a GPT-2 batch of 32 x 1024 in one (timed fastest: 1.009x at b16 against
# chunks of 4,096, 18:55, callZ); its bf16 logits take 3.3 GB at GPT-2's vocabulary, as the plain step's do, the
# gradient written over them by KERNEL (float32 logits by PyTorch's ops: 6.6 GB)
IGNORE_INDEX = -100
KERNEL = "cuda"  # each chunk's loss terms and logits' gradient by one Triton kernel in the logits' dtype (two passes
# over each row: :mod:`leanformer.ops._cross_entropy_kernel`): "cuda" on CUDA tensors; "always" also CPU tensors
# under TRITON_INTERPRET=1 (tests); "never": PyTorch's ops in float32 (softmax, one-hot, scale)
BLOCK_V = 4096  # the kernel's columns per step of its loops over a row
ROW_PROGRAMS_PER_SM: int | None = None  # the kernel's grid: this many programs per SM, each taking every
# (programs)-th row, so fewer rows are read at once and each row's second read may come from L2; None: one program
# per row. Not timed: at b16 the kernel read 1.65 GB twice and wrote it once in 1.625 ms, 3.05 TB/s, as if both
# reads came from HBM (H100, 2026-12-07 18:55, docs/gpu/misc_2026-12-07/callZ); with one program per row, up to
# ≈ 1,000 rows of 100 KB are in flight against a 50 MB L2


def fused_dtype_ok(weight: torch.Tensor) -> bool:
    """Whether the route suits the head's dtype: not float16 weights, nor autocast to float16 on their device,
    where z̄ ≈ p/n (n: the batch's tokens) would underflow in the products' inputs (the module docstring)."""
    if weight.dtype == torch.float16:
        return False
    kind = weight.device.type
    try:
        return not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return True


def _kernel_takes(logits: torch.Tensor) -> bool:
    """Whether :data:`KERNEL` computes this chunk: its route, Triton importing, a device every kernel of ours takes,
    float32 or bf16 logits (float16's z̄ ≈ p/n would underflow before ∂b sums it), rows with unit column stride."""
    if not kernel_switch_allows("linear_cross_entropy.KERNEL", KERNEL, logits) or _triton_import_error() is not None:
        return False
    return (logits.dtype in (torch.float32, torch.bfloat16) and logits.stride(1) == 1
            and kernel_reason(logits.device, logits.dtype, ()) is None)


def _new_terms(logits: torch.Tensor, targets: torch.Tensor, inv_n: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@_register("leanformer::cross_entropy_grad_", _new_terms, mutates_args=("logits",))
def _cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, inv_n: torch.Tensor) -> torch.Tensor:
    """logits (n, V), targets (n,) int64, inv_n () float32 (1 / the kept targets of the whole batch) → the loss
    terms lse − z[y] (n,) float32, 0 where the target is ignored; the logits are overwritten by z̄ (their dtype).
    In place: the chunk's logits are read by nothing else, and at GPT-2's vocabulary a second (n, V) buffer is
    1.65 GB for a whole batch of 16 × 1024 tokens in bf16 (callZ of 2026-12-07: the whole batch's route peaked at
    9.85 GiB, against 8.38 for the plain step)."""
    from leanformer.ops import _cross_entropy_kernel as kern

    n, V = logits.shape
    terms = _new_terms(logits, targets, inv_n)
    opts = {} if _interpret() else {"num_warps": 8}
    programs = n
    if ROW_PROGRAMS_PER_SM is not None:  # the interpreter (CPU tensors) counts as one SM
        if type(ROW_PROGRAMS_PER_SM) is not int or ROW_PROGRAMS_PER_SM < 1:
            raise ValueError(f"linear_cross_entropy.ROW_PROGRAMS_PER_SM={ROW_PROGRAMS_PER_SM!r} must be None or an "
                             "int >= 1 (programs per SM)")
        sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if logits.is_cuda else 1
        programs = max(1, min(n, ROW_PROGRAMS_PER_SM * sms))
    with _on_device(logits):
        _wrap(kern.cross_entropy_grad_kernel)[(programs,)](
            logits, targets, inv_n, logits, terms, n, V, logits.stride(0), targets.stride(0), logits.stride(0),
            IGNORE=IGNORE_INDEX,
            BLOCK_V=min(BLOCK_V, 1 << max(V - 1, 1).bit_length()), **opts)
    return terms


def _promoted_terms(logits: torch.Tensor, targets: torch.Tensor):
    """One chunk's logits (n, V), targets (n,) → (logits in float32 or wider, the loss terms lse − z[y] (n,)
    with 0 where the target is ignored, the mask of kept targets (n,))."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    kept = targets != IGNORE_INDEX
    picked = logits.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    return logits, (torch.logsumexp(logits, -1) - picked) * kept, kept


class _LinearCrossEntropy(torch.autograd.Function):
    """h (N, C), weight (V, C), bias (V,) or None, targets (N,) int64 → the mean loss over kept targets (a 0-d
    float32 tensor); the gradients come from the forward pass (the module docstring)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_tokens):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.promote_types(weight.dtype, torch.float32)  # the loss's and the sums' dtype
        inv_n = 1.0 / (targets != IGNORE_INDEX).sum().to(acc)
        loss = h.new_zeros((), dtype=acc)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for s in range(0, h.shape[0], chunk_tokens):
            hc, tc = h[s:s + chunk_tokens], targets[s:s + chunk_tokens]
            logits = F.linear(hc, weight, bias)
            if _kernel_takes(logits):  # z̄ in the logits' dtype (bf16 under autocast: what the products take)
                terms = _cross_entropy_grad_(logits, tc, inv_n)
                g = gw = logits  # now z̄
            else:
                logits, terms, kept = _promoted_terms(logits, tc)
                # z̄ = (softmax − e_y) · kept / n in float32; the one-hot as a comparison, not a scatter, so
                # Inductor fuses it with the softmax and the cast into one kernel (a scatter kept a float32 (n, V)
                # buffer); a negative id is class 0 as in the loss terms, an ignored target's (−100) row is zeroed
                # by where(), not by 0 · 1/n (with no kept target at all, 1/n is inf: the loss is nan as the plain
                # route's, the gradients 0 as its)
                g = torch.softmax(logits, -1)
                g = g - (torch.arange(g.shape[1], device=g.device)[None] == tc.clamp_min(0)[:, None]).to(g.dtype)
                g = g * torch.where(kept, inv_n, 0.0)[:, None]
                gw = g.to(weight.dtype)  # the products take it as the plain route's (autocast rounds it to bf16)
            loss = loss + terms.sum()
            if need_h:
                grad_h[s:s + chunk_tokens] = (gw @ weight).to(h.dtype)
            if need_w:
                grad_w += (gw.t() @ hc).to(acc)
            if need_b:
                grad_b += g.sum(0, dtype=acc)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss * inv_n

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.saved_tensors  # ∂h, ∂W, ∂b of the mean loss (None where not needed)
        return (*((None if t is None else (t * grad_loss).to(dt)) for t, dt in zip(grads, ctx.dtypes)), None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias).float(), targets, ignore_index=-100)`` in chunks of
    ``chunk_tokens`` (None: :data:`CHUNK_TOKENS`) tokens: h (..., C), targets (...) → the mean loss (0-d float32).
    Its gradients are computed with the loss (the module docstring), unless none is needed (no grad mode, or no
    input requires one): then only the loss, still chunk by chunk."""
    chunk = chunk_tokens or CHUNK_TOKENS
    if chunk < 1:
        raise ValueError(f"chunk_tokens={chunk} must be >= 1")
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"h {tuple(h.shape)} and targets {tuple(targets.shape)} must share their leading shape")
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    if wants_grad:
        return _LinearCrossEntropy.apply(h2, weight, bias, t2, chunk)
    total = sum(_promoted_terms(F.linear(h2[s:s + chunk], weight, bias), t2[s:s + chunk])[1].sum()
                for s in range(0, h2.shape[0], chunk))
    return total / (t2 != IGNORE_INDEX).sum().float()
