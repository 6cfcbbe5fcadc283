"""A clinic never needs TensorFlow, and lower layers never import higher ones."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = {"qana": 0, "protocols": 1, "client": 2, "server": 2, "simulations": 3}


@pytest.mark.parametrize(
    "modules",
    [
        "qana.data, qana.splits, qana.head, qana.bundle, qana.runtime, qana.metrics, qana.imbalance",
        "client.app, client.cli",
    ],
)
def test_client_path_never_imports_tensorflow(modules: str) -> None:
    code = (
        f"import sys; import {modules}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', 'quantizeml', 'cnn2snn')); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{modules} pulled in: {result.stdout.strip()} {result.stderr[-500:]}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ORDER))
def test_lower_layers_never_import_higher_ones(package: str) -> None:
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        for name in _imports(path) & set(ORDER):
            higher = ORDER[name] > ORDER[package]
            sideways = ORDER[name] == ORDER[package] and name != package
            if higher or sideways:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders
