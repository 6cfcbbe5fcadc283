"""``qana-sim``: what would this consortium of clinics get? Simulated on Flower's Simulation Engine.

`qana-sim run` splits a HAM10000-style dataset into clinics, runs the deployment's ServerApp
and ClientApp on Flower's simulation engine, trains pooled and local-only baselines on the
same features, and writes config, metrics (CSV/JSON), plots and report.md to --out. Without
--data it uses the embedded sample of real HAM10000 images and the shipped v2 bundle.

Flags override the --config TOML file, which overrides the defaults. Mistakes print one
``error: ...`` line and exit with status 2; Ctrl-C writes what finished and exits with 130.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from qana.cli_errors import fail, reported_errors
from qana.invocation import invoked_command

EXIT_INTERRUPTED = 130

app = typer.Typer(
    pretty_exceptions_show_locals=False,  # a bug's traceback must not print clinic data or keys
    name="qana-sim",
    no_args_is_help=True,
    add_completion=False,
    help="Simulated QANA-FL federations on Flower's Simulation Engine: the deployment's ServerApp and ClientApp, "
    "pooled and local-only baselines, results with plots.",
)


@app.callback()
def _main() -> None:
    """Simulated federations for experiments."""


# Options `run` and `compare` share (same meaning, same defaults from simulations.config)
DataOption = Annotated[Optional[Path], typer.Option("--data", help="HAM10000-style folder (default: the embedded sample of real HAM10000 images)")]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="experiment TOML file (flat keys named like these flags)")]
RoundsOption = Annotated[Optional[int], typer.Option("--rounds", help="federated rounds (default 10)")]
LocalEpochsOption = Annotated[Optional[int], typer.Option("--local-epochs", help="gradient: local head-training epochs per round (default 5)")]
StrategyOption = Annotated[Optional[str], typer.Option("--strategy", help="gradient: fedavg (default) | fedprox | fedadam | fedmedian | fedtrimmedavg | krum")]
StrategyOptionsOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--strategy-options",
        "--strategy-option",  # qana-server's spelling: a command copied from one CLI works in the other
        help='gradient: strategy constructor options, e.g. "proximal_mu=0.1" (repeatable, or comma-separated)',
    ),
]
NewClassOption = Annotated[Optional[str], typer.Option("--new-class", help="new-class scenario: the class (default df)")]
NewClassRoundOption = Annotated[Optional[int], typer.Option("--new-class-round", help="new-class scenario: the round it appears (default 3)")]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help="seed of the split, training and dropout (default 0)")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="no progress bars")]


@contextmanager
def _reported_errors() -> Iterator[None]:
    """A bad setting, unreadable data or an impossible split is one error line and exit status 2."""
    from simulations.config import ConfigError
    from simulations.edge_baselines import EdgeSimError
    from simulations.out_folder import OutFolderError
    from simulations.partition import PartitionError
    from simulations.scenario import ScenarioError
    from simulations.workspace import SourceError

    with reported_errors(ConfigError, SourceError, PartitionError, EdgeSimError, ScenarioError, OutFolderError):
        yield


@app.command("run")
def run(
    data: DataOption = None,
    config: ConfigOption = None,
    clinics: Annotated[Optional[int], typer.Option("--clinics", help="number of clinics (centre split: one per source centre)")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="centre | dirichlet | iid | pathological (default centre)")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Dirichlet concentration for --split dirichlet (default 0.5)")] = None,
    classes_per_clinic: Annotated[Optional[int], typer.Option("--classes-per-clinic", help="k for --split pathological (default 2)")] = None,
    rounds: RoundsOption = None,
    strategy: StrategyOption = None,
    strategy_options: StrategyOptionsOption = None,
    local_epochs: LocalEpochsOption = None,
    learning_rate: Annotated[Optional[float], typer.Option("--learning-rate", help="head learning rate (default 0.01)")] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="probability that a clinic's update is lost in a round (default 0)")] = None,
    eval_fraction: Annotated[Optional[float], typer.Option("--eval-fraction", help="each clinic's local test part, by lesion (default 0.2)")] = None,
    absent_classes: Annotated[Optional[str], typer.Option("--absent-classes", help="gradient: keep (default; a clinic leaves classes it has no images of as received) | train (pushes them down)")] = None,
    initial_head: Annotated[Optional[str], typer.Option("--initial-head", help="random (default) | bundle: the head all methods start from")] = None,
    learning: Annotated[Optional[str], typer.Option("--learning", help="gradient (default) | akida-edge: Akida 1.0 on-chip learning of the head (v1 bundle)")] = None,
    scenario: Annotated[Optional[str], typer.Option("--scenario", help="standard (default) | new-class: one clinic brings a class the federation lacks, at round --new-class-round")] = None,
    new_class: NewClassOption = None,
    new_class_round: NewClassRoundOption = None,
    new_class_clinic: Annotated[Optional[str], typer.Option("--new-class-clinic", help="new-class scenario: the clinic that has it (default: most training lesions of it)")] = None,
    bundle: Annotated[Optional[Path], typer.Option("--bundle", help="model bundle directory (default: the shipped v2 bundle; v1 for --learning akida-edge)")] = None,
    seed: SeedOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="results directory (default ./qana-sim-results); the run/, work/ and plots/ of an earlier qana-sim run there (one that wrote results.json) are replaced once this run has written its results, and kept if it is refused; folders of that name no qana-sim run made are never touched")] = None,
    keep_work: Annotated[Optional[bool], typer.Option("--keep-work/--no-keep-work", help="keep the clinics' folders and caches under OUT/work")] = None,
    quiet: QuietOption = False,
) -> None:
    """Simulate a federation and compare it with pooled and local-only training."""
    from simulations.config import resolve
    from simulations.experiment import run_experiment

    flags: dict[str, Any] = {
        "data": str(data) if data is not None else None,
        "clinics": clinics,
        "split": split,
        "alpha": alpha,
        "classes_per_clinic": classes_per_clinic,
        "rounds": rounds,
        "strategy": strategy,
        "strategy_options": ",".join(strategy_options) if strategy_options else None,
        "local_epochs": local_epochs,
        "learning_rate": learning_rate,
        "dropout": dropout,
        "eval_fraction": eval_fraction,
        "initial_head": initial_head,
        "absent_classes": absent_classes,
        "learning": learning,
        "scenario": scenario,
        "new_class": new_class,
        "new_class_round": new_class_round,
        "new_class_clinic": new_class_clinic,
        "bundle": str(bundle) if bundle is not None else None,
        "seed": seed,
        "out": str(out) if out is not None else None,
        "keep_work": keep_work,
    }
    try:
        with _reported_errors():
            cfg = resolve(config, flags)
            unused = cfg.settings_without_effect()
            if unused:  # only from --config (flags are refused): e.g. a file an older qana-sim wrote
                typer.echo(f"note: {cfg.describe_without_effect(unused)}; from {config}, they are ignored", err=True)
            result = run_experiment(cfg, echo=typer.echo, progress=not quiet, command=invoked_command("qana-sim"))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    head = result.headline()
    out_dir = Path(cfg.out).expanduser().resolve()
    if head["round"] is not None and head["metrics"]:
        typer.echo(f"Round {head['round']}, all clinics' test parts ({head['metrics'].get('pooled', {}).get('n', '?')} images):")
        for method, label in (("federated", "federated"), ("pooled", "pooled"), ("local_only", "local-only")):
            m = head["metrics"].get(method)
            if m:
                typer.echo(f"  {label:<11} top-1 {m['top1']:.3f}  macro-F1 {m['macro_f1']:.3f}  balanced accuracy {m['balanced_accuracy']:.3f}")
        ratio = head["ratios"].get("federated/pooled")
        if ratio:
            typer.echo(
                "  federated/pooled: "
                + ", ".join(f"{k.replace('_', '-')} {v * 100:.1f} %" for k, v in ratio.items() if v is not None)
            )
    fed = result.federated
    if fed is not None and not fed.consistency["ok"]:
        typer.echo("warning: the clinics' on-chip evaluations differ from the driver's scores; see report.md", err=True)
    typer.echo(f"Results: {out_dir / 'report.md'}")
    if result.status == "interrupted":
        typer.echo(f"interrupted: {result.message}; partial results written", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.status != "finished":
        detail = (fed.error or "").strip().splitlines()[-1:] if fed else []
        raise fail(f"{result.message}{': ' + detail[0] if detail else ''} (log: {fed.log if fed else '-'})")



@app.command("compare")
def compare(
    data: DataOption = None,
    config: ConfigOption = None,
    rounds: RoundsOption = None,
    local_epochs: LocalEpochsOption = None,
    strategy: StrategyOption = None,
    strategy_options: StrategyOptionsOption = None,
    new_class: NewClassOption = None,
    new_class_round: NewClassRoundOption = None,
    bundle: Annotated[Optional[Path], typer.Option("--bundle", help="a v1 bundle (default: the shipped v1 bundle; both learning modes use it)")] = None,
    seed: SeedOption = None,
    out: Annotated[Path, typer.Option("--out", help="results directory: one folder per experiment + comparison.md")] = Path("qana-sim-compare"),
    quiet: QuietOption = False,
) -> None:
    """Gradient head vs Akida edge-learning head, federated vs local-only, standard and new-class: four runs, one table."""
    from simulations.compare import run_comparison
    from simulations.config import resolve
    from simulations.experiment import run_experiment

    flags: dict[str, Any] = {
        "data": str(data) if data is not None else None,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "strategy": strategy,
        "strategy_options": ",".join(strategy_options) if strategy_options else None,
        "new_class": new_class,
        "new_class_round": new_class_round,
        "bundle": str(bundle) if bundle is not None else None,
        "seed": seed,
    }
    with _reported_errors():
        base = resolve(config, flags, varied=("learning", "scenario"))  # compare.plan gives each run what it uses
    command = invoked_command("qana-sim")
    out_dir = out.expanduser().resolve()

    def one(cfg: Any) -> Any:
        typer.echo(f"== {cfg.learning}, {cfg.scenario} -> {cfg.out}")
        return run_experiment(cfg, echo=typer.echo, progress=not quiet, command=command)

    try:
        with _reported_errors():
            rows = run_comparison(base, out_dir, one, command=command)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; finished experiments are in {out_dir / 'comparison.md'}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    typer.echo(f"Comparison: {out_dir / 'comparison.md'}")
    if any(r["status"] != "finished" for r in rows):
        raise fail("not every experiment finished; see comparison.md")


if __name__ == "__main__":
    app()
