"""One `qana-sim run`: data, clinics, baselines, the simulated federation, results.

Order matters for Ctrl-C: the backbone features and both baselines come first (they take
seconds once features are cached), then the federation. An interrupted federation therefore
still yields a complete comparison at the last finished round, and every phase writes its
results before the next starts being needed. Used by `simulations.cli` and
`benchmarks/simulation.py`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from simulations import baselines, edge_baselines
from simulations.config import SimConfig
from simulations.engine import Job, Progress, run_federation
from simulations.out_folder import check_out_folder, replacing_earlier_run
from simulations.partition import Partition, make_partition
from simulations.report import ExperimentResult, write_results
from simulations.results import collect
from simulations.scenario import NewClass, apply_new_class, scenario_summary
from simulations.workspace import Source, build_clinics, load_source, source_features

Echo = Callable[[str], None]


def run_id_for(cfg: SimConfig) -> int:
    """A run id derived from the settings, so the same settings give the same audit records and outputs."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "keep_work")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return int(digest[:15], 16)


def server_run_config(cfg: SimConfig, source: Source, num_clinics: int, run_dir: Path) -> dict[str, Any]:
    """The ServerApp's run config (what `[tool.flwr.app.config]` + `--run-config` give a deployment)."""
    return {
        "bundle": str(source.bundle.path),
        "num-rounds": cfg.rounds,
        "strategy": cfg.strategy,
        "strategy-options": cfg.strategy_options,
        "min-clinics": num_clinics,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
        "round-timeout": 3600.0,
        "wait-for-clinics": 600.0,
        "local-epochs": cfg.local_epochs,
        "learning-rate": cfg.learning_rate,
        "batch-size": cfg.batch_size,
        "l2": cfg.l2,
        "smote": cfg.smote,
        "absent-classes": cfg.absent_classes,
        "seed": cfg.seed,
        "initial-head": cfg.initial_head,
        "learning": cfg.learning,
        "audit-db": f"sqlite:///{run_dir / 'audit.db'}",
        "audit-key": str(run_dir / "audit_key.pem"),
        "state-dir": str(run_dir / "server"),
        "wire-log": True,
    }


def partition_table(partition: Partition, source: Source) -> list[dict[str, Any]]:
    ds = source.dataset
    rows = []
    for p in partition.clinics:
        counts = np.bincount(ds.labels[p.rows], minlength=len(ds.class_names))
        rows.append(
            {
                "clinic": p.clinic_id,
                "images": int(len(p.rows)),
                "lesions": int(len(np.unique(ds.lesion_ids[p.rows]))),
                "train_images": int(len(p.train)),
                "test_images": int(len(p.test)),
                "class_counts": {c: int(n) for c, n in zip(ds.class_names, counts)},
            }
        )
    return rows


class _RoundBars:
    """One progress bar per federated round, counting the clinics' replies."""

    def __init__(self, num_clinics: int, rounds: int, enabled: bool) -> None:
        self.n = num_clinics
        self.rounds = rounds
        self.enabled = enabled
        self.bar: Any = None
        self.round = -1
        self.shown: tuple[int, int, str] | None = None

    def _open(self, r: int) -> None:
        from tqdm import tqdm

        self.close()
        self.round = r
        self.shown = None
        label = "round 0 (hello, bundle, first evaluation)" if r == 0 else f"round {r}/{self.rounds}"
        self.bar = tqdm(total=(3 if r == 0 else 2) * self.n, desc=label, unit="reply", leave=True, dynamic_ncols=True)

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        if self.bar is not None and p.round != self.round:
            self._show(p)
            self._finish(p)
        if self.bar is None or p.round != self.round:
            self._open(p.round)
        self._show(p)

    def _show(self, p: Progress) -> None:
        sent, got = p.sent.get(self.round, 0), p.received.get(self.round, 0)
        if (sent, got, p.phase) == self.shown:
            return
        self.shown = (sent, got, p.phase)
        if sent > self.bar.total:
            self.bar.total = sent
        self.bar.n = got
        self.bar.set_postfix_str(p.phase, refresh=False)
        self.bar.refresh()

    def _finish(self, p: Progress) -> None:
        e = p.evaluations.get(self.round)
        if e:
            self.bar.set_postfix_str(
                f"clinics' mean: top1 {e.get('top1', 0):.3f}, macro-F1 {e.get('macro-f1', 0):.3f}, "
                f"bal-acc {e.get('balanced-accuracy', 0):.3f}",
                refresh=False,
            )
        self.bar.refresh()

    def done(self, p: Progress | None) -> None:
        if self.bar is not None and p is not None:
            self._show(p)
            self._finish(p)
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """One BLAS/OpenMP thread for the baselines' small matrices.

    Measured here (2 cores shared with other jobs): an SVD of a 540x256 matrix, as in the
    SMOTE whitening, takes 4.3 s with OpenBLAS's 2 threads and 0.03 s with 1 (the threads
    spin waiting for each other). Ray already gives each ClientApp one thread (OMP_NUM_THREADS=1).
    """
    # threadpoolctl limits only libraries already loaded: load SMOTE's and PCA's first.
    import imblearn.over_sampling  # noqa: F401
    import scipy.linalg  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@contextmanager
