"""benchmarks/simulation.py: what its docstring promises is what its table reports."""

from benchmark_scripts import load_benchmark


def test_the_docstring_names_the_median_round_the_table_reports() -> None:
    """The docstring said "the mean of rounds 1..R"; the code and the README table report the median."""
    simulation = load_benchmark("simulation")
    assert "the median of rounds 1..R" in simulation.__doc__ and "mean of rounds" not in simulation.__doc__
    assert "median round 1..R (s)" in simulation.table([])
