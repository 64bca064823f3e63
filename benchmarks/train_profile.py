"""Profile the GPU training step (issue 13): where the time of each arm goes, before and after a change.

Sections (each under the run's ``--budget``; what has not started when it is spent is skipped):

0. ``check``: NOBLE and shaped attention in bf16 (eager and compiled) against float64, and compiled vs
   eager training losses over 20 steps (d 256, 4 layers).
1. ``shaped``: shaped attention fwd+bwd vs SDPA alone (B 4, H 12, d_head 64, bf16, 512..32K), causal and
   bidirectional, eager and compiled; which SDPA kernel runs (profiler kernel names).
2. ``noble``: one linear fwd+bwd at 16,384 tokens (768→768, 768→3072, 3072→768): ``nn.Linear`` vs
   ``NobleLinear`` (rank 32, CosNet), eager and compiled, with the branch's FLOP share.
3. ``steps``: compiled training steps of whole models (GPT-2 small and the crammed-BERT shape), the
   top CUDA kernels of Pre-LN and NOBLE steps (torch.profiler), graph breaks logged.

    PYTHONPATH=$PWD python3 benchmarks/train_profile.py --out $OUT [--sections shaped,noble,steps]
    PYTHONPATH=$PWD python benchmarks/train_profile.py --cpu-smoke     # tiny, on CPU: tests this script

Writes ``train_profile.json`` and ``train_profile.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def bench(fn, device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU)."""
    from leanformer.bench.timing import time_fn

    return time_fn(fn, device, warmup=warmup, repeats=repeats, max_seconds=5.0).median_ms


KERNEL_CLASSES = (  # (class, substrings of the kernel name), first match wins; annotations are not kernels
    ("annotation", ("Optimizer.", "## Call", "Torch-Compiled", "CompiledFunction", "ProfilerStep")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "splitKreduce")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("optimizer", ("multi_tensor_apply", "FusedOpti")),
    ("inductor (triton)", ("triton_",)),
    ("copy/fill", ("copy", "Fill", "Memset", "Memcpy", "cat")),
)


def kernel_class(name: str) -> str:
    return next((c for c, keys in KERNEL_CLASSES if any(k in name for k in keys)), "other")


def kernel_totals(rows: list[dict]) -> dict[str, float]:
    """ms per step by :data:`KERNEL_CLASSES` class over ``rows`` (all kernels, annotations apart), and "total"."""
    out: dict[str, float] = {}
    for r in rows:
        c = kernel_class(r["kernel"])
        out[c] = out.get(c, 0.0) + r["ms_per_step"]
    out["total"] = sum(v for c, v in out.items() if c != "annotation")
    return out


def top_kernels(fn, device: torch.device, steps: int = 2, limit: int = 18,
                totals: dict | None = None) -> list[dict]:
    """The ``limit`` kernels with the largest total device time over ``steps`` calls of ``fn``; ``totals``
    (a dict) receives :func:`kernel_totals` over all of them."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if device.type != "cuda":
            t = e.self_cpu_time_total
        if t > 0 and (device.type != "cuda" or e.device_type.name == "CUDA"):
            rows.append({"kernel": e.key[:140], "ms_per_step": t / 1e3 / steps, "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    if totals is not None:
        totals.update(kernel_totals(rows))
    total = sum(r["ms_per_step"] for r in rows if kernel_class(r["kernel"]) != "annotation")
    for r in rows:
        r["share"] = r["ms_per_step"] / total if total else 0.0
    return rows[:limit]


# ------------------------------------------------------------------------------------------ 1. shaped attention


def section_shaped(device: torch.device, smoke: bool, result: dict) -> None:
    from leanformer.layers.shaped import shaped_attention

    B, H, D = (1, 2, 16) if smoke else (4, 12, 64)
    lengths = (64, 128) if smoke else (512, 1024, 2048, 4096, 8192, 16384, 32768)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    compiled = torch.compile(shaped_attention, dynamic=False)

    def sdpa(q, k, v, a, b, c, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    from leanformer.layers import shaped

    def with_mix_kernel(*args):  # the mix in leanformer.ops.shaped_mix's kernels, SDPA as before
        old, shaped.MIX_KERNEL = shaped.MIX_KERNEL, "cuda"
        try:
            return shaped_attention(*args)
        finally:
            shaped.MIX_KERNEL = old

    variants = {"sdpa": sdpa, "shaped_eager": shaped_attention, "shaped_compiled": compiled,
                "shaped_kernel": with_mix_kernel}
    rows = []
    for causal in (True, False):
        for T in (lengths if causal else lengths[::3]):
            torch.manual_seed(T)
            # the model's layout: (B, T, H·D) activations viewed as (B, H, T, D)
            q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dt).transpose(1, 2).requires_grad_()
                       for _ in range(3))
            gains = [torch.rand(H, device=device) + 0.5 for _ in range(3)]  # float32, as the parameters
            g = torch.randn(B, H, T, D, device=device, dtype=dt)
            row = {"causal": causal, "T": T}
            for name, fn in variants.items():
                def step(fn=fn, q=q, k=k, v=v, gains=gains, causal=causal, g=g):
                    out = fn(q, k, v, *gains, causal)
                    out.backward(g.to(out.dtype))
                try:
                    step()
                    row[name + "_ms"] = bench(step, device)
                    out = fn(q, k, v, *gains, causal)
                    row[name + "_out_dtype"] = str(out.dtype)
                except Exception as e:  # noqa: BLE001
                    row[name + "_ms"] = None
                    row[name + "_error"] = f"{type(e).__name__}: {e}"[:200]
            if T == lengths[1] and causal:  # GPU time apart from the host's: the kernels of one call each
                for name, fn in variants.items():
                    totals: dict = {}
                    row["kernels_" + name.removeprefix("shaped_")] = top_kernels(lambda fn=fn: step(fn), device,
                                                                                 limit=12, totals=totals)
                    row["kernel_ms_" + name] = totals.get("total")
            rows.append(row)
            s = row.get("sdpa_ms")
            log(f"shaped causal={causal} T={T}: sdpa {s}, eager {row.get('shaped_eager_ms')}, "
                f"compiled {row.get('shaped_compiled_ms')}, kernel {row.get('shaped_kernel_ms')} ms")
    result["shaped"] = rows


# ------------------------------------------------------------------------------------------ 0. checks


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN stays NaN)."""
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


