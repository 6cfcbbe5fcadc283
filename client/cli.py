"""``qana-client``: a clinic joins a federation by running a Flower SuperNode with the QANA ClientApp.

`start` checks everything it can locally first (data folder readable, CA certificate and
auth key parse, Akida device choice), says which Akida device will be used, then runs
`flower-supernode` with the clinic's settings as node config. The SuperNode starts the QANA
ClientApp (`client.app`, this installed package) for each message the coordinator sends.
Mistakes print one ``error: ...`` line and exit with status 2.

Nothing on this path imports TensorFlow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

import client
from qana.cli_errors import fail, reported_errors
from qana.imbalance import SEED_LIMIT

REPO_ROOT = Path(client.__file__).resolve().parents[1]

app = typer.Typer(
    pretty_exceptions_show_locals=False,  # a bug's traceback must not print clinic data or keys
    name="qana-client",
    no_args_is_help=True,
    help="QANA-FL clinic: join a federation; only the trained projection head ever leaves this machine.",
)


@contextmanager
def _reported_errors() -> Iterator[None]:
    from client.clinic import ClinicError
    from protocols.auth import AuthError
    from qana.data import DataError

    with reported_errors(AuthError, ClinicError, DataError):
        yield


def _toml_string(value: str) -> str:
    """A TOML string Flower's `--node-config` parser accepts.

    Flower splits the option with a regex that takes a quoted value up to the next quote of
    the same kind, so a basic string ("...", JSON escaping is valid TOML) works unless the
    value holds a double quote; then a literal string ('...', no escapes) is used.
    """
    from client.clinic import ClinicError

    if '"' not in value:
        return json.dumps(value, ensure_ascii=False)
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    raise ClinicError(f"cannot pass {value!r} to the SuperNode: it contains both kinds of quotes")


def node_config_string(config: dict[str, Any]) -> str:
    """`--node-config` for flower-supernode: space-separated key=value with TOML values."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={_toml_string(str(value))}")
    return " ".join(parts)


def supernode_command(
    server: str,
    node_config: dict[str, Any],
    root_certificates: Path | None,
    auth_key: Path | None,
    insecure: bool,
    runtime_port: int,
) -> list[str]:
    """The flower-supernode command line (flags as in `flower-supernode --help` of flwr 1.41)."""
    exe = Path(sys.executable).parent / "flower-supernode"
    cmd = [str(exe) if exe.exists() else (shutil.which("flower-supernode") or "flower-supernode")]
    cmd += ["--superlink", server, "--node-config", node_config_string(node_config)]
    cmd += ["--host", "127.0.0.1", "--port", str(runtime_port)]
    if insecure:
        cmd.append("--insecure")
    elif root_certificates is not None:
        cmd += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