def _phase(seconds: dict[str, float], name: str, state: dict[str, str]) -> Iterator[None]:
    state["phase"] = name
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = time.perf_counter() - t0


def scenario_config(scenario: NewClass | None, classes: tuple[str, ...]) -> dict[str, Any]:
    """Run config of the new-class scenario: the federation starts without the new class."""
    if scenario is None:
        return {}
    return {"initial-classes": ",".join(c for c in classes if c != scenario.name)}


def partition_for(cfg: SimConfig, dataset: Any) -> tuple[Partition, NewClass | None]:
    """The clinics of a run (and, in the new-class scenario, where the new class starts).

    Raises PartitionError / ScenarioError for a split or scenario the data cannot give;
    `qana-sim compare` calls it before its first experiment, so a bad --new-class or
    --new-class-clinic does not wait for the third."""
    partition = make_partition(
        dataset.labels, dataset.lesion_ids, dataset.centres,
        split=cfg.split, num_clinics=cfg.num_clinics, alpha=cfg.alpha,
        classes_per_clinic=cfg.classes_per_clinic, seed=cfg.seed, eval_fraction=cfg.eval_fraction,
    )
    if cfg.scenario != "new-class":
        return partition, None
    return apply_new_class(
        partition, dataset.labels, dataset.lesion_ids, dataset.class_names, cfg.new_class, cfg.new_class_round, cfg.new_class_clinic
    )


