"""DiJiang's one-token decoding step as ONE Triton kernel per layer (inference only).

A decoding step of :class:`leanformer.layers.dijiang.DiJiangAttention` between "q, k, v" (after RoPE, or
before it: the kernel can rotate q and k itself) and "the per-head GroupNorm's output" is, unfused, some 70
small kernels per layer (the float32 feature map, the log-normaliser's running max, casts, the
outer-product update of the state, the rescaled GroupNorm), so a step is bound by kernel launches whatever
the context. Here it is one launch, one program per (batch row b,
head h); each program, with q, k, v: (d,) of its row and head, P = ``feature_map.proj`` (d, m) float32:

* paper map (DiJiang eq. 10-12 with the stabilisers of :mod:`leanformer.layers.dijiang`)::

      z_q = (q · s) P + log D_h,   z_k = (k · s) P + log D_h            (s = in_scale = d^(−1/4); (m,))
      μ = max_f z_q,   f_q = exp(z_q − μ)
      n' = max(n + logγ_h, max_f z_k),   f_k = exp(z_k − n')         (running log-normaliser, in place)
      S ← exp(n + logγ_h − n') · S + f_k ⊗ v                         (S: (m, d) float32, in place)
      o = f_q S,   log_scale = −(n' + μ)                              (o = exp(log_scale) × the true output)
      y = GN(o / a, ε·exp(2(log_scale − log a))) · w_h + b_h          (a = max |o|, exponent capped at 80)

  the last line being :func:`leanformer.layers.dijiang.rescaled_group_norm`, the GroupNorm of the true
  output whatever the rescale. A first token (no state yet: n = −inf, S = 0) gives n' = max_f z_k, as
  ``running_log_norm`` with ``initial=None``.
* official map: ``f_q = softmax(q P)``, ``f_k = softmax(k P)``, ``S ← γ_h S + f_k ⊗ v``, ``o = f_q S``
  and the plain GroupNorm ``GN(o, ε) · w_h + b_h``.

This is :func:`leanformer.ops.decayed_linear_attention.recurrent` (eq. 13-14, one token) after the feature map,
with the layer's normalisation after it, in float32 throughout (the unfused path rounds the features and o
to the input dtype between its kernels; this one does not).

Shapes: q (B, H, 1, d); k, v (B, H_kv, 1, d) with H a multiple of H_kv (grouped-query: head h reads
key/value head h // (H / H_kv), as ``repeat_interleave`` orders them; no repeated copy is made); proj
(d, m); log_d (H, m) or None (official); log_gamma (H,) log γ, or (``decay_logit=True``) the learnable
decay's logit θ with log γ = log σ(θ) taken in the kernel; S (B, H, m, d) float32 and n (B, H) float32
(None: official), both updated in place (their addresses are what a captured CUDA graph reads and
writes); weight, bias (H·d,) the GroupNorm's → (B, 1, H·d) in ``out_dtype``. Any strides.

RoPE in the kernel (``cos``, ``sin`` given; the layer's switch :data:`ROPE_IN_KERNEL`): q and k come
un-rotated and the kernel rotates them as :meth:`leanformer.layers.rope.Rotary.rotate` does (rotate-half
over the first R channels, R even, the rest passed through; each product and the sum rounded to q's dtype
as Rotary's eager ops round them), at row ``position[0]`` of the tables cos, sin (L, R), or at row 0 when
``position`` is None (the caller passes the step's row itself). With a position tensor (the static decoder's
device counter) the kernel reads the position on the GPU, so a captured CUDA graph replays at every step
with no indexing kernel; a position outside [0, L) is clamped into the table (the caller keeps it inside:
:meth:`Rotary.reserve`).

Supported (else :func:`step_supported` says why): CUDA tensors on an Ampere or newer GPU (or CPU tensors
under ``TRITON_INTERPRET=1``); q, k, v float32, bfloat16 or float16, of one dtype; m and d powers of two in
[16, 128]; float32 S and n; no gradient (inputs that require one, with grad mode on, are refused: the step is
for inference).

The op is a ``torch.library.triton_op`` (``leanformer::dijiang_decay_step``, mutating S and n), so
``torch.compile`` traces the kernel without a graph break; under ``TRITON_INTERPRET=1`` (read at import,
as :mod:`leanformer.ops.fused_decay_attention` does) or without Triton it is an opaque ``custom_op``.
Triton is imported on the first call, not at import. Run-time switches (module attributes, read at each
launch): ``BLOCK_F`` (features per chunk; None: min(m, max(16, 4096 // d)), so a program holds at most
4096 elements of P and of S at once), ``NUM_WARPS`` (4), ``ROPE_IN_KERNEL`` (True: the layer's step
passes RoPE to the kernel; False: it rotates q and k first with :class:`Rotary`, as before) and
``GATE_IN_KERNEL`` (True: the layer's step passes its output gate g and the kernel writes silu(g) ⊙ y, so
the two element-wise launches after it are gone; False: the layer applies the gate itself), both read by
:meth:`leanformer.layers.dijiang.DiJiangAttention.fused_step`, and ``SINGLE_PASS`` (False; True: where one
chunk holds all m features, the kernel issues its read of S first and computes the features once instead
of twice: the same values, a shorter chain of dependent memory reads; off until timed) and ``PDL`` (False;
True: on Hopper, a programmatic dependent launch that lets the next kernel launch at once and waits for the
kernel before it only after issuing its read of S (single pass); off until timed).

The layer's switch for this route is ``leanformer.layers.dijiang.FUSED_STEP`` (a benchmark may time the
fused and the unfused step in one process). Timed on an H200 (docs/benchmarks.md, 2026-12-04): GPT-2
small's step 1.03–1.11 ms against 1.50–1.85 ms unfused, in a CUDA graph.
"""

import math

import torch

from leanformer.ops.fused_decay_attention import (MIN_DIM, OP_ROUTE, _on_device,
                                                  _triton_import_error, _wrap, kernel_reason)
from leanformer.ops.skinny_linear import pdl_launch

BLOCK_F: int | None = None  # features per chunk (a power of two ≥ 16 dividing m); None: min(m, max(16, 4096 // d))
NUM_WARPS = 4
ROPE_IN_KERNEL = True  # the layer's fused step rotates q and k in the kernel (False: Rotary before it)
GATE_IN_KERNEL = True  # the layer's fused step multiplies by silu(gate) in the kernel (False: two eager ops after it)
SINGLE_PASS = False  # where one chunk holds every feature (BLOCK_F = m): S read first, z_q and z_k computed once
PDL = False  # on Hopper, a programmatic dependent launch (skinny_linear.pdl_launch); off until timed
_ROUNDING = {torch.bfloat16: 1, torch.float16: 2}  # the kernel's Y_ROUND code of an output dtype (else 0: none)


def step_reason(device: torch.device, dtype: torch.dtype, m: int, d: int) -> str | None:
    """Why the fused step cannot run q, k, v of ``dtype`` and head dim ``d`` with ``m`` features on
    ``device``; None if it can."""
    return kernel_reason(device, dtype, (("feature dim m", m), ("head dim d", d))) or _triton_import_error()


def step_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: torch.Tensor,
                   S: torch.Tensor | None = None, n: torch.Tensor | None = None,
                   tables: dict[str, torch.Tensor | None] | None = None) -> str | None:
    """Why :func:`decay_step` refuses these inputs (see the module docstring), or None when it runs them.
    ``tables``: further named inputs (log_d, log_gamma, the GroupNorm's weight and bias) that must be on q's
    device. Shapes are not checked here (:func:`decay_step` raises on a mismatch); gradients neither."""
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k and v must have one dtype (got {q.dtype}, {k.dtype}, {v.dtype})"
    if not (q.device == k.device == v.device == proj.device):
        return f"q, k, v and proj must be on one device (got {q.device}, {k.device}, {v.device}, {proj.device})"
    for name, t in (tables or {}).items():
        if t is not None and t.device != q.device:
            return f"{name} must be on {q.device} with q (got {t.device})"
    for name, t in (("state S", S), ("log-normaliser n", n)):
        if t is not None and (t.dtype != torch.float32 or t.device != q.device):
            return f"{name} must be float32 on {q.device} (got {t.dtype} on {t.device})"
    return step_reason(q.device, q.dtype, proj.shape[-1], v.shape[-1])


def _block_f(m: int, d: int) -> int:
    bf = BLOCK_F if BLOCK_F is not None else min(m, max(MIN_DIM, 4096 // d))
    if bf < MIN_DIM or bf & (bf - 1) or m % bf:
        raise ValueError(f"BLOCK_F={bf} must be a power of two ≥ {MIN_DIM} dividing m={m}")
    return bf


def _new_output(q, k, v, proj, log_d, log_gamma, S, n, weight, bias, cos, sin, position, gate, in_scale, eps,
                decay_logit, out_dtype):
    B, H, _, d = q.shape
    dtype = torch.promote_types(out_dtype, gate.dtype) if gate is not None else out_dtype  # as silu(g) * y
    return q.new_empty(B, 1, H * d, dtype=dtype)


def _register(fn):
    name, mutated = "leanformer::dijiang_decay_step", ("S", "n")
    if OP_ROUTE == "triton_op":
        return torch.library.triton_op(name, mutates_args=mutated)(fn)
    op = torch.library.custom_op(name, mutates_args=mutated)(fn)
    op.register_fake(_new_output)
    return op


@_register
def _step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: torch.Tensor, log_d: torch.Tensor | None,
             log_gamma: torch.Tensor, S: torch.Tensor, n: torch.Tensor | None, weight: torch.Tensor,
             bias: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
             position: torch.Tensor | None, gate: torch.Tensor | None, in_scale: float, eps: float,
             decay_logit: bool, out_dtype: torch.dtype) -> torch.Tensor:
    from leanformer.ops import _fused_decay_step_kernel as kern

    B, H, _, d = q.shape
    m = proj.shape[-1]
    out = _new_output(q, k, v, proj, log_d, log_gamma, S, n, weight, bias, cos, sin, position, gate, in_scale,
                      eps, decay_logit, out_dtype)
    paper = log_d is not None
    rope = cos is not None
    # no RoPE: placeholders the kernel never reads (its ROPE branch is compiled out), as for the official map
    cs, sn = (cos, sin) if rope else (q, q)
    pos = position if position is not None else q
    gt = gate if gate is not None else q  # no gate: a placeholder the kernel never reads
    # official map: placeholders the kernel never touches (its PAPER branch is compiled out); n's is a tensor of
    # its own, not an alias of S, so that no analysis of the kernel's writes can see S written twice
    ld = log_d if paper else proj
    nn_ = n if paper else S.new_empty(1, 1)
    pdl = pdl_launch(q.device, PDL)
    with _on_device(q):
        _wrap(kern.step_kernel)[(B * H,)](
            q, k, v, proj, ld, log_gamma, S, nn_, weight, bias, out, cs, sn, pos, gt,
            q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(3),
            v.stride(0), v.stride(1), v.stride(3), proj.stride(0), proj.stride(1),
            ld.stride(0) if paper else 0, ld.stride(1) if paper else 0, log_gamma.stride(0),
            S.stride(0), S.stride(1), S.stride(2), S.stride(3),
            nn_.stride(0), nn_.stride(1),
            weight.stride(0), bias.stride(0), out.stride(0), out.stride(2),
            cs.stride(0) if rope else 0, cs.stride(1) if rope else 0,
            sn.stride(0) if rope else 0, sn.stride(1) if rope else 0,
            gt.stride(0) if gate is not None else 0, gt.stride(2) if gate is not None else 0,
            H, H // k.shape[1], cs.shape[0] if rope else 1, float(in_scale), float(eps),
            math.log(eps) if eps > 0 else 0.0,
            M=m, D=d, BLOCK_F=_block_f(m, d), PAPER=paper, DECAY_LOGIT=bool(decay_logit), HAS_EPS=eps > 0,
            ROPE=rope, R=cs.shape[1] if rope else 0, POS_PTR=position is not None, GATE=gate is not None,
            Y_ROUND=_ROUNDING.get(out_dtype, 0), SINGLE=bool(SINGLE_PASS) and _block_f(m, d) == m,
            PDL=pdl, num_warps=int(NUM_WARPS), **({"launch_pdl": True} if pdl else {}))
    return out


def decay_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: torch.Tensor, log_d: torch.Tensor | None,
               log_gamma: torch.Tensor, S: torch.Tensor, n: torch.Tensor | None, weight: torch.Tensor,
               bias: torch.Tensor, *, in_scale: float, eps: float, decay_logit: bool = False,
               out_dtype: torch.dtype | None = None, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None, position: torch.Tensor | None = None,
               gate: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step of a DiJiang layer, fused (module docstring): updates ``S`` (and ``n``, paper map)
    in place and returns the heads' GroupNorm-ed outputs (B, 1, H·d) in ``out_dtype`` (default q's).
    ``gate`` (B, 1, H·d), any strides: the output is ``silu(gate) * y`` instead, y the GroupNorm-ed output in
    ``out_dtype`` and silu(gate) in gate's dtype, rounded as those two eager ops round them, in the dtype
    their product promotes to (the layer's output gate, :data:`GATE_IN_KERNEL`).

    ``log_d`` None selects the official map (then ``n`` must be None); ``in_scale``: the feature map's input
    scale (paper: d^(−1/4); official: 1); ``eps``: the GroupNorm's; ``decay_logit``: ``log_gamma`` holds the
    logit θ of γ = σ(θ) (a learnable decay) instead of log γ. ``cos``, ``sin`` (L, R): RoPE in the kernel
    (module docstring), q and k given un-rotated, at row ``position[0]`` ((1,) int64 on q's device) of the
    tables, or row 0 when ``position`` is None; None: q and k are used as given. Raises ValueError naming
    the reason for unsupported inputs (:func:`step_supported`), a shape mismatch, or an input that requires
    grad while grad mode is on.
    """
    reason = step_supported(q, k, v, proj, S, n, dict(log_d=log_d, log_gamma=log_gamma, weight=weight, bias=bias,
                                                      cos=cos, sin=sin, position=position))
    if reason is not None:
        raise ValueError(f"the fused DiJiang decoding step cannot run these inputs: {reason}; use the "
                         "'recurrent' form")
    B, H, T, d = q.shape
    m = proj.shape[-1]
    H_kv = k.shape[1]
    if (T != 1 or k.shape != (B, H_kv, 1, d) or v.shape != k.shape or H_kv < 1 or H % H_kv
            or proj.shape != (d, m)):
        raise ValueError(f"expected q (B, H, 1, d), k and v (B, H_kv, 1, d) with H a multiple of H_kv, proj (d, m); "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, proj {tuple(proj.shape)}")
    paper = log_d is not None
    shapes = {"log_gamma": (log_gamma, (H,)), "S": (S, (B, H, m, d)), "weight": (weight, (H * d,)),
              "bias": (bias, (H * d,))}
    if paper:
        shapes.update(log_d=(log_d, (H, m)), n=(n, (B, H)))
    elif n is not None:
        raise ValueError("the official feature map has no log-normaliser: pass n=None with log_d=None")
    for name, (t, shape) in shapes.items():
        if t is None or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {None if t is None else tuple(t.shape)}")
    _check_rope(cos, sin, position, d)
    if gate is not None and (tuple(gate.shape) != (B, 1, H * d) or gate.device != q.device
                             or gate.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        raise ValueError(f"gate must be a float32, bfloat16 or float16 tensor of shape {(B, 1, H * d)} on "
                         f"{q.device}, got {tuple(gate.shape)} {gate.dtype} on {gate.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, proj, log_d, log_gamma, weight, bias, gate)):
        raise ValueError("the fused DiJiang decoding step is for inference and gives no gradient, but an input "
                         "requires grad: run it under torch.no_grad() / torch.inference_mode(), or use the "
                         "'recurrent' form")
    return _step_op(q, k, v, proj, log_d, log_gamma, S, n, weight, bias, cos, sin, position, gate, float(in_scale),
                    float(eps), bool(decay_logit), out_dtype or q.dtype)


def _check_rope(cos: torch.Tensor | None, sin: torch.Tensor | None, position: torch.Tensor | None, d: int) -> None:
    """RoPE's inputs of :func:`decay_step`: both tables or neither, (L, R) floating with R even in [2, d], a
    position (1,) int64 only with them."""
    if cos is None or sin is None:
        if cos is not None or sin is not None or position is not None:
            raise ValueError("RoPE in the fused step needs both cos and sin (a position only with them); got "
                             f"cos {cos is not None}, sin {sin is not None}, position {position is not None}")
        return
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] < 1:
        raise ValueError(f"cos and sin must be (L, R) tables of one shape, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    R = cos.shape[1]
    if R % 2 or not 2 <= R <= d:
        raise ValueError(f"the rotary dim R={R} (the tables' width) must be even and in [2, head dim d={d}]")
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError(f"cos and sin must be floating point, got {cos.dtype} and {sin.dtype}")
    if position is not None and (position.dtype != torch.int64 or tuple(position.shape) != (1,)):
        raise ValueError(f"position must be a (1,) int64 tensor, got {tuple(position.shape)} {position.dtype}")
