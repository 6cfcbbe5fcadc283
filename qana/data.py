"""Reading a HAM10000-style folder: metadata, image discovery, decoding, and the on-disk cache.

A folder is valid when it holds the HAM10000 metadata (the Harvard Dataverse columns) as
`HAM10000_metadata.csv`, or as Dataverse's tab-separated `HAM10000_metadata.tab` (what its
download button and API give unless the original format is asked for), and `ISIC_*.jpg` files
anywhere below it (`images/`, or the official `HAM10000_images_part_1/2`);
a clinic's own images may keep other names, `<image_id>.jpg`, where the metadata lists them.
Images that are missing, unreadable or corrupt are skipped and reported by name, so one bad
file never stops a clinic's run half-way. A missing or malformed metadata file is a
`DataError` with a message that says what is wrong.

Decoded 64x64 uint8 images are cached per image, keyed by the sha256 of the JPEG bytes and
the preprocessing parameters: a second run, or a folder that has grown, decodes only new files.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from qana.classes import CLASS_NAMES

METADATA_FILE = "HAM10000_metadata.csv"  # the name this project writes (qana split, samples, simulated clinics)
# The names a metadata file is looked for under, in this order: the original CSV; Harvard
# Dataverse's ingested form, which its download button and API serve by default (tab-separated,
# text in double quotes); the same saved without an extension, as some download scripts do.
METADATA_NAMES = (METADATA_FILE, "HAM10000_metadata.tab", "HAM10000_metadata")
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
CLINICAL_COLUMNS = ("age", "sex", "localization")  # optional; read for the clinical prior (qana.clinical)
DEFAULT_IMAGE_SIZE = 64
# An empty QANA_CACHE_DIR counts as unset (it would otherwise put the cache in the working folder).
DEFAULT_CACHE_DIR = Path(os.environ.get("QANA_CACHE_DIR") or Path.home() / ".cache" / "qana")
log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data folder cannot be used as it is; the message names the problem."""


@dataclass(frozen=True)
class Record:
    """One image's metadata row."""

    image_id: str
    lesion_id: str
    dx: str
    centre: str
    # Clinical metadata as written (qana.clinical encodes and checks it); None when the file
    # has no such column.
    age: str | None = None
    sex: str | None = None
    site: str | None = None  # the `localization` column


@dataclass
class Dataset:
    """Decoded images with their labels and grouping keys, aligned by index."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64 indices into class_names
    lesion_ids: np.ndarray  # (N,) str
    centres: np.ndarray  # (N,) str
    image_ids: np.ndarray  # (N,) str
    content_hashes: np.ndarray  # (N,) str, sha256 of the JPEG bytes
    class_names: tuple[str, ...] = CLASS_NAMES
    skipped: dict[str, str] = field(default_factory=dict)  # image_id -> reason
    # Clinical metadata as written in the CSV (qana.clinical), aligned by index; None when the
    # metadata file has no age/sex/localization columns.
    ages: np.ndarray | None = None
    sexes: np.ndarray | None = None
    sites: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> Dataset:
        """The rows at `index`, as a new Dataset (skipped files are kept for reporting)."""
        return Dataset(
            images=self.images[index],
            labels=self.labels[index],
            lesion_ids=self.lesion_ids[index],
            centres=self.centres[index],
            image_ids=self.image_ids[index],
            content_hashes=self.content_hashes[index],
            class_names=self.class_names,
            skipped=dict(self.skipped),
            ages=None if self.ages is None else self.ages[index],
            sexes=None if self.sexes is None else self.sexes[index],
            sites=None if self.sites is None else self.sites[index],
        )

    @property
    def has_clinical(self) -> bool:
        """Whether the metadata carried age, sex and body site (the clinical prior's input)."""
        return self.ages is not None and self.sexes is not None and self.sites is not None

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}


def find_metadata(root: Path) -> Path:
    """The data folder's metadata file: the first of METADATA_NAMES that exists.

    A CSV beside a .tab (someone converted it) wins, as it did before .tab files were read."""
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"metadata file not found in {root}: expected {METADATA_FILE} "
        f"(or Harvard Dataverse's tab-separated {METADATA_NAMES[1]})"
    )


