"""The papers' claims a comparison can check, and each one's verdict on a comparison's table rows.

A claim names its arm, says what the paper reports and where, and turns the arm's rows and the baseline's
(:func:`leanformer.compare.report.analyse_run`, one per seed; the mean over seeds is judged) into
``(met, our figure)``. Where a paper gives no number ("comparable", "matches") the threshold is ours and
the claim's text says so.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Rows = list[dict[str, Any]]

MATCH_NATS = 0.02  # "matches per step": within the seed spread of the CPU comparison (docs/results.md §3)
CONVERT_NATS = 0.1  # "comparable" after conversion: our reading, the papers give no loss threshold


def _mean(rows: Rows, key: str) -> float | None:
    got = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(got) if got else None


@dataclass(frozen=True)
class Claim:
    arm: str
    text: str
    judge: Callable[[Rows, Rows], tuple[bool | None, str]]  # (arm rows, baseline rows) -> (met, figure)


def _ratio_at_most(key: str, limit: float, what: str) -> Callable[[Rows, Rows], tuple[bool | None, str]]:
    def judge(rows: Rows, base: Rows) -> tuple[bool | None, str]:
        ratio = _mean(rows, key)
        if ratio is None:
            gap = _mean(rows, "final_val_loss") - _mean(base, "final_val_loss")
            return False, f"never reaches the baseline's final loss ({gap:+.3f} nats at the end)"
        return ratio <= limit, f"{ratio:.2f}× the baseline's {what}"
    return judge


def _tokens_at_least(limit: float) -> Callable[[Rows, Rows], tuple[bool | None, str]]:
    def judge(rows: Rows, base: Rows) -> tuple[bool | None, str]:
        ratio = _mean(rows, "tok_per_s_ratio")
        return (None, "no throughput") if ratio is None else (ratio >= limit, f"{ratio:.2f}× tokens/s")
    return judge


def _loss_within(nats: float) -> Callable[[Rows, Rows], tuple[bool | None, str]]:
    def judge(rows: Rows, base: Rows) -> tuple[bool | None, str]:
        gap = _mean(rows, "final_val_loss") - _mean(base, "final_val_loss")
        return gap <= nats, f"final loss {gap:+.3f} nats from the baseline's"
    return judge


_NOBLE_ARMS = {"noble": "", "noble_silu": "; judged also with the ablation's SiLU recipe"}

CLAIMS: tuple[Claim, ...] = (
    *(claim for arm, recipe in _NOBLE_ARMS.items() for claim in (
        Claim(arm, "reaches the baseline's loss in ≤ 0.68× the steps (NOBLE document: up to 1.47× fewer "
              f"steps, 125M on C4{recipe})", _ratio_at_most("reach_step_ratio", 0.68, "steps")),
        Claim(arm, f"reaches it in ≤ 0.82× the wall-clock (NOBLE document: up to 1.22× less{recipe})",
              _ratio_at_most("reach_seconds_ratio", 0.82, "seconds")))),
    Claim("sas_p", f"matches Pre-LN's loss per step (simplified-blocks paper; ours: final loss within "
          f"+{MATCH_NATS} nats)", _loss_within(MATCH_NATS)),
    Claim("sas_p", "trains ≥ 1.16× faster (simplified-blocks paper, crammed BERT)", _tokens_at_least(1.16)),
    Claim("sas_p_nonorm", f"matches Pre-LN's loss per step without norms (paper; ours: within "
          f"+{MATCH_NATS} nats)", _loss_within(MATCH_NATS)),
    Claim("sas_p_nonorm", "trains ≥ 1.20× faster (simplified-blocks paper, crammed BERT)",
          _tokens_at_least(1.20)),
    Claim("dijiang_convert", f"converted from the trained baseline with a small fraction of its training, "
          f"performs comparably (DiJiang paper: ~1/16 of the cost; ours: within +{CONVERT_NATS} nats)",
          _loss_within(CONVERT_NATS)),
)


def claims_section(rows: dict[str, Rows], baseline: str, unfinished: dict[str, str] | None = None) -> list[str]:
    """Markdown lines: one table row per claim whose arm has rows, or was started and did not finish
    (``unfinished``: arm → what happened; not met); [] when no claim applies."""
    lines = []
    for claim in CLAIMS:
        if claim.arm in (unfinished or {}) and not rows.get(claim.arm):
            lines.append(f"| `{claim.arm}` | {claim.text} | did not finish (see the notes) | **not met** |")
            continue
        if not rows.get(claim.arm) or not rows.get(baseline):
            continue
        met, figure = claim.judge(rows[claim.arm], rows[baseline])
        verdict = "–" if met is None else "**met**" if met else "**not met**"
        lines.append(f"| `{claim.arm}` | {claim.text} | {figure} | {verdict} |")
    if not lines:
        return []
    return ["## The papers' claims", "", "| arm | claim | ours | verdict |", "|---|---|---|---|", *lines, ""]