def section_check(device: torch.device, smoke: bool, result: dict) -> None:
    """Compiled vs eager losses over 20 steps; NOBLE (one buffer, addmm) and shaped attention (chunked
    running mean) in bf16 against float64, forward and gradients, compiled and eager."""
    from leanformer.bench import train as bt
    from leanformer.layers.noble import NobleLinear
    from leanformer.layers.shaped import shaped_attention, shaped_attention_reference

    rows = []

    def add(name: str, err: float, tol: float) -> None:
        ok = err == err and err <= tol
        rows.append({"check": name, "err": err, "tol": tol, "status": "PASS" if ok else "FAIL"})
        log(f"{'PASS' if ok else 'FAIL'} {name}: {err:.2e} (tol {tol})")

    bf = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 2e-2 if bf == torch.bfloat16 else 1e-5
    # NOBLE: fused layer (stacked view + addmm) under autocast vs float64 reference, out and grads
    torch.manual_seed(0)
    layer = NobleLinear(768 if not smoke else 32, 768 if not smoke else 32, rank=32).to(device)
    with torch.no_grad():
        layer.up.weight.normal_(0, 0.5 / 32 ** 0.5)
    x = torch.randn(4096 if not smoke else 64, layer.in_features, device=device)
    g = torch.randn(x.shape[0], layer.out_features, device=device)
    ref_layer = NobleLinear(layer.in_features, layer.out_features, rank=32).to(device).double()
    ref_layer.load_state_dict(layer.state_dict())
    xr = x.double().requires_grad_()
    yr = ref_layer.forward_reference(xr)
    yr.backward(g.double())
    for comp in (False, True):
        layer.zero_grad()
        fn = torch.compile(layer) if comp else layer
        xi = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=bf, enabled=bf != torch.float32):
            y = fn(xi)
        y.backward(g.to(y.dtype))
        errs = [rel(y, yr), rel(xi.grad, xr.grad), rel(layer.weight.grad, ref_layer.weight.grad),
                rel(layer.down.weight.grad, ref_layer.down.weight.grad),
                rel(layer.up.weight.grad, ref_layer.up.weight.grad)]
        add(f"noble fused {'compiled' if comp else 'eager'} bf16 vs float64 (out, dx, dW, dW_down, dW_up)",
            max(errs), tol)
    # shaped attention (chunked running mean) vs the materialised float64 reference, out and grads
    B, H, T, D = (2, 4, 1000, 64) if not smoke else (1, 2, 70, 8)
    q, k, v = (torch.randn(B, T, H, D, device=device).transpose(1, 2) for _ in range(3))
    gains = [torch.rand(H, device=device) + 0.5 for _ in range(3)]
    go = torch.randn(B, H, T, D, device=device)
    for causal in (True, False):
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        ref = shaped_attention_reference(*leaves, *(t.double() for t in gains), causal=causal)
        ref_grads = torch.autograd.grad(ref, leaves, go.double())
        for comp in (False, True):
            fn = torch.compile(shaped_attention) if comp else shaped_attention
            ins = [t.to(bf).requires_grad_() for t in (q, k, v)]
            out = fn(*ins, *gains, causal=causal)
            grads = torch.autograd.grad(out, ins, go.to(out.dtype))
            errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
            add(f"shaped causal={causal} {'compiled' if comp else 'eager'} bf16 vs float64 (out, dq, dk, dv)",
                max(errs), tol)
    # compiled vs eager training losses, 20 steps, same init and data
    for arm in ("preln", "noble_fused", "sas_p"):
        eager, compiled = bt.compiled_vs_eager_losses(arm, "cpu" if not smoke else "tiny", device)
        diff = max(abs(a - b) / abs(b) for a, b in zip(compiled, eager))
        add(f"{arm}: compiled vs eager loss, 20 steps (max relative difference; "
            f"final {eager[-1]:.4f} vs {compiled[-1]:.4f})", diff, 2e-2)
    result["checks"] = rows


# ------------------------------------------------------------------------------------------ 2. NOBLE layer


