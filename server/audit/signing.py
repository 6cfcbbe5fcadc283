"""The coordinator's Ed25519 key: create, load, sign, verify.

Each audit entry's hash is signed, so an entry cannot be forged or altered by
someone who can write to the database but does not hold the key.  The private
key lives in a PEM file (PKCS#8, unencrypted, mode 0600); verification needs
only the public half, so a regulator can check a log with a public-key PEM.

Signatures are over a domain-separated message (a fixed prefix plus the raw
digest), so a signature made for an entry can never be replayed as a signature
of the chain head, or the other way round.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from server.audit.canonical import sha256_hex
from server.audit.errors import SigningKeyError

KEY_ENV_VAR = "QANA_AUDIT_KEY"
_ENTRY_DOMAIN = b"qana-audit/entry/v1\x00"
_HEAD_DOMAIN = b"qana-audit/head/v1\x00"


def default_key_path() -> Path:
    """``$QANA_AUDIT_KEY`` or ``~/.qana/audit_key.pem``."""
    configured = os.environ.get(KEY_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".qana" / "audit_key.pem"


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """Short stable name of a key: first 16 hex digits of sha256(raw public key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


def _entry_message(entry_hash: str) -> bytes:
    return _ENTRY_DOMAIN + bytes.fromhex(entry_hash)


def _head_message(seq: int, entry_hash: str) -> bytes:
    return _HEAD_DOMAIN + seq.to_bytes(8, "big") + bytes.fromhex(entry_hash)


@dataclass(frozen=True)
class Verifier:
    """Checks signatures with the coordinator's public key."""

    public_key: Ed25519PublicKey

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def _check(self, signature_hex: str, message: bytes) -> bool:
        try:
            self.public_key.verify(bytes.fromhex(signature_hex), message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def entry_signature_ok(self, entry_hash: str, signature_hex: str) -> bool:
        try:
            message = _entry_message(entry_hash)
        except ValueError:  # the stored hash is not even hex
            return False
        return self._check(signature_hex, message)

    def head_signature_ok(self, seq: int, entry_hash: str, signature_hex: str) -> bool:
        try:
            message = _head_message(seq, entry_hash)
        except (ValueError, OverflowError):
            return False
        return self._check(signature_hex, message)

    def public_pem(self) -> bytes:
        """The key as a PEM file: what an auditor needs to run `audit verify`, and nothing that can sign."""
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Signer:
    """Signs entries and the chain head with the coordinator's private key."""

    private_key: Ed25519PrivateKey

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.private_key.public_key())

    @property
    def fingerprint(self) -> str:
        return self.verifier.fingerprint

    def sign_entry(self, entry_hash: str) -> str:
        return self.private_key.sign(_entry_message(entry_hash)).hex()

    def sign_head(self, seq: int, entry_hash: str) -> str:
        return self.private_key.sign(_head_message(seq, entry_hash)).hex()

    def public_pem(self) -> bytes:
        return self.verifier.public_pem()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"signing key not found: {path}") from None
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror}") from None


def load_signer(path: Path) -> Signer:
    """Load an existing private key; never creates one."""
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return Signer(key)


def load_verifier(path: Path) -> Verifier:
    """Load a public key PEM, or derive it from a private key PEM."""
    data = _read(path)
    if b"PRIVATE KEY" in data:
        return load_signer(path).verifier
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SigningKeyError(f"{path} is not a PEM public or private key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return Verifier(key)


def load_or_create_signer(path: Path) -> Signer:
    """Load the key at ``path``, creating it (mode 0600) if there is none.

    Creation writes a temporary file in the same directory and hard-links it into
    place, which fails if another process created the key first; the loser then
    loads the winner's key, so concurrent first starts agree on one key.
    """
    if path.exists():
        return load_signer(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".audit_key.")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(temporary)
    except OSError as exc:
        raise SigningKeyError(f"cannot create signing key {path}: {exc.strerror}") from None
    return load_signer(path)