@app.command("start")
def start(
    server: Annotated[str, typer.Option("--server", metavar="HOST:PORT", help="The coordinator's SuperLink address.")],
    data: Annotated[Path, typer.Option("--data", metavar="DIR", help="HAM10000-style folder: HAM10000_metadata.csv (or Dataverse's tab-separated .tab) + ISIC_*.jpg.")],
    clinic_id: Annotated[str, typer.Option("--clinic-id", metavar="NAME", help="This clinic's id (as registered by the coordinator).")],
    root_certificates: Annotated[Path | None, typer.Option("--root-certificates", metavar="CA", help="The federation's CA certificate (ca.pem from the coordinator).")] = None,
    auth_key: Annotated[Path | None, typer.Option("--auth-key", metavar="KEY", help="This clinic's SuperNode private key (from `qana-client keygen`).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto: an Akida device if one is found, else the software backend; software: always the software backend.")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", metavar="DIR", help="Received bundles, image and feature caches (default ~/.cache/qana/clinics/NAME).")] = None,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of lesions held out for local evaluation.")] = 0.2,
    new_class: Annotated[list[str] | None, typer.Option("--new-class", metavar="NAME", help="A diagnosis (the metadata's dx name) this clinic introduces to the federation; its images must be in --data. Repeatable.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Connect without TLS (only to a coordinator started with --insecure).")] = False,
    runtime_port: Annotated[int, typer.Option("--runtime-port", min=1, max=65535, help="Local port of the SuperNode's ClientApp API (distinct per clinic on one machine).")] = 9094,
) -> None:
    """Run a Flower SuperNode for this clinic until stopped (Ctrl-C)."""
    from client.clinic import ClinicConfig, ClinicError
    from protocols.auth import check_certificate_file, check_clinic_name, check_server_address, load_private_key
    from qana.data import CLASS_NAMES, find_images, find_metadata, read_metadata
    from qana.runtime import RuntimeErrorQana, choose_device

    with _reported_errors():
        check_clinic_name(clinic_id)
        check_server_address(server)
        data = data.expanduser().resolve()
        if not data.is_dir():
            raise fail(f"data folder not found: {data}")
        metadata = find_metadata(data)
        records = read_metadata(metadata, class_names=tuple(dict.fromkeys((*CLASS_NAMES, *(new_class or [])))))
        found = find_images(data)
        listed = sum(r.image_id in found for r in records)
        if not listed:
            raise fail(f"none of the {len(records)} images listed in {metadata} is in {data} (ISIC_*.jpg below it)")
        present = {r.dx for r in records}
        for name in new_class or []:
            if name not in present:
                raise fail(f"--new-class {name}: no image in {metadata} has that diagnosis (dx)")
        if root_certificates is not None:
            root_certificates = root_certificates.expanduser().resolve()
            if not root_certificates.is_file():
                raise fail(f"CA certificate not found: {root_certificates}")
            check_certificate_file(root_certificates)
        if insecure and auth_key is not None:
            raise fail("--auth-key needs TLS; drop --insecure")
        if not insecure and root_certificates is None:
            typer.echo("note: no --root-certificates; the coordinator's certificate must be trusted by this system's CA store", err=True)
        if auth_key is not None:
            auth_key = auth_key.expanduser().resolve()
            load_private_key(auth_key)
        try:
            choice = choose_device(device)
        except RuntimeErrorQana as exc:
            raise ClinicError(str(exc)) from None
        node_config: dict[str, Any] = {"data-dir": str(data), "clinic-id": clinic_id, "device": device, "eval-fraction": eval_fraction}
        if new_class:
            node_config["new-classes"] = ",".join(new_class)
        if cache_dir is not None:
            node_config["cache-dir"] = str(cache_dir.expanduser().resolve())
        config = ClinicConfig.from_node_config(node_config)
        config.cache.mkdir(parents=True, exist_ok=True)
        check_runtime_port(runtime_port)
    typer.echo(f"clinic {clinic_id}: {len(records)} images listed in {data}, {listed} of them found")
    typer.echo(f"Akida: {choice.description}")
    typer.echo(f"connecting to {server} ({'INSECURE' if insecure else 'TLS'}{', authenticated' if auth_key else ''}); cache {config.cache}")

    env = dict(os.environ)
    env.setdefault("FLWR_HOME", str(config.cache / "flwr-home"))
    parts = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    # Flower starts flower-superexec / flwr-clientapp by name: this environment's scripts first.
    paths = [str(Path(sys.executable).parent)] + [p for p in env.get("PATH", "").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join(dict.fromkeys(paths))
    cmd = supernode_command(server, node_config, root_certificates, auth_key, insecure, runtime_port)
    code = run_supernode(cmd, env)
    raise typer.Exit(code)


def check_runtime_port(port: int) -> None:
    """Refuse a local ClientApp port already in use (two clinics on one machine with the
    default), before the SuperNode fails on it with a traceback."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise fail(f"--runtime-port {port} is in use on this machine (another clinic or SuperNode?); choose another") from None


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc (Linux); empty elsewhere."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def terminate_tree(pid: int, grace: float = 5.0) -> None:
    """SIGTERM a process and its descendants, SIGKILL what is left after `grace` seconds."""
    import time

    pids = [pid, *_descendants(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# Flower exits with status 1 for every error and prints its own code; 305 is
# ExitCode.SUPERNODE_CONNECTION_ERROR (SuperLink unreachable, or this node's key unknown to it).
CONNECTION_ERROR_MARK = "Exit Code: 305"
MAX_BACKOFF = 60.0


def _lines_until_exit(process: subprocess.Popen) -> Iterator[bytes]:
    """The process's output lines until it has exited, then whatever its descendants still hold.

    When the SuperNode exits on an error (e.g. an address Flower cannot parse), the SuperExec it
    started lives on, keeps the output pipe open and retries for ever, so reading to the end of
    the pipe would never return. Its descendants are noted while it runs and ended once it exits.
    """
    import queue
    import threading
    import time

    assert process.stdout is not None
    lines: queue.Queue[bytes | None] = queue.Queue()

    def pump() -> None:
        for raw in process.stdout:  # type: ignore[union-attr]
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    descendants: set[int] = set()
    exited_at: float | None = None
    while True:
        try:
            raw = lines.get(timeout=0.5)
        except queue.Empty:
            raw = b""
        if raw is None:
            return
        if raw:
            yield raw
        if process.poll() is None:
            descendants |= _descendants(process.pid)
        elif exited_at is None:
            exited_at = time.monotonic()
        elif time.monotonic() - exited_at > 2.0:  # its last lines are through; end what it left running
            for pid in descendants:
                if _alive(pid):
                    terminate_tree(pid)
            return


def _descendants(pid: int) -> set[int]:
    tree = _children()
    found, todo = set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def run_supernode(cmd: list[str], env: dict[str, str]) -> int:
    """Run the SuperNode until stopped; rejoin when it gives up connecting.

    Flower's SuperNode exits (its code 305) when the SuperLink is unreachable or does not (yet)
    know this clinic's key, e.g. when the clinic starts before the coordinator has registered
    it. A clinic should keep trying to join, so it is restarted with a growing pause.
    Any other exit, or Ctrl-C / SIGTERM, ends the command.
    """
    import time

    stopping = False
    process: subprocess.Popen | None = None

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    backoff = 5.0
    while True:
        # Same process group as this command: Ctrl-C in the terminal (or killing the group)
        # also stops the SuperNode and the ClientApp processes it started.
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        connection_error = False
        for raw in _lines_until_exit(process):  # pass the SuperNode's log through, watching for its exit code
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
            if not connection_error and CONNECTION_ERROR_MARK.encode() in raw:
                connection_error = True
                # Flower leaves its SuperExec retrying after this; end the whole tree.
                terminate_tree(process.pid)
        code = process.wait()
        if stopping:
            return 0
        if not connection_error:
            return code
        typer.echo(
            f"could not join the federation (coordinator unreachable, or this clinic's key is not registered yet); "
            f"retrying in {backoff:.0f}s",
            err=True,
        )
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.2)
        if stopping:
            return 0
        backoff = min(backoff * 2, MAX_BACKOFF)


def _finite(value: float) -> float:
    """Click's range checks let NaN and Inf through (NaN compares false); a step size must be a number."""
    if value != value or value in (float("inf"), float("-inf")):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _change(label: str, before: Any, after: Any) -> str:
    """One line: accuracy of a group of images before -> after the update."""
    if before is None or before.n == 0:
        return f"{label}: no images"
    return (
        f"{label} ({before.n} images): top-1 {_pct(before.top1)} -> {_pct(after.top1)}, "
        f"balanced accuracy {_pct(before.balanced_accuracy)} -> {_pct(after.balanced_accuracy)}"
    )


@app.command("learn")
def learn(
    data: Annotated[Path, typer.Option("--data", metavar="DIR", help="The clinic's HAM10000-style folder, including the images that arrived since.")],
    clinic_id: Annotated[str, typer.Option("--clinic-id", metavar="NAME", help="This clinic's id (names its default cache).")],
    bundle: Annotated[str | None, typer.Option("--bundle", metavar="DIR|ID", help="A bundle folder, or the id of a bundle in the clinic's cache (default: the one deployed here).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto: an Akida device if one is found, else the software backend; software: always the software backend.")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", metavar="DIR", help="The clinic's cache (default ~/.cache/qana/clinics/NAME), as for `start`.")] = None,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of each diagnosis's lesions kept held out; new lesions fill the held-out side up to it, earlier lesions keep their side.")] = 0.2,
    new_class: Annotated[list[str] | None, typer.Option("--new-class", metavar="NAME", help="A diagnosis (the metadata's dx name) this clinic adds to the deployed head; its images must be in --data. Repeatable.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over old + new training features.")] = 20,
    learning_rate: Annotated[float, typer.Option("--learning-rate", min=1e-9, max=10.0, callback=_finite, help="Step size of the head update (at most 10, as for qana-sim).")] = 0.01,
    proximal_mu: Annotated[float, typer.Option("--proximal-mu", min=0.0, max=1e6, callback=_finite, help="Pull towards the deployed head's weights (0: replay of old features only).")] = 0.1,
    smote: Annotated[bool, typer.Option("--smote/--no-smote", help="Oversample minority classes as in federation rounds.")] = True,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_LIMIT - 1, help="Seed of SMOTE and of the order training samples are presented in (below 2**32, as sklearn takes).")] = 0,
) -> None:
    """Update this clinic's deployed head from images added to its folder, outside a round.

    Reports accuracy on the earlier held-out images before and after the update, so a new
    batch that makes the head forget shows up here.
    """
    from client.clinic import Clinic, ClinicConfig, ClinicError
    from protocols.auth import check_clinic_name
    from qana.bundle import BundleError, load_bundle
    from qana.data import describe_skipped
    from qana.head import TrainConfig
    from qana.runtime import RuntimeErrorQana

    with _reported_errors():
        check_clinic_name(clinic_id)
        data = data.expanduser().resolve()
        if not data.is_dir():
            raise fail(f"data folder not found: {data}")
        node_config: dict[str, Any] = {"data-dir": str(data), "clinic-id": clinic_id, "device": device, "eval-fraction": eval_fraction}
        if new_class:
            node_config["new-classes"] = ",".join(new_class)
        if cache_dir is not None:
            node_config["cache-dir"] = str(cache_dir.expanduser().resolve())
        clinic = Clinic(ClinicConfig.from_node_config(node_config))
        try:
            if bundle is not None and Path(bundle).expanduser().is_dir():
                bundle_id = clinic.adopt_bundle(load_bundle(Path(bundle).expanduser()))
            elif bundle is not None:
                matches = [b for b in clinic.bundles.ids() if b.startswith(bundle.lower())]
                if len(matches) != 1:
                    raise ClinicError(f"--bundle {bundle}: not a folder, and matches {len(matches)} bundle(s) in {clinic.bundles.root}")
                bundle_id = matches[0]
            else:
                deployed = clinic.deployed_bundle_ids()
                if not deployed:
                    clinic.refuse_an_edge_only_clinic()
                    raise ClinicError(f"no bundle is deployed in {clinic.config.cache}; name one with --bundle DIR|ID")
                if len(deployed) > 1:
                    ids = ", ".join(b[:12] for b in deployed)
                    raise ClinicError(f"{len(deployed)} bundles are deployed in {clinic.config.cache} ({ids}); name one with --bundle ID")
                bundle_id = deployed[0]
            config = TrainConfig(epochs=epochs, learning_rate=learning_rate, proximal_mu=proximal_mu, seed=seed)
            report = clinic.learn(bundle_id, config, smote=smote)
        except (BundleError, RuntimeErrorQana) as exc:
            raise ClinicError(str(exc)) from None
    old = report.images - report.new_images
    typer.echo(f"clinic {clinic_id}: bundle {report.bundle_id[:12]}…; starting from the {report.start}")
    if report.skipped:
        typer.echo(describe_skipped(report.skipped))
    if report.cache_rebuilt:
        typer.echo(
            "warning: the feature cache was unreadable and has been rebuilt; images of lesions recorded in the "
            "split file are taken as learned before, so a new image of a known lesion is not counted as new",
            err=True,
        )
    relabelled = f", {report.relabelled} of them with a corrected diagnosis" if report.relabelled else ""
    typer.echo(
        f"images: {report.images} ({report.new_images} new{relabelled}, {report.computed} through the backbone; "
        f"{old} earlier); new lesions: {report.new_lesions} ({report.new_lesions_held_out} held out)"
    )
    if not report.updated:
        typer.echo(f"{report.not_updated_because}; the deployed head is unchanged")
        return
    if report.added_classes:
        typer.echo(f"new class(es) added to the head: {', '.join(report.added_classes)}")
    typer.echo(f"trained on {report.train_examples} images (+{report.num_synthetic} SMOTE), old and new, {epochs} epochs, proximal mu {proximal_mu}")
    if report.left_out:
        named = ", ".join(f"{n} {name}" for name, n in report.left_out.items())
        typer.echo(f"left out (the head has no such class; add one with --new-class): {named} training image(s)")
    typer.echo(_change("earlier held-out", report.earlier_before, report.earlier_after))
    typer.echo(_change(f"new {report.new_kind}", report.new_before, report.new_after))
    typer.echo(f"on-device agreement {_pct(report.device_agreement)}; deployed model updated in {report.saved_to}")


@app.command("keygen")
def keygen(
    out: Annotated[str, typer.Option("--out", metavar="KEY", help="Private key file; the public key is written to KEY.pub.")] = str(Path.home() / ".qana" / "clinic" / "node.key"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing key pair.")] = False,
) -> None:
    """Make this clinic's SuperNode key pair; send only the .pub file to the coordinator.

    If the private key exists but its .pub is missing or is not its half, the .pub is written
    again from it (the identity the coordinator registered stays); --overwrite makes a new pair.
    """
    from protocols.auth import create_node_keys, key_fingerprint, load_public_key, restore_public_key

    with _reported_errors():
        existing = Path(out).expanduser()
        if not overwrite and existing.is_file() and (restored := restore_public_key(existing)) is not None:
            public, problem = restored
            typer.echo(f"public key  {public} ({key_fingerprint(load_public_key(public))}) written again from {existing} ({problem})")
            return
        private, public = create_node_keys(out, overwrite=overwrite)  # as typed: "k4/" names a folder
        fingerprint = key_fingerprint(load_public_key(public))
    typer.echo(f"private key {private} (keep it here; mode 0600)")
    typer.echo(f"public key  {public} ({fingerprint}): send this file to the coordinator")


if __name__ == "__main__":
    app()
