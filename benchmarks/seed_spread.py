"""How much do the model card's figures move with the seed? Finished `qana train` runs side by side.

    python benchmarks/seed_spread.py runs/v2-main runs/v2-seed1 runs/v2-seed2

The seed chooses the lesion-grouped split *and* the training randomness, so runs that differ
only in `--seed` show how far one split's figures can be trusted: a gap between two models
smaller than this spread is not evidence. Reads what each run's bundle stage recorded
(`RUN/bundle.json`: validation and test metrics of the float, quantized and Akida models, and
of the Akida model with the clinical prior when every run has that; beside such runs, one that
tried the prior and has none in its bundle counts with its images-only figures, which is what
it scores) and
prints each run, whether its chip stays within the 1-point fidelity bar of its float model on
test (images only, and with the prior when recorded), then the mean and sample standard
deviation over runs. Warns when the runs differ in anything but the seed.

A shipped bundle directory (e.g. qana/bundles/v2) may stand in for its training run, whose
directory a new machine no longer has: its bundle.json records the same metrics and the
`qana train` command, whose settings (read by `qana train`'s own option parser) are compared with
those of the other runs' recorded commands instead of their options.
So may a folder holding only a run's `bundle.json` and `options.json` (`benchmarks/records/`: the
records of runs whose directories are gone). Two runs with the same seed, or with the same split
indices (a run directory's split.npz, a record's split-indices.sha256), are one split and are
refused, so no split counts twice in the spread.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qana.metrics import ACCURACY_BAR, FAITHFUL, FIDELITY_PAIRS, clears_bar, fidelity_line, mean_interval, reaches_bar  # noqa: E402  (no TensorFlow)
from record_run import RecordError, folder_split_fingerprint  # noqa: E402

MODELS = ("float", "quantized", "akida")
# Shown when every run recorded it (runs whose bundle stage ran with the clinical prior, qana.clinical).
OPTIONAL_MODELS = ("akida+prior",)
# bundle.json's names for the scores with the clinical prior -> the benchmarks' score names (qana.metrics.FIDELITY_PAIRS).
RECORDED_NAMES = {"akida_with_clinical_prior": "akida+prior", "float_with_clinical_prior": "float+prior"}
METRICS = ("top1", "macro_f1", "balanced_accuracy")
# Settings that steer how a run was carried out, not its recipe (a run reusing another's split
# names that run in reuse_from).
IGNORED_OPTIONS = {"seed", "run_dir", "bundle_out", "command", "resume", "cache_dir", "data", "reuse_from", "reuse_through", "stop_after"}


def load_run(run: Path) -> tuple[dict, dict]:
    """(options, recorded metrics under the benchmarks' score names) of a run whose bundle stage has
    finished, or of a shipped bundle (options then hold only its recorded seed and command); exits
    with a clear message otherwise."""
    options, metrics = _recorded(run)
    return options, {part: {RECORDED_NAMES.get(name, name): m for name, m in scores.items()} for part, scores in metrics.items()}


def tried_the_prior(options: dict) -> bool:
    """Whether a run was trained to fit the clinical prior (`--clinical-prior auto`), whatever came
    of it; runs recorded before the prior existed (no such setting) count as not."""
    if options.get("shipped_bundle"):
        return command_option(options.get("command", ""), "--clinical-prior") in (None, "auto")  # auto is the default
    return options.get("clinical_prior") == "auto"


def command_option(command: str, flag: str) -> str | None:
    """The value `flag` has in a recorded command, spelt `--flag VALUE` or `--flag=VALUE` (the
    last one given wins, as on the command line); None when the command leaves it out."""
    words, value = shlex.split(command), None
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(flag + "="):
            value = word[len(flag) + 1:]
    return value


def count_runs_without_a_prior(runs: list[tuple[Path, dict, dict]]) -> None:
    """Beside runs whose bundles have the clinical prior, a run that tried it and ended without one
    (validation gave it weight 0, or it could not be fitted) scores with the chip alone, which is
    what `qana evaluate` scores for it: its images-only figures count as its "+ prior" ones.
    Without this, one such run dropped the prior column of every run beside it."""
    if not any("akida+prior" in metrics["test"] for _, _, metrics in runs):
        return
    for run, options, metrics in runs:
        if "akida+prior" not in metrics["test"] and tried_the_prior(options):
            print(f"note: {run.name} has no clinical prior in its bundle (validation gave it weight 0, or it could not be "
                  "fitted): its images-only figures, what it scores, count as its + prior ones")
            for scores in metrics.values():
                scores["akida+prior"], scores["float+prior"] = scores["akida"], scores["float"]


def _recorded(run: Path) -> tuple[dict, dict]:
    """(options, metrics as bundle.json records them) of a finished run or a shipped bundle."""
    bundle, options = run / "bundle.json", run / "options.json"
    if not bundle.is_file():
        sys.exit(f"error: {bundle} not found: {run} is neither a `qana train` run whose bundle stage has finished nor a bundle")
    recorded = _json_object(bundle, "a bundle record")
    if options.is_file():
        settings = _json_object(options, "a run's settings")
    else:
        training = recorded.get("training", {})
        if "command" not in training:
            sys.exit(f"error: {options} not found and {bundle} records no training command: cannot tell {run}'s recipe")
        settings = {"seed": training.get("seed", "?"), "command": training["command"], "shipped_bundle": True}
    metrics = recorded.get("metrics")
    for part in ("val", "test"):
        scores = metrics.get(part) if isinstance(metrics, dict) else None
        missing = [m for m in MODELS if not isinstance(scores, dict) or m not in scores]
        if missing:
            sys.exit(f"error: {bundle} records no {part} metrics of {', '.join(missing)}: not the bundle stage's record of a finished run")
    return settings, metrics


def _json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`; exits naming the file when it is damaged or holds something else
    (a cut-off write), as a record must never end the comparison with a traceback."""
    try:
        recorded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        sys.exit(f"error: {path} is not valid JSON ({exc})")
    if not isinstance(recorded, dict):
        sys.exit(f"error: {path} is not {what} (expected a JSON object)")
    return recorded


def recipe_command(command: str) -> list[str]:
    """A `qana train` command without the settings that IGNORED_OPTIONS lets differ (and their values)."""
    ignored = {"--" + name.replace("_", "-") for name in IGNORED_OPTIONS} | {"--no-resume"}
    words, kept = shlex.split(command), []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word.split("=", 1)[0] in ignored:
            skip = "=" not in word and word not in ("--resume", "--no-resume")
        else:
            kept.append(word)
    return kept


def command_settings(command: str) -> dict[str, object] | None:
    """The recipe settings a recorded `qana train` command gives, read by `qana train`'s own option
    parser (qana.cli, no TensorFlow), so that the order of the flags, `--flag=value` and a default
    spelt out make no difference; a setting left out reads as the parser's default (None where
    `qana train` fills it in later). None when that parser does not read the command (another
    program, an option since removed, unbalanced quotes)."""
    import click
    import typer

    from qana.cli import app

    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if words[:2] != ["qana", "train"]:
        return None
    train = typer.main.get_command(app).commands["train"]
    try:
        params = train.make_context("train", words[2:]).params
    except (click.ClickException, click.exceptions.Exit):
        return None
    ignored = IGNORED_OPTIONS | {"fresh"}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in params.items() if name not in ignored}


