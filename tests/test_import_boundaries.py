"""A clinic never needs TensorFlow, its install has everything its code imports, and lower
layers never import higher ones."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

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


# What `qana-client` runs: its commands and the ClientApp that Flower starts in a child process.
CLIENT_ENTRY_POINTS = ("client.cli", "client.app")
PROJECT_PACKAGES = frozenset(ORDER)


def _module_file(name: str) -> Path | None:
    """The repository file of a project module (`qana.head` or `qana.head.Head`'s module), or None."""
    parts = name.split(".")
    while parts:
        path = ROOT.joinpath(*parts)
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
        parts = parts[:-1]
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module `path` imports anywhere, functions included (lazy imports count: a clinic
    reaches them too), with relative imports resolved against `module`."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def client_third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in the client's import closure, each with
    the project modules that import it."""
    found: dict[str, set[str]] = {}
    seen: set[Path] = set()
    todo = list(CLIENT_ENTRY_POINTS)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name.split(".")[0] in PROJECT_PACKAGES:
            if path is None or path in seen:
                continue
            seen.add(path)
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            todo.extend(_imported_names(path, module))
            continue
        top = name.split(".")[0]
        if top and top not in sys.stdlib_module_names:
            found.setdefault(top, set()).add(name)
    return found


def base_install_distributions() -> set[str]:
    """Distributions a clinic's `pip install -e .` brings: qana-fl's requirements without extras,
    and theirs, recursively (names normalised as pip does)."""
    def norm(name: str) -> str:
        return name.lower().replace("_", "-").replace(".", "-")

    wanted, todo = set(), ["qana-fl"]
    while todo:
        dist = todo.pop()
        try:
            requirements = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:  # a dependency for another platform
            continue
        for text in requirements:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = norm(req.name)
            if name not in wanted:
                wanted.add(name)
                todo.append(name)
    return wanted


def test_clinic_install_has_every_module_the_client_imports() -> None:
    """`pip install -e .` (no extras) is the whole clinic install (README): a module the client
    path imports that only an extra brings (matplotlib, sqlalchemy, ray, ...) would pass every
    other test here, in CI's full install, and crash at the clinic."""
    base = base_install_distributions()
    distributions = metadata.packages_distributions()
    missing = []
    for top, importers in sorted(client_third_party_imports().items()):
        dists = {d.lower().replace("_", "-").replace(".", "-") for d in distributions.get(top, [])}
        if not dists & base:
            missing.append(f"{top} ({', '.join(sorted(dists)) or 'not installed'}; via {', '.join(sorted(importers))})")
    assert not missing, f"the client imports modules a clinic's install lacks: {missing}"


def test_the_client_closure_is_walked() -> None:
    """The walk reaches the modules the client is known to use, some only imported inside
    functions (else the test above would pass by checking nothing)."""
    found = client_third_party_imports()
    assert {"akida", "flwr", "numpy", "imblearn", "PIL", "typer", "cryptography"} <= set(found), sorted(found)


def test_no_client_code_path_imports_tensorflow_even_lazily() -> None:
    """The import-time check above misses an `import tensorflow` inside a function the client
    calls later; the whole closure must not name the training stack at all."""
    training_stack = {"tensorflow", "tf_keras", "keras", "quantizeml", "cnn2snn"}
    found = client_third_party_imports()
    assert not training_stack & set(found), {name: sorted(found[name]) for name in training_stack & set(found)}


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
