"""The report's claims table: each paper's claim judged on the arms' rows (mean over seeds)."""

from leanformer.compare.claims import CLAIMS, claims_section


def _row(loss, steps=None, seconds=None, tok=1.0):
    return {"final_val_loss": loss, "reach_step_ratio": steps, "reach_seconds_ratio": seconds,
            "tok_per_s_ratio": tok}


def _verdicts(lines):
    return {(ln.split("|")[1].strip(" `"), ln.split("|")[2].strip()[:25]): ln.split("|")[4].strip()
            for ln in lines if ln.startswith("| `")}


def test_each_claim_is_judged_on_the_mean_over_seeds():
    rows = {
        "preln": [_row(2.00, 1.0, 1.0), _row(2.02, 1.0, 1.0)],
        "noble": [_row(1.95, 0.60, 0.90, 0.7), _row(1.97, 0.70, 0.80, 0.7)],  # steps 0.65: met; 0.85 s: not
        "sas_p": [_row(2.02, 1.1, 1.0, 1.2), _row(2.03, 1.1, 1.0, 1.16)],  # +0.015 nats: matches; 1.18×: met
        "dijiang_convert": [_row(2.50), _row(2.52)],  # never reaches: +0.5 nats
    }
    lines = claims_section(rows, "preln", {"sas_p_nonorm": "diverged"})
    v = _verdicts(lines)
    assert lines[0] == "## The papers' claims"
    assert v[("noble", "reaches the baseline's lo")] == "**met**"
    assert v[("noble", "reaches it in ≤ 0.82× the")] == "**not met**"
    assert v[("sas_p", "matches Pre-LN's loss per")] == "**met**"
    assert v[("sas_p", "trains ≥ 1.16× faster (si")] == "**met**"
    assert v[("dijiang_convert", "converted from the traine")] == "**not met**"
    assert "+0.500 nats" in next(ln for ln in lines if ln.startswith("| `dijiang_convert`"))
    nonorm = [ln for ln in lines if ln.startswith("| `sas_p_nonorm`")]
    assert len(nonorm) == 2 and all("did not finish" in ln and "**not met**" in ln for ln in nonorm)


def test_a_never_reached_target_is_not_met_and_says_by_how_much():
    rows = {"preln": [_row(2.0, 1.0, 1.0)], "noble": [_row(2.1)]}
    lines = [ln for ln in claims_section(rows, "preln") if ln.startswith("| `noble`")]
    assert len(lines) == sum(c.arm == "noble" for c in CLAIMS) == 2
    assert all("never reaches the baseline's final loss (+0.100 nats" in ln and "**not met**" in ln for ln in lines)


def test_no_claim_applies_without_its_arm():
    assert claims_section({"preln": [_row(2.0, 1.0, 1.0)], "parallel": [_row(2.0)]}, "preln") == []
