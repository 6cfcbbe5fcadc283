"""benchmarks/judge_rule.py: the three criteria of the project's pre-written rule, on synthetic run records."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "judge_rule.py"


def _run(root: Path, name: str, seed: int, val: tuple[float, float], chip_loss: float = 0.0, prior_loss: float = 0.0,
         mixup: float = 0.0, prior: bool = True, extra: dict | None = None) -> Path:
    """A finished run's record: validation Akida + prior = `val` (top-1, macro-F1); on test the
    chip loses `chip_loss` of macro-F1 against float images only and `prior_loss` with the prior."""
    run = root / name
    run.mkdir()
    (run / "options.json").write_text(json.dumps({"seed": seed, "mixup": mixup, "clinical_prior": "auto", "run_dir": str(run), **(extra or {})}))

    def m(top1: float, mf1: float) -> dict:
        return {"top1": top1, "macro_f1": mf1, "balanced_accuracy": mf1}

    test = {"float": m(0.80, 0.60), "quantized": m(0.80, 0.60), "akida": m(0.80, 0.60 - chip_loss)}
    valid = {"float": m(*val), "quantized": m(*val), "akida": m(*val)}
    if prior:
        test |= {"float_with_clinical_prior": m(0.81, 0.62), "akida_with_clinical_prior": m(0.81, 0.62 - prior_loss)}
        valid |= {"float_with_clinical_prior": m(*val), "akida_with_clinical_prior": m(*val)}
    (run / "bundle.json").write_text(json.dumps({"metrics": {"val": valid, "test": test}}))
    return run


def _judge(baseline: list[Path], variant: list[Path]) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), "--baseline", *map(str, baseline), "--variant", *map(str, variant)]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=60)


def _arms(tmp_path: Path, variant_val: tuple[float, float], variant_losses=((0.0, 0.0), (0.0, 0.0)), baseline_losses=((0.0, 0.0), (0.0, 0.0))):
    base = [_run(tmp_path, f"base{s}", s, (0.80, 0.60), *baseline_losses[i]) for i, s in enumerate((1, 2))]
    var = [_run(tmp_path, f"var{s}", s, variant_val, *variant_losses[i], mixup=0.2) for i, s in enumerate((1, 2))]
    return base, var


def test_a_variant_better_on_validation_and_as_faithful_passes(tmp_path: Path) -> None:
    done = _judge(*_arms(tmp_path, (0.806, 0.606)))
    assert done.returncode == 0, done.stderr
    assert "RULE PASSES" in done.stdout, done.stdout
    assert "variant differs from the baseline in: mixup" in done.stdout
    assert "0.810" not in done.stdout and "0.620" not in done.stdout  # the test accuracies are not shown


def test_each_criterion_alone_fails_the_rule(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    small = _judge(*_arms(tmp_path / "a", (0.804, 0.605)))  # +0.009 in all: under the margin
    assert "FAIL  (a)" in small.stdout and "pass  (b)" in small.stdout and "RULE FAILS" in small.stdout, small.stdout
    traded = _judge(*_arms(tmp_path / "b", (0.799, 0.630)))  # +0.029 in all, but top-1 lower
    assert "pass  (a)" in traded.stdout and "FAIL  (b)" in traded.stdout and "RULE FAILS" in traded.stdout, traded.stdout
    # one split loses 1.5 points of macro-F1 with the prior only: counted there and on "both"
    lossy = _judge(*_arms(tmp_path / "c", (0.810, 0.610), variant_losses=((0.0, 0.015), (0.005, 0.0))))
    assert "FAIL  (c)" in lossy.stdout and "with the prior variant 1 vs baseline 2" in lossy.stdout, lossy.stdout
    assert "images only variant 2 vs baseline 2" in lossy.stdout and "both variant 1 vs baseline 2" in lossy.stdout
    assert "RULE FAILS" in lossy.stdout


def test_fidelity_is_compared_with_the_baselines_own_count(tmp_path: Path) -> None:
    """A split outside the bar in both arms does not fail the variant."""
    done = _judge(*_arms(tmp_path, (0.810, 0.610), variant_losses=((0.02, 0.0), (0.0, 0.0)), baseline_losses=((0.02, 0.0), (0.0, 0.0))))
    assert "pass  (c)" in done.stdout and "images only variant 1 vs baseline 1" in done.stdout, done.stdout
    assert "RULE PASSES" in done.stdout


def test_a_run_whose_prior_got_weight_zero_counts_with_its_images_only_figures(tmp_path: Path) -> None:
    base, var = _arms(tmp_path, (0.810, 0.610))
    var.append(_run(tmp_path, "var3", 3, (0.81, 0.61), chip_loss=0.02, mixup=0.2, prior=False))
    base.append(_run(tmp_path, "base3", 3, (0.80, 0.60)))
    done = _judge(base, var)
    assert done.returncode == 0, done.stderr
    assert "note: var3 has no clinical prior" in done.stdout
    assert "with the prior variant 2 vs baseline 3" in done.stdout, done.stdout  # its images-only loss counts there too


def test_arms_on_other_splits_or_mixed_recipes_are_refused(tmp_path: Path) -> None:
    base, var = _arms(tmp_path, (0.81, 0.61))
    other = _run(tmp_path, "var9", 9, (0.81, 0.61), mixup=0.2)
    done = _judge(base, [var[0], other])
    assert done.returncode != 0 and "not on the same splits" in done.stderr, done.stderr
    mixed = _run(tmp_path, "var2b", 2, (0.81, 0.61), mixup=0.4)
    done = _judge(base, [var[0], mixed])
    assert done.returncode != 0 and "differs from" in done.stderr and "mixup" in done.stderr
    # a setting a run predates counts as its default: full mixup (recorded before --mixup-epochs
    # existed) and mixup for 30 epochs are two recipes
    scheduled = _run(tmp_path, "var2d", 2, (0.81, 0.61), mixup=0.2, extra={"mixup_epochs": 30})
    done = _judge(base, [var[0], scheduled])
    assert done.returncode != 0 and "mixup_epochs" in done.stderr, done.stderr
    # the same seed with another validation fraction is another split
    other_split = [_run(tmp_path, f"var{s}e", s, (0.81, 0.61), mixup=0.2, extra={"val_fraction": 0.1}) for s in (1, 2)]
    done = _judge(base, other_split)
    assert done.returncode != 0 and "other split settings (val_fraction)" in done.stderr, done.stderr
    # where both records carry the split's fingerprint, it must agree
    for run, digest in ((base[1], "a" * 64), (var[1], "b" * 64)):
        (run / "split-indices.sha256").write_text(digest + "  indices\n")
    done = _judge(base, var)
    assert done.returncode != 0 and "other splits (their split indices differ)" in done.stderr, done.stderr
    done = _judge(base, [var[0], var[0]])
    assert done.returncode != 0 and "same split" in done.stderr
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    done = _judge(base, [var[0], unfinished])
    assert done.returncode != 0 and "bundle.json not found" in done.stderr


def test_runs_that_reused_their_baselines_split_are_one_recipe(tmp_path: Path) -> None:
    """Each variant run names its own baseline in reuse_from: how it was made, not what."""
    base, _ = _arms(tmp_path, (0.81, 0.61))
    var = [_run(tmp_path, f"reused{s}", s, (0.81, 0.61), mixup=0.2,
                extra={"reuse_from": f"runs/base{s}", "reuse_through": "split"}) for s in (1, 2)]
    done = _judge(base, var)
    assert done.returncode == 0 and "RULE PASSES" in done.stdout, done.stderr
    assert "variant differs from the baseline in: mixup" in done.stdout, done.stdout


def test_a_prior_with_weight_zero_is_filled_in_across_both_arms(tmp_path: Path) -> None:
    """A one-run variant arm whose prior got weight 0 is judged on its images-only figures."""
    base = [_run(tmp_path, "base1", 1, (0.80, 0.60))]
    var = [_run(tmp_path, "var1", 1, (0.81, 0.61), mixup=0.2, prior=False)]
    done = _judge(base, var)
    assert done.returncode == 0 and "note: var1 has no clinical prior" in done.stdout, done.stderr


def _split(run: Path, test: list[int]) -> None:
    """A run directory's split.npz (no split-indices.sha256: only records have that)."""
    np.savez(run / "split.npz", train=np.array([0, 1, 2]), val=np.array([3]), test=np.array(test), image_ids=np.arange(9).astype(str))


