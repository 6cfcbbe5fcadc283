"""`qana-sim compare`: gradient head vs Akida edge-learning head, standard and new-class, in one report.

Four `qana-sim run` experiments on the same data, split and seed, each a full simulated
federation with its pooled and local-only baselines:

    gradient    standard      (qana.head softmax head, Flower strategy)
    akida-edge  standard      (Akida 1.0 on-chip learning, usage-weighted k-medoids merge)
    gradient    new-class     (the class enters at round k from one clinic)
    akida-edge  new-class

Both learning modes use the same bundle (by default the shipped v1 bundle, the only one Akida
edge learning runs on), so they see the same binary backbone features and differ only in how
the head is learned and merged. Each experiment keeps its own folder (report.md, plots, audit
log) under OUT; OUT/comparison.md and OUT/comparison.json put the headline numbers side by
side. Every number there is read from those experiments' results.json files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from qana.atomic import write_atomic
from simulations.config import APPLY_ONLY_WITH, SimConfig
from simulations.report import ExperimentResult

RUNS = (
    ("gradient", "standard"),
    ("akida-edge", "standard"),
    ("gradient", "new-class"),
    ("akida-edge", "new-class"),
)


def run_name(learning: str, scenario: str) -> str:
    return f"{learning}-{scenario}"


def plan(base: SimConfig, out: Path) -> list[SimConfig]:
    """The four experiments' settings: the base settings with learning, scenario and out varied."""
    from qana.bundle import default_bundle_path

    bundle = base.bundle or str(default_bundle_path("v1"))
    return [
        without_unused(replace(base, learning=learning, scenario=scenario, bundle=bundle, out=str(out / run_name(learning, scenario)))).validate()
        for learning, scenario in RUNS
    ]


def without_unused(cfg: SimConfig) -> SimConfig:
    """`cfg` with the settings of the other learning mode and scenario back at their defaults
    (an akida-edge run has no strategy, a standard run no new class), so each run records only
    what it ran with. The split's settings stay: every run has the same split, so a flag it
    does not use (--alpha with split centre) is refused by `config.resolve` as in `qana-sim run`."""
    defaults = SimConfig()
    for (field, value), names in APPLY_ONLY_WITH.items():
        if field in ("learning", "scenario") and getattr(cfg, field) != value:
            cfg = replace(cfg, **{name: getattr(defaults, name) for name in names})
    return cfg


def check_scenario(cfg: SimConfig) -> None:
    """Split the data as the experiment will and place its new class, without running anything
    (the images are decoded into the cache the experiments then read)."""
    import qana.data
    from simulations.experiment import partition_for
    from simulations.workspace import load_source

    partition_for(cfg, load_source(cfg, qana.data.DEFAULT_CACHE_DIR).dataset)


