"""benchmarks/feature_saturation.py: bad input is one `error:` line and exit status 2."""

import subprocess
import sys
from pathlib import Path

from qana.cli_errors import EXIT_ERROR

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "feature_saturation.py"


def test_a_missing_or_unstarted_run_is_one_error_line(tmp_path: Path) -> None:
    """The script did not go through script_main: qana.train's RunRecordError ended in a traceback, status 1."""
    (tmp_path / "empty").mkdir()
    for run in (tmp_path / "none", tmp_path / "empty"):
        done = subprocess.run([sys.executable, str(SCRIPT), str(run), "--data", str(tmp_path)], capture_output=True, text=True, timeout=180)
        assert done.returncode == EXIT_ERROR and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1] == f"error: {run}: no options.json (not a `qana train` run directory, or it never started)"
