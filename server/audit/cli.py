"""``qana-server audit ...`` and ``qana-server rollback``: the audit log from a terminal.

Output is a plain table by default and JSON with ``--json``.  Mistakes (unknown
version, bad URL, missing key, bad date) print one ``error: ...`` line on stderr
and exit with status 2; ``verify`` exits with status 1 when the log fails its
checks.  Read-only commands never create a database or a key, so a mistyped
path is reported instead of silently showing an empty log.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO, TypeVar

import typer

from qana.cli_errors import fail, reported_errors
from server.audit.errors import AuditError, InvalidRecordError

if TYPE_CHECKING:
    from server.audit.store import AuditLog, EntryFilter

EXIT_INVALID = 1  # verify found a problem

audit_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # a bug's traceback must not print clinic data or keys
    name="audit",
    no_args_is_help=True,
    help=(
        "Inspect and check the audit log of model versions: which version, made from what, "
        "by whom, when, and where it is deployed. Every entry is hash-chained and signed "
        "with the coordinator's Ed25519 key."
    ),
)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        "--audit-db",  # the spelling of `qana-server start/status`
        metavar="URL",
        help="Audit database as a SQLAlchemy URL, e.g. sqlite:///audit.db or postgresql://user@host/db. "
        "Default: $QANA_AUDIT_DB, else sqlite:///~/.qana/audit.db.",
        show_default=False,
    ),
]
KeyOption = Annotated[
    Path | None,
    typer.Option(
        "--key",
        "--audit-key",  # the spelling of `qana-server start`
        metavar="PATH",
        help="The coordinator's Ed25519 key (PEM). verify accepts the public key alone. "
        "Default: $QANA_AUDIT_KEY, else ~/.qana/audit_key.pem.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]
RunOption = Annotated[str | None, typer.Option("--run", metavar="RUN_ID", help="Only entries of this run.")]
ClinicOption = Annotated[
    str | None,
    typer.Option(
        "--clinic",
        metavar="CLINIC_ID",
        help="Only entries concerning this clinic: versions it took part in, deployments to it, "
        "its rejected updates and the classes it added.",
    ),
]
SinceOption = Annotated[
    str | None,
    typer.Option("--since", metavar="WHEN", help="Only entries at or after this ISO 8601 date/time (UTC if no zone)."),
]
UntilOption = Annotated[
    str | None,
    typer.Option(
        "--until",
        metavar="WHEN",
        help="Only entries at or before this ISO 8601 date/time (a bare date includes that whole day).",
    ),
]
KindOption = Annotated[
    list[str] | None,
    typer.Option(
        "--kind",
        metavar="KIND",
        help="Only entries of this kind (repeatable): backbone, head, evaluation, deployment, rejection, class_addition, rollback.",
    ),
]


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn expected failures into one stderr line and a non-zero exit, without a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from server.audit.db import describe_database_error

    try:
        with reported_errors(AuditError):
            yield
    except SQLAlchemyError as exc:
        raise fail(f"database error: {describe_database_error(exc)}") from None


def _open(db: str | None, key: Path | None = None, *, sign: bool = False) -> AuditLog:
    from server.audit.store import AuditLog

    return AuditLog.open(db, key, create=False, sign=sign)


def _parse_when(text: str | None, option: str, *, end_of_day: bool = False) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRecordError(f"{option}: not an ISO 8601 date or date/time: {text!r}") from None
    bare_date = len(text.strip()) == 10
    if bare_date and end_of_day:
        moment = datetime.combine(moment.date(), time.max)  # through the last microsecond of that day
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+05:00 is before year 1 in UTC
        raise InvalidRecordError(f"{option}: {text!r} is out of range in UTC") from None


def _filters(
    run: str | None,
    clinic: str | None,
    since: str | None,
    until: str | None,
    kind: list[str] | None,
    limit: int | None = None,
) -> EntryFilter:
    from server.audit.store import EntryFilter

    return EntryFilter(
        run_id=run,
        clinic_id=clinic,
        since=_parse_when(since, "--since"),
        until=_parse_when(until, "--until", end_of_day=True),
        kinds=tuple(kind or ()),
        limit=limit,
    )


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary container uid
        return None


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True))


@audit_app.command("log")
def log_command(
    run: RunOption = None,
    clinic: ClinicOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    kind: KindOption = None,
    limit: Annotated[
        int | None, typer.Option("--limit", metavar="N", min=1, max=2**63 - 1, help="Only the N most recent matching entries.")
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List ledger entries, oldest first: versions, clinics' evaluations of them, deployments, rejections, class additions, rollbacks."""
    from server.audit.render import entries_table

    with _reported_errors():
        filters = _filters(run, clinic, since, until, kind, limit)
        with _open(db) as audit_log:
            entries = audit_log.entries(filters)
    if as_json:
        _print_json([entry.to_dict() for entry in entries])
    elif entries:
        typer.echo(entries_table(entries))
    else:
        typer.echo("no matching entries")


