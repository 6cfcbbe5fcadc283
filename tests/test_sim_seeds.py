"""benchmarks/sim_seeds.py: mean ± sd of qana-sim runs' rounds.csv, per method and round."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

HEADER = "round,method,top1,macro_f1,balanced_accuracy,n_test\n"


def _run(folder: Path, federated: tuple[float, float], pooled: float) -> Path:
    folder.mkdir()
    rows = [HEADER]
    for r, value in enumerate(federated, start=1):
        rows.append(f"{r},federated,0.5,0.4,{value},124\n")
        rows.append(f"{r},pooled,0.5,0.4,{pooled},124\n")
        rows.append(f"{r},local_only,0.5,0.4,0.3,124\n")
    (folder / "rounds.csv").write_text("".join(rows))
    return folder


def test_mean_sd_and_falling_curves(tmp_path, capsys) -> None:
    sim_seeds = load_benchmark("sim_seeds")
    a = _run(tmp_path / "a", (0.6, 0.4), 0.5)
    b = _run(tmp_path / "b", (0.4, 0.6), 0.7)
    sim_seeds.main([str(a), str(b), "--rounds", "1", "2"])
    out = capsys.readouterr().out
    assert "federated   round 1 0.500 ± 0.141   round 2 0.500 ± 0.141   (round 2 below round 1 in 1 of 2)" in out
    assert "pooled      round 1 0.600 ± 0.141" in out


def test_a_folder_without_rounds_or_with_a_missing_round_is_named(tmp_path) -> None:
    sim_seeds = load_benchmark("sim_seeds")
    a = _run(tmp_path / "a", (0.6, 0.4), 0.5)
    with pytest.raises(SystemExit, match="error: .*no rounds.csv"):
        sim_seeds.main([str(a), str(tmp_path)])
    with pytest.raises(SystemExit, match="round 3 of federated is missing"):
        sim_seeds.main([str(a), "--rounds", "1", "3"])
