"""Knowledge distillation: soft training targets from earlier runs' float models.

An ensemble of float models, each seeing every test-time view of an image, is more accurate
than any one of them (measured on validation: see the README), but a clinic runs one backbone.
Training the shipped-size model on a mix of the true label and the ensemble's averaged class
probabilities passes much of that on (Hinton et al. 2015): the soft targets say which wrong
classes an image resembles, which a one-hot label cannot.

Teachers must come from runs with the same split as the student. A teacher trained on another
split has seen validation or test lesions and would leak them into the student, so a teacher
whose `split.npz` differs is refused.

A teacher sees each image with its own pixel preprocessing (`--colour-constancy`, recorded in
its options.json): a colour-corrected teacher fed uncorrected pixels would teach from inputs it
never saw. The student's images are already preprocessed its way, so a teacher with other
preprocessing can be served only when the student's is "none" (the decoded pixels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qana.head import NPZ_ERRORS, class_indices, softmax
from qana.preprocess import check_colour_constancy, preprocess
from qana.run_record import OPTIONS_FILE, stage_marker
from qana.views import check_view_count, dihedral_view


class TeacherError(ValueError):
    """A teacher run that cannot be used (missing, trained on another split or size, or on images
    the student's cannot be turned into)."""


@dataclass(frozen=True)
class Teacher:
    """A checked teacher run: its float model file and the pixel preprocessing it was trained with."""

    model: Path
    colour_constancy: str = "none"

    def check_serves(self, student_colour_constancy: str) -> None:
        """Refuse a teacher whose images cannot be made from the student's preprocessed ones."""
        if self.colour_constancy != student_colour_constancy and student_colour_constancy != "none":
            raise TeacherError(
                f"teacher {self.model.parent} was trained with colour constancy {self.colour_constancy!r} and this run "
                f"with {student_colour_constancy!r}: its images cannot be recovered from this run's, so use a teacher "
                "trained with the same --colour-constancy, or teach a run without it"
            )

    def inputs(self, images: np.ndarray, student_colour_constancy: str = "none") -> np.ndarray:
        """The student's (already preprocessed) images as this teacher must see them."""
        self.check_serves(student_colour_constancy)
        if self.colour_constancy == student_colour_constancy:
            return images
        return preprocess(images, self.colour_constancy)


def float_stage_finished(run_dir: Path) -> bool:
    """Whether `run_dir` records its float stage as finished (its stage marker, float.json).

    Why the marker and not float.h5: a rerun with --fresh or other settings removes the markers
    first but overwrites float.h5 only when its own float stage ends, so until then float.h5 is the
    earlier model, trained on a split the new split.npz no longer describes."""
    return stage_marker(Path(run_dir), "float").is_file()


def check_teacher_files(teacher_run: Path) -> Path:
    """A teacher run's float.h5, refused if the run is not there, its float stage is not recorded
    as finished, or its split.npz is missing: checked before a run changes anything, so a
    mistyped --teacher costs no stage."""
    teacher_run = Path(teacher_run)
    if teacher_run.is_file():  # the form --saliency-teacher takes, an easy mix-up
        raise TeacherError(f"--teacher takes a run directory, not a model file: use {teacher_run.parent}, not {teacher_run}")
    if not teacher_run.is_dir():
        raise TeacherError(f"teacher run directory not found: {teacher_run}")
    model = teacher_run / "float.h5"
    if not float_stage_finished(teacher_run):
        raise TeacherError(
            f"teacher {teacher_run}: its float stage has not finished (no float.json; e.g. the run is still "
            "going or being redone), so a float.h5 there may be an earlier model trained on another split; "
            "let that run finish its float stage first"
        )
    if not model.is_file():
        raise TeacherError(f"teacher {teacher_run}: no float.h5, although its float stage is recorded as finished")
    if not (teacher_run / "split.npz").is_file():
        raise TeacherError(f"teacher {teacher_run}: no split.npz, so it cannot be checked for leakage")
    return model


SPLIT_KEYS = ("train", "val", "test", "image_ids")


def read_split(run_dir: Path) -> dict[str, np.ndarray]:
    """A run's split.npz (the four arrays the leakage check compares), refused with the file named
    when it cannot be read: a damaged record must stop the check, not pass it or give a traceback."""
    path = Path(run_dir) / "split.npz"
    try:
        with np.load(path) as z:
            return {k: z[k] for k in SPLIT_KEYS}
    except NPZ_ERRORS as exc:  # what reading a damaged .npz raises (a cut-off copy: EOFError too)
        raise TeacherError(f"{path}: unreadable split record ({str(exc) or type(exc).__name__}), so the teacher cannot be checked for leakage") from None


def same_split(teacher_run: Path, student_run: Path) -> bool:
    """Whether two run directories hold the same split of the same images (split.npz)."""
    t, s = read_split(teacher_run), read_split(student_run)
    return all(np.array_equal(t[k], s[k]) for k in SPLIT_KEYS)


def read_run_options(teacher_run: Path) -> dict:
    """The teacher run's options.json ({} if it has none: runs older than the file), refused
    with the file named when it cannot be read."""
    path = Path(teacher_run) / OPTIONS_FILE
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TeacherError(f"{path}: unreadable run settings ({exc})") from None
    if not isinstance(options, dict):
        raise TeacherError(f"{path}: not a run's settings (a JSON object was expected)")
    return options


def load_teacher_model(model_file: Path, image_size: int | None = None):
    """A teacher's tf_keras model, refused with the file named when it is not a loadable model of
    fixed square RGB input or (given `image_size`) takes another image size than this run's.
    One load both checks and serves: the float stage predicts with the model it checked."""
    from qana.model import ModelFileError, load_square_rgb_model

    try:
        model, side = load_square_rgb_model(model_file)
    except ModelFileError as exc:
        raise TeacherError(f"teacher model {model_file} {exc}") from None
    if image_size is not None and side != image_size:
        raise TeacherError(f"teacher {Path(model_file).parent} takes {side}x{side} images, this run {image_size}x{image_size}")
    return model


def check_teacher_run(teacher_run: Path, image_size: int | None = None, colour_constancy: str = "none") -> Teacher:
    """Everything about a teacher run that can be checked before this run has a split: the float
    stage finished, its model loads and takes this run's image size (the model itself says, not
    its options.json), its records are readable and its images can be made from this run's.
    `qana train` calls it before any stage, so an unusable --teacher costs no stage."""
    teacher_run = Path(teacher_run)
    model = check_teacher_files(teacher_run)
    options = read_run_options(teacher_run)
    read_split(teacher_run)
    if image_size is not None:
        load_teacher_model(model, image_size)
    return run_teacher(model, options, colour_constancy)


def run_teacher(model: Path, options: dict, student_colour_constancy: str = "none") -> Teacher:
    """An earlier run's model as a Teacher that sees images the way that run trained (the colour
    constancy in its `options`), refused if this run's images cannot be turned into those. Used
    for --teacher and for a --saliency-teacher that is a run's float.h5 alike."""
    colour_constancy = options.get("colour_constancy", "none")
    try:
        check_colour_constancy(colour_constancy)
    except ValueError as exc:
        raise TeacherError(f"teacher {Path(model).parent}: {exc} in its options.json") from None
    teacher = Teacher(Path(model), colour_constancy)
    teacher.check_serves(student_colour_constancy)  # refused before any training, not half-way
    return teacher


def check_teacher(
    teacher_run: Path, student_run: Path, image_size: int | None = None, colour_constancy: str = "none"
) -> Teacher:
    """The teacher's float model and preprocessing, after checking its run used the student's split
    and images the student's can be turned into."""
    teacher = check_teacher_run(teacher_run, image_size, colour_constancy)
    if not same_split(teacher_run, student_run):
        raise TeacherError(
            f"teacher {teacher_run} was trained on another split than {student_run}: it has seen validation or "
            "test lesions of this run; use runs with the same data and seed"
        )
    return teacher


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


def ensemble_probabilities(teachers: list[Teacher], images: np.ndarray, student_colour_constancy: str = "none", views: int = 8) -> np.ndarray:
    """Mean over `teachers` of each one's class probabilities over `views` orientations, each
    teacher seeing the student's images with its own preprocessing (`Teacher.inputs`). Each model
    is loaded once, here, and refused if it does not take the images' size."""
    if not teachers:
        raise TeacherError("no teacher models given")
    return np.mean(
        [
            teacher_probabilities([load_teacher_model(t.model, images.shape[1])], t.inputs(images, student_colour_constancy), views)
            for t in teachers
        ],
        axis=0,
    ).astype(np.float32)


def mixed_targets(labels: np.ndarray, teacher: np.ndarray, label_weight: float) -> np.ndarray:
    """label_weight x one-hot(labels) + (1 - label_weight) x teacher probabilities, per image.

    Inputs it cannot mean are refused, not turned into wrong targets: a label -1 would index the
    last class, (N, 1) labels would give (N, N, C) targets, logits would give rows not summing to 1."""
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"the label weight must be in [0, 1], not {label_weight}")
    teacher = np.asarray(teacher)
    if teacher.ndim != 2:
        raise ValueError(f"teacher probabilities must be (images, classes), not of shape {teacher.shape}")
    labels = class_indices(labels, teacher.shape[0], teacher.shape[1])  # the check every learner uses
    if len(teacher) and (teacher.min() < 0 or not np.allclose(teacher.sum(axis=1), 1.0, atol=1e-4)):
        raise ValueError("teacher rows must be probabilities (non-negative, summing to 1), e.g. not logits")
    onehot = np.eye(teacher.shape[1], dtype=np.float32)[labels]
    return (label_weight * onehot + (1.0 - label_weight) * teacher).astype(np.float32)
