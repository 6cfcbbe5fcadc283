"""TLS certificates and SuperNode keys for a pilot federation.

Flower secures the SuperLink with *server-authenticated* TLS: the SuperLink presents a
certificate signed by a CA that every clinic and the `flwr` CLI trust (`--root-certificates`).
Flower has no client certificates (no mTLS); clinics prove who they are with SuperNode
authentication instead: each clinic holds an EC private key (P-384, OpenSSH format, what
`flower-supernode --auth-supernode-private-key` loads) and the coordinator registers its
public key (`qana-server nodes register`). So a "client certificate" here is that key pair.

Everything is made with `cryptography` (no openssl binary needed). Private keys are written
with mode 0600 and never overwritten silently.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.auth import (
    AuthError,
    check_clinic_name,
    create_node_keys,
    write_key_file,
)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


class CertError(ValueError):
    """Certificates or keys cannot be created or read; the message says which file and why."""


@dataclass(frozen=True)
class CertPaths:
    """Where `create_pilot_certificates` put things."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clinic_keys: dict[str, tuple[Path, Path]]  # clinic -> (private key, public key)


def _write(path: Path, data: bytes, private: bool, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CertError(f"{path} already exists; refusing to overwrite it (use --overwrite to replace it)")
    write_key_file(path, data, private)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "QANA-FL pilot"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


MAX_DAYS = 36_500  # a hundred years: anything longer is a typo (and past year 9999 datetime overflows)
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")  # '_' for internal names (docker services)


def check_host(host: str) -> str:
    """An IP address or a DNS name, as clinics will dial it; anything else could never match a
    clinic's TLS check, so it is refused before a certificate is made for it."""
    try:
        return str(ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host))
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if ":" in host and not host.startswith("["):
        raise CertError(f"--host {host!r}: give the name or IP only; the port is set with `qana-server start --port`")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        raise CertError(f"--host {host!r} is not a DNS name or IP address (letters, digits, '-', '_' and '.'; labels of at most 63 characters)")
    return name


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_ca(common_name: str = "QANA-FL pilot CA", days: int = 825) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that signs the SuperLink's certificate."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def create_server_certificate(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str], days: int = 397
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The SuperLink's certificate; `hosts` (DNS names or IPs) are what clinics dial."""
    if not hosts:
        raise CertError("the server certificate needs at least one host name or IP address (--host)")
    hosts = [check_host(host) for host in hosts]
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    # X.509 limits a common name to 64 characters; clinics match the SAN, so a longer name only
    # needs a shorter common name.
    common_name = hosts[0] if len(hosts[0]) <= 64 else "QANA-FL SuperLink"
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def create_pilot_certificates(
    out_dir: Path | str,
    hosts: list[str],
    clinics: list[str] = (),  # type: ignore[assignment]
    overwrite: bool = False,
    days: int = 397,
) -> CertPaths:
    """CA, SuperLink certificate for `hosts`, and one SuperNode key pair per clinic."""
    out = Path(out_dir)
    try:
        for clinic in clinics:
            check_clinic_name(clinic)
    except AuthError as exc:
        raise CertError(str(exc)) from None
    if not 1 <= days <= MAX_DAYS:
        raise CertError(f"--days {days}: a certificate is valid for 1 to {MAX_DAYS} days")
    ca_cert, ca_key = create_ca(days=max(days, 825))
    cert, key = create_server_certificate(ca_cert, ca_key, list(hosts), days=days)
    paths = CertPaths(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY, {})
    if not overwrite:
        # Every target, the clinics' key pairs included, is checked before anything is written:
        # a refusal half-way would leave a new CA behind that the next attempt then refuses.
        clinic_files = [out / "clinics" / clinic / name for clinic in clinics for name in ("node.key", "node.key.pub")]
        for path in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key, *clinic_files):
            if path.exists():
                raise CertError(f"{path} already exists; refusing to overwrite it (use --overwrite to replace it)")
    _write(paths.ca_key, _pem_key(ca_key), private=True, overwrite=overwrite)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=overwrite)
    _write(paths.server_key, _pem_key(key), private=True, overwrite=overwrite)
    _write(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=overwrite)
    for clinic in clinics:
        try:
            paths.clinic_keys[clinic] = create_node_keys(out / "clinics" / clinic / "node.key", overwrite=overwrite)
        except AuthError as exc:
            raise CertError(str(exc)) from None
    return paths


def load_certificate(path: Path | str) -> x509.Certificate:
    """Read a PEM certificate with a clear error (for `qana-server start` checks)."""
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CertError(f"certificate file not found: {path}") from None
    except ValueError as exc:
        raise CertError(f"{path} is not a PEM certificate ({exc})") from None


def check_server_certificates(ca_path: Path, cert_path: Path, key_path: Path) -> None:
    """The SuperLink's TLS files belong together: the certificate is issued by the CA the clinics
    trust and matches the private key. A mismatch would otherwise surface only as every clinic's
    failed handshake, while the coordinator waits for clinics that can never connect."""
    ca = load_certificate(ca_path)
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except FileNotFoundError:
        raise CertError(f"private key file not found: {key_path}") from None
    except (ValueError, TypeError) as exc:
        raise CertError(f"{key_path} is not an unencrypted PEM private key ({exc})") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertError(f"{key_path} is not the private key of {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertError(f"{cert_path} was not issued by {ca_path}: clinics trusting that CA could not connect") from None

