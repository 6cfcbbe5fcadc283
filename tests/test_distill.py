"""Distillation: teachers must share the student's split; targets mix label and teacher views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tf_keras as keras  # noqa: E402

from qana.distill import (  # noqa: E402
    TeacherError,
    check_teacher,
    check_teacher_files,
    mixed_targets,
    teacher_probabilities,
)
from qana.train import TrainOptions, _fit, distillation_targets  # noqa: E402
from qana.views import dihedral_view  # noqa: E402
from tests.test_weight_ema import _data  # noqa: E402


def _corner_model() -> keras.Model:
    """Logits depend on the top-left pixel only, so every orientation gives other probabilities."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Cropping2D(((0, 7), (0, 7)))(inputs)
    x = keras.layers.Flatten()(keras.layers.Rescaling(1.0 / 64.0)(x))
    return keras.Model(inputs, keras.layers.Dense(7, kernel_initializer="glorot_normal")(x))


def _run(path: Path, split: dict[str, np.ndarray], model: keras.Model | None) -> Path:
    path.mkdir(parents=True)
    np.savez(path / "split.npz", **split)
    if model is not None:
        model.save(path / "float.h5")
        (path / "float.json").write_text("{}")  # the float stage's marker: the run finished it
    return path


SPLIT = {"train": np.arange(10), "val": np.arange(10, 14), "test": np.arange(14, 18), "image_ids": np.array([f"i{i}" for i in range(18)])}


def test_a_teacher_from_another_split_or_without_a_model_is_refused(tmp_path: Path) -> None:
    student = _run(tmp_path / "student", SPLIT, None)
    other = dict(SPLIT, train=np.arange(1, 11), val=np.r_[0, np.arange(11, 14)])
    with pytest.raises(TeacherError, match="another split"):
        check_teacher(_run(tmp_path / "leaky", other, _corner_model()), student)
    with pytest.raises(TeacherError, match="float stage has not finished"):
        check_teacher(_run(tmp_path / "unfinished", SPLIT, None), student)
    assert check_teacher(_run(tmp_path / "good", SPLIT, _corner_model()), student).model.name == "float.h5"
    (tmp_path / "good" / "options.json").write_text('{"image_size": 80}')  # the model, not its options, says
    with pytest.raises(TeacherError, match="takes 8x8 images, this run 80x80"):
        check_teacher(tmp_path / "good", student, image_size=80)


def test_a_teacher_whose_float_stage_is_being_redone_is_refused(tmp_path: Path) -> None:
    """A rerun (--fresh, other settings) removes float.json first but replaces float.h5 only at its
    float stage: the float.h5 left there was trained on the old split and must not teach."""
    student = _run(tmp_path / "student", SPLIT, None)
    redone = _run(tmp_path / "redone", SPLIT, _corner_model())
    (redone / "float.json").unlink()
    for check in (check_teacher_files, lambda run: check_teacher(run, student)):
        with pytest.raises(TeacherError, match=r"teacher .*redone: its float stage has not finished"):
            check(redone)


def _damage(run: Path, case: str) -> None:
    if case == "truncated float.h5":
        (run / "float.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    elif case == "float.h5 not HDF5":
        (run / "float.h5").write_bytes(b"not a model")
    elif case == "options.json unreadable":
        (run / "options.json").write_text("{")
    elif case == "split.npz unreadable":
        (run / "split.npz").write_bytes(b"garbage")
    elif case == "split.npz without image_ids":
        np.savez(run / "split.npz", train=SPLIT["train"], val=SPLIT["val"], test=SPLIT["test"])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated float.h5", r"teacher model .*float.h5 cannot be loaded"),
        ("float.h5 not HDF5", r"teacher model .*float.h5 cannot be loaded"),
        ("options.json unreadable", r"options.json: unreadable run settings"),
        ("split.npz unreadable", r"split.npz: unreadable split record"),
        ("split.npz without image_ids", r"split.npz: unreadable split record .*image_ids"),
        ("16x16 teacher", r"takes 16x16 images, this run 8x8"),
    ],
)
def test_an_unusable_teacher_run_is_refused_before_any_stage(tmp_path: Path, case: str, message: str) -> None:
    """Damaged records or a model of another size: a TeacherError naming the file and the problem,
    from the check `qana train` runs before any stage (not a raw error at the float stage)."""
    from qana.train import check_teacher_paths

    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, keras.layers.Dense(7)(keras.layers.Flatten()(inputs))) if case == "16x16 teacher" else _corner_model()
    teacher = _run(tmp_path / "teacher", SPLIT, model)
    _damage(teacher, case)
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path / "student", image_size=8, teachers=(str(teacher),))
    with pytest.raises(TeacherError, match=message):
        check_teacher_paths(opts)


