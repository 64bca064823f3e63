"""The comparison report: ``report.md`` (one table), PNG plots, samples, configs and ``metrics.jsonl``.

Loss-to-reach: the first point where an arm's validation curve crosses the baseline's final validation
loss (same seed), interpolated linearly between evaluation points in steps and in training seconds
(evaluation time excluded); "not reached" when it never does. Ratios are arm ÷ baseline. With several
seeds every number is the mean ± the sample standard deviation (n − 1) over the seeds.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from pathlib import Path
from typing import Any

from leanformer.arms import ARMS, BASELINE
from leanformer.compare.claims import claims_section
from leanformer.compare.presets import RECIPE
from leanformer.compare.runs import Plan
from leanformer.train.metrics import read_steps

PLOTS = {
    "val_loss_vs_steps": "val_loss_vs_steps.png",
    "val_loss_vs_wallclock": "val_loss_vs_wallclock.png",
    "tokens_per_s": "tokens_per_s.png",
    "decode_latency": "decode_latency.png",
}


# ---------------------------------------------------------------------------- numbers
def reach(evals: list[dict[str, Any]], target: float) -> tuple[float, float] | None:
    """(step, train_seconds) where the validation loss first reaches ``target``, linearly interpolated
    between evaluation points; None if it never does.

    ``evals``: records with ``step``, ``train_seconds`` and ``val_loss``, in step order."""
    prev = None
    for rec in evals:
        v = rec["val_loss"]
        if v <= target:
            if prev is None or prev["val_loss"] == v:
                return float(rec["step"]), float(rec["train_seconds"])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - v)
            step = prev["step"] + frac * (rec["step"] - prev["step"])
            secs = prev["train_seconds"] + frac * (rec["train_seconds"] - prev["train_seconds"])
            return step, secs
        prev = rec
    return None


THROUGHPUT_SKIP = 0.1  # the share of the logged steps left out of the training tokens/s (warm-up)


def throughput(records: list[dict[str, Any]], skip_frac: float = THROUGHPUT_SKIP) -> float | None:
    """Training tokens/s over the logged steps after the first ``skip_frac`` of them (warm-up excluded)."""
    recs = [r for r in records if "train_seconds" in r and r.get("step", 0) > 0]
    if not recs:
        return None
    first = recs[min(len(recs) - 1, int(skip_frac * len(recs)))]
    last = recs[-1]
    if last["train_seconds"] > first["train_seconds"]:
        return (last["tokens"] - first["tokens"]) / (last["train_seconds"] - first["train_seconds"])
    return last["tokens"] / last["train_seconds"] if last["train_seconds"] > 0 else None


def analyse_run(record: dict[str, Any], metrics: list[dict[str, Any]], target: float | None,
                base: dict[str, Any] | None, longest: str) -> dict[str, Any]:
    """The numbers of one run's table row (ratios against ``base``, the same seed's baseline row)."""
    evals = [r for r in metrics if "val_loss" in r]
    row: dict[str, Any] = {
        "params": record["params"], "tokens": record["tokens"], "final_val_loss": record["final_val_loss"],
        "ppl": math.exp(min(record["final_val_loss"], 50)) if record["final_val_loss"] is not None else None,
        "mlm_acc": record.get("final_val_mlm_acc"),  # encoders: their loss is an MLM loss, no perplexity
        "tok_per_s": throughput(metrics), "peak_memory_bytes": record["peak_memory_bytes"],
        "decode_ms": record["decode"][longest]["ms_per_token"] if longest in record["decode"] else None,
        "decode_mem": _decode_mem(record["decode"].get(longest, {})),
    }
    hit = reach(evals, target) if target is not None else None
    row["reach_step"], row["reach_seconds"] = hit if hit else (None, None)
    for key, ratio in (("reach_step", "reach_step_ratio"), ("reach_seconds", "reach_seconds_ratio"),
                       ("tok_per_s", "tok_per_s_ratio"), ("decode_ms", "decode_ratio")):
        row[ratio] = row[key] / base[key] if base and row[key] is not None and base.get(key) else None
    return row


def _decode_mem(rec: dict[str, Any]) -> float | None:
    return rec.get("peak_bytes", rec.get("cache_bytes"))


def aggregate(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None, how many values were not None)."""
    got = [v for v in values if v is not None]
    if not got:
        return None, None, 0
    return statistics.fmean(got), statistics.stdev(got) if len(got) > 1 else None, len(got)