@contextlib.contextmanager
def open_metadata(path: Path) -> Iterator[csv.DictReader]:
    """A DictReader over a metadata file, comma- or tab-separated.

    The delimiter is read off the header line: a tab there means Dataverse's .tab form (column
    names never hold a tab or a comma, so the header decides it unambiguously). A spreadsheet
    program may start the file with a byte-order mark; it is dropped."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header_line = handle.readline()
        handle.seek(0)
        yield csv.DictReader(handle, delimiter="\t" if "\t" in header_line else ",")


def metadata_rows(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The header and every row by image_id, as written, for copying rows into a new folder's
    CSV (qana split, the sample, simulated clinics). Call after read_metadata has checked the file.

    Empty fields past the header's columns (a spreadsheet's trailing comma, which read_metadata
    accepts; it refuses non-empty ones) are left out, so the rows fit the header."""
    with open_metadata(path) as reader:
        rows = {
            (row.get("image_id") or "").strip(): {k: v for k, v in row.items() if k is not None}
            for row in reader
        }
        return list(reader.fieldnames or []), rows


def read_metadata(path: Path, class_names: tuple[str, ...] = CLASS_NAMES) -> list[Record]:
    """Parse a metadata file (CSV or Dataverse .tab); raise DataError naming the line or column that is wrong.

    The clinical columns (age, sex, localization) are optional; their values are kept as written
    and checked only where they are used (qana.clinical), so an odd body-site name never stops
    image-only work.
    """
    if not path.is_file():
        raise DataError(f"metadata file not found: {path} (expected {METADATA_FILE} in the data folder)")
    try:
        with open_metadata(path) as reader:
            header = reader.fieldnames or []
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise DataError(f"{path}: column(s) {', '.join(repeated)} appear more than once in the header")
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; header is {header}")
            records = []
            seen: set[str] = set()
            clinical = [c in header for c in CLINICAL_COLUMNS]
            separator = "tab" if reader.reader.dialect.delimiter == "\t" else "comma"
            for row in reader:
                line_no = reader.line_num  # the physical line the row ends on (blank lines and multi-line fields count)
                surplus = row.get(None) or []  # fields beyond the header's columns
                if any((v or "").strip() for v in surplus):
                    raise DataError(
                        f"{path}:{line_no}: {len(surplus)} more field(s) than the header's {len(header)} columns "
                        f"({', '.join(repr(v) for v in surplus[:3])}): is a {separator} inside a value not quoted?"
                    )
                image_id = (row.get("image_id") or "").strip()
                lesion_id = (row.get("lesion_id") or "").strip()
                dx = (row.get("dx") or "").strip()
                if not image_id or not lesion_id:
                    raise DataError(f"{path}:{line_no}: empty image_id or lesion_id")
                if dx not in class_names:
                    raise DataError(f"{path}:{line_no}: unknown diagnosis {dx!r}; expected one of {', '.join(class_names)}")
                if image_id in seen:
                    raise DataError(f"{path}:{line_no}: image {image_id} is listed twice")
                seen.add(image_id)
                centre = (row.get("dataset") or "unknown").strip() or "unknown"
                age, sex, site = ((row.get(c) or "").strip() if present else None for c, present in zip(CLINICAL_COLUMNS, clinical))
                records.append(Record(image_id, lesion_id, dx, centre, age, sex, site))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed metadata table ({exc})") from None
    except OSError as exc:  # permission denied, a failing disk
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not records:
        raise DataError(f"{path}: no rows")
    return records


JPEG_SUFFIXES = (".jpg", ".jpeg")  # any case: cameras and Windows tools often write .JPG


def find_images(root: Path) -> dict[str, Path]:
    """Map image_id -> path for every ISIC_*.jpg (or .jpeg, any case) below root (any sub-folder layout)."""
    return scan_images(root).found


@dataclass
class ImageScan:
    """What one walk of a data folder found, by image id."""

    found: dict[str, Path]  # the JPEG used for each id (the first in path order)
    others: dict[str, list[str]]  # names of ISIC_* files in other formats ("only a .png")
    copies: dict[str, list[Path]]  # every JPEG of an id found more than once (partial copies)
    broken: dict[str, Path]  # ISIC_*.jpg entries that are not readable files (e.g. dangling links)


def _walk_isic(root: Path, listed: frozenset[str] = frozenset()) -> list[Path]:
    """Every ISIC_* entry below root, and every entry whose name without suffix is a `listed`
    image id (a clinic's own images need not be named ISIC_*), sorted. Linked folders are
    followed (images kept on another disk); each real folder is read once, so a link loop ends."""
    entries: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        entries.extend(Path(folder) / name for name in names if name.startswith("ISIC_") or Path(name).stem in listed)
    return sorted(entries)