def test_a_mistyped_teacher_or_its_model_file_is_named_as_such(tmp_path: Path) -> None:
    """A typo or the float.h5 itself (what --saliency-teacher takes) is not "an unfinished run"."""
    good = _run(tmp_path / "runs" / "v2-main", SPLIT, _corner_model())
    with pytest.raises(TeacherError, match=r"teacher run directory not found: .*v2-mian"):
        check_teacher_files(tmp_path / "runs" / "v2-mian")
    with pytest.raises(TeacherError, match=r"--teacher takes a run directory, not a model file: use .*v2-main,"):
        check_teacher_files(good / "float.h5")
    assert check_teacher_files(good) == good / "float.h5"


def test_targets_are_the_label_mixed_with_the_teachers_mean_over_views(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    teachers = [_corner_model(), _corner_model()]
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    probs = teacher_probabilities(teachers, images, views=4)

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    expected = np.mean(
        [softmax(m.predict(dihedral_view(images, i).astype(np.float32), verbose=0)) for m in teachers for i in range(4)], axis=0
    )
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    assert not np.allclose(probs, softmax(teachers[0].predict(images.astype(np.float32), verbose=0)), atol=1e-3)
    labels = np.array([0, 1, 2, 3, 4])
    mixed = mixed_targets(labels, probs, 0.25)
    np.testing.assert_allclose(mixed.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(mixed[np.arange(5), labels], 0.25 + 0.75 * probs[np.arange(5), labels], rtol=1e-5)
    with pytest.raises(ValueError, match="label weight"):
        mixed_targets(labels, probs, 1.5)


def test_mixed_targets_refuse_labels_and_rows_they_cannot_mean() -> None:
    probs = np.full((3, 7), 1 / 7, np.float32)
    with pytest.raises(ValueError, match=r"class indices in \[0, 7\); got -1..1"):
        mixed_targets(np.array([-1, 0, 1]), probs, 0.5)  # -1 used to become the last class
    with pytest.raises(ValueError, match=r"1-D array of class indices, not shape \(3, 1\)"):
        mixed_targets(np.array([[0], [1], [2]], np.int64), probs, 0.5)
    with pytest.raises(ValueError, match="integer class indices, not float"):
        mixed_targets(np.array([0.0, 1.0, 2.0]), probs, 0.5)
    with pytest.raises(ValueError, match="probabilities .* not logits"):
        mixed_targets(np.array([0, 1, 2]), np.full((3, 7), 0.5, np.float32), 0.5)
    assert mixed_targets(np.array([0, 1, 2]), probs, 0.5).shape == (3, 7)


def test_the_float_stage_trains_on_mixed_targets(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    train, val = _data(21, 0), _data(14, 1)
    split = {"train": np.arange(21), "val": np.arange(21, 35), "test": np.arange(35, 36), "image_ids": np.array([f"i{i}" for i in range(36)])}
    student = _run(tmp_path / "student", split, None)
    teacher = _run(tmp_path / "teacher", split, _corner_model())
    opts = TrainOptions(data=tmp_path, run_dir=student, image_size=8, batch_size=8, teachers=(str(teacher),), label_weight=0.5)
    targets = distillation_targets(opts, train)
    assert targets.shape == (21, 7) and np.all(targets[np.arange(21), train.labels] >= 0.5)
    assert distillation_targets(TrainOptions(data=tmp_path, run_dir=student), train) is None
    model = _corner_model()
    history = _fit(model, train, val, opts, epochs=1, lr=0.01, weights_path=tmp_path / "w.h5", targets=targets)
    assert len(history) == 1 and (tmp_path / "w.h5").is_file()


@pytest.mark.parametrize("distill", [False, True])
def test_qat_learns_the_float_models_probabilities_only_with_qat_distill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, float_copy_quantizer: None, distill: bool
) -> None:
    """(float_copy_quantizer: what QAT is taught does not depend on quantizeml.)"""
    import qana.train
    from qana.model import ModelSpec, build_model

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    train, val = _data(24, 0), _data(14, 1)
    train.images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    val.images = rng.integers(0, 256, (14, 32, 32, 3), dtype=np.uint8)
    float_model = build_model(ModelSpec(target="v2", input_size=32, width=8, feature_dim=32, attention="none"))
    float_model.save(tmp_path / "float.h5")
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, image_size=32, qat_epochs=1, qat_distill=distill)
    seen: list = []
    monkeypatch.setattr(qana.train, "_fit", lambda *args, targets=None, **kw: seen.append(targets) or [])
    info = qana.train.stage_quantized(opts, train, val)
    assert len(seen) == 1 and info["val_fine_tuned"]
    if distill:
        expected = teacher_probabilities([qana.train.load_float(opts)], train.images, views=8)
        np.testing.assert_allclose(seen[0], expected, rtol=1e-5)
    else:
        assert seen[0] is None


def test_each_teacher_sees_images_with_its_own_colour_constancy(tmp_path: Path) -> None:
    """A shades-of-gray teacher teaching a plain student is fed corrected pixels; the reverse is refused."""
    from qana.preprocess import shades_of_gray

    keras.utils.set_random_seed(0)
    train = _data(12, 0)
    train.images = np.random.default_rng(3).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    train.images[..., 0] //= 3  # a colour cast, so correcting it changes the pixels
    split = {"train": np.arange(12), "val": np.arange(12, 14), "test": np.arange(14, 16), "image_ids": np.array([f"i{i}" for i in range(16)])}
    student = _run(tmp_path / "student", split, None)
    model = _corner_model()
    corrected = _run(tmp_path / "sog", split, model)
    (corrected / "options.json").write_text('{"image_size": 8, "colour_constancy": "shades-of-gray"}')
    plain = _run(tmp_path / "plain", split, model)

    teacher = check_teacher(corrected, student, image_size=8)
    assert teacher.colour_constancy == "shades-of-gray"
    np.testing.assert_array_equal(teacher.inputs(train.images), shades_of_gray(train.images))
    opts = TrainOptions(data=tmp_path, run_dir=student, image_size=8, teachers=(str(corrected),), label_weight=0.0)
    np.testing.assert_allclose(distillation_targets(opts, train), teacher_probabilities([model], shades_of_gray(train.images)), rtol=1e-5)
    both = TrainOptions(data=tmp_path, run_dir=student, image_size=8, teachers=(str(corrected), str(plain)), label_weight=0.0)
    expected = (teacher_probabilities([model], shades_of_gray(train.images)) + teacher_probabilities([model], train.images)) / 2
    np.testing.assert_allclose(distillation_targets(both, train), expected, rtol=1e-5)

    assert check_teacher(corrected, student, colour_constancy="shades-of-gray").inputs(train.images, "shades-of-gray") is train.images
    with pytest.raises(TeacherError, match="colour constancy 'none' and this run with 'shades-of-gray'"):
        check_teacher(plain, student, colour_constancy="shades-of-gray")


def test_the_float_stage_loads_each_teacher_once_and_still_refuses_another_size(tmp_path: Path, monkeypatch) -> None:
    """distillation_targets loaded every teacher twice (once to read its size, once to predict);
    now the load that predicts is the one that checks, so a wrong size is still a clear error."""
    train = _data(12, 0)
    train.images = np.random.default_rng(4).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    student = _run(tmp_path / "student", SPLIT, None)
    teacher = _run(tmp_path / "teacher", SPLIT, _corner_model())
    loads: list[Path] = []
    real = keras.models.load_model
    monkeypatch.setattr(keras.models, "load_model", lambda path, **kw: loads.append(Path(path)) or real(path, **kw))
    opts = TrainOptions(data=tmp_path, run_dir=student, image_size=8, teachers=(str(teacher),), label_weight=0.0)
    assert distillation_targets(opts, train).shape == (12, 7)
    assert loads == [teacher / "float.h5"]

    train.images = np.zeros((12, 16, 16, 3), dtype=np.uint8)  # e.g. the file replaced by a 16x16 run's
    with pytest.raises(TeacherError, match="takes 8x8 images, this run 16x16"):
        distillation_targets(TrainOptions(data=tmp_path, run_dir=student, image_size=16, teachers=(str(teacher),)), train)