def run_experiment(
    cfg: SimConfig,
    *,
    cache_root: Path | None = None,
    echo: Echo = print,
    progress: bool = True,
    command: str = "",
) -> ExperimentResult:
    """Run everything and write the results under cfg.out; returns them (status says if it finished).

    Decoded images and backbone features are cached under `cache_root` (default: qana's cache,
    $QANA_CACHE_DIR or ~/.cache/qana). Ctrl-C is caught: whatever finished is written and the result's status is 'interrupted'.
    Errors in the data or settings raise (SourceError, PartitionError) before anything runs.
    """
    from tqdm import tqdm

    import qana.data

    cache_root = Path(cache_root) if cache_root is not None else qana.data.DEFAULT_CACHE_DIR
    out = Path(cfg.out).expanduser().resolve()
    run_dir, work = out / "run", out / "work"
    seconds: dict[str, float] = {}
    state = {"phase": "loading data"}
    t_start = time.perf_counter()

    check_out_folder(out)  # before the data loads: a folder the run may not use costs nothing
    with _phase(seconds, "loading data", state):
        source = load_source(cfg, cache_root, progress=progress)
    echo(f"Data: {source.description}")
    echo(f"Bundle: {source.bundle.path} (target {source.bundle.target}, {source.bundle.feature_dim} features)")
    ds = source.dataset
    partition, scenario = partition_for(cfg, ds)
    if scenario is not None:
        echo(f"Scenario: {partition.notes[-1]}")
    # Only now that the data, bundle and partition are known good does the earlier run's audit
    # log, signing key and plots make way, and they come back if this run is refused before it
    # has written its results (simulations.out_folder).
    with replacing_earlier_run(out):
        notes = list(partition.notes)
        if partition.moved_lesions:
            notes.append(f"{partition.moved_lesions} lesion(s) were moved to clinics that had too little data for a local train and test part")
        n = len(partition.clinics)
        method = "akida-edge learning, k-medoids merge" if cfg.learning == "akida-edge" else cfg.strategy
        per_round = "1 Akida learning pass" if cfg.learning == "akida-edge" else f"{cfg.local_epochs} local epochs"
        echo(f"Federation: {n} clinics ({cfg.split} split), {method}, {cfg.rounds} rounds x {per_round}; results in {out}")
        result = ExperimentResult(
            cfg=cfg, status="interrupted", data=source.description,
            bundle={"path": str(source.bundle.path), "id": source.bundle.bundle_id, "target": source.bundle.target,
                    "feature_dim": source.bundle.feature_dim, "input_shape": list(source.bundle.input_shape)},
            classes=tuple(ds.class_names), partition=partition_table(partition, source), partition_notes=notes,
            seconds=seconds, command=command,
        )
        federation_progress: Progress | None = None
        try:
            with _phase(seconds, "backbone features", state):
                with tqdm(total=len(ds), desc="backbone features", unit="img", disable=not progress, leave=False) as bar:
                    features, computed = source_features(source, cache_root, cfg.device, advance=bar.update)
                result.features_computed = computed
            echo(
                f"Backbone features: the backbone ran on {computed} image(s) now; the other {len(ds) - computed} "
                "came from the feature cache (or repeat an image's content)"
            )
            with _phase(seconds, "clinic folders", state):
                sites = build_clinics(source, partition, features, work, cache_root, cfg.eval_fraction, cfg.seed)
            target = source.bundle.target
            edge_config: dict[str, Any] = {}
            if cfg.learning == "akida-edge":  # simulations.edge_baselines: Akida on-chip learning instead of head training
                with _phase(seconds, "baselines", state):
                    params, choices = edge_baselines.federation_params(cfg, features, ds.labels, ds.lesion_ids, partition, result.classes)
                    echo(f"Edge settings (clinics' choices combined): {params.num_weights} weights, {params.neurons_per_class} neurons/class, competition {params.learning_competition}")
                    result.partition_notes.append(f"akida-edge settings {edge_baselines.run_config(params)}; each clinic's choice: {choices}")
                    edge_config = edge_baselines.run_config(params)
                    with tqdm(total=2 * cfg.rounds, desc="baselines (pooled, local-only)", unit="round", disable=not progress, leave=False) as bar:
                        result.pooled = edge_baselines.pooled(cfg, params, target, features, ds.labels, partition, result.classes, on_round=lambda _r: bar.update())
                        result.local_only = edge_baselines.local_only(cfg, params, target, features, ds.labels, partition, result.classes, on_round=lambda _r: bar.update())
            else:
                start = baselines.initial_head(cfg, source.bundle.load_head())
                with _phase(seconds, "baselines", state), _single_threaded_blas():
                    with tqdm(total=2 * cfg.rounds, desc="baselines (pooled, local-only)", unit="round", disable=not progress, leave=False) as bar:
                        result.pooled = baselines.pooled(cfg, start, target, features, ds.labels, partition, on_round=lambda _r: bar.update())
                        result.local_only = baselines.local_only(cfg, start, target, features, ds.labels, partition, on_round=lambda _r: bar.update())
            run_id = run_id_for(cfg)
            job = Job(
                run_id=run_id,
                node_configs=[
                    s.node_config(cfg, scenario.from_round if scenario and s.clinic_id == scenario.clinic_id else None) for s in sites
                ],
                run_config={**server_run_config(cfg, source, n, run_dir), **edge_config, **scenario_config(scenario, result.classes)},
                dropout=cfg.dropout,
                seed=cfg.seed,
                timings=str(run_dir / "timings.json"),
            )
            bars = _RoundBars(n, cfg.rounds, progress)

            def on_progress(p: Progress) -> None:
                nonlocal federation_progress
                federation_progress = p
                bars(p)

            with _phase(seconds, "federation (Flower simulation, incl. Ray start)", state):
                echo("Federation: starting Flower's simulation engine (Ray, 2 CPUs, 1 per ClientApp) with the deployment's ServerApp and ClientApp")
                try:
                    run = run_federation(job, run_dir, on_progress=on_progress)
                finally:
                    bars.done(federation_progress)
            with _phase(seconds, "results and report", state):
                result.federated = collect(run, str(run_id), target, features, ds.labels, partition, result.classes)
                if scenario is not None:
                    result.scenario = scenario_summary(
                        result.federated.heads, target, features, ds.labels, partition, result.classes, scenario
                    )
                if run.status == "finished":
                    result.status = "finished"
                elif run.status == "interrupted":
                    result.status, result.message = "interrupted", "interrupted (Ctrl-C) during the federation"
                else:
                    result.status, result.message = "failed", "the simulated federation failed"
        except KeyboardInterrupt:
            result.status, result.message = "interrupted", f"interrupted (Ctrl-C) during {state['phase']}"
        seconds["total"] = time.perf_counter() - t_start
        write_results(result, out)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return result
