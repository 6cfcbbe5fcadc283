"""Knowledge distillation: soft training targets from earlier runs' float models.

An ensemble of float models, each seeing every test-time view of an image, is more accurate
than any one of them (measured on validation: see the README), but a clinic runs one backbone.
Training the shipped-size model on a mix of the true label and the ensemble's averaged class
probabilities passes much of that on (Hinton et al. 2015): the soft targets say which wrong
classes an image resembles, which a one-hot label cannot.

Teachers must come from runs with the same split as the student. A teacher trained on another
split has seen validation or test lesions and would leak them into the student, so a teacher
whose `split.npz` differs is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qana.head import softmax
from qana.views import check_view_count, dihedral_view


class TeacherError(ValueError):
    """A teacher run that cannot be used (missing, or trained on another split)."""


def check_teacher(teacher_run: Path, student_run: Path, image_size: int | None = None) -> Path:
    """The teacher's float model file, after checking its run used the student's split."""
    teacher_run = Path(teacher_run)
    model = teacher_run / "float.h5"
    if not model.is_file():
        raise TeacherError(f"teacher {teacher_run}: no float.h5 (the run's float stage has not finished)")
    split = teacher_run / "split.npz"
    if not split.is_file():
        raise TeacherError(f"teacher {teacher_run}: no split.npz, so it cannot be checked for leakage")
    options = teacher_run / "options.json"
    if options.is_file() and image_size is not None:
        teacher_size = json.loads(options.read_text()).get("image_size", image_size)
        if teacher_size != image_size:
            raise TeacherError(f"teacher {teacher_run} takes {teacher_size}x{teacher_size} images, this run {image_size}x{image_size}")
    with np.load(split) as t, np.load(Path(student_run) / "split.npz") as s:
        same = all(np.array_equal(t[k], s[k]) for k in ("train", "val", "test", "image_ids"))
    if not same:
        raise TeacherError(
            f"teacher {teacher_run} was trained on another split than {student_run}: it has seen validation or "
            "test lesions of this run; use runs with the same data and seed"
        )
    return model


def teacher_probabilities(models: list, images: np.ndarray, views: int = 8) -> np.ndarray:
    """Mean class probabilities of Keras `models` over `views` orientations of each image."""
    if not models:
        raise TeacherError("no teacher models given")
    views = check_view_count(views, "teacher views")
    per_model = []
    for model in models:
        per_view = [
            softmax(model.predict(dihedral_view(images, i).astype(np.float32), batch_size=256, verbose=0))
            for i in range(views)
        ]
        per_model.append(np.mean(per_view, axis=0))
    return np.mean(per_model, axis=0).astype(np.float32)


def mixed_targets(labels: np.ndarray, teacher: np.ndarray, label_weight: float) -> np.ndarray:
    """label_weight x one-hot(labels) + (1 - label_weight) x teacher probabilities, per image."""
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"the label weight must be in [0, 1], not {label_weight}")
    if teacher.shape[0] != len(labels):
        raise ValueError(f"{len(labels)} labels but {teacher.shape[0]} teacher rows")
    onehot = np.eye(teacher.shape[1], dtype=np.float32)[labels]
    return (label_weight * onehot + (1.0 - label_weight) * teacher).astype(np.float32)
