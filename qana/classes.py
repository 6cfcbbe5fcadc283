"""The fixed class order shared by every component.

Index i of every logit vector, head row and confusion-matrix axis is CLASS_NAMES[i].
The order is HAM10000's seven diagnoses in alphabetical order, as in the dataset's own
documentation, so it never depends on which classes a particular folder happens to hold.
Classes added later by class-incremental learning are appended after these.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

CLASS_DESCRIPTIONS: dict[str, str] = {
    "akiec": "actinic keratoses / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesions",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevi",
    "vasc": "vascular lesions",
}


def class_index(name: str, classes: tuple[str, ...] = CLASS_NAMES) -> int:
    """Index of a class name, with an error that lists the known classes."""
    try:
        return classes.index(name)
    except ValueError:
        raise ValueError(f"unknown class {name!r}; known classes: {', '.join(classes)}") from None
