"""A clinic never needs TensorFlow, each side's install has everything its code imports, and
lower layers never import higher ones."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ORDER = {"qana": 0, "protocols": 1, "client": 2, "server": 2, "simulations": 3}
PROJECT_PACKAGES = frozenset(ORDER)
TRAINING_STACK = frozenset({"tensorflow", "tf_keras", "keras", "quantizeml", "cnn2snn"})


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
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(TRAINING_STACK)!r}); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{modules} pulled in: {result.stdout.strip()} {result.stderr[-500:]}"


# What each side runs, and the install the README gives it: a clinic `pip install -e .` (its
# commands and the ClientApp Flower starts in a child process), the coordinator `-e ".[server]"`.
CLIENT_ENTRY_POINTS = ("client.cli", "client.app")
INSTALLS = {
    "clinic": (CLIENT_ENTRY_POINTS, ()),
    "coordinator": (("server.cli", "server.app"), ("server",)),
}


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


def _module_name(path: Path) -> str:
    """`client/clinic.py` -> `client.clinic`, `qana/__init__.py` -> `qana`."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module `path` imports anywhere, functions included (lazy imports count: the
    program reaches them too), with relative imports resolved against `module`."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
    return names


def third_party_imports(entry_points: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in the import closure of `entry_points`
    (project modules are followed, the standard library left out), each with the names imported."""
    found: dict[str, set[str]] = {}
    seen: set[Path] = set()
    todo = list(entry_points)
    while todo:
        name = todo.pop()
        top = name.split(".")[0]
        if top in PROJECT_PACKAGES:
            path = _module_file(name)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(_imported_names(path, _module_name(path)))
        elif top and top not in sys.stdlib_module_names:
            found.setdefault(top, set()).add(name)
    return found


def installed_distributions(extras: tuple[str, ...]) -> set[str]:
    """Distributions `pip install -e ".[extras]"` brings: qana-fl's requirements for those
    extras, and theirs with the extras they ask for, recursively."""
    wanted: set[str] = set()
    todo = [("qana-fl", frozenset(extras))]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        dist, dist_extras = todo.pop()
        if (dist, dist_extras) in done:
            continue
        done.add((dist, dist_extras))
        try:
            requirements = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:  # a dependency for another platform
            continue
        for text in requirements:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *dist_extras)):
                continue
            name = canonicalize_name(req.name)
            wanted.add(name)
            todo.append((name, frozenset(req.extras)))
    return wanted


@pytest.mark.parametrize("side", sorted(INSTALLS))
def test_each_install_has_every_module_its_code_imports(side: str) -> None:
    """The README's install for each side is all that side has: a module its code imports that
    only another extra brings (matplotlib, ray, psycopg2, TensorFlow ...) passes every other
    test here, in CI's full install, and fails on the clinic's or coordinator's machine."""
    entry_points, extras = INSTALLS[side]
    installed = installed_distributions(extras)
    distributions = metadata.packages_distributions()
    missing = []
    for top, names in sorted(third_party_imports(entry_points).items()):
        dists = {canonicalize_name(d) for d in distributions.get(top, [])}
        if not dists & installed:
            missing.append(f"{top} ({', '.join(sorted(dists)) or 'not installed'}; {', '.join(sorted(names))})")
    assert not missing, f"the {side}'s code imports modules its install lacks: {missing}"


def test_the_import_closures_are_walked() -> None:
    """The walk reaches modules each side is known to use (akida, imblearn and cryptography only
    inside functions), else the test above would pass by checking nothing."""
    client = third_party_imports(CLIENT_ENTRY_POINTS)
    assert {"akida", "flwr", "numpy", "imblearn", "PIL", "typer", "cryptography"} <= set(client), sorted(client)
    coordinator = third_party_imports(INSTALLS["coordinator"][0])
    assert {"sqlalchemy", "alembic", "tomli_w", "flwr"} <= set(coordinator), sorted(coordinator)
    server = installed_distributions(("server",))
    assert "psycopg2-binary" in server and "ray" not in server


@pytest.mark.parametrize("side", sorted(INSTALLS))
def test_no_code_path_imports_the_training_stack_even_lazily(side: str) -> None:
    """The import-time check above misses an `import tensorflow` inside a function called later;
    neither side's closure may name the training stack at all."""
    found = third_party_imports(INSTALLS[side][0])
    assert not TRAINING_STACK & set(found), {name: sorted(found[name]) for name in TRAINING_STACK & set(found)}


@pytest.mark.parametrize("package", sorted(ORDER))
def test_lower_layers_never_import_higher_ones(package: str) -> None:
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        for name in {n.split(".")[0] for n in _imported_names(path, _module_name(path))} & PROJECT_PACKAGES:
            higher = ORDER[name] > ORDER[package]
            sideways = ORDER[name] == ORDER[package] and name != package
            if higher or sideways:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders
