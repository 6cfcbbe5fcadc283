"""The clinic's cache of model bundles received from the coordinator, keyed by bundle id.

A backbone is sent over the wire only when the clinic lacks it: the hello reply lists the
ids cached here. Every bundle is verified on install (its id must be the one announced) and
again on every load (`qana.bundle.load_bundle` checks each file's sha256), so a tampered or
half-written cache entry is never used; it is reported and can be re-deployed.
"""

from __future__ import annotations

import re
from pathlib import Path

from qana.bundle import Bundle, BundleError, load_bundle, unpack_bundle

_BUNDLE_ID = re.compile(r"^[0-9a-f]{64}$")


class BundleCache:
    """Bundles under `<root>/bundles/<bundle_id>/`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root) / "bundles"

    def _path(self, bundle_id: str) -> Path:
        if not _BUNDLE_ID.match(bundle_id):
            raise BundleError(f"not a bundle id: {bundle_id[:20]!r}")
        return self.root / bundle_id

    def ids(self) -> list[str]:
        """Ids of every cached bundle folder, usable or not (to name one, e.g. `learn --bundle ID`)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _BUNDLE_ID.match(p.name))

    def usable_ids(self) -> list[str]:
        """Ids of cached bundles that pass verification: what the hello reply offers.

        A damaged entry left out here is re-deployed by the coordinator (which sends a backbone
        only to clinics that lack it); reporting it would leave every round failing at this
        clinic. Hashing the few files of a bundle costs milliseconds.
        """
        return [bundle_id for bundle_id in self.ids() if self.has(bundle_id)]

    def get(self, bundle_id: str) -> Bundle:
        """The verified bundle; BundleError if it is missing, tampered with or mislabelled."""
        path = self._path(bundle_id)
        if not path.is_dir():
            raise BundleError(f"bundle {bundle_id[:12]}… is not in the clinic's cache; the coordinator must deploy it first")
        bundle = load_bundle(path)
        if bundle.bundle_id != bundle_id:
            raise BundleError(f"cached bundle {path} has id {bundle.bundle_id[:12]}…, not {bundle_id[:12]}…; refusing it")
        return bundle

    def has(self, bundle_id: str) -> bool:
        try:
            self.get(bundle_id)
        except BundleError:
            return False
        return True

    def install(self, bundle_id: str, packed: bytes) -> Bundle:
        """Unpack a received bundle, verify it is the one announced, and cache it atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        return unpack_bundle(packed, self._path(bundle_id), expected_id=bundle_id)