def command_differences(first: str, other: str) -> list[str]:
    """Recipe settings in which two recorded `qana train` commands differ, as `command --flag`.
    A setting one command leaves out (None) counts as the value a new run takes for it; when
    either command cannot be parsed, they are compared as text, and the difference says so."""
    settings = command_settings(first), command_settings(other)
    if settings[0] is None or settings[1] is None:
        words = " ".join(recipe_command(first)), " ".join(recipe_command(other))
        return [] if words[0] == words[1] else [f"command (compared as text, not read as `qana train` options: {words[0]!r} vs {words[1]!r})"]
    a, b = settings
    differs = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if any(a.get(k) is None or b.get(k) is None for k in differs):
        from qana.run_record import default_settings  # only when one command spells out what the other leaves out

        defaults = default_settings()
        a, b = ({k: defaults.get(k) if v is None else v for k, v in s.items()} for s in (a, b))
        differs = [k for k in differs if a.get(k) != b.get(k)]
    return [f"command --{k.replace('_', '-')}" for k in differs]


def differences(first: dict, other: dict) -> list[str]:
    """Settings in which two runs differ beyond the seed: option names, or the settings their
    recorded commands give when either is a shipped bundle (which records no options.json)."""
    if first.get("shipped_bundle") or other.get("shipped_bundle"):
        return command_differences(first.get("command", ""), other.get("command", ""))
    return sorted(k for k in set(first) | set(other) if k not in IGNORED_OPTIONS and first.get(k) != other.get(k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished `qana train` run directories (same command, other --seed), or shipped bundles")
    args = parser.parse_args()

    runs = [(run, *load_run(run)) for run in args.runs]
    check_one_run_per_split(runs)
    count_runs_without_a_prior(runs)
    warn_on_other_recipes(runs)

    models = MODELS + tuple(m for m in OPTIONAL_MODELS if all(m in metrics["test"] for _, _, metrics in runs))
    header = f"{'run':<22} {'seed':>4} {'part':<5} " + " ".join(f"{m + ' top-1/mF1/bal':>26}" for m in models)
    print(header)
    values: dict[tuple[str, str, str], list[float]] = {}
    for run, options, metrics in runs:
        for part in ("val", "test"):
            cells = []
            for model in models:
                m = metrics[part][model]
                cells.append(f"{'/'.join(f'{m[k]:.3f}' for k in METRICS):>26}")
                for k in METRICS:
                    values.setdefault((part, model, k), []).append(float(m[k]))
            print(f"{run.name:<22} {options.get('seed', '?'):>4} {part:<5} " + " ".join(cells))
    print_fidelity(runs)
    if len(runs) < 2:
        return
    print(f"\nmean ± sample sd over {len(runs)} runs")
    for part in ("val", "test"):
        cells = []
        for model in models:
            parts = [values[(part, model, k)] for k in METRICS]
            cells.append(f"{'/'.join(f'{statistics.mean(v):.3f}±{statistics.stdev(v):.3f}' for v in parts):>38}")
        print(f"{part:<5} " + "  ".join(f"{model}: {cell}" for model, cell in zip(models, cells, strict=True)))
    shipped = models[-1]  # Akida with the clinical prior when every run recorded it: what `qana evaluate` scores
    print(f"\nrecipe: {shipped} on test, mean over {len(runs)} runs [95 % t-interval, {len(runs) - 1} degrees of freedom]")
    for k, bar in ACCURACY_BAR.items():
        mean, low, high = mean_interval(values[("test", shipped, k)])
        print(f"{k:<9} {mean:.3f} [{low:.3f}, {high:.3f}]  (issue's bar for v2: {bar:.2f})")
    # The mean says where the recipe stands; this says how often one model trained by it passes on
    # its own held-out lesions, which is what an independent evaluation of one shipped model asks.
    test = {k: values[("test", shipped, k)] for k in ACCURACY_BAR}
    each = ", ".join(f"{k} on {int(reached.sum())}" for k, reached in reaches_bar(test).items())
    print(f"runs whose test part reaches the bar: {each}, both on {int(clears_bar(test).sum())} of {len(runs)}")


def split_of(run: Path) -> str | None:
    """The fingerprint of `run`'s split (record_run.folder_split_fingerprint: a record's
    split-indices.sha256 or a run directory's split.npz), None for a shipped bundle; exits
    naming a damaged file."""
    try:
        return folder_split_fingerprint(run)
    except RecordError as exc:
        sys.exit(f"error: {exc}")


def warn_on_other_recipes(runs: list[tuple[Path, dict, dict]]) -> None:
    """A warning for each run whose settings differ from the first run's in more than the seed:
    a spread over such runs mixes recipes. Printed, not refused: a reader may mean to mix them."""
    first = runs[0][1]
    for run, options, _ in runs[1:]:
        differs = differences(first, options)
        if differs:
            print(f"warning: {run} differs from {runs[0][0]} in more than the seed: {', '.join(differs)}")


def check_one_run_per_split(runs: list[tuple[Path, dict, dict]]) -> None:
    """Exit when two runs are one split, so that none counts twice in the sd and t-interval:
    the same seed (the seed chooses the split: e.g. a shipped bundle and its own run dir), or the
    same split indices whatever the seeds (a run made with `--reuse-from` another seed's run
    keeps that run's split: `qana train` does not compare seeds for a reused split)."""
    seen: dict[object, Path] = {}
    splits: dict[str, tuple[Path, object]] = {}
    for run, options, _ in runs:
        seed = options.get("seed", "?")
        if seed != "?" and seed in seen:
            sys.exit(f"error: {seen[seed]} and {run} both have seed {seed}, i.e. the same split: give each split once")
        seen[seed] = run
        split = split_of(run)
        if split is None:
            continue
        if split in splits:
            other, other_seed = splits[split]
            sys.exit(f"error: {other} and {run} hold the same split (the same split indices, though seeds {other_seed} "
                     f"and {seed}; e.g. one reused the other's split): give each split once")
        splits[split] = (run, seed)


def print_fidelity(runs: list[tuple[Path, dict, dict]]) -> None:
    """Akida minus float on each run's test part, and whether the chip falls more than the
    1-point bar (qana.metrics.FAITHFUL) below float: a recipe is only as faithful as its worst split."""
    print(f"\nAkida minus float on test, points of top-1 / macro-F1 (bar: not more than {FAITHFUL * 100:.0f} below)")
    for run, _, metrics in runs:
        cells = []
        for chip, reference, label in FIDELITY_PAIRS:
            if chip not in metrics["test"] or reference not in metrics["test"]:
                continue
            cells.append(fidelity_line(metrics["test"][reference], metrics["test"][chip], label))
        print(f"{run.name:<22} " + "; ".join(cells))


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