# ---------------------------------------------------------------------------- formatting
def _cell(values: list[float | None], spec: str, missing: str = "–", scale: float = 1.0) -> str:
    mean, std, n = aggregate(values)
    if mean is None:
        return missing
    text = format(mean / scale, spec) + (f" ± {format(std / scale, spec)}" if std is not None else "")
    if n < len(values):
        text += f" ({n}/{len(values)} seeds; {missing} in the others)"
    return text


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def _mib(values: list[float | None]) -> str:
    return _cell(values, ".1f", scale=2**20) + (" MiB" if any(v is not None for v in values) else "")


def machines_line(results: dict[tuple[str, int], dict[str, Any]]) -> str:
    """The machine the arms ran on (each run's record names its own), or one per arm when they differ
    (a comparison assembled from parts); records without one (older parts) get this machine's."""
    import torch

    from leanformer.bench.machine import machine_string

    cuda = any(str(r.get("device", "")).startswith("cuda") for r in results.values())
    here = machine_string(torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu"))
    named = {key: r.get("machine") or here for key, r in results.items()}
    kinds = sorted(set(named.values()))
    if len(kinds) == 1:
        return f"Machine: {kinds[0]}"
    per_arm = {arm: m for (arm, _), m in named.items()}
    return "Machines (per arm): " + "; ".join(f"{arm}: {m}" for arm, m in per_arm.items())


def data_line(plan, results: dict[tuple[str, int], dict[str, Any]]) -> str:
    """The corpus the arms trained on, with its size and tokenizer when the records have them."""
    d = next((r["data"] for r in results.values() if r.get("data")), None)
    if d is None:
        return f"Data: {plan.base.data.path or 'built-in corpus (Python standard library)'}"
    text = f"Data: {d['source']}"
    if "characters" in d:
        text += (f"; {_si(d['characters'])} characters in {d['train_docs']:,} train + "
                 f"{d['val_docs']:,} validation documents")
    text += f"; {_si(d['train_tokens'])} train + {_si(d['val_tokens'])} validation tokens"
    tok = d.get("tokenizer")
    text += (f"; tokenizer: byte-level BPE trained on the train split, vocabulary {d['vocab_size']:,}"
             if tok in (None, "trained") else f"; tokenizer: {tok} (vocabulary {d['vocab_size']:,})")
    tokens = max(r["tokens"] for r in results.values())
    text += f"; the longest arm trains on {tokens / d['train_tokens']:.2f}× the train split"
    return text


# ---------------------------------------------------------------------------- the report
def write_report(plan: Plan, results: dict[tuple[str, int], dict[str, Any]], elapsed: float | None,
                 unfinished: dict[str, str] | None = None) -> Path:
    """Write ``report.md``, the plots and the combined ``metrics.jsonl`` into ``plan.out``; ``unfinished``
    (arm → what happened) lists arms a part started but did not finish (they get no row)."""
    import torch

    out = plan.out
    longest = str(max(plan.preset.decode_contexts))
    metrics = {(r.arm, r.seed): read_steps(r.dir / "metrics.jsonl") for r in plan.runs}
    seeds = sorted({r.seed for r in plan.runs})
    rows: dict[str, list[dict[str, Any]]] = {a: [] for a in plan.arms}
    base_rows: dict[int, dict[str, Any]] = {}
    for seed in seeds:  # the baseline first: its row is every ratio's denominator
        rec = results[(BASELINE, seed)]
        base_rows[seed] = analyse_run(rec, metrics[(BASELINE, seed)], rec["final_val_loss"], None, longest)
    for run in plan.runs:
        rec = results[(run.arm, run.seed)]
        target = results[(BASELINE, run.seed)]["final_val_loss"]
        row = analyse_run(rec, metrics[(run.arm, run.seed)], target, base_rows[run.seed], longest)
        row["record"] = rec
        rows[run.arm].append(row)

    _write_metrics(out, plan, metrics)
    plot_paths = write_plots(out, plan, results, metrics)
    first = {r.arm: r for r in plan.runs if r.seed_index == 0}
    mem_kind = results[(BASELINE, seeds[0])]["peak_memory_kind"]
    cuda = str(results[(BASELINE, seeds[0])].get("device", "")).startswith("cuda")
    spread = "" if len(seeds) == 1 else f" Each cell: mean ± sample std (n − 1) over {len(seeds)} seeds."
    loads = [r["load_average"] for r in results.values() if r.get("load_average") is not None]
    load = f"; load average (1 min) at the arms' start {min(loads):.1f}–{max(loads):.1f}" if loads else ""
    lines = [
        f"# leanformer compare: preset `{plan.preset.name}`",
        "",
        f"- {machines_line(results)}; torch {_versions(results) or torch.__version__}; "
        f"date {_dates(results) or datetime.date.today().isoformat()}{load}",
        f"- Command: `{plan.command}`",
        (f"- Wall-clock of this invocation: {elapsed:.0f} s (sum of the arms' training+eval wall-clock: "
         f"{sum(r.get('wall_seconds', 0) for r in results.values()):.0f} s)" if elapsed is not None else
         f"- Assembled from parts trained separately: "
         f"{', '.join(sorted({r['part'] for r in results.values() if 'part' in r}))} (sum of the arms' "
         f"training+eval wall-clock: {sum(r.get('wall_seconds', 0) for r in results.values()):.0f} s)"),
        f"- {data_line(plan, results)}",
        f"- Model d_model={plan.base.model.d_model}, n_layers={plan.base.model.n_layers}, "
        f"n_heads={plan.base.model.n_heads}; seq_len={plan.base.train.seq_len}, "
        f"batch={plan.base.train.batch_size}, steps={plan.base.train.steps}; "
        f"seeds {', '.join(map(str, seeds))}",
        "",
        _table(plan, rows, longest, mem_kind, cuda),
        "",
        *_decode_table(plan, rows),
        *([spread.strip(), ""] if spread else []),
        *_notes(plan, longest, mem_kind, cuda),
        *[f"- Not finished: `{arm}`: {what}" for arm, what in (unfinished or {}).items()],
        "",
        *claims_section(rows, BASELINE, unfinished),
        "## Plots",
        "",
        *[f"![{name}]({path.name})" for name, path in plot_paths.items()],
        "",
        "## Greedy samples",
        "",
        f"Prompt `{plan.preset.sample_prompt!r}`, {plan.preset.sample_tokens} greedy tokens, seed "
        f"{seeds[0]}.",
        "",
    ]
    for arm in plan.arms:
        sample = results[(arm, first[arm].seed)].get("sample")
        shown = sample if sample is not None else "(none: no tokenizer, or an encoder)"
        lines += [f"**{arm}**", "", "```", shown, "```", ""]
    lines += ["## Configs", "", f"The exact config of each arm (seed {seeds[0]}; other seeds differ only in "
              "`train.seed`), also in `arms/<arm>/config.yaml`.", ""]
    for arm in plan.arms:
        cfg_file = first[arm].dir / "config.yaml"
        text = cfg_file.read_text() if cfg_file.exists() else "(missing)"
        lines += [f"<details><summary>{arm}</summary>", "", "```yaml", text.rstrip(), "```", "",
                  "</details>", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _table(plan, rows: dict[str, list[dict[str, Any]]], longest: str, mem_kind: str, cuda: bool) -> str:
    dec_mem = "decode peak mem (CUDA)" if cuda else "decode cache"
    encoder = not plan.base.model.causal
    header = ["arm", "params", "tokens", "final val MLM loss" if encoder else "final val loss",
              "MLM accuracy" if encoder else "ppl", "steps to baseline loss", "steps × base",
              "seconds to baseline loss", "seconds × base", "train tok/s", "tok/s × base",
              f"decode ms/tok @{longest}", "decode × base", f"train {mem_kind}", f"{dec_mem} @{longest}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in plan.arms:
        rs = rows[arm]
        rec = rs[0]["record"]

        def get(key: str, rs: list = rs) -> list:
            return [r[key] for r in rs]

        tokens = _si(rec["tokens"])
        name = arm
        if ARMS[arm].parent is not None:
            tokens += f" (+{_si(rec.get('parent_tokens', 0))} {ARMS[arm].parent})"
            name += " ¹"
        nr = "not reached"
        cells = [
            name, _si(rec["params"]), tokens, _cell(get("final_val_loss"), ".4f"),
            _cell(get("mlm_acc"), ".3f") if encoder else _cell(get("ppl"), ".2f"),
            _cell(get("reach_step"), ".0f", nr), _cell(get("reach_step_ratio"), ".2f"),
            _cell(get("reach_seconds"), ".1f", nr), _cell(get("reach_seconds_ratio"), ".2f"),
            _cell(get("tok_per_s"), ".0f"), _cell(get("tok_per_s_ratio"), ".2f"),
            _cell(get("decode_ms"), ".2f"), _cell(get("decode_ratio"), ".2f"),
            _mib(get("peak_memory_bytes")), _mib(get("decode_mem")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _decode_table(plan, rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Decoding at every context of the preset (first seed): ms per token and the decoding state's bytes
    (KV cache, or DiJiang's recurrent state). [] when no arm decoded (encoders)."""
    contexts = [str(c) for c in plan.preset.decode_contexts]
    decoded = [a for a in plan.arms if rows[a][0]["record"].get("decode")]
    if not decoded or len(contexts) < 2:
        return []
    header = ["arm"] + [f"ms/tok @{c}" for c in contexts] + [f"state @{c}" for c in contexts]
    lines = ["Decoding at each context (batch 1, first seed): step latency and decoding state.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in decoded:
        dec = rows[arm][0]["record"]["decode"]
        ms = [f"{dec[c]['ms_per_token']:.2f}" if c in dec else "–" for c in contexts]
        state = [_mib([dec[c]["cache_bytes"]]) if c in dec and "cache_bytes" in dec[c] else "–" for c in contexts]
        lines.append("| " + " | ".join([arm, *ms, *state]) + " |")
    return [*lines, ""]


_POSITIONS = {"rope": "RoPE", "learned": "learned positions", "none": "no position encoding"}
_ACTIVATIONS = {"cosnet": "CosNet", "silu": "SiLU", "gelu": "GELU", "tanh": "tanh"}


def _run_config(plan: Plan, arm: str):
    """The config of ``arm``'s first run (other seeds differ only in ``train.seed``)."""
    return next(r.cfg for r in plan.runs if r.arm == arm)


def _recipe(t) -> str:
    """The optimizer recipe of the from-scratch arms, as configured; named after its source when it is the
    preset's unchanged (the simplified-blocks paper's)."""
    text = (f"AdamW lr {t.lr:g}, betas {tuple(t.betas)}, weight decay {t.weight_decay} (matrices only), clip "
            f"{t.grad_clip}, {t.warmup_frac:.0%} warm-up then {t.schedule} decay to {t.min_lr_ratio:g}× lr")
    paper = all((list(getattr(t, k)) if k == "betas" else getattr(t, k)) == v for k, v in RECIPE.items())
    return f"the simplified-blocks paper's, {text}" if paper else text


def _family(m) -> str:
    """The baseline model's family: norm, MLP, positions, biases."""
    attn, mlp = m.linear_bias("q"), m.linear_bias("ffn_in")
    biases = {(False, False): "no biases", (True, True): "biases"}.get(
        (attn, mlp), "attention biases only" if attn else "MLP biases only")
    return f"{m.norm}, {m.ffn_act} MLP, {_POSITIONS.get(m.pos, m.pos)}, {biases}"


def _noble(plan: Plan) -> tuple[str, bool]:
    """The NOBLE settings of the arms that use it, grouped (``""`` when none does), and whether any of
    them has the per-parameter learning-rate multipliers."""
    groups: dict[str, list[str]] = {}
    mults = False
    for arm in plan.arms:
        n = _run_config(plan, arm).model.noble
        if not n.enabled:
            continue
        what = (f"rank ratio {n.rank_ratio:g}" if n.rank_ratio else f"rank {n.rank}") + \
            f", {_ACTIVATIONS.get(n.activation, n.activation)}" + \
            (", W keeps the LM's init" if n.main_init == "model" else "")
        groups.setdefault(what, []).append(f"`{arm}`")
        mults = mults or n.lr_mults
    return "; ".join(f"NOBLE {what} ({', '.join(arms)})" for what, arms in groups.items()), mults


def _converted(plan: Plan, arm: str) -> str:
    """How converted arm ``arm`` was made, from its fine-tune config."""
    cfg, base = _run_config(plan, arm), plan.base.train
    t = cfg.train
    loss = "LM loss" if not t.distill_weight else f"LM loss + {t.distill_weight:g} × KL to the parent's logits"
    return (f"- ¹ `{arm}`: the finished `{ARMS[arm].parent}` model converted with "
            f"`convert_to_dijiang(feature_map={cfg.model.dijiang.feature_map!r})`, then fine-tuned on "
            f"{t.steps / base.steps:.0%} of its tokens (AdamW lr {t.lr / base.lr:g}× the baseline's, betas "
            f"{tuple(t.betas)}, weight decay {t.weight_decay:g}, {t.schedule} with {t.warmup_frac:.0%} warm-up, "
            f"{loss}). Its steps, seconds and tokens are the fine-tune's alone (the parent's are in brackets); "
            "in the plots its curve starts where the parent's ends.")


def _versions(results: dict) -> str:
    """The torch versions the runs' records name (a comparison assembled from parts may have several)."""
    return ", ".join(sorted({str(r["torch"]) for r in results.values() if r.get("torch")}))


def _dates(results: dict) -> str:
    """The days the runs finished on (their records), e.g. ``2026-12-04`` or ``2026-12-04 to 2026-12-05``."""
    days = sorted({str(r["finished"])[:10] for r in results.values() if r.get("finished")})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}" if days else ""


def _notes(plan: Plan, longest: str, mem_kind: str, cuda: bool) -> list[str]:
    p, t = plan.preset, plan.base.train
    noble, mults = _noble(plan)
    notes = [
        "Notes:",
        f"- Target: the baseline (`{BASELINE}`) final validation loss with the same seed; steps and seconds "
        "to reach it are interpolated linearly between evaluation points (every "
        f"{t.eval_every} steps, {t.eval_batches} fixed validation batches); seconds are training time "
        "without evaluation. Ratios are arm ÷ baseline: below 1 is better for steps, seconds and decoding "
        "latency, above 1 is better for tokens/s.",
        f"- One optimizer recipe for every arm trained from scratch (fairest: no arm gets a recipe tuned for "
        f"it): {_recipe(t)}." + (" NOBLE's per-parameter lr multipliers apply on top." if mults else "")
        + f" Model family: {_family(plan.base.model)}" + (f"; {noble}." if noble else "."),
        f"- Training tok/s: tokens over training seconds for the logged steps after the first "
        f"{THROUGHPUT_SKIP:.0%}.",
        f"- Decoding: batch 1, greedy, with the cache, after a prompt of {longest} random tokens; median of "
        f"{p.decode_tokens} steps after {p.decode_warmup} warm-up steps. "
        + ("Decode memory: CUDA max_memory_allocated during those steps." if cuda else
           "Decode memory: the bytes held by the decoding cache (KV cache, or DiJiang's recurrent state)."),
        f"- Training memory: {mem_kind} during the arm's training"
        + ("." if cuda else "; it includes the process's own memory (Python, torch, the memory-mapped data "
           "and what earlier arms left allocated), so compare the differences between arms."),
    ]
    notes += [_converted(plan, a) for a in plan.arms if ARMS[a].parent is not None]
    return notes


def _write_metrics(out: Path, plan, metrics: dict) -> None:
    with open(out / "metrics.jsonl", "w") as f:
        for run in plan.runs:
            for rec in metrics[(run.arm, run.seed)]:
                f.write(json.dumps({"arm": run.arm, "seed": run.seed, **rec}) + "\n")


# ---------------------------------------------------------------------------- plots
def _curves(plan, metrics: dict, results: dict, arm: str, x: str) -> tuple[list[float], list[float],
                                                                             list[float], list[float]]:
    """Mean, min and max validation loss across seeds at the evaluation points of ``arm``; ``x`` is
    ``step`` or ``train_seconds``. A converted arm's x starts where its parent's training ended."""
    runs = [r for r in plan.runs if r.arm == arm]
    series = []
    for r in runs:
        offset = 0.0
        rec = results[(arm, r.seed)]
        if ARMS[arm].parent is not None:
            offset = rec.get("parent_steps", 0) if x == "step" else rec.get("parent_train_seconds", 0.0)
        series.append([(e[x] + offset, e["val_loss"]) for e in metrics[(arm, r.seed)] if "val_loss" in e])
    n = min(len(s) for s in series)
    xs = [statistics.fmean(s[i][0] for s in series) for i in range(n)]
    ys = [[s[i][1] for s in series] for i in range(n)]
    return xs, [statistics.fmean(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def write_plots(out: Path, plan, results: dict, metrics: dict) -> dict[str, Path]:
    """The four PNGs; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {k: out / v for k, v in PLOTS.items()}
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(plan.arms)}
    target = statistics.fmean(results[(BASELINE, s)]["final_val_loss"] for s in {r.seed for r in plan.runs})
    axes = (("val_loss_vs_steps", "step", "step"),
            ("val_loss_vs_wallclock", "train_seconds", "training seconds (evaluation excluded)"))
    for key, x, xlabel in axes:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lows = []
        for arm in plan.arms:
            xs, mean, lo, hi = _curves(plan, metrics, results, arm, x)
            style = "--" if ARMS[arm].parent is not None else "-"
            ax.plot(xs, mean, style, color=colors[arm], label=arm, marker=".", markersize=3)
            if lo != hi:
                ax.fill_between(xs, lo, hi, color=colors[arm], alpha=0.15)
            lows += mean[1:] or mean
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="baseline final")
        if lows:
            top = sorted(lows)[int(0.9 * (len(lows) - 1))]
            ax.set_ylim(min(lows) - 0.05 * (top - min(lows) + 1e-3), top + 0.1 * (top - min(lows) + 1e-3))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_title(f"validation loss vs {xlabel.split(' (')[0]} (preset {plan.preset.name})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(paths[key], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    means, errs = [], []
    for arm in plan.arms:
        vals = [throughput(metrics[(r.arm, r.seed)]) or 0.0 for r in plan.runs if r.arm == arm]
        means.append(statistics.fmean(vals))
        errs.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    ax.bar(plan.arms, means, yerr=errs, color=[colors[a] for a in plan.arms])
    ax.set_ylabel("training tokens/s")
    ax.set_title("training throughput")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(paths["tokens_per_s"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    contexts = list(plan.preset.decode_contexts)
    for arm in plan.arms:
        if not all(results[(r.arm, r.seed)]["decode"] for r in plan.runs if r.arm == arm):
            continue  # an encoder (model.causal=false) does not decode
        ms = [statistics.fmean(results[(r.arm, r.seed)]["decode"][str(c)]["ms_per_token"]
                               for r in plan.runs if r.arm == arm) for c in contexts]
        ax.plot(contexts, ms, "-o", color=colors[arm], label=arm, markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_xlabel("context length (tokens in the cache)")
    ax.set_ylabel("ms / token (batch 1, greedy)")
    ax.set_title("decoding latency")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["decode_latency"], dpi=110)
    plt.close(fig)
    return paths