def _row(result: ExperimentResult) -> dict[str, Any]:
    head = result.headline()
    metrics = head["metrics"]
    row: dict[str, Any] = {
        "learning": result.cfg.learning,
        "scenario": result.cfg.scenario,
        "status": result.status,
        "round": head["round"],
        "report": str(Path(result.cfg.out) / "report.md"),
    }
    for method in ("federated", "local_only", "pooled"):
        m = metrics.get(method) or {}
        row[method] = {k: m.get(k) for k in ("macro_f1", "balanced_accuracy", "top1", "n")}
    if result.federated is not None:
        best = max(
            (r for r in result.federated.rounds if r.scores is not None),
            key=lambda r: r.scores.overall["balanced_accuracy"],  # type: ignore[union-attr]
            default=None,
        )
        if best is not None and best.scores is not None:
            row["federated_best_round"] = {"round": best.round, **{k: best.scores.overall[k] for k in ("macro_f1", "balanced_accuracy")}}
    if result.scenario:
        sc = result.scenario
        row["new_class"] = {
            k: sc.get(k)
            for k in ("class", "clinic", "round", "appeared_in_round", "old_macro_f1_before", "old_macro_f1_after",
                      "old_macro_f1_change", "old_classes_within_target", "new_class_recall_after")
        }
    return row


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def comparison_md(rows: list[dict[str, Any]], base: SimConfig, command: str) -> str:
    lines = [
        "# Gradient head vs Akida edge-learning head",
        "",
        f"- **Command**: `{command}`" if command else "",
        f"- Data: `{base.data or 'embedded sample'}`, split `{base.split}`, {base.rounds} rounds, seed {base.seed}, "
        f"gradient head: `{base.strategy}`{(' (' + base.strategy_options + ')') if base.strategy_options else ''}, "
        f"{base.local_epochs} local epochs; "
        f"bundle `{base.bundle or 'shipped v1'}`. Each row links its own report (plots, per clinic, audit log).",
        "",
        "## Standard federation: all clinics' local test parts together, last round",
        "",
        "| head learning | federated macro-F1 | federated bal. acc. | local-only macro-F1 | local-only bal. acc. | pooled macro-F1 | pooled bal. acc. | best federated round (bal. acc.) | report |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["scenario"] != "standard":
            continue
        f, lo, p = row["federated"], row["local_only"], row["pooled"]
        best = row.get("federated_best_round")
        lines.append(
            f"| {row['learning']} | {_fmt(f['macro_f1'])} | {_fmt(f['balanced_accuracy'])} | {_fmt(lo['macro_f1'])} | "
            f"{_fmt(lo['balanced_accuracy'])} | {_fmt(p['macro_f1'])} | {_fmt(p['balanced_accuracy'])} | "
            f"{(str(best['round']) + ' (' + _fmt(best['balanced_accuracy']) + ')') if best else '–'} | [{row['learning']}]({Path(row['report']).parent.name}/report.md) |"
        )
    lines += [
        "",
        "Local-only: each clinic's own head scored on its own test part; pooled: one head trained on every clinic's "
        "training part (the centralised reference).",
        "",
        "## New-class scenario",
        "",
        "| head learning | class (clinic, round) | entered the head in round | old-class macro-F1 before | after | change (points) | within 1 point | new-class recall per clinic at the end | report |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        nc = row.get("new_class")
        if row["scenario"] != "new-class" or not nc:
            continue
        change = nc.get("old_macro_f1_change")
        recall = nc.get("new_class_recall_after") or {}
        recall_txt = ", ".join(f"{c} {_fmt(v)}" for c, v in recall.items() if v is not None) or "–"
        lines.append(
            f"| {row['learning']} | {nc['class']} ({nc['clinic']}, round {nc['round']}) | {nc.get('appeared_in_round') or '–'} | "
            f"{_fmt(nc.get('old_macro_f1_before'))} | {_fmt(nc.get('old_macro_f1_after'))} | "
            f"{'–' if change is None else f'{change * 100:+.1f}'} | {'yes' if nc.get('old_classes_within_target') else 'no'} | "
            f"{recall_txt} | [{row['learning']}]({Path(row['report']).parent.name}/report.md) |"
        )
    failed = [r for r in rows if r["status"] != "finished"]
    if failed:
        lines += ["", "**Not finished**: " + ", ".join(f"{r['learning']} {r['scenario']} ({r['status']})" for r in failed)]
    return "\n".join(line for line in lines if line is not None) + "\n"


def run_comparison(
    base: SimConfig,
    out: Path,
    run: Callable[[SimConfig], ExperimentResult],
    command: str = "",
) -> list[dict[str, Any]]:
    """Run the four experiments with `run` (simulations.experiment.run_experiment) and write the comparison.

    Every experiment's bundle and results folder, and the new-class scenario's class and clinic,
    are checked first: a v2 bundle would otherwise be refused only by the first akida-edge run,
    and a misspelt --new-class by the third experiment, after the runs before it had taken
    their time."""
    from simulations.out_folder import check_out_folder
    from simulations.workspace import resolve_bundle

    configs = plan(base, out)
    for cfg in configs:
        resolve_bundle(cfg)
        check_out_folder(Path(cfg.out).expanduser().resolve())
    for cfg in configs:
        if cfg.scenario == "new-class":
            check_scenario(cfg)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cfg in configs:
        rows.append(_row(run(cfg)))
        # rewritten after every run: whole or not at all, so a crash keeps the runs already compared
        write_atomic(out / "comparison.json", (json.dumps({"config": base.to_dict(), "runs": rows}, indent=2, default=str) + "\n").encode())
        write_atomic(out / "comparison.md", comparison_md(rows, base, command).encode())
    return rows