def test_run_directories_of_one_seed_on_other_splits_are_refused(tmp_path: Path) -> None:
    """e.g. the variant of seed 1 made with --reuse-from seed 2's run: its split.npz is seed 2's.
    Run directories used to be paired by seed alone (only records' fingerprints were compared)."""
    base, var = _arms(tmp_path, (0.81, 0.61))
    for run, test in ((base[0], [4]), (base[1], [5]), (var[0], [4]), (var[1], [5])):
        _split(run, test)
    done = _judge(base, var)
    assert done.returncode == 0 and "RULE PASSES" in done.stdout, done.stderr  # the same splits
    _split(var[0], [6])
    done = _judge(base, var)
    assert done.returncode == 2 and f"{base[0]} and {var[0]} have the same seed but other splits" in done.stderr, done.stderr
    _split(var[0], [5])  # seed 2's split under seed 1: one split twice in the arm
    done = _judge(base, var)
    assert done.returncode == 2 and f"{var[0]} and {var[1]} hold the same split" in done.stderr, done.stderr
    _split(var[0], [4])
    # a run directory beside its own record: the split.npz and the fingerprint are compared
    record = tmp_path / "record1"
    record.mkdir()
    for name in ("options.json", "bundle.json"):
        (record / name).write_bytes((base[0] / name).read_bytes())
    (record / "split-indices.sha256").write_text("0" * 64 + "  indices\n")
    done = _judge([record, base[1]], var)
    assert done.returncode == 2 and "other splits (their split indices differ)" in done.stderr, done.stderr