def scan_images(root: Path, listed: frozenset[str] = frozenset()) -> ImageScan:
    """One walk of the folder (see ImageScan); `listed`: the metadata's image ids."""
    scan = ImageScan({}, {}, {}, {})
    for path in _walk_isic(root, listed):
        if path.suffix.lower() not in JPEG_SUFFIXES:
            scan.others.setdefault(path.stem, []).append(path.name)
        elif not path.is_file():
            scan.broken.setdefault(path.stem, path)
        elif path.stem in scan.found:
            scan.copies.setdefault(path.stem, [scan.found[path.stem]]).append(path)
        else:
            scan.found[path.stem] = path
    return scan


def describe_missing(image_ids: list[str], others: dict[str, list[str]], broken: dict[str, Path] | None = None) -> dict[str, str]:
    """Why each listed image has no JPEG: a file of the same name in another format is named
    (only JPEG is read: the shipped models were trained on JPEG pixels), and so is a .jpg entry
    that is not a readable file (a link whose target is gone)."""
    broken = broken or {}

    def why(image_id: str) -> str:
        if image_id in broken:
            path = broken[image_id]
            target = f" -> {os.readlink(path)}" if path.is_symlink() else ""
            return f"missing: {path}{target} is not a readable file (broken link?)"
        if image_id in others:
            return f"missing: no JPEG file, only {', '.join(others[image_id])} (images must be .jpg/.jpeg)"
        return "missing: no image file found"

    return {image_id: why(image_id) for image_id in image_ids}


def conflicting_copies(copies: dict[str, list[Path]], root: Path) -> dict[str, str]:
    """Image ids whose copies differ in content -> why they are skipped (naming the copies).

    Identical copies are harmless; different ones (one of them empty or damaged, or another
    picture under the same id) cannot be told apart safely, so neither is used.
    """
    conflicts: dict[str, str] = {}
    for image_id, paths in copies.items():
        try:
            digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
        except OSError as exc:
            digests = {str(exc)}  # unreadable copy: treated as different
        if len(digests) > 1:
            names = ", ".join(str(p.relative_to(root)) for p in paths)
            conflicts[image_id] = f"conflicting copies with different content: {names} (keep one)"
    return conflicts


