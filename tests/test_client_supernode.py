"""`qana-client start` runs Flower's SuperNode as a child process and must end when it ends."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from client.cli import _alive, run_supernode

# A stand-in SuperNode: it starts a helper that inherits its output and retries for ever (as
# Flower's SuperExec does), prints an error and exits with status 1.
FAKE_SUPERNODE = textwrap.dedent(
    """
    import subprocess, sys, time
    helper = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True:\\n print('retrying', flush=True)\\n time.sleep(0.2)"])
    open(sys.argv[1], "w").write(str(helper.pid))
    time.sleep(1.0)
    print("Exit Code: 600 cannot be parsed", flush=True)
    sys.exit(1)
    """
)


@pytest.mark.timeout(60)
def test_start_ends_when_the_supernode_exits_although_its_helper_keeps_the_output_open(tmp_path: Path, capfdbinary) -> None:
    pid_file = tmp_path / "helper.pid"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        code = run_supernode([sys.executable, "-c", FAKE_SUPERNODE, str(pid_file)], dict(os.environ))
    finally:
        for sig, handler in handlers.items():  # run_supernode forwards Ctrl-C to its child; give pytest its own back
            signal.signal(sig, handler)
    assert code == 1
    assert time.monotonic() - started < 30  # it used to wait for ever on the helper's open pipe
    helper = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(helper)
    assert b"Exit Code: 600" in capfdbinary.readouterr().out
