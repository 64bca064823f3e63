"""``leanformer bench train``: training-step speed, MFU and peak memory of every arm at one size.

One step = ``zero_grad`` → forward (bf16 autocast on CUDA, float32 on CPU) → cross-entropy →
``backward`` → AdamW ``step`` (fused on CUDA, :func:`leanformer.train.optim.build_optimizer`; no
gradient clipping). Random tokens, fixed for all steps. ``warmup`` untimed steps (more under
``torch.compile``), then the median of ``repeats`` timed steps (:func:`leanformer.bench.timing.time_fn`).

* tokens/s = batch · seq_len / median step time.
* MFU = ``model.flops_per_token(seq_len)`` · tokens/s / peak FLOP/s (PaLM appendix B; the peak from
  :data:`leanformer.train.mfu.PEAK_BF16_FLOPS` or ``--peak-flops``). Each arm counts its own FLOPs
  (NOBLE's branches add, SAS's missing V/P projections subtract).
* Peak memory: see :class:`leanformer.bench.memory.MemoryMeter` (CUDA allocator peak over the timed
  steps; on CPU parameters + gradients + AdamW state + tensors saved for backward).

Arms (:mod:`leanformer.arms`, any of them but a converted one) differ from ``preln`` only in block wiring,
attention or linear layers (docs/methods.md). By default: ``parallel``, ``noble_plain`` / ``noble_fused``
(NOBLE on q, k, v, o, ffn_in, ffn_out with the config's default rank 32 and CosNet; two products or one
stacked product), ``sas``, ``sas_p``, ``sas_p_nonorm`` (shaped attention), ``dijiang`` (chunkwise form,
pure PyTorch) and ``dijiang_fla`` (fla's Triton kernel; CUDA + fla only).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from leanformer import arms as arm_registry
from leanformer.arms import ARMS, BASELINE, arm_config
from leanformer.bench.machine import run_metadata
from leanformer.bench.memory import MemoryMeter, failure_status, optimizer_state_tensors, release
from leanformer.bench.report import Column, Report, fmt_float, fmt_mib, fmt_pct, fmt_si, partial_rows, series
from leanformer.bench.timing import time_fn
from leanformer.config import ConfigError, TrainConfig, TransformerConfig
from leanformer.device import resolve_device

# ---------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Size:
    """A model size preset and its default sequence length and batch."""

    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int
    seq_len: int
    batch: int


SIZES: dict[str, Size] = {
    "tiny": Size(d_model=32, n_layers=2, n_heads=2, vocab_size=256, seq_len=32, batch=2),  # tests
    "cpu": Size(d_model=256, n_layers=4, n_heads=4, vocab_size=8192, seq_len=256, batch=8),
    "gpt2": Size(d_model=768, n_layers=12, n_heads=12, vocab_size=50304, seq_len=1024, batch=16),  # ~124M
    # the simplified-blocks paper's crammed-BERT shape (He & Hofmann 2024, Sec. 5; causal here)
    "bert": Size(d_model=768, n_layers=16, n_heads=12, vocab_size=32768, seq_len=128, batch=128),
}


def get_size(name: str) -> Size:
    if name not in SIZES:
        raise ConfigError(f"--size {name!r} is not valid; choose one of {', '.join(SIZES)}")
    return SIZES[name]


def base_config(size: Size, max_seq_len: int, pos: str = "rope") -> TransformerConfig:
    """The ``preln`` baseline at ``size``: GPT-2 shape, LayerNorm, GELU, no biases, tied head, positions ``pos``
    (RoPE by default; "learned": GPT-2's own, the model of llm.c's figures; "none")."""
    return TransformerConfig(vocab_size=size.vocab_size, d_model=size.d_model, n_layers=size.n_layers,
                             n_heads=size.n_heads, max_seq_len=max_seq_len, pos=pos)


# ---------------------------------------------------------------------------------------------- arms

DEFAULT_ARMS = ("preln", "parallel", "noble_plain", "noble_fused", "sas", "sas_p", "sas_p_nonorm", "dijiang",
                "dijiang_fla")


def parse_arms(spec: str | list[str] | None, default: tuple[str, ...] = DEFAULT_ARMS) -> list[str]:
    """``"a,b"`` → arm names of :data:`leanformer.arms.ARMS`, baseline first (every ratio needs it); an
    unknown name, or an arm converted from a trained one (only ``leanformer compare`` makes those), is a
    ConfigError."""
    names = arm_registry.parse_arms(spec, default)
    converted = [n for n in names if ARMS[n].parent is not None]
    if converted:
        n = converted[0]
        raise ConfigError(f"arm {n} is converted from a trained {ARMS[n].parent} model, which only "
                          f"leanformer compare trains; bench times models from their initialisation")
    return names


def unavailable_reason(cfg: TransformerConfig, device: torch.device) -> str | None:
    """A result row's status when a model of ``cfg`` cannot run here (a module missing, fla absent, no CUDA)."""
    reason = arm_registry.unavailable_reason(cfg, device)
    return None if reason is None else f"unavailable: {reason}"


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as the trainer), nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------- one arm


@dataclass
class TrainingStep:
    """One model's training step on a fixed batch: ``step()`` zeroes the gradients, runs ``run(x, y)`` under bf16
    autocast on CUDA, backpropagates and steps the optimizer; it returns the loss (detached). ``return_logits``:
    the model also returns its logits (as every step did before 2026-12-07; for timing the difference)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    run: torch.nn.Module  # the model, or torch.compile of it
    x: torch.Tensor       # (B, T) token ids
    y: torch.Tensor       # (B, T) targets
    return_logits: bool = False

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.x.device):
            _, loss = self.run(self.x, self.y, return_logits=self.return_logits)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def training_step(cfg: TransformerConfig, device: torch.device, batch: int, seq_len: int, *, compile: bool,
                  seed: int = 0, compile_mode: str | None = None) -> TrainingStep:
    """``TransformerLM(cfg)`` seeded and initialised on ``device``, its AdamW (fused on CUDA), ``torch.compile``
    of it (``compile_mode``) when ``compile``, and a fixed random batch (``batch``, ``seq_len``)."""
    from leanformer.model import TransformerLM
    from leanformer.train.optim import build_optimizer

    torch.manual_seed(seed)
    with torch.device(device):  # initialised on the device: seconds faster at GPT-2 size
        model = TransformerLM(cfg)
    opt = build_optimizer(model, TrainConfig(lr=1e-4))
    run = torch.compile(model, mode=compile_mode) if compile else model
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g).to(device)
    return TrainingStep(model, opt, run, x, y)


def measure_arm(cfg: TransformerConfig, device: torch.device, batch: int, seq_len: int, *, compile: bool,
                warmup: int, repeats: int, max_seconds: float | None, seed: int = 0,
                compile_mode: str | None = None) -> dict:
    """Time ``repeats`` training steps of ``TransformerLM(cfg)``; returns one result row (no ratios)."""
    train = training_step(cfg, device, batch, seq_len, compile=compile, seed=seed, compile_mode=compile_mode)
    model, opt, run, x, y = train.model, train.optimizer, train.run, train.x, train.y
    flops_per_token = model.flops_per_token(seq_len)
    params = model.num_params()
    last_loss: list[float] = []

    def step() -> None:
        last_loss[:] = [train()]

    t0 = time.perf_counter()
    step()  # first step: compilation (when asked), lazy optimizer state, cuBLAS handles
    first_s = time.perf_counter() - t0
    with MemoryMeter(device) as mem:
        timing = time_fn(step, device, warmup=max(0, warmup - 1), repeats=repeats, max_seconds=max_seconds)
    if device.type != "cuda":  # account: params + grads + AdamW state + what one forward saves for backward
        mem = MemoryMeter(device, saved_tensors=True)
        mem.account(list(model.parameters()) + [p.grad for p in model.parameters()]
                    + optimizer_state_tensors(opt))
        try:
            with mem, autocast(device):
                _, loss = run(x, y, return_logits=False)  # as the timed step runs it
            del loss
        except Exception:  # noqa: BLE001 - hooks under torch.compile: fall back to the static part
            mem.peak_bytes = mem.base_bytes = sum(mem._accounted.values())
    tokens_per_s = batch * seq_len / (timing.median_ms / 1e3)
    loss_value = float(last_loss[0]) if last_loss else None
    return {
        "params": params,
        "flops_per_token": flops_per_token,
        "step_ms": timing.median_ms, "step_q1_ms": timing.q1_ms, "step_q3_ms": timing.q3_ms,
        "step_iqr_ms": timing.iqr_ms,
        "repeats": timing.repeats,
        "first_step_s": first_s,
        "tokens_per_s": tokens_per_s,
        "achieved_flops": flops_per_token * tokens_per_s,
        "peak_mem_bytes": mem.peak_bytes,
        "memory_kind": mem.kind,
        "loss": loss_value,
    }


def compiled_vs_eager_losses(arm: str, size: str, device: torch.device, steps: int = 20,
                             seed: int = 0) -> tuple[list[float], list[float]]:
    """Training losses of ``steps`` AdamW steps of arm ``arm`` at ``size``, eager and under ``torch.compile``,
    from the same initial weights and the same random batches (bf16 autocast on CUDA). The two lists agree
    within bf16 rounding when compilation changes nothing but speed."""
    from leanformer.model import TransformerLM
    from leanformer.train.optim import build_optimizer

    sz = get_size(size)
    cfg = arm_config(base_config(sz, sz.seq_len), arm)
    runs = []
    for comp in (False, True):
        torch.manual_seed(seed)
        with torch.device(device):
            model = TransformerLM(cfg)
        opt = build_optimizer(model, TrainConfig(lr=3e-4))
        run = torch.compile(model) if comp else model
        gen = torch.Generator().manual_seed(seed + 1)
        losses = []
        for _ in range(steps):
            xb = torch.randint(0, cfg.vocab_size, (sz.batch, sz.seq_len + 1), generator=gen).to(device)
            opt.zero_grad(set_to_none=True)
            with autocast(device):
                _, loss = run(xb[:, :-1], xb[:, 1:], return_logits=False)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        runs.append(losses)
        if comp:
            torch._dynamo.reset()
    return runs[0], runs[1]


# ---------------------------------------------------------------------------------------------- the benchmark


def run_train_bench(*, size: str = "cpu", arms: str | list[str] | None = None, seq_len: int | None = None,
                    batch: int | None = None, compile: bool | None = None, eager: bool | None = None,
                    compile_arms: str | list[str] | None = None,
                    device: torch.device | None = None, warmup: int = 3, repeats: int = 10,
                    peak_flops: float | None = None, time_budget: float | None = None,
                    max_seconds_per_arm: float | None = None, compile_reserve_s: float = 45.0,
                    compile_mode: str | None = None, pos: str = "rope",
                    command: str = "leanformer bench train") -> Report:
    """Run every arm (eager, then compiled when ``compile``) and return the :class:`Report`.

    ``time_budget`` (seconds): an arm not started when it is spent is "skipped (time budget)"; a compiled
    arm also needs ``compile_reserve_s`` left (its compilation alone takes that long at GPT-2 scale).
    ``compile=None`` (auto): compiled arms on CUDA, none on CPU; ``eager=None``: eager arms unless
    ``compile`` was chosen automatically (so on CUDA only the compiled arms run by default). ``pos``: every
    arm's positions (:func:`base_config`).
    """
    from leanformer.train.loop import enable_fast_matmul
    from leanformer.train.mfu import peak_flops_for

    sz = get_size(size)
    names = parse_arms(arms)
    seq_len = seq_len or sz.seq_len
    batch = batch or sz.batch
    if seq_len < 1 or batch < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(f"--seq-len={seq_len}, --batch={batch}, --repeats={repeats} must be >= 1 "
                          f"and --warmup={warmup} >= 0")
    device = device or resolve_device()
    if eager is None:
        eager = compile is not None or device.type != "cuda"
    if compile is None:
        compile = device.type == "cuda"
    compiled = (parse_arms(compile_arms) if compile_arms else names) if compile else []
    enable_fast_matmul(device)
    peak = peak_flops if peak_flops is not None else peak_flops_for(device)
    base = base_config(sz, max_seq_len=seq_len, pos=pos)
    base.validate()  # a bad --pos is named here, before any arm runs
    meta = run_metadata(device, command)
    deadline = time.monotonic() + time_budget if time_budget else None
    report_name = "train" if size != "bert" else "train_bert"  # its files
    rows = partial_rows(report_name)
    plan = [(n, False) for n in names if eager] + [(n, True) for n in compiled]
    for name, comp in plan:
        row = {"arm": name, "compile": comp, "description": ARMS[name].description}
        cfg = arm_config(base, name)
        reason = unavailable_reason(cfg, device)
        if reason is not None:
            row["status"] = reason
        elif deadline is not None and time.monotonic() > deadline - (compile_reserve_s if comp else 0.0):
            row["status"] = "skipped (time budget)"
        else:
            try:
                row.update(measure_arm(cfg, device, batch, seq_len, compile=comp, compile_mode=compile_mode,
                                       warmup=warmup + (2 if comp else 0), repeats=repeats,
                                       max_seconds=max_seconds_per_arm))
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one failing arm must not stop the others
                row["status"] = failure_status(e)
            if comp:
                torch._dynamo.reset()  # drop the compiled graphs (and the model they hold)
            release(device)
        rows.append(row)
        ok = row["status"] == "ok"
        done = f", {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tok/s" if ok else ""
        print(f"[bench train] {name}{' (compiled)' if comp else ''}: {row['status']}{done}", flush=True)
    add_ratios(rows, peak)
    report = Report(
        name=report_name,
        title=f"Training step: size {size}, seq {seq_len}, batch {batch}",
        meta=meta, rows=rows, columns=TRAIN_COLUMNS, plot=plot_train,
        settings={"size": size, "model": vars(sz), "seq_len": seq_len, "batch": batch, "warmup": warmup,
                  "repeats": repeats, "compile": compile, "compile_mode": compile_mode, "pos": pos, "peak_flops": peak,
                  "dtype": "bf16 autocast" if device.type == "cuda" else "float32"},
        notes=[
            "one step = zero_grad + forward + cross-entropy + backward + AdamW step; median of the timed "
            "steps and their inter-quartile range, warm-up excluded",
            f"MFU against a peak of {fmt_si(peak)}FLOP/s" if peak else "MFU: no peak FLOP/s known for this "
            "device (give --peak-flops)",
            "× preln: tokens/s ratio to preln with the same compile setting (>1 is faster); step overhead = "
            "step time / preln's − 1",
            "FLOPs × preln: model.flops_per_token ratio to preln (6N + attention); FLOP-limit × preln = its "
            "inverse, the speed ratio if every FLOP cost the same; realised = × preln ÷ FLOP-limit × preln",
            "memory: " + ("CUDA allocator peak over the timed steps" if device.type == "cuda" else
                          "accounted bytes: parameters + gradients + AdamW state + tensors saved for "
                          "backward (a lower bound: no temporaries)"),
        ],
    )
    report.finish()
    return report


def add_ratios(rows: list[dict], peak: float | None) -> None:
    """MFU, and the ratios to the baseline with the same compile setting."""
    base = {r["compile"]: r for r in rows if r["arm"] == BASELINE and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        r["mfu"] = r["achieved_flops"] / peak if peak else None
        b = base.get(r["compile"])
        if b is not None:
            r["speed_vs_preln"] = r["tokens_per_s"] / b["tokens_per_s"]
            r["step_overhead"] = r["step_ms"] / b["step_ms"] - 1
            r["mem_vs_preln"] = r["peak_mem_bytes"] / b["peak_mem_bytes"]
            r["flops_vs_preln"] = r["flops_per_token"] / b["flops_per_token"]
            r["flop_limit_speed"] = 1.0 / r["flops_vs_preln"]
            r["realised"] = r["speed_vs_preln"] / r["flop_limit_speed"]


def _status(v: str) -> str:
    return "" if v == "ok" else v


TRAIN_COLUMNS = [
    Column("arm", "arm"),
    Column("compile", "compile", lambda v: "yes" if v else "no"),
    Column("params", "params (M)", lambda v: f"{v / 1e6:.2f}"),
    Column("step_ms", "step ms", fmt_float(1)),
    Column("step_iqr_ms", "IQR ms", fmt_float(1)),
    Column("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}"),
    Column("flops_vs_preln", "FLOPs × preln", fmt_float(3)),
    Column("flop_limit_speed", "FLOP-limit × preln", fmt_float(3)),
    Column("speed_vs_preln", "× preln", fmt_float(3)),
    Column("realised", "realised", fmt_pct),
    Column("step_overhead", "step overhead", fmt_pct),
    Column("achieved_flops", "TFLOP/s", lambda v: f"{v / 1e12:.3f}"),
    Column("mfu", "MFU", fmt_pct),
    Column("peak_mem_bytes", "peak mem (MiB)", fmt_mib),
    Column("mem_vs_preln", "mem × preln", fmt_float(2)),
    Column("status", "status", _status),
]


def plot_train(fig, rows: list[dict]) -> None:
    """Two panels: tokens/s per arm (eager and compiled bars) and peak memory per arm."""
    names = list(dict.fromkeys(r["arm"] for r in rows))
    xs = range(len(names))
    for panel, (key, label, scale) in enumerate((("tokens_per_s", "tokens/s", 1.0),
                                                 ("peak_mem_bytes", "peak memory (MiB)", 2.0 ** -20))):
        ax = fig.add_subplot(1, 2, panel + 1)
        modes = sorted({r["compile"] for r in rows})
        width = 0.8 / max(1, len(modes))
        for i, comp in enumerate(modes):
            vals = []
            for n in names:
                _, ys = series(rows, {"arm": n, "compile": comp}, "arm", key)
                vals.append(ys[0] * scale if ys else 0.0)
            ax.bar([x + i * width for x in xs], vals, width, label="compiled" if comp else "eager")
        centres = [x + width * (len(modes) - 1) / 2 for x in xs]
        ax.set_xticks(centres, names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