def decode_image(data: bytes, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """JPEG bytes -> (size, size, 3) uint8: centre square crop, then area resize.

    The centre square keeps the lesion's aspect ratio (HAM10000 lesions are centred);
    the same function runs at the clinic, so training and deployment see identical pixels.
    """
    # JPEG only (Pillow's JPEG opener also takes MPO, a JPEG with extra frames): a PNG, GIF or
    # 16-bit TIFF named .jpg would otherwise decode to other pixels than the models were trained
    # on (16-bit: nearly all white).
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
        img.load()
        rgb = img.convert("RGB")
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


class ImageCache:
    """Per-image cache of decoded arrays, content-addressed by sha256 of the JPEG bytes."""

    def __init__(self, cache_dir: Path | None = DEFAULT_CACHE_DIR, size: int = DEFAULT_IMAGE_SIZE) -> None:
        self.size = size
        self.root = None if cache_dir is None else Path(cache_dir) / f"images-v1-{size}px-centre"

    def _path(self, digest: str) -> Path:
        assert self.root is not None
        return self.root / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        if self.root is None:
            return None
        path = self._path(digest)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # empty or damaged (e.g. a power cut): decode again
            return None
        if not isinstance(arr, np.ndarray):  # a zip archive where an array belongs
            arr.close()
            return None
        return arr if arr.shape == (self.size, self.size, 3) and arr.dtype == np.uint8 else None

    def put(self, digest: str, image: np.ndarray) -> None:
        """Store one decoded image; best effort: the cache only saves time.

        A cache that cannot be written (read-only, full disk, a file in the way) is switched off
        for the rest of the run with one warning naming it, and the images are used as decoded.
        The entry is written whole (np.save into memory, then one write, which raises on a short
        write where np.save to a file does not), flushed to the disk and only then renamed into
        place, so a reader never sees a half-written entry under the final name. The flush
        matters after a power cut: without it the new name can survive while the data blocks
        did not, and an entry whose header survived but whose pixels are zeros would load as a
        black image instead of being decoded again (about 0.6 ms per entry, once).
        """
        if self.root is None:
            return
        path = self._path(digest)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        buffer = io.BytesIO()
        np.save(buffer, image)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as handle:
                handle.write(buffer.getvalue())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("image cache %s cannot be written (%s); going on without it", self.root, exc.strerror or exc)
            self.root = None


def load_images(
    paths: Iterable[tuple[str, Path]],
    size: int = DEFAULT_IMAGE_SIZE,
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """Decode (or fetch from cache) each (image_id, path).

    Returns (arrays by id, content hash by id, skipped id -> reason).
    """
    cache = ImageCache(cache_dir, size)
    items = list(paths)
    iterator: Iterable[tuple[str, Path]] = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="images", unit="img", leave=False)
    arrays: dict[str, np.ndarray] = {}
    hashes: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for image_id, path in iterator:
        try:
            data = path.read_bytes()
        except OSError as exc:
            skipped[image_id] = f"unreadable: {path} ({exc.strerror or exc})"
            continue
        if not data:
            skipped[image_id] = f"empty file: {path}"
            continue
        digest = hashlib.sha256(data).hexdigest()
        image = cache.get(digest)
        if image is None:
            try:
                image = decode_image(data, size)
            except UnidentifiedImageError:
                skipped[image_id] = f"not a JPEG image: {path}"
                continue
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                skipped[image_id] = f"corrupt image: {path} ({exc})"
                continue
            cache.put(digest, image)
        arrays[image_id] = image
        hashes[image_id] = digest
    return arrays, hashes, skipped


def load_dataset(
    root: Path | str,
    size: int = DEFAULT_IMAGE_SIZE,
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    class_names: tuple[str, ...] = CLASS_NAMES,
    progress: bool = False,
) -> Dataset:
    """Load a HAM10000-style folder into memory; skipped images are listed in `Dataset.skipped`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    metadata = find_metadata(root)
    records = read_metadata(metadata, class_names)
    listed = frozenset(r.image_id for r in records)
    scan = scan_images(root, listed)
    files = scan.found
    skipped = describe_missing([r.image_id for r in records if r.image_id not in files], scan.others, scan.broken)
    skipped.update(conflicting_copies({k: v for k, v in scan.copies.items() if k in listed}, root))
    present = [r for r in records if r.image_id in files and r.image_id not in skipped]
    arrays, hashes, bad = load_images(((r.image_id, files[r.image_id]) for r in present), size, cache_dir, progress)
    skipped.update(bad)
    kept = [r for r in present if r.image_id in arrays]
    if not kept:
        zips = sorted(p.name for p in root.glob("*.zip"))
        hint = f"; unpack {', '.join(zips)} first" if zips and all(v.startswith("missing") for v in skipped.values()) else ""
        raise DataError(f"{root}: none of the {len(records)} images listed in the metadata could be read ({describe_skipped(skipped, limit=3)}){hint}")
    # ISIC images the metadata does not list have no label: not used, but named, so a folder whose
    # metadata lacks rows does not quietly give a smaller `n`.
    skipped.update({k: f"not in {metadata.name}: no label, not used" for k in sorted(files) if k not in listed})
    index = {name: i for i, name in enumerate(class_names)}
    has_clinical = all(r.age is not None and r.sex is not None and r.site is not None for r in kept)
    return Dataset(
        images=np.stack([arrays[r.image_id] for r in kept]),
        labels=np.array([index[r.dx] for r in kept], dtype=np.int64),
        lesion_ids=np.array([r.lesion_id for r in kept]),
        centres=np.array([r.centre for r in kept]),
        image_ids=np.array([r.image_id for r in kept]),
        content_hashes=np.array([hashes[r.image_id] for r in kept]),
        class_names=class_names,
        skipped=skipped,
        ages=np.array([r.age for r in kept]) if has_clinical else None,
        sexes=np.array([r.sex for r in kept]) if has_clinical else None,
        sites=np.array([r.site for r in kept]) if has_clinical else None,
    )


def describe_skipped(skipped: dict[str, str], limit: int = 10) -> str:
    """A short human report of skipped images, naming the first few."""
    if not skipped:
        return "all images read"
    names = ", ".join(f"{k} ({v})" for k, v in list(skipped.items())[:limit])
    more = f" and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"skipped {len(skipped)} image(s): {names}{more}"
