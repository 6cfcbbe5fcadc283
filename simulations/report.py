"""Writing an experiment's results: config, JSON, CSV, PNG plots and a report.md that links them.

Everything is written even for an interrupted or failed run: a result that stops at round 4
of 10 says so at the top and compares all methods at round 4, so a partial result is never
mistaken for a finished one. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qana.atomic import write_atomic
from simulations.baselines import METRICS, Scores
from simulations.config import SimConfig
from simulations.results import Federated

LABELS = {"top1": "top-1 accuracy", "macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy"}
METHODS = ("federated", "pooled", "local_only")
METHOD_LABELS = {"federated": "federated", "pooled": "pooled (centralised)", "local_only": "local-only"}


@dataclass
class ExperimentResult:
    """Everything `qana-sim run` reports; `write_results` turns it into files."""

    cfg: SimConfig
    status: str  # finished | interrupted | failed
    data: str  # plain statement of the data used
    bundle: dict[str, Any]
    classes: tuple[str, ...]
    partition: list[dict[str, Any]]  # per clinic: sizes and class counts
    partition_notes: list[str]
    pooled: list[Scores] = field(default_factory=list)  # rounds 0..R
    local_only: list[Scores] = field(default_factory=list)
    federated: Federated | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase
    features_computed: int = 0
    command: str = ""
    message: str = ""  # why a run stopped early
    scenario: dict[str, Any] | None = None  # new-class scenario summary (simulations.scenario)

    # ------------------------------------------------------------------ derived

    def compared_round(self) -> int | None:
        """The round all methods are compared at: the last federated round with a head."""
        if self.federated is None:
            return None
        done = [r.round for r in self.federated.rounds if r.scores is not None]
        return max(done) if done else None

    def method_scores(self, method: str, r: int) -> Scores | None:
        if method == "federated":
            if self.federated is None:
                return None
            found = [x.scores for x in self.federated.rounds if x.round == r]
            return found[0] if found else None
        curve = self.pooled if method == "pooled" else self.local_only
        return curve[r] if r < len(curve) else None

    def headline(self) -> dict[str, Any]:
        r = self.compared_round()
        out: dict[str, Any] = {"round": r, "metrics": {}, "ratios": {}}
        if r is None:
            return out
        for method in METHODS:
            s = self.method_scores(method, r)
            if s is not None:
                out["metrics"][method] = s.overall
        pooled = out["metrics"].get("pooled")
        if pooled:
            for method in ("federated", "local_only"):
                m = out["metrics"].get(method)
                if m:
                    out["ratios"][f"{method}/pooled"] = {
                        k: (m[k] / pooled[k] if pooled[k] > 0 else None) for k in METRICS
                    }
        return out

    def to_dict(self) -> dict[str, Any]:
        fed = self.federated
        return {
            "status": self.status,
            "message": self.message,
            "command": self.command,
            "data": self.data,
            "bundle": self.bundle,
            "classes": list(self.classes),
            "config": self.cfg.to_dict(),
            "headline": self.headline(),
            "partition": {"clinics": self.partition, "notes": self.partition_notes},
            "federated": None
            if fed is None
            else {
                "status": fed.status,
                "run_id": fed.run_id,
                "rounds": [r.to_dict() for r in fed.rounds],
                "startup_seconds": fed.startup_seconds,
                "wall_seconds": fed.wall_seconds,
                "consistency": fed.consistency,
                "error": fed.error,
                "log": fed.log,
            },
            "pooled": [s.to_dict() for s in self.pooled],
            "local_only": [s.to_dict() for s in self.local_only],
            "seconds": self.seconds,
            "features_computed": self.features_computed,
            "scenario": self.scenario,
        }


# --------------------------------------------------------------------------- files


def _atomic_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _mb(n: int | float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def write_csvs(result: ExperimentResult, out: Path) -> None:
    fed = result.federated
    fed_rounds = {r.round: r for r in fed.rounds} if fed else {}
    n_rounds = max([len(result.pooled), len(result.local_only), (max(fed_rounds) + 1) if fed_rounds else 0])
    with (out / "rounds.csv").open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["round", "method", "top1", "macro_f1", "balanced_accuracy", "n_test", "bytes_sent", "bytes_received", "seconds", "participants", "failed", "rejected"])
        for r in range(n_rounds):
            for method in METHODS:
                s = result.method_scores(method, r)
                if s is None:
                    continue
                row: list[Any] = [r, method, *(f"{s.overall[k]:.6f}" for k in METRICS), s.overall["n"]]
                if method == "federated" and r in fed_rounds:
                    fr = fed_rounds[r]
                    row += [fr.bytes_sent, fr.bytes_received, "" if fr.seconds is None else f"{fr.seconds:.3f}",
                            len(fr.participants), len(fr.failed), len(fr.rejected)]
                else:
                    row += ["", "", "", "", "", ""]
                w.writerow(row)
    with (out / "clinics.csv").open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["round", "clinic", "method", "source", "top1", "macro_f1", "balanced_accuracy", "n_test", "bytes_sent", "bytes_received"])
        for r in range(n_rounds):
            for method in METHODS:
                s = result.method_scores(method, r)
                if s is None:
                    continue
                for clinic, m in s.by_clinic.items():
                    extra: list[Any] = ["", ""]
                    if method == "federated" and r in fed_rounds:
                        b = fed_rounds[r].bytes_by_clinic.get(clinic, {})
                        extra = [b.get("sent", 0), b.get("received", 0)]
                    w.writerow([r, clinic, method, "driver", *(f"{m[k]:.6f}" for k in METRICS), m["n"], *extra])
            if r in fed_rounds:
                for clinic, m in fed_rounds[r].reported_by_clinic.items():
                    w.writerow([r, clinic, "federated", "clinic (on chip)", *(f"{m.get(k, float('nan')):.6f}" for k in METRICS), int(m.get("n", 0)), "", ""])
    with (out / "partition.csv").open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["clinic", "images", "lesions", "train_images", "test_images", *result.classes])
        for p in result.partition:
            w.writerow([p["clinic"], p["images"], p["lesions"], p["train_images"], p["test_images"], *(p["class_counts"][c] for c in result.classes)])


def write_plots(result: ExperimentResult, out: Path) -> list[str]:
    """PNG plots; returns the file names written (relative to out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    fed = result.federated
    fed_rounds = [r for r in fed.rounds if r.scores is not None] if fed else []
    colours = {"federated": "tab:blue", "pooled": "tab:green", "local_only": "tab:orange"}

    # 1. metric curves per round
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for ax, key in zip(axes, METRICS):
        if fed_rounds:
            ax.plot([r.round for r in fed_rounds], [r.scores.overall[key] for r in fed_rounds], "o-", color=colours["federated"], label="federated")  # type: ignore[union-attr]
        for method, curve in (("pooled", result.pooled), ("local_only", result.local_only)):
            if curve:
                ax.plot(range(len(curve)), [s.overall[key] for s in curve], "s--" if method == "pooled" else "^:", color=colours[method], label=METHOD_LABELS[method])
        ax.set_title(LABELS[key])
        ax.set_xlabel("round (one Akida learning pass each)" if result.cfg.learning == "akida-edge" else f"round ({result.cfg.local_epochs} local epochs each)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("All clinics' local test parts together")
    fig.savefig(plots / "curves.png", dpi=110)
    plt.close(fig)
    written.append("plots/curves.png")

    # 2. per-clinic bars at the compared round
    r = result.compared_round()
    if r is not None:
        clinics = [p["clinic"] for p in result.partition]
        fig, axes = plt.subplots(2, 1, figsize=(max(8, min(40, 0.35 * len(clinics) * 3)), 7), constrained_layout=True)
        width = 0.27
        x = np.arange(len(clinics))
        for ax, key in zip(axes, ("balanced_accuracy", "macro_f1")):
            for i, method in enumerate(METHODS):
                s = result.method_scores(method, r)
                if s is None:
                    continue
                ax.bar(x + (i - 1) * width, [s.by_clinic[c][key] for c in clinics], width, color=colours[method], label=METHOD_LABELS[method])
            ax.set_ylabel(LABELS[key])
            ax.set_ylim(0, 1)
            ax.set_xticks(x, clinics, rotation=90 if len(clinics) > 8 else 0, fontsize=7 if len(clinics) > 30 else 9)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(loc="upper right", fontsize=8)
        axes[0].set_title(f"Each clinic's local test part, round {r}")
        fig.savefig(plots / "clinics.png", dpi=110)
        plt.close(fig)
        written.append("plots/clinics.png")

        # 3. confusion matrix of the final global model
        s = result.method_scores("federated", r)
        if s is not None and s.confusion:
            cm = np.asarray(s.confusion, dtype=float)
            norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
            fig, ax = plt.subplots(figsize=(6.5, 5.5), constrained_layout=True)
            im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
            classes = list(result.classes)
            ax.set_xticks(range(len(classes)), classes)
            ax.set_yticks(range(len(classes)), classes)
            for i in range(len(classes)):
                for j in range(len(classes)):
                    if cm[i, j]:
                        ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.6 else "black")
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"Global model after round {r} (row-normalised; counts)")
            fig.colorbar(im, ax=ax, fraction=0.046)
            fig.savefig(plots / "confusion.png", dpi=110)
            plt.close(fig)
            written.append("plots/confusion.png")

    # 4. communication per round
    if fed and fed.rounds:
        rs = [x.round for x in fed.rounds]
        fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
        ax.bar(np.array(rs) - 0.2, [max(x.bytes_sent, 1) for x in fed.rounds], 0.4, label="coordinator → clinics", color="tab:purple")
        ax.bar(np.array(rs) + 0.2, [max(x.bytes_received, 1) for x in fed.rounds], 0.4, label="clinics → coordinator", color="tab:gray")
        ax.set_yscale("log")
        ax.set_xlabel("round (0 = hello, bundle deployment, initial evaluation)")
        ax.set_ylabel("bytes (log scale)")
        ax.set_xticks(rs)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        ax.set_title("Communication per round (all clinics)")
        fig.savefig(plots / "communication.png", dpi=110)
        plt.close(fig)
        written.append("plots/communication.png")
    return written