@audit_app.command("show")
def show_command(
    version: Annotated[
        str, typer.Argument(metavar="VERSION", help="A version id (h3, b1), a sha256 prefix, or 'current'.")
    ],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one version: artefact hash, parent, run and round, strategy, clinics, metrics, deployments."""
    from server.audit.records import format_time
    from server.audit.render import key_values, metrics_text, table

    with _reported_errors():
        with _open(db) as audit_log:
            info = audit_log.version(version)
            current = audit_log.current_version(info.kind) == info.version
            deployments = audit_log.deployments(version=info.version)
    if as_json:
        _print_json({**info.to_dict(), "current": current, "deployments": [d.to_dict() for d in deployments]})
        return
    typer.echo(
        key_values(
            [
                ("version", info.version + ("  (current)" if current else "")),
                ("kind", info.kind),
                ("entry", f"#{info.seq}"),
                ("created", format_time(info.created_at)),
                ("sha256", info.sha256),
                ("size", f"{info.size} bytes"),
                ("parent", info.parent),
                ("backbone", info.backbone),
                ("run", info.run_id),
                ("round", info.round),
                ("strategy", info.strategy),
                ("config", json.dumps(dict(info.strategy_config), sort_keys=True) if info.strategy_config else None),
                ("metrics", metrics_text(info.metrics, limit=20) or None),
                ("note", info.note),
                ("signed by", info.signer),
                ("entry hash", info.entry_hash),
            ]
        )
    )
    if info.participants:
        typer.echo("\nparticipants")
        typer.echo(
            table(
                ("clinic", "examples", "metrics"),
                [(p.clinic_id, p.num_examples, metrics_text(p.metrics, limit=6)) for p in info.participants],
            )
        )
    typer.echo("\ndeployments")
    if deployments:
        typer.echo(
            table(
                ("#", "clinic", "deployed at (UTC)"),
                [(d.seq, d.clinic_id, format_time(d.deployed_at)) for d in deployments],
            )
        )
    else:
        typer.echo("not deployed to any clinic")


@audit_app.command("diff")
def diff_command(
    before: Annotated[str, typer.Argument(metavar="A", help="The earlier version (h2, b1, sha256 prefix).")],
    after: Annotated[str, typer.Argument(metavar="B", help="The later version.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compare two versions: changed fields, metric deltas, clinics, and per-array weight change (L2 norm)."""
    from server.audit.diff import diff_versions
    from server.audit.render import table

    with _reported_errors():
        with _open(db) as audit_log:
            old = audit_log.version(before)
            new = audit_log.version(after)
            difference = diff_versions(old, new, audit_log.get_artifact(old.sha256), audit_log.get_artifact(new.sha256))
    if as_json:
        _print_json(difference.to_dict())
        return
    typer.echo(f"{old.version} -> {new.version}")
    typer.echo("\nchanged fields")
    if difference.fields:
        typer.echo(table(("field", old.version, new.version), [(f.name, f.before, f.after) for f in difference.fields]))
    else:
        typer.echo("none")
    typer.echo("\naggregate metrics")
    if difference.metrics:
        typer.echo(
            table(
                ("metric", old.version, new.version, "change"),
                [(m.name, m.before, m.after, m.delta) for m in difference.metrics],
            )
        )
    else:
        typer.echo("none recorded")
    if difference.participants:
        typer.echo("\nparticipants (examples)")
        typer.echo(
            table(
                ("clinic", old.version, new.version),
                [(p.clinic_id, p.examples_before, p.examples_after) for p in difference.participants],
            )
        )
    typer.echo("\nweights")
    if difference.arrays is None:
        typer.echo(difference.arrays_note or "not compared")
    else:
        typer.echo(
            table(
                ("array", "shape " + old.version, "shape " + new.version, "compared", "L2 change", "relative"),
                [
                    (
                        a.name,
                        "x".join(map(str, a.shape_before)) if a.shape_before is not None else None,
                        "x".join(map(str, a.shape_after)) if a.shape_after is not None else None,
                        a.compared,
                        a.l2_difference,
                        a.relative_difference,
                    )
                    for a in difference.arrays
                ],
            )
        )


def _entry_hashes(values: list[str] | None) -> list[str] | None:
    """--expect-entry values as stored (lower-case sha256 hex), refused by name if malformed."""
    hashes = [value.strip().lower() for value in values or []]
    for value, entry_hash in zip(values or [], hashes, strict=True):
        if len(entry_hash) != 64 or any(c not in "0123456789abcdef" for c in entry_hash):
            raise typer.BadParameter(f"{value!r} is not an entry hash (64 hexadecimal digits, as verify prints the chain head)")
    return hashes or None


@audit_app.command("verify")
def verify_command(
    key: KeyOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
    expect_entry: Annotated[
        list[str] | None,
        typer.Option(
            "--expect-entry",
            metavar="HASH",
            callback=_entry_hashes,
            help="An entry hash kept outside the log, e.g. the chain head an earlier verify printed "
            "(repeatable). Fails if the log no longer holds it: the only way to notice a log emptied "
            "or rolled back together with its chain head.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check the hash chain, every signature, every typed row and every stored artefact.

    Exits 0 if the log is intact, 1 naming the first bad entry (edited, deleted,
    inserted, reordered, a modified artefact, or a kept entry that is gone), 2 if it
    could not check at all.
    """
    from server.audit.signing import default_key_path, load_verifier

    with _reported_errors():
        verifier = load_verifier(key if key is not None else default_key_path())
        with _open(db) as audit_log:
            report = audit_log.verify(verifier, kept_entries=expect_entry or ())
    if as_json:
        _print_json(report.to_dict())
    elif report.ok:
        typer.echo(
            f"OK: {report.entries_checked} entries and {report.artifacts_checked} artefacts verified "
            f"in {report.seconds:.2f}s; chain head #{report.head_seq} {report.head_hash}; "
            f"key {report.key_fingerprint}"
        )
    else:
        first = report.first_problem
        assert first is not None
        typer.echo(f"FAILED: {first.describe()}")
        others = report.problems[1:]
        for problem in others[:20]:
            typer.echo(f"  also: {problem.describe()}")
        if len(others) > 20:
            typer.echo(f"  ... and {len(others) - 20} more")
    if not report.ok:
        raise typer.Exit(EXIT_INVALID)


@audit_app.command("public-key")
def public_key_command(
    key: KeyOption = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="PATH", help="Write the PEM to this new file instead of standard output."),
    ] = None,
) -> None:
    """Print the coordinator's public key (PEM), for `audit verify --key` on a machine that must not sign.

    An auditor can check the log with it but cannot write entries. An existing --output file
    is never overwritten.
    """
    from server.audit.signing import default_key_path, load_verifier

    with _reported_errors():
        verifier = load_verifier(key if key is not None else default_key_path())
        pem = verifier.public_pem()
        if output is None:
            typer.echo(pem.decode("ascii"), nl=False)
            return
        _write_new_file(output, lambda handle: handle.write(pem.decode("ascii")))
    typer.echo(f"wrote the public key (fingerprint {verifier.fingerprint}) to {output}", err=True)


_T = TypeVar("_T")


def _write_new_file(output: Path, write: Callable[[TextIO], _T]) -> _T:
    """Create `output` (never overwriting a file: an earlier export, a key, the database itself),
    let `write` fill it, and remove it again if writing fails, so no half-written file is left."""
    try:
        handle = output.open("x", encoding="utf-8", newline="")
    except FileExistsError:
        raise AuditError(f"{output} already exists; not overwritten (choose another --output)") from None
    except OSError as exc:
        raise AuditError(f"cannot write {output}: {exc.strerror}") from None
    try:
        with handle:
            return write(handle)
    except BaseException:
        output.unlink(missing_ok=True)
        raise


@audit_app.command("export")
def export_command(
    export_format: Annotated[
        str, typer.Option("--format", metavar="FORMAT", help="jsonl (one JSON object per line) or csv.")
    ] = "jsonl",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="PATH", help="Write to this new file instead of standard output."),
    ] = None,
    run: RunOption = None,
    clinic: ClinicOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    kind: KindOption = None,
    db: DbOption = None,
) -> None:
    """Export entries with their exact signed text, hashes and signatures, for independent checking.

    An existing --output file is never overwritten: it could be an earlier export, or the
    audit database itself.
    """
    from server.audit.export import EXPORT_FORMATS, write_export

    with _reported_errors():
        if export_format not in EXPORT_FORMATS:
            raise InvalidRecordError(f"unknown export format {export_format!r} (choose {' or '.join(EXPORT_FORMATS)})")
        filters = _filters(run, clinic, since, until, kind)
        with _open(db) as audit_log:
            entries = audit_log.entries(filters)
        if output is None:
            write_export(entries, export_format, sys.stdout)
        else:
            count = _write_new_file(output, lambda handle: write_export(entries, export_format, handle))
            typer.echo(f"wrote {count} entries to {output}", err=True)


def rollback_command(
    version: Annotated[
        str, typer.Argument(metavar="VERSION", help="The version to make current again (h3, b1, sha256 prefix).")
    ],
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why, for the record (e.g. 'accuracy regression at clinic-b').")
    ] = None,
    actor: Annotated[
        str | None, typer.Option("--actor", help="Who is rolling back. Default: the current OS user.")
    ] = None,
    db: DbOption = None,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make an earlier version current again, and record the rollback (signed) in the audit log."""
    with _reported_errors():
        with _open(db, key, sign=True) as audit_log:
            entry = audit_log.rollback(version, reason=reason, actor=actor or _os_user())
    if as_json:
        _print_json(entry.to_dict())
        return
    body = entry.body
    typer.echo(
        f"{body['version']} is now current (was {body.get('previous_version') or 'none'}); "
        f"recorded as entry #{entry.seq}"
    )
