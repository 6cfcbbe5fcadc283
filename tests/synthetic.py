"""Small synthetic HAM10000-style clinic folders for tests, simulations and benchmarks.

`make_synthetic_ham` writes what `qana.data.load_dataset` reads: `HAM10000_metadata.csv`
(the Dataverse columns) and `images/ISIC_*.jpg`. Each class has its own lesion colour and
blob size on a noisy skin-tone background, so a head on any reasonable backbone can learn
them, but images are not identical (position, radius, noise and JPEG artefacts vary). Lesions
have 1-3 images each (as in HAM10000) so lesion-grouped splits are exercised. Optionally a
few listed files are corrupt (not a JPEG) or missing, to exercise the skip-and-report path.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from qana.classes import CLASS_NAMES

COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")

# Lesion colour (RGB) and relative radius per class: far apart so features separate them.
CLASS_STYLE: dict[str, tuple[tuple[int, int, int], float]] = {
    "akiec": ((200, 40, 40), 0.30),
    "bcc": ((40, 170, 60), 0.38),
    "bkl": ((60, 60, 200), 0.26),
    "df": ((220, 200, 40), 0.34),
    "mel": ((20, 20, 20), 0.40),
    "nv": ((150, 80, 30), 0.22),
    "vasc": ((210, 60, 200), 0.32),
}


# Body site per class, so the metadata carries a signal the clinical prior (qana.clinical) can
# learn, as HAM10000's does (a weaker one there).
CLASS_SITE: dict[str, str] = {
    "akiec": "face", "bcc": "neck", "bkl": "trunk", "df": "lower extremity",
    "mel": "back", "nv": "abdomen", "vasc": "scalp",
}


@dataclass
class SyntheticClinic:
    """What was written (for assertions)."""

    root: Path
    image_ids: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    lesion_ids: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> Path:
        return self.root / "HAM10000_metadata.csv"


# HAM10000's four source centres (metadata column `dataset`): simulations split clinics by them
HAM_CENTRES = ("rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias")


def _render(rng: np.random.Generator, dx: str, size: int) -> np.ndarray:
    colour, radius = CLASS_STYLE[dx]
    skin = np.array([225, 180, 150], dtype=np.float64) + rng.normal(0, 8, 3)
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = skin
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = (size - 1) / 2 + rng.normal(0, size * 0.05, 2)
    r = radius * size * rng.uniform(0.85, 1.15)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
    img[mask] = np.array(colour, dtype=np.float64) + rng.normal(0, 10, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synthetic_ham(
    root: Path | str,
    n_images: int = 40,
    image_size: int = 32,
    seed: int = 0,
    centres: Sequence[str] = ("synthetic",),
    classes: Sequence[str] = CLASS_NAMES,
    class_probs: Sequence[float] | None = None,
    n_corrupt: int = 0,
    n_missing: int = 0,
    image_id_offset: int = 0,
) -> SyntheticClinic:
    """Write a HAM10000-style folder with `n_images` readable images (+ corrupt/missing extras).

    Every class in `classes` gets at least one lesion when n_images allows; `class_probs`
    skews the rest (e.g. nv-heavy like HAM10000). `centres` fill the `dataset` column in turn.
    `image_id_offset` keeps ids unique across clinics written with different seeds.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = tuple(classes)
    unknown = [c for c in classes if c not in CLASS_STYLE]
    if unknown:
        raise ValueError(f"no synthetic style for class(es) {unknown}")
    probs = np.full(len(classes), 1.0 / len(classes)) if class_probs is None else np.asarray(class_probs, float)
    probs = probs / probs.sum()
    out = SyntheticClinic(root)
    rows: list[dict[str, str]] = []
    next_image = image_id_offset + seed * 10_000
    lesion_no = 0
    written = 0
    while written < n_images:
        dx = classes[lesion_no] if lesion_no < len(classes) else classes[rng.choice(len(classes), p=probs)]
        lesion_id = f"HAM_{seed:03d}{lesion_no:05d}"
        lesion_no += 1
        for _ in range(min(int(rng.integers(1, 4)), n_images - written)):
            image_id = f"ISIC_{next_image:07d}"
            next_image += 1
            buf = io.BytesIO()
            Image.fromarray(_render(rng, dx, image_size)).save(buf, format="JPEG", quality=92)
            (root / "images" / f"{image_id}.jpg").write_bytes(buf.getvalue())
            rows.append(_row(lesion_id, image_id, dx, centres[written % len(centres)], rng))
            out.image_ids.append(image_id)
            out.labels.append(dx)
            out.lesion_ids.append(lesion_id)
            written += 1
    for kind, count in (("corrupt", n_corrupt), ("missing", n_missing)):
        for _ in range(count):
            image_id = f"ISIC_{next_image:07d}"
            next_image += 1
            dx = classes[int(rng.integers(len(classes)))]
            if kind == "corrupt":
                (root / "images" / f"{image_id}.jpg").write_bytes(b"this is not a JPEG file\n")
                out.corrupt.append(image_id)
            else:
                out.missing.append(image_id)
            rows.append(_row(f"HAM_{seed:03d}{lesion_no:05d}", image_id, dx, centres[0], rng))
            lesion_no += 1
    with out.metadata.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return out


def _row(lesion_id: str, image_id: str, dx: str, centre: str, rng: np.random.Generator) -> dict[str, str]:
    return {
        "lesion_id": lesion_id,
        "image_id": image_id,
        "dx": dx,
        "dx_type": "histo",
        "age": str(int(rng.integers(20, 85))),
        "sex": "female" if rng.random() < 0.5 else "male",
        "localization": CLASS_SITE.get(dx, "unknown"),
        "dataset": centre,
    }


def as_dataverse_tab(clinic: SyntheticClinic, name: str = "HAM10000_metadata.tab") -> Path:
    """Replace the folder's CSV by the form Harvard Dataverse serves by default: tab-separated,
    text in double quotes, numbers (age) bare, an empty field where a value is missing."""
    with clinic.metadata.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    numeric = {rows[0].index("age")} if "age" in rows[0] else set()
    lines = ["\t".join(rows[0])]
    lines += ["\t".join(v if i in numeric or not v else f'"{v}"' for i, v in enumerate(row)) for row in rows[1:]]
    path = clinic.root / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    clinic.metadata.unlink()
    return path