def _report_md(result: ExperimentResult, plots: list[str]) -> str:
    cfg = result.cfg
    fed = result.federated
    head = result.headline()
    r = head["round"]
    lines = ["# qana-sim results", ""]
    if result.status != "finished":
        done = fed.completed_rounds if fed else -1
        lines += [f"**{result.status.upper()}**: {result.message or 'the run did not finish'}. "
                  f"Federated rounds completed: {max(done, 0)} of {cfg.rounds}; all methods are compared at round {r}.", ""]
    lines += [
        f"- **Data**: {result.data}",
        f"- **Bundle**: {result.bundle.get('path')} (target {result.bundle.get('target')}, {result.bundle.get('feature_dim')} features, id {str(result.bundle.get('id'))[:12]}…)",
        f"- **Federation**: {len(result.partition)} clinics, split `{cfg.split}`"
        + (f" (alpha {cfg.alpha})" if cfg.split == "dirichlet" else "")
        + (f" ({cfg.classes_per_clinic} classes per clinic)" if cfg.split == "pathological" else "")
        + (f", learning `akida-edge` (Akida 1.0 on-chip learning, usage-weighted k-medoids merge), {cfg.rounds} rounds x 1 learning pass, "
           if cfg.learning == "akida-edge" else
           f", strategy `{cfg.strategy}`{(' (' + cfg.strategy_options + ')') if cfg.strategy_options else ''}, {cfg.rounds} rounds x {cfg.local_epochs} local epochs, ")
        + f"dropout {cfg.dropout}, initial head `{cfg.initial_head}`, seed {cfg.seed}",
        f"- **Command**: `{result.command}`" if result.command else "",
        "- Resolved configuration: [config.toml](config.toml); all numbers: [results.json](results.json), "
        "[rounds.csv](rounds.csv), [clinics.csv](clinics.csv), [partition.csv](partition.csv)",
        "",
    ]
    if r is not None and head["metrics"]:
        lines += [f"## Round {r}: all clinics' local test parts together", "",
                  "| method | top-1 | macro-F1 | balanced accuracy | test images |", "|---|---|---|---|---|"]
        for method in METHODS:
            m = head["metrics"].get(method)
            if m:
                lines.append(f"| {METHOD_LABELS[method]} | {_fmt(m['top1'])} | {_fmt(m['macro_f1'])} | {_fmt(m['balanced_accuracy'])} | {m['n']} |")
        lines.append("")
        for name, ratio in head["ratios"].items():
            lines.append(f"- **{name.replace('_', '-')}**: " + ", ".join(f"{LABELS[k]} {_fmt(v * 100 if v is not None else None, 1)} %" for k, v in ratio.items()))
        arithmetic = ("the edge neurons' potentials (f.w - threshold) / act_step" if cfg.learning == "akida-edge"
                      else "the quantized head's integer arithmetic")
        lines += ["", f"Local-only: each clinic's own head on its own test part. Scores use {arithmetic}, "
                  "which is what the Akida chip computes.", ""]
    if fed is not None:
        c = fed.consistency
        lines += ["## Federated rounds", "",
                  "| round | top-1 | macro-F1 | balanced acc. | clinics trained | failed | sent | received | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in fed.rounds:
            s = x.scores.overall if x.scores else {}
            lines.append(
                f"| {x.round} | {_fmt(s.get('top1'))} | {_fmt(s.get('macro_f1'))} | {_fmt(s.get('balanced_accuracy'))} | "
                f"{len(x.participants)} | {len(x.failed)} | {_mb(x.bytes_sent)} | {_mb(x.bytes_received)} | {_fmt(x.seconds, 1)} |"
            )
        total_s = sum(x.bytes_sent for x in fed.rounds)
        total_r = sum(x.bytes_received for x in fed.rounds)
        lines += ["", f"Communication in total: {_mb(total_s)} sent, {_mb(total_r)} received (round 0 includes the bundle "
                  "sent to every clinic). Round 0 time includes starting Ray and the clinics.", ""]
        lines.append(
            f"Consistency: {c['checked']} clinic evaluations (from each clinic's chip) compared with the driver's scores of the "
            f"same heads: {'all equal' if c['ok'] else 'MISMATCH: ' + '; '.join(c['mismatches'])} (max difference {c['max_abs_difference']:.2g})."
        )
        if fed.error:
            lines += ["", "Error from the simulation (see " + f"`{fed.log}`):", "", "```", fed.error, "```"]
        lines.append("")
    if result.scenario:
        lines += _scenario_md(result.scenario)
    if r is not None:
        lines += [f"## Per clinic, round {r}", "",
                  "| clinic | test images | federated bal. acc. | pooled bal. acc. | local-only bal. acc. | federated macro-F1 | pooled macro-F1 | local-only macro-F1 |",
                  "|---|---|---|---|---|---|---|---|"]
        ss = {m: result.method_scores(m, r) for m in METHODS}
        for p in result.partition:
            c = p["clinic"]
            vals = {m: (s.by_clinic.get(c) if s else None) for m, s in ss.items()}
            n = next((v["n"] for v in vals.values() if v), p["test_images"])
            lines.append(f"| {c} | {n} | " + " | ".join(_fmt(vals[m][k] if vals[m] else None) for k in ("balanced_accuracy", "macro_f1") for m in METHODS) + " |")
        lines.append("")
    lines += ["## Clinics", "", "| clinic | images | lesions | train | test | " + " | ".join(result.classes) + " |",
              "|---|---|---|---|---|" + "---|" * len(result.classes)]
    for p in result.partition:
        lines.append(f"| {p['clinic']} | {p['images']} | {p['lesions']} | {p['train_images']} | {p['test_images']} | "
                     + " | ".join(str(p["class_counts"][c]) for c in result.classes) + " |")
    for note in result.partition_notes:
        lines.append(f"\n_{note}_")
    lines += ["", "## Wall time", ""]
    for phase, sec in result.seconds.items():
        lines.append(f"- {phase}: {sec:.1f} s")
    if fed is not None and fed.startup_seconds is not None:
        lines.append(f"- of which starting the simulation process and Ray: {fed.startup_seconds:.1f} s")
    lines.append(f"- backbone: ran on {result.features_computed} image(s) in this run; every other feature came from the feature cache")
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        titles = {"plots/curves.png": "Metrics per round", "plots/clinics.png": "Per clinic",
                  "plots/confusion.png": "Confusion matrix of the global model", "plots/communication.png": "Communication per round"}
        for p in plots:
            lines += [f"### {titles.get(p, p)}", "", f"![{titles.get(p, p)}]({p})", ""]
    return "\n".join(l for l in lines if l is not None) + "\n"


def _scenario_md(sc: dict[str, Any]) -> list[str]:
    """The new-class scenario section: new-class recall per clinic and old-class macro-F1 per round."""
    name, k = sc["class"], sc["round"]
    clinics = sorted({c for scores in sc["rounds"].values() for c in scores["new_class_recall"]})
    lines = [f"## New-class scenario: `{name}` from {sc['clinic']} at round {k}", "",
             f"The federation starts without `{name}`; only {sc['clinic']} has training images of it (other clinics' "
             f"`{name}` images are in their test parts only). Old-class macro-F1: test images of the other classes, all "
             f"clinics together (a `{name}` prediction on them is an error). Recall of `{name}` on each clinic's test images.", "",
             "| round | head has it | old-class macro-F1 | " + " | ".join(f"{name} recall at {c}" for c in clinics) + " |",
             "|---|---|---|" + "---|" * len(clinics)]
    for r, scores in sorted(sc["rounds"].items(), key=lambda kv: int(kv[0])):
        rec = scores["new_class_recall"]
        lines.append(f"| {r} | {'yes' if scores['has_class'] else 'no'} | {_fmt(scores['old_macro_f1'])} | "
                     + " | ".join(_fmt(rec.get(c)) if rec.get(c) is not None else "–" for c in clinics) + " |")
    lines.append("")
    if "old_macro_f1_change" in sc:
        verdict = "within" if sc["old_classes_within_target"] else "OUTSIDE"
        lines.append(f"Old classes: macro-F1 {_fmt(sc['old_macro_f1_before'])} at round {k - 1} (before `{name}`), "
                     f"{_fmt(sc['old_macro_f1_after'])} at the end: change {sc['old_macro_f1_change'] * 100:+.1f} points "
                     f"({verdict} the 1-point target).")
    appeared = sc.get("appeared_in_round")
    lines += [f"`{name}` entered the global head in round {appeared}." if appeared is not None
              else f"`{name}` never entered the global head.", ""]
    return lines


# Every file `write_results` writes under out (plots/ aside); results.json comes last, so its
# presence means the run's results are complete (simulations.out_folder relies on it).
RESULT_FILES = ("config.toml", "rounds.csv", "clinics.csv", "partition.csv", "report.md", "results.json")


def write_results(result: ExperimentResult, out: Path) -> None:
    """config.toml, CSVs, plots, report.md and, last, results.json under out (each file replaced atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "config.toml", result.cfg.to_toml())
    write_csvs(result, out)
    plots = write_plots(result, out)
    _atomic_text(out / "report.md", _report_md(result, plots))
    _atomic_text(out / "results.json", json.dumps(result.to_dict(), indent=2, default=str) + "\n")