def section_noble(device: torch.device, smoke: bool, result: dict) -> None:
    from leanformer.layers.noble import NobleLinear

    n = 256 if smoke else 16384
    shapes = ((64, 64),) if smoke else ((768, 768), (768, 3072), (3072, 768))
    rows = []
    for d_in, d_out in shapes:
        torch.manual_seed(0)
        layers = {"linear": nn.Linear(d_in, d_out, bias=True),
                  "noble_fused": NobleLinear(d_in, d_out, bias=True, rank=32, fused=True),
                  "noble_kcat": NobleLinear(d_in, d_out, bias=True, rank=32, fused=True, compiled_form="kcat"),
                  "noble_plain": NobleLinear(d_in, d_out, bias=True, rank=32, fused=False)}
        x = torch.randn(n, d_in, device=device, requires_grad=True)
        g = torch.randn(n, d_out, device=device)
        row = {"d_in": d_in, "d_out": d_out, "tokens": n,
               "branch_flop_share": layers["noble_fused"].flops_per_token() / (2 * d_in * d_out)}
        for name, layer in layers.items():
            layer.to(device)
            for comp in (False, True):
                if not comp and name == "noble_kcat":
                    continue  # eager ignores compiled_form
                torch._dynamo.reset()
                fn = torch.compile(layer) if comp else layer
                key = f"{name}{'_compiled' if comp else ''}"

                leaves = (x, *layer.parameters())

                def step(fn=fn, x=x, g=g, leaves=leaves):  # gradients returned, not accumulated into .grad
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        y = fn(x)
                    return torch.autograd.grad(y, leaves, g.to(y.dtype))
                try:
                    step()
                    row[f"{key}_ms"] = bench(step, device)
                    if comp and name != "noble_plain":
                        row[f"kernels_{key}"] = top_kernels(step, device, limit=12)
                except Exception as e:  # noqa: BLE001
                    row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        log(f"noble {d_in}->{d_out}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                   if k.endswith("_ms")))
    # the raw matrix products of the branch (bf16, 16K tokens), both operand orders for the weight grads
    if device.type == "cuda" and not smoke:
        mm = {}
        bf = torch.bfloat16
        for d in (768, 3072):
            x = torch.randn(n, d, device=device, dtype=bf)
            wd = torch.randn(32, d, device=device, dtype=bf)
            dz = torch.randn(n, 32, device=device, dtype=bf)
            mm[f"x@Wdᵀ ({n}x{d}x32)"] = bench(lambda x=x, wd=wd: x @ wd.t(), device)
            mm[f"dzᵀ@x (32x{n}x{d})"] = bench(lambda x=x, dz=dz: dz.t() @ x, device)
            mm[f"xᵀ@dz ({d}x{n}x32)"] = bench(lambda x=x, dz=dz: x.t() @ dz, device)
            mm[f"dz@Wd ({n}x32x{d})"] = bench(lambda dz=dz, wd=wd: dz @ wd, device)
            mm[f"copy {n}x{d}"] = bench(lambda x=x: x.clone(), device)
        a = torch.randn(8192, 8192, device=device, dtype=bf)
        ms = bench(lambda: a @ a, device)
        mm["mm 8192³ TFLOP/s"] = 2 * 8192**3 / ms / 1e9
        result["branch_mm_ms"] = mm
        log("branch mm: " + ", ".join(f"{k} {v:.3f}" for k, v in mm.items()))
    result["noble_layer"] = rows


# ------------------------------------------------------------------------------------------ 3. whole steps


@dataclass(frozen=True)
class StepRun:
    """One compiled training step to time: the model (size, arm), its batch, and the switches it runs with."""

    label: str
    size: str                      # a key of section_steps' sizes: "gpt2", "gpt2-4k", "bert"
    arm: str
    batch: int
    profile: bool                  # also list its top kernels (torch.profiler)
    mode: str | None = None        # torch.compile mode ("reduce-overhead": CUDA graphs)
    noble_form: str = "stacked"    # noble.compiled_form
    optimizer: str = "fused"       # "compiled": compiled_adamw_step, else the library's fused AdamW
    cosnet_kernel: str = "never"   # noble.COSNET_KERNEL ("cuda": CosNet through leanformer.ops.cosnet)
    mix_kernel: str = "never"      # shaped.MIX_KERNEL ("cuda": the mix in leanformer.ops.shaped_mix)
    gated: bool = False            # dijiang.GATED_FLA_TRAINING_FROM = 2 (DiJiang through fla with one gate per token)
    gated_backward: str = "passes"  # gated_attention.BACKWARD ("fla": dk, dv from fla's backward kernels, no flips)
    logits: bool = False           # the model returns its logits too (every step before 2026-12-07 14:40)
    fused_loss: bool = False       # linear_cross_entropy.FUSED "always" (else "never"): the head and loss in chunks
    # (the library's default since 19:30 on CUDA, with loss_chunk 32768; the base rows keep the plain route)
    ce_kernel: str = "cuda"        # linear_cross_entropy.KERNEL ("never": each chunk by PyTorch's ops in float32)
    loss_chunk: int = 4096         # linear_cross_entropy.CHUNK_TOKENS
    pos: str = "rope"              # model.pos; "learned": GPT-2's own positions (llm.c's model), no rotary kernels
    ce_rows: int | None = None     # linear_cross_entropy.ROW_PROGRAMS_PER_SM (None: one kernel program per row)
    train_kernel: str = "never"    # noble.TRAIN_KERNEL ("cuda": NOBLE's linears by leanformer.ops.noble_train)
    branch: str = "fused"          # noble_train.BRANCH ("separate": cuBLAS rank-r products, then CosNet's kernels)
    rope_tables: str = "op"        # rope.COMPILED_TABLES ("inline": the tables fused into each rotation, before 23:30)
    tma: bool = False              # two_segment_matmul.TMA (NOBLE's route: the products' tiles by tensor descriptors)
    persistent: bool = False       # two_segment_matmul.PERSISTENT (with tma: one program per SM looping over tiles)

    def switches(self) -> dict[str, object]:
        """The module switches this run sets (dotted paths, for :func:`leanformer.bench.kernel_switches.switches_set`;
        the gated route is off in a run without ``gated``, whatever the module's default)."""
        ops, layers = "leanformer.ops.", "leanformer.layers."
        return {layers + "noble.COSNET_KERNEL": self.cosnet_kernel, layers + "shaped.MIX_KERNEL": self.mix_kernel,
                layers + "dijiang.GATED_FLA_TRAINING_FROM": 2 if self.gated else None,
                ops + "gated_attention.BACKWARD": self.gated_backward,
                ops + "linear_cross_entropy.FUSED": "always" if self.fused_loss else "never",
                ops + "linear_cross_entropy.KERNEL": self.ce_kernel,
                ops + "linear_cross_entropy.CHUNK_TOKENS": self.loss_chunk,
                ops + "linear_cross_entropy.ROW_PROGRAMS_PER_SM": self.ce_rows,
                layers + "noble.TRAIN_KERNEL": self.train_kernel, ops + "noble_train.BRANCH": self.branch,
                layers + "rope.COMPILED_TABLES": self.rope_tables, ops + "two_segment_matmul.TMA": self.tma,
                ops + "two_segment_matmul.PERSISTENT": self.persistent}


CG = "reduce-overhead"
AT = "max-autotune"  # CUDA graphs too
STEP_PLAN = [  # most wanted first
    StepRun("gpt2 preln b16", "gpt2", "preln", 16, True),
    StepRun("gpt2 noble_fused b16", "gpt2", "noble_fused", 16, True),
    StepRun("gpt2 sas_p b16", "gpt2", "sas_p", 16, True),
    StepRun("gpt2 sas_p_nonorm b16", "gpt2", "sas_p_nonorm", 16, False),
    StepRun("bert preln b128", "bert", "preln", 128, False),
    StepRun("bert sas_p b128", "bert", "sas_p", 128, False),
    StepRun("bert sas_p_nonorm b128", "bert", "sas_p_nonorm", 128, False),
    StepRun("gpt2 preln b16 cudagraphs", "gpt2", "preln", 16, True, CG),
    StepRun("gpt2 preln b32", "gpt2", "preln", 32, False),
    StepRun("gpt2 noble_fused b16 cudagraphs", "gpt2", "noble_fused", 16, True, CG),
    StepRun("gpt2 noble_kcat b16", "gpt2", "noble_fused", 16, True, noble_form="kcat"),
    StepRun("gpt2 noble_kcat b16 cudagraphs", "gpt2", "noble_fused", 16, True, CG, noble_form="kcat"),
    StepRun("gpt2 preln b16 cudagraphs copt", "gpt2", "preln", 16, True, CG, optimizer="compiled"),
    StepRun("gpt2 noble_kcat b16 cudagraphs copt", "gpt2", "noble_fused", 16, True, CG, noble_form="kcat",
            optimizer="compiled"),
    StepRun("gpt2 noble_kcat b16 cudagraphs cosk", "gpt2", "noble_fused", 16, True, CG, noble_form="kcat",
            cosnet_kernel="cuda"),
    StepRun("gpt2 noble_fused b16 cudagraphs cosk", "gpt2", "noble_fused", 16, True, CG, cosnet_kernel="cuda"),
    StepRun("gpt2 noble_kcat b16 cudagraphs copt cosk", "gpt2", "noble_fused", 16, True, CG, noble_form="kcat",
            optimizer="compiled", cosnet_kernel="cuda"),
    StepRun("gpt2 dijiang_scratch b16", "gpt2", "dijiang_scratch", 16, True),
    StepRun("gpt2-4k preln b4", "gpt2-4k", "preln", 4, True),
    StepRun("gpt2-4k dijiang_scratch b4", "gpt2-4k", "dijiang_scratch", 4, True),
    StepRun("gpt2 sas_p b16 cudagraphs", "gpt2", "sas_p", 16, True, CG),
    StepRun("gpt2 sas_p_nonorm b16 cudagraphs", "gpt2", "sas_p_nonorm", 16, True, CG),
    StepRun("bert preln b128 cudagraphs", "bert", "preln", 128, True, CG),
    StepRun("bert sas_p b128 cudagraphs", "bert", "sas_p", 128, True, CG),
    StepRun("bert sas_p_nonorm b128 cudagraphs", "bert", "sas_p_nonorm", 128, True, CG),
    StepRun("gpt2 sas_p b16 cudagraphs mixk", "gpt2", "sas_p", 16, True, CG, mix_kernel="cuda"),
    StepRun("gpt2 sas_p_nonorm b16 cudagraphs mixk", "gpt2", "sas_p_nonorm", 16, False, CG, mix_kernel="cuda"),
    StepRun("bert sas_p b128 cudagraphs mixk", "bert", "sas_p", 128, True, CG, mix_kernel="cuda"),
    StepRun("bert sas_p_nonorm b128 cudagraphs mixk", "bert", "sas_p_nonorm", 128, True, CG, mix_kernel="cuda"),
    # Inductor times its Triton matrix-product templates (bias, activation and the branch's add fused into
    # their epilogues) against cuBLAS for each shape; CUDA graphs as with CG
    # NOBLE unfused: main and down as two products (the main one with Pre-LN's tiles; no [dy, dz] concatenation
    # nor stacked bias gradient in the backward; x read once more), never timed under CUDA graphs
    StepRun("gpt2 noble b16 cudagraphs cosk", "gpt2", "noble", 16, True, CG, cosnet_kernel="cuda"),
    StepRun("gpt2 preln b16 autotune", "gpt2", "preln", 16, True, AT),
    StepRun("gpt2 noble_fused b16 autotune cosk", "gpt2", "noble_fused", 16, True, AT, cosnet_kernel="cuda"),
    StepRun("gpt2 preln b32 autotune", "gpt2", "preln", 32, False, AT),
    StepRun("gpt2 preln b32 cudagraphs", "gpt2", "preln", 32, False, CG),  # #13's best batch with CUDA graphs
    # issue #14's training targets (≥ 0.9× Pre-LN at 1K, ≥ 1.3× at 4K; 0.807× and 0.805× compiled without CUDA
    # graphs, H200 2026-12-05): DiJiang's step never ran under CUDA graphs, where its extra launches cost no host time
    StepRun("gpt2 dijiang_scratch b16 cudagraphs", "gpt2", "dijiang_scratch", 16, True, CG),
    StepRun("gpt2-4k preln b4 cudagraphs", "gpt2-4k", "preln", 4, False, CG),
    StepRun("gpt2-4k dijiang_scratch b4 cudagraphs", "gpt2-4k", "dijiang_scratch", 4, True, CG),
    StepRun("gpt2 dijiang_scratch b16 cudagraphs gated", "gpt2", "dijiang_scratch", 16, True, CG, gated=True),
    StepRun("gpt2-4k dijiang_scratch b4 cudagraphs gated", "gpt2-4k", "dijiang_scratch", 4, True, CG, gated=True),
    # 2026-12-07 14:40: the steps no longer return the logits (their unused gradient: a 0.50 ms fill and a 1.09 ms
    # copy at b16, callN3); the gated backward without flips (3.51 ms of 51.89 at 4K, callO)
    StepRun("gpt2 preln b16 cudagraphs logits", "gpt2", "preln", 16, False, CG, logits=True),
    StepRun("gpt2 preln b32 cudagraphs logits", "gpt2", "preln", 32, False, CG, logits=True),
    StepRun("gpt2-4k dijiang_scratch b4 cudagraphs gated flabwd", "gpt2-4k", "dijiang_scratch", 4, True, CG,
            gated=True, gated_backward="fla"),
    StepRun("gpt2 preln b16 cudagraphs fusedloss", "gpt2", "preln", 16, True, CG, fused_loss=True),
    StepRun("gpt2 preln b32 cudagraphs fusedloss", "gpt2", "preln", 32, False, CG, fused_loss=True),
    StepRun("gpt2 dijiang_scratch b16 cudagraphs gated flabwd", "gpt2", "dijiang_scratch", 16, True, CG, gated=True,
            gated_backward="fla"),
    # 17:45: each chunk's loss and gradient by one Triton kernel in bf16 (linear_cross_entropy.KERNEL, the default
    # since; the fusedloss runs above took PyTorch's float32 ops), in chunks of 4,096 tokens or the whole batch
    StepRun("gpt2 preln b16 cudagraphs fusedloss torchce", "gpt2", "preln", 16, False, CG, fused_loss=True,
            ce_kernel="never"),
    StepRun("gpt2 preln b16 cudagraphs fusedloss whole", "gpt2", "preln", 16, True, CG, fused_loss=True,
            loss_chunk=1 << 20),
    StepRun("gpt2 preln b32 cudagraphs fusedloss whole", "gpt2", "preln", 32, False, CG, fused_loss=True,
            loss_chunk=1 << 20),
    # 19:20: GPT-2's learned positions instead of RoPE (the model llm.c's 468K tokens/s per H100 is for; the
    # rotary kernels took ≈ 1.7 ms of the b16 step's 34.6 ms of kernels at 18:55, callZ)
    StepRun("gpt2 preln b16 cudagraphs learnedpos", "gpt2", "preln", 16, True, CG, pos="learned"),
    StepRun("gpt2 preln b32 cudagraphs fusedloss whole learnedpos", "gpt2", "preln", 32, False, CG, fused_loss=True,
            loss_chunk=1 << 20, pos="learned"),
    # 19:25: the loss kernel with 2 or 4 programs per SM looping over rows (fewer rows in flight: the second read
    # of each row from L2), the whole batch
    StepRun("gpt2 preln b16 cudagraphs fusedloss whole rows2", "gpt2", "preln", 16, True, CG, fused_loss=True,
            loss_chunk=1 << 20, ce_rows=2),
    StepRun("gpt2 preln b16 cudagraphs fusedloss whole rows4", "gpt2", "preln", 16, False, CG, fused_loss=True,
            loss_chunk=1 << 20, ce_rows=4),
    StepRun("gpt2 preln b32 cudagraphs fusedloss whole rows2", "gpt2", "preln", 32, False, CG, fused_loss=True,
            loss_chunk=1 << 20, ce_rows=2),
    # 2026-12-07 21:00: NOBLE's linears by the training route (the branch inside two-segment products of our own,
    # CosNet by its kernels), against the stacked form with the CosNet kernels and Pre-LN, all without logits
    StepRun("gpt2 noble_fused b16 cudagraphs route", "gpt2", "noble_fused", 16, True, CG, train_kernel="cuda"),
    StepRun("gpt2 noble_fused b16 cudagraphs route sepbranch", "gpt2", "noble_fused", 16, True, CG,
            train_kernel="cuda", branch="separate"),
    StepRun("gpt2 noble_fused b16 cudagraphs cosk fusedloss whole", "gpt2", "noble_fused", 16, True, CG,
            cosnet_kernel="cuda", fused_loss=True, loss_chunk=1 << 20),
    StepRun("gpt2 noble_fused b16 cudagraphs route fusedloss whole", "gpt2", "noble_fused", 16, True, CG,
            train_kernel="cuda", fused_loss=True, loss_chunk=1 << 20),
    StepRun("gpt2 preln b16 cudagraphs fusedloss whole learnedpos", "gpt2", "preln", 16, False, CG, fused_loss=True,
            loss_chunk=1 << 20, pos="learned"),
    # 2026-12-07 23:30: the rotary tables by one op instead of fused into every rotation (the default since)
    StepRun("gpt2 preln b16 cudagraphs inlinerope", "gpt2", "preln", 16, False, CG, rope_tables="inline"),
    StepRun("gpt2 noble_fused b16 cudagraphs route sepbranch inlinerope", "gpt2", "noble_fused", 16, False, CG,
            train_kernel="cuda", branch="separate", rope_tables="inline"),
    StepRun("gpt2 preln b32 cudagraphs fusedloss whole inlinerope", "gpt2", "preln", 32, False, CG, fused_loss=True,
            loss_chunk=1 << 20, rope_tables="inline"),
    # 2026-12-08 00:20: the route's two products by the TMA form (tiles from a products run's "+tma" entries)
    StepRun("gpt2 noble_fused b16 cudagraphs route sepbranch tma", "gpt2", "noble_fused", 16, True, CG,
            train_kernel="cuda", branch="separate", tma=True),
    StepRun("gpt2 noble_fused b16 cudagraphs route sepbranch tmap", "gpt2", "noble_fused", 16, False, CG,
            train_kernel="cuda", branch="separate", tma=True, persistent=True),
    StepRun("bert preln b128 autotune", "bert", "preln", 128, False, AT),
    StepRun("bert sas_p_nonorm b128 autotune", "bert", "sas_p_nonorm", 128, False, AT),
]


# StepRun's switches (every field after the model, batch and mode): a Pre-LN run with all of them at their defaults
# is its shape's base row
SWITCHES = tuple(f.name for f in fields(StepRun) if f.name not in ("label", "size", "arm", "batch", "profile", "mode"))
BURST = 5  # steps per timed call in the back-to-back timing (one synchronisation per BURST steps)
PLAN: list[str] = []  # --plan: the STEP_PLAN labels to run, in this order (empty: all)


class compiled_adamw_step:  # noqa: N801 - stands in for an optimizer: zero_grad() and step()
    """AdamW over the library's parameter groups (same hyper-parameters as ``build_optimizer``) with its
    step under ``torch.compile``: foreach, capturable, learning rates as tensors (a new rate is a new value,
    not a recompile), so the step is a few generated kernels over all tensors instead of a Python loop over
    each of them in every step. An experiment for the host time NOBLE's 746 parameter tensors cost."""

    def __init__(self, model: nn.Module, cfg) -> None:
        from leanformer.train.optim import param_groups

        cuda = next(model.parameters()).is_cuda
        groups = param_groups(model, cfg.weight_decay)
        if cuda:  # tensor learning rates need capturable=True
            dev = next(model.parameters()).device
            for g in groups:
                g["lr"] = torch.tensor(cfg.lr * g["lr_mult"], device=dev)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=True, capturable=cuda)
        self._step = torch.compile(self.opt.step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self._step()


def _time_step(run_spec: StepRun, sz, seq: int, device: torch.device, smoke: bool) -> dict:
    """One compiled training step of ``run_spec`` (its switches already set), timed and, if asked, profiled: its
    result row (``status`` "ok", or "failed: ..." with the error)."""
    from leanformer.arms import arm_config
    from leanformer.bench import train as bt
    from leanformer.config import TrainConfig

    label, arm, mode = run_spec.label, run_spec.arm, run_spec.mode
    batch = 2 if smoke else run_spec.batch
    row = {"label": label, "arm": arm, "batch": batch, "seq_len": seq, "mode": mode,
           "plain": all(getattr(run_spec, f.name) == f.default for f in fields(StepRun) if f.name in SWITCHES)}
    try:
        cfg = arm_config(bt.base_config(sz, seq, pos=run_spec.pos), arm)  # validated with its positions
        cfg.noble.compiled_form = run_spec.noble_form
        step = bt.training_step(cfg, device, batch, seq, compile=True, compile_mode=mode)
        step.return_logits = run_spec.logits
        model, run, opt = step.model, step.run, step.optimizer
        row["flops_per_token"] = model.flops_per_token(seq)
        if run_spec.optimizer == "compiled":
            opt = step.optimizer = compiled_adamw_step(model, TrainConfig(lr=1e-4))
        t = time.monotonic()
        step()
        row["compile_s"] = time.monotonic() - t
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = bench(step, device, warmup=3, repeats=15)
        row["step_ms"] = ms
        row["tokens_per_s"] = batch * seq / ms * 1e3
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        # BURST steps with one synchronisation: the step's time once the host runs ahead of the GPU (each timed
        # step above starts on an idle GPU, so the host's work before its first kernel counts in it; here that
        # lead-in counts once per BURST steps)
        burst_ms = bench(lambda s=step: [s() for _ in range(BURST)], device, warmup=1, repeats=4)
        row["back_to_back_ms"] = burst_ms / BURST
        if run_spec.profile:
            row["kernel_totals"] = {}
            row["kernels"] = top_kernels(step, device, limit=40, totals=row["kernel_totals"])
        row["status"] = "ok"
        log(f"{label}: {ms:.2f} ms/step ({row['back_to_back_ms']:.2f} back to back), "
            f"{row['tokens_per_s']:,.0f} tok/s, compile {row['compile_s']:.0f} s, "
            f"peak {row['peak_mem_gib']} GiB")
        del model, opt, run
    except Exception as e:  # noqa: BLE001
        row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
        traceback.print_exc(limit=4)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def section_steps(device: torch.device, smoke: bool, result: dict, deadline: float) -> None:
    from leanformer.bench import train as bt
    from leanformer.bench.kernel_switches import switches_set

    sizes = {"gpt2": (bt.SIZES["gpt2"], 1024), "gpt2-4k": (bt.SIZES["gpt2"], 4096), "bert": (bt.SIZES["bert"], 128)}
    if smoke:
        sizes = {k: (bt.SIZES["tiny"], 32) for k in sizes}
    rows = []
    plan = sorted((p for p in STEP_PLAN if p.label in PLAN), key=lambda p: PLAN.index(p.label)) if PLAN else STEP_PLAN
    for run_spec in plan:
        label, arm, mode = run_spec.label, run_spec.arm, run_spec.mode
        if time.monotonic() > deadline - (110 if arm.startswith("noble") else 45) - (120 if mode == AT else 0):
            rows.append({"label": label, "status": "skipped (time budget)"})
            log(f"{label}: skipped (time budget)")
            continue
        with switches_set(run_spec.switches()):  # restored after the run, whatever happens
            rows.append(_time_step(run_spec, *sizes[run_spec.size], device, smoke))
    result["steps"] = rows


# ------------------------------------------------------------------------------------------ report


def markdown(result: dict) -> str:
    out = [f"# Training-step profile: {result['meta']['device']}", "",
           f"- date {result['meta']['date']}; torch {result['meta']['torch']}; command `{result['meta']['command']}`",
           ""]
    if "steps" in result:
        out += ["## Compiled training steps", "",
                "| run | step ms | tokens/s | MFU | peak GiB | FLOPs × preln | FLOP-limit × preln | × preln | "
                "realised | mem × preln | compile s | back-to-back ms | back-to-back tokens/s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        peak = result["meta"].get("peak_flops")
        def key(r: dict) -> tuple:
            return r["label"].split()[0], r["batch"], r.get("mode")

        base: dict = {}  # the first plain Pre-LN run (no switch set) of each size, batch and mode, else the first
        for r in sorted((r for r in result["steps"] if r.get("status") == "ok" and r["arm"] == "preln"),
                        key=lambda r: not r.get("plain", True)):
            base.setdefault(key(r), r)
        for r in result["steps"]:
            if r.get("status") != "ok":
                out.append(f"| {r['label']} | {r.get('status')} | | | | | | | | | | | |")
                continue
            mfu = f"{r['flops_per_token'] * r['tokens_per_s'] / peak:.1%}" if peak else "—"
            b2b = (f"{r['back_to_back_ms']:.2f} | {r['batch'] * r['seq_len'] / r['back_to_back_ms'] * 1e3:,.0f}"
                   if r.get("back_to_back_ms") else "— | —")
            b = base.get(key(r))
            if b:
                fr = r["flops_per_token"] / b["flops_per_token"]
                sp = r["tokens_per_s"] / b["tokens_per_s"]
                mem = (r["peak_mem_gib"] or 0) / (b["peak_mem_gib"] or 1)
                ratios = f"{fr:.4f} | {1 / fr:.3f} | {sp:.3f} | {sp * fr:.1%} | {mem:.3f}"
            else:
                ratios = "— | — | — | — | —"
            out.append(f"| {r['label']} | {r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                       f"{r['peak_mem_gib'] or 0:.2f} | {ratios} | {r['compile_s']:.0f} | {b2b} |")
        totals = [r for r in result["steps"] if r.get("kernel_totals")]
        if totals:
            classes = sorted({c for r in totals for c in r["kernel_totals"]} - {"annotation", "total"}) + ["total"]
            out += ["", "### GPU kernel time by class (ms per step; the sum of the profiled kernels)", "",
                    "| run | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
            out += [f"| {r['label']} | " + " | ".join(f"{r['kernel_totals'].get(c, 0.0):.2f}" for c in classes)
                    + " |" for r in totals]
        for r in result["steps"]:
            if "kernels" in r:
                out += ["", f"### Top kernels: {r['label']} (ms per step)", "", "| kernel | ms | calls | share |",
                        "|---|---:|---:|---:|"]
                out += [f"| `{k['kernel'][:90]}` | {k['ms_per_step']:.3f} | {k['calls_per_step']:.0f} | "
                        f"{k['share']:.1%} |" for k in r["kernels"]]
    if "checks" in result:
        out += ["", "## Checks", "", "| check | status | error | tol |", "|---|---|---:|---:|"]
        out += [f"| {c['check']} | {c['status']} | {c['err']:.2e} | {c['tol']} |" for c in result["checks"]]
    if "shaped" in result:
        out += ["", "## Shaped attention fwd+bwd vs SDPA (ms)", "",
                "| causal | T | sdpa | shaped eager | × | shaped compiled | × | mix kernel | × |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["shaped"]:
            s, e, c = r.get("sdpa_ms"), r.get("shaped_eager_ms"), r.get("shaped_compiled_ms")
            k = r.get("shaped_kernel_ms")
            def f(v: float | None) -> str:
                return f"{v:.3f}" if v else "—"

            def ratio(v: float | None, s: float | None = s) -> str:
                return f"{v / s:.2f}" if v and s else "—"
            out.append(f"| {r['causal']} | {r['T']} | {f(s)} | {f(e)} | {ratio(e)} | {f(c)} | {ratio(c)} | {f(k)} | "
                       f"{ratio(k)} |")
        for r in result["shaped"]:
            gpu = {n: r[f"kernel_ms_{n}"] for n in ("sdpa", "shaped_eager", "shaped_compiled", "shaped_kernel")
                   if r.get(f"kernel_ms_{n}")}
            if gpu:
                out += ["", f"GPU kernel ms per call (T={r['T']}, profiled): "
                        + ", ".join(f"{n} {v:.3f} ({v / gpu.get('sdpa', v):.2f}× SDPA's)" for n, v in gpu.items())]
            for key in ("kernels_sdpa", "kernels_eager", "kernels_compiled", "kernels_kernel"):
                if key in r:
                    out += ["", f"### {key} (causal={r['causal']}, T={r['T']})", ""]
                    out += [f"- `{k['kernel'][:100]}` {k['ms_per_step']:.3f} ms × {k['calls_per_step']:.0f}"
                            for k in r[key]]
    if "noble_layer" in result:
        out += ["", "## One linear layer fwd+bwd, 16,384 tokens, bf16 (ms)", ""]
        for r in result["noble_layer"]:
            out.append(f"- {r['d_in']}→{r['d_out']} (branch FLOPs {r['branch_flop_share']:.1%}): "
                       + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in r.items() if k.endswith("_ms")))
            for key in (k for k in r if k.startswith("kernels_")):
                out += [f"  - {key[8:]}:"] + [f"    - `{k['kernel'][:100]}` {k['ms_per_step']:.3f} ms × "
                                              f"{k['calls_per_step']:.0f}" for k in r[key]]
        if "branch_mm_ms" in result:
            out += [""] + [f"- {k}: {v:.3f}" for k, v in result["branch_mm_ms"].items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys
    from datetime import datetime, timezone

    from leanformer.train.mfu import peak_flops_for

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--sections", default="check,shaped,steps")
    p.add_argument("--budget", type=float, default=320.0)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--plan", default="", help="comma-separated STEP_PLAN labels to run, in order (default: all)")
    p.add_argument("--two-segment-configs", default="",
                   help="two_segment_configs.json of benchmarks/noble_train_gpu.py: the tile shape per product shape")
    args = p.parse_args(argv)
    if args.two_segment_configs:
        from leanformer.ops import two_segment_matmul

        try:
            two_segment_matmul.CONFIGS.update(two_segment_matmul.load_configs(args.two_segment_configs))
        except (OSError, ValueError) as e:
            p.error(f"--two-segment-configs: {e}")
    PLAN[:] = [x.strip() for x in args.plan.split(",") if x.strip()]
    unknown = set(PLAN) - {run.label for run in STEP_PLAN}
    if unknown:
        p.error(f"--plan: unknown labels {sorted(unknown)}; known: {[run.label for run in STEP_PLAN]}")
    from leanformer.bench.machine import machine_string

    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64
    try:
        torch._logging.set_logs(graph_breaks=True, recompiles=True)
    except Exception:  # noqa: BLE001
        pass
    deadline = T0 + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"meta": {
        "device": machine_string(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "torch": torch.__version__,
        "command": shlex.join(["python3"] + sys.argv), "peak_flops": peak_flops_for(device)}}
    sections = args.sections.split(",")
    for name in sections:
        if time.monotonic() > deadline:
            log(f"section {name}: skipped (time budget)")
            continue
        log(f"section {name}")
        try:
            if name == "check":
                section_check(device, args.cpu_smoke, result)
            elif name == "shaped":
                section_shaped(device, args.cpu_smoke, result)
            elif name == "noble":
                section_noble(device, args.cpu_smoke, result)
            elif name == "steps":
                section_steps(device, args.cpu_smoke, result, deadline)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        torch._dynamo.reset()
        (out / "train_profile.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "train_profile.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
