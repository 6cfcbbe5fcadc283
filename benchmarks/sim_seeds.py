"""Several `qana-sim run` outputs side by side: mean ± sd of one measure per method and round.

    for S in 0 1 2 3 4 5 6 7; do qana-sim run --learning akida-edge --rounds 3 --seed $S --out results/edge-seed$S; done
    python benchmarks/sim_seeds.py results/edge-seed* [--metric balanced_accuracy] [--rounds 1 3]

One simulated federation on the embedded sample rests on ~130 test images, so a single run's
curve says little (the README's edge-learning paragraph): the seed changes the clinics' splits
and the learning order, and the spread over seeds is what a difference has to beat. Reads each
run's `rounds.csv` (written by `simulations/report.py`); prints, per method (federated, pooled,
local_only) and requested round, the mean and sample standard deviation over runs, and how many
runs have the last requested round below the first (a falling curve).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

METRICS = ("top1", "macro_f1", "balanced_accuracy")
METHODS = ("federated", "pooled", "local_only")


def read_rounds(run: Path) -> dict[tuple[int, str], dict[str, float]]:
    """{(round, method): {metric: value}} of one run's rounds.csv; exits with a message if it is not one."""
    path = run / "rounds.csv"
    if not path.is_file():
        sys.exit(f"error: {run}: no rounds.csv (not a finished `qana-sim run` output folder)")
    out: dict[tuple[int, str], dict[str, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                out[(int(row["round"]), row["method"])] = {m: float(row[m]) for m in METRICS}
            except (KeyError, ValueError) as exc:
                sys.exit(f"error: {path}: unreadable row {row} ({exc})")
    return out


def summarise(runs: list[dict[tuple[int, str], dict[str, float]]], metric: str, rounds: list[int]) -> list[str]:
    """Printable lines: per method and round, mean ± sd over the runs (all runs must have the round)."""
    lines = []
    for method in METHODS:
        cells = []
        for r in rounds:
            values = [run[(r, method)][metric] for run in runs if (r, method) in run]
            if len(values) != len(runs):
                sys.exit(f"error: round {r} of {method} is missing in {len(runs) - len(values)} of the runs")
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"round {r} {statistics.mean(values):.3f} ± {sd:.3f}")
        falling = sum(run[(rounds[-1], method)][metric] < run[(rounds[0], method)][metric] for run in runs)
        lines.append(f"{method:<11} " + "   ".join(cells) + f"   (round {rounds[-1]} below round {rounds[0]} in {falling} of {len(runs)})")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="qana-sim run output folders")
    parser.add_argument("--metric", choices=METRICS, default="balanced_accuracy")
    parser.add_argument("--rounds", nargs="+", type=int, default=[1, 3], help="rounds to show (default: 1 3)")
    args = parser.parse_args(argv)
    runs = [read_rounds(run) for run in args.runs]
    print(f"{args.metric}, mean ± sample sd over {len(runs)} runs")
    for line in summarise(runs, args.metric, args.rounds):
        print(line)


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
