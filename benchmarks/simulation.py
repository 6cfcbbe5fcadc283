"""qana-sim at scale: wall time and peak memory for 4, 16 and 100 Dirichlet clinics x 10 rounds.

    python benchmarks/simulation.py [--data DIR] [--bundle DIR] [--clinics 4,16,100] [--rounds 10]
                                    [--alpha 0.5] [--out DIR] [--json]

Each configuration is one complete `qana-sim run` (`simulations.experiment.run_experiment`:
data, split, baselines, the deployment's ServerApp and ClientApp on Flower's simulation
engine with Ray, results and report), run one after the other, never in parallel. Backbone
features are computed once (the first configuration, or an earlier run) and then come from
the feature cache, as in any repeated experiment; the table says how many were computed.

Measured, not estimated:

* wall time of the whole run and of its parts: the federation (simulation process start to
  end, including Ray start-up), Ray start-up alone, round 0 (hello, bundle deployment to every
  clinic, first evaluation), the median of rounds 1..R (one slow round, a GC or a Ray hiccup,
  would move a mean), the baselines;
* peak memory: the largest sum of proportional set sizes (PSS: shared pages such as Ray's
  object store counted once) over this process and all its descendants (the simulation
  process, Ray's GCS/raylet and its ClientApp workers), sampled every 0.25 s from /proc, and
  the largest single process (RSS);
* growth with clinics: seconds per round and per clinic between the configurations.

Default data: ../shared/data/ham10000 next to the repository if it exists, else the embedded
sample. Default bundle: the shipped v2 bundle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qana.cli_errors import at_least, int_list  # noqa: E402

SHARED_HAM = ROOT.parent / "shared" / "data" / "ham10000"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _pss(pid: int) -> int | None:
    """Proportional set size in bytes: shared pages (Ray's object store, libraries) split among their users."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _tree(root: int) -> dict[int, tuple[str, int]]:
    """`root` and all its descendants: pid -> (command name, RSS bytes), from /proc."""
    parents: dict[int, int] = {}
    info: dict[int, tuple[str, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            parents[pid] = int(fields[1])
            info[pid] = (name, int(fields[21]) * PAGE)
        except (OSError, ValueError, IndexError):
            continue
    members = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in members and pid not in members:
                members.add(pid)
                changed = True
    return {p: info[p] for p in members if p in info}


class PeakMemory:
    """Samples the process tree's memory in a thread while a configuration runs.

    Total: the sum of PSS (shared pages counted once overall, so Ray's shared-memory object
    store and common libraries are not counted once per process as a sum of RSS would).
    Largest: the biggest single process by RSS, with its name.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak_total = 0
        self.peak_rss_sum = 0
        self.peak_single = 0
        self.peak_single_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            tree = _tree(me)
            total = sum((_pss(pid) or rss) for pid, (_name, rss) in tree.items())
            self.peak_total = max(self.peak_total, total)
            self.peak_rss_sum = max(self.peak_rss_sum, sum(rss for _n, rss in tree.values()))
            for name, rss in tree.values():
                if rss > self.peak_single:
                    self.peak_single, self.peak_single_name = rss, name
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_one(clinics: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from simulations.config import resolve
    from simulations.experiment import run_experiment

    flags = {
        "data": str(args.data) if args.data else None,
        "bundle": str(args.bundle) if args.bundle else None,
        "split": "dirichlet",
        "clinics": clinics,
        "alpha": args.alpha,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "seed": 0,
        "out": str(out / f"dirichlet-{clinics}"),
    }
    cfg = resolve(None, flags)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        result = run_experiment(cfg, echo=lambda m: print(f"  {m}", flush=True), progress=not args.json)
    wall = time.perf_counter() - t0
    fed = result.federated
    rounds = fed.rounds if fed else []
    later = [r.seconds for r in rounds if r.round >= 1 and r.seconds is not None]
    head = result.headline()
    return {
        "clinics": clinics,
        "rounds": args.rounds,
        "status": result.status,
        "wall_seconds": wall,
        "federation_seconds": result.seconds.get("federation (Flower simulation, incl. Ray start)"),
        "ray_startup_seconds": fed.startup_seconds if fed else None,
        "round0_seconds": rounds[0].seconds if rounds else None,
        "median_round_seconds": statistics.median(later) if later else None,  # one slow round (a GC, a Ray hiccup) moves a mean
        "baselines_seconds": result.seconds.get("baselines"),
        "features_seconds": result.seconds.get("backbone features"),
        "features_computed": result.features_computed,
        "peak_pss_total_mb": mem.peak_total / 2**20,
        "peak_rss_sum_mb": mem.peak_rss_sum / 2**20,
        "peak_rss_single_mb": mem.peak_single / 2**20,
        "largest_process": mem.peak_single_name,
        "bytes_round0": rounds[0].bytes_sent + rounds[0].bytes_received if rounds else None,
        "bytes_per_round": (sum(r.bytes_sent + r.bytes_received for r in rounds[1:]) / max(len(rounds) - 1, 1)) if rounds else None,
        "federated_balanced_accuracy": head["metrics"].get("federated", {}).get("balanced_accuracy"),
        "pooled_balanced_accuracy": head["metrics"].get("pooled", {}).get("balanced_accuracy"),
        "moved_lesions_note": result.partition_notes,
        "data": result.data,
        "consistency_ok": fed.consistency["ok"] if fed else None,
    }


def _f(x: float | None, d: int = 1) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| clinics | status | wall (s) | federation (s) | Ray start (s) | round 0 (s) | median round 1..R (s) | baselines (s) | peak memory, PSS of all processes (MB) | largest process, RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clinics']} | {r['status']} | {_f(r['wall_seconds'])} | {_f(r['federation_seconds'])} | {_f(r['ray_startup_seconds'])} | "
            f"{_f(r['round0_seconds'])} | {_f(r['median_round_seconds'], 2)} | {_f(r['baselines_seconds'])} | "
            f"{_f(r['peak_pss_total_mb'], 0)} | {_f(r['peak_rss_single_mb'], 0)} ({r['largest_process']}) |"
        )
    return "\n".join(lines)


def growth(rows: list[dict[str, Any]]) -> list[str]:
    """Seconds per additional clinic between consecutive configurations (per round and whole run)."""
    out = []
    done = [r for r in rows if r["status"] == "finished" and r["median_round_seconds"] is not None]
    for a, b in zip(done, done[1:]):
        dn = b["clinics"] - a["clinics"]
        per_round = (b["median_round_seconds"] - a["median_round_seconds"]) / dn
        per_run = (b["wall_seconds"] - a["wall_seconds"]) / dn
        out.append(
            f"{a['clinics']} -> {b['clinics']} clinics: {per_round:+.3f} s per round and {per_run:+.2f} s of total wall time per added clinic"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_HAM if (SHARED_HAM / "HAM10000_metadata.csv").is_file() else None)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--clinics", type=int_list(1), default=[4, 16, 100], help="comma-separated clinic counts (default 4,16,100)")
    parser.add_argument("--rounds", type=at_least(1), default=10)
    parser.add_argument("--local-epochs", type=at_least(1), default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None, help="keep every run's results here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args()
    counts = args.clinics
    rows = []
    # with --json, stdout carries the JSON only: progress (also qana-sim's own) goes to stderr
    progress = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="qana-sim-bench-") as tmp, progress:
        out = args.out or Path(tmp)
        for n in counts:
            print(f"== {n} Dirichlet clinics x {args.rounds} rounds", flush=True)
            rows.append(run_one(n, args, out))
            print(table(rows[-1:]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print()
    print(f"Data: {rows[0]['data']}" if rows else "")
    print(table(rows))
    for line in growth(rows):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
