"""Clinic identity: clinic ids and SuperNode authentication keys, shared by both sides.

Flower authenticates SuperNodes with EC key pairs (NIST curves): the clinic keeps the
private key (OpenSSH format, what `flower-supernode --auth-supernode-private-key` loads) and
the coordinator registers the public key (`flwr supernode register`, wrapped by
`qana-server nodes register`). Key generation lives here so that a clinic can make its own
key pair (`qana-client keygen`) without the private key ever leaving the clinic, and the
coordinator can make pilot keys (`qana-server certs --clinic`), with one implementation.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qana.atomic import file_in_the_way, write_atomic, write_together

CLINIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AuthError(ValueError):
    """A clinic id or key is unusable; the message names the file or value."""


def check_clinic_name(name: str) -> str:
    """Clinic ids become file names, node names and audit-log keys: letters, digits, '_', '.', '-'."""
    if not CLINIC_NAME.match(name or ""):
        raise AuthError(f"invalid clinic id {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return name


def check_server_address(address: str) -> str:
    """`HOST:PORT` (an IPv6 host in brackets), as Flower dials it; the message says what is wrong."""
    host, sep, port = address.strip().rpartition(":")
    # no scheme, path or spaces: Flower cannot parse them, and its SuperNode then exits while
    # its SuperExec goes on retrying
    if not sep or not host or any(c in host for c in "/ \t") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise AuthError(f"server address {address!r} is not HOST:PORT with a port from 1 to 65535, e.g. coord.example.org:9092")
    return address.strip()


def check_certificate_file(path: Path) -> None:
    """A CA file must hold at least one PEM certificate: Flower would otherwise fail later, with less detail."""
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as exc:
        raise AuthError(f"{path} is not a PEM certificate file ({exc}); use the ca.pem the coordinator sent") from None


def write_key_file(path: Path, data: bytes, private: bool) -> None:
    """Write key or certificate bytes atomically and durably; private files are created 0600 from
    the start (never world-readable, not even for a moment, and never through a stale or planted
    temporary file). Shared by clinic keys and pilot certificates."""
    write_atomic(path, data, mode=0o600 if private else 0o644)


def _check_key_path(given: Path | str) -> Path:
    """The private key's path, refused in one sentence if it names a folder or lies under a file.

    A string is checked as given: `Path("k4/")` is `Path("k4")`, so a trailing slash (the user
    meant a folder) is only visible before the conversion and would otherwise make a key file
    named k4."""
    path = Path(given).expanduser()
    if os.path.basename(os.fspath(given)) in ("", ".", "..") or not path.name or path.is_dir():
        raise AuthError(
            f"key path {os.fspath(given)!r} names a folder; give a file name for the private key, not a folder, "
            "e.g. ~/.qana/clinic/node.key"
        )
    blocking = file_in_the_way(path.parent)
    if blocking is not None:
        raise AuthError(f"key path {str(path)!r}: {blocking} is a file, not a folder")
    return path


def create_node_keys(private_path: Path | str, overwrite: bool = False) -> tuple[Path, Path]:
    """A clinic's SuperNode key pair: OpenSSH EC P-384 private key (0600) and `<name>.pub`.

    Pass the path as the user typed it (a string) so that a trailing slash is refused as a folder.
    """
    private_path = _check_key_path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    # Checked before anything is written, so a pair is never half replaced.
    for path in (private_path, public_path):
        if path.is_dir():
            raise AuthError(f"{path} is a folder; refusing to replace it with a key")
        if path.exists() and not overwrite:
            raise AuthError(f"{path} already exists; refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    # Both written to temporary files beside the targets before either replaces anything: a full
    # disk leaves the old pair as it was, and no temporary file behind. They are then renamed in
    # this order, the private key last: a failed rename of the private key puts the old .pub back,
    # and a crash (no chance to undo) between the two renames keeps the old private key, the
    # identity the coordinator registered and the one half that cannot be made again, beside a
    # new .pub (which `load_private_key(...).public_key()` can rewrite). The other order would
    # lose the old private key and leave a new one that no coordinator knows.
    write_together({public_path: (public + b"\n", 0o644), private_path: (private, 0o600)})
    return private_path, public_path


def restore_public_key(private_path: Path | str) -> tuple[Path, str] | None:
    """Rewrite `<key>.pub` from an existing private key when it is missing or is not that key's
    half (lost, or left by a `keygen --overwrite` stopped between its two renames); returns
    (path, what was wrong), or None when it already matches. The public half can always be made
    again; the private key, the identity the coordinator registered, is never touched."""
    private_path = Path(private_path).expanduser()
    public_path = private_path.with_name(private_path.name + ".pub")
    public = load_private_key(private_path).public_key()
    wanted = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if public_path.is_dir():
        raise AuthError(f"{public_path} is a folder; refusing to replace it with a key")
    if not public_path.is_file():
        problem = "it was missing"
    else:
        try:
            if load_public_key(public_path).public_numbers() == public.public_numbers():
                return None
            problem = "it was another key's"
        except AuthError:
            problem = "it was unreadable"
    write_key_file(public_path, wanted + b"\n", private=False)
    return public_path, problem


def load_private_key(path: Path | str) -> ec.EllipticCurvePrivateKey:
    """Check a SuperNode private key before handing it to Flower (which exits without detail)."""
    path = Path(path).expanduser()
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise AuthError(f"auth key not found: {path}") from None
    except (ValueError, UnsupportedAlgorithm, TypeError) as exc:
        raise AuthError(f"{path} is not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AuthError(f"{path} is not an EC key; make one with `qana-client keygen`")
    return key


def load_public_key(path: Path | str) -> ec.EllipticCurvePublicKey:
    """Read a clinic's `.pub` file (OpenSSH EC public key)."""
    path = Path(path).expanduser()
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError:
        raise AuthError(f"public key not found: {path}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AuthError(f"{path} is not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AuthError(f"{path} is not an EC public key; make one with `qana-client keygen`")
    return key


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA256 of the OpenSSH public key blob, as `ssh-keygen -l` prints it (without padding)."""
    import base64

    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
