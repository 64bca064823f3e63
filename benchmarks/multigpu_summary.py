"""Summarise benchmarks/multigpu.sh runs: tokens/s per GPU, scaling efficiency, peak memory, loss check."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from leanformer.train.metrics import read_steps


def records(folder: Path) -> list[dict]:
    return read_steps(folder / "metrics.jsonl")


def main(root: str, n: int) -> None:
    root_path = Path(root)
    print("| arm | mode | GPUs | tokens/s per GPU | scaling efficiency | peak memory per GPU (GiB) | "
          "first-5 losses equal 1 GPU at the same global batch |")
    print("|---|---|---:|---:|---:|---:|---|")
    for arm in ("preln", "sas_p_noble"):
        for mode in ("ddp", "fsdp"):
            one = records(root_path / f"{arm}_{mode}_1gpu")
            many = records(root_path / f"{arm}_{mode}_{n}gpu")
            ref = records(root_path / f"{arm}_{mode}_1gpu_global")

            def speed(rs: list[dict], gpus: int) -> float:
                steps = [r["tok_per_s"] for r in rs if "tok_per_s" in r][5:]  # warm-up excluded
                return statistics.median(steps) / gpus if steps else float("nan")

            def mem(rs: list[dict]) -> float:
                return max((r.get("peak_mem_gb", float("nan")) for r in rs), default=float("nan"))

            s1 = speed(one, 1)
            print(f"| {arm} | {mode} | 1 | {s1:,.0f} | 1.00 | {mem(one):.1f} | |")
            if many:
                sn = speed(many, n)
                la = [r["loss"] for r in many if "loss" in r][:5]
                lb = [r["loss"] for r in ref if "loss" in r][:5]
                same = bool(la) and len(la) == len(lb) and all(abs(a - b) <= 2e-2 * abs(b) for a, b in zip(la, lb))
                print(f"| {arm} | {mode} | {n} | {sn:,.0f} | {sn / s1:.2f} | {mem(many):.1f} | "
                      f"{'yes' if same else 'NO'}: {[round(x, 3) for x in la]} vs {[round(x, 3) for x in lb]} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
