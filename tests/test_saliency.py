"""Grad-CAM saliency crops: the map follows what the teacher looks at, boxes and crops are right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf_keras = pytest.importorskip("tf_keras")

from qana.saliency import (  # noqa: E402
    SaliencyError,
    Teacher,
    crop_images,
    gradcam,
    load_teacher,
    saliency_boxes,
)


def _red_teacher(size: int = 32):
    """A teacher whose class-0 score is the mean 'redness' of a 3x3-smoothed map: Grad-CAM = the red blob."""
    keras = tf_keras
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    red = keras.layers.Conv2D(1, 1, use_bias=False, name="red")(x)
    fmap = keras.layers.ReLU(name="fmap")(red)
    pooled = keras.layers.GlobalAveragePooling2D()(fmap)
    out = keras.layers.Dense(2, name="scores")(pooled)
    model = keras.Model(inputs, out)
    model.get_layer("red").set_weights([np.array([1.0, -1.0, -1.0], np.float32).reshape(1, 1, 3, 1)])
    model.get_layer("scores").set_weights([np.array([[1.0, -1.0]], np.float32), np.zeros(2, np.float32)])
    return model


def _blob_images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    images = np.full((n, size, size, 3), 60, np.uint8)
    centres = []
    for i in range(n):
        cy, cx = (int(v) for v in rng.integers(6, size - 6, 2))
        images[i, cy - 3 : cy + 3, cx - 3 : cx + 3] = (230, 20, 20)
        centres.append((cy, cx))
    return images, centres


def test_gradcam_and_box_follow_the_region_the_teacher_uses() -> None:
    images, centres = _blob_images(6)
    teacher = Teacher(_red_teacher(), 32, "fmap", "none", "test")
    cams = gradcam(teacher, images)
    assert cams.shape == (6, 32, 32) and cams.min() >= 0 and cams.max() <= 1
    boxes = saliency_boxes(cams, threshold=0.5, margin=0.1, min_side=0.3)
    for (cy, cx), (top, left, side) in zip(centres, boxes):
        assert top * 32 <= cy <= (top + side) * 32 and left * 32 <= cx <= (left + side) * 32
        assert side == pytest.approx(0.3)  # the 6-pixel blob is smaller than min_side
    crops = crop_images(images, boxes, 16)
    assert crops.shape == (6, 16, 16, 3)
    # the crop is lesion-centred: far more of it is the red blob than of the full image
    red_share = lambda a: float(np.mean(a[..., 0] > 150))  # noqa: E731
    assert red_share(crops) > 3 * red_share(images)


def test_boxes_stay_inside_the_image_and_bad_settings_are_refused() -> None:
    cam = np.zeros((1, 10, 10))
    cam[0, 0, 0] = 1.0  # salient corner: the box is moved inside, not cut
    (top, left, side), = saliency_boxes(cam, min_side=0.5)
    assert top == 0 and left == 0 and side == 0.5
    flat = saliency_boxes(np.zeros((1, 8, 8)))
    assert flat[0, 2] == 1.0  # nothing salient: keep the whole image
    with pytest.raises(SaliencyError):
        saliency_boxes(cam, threshold=0)


def test_the_resnet50_teacher_outputs_class_scores_not_probabilities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Grad-CAM must differentiate the predicted class's score: a softmax output's gradient is 0
    for a sure teacher. (A stand-in replaces ResNet-50: building it takes minutes here.)"""
    asked: dict = {}

    def stand_in(**kwargs):
        asked.update(kwargs)
        return _red_teacher(32)

    monkeypatch.setattr(tf_keras.applications, "ResNet50", stand_in)
    (tmp_path / "r50.h5").write_bytes(b"weights")
    teacher = load_teacher(f"resnet50:{tmp_path / 'r50.h5'}")
    assert teacher.preprocess == "resnet50"
    assert "classifier_activation" in asked and asked["classifier_activation"] is None
    assert asked["weights"] == str(tmp_path / "r50.h5") and asked["include_top"] is True


def test_crops_and_boxes_refuse_inputs_that_do_not_fit() -> None:
    """Fewer boxes than images (black crops), non-square or float sources, a map without rows."""
    src = np.zeros((5, 32, 32, 3), np.uint8)
    box = np.array([[0.25, 0.25, 0.5]])
    with pytest.raises(SaliencyError, match="5 source images but 3 boxes"):
        crop_images(src, box.repeat(3, 0), 16)
    with pytest.raises(SaliencyError, match=r"square RGB \(N, S, S, 3\), not of shape \(1, 32, 48, 3\)"):
        crop_images(np.zeros((1, 32, 48, 3), np.uint8), box, 16)
    with pytest.raises(SaliencyError, match="uint8 array, not float32"):
        crop_images(src.astype(np.float32), box.repeat(5, 0), 16)
    with pytest.raises(SaliencyError, match=r"\(N, h, w\), not of shape \(4, 4\)"):
        saliency_boxes(np.zeros((4, 4)))
    assert crop_images(src, box.repeat(5, 0), 16).shape == (5, 16, 16, 3)


def test_teacher_files_are_local_and_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SaliencyError, match="not found"):
        load_teacher(str(tmp_path / "missing.h5"))
    with pytest.raises(SaliencyError, match="no download"):
        load_teacher(f"resnet50:{tmp_path / 'nope.h5'}")
    model = _red_teacher()
    model.save(tmp_path / "teacher.h5")
    teacher = load_teacher(str(tmp_path / "teacher.h5"))
    assert teacher.size == 32 and teacher.layer == "fmap"


def test_unusable_teacher_files_are_saliency_errors_naming_the_file(tmp_path: Path) -> None:
    """A zip that holds no model and a teacher of unfixed input size: SaliencyError, not KeyError/TypeError."""
    import zipfile

    keras = tf_keras
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as z:
        z.writestr("x.txt", "not a model")
    with pytest.raises(SaliencyError, match=r"empty.keras: teacher model cannot be loaded as a tf_keras model"):
        load_teacher(str(tmp_path / "empty.keras"))
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, name="c")(inputs)
    keras.Model(inputs, keras.layers.Dense(7)(keras.layers.GlobalAveragePooling2D()(x))).save(tmp_path / "fcn.h5")
    with pytest.raises(SaliencyError, match=r"fcn.h5: teacher model takes input \(None, None, None, 3\): its image size is not fixed"):
        load_teacher(str(tmp_path / "fcn.h5"))


def test_training_stage_adds_one_crop_per_training_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qana.saliency
    from qana.data import load_dataset
    from qana.train import TrainOptions, stage_saliency, with_saliency_crops
    from tests.synthetic import make_synthetic_ham

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=24, image_size=40, seed=3)
    _red_teacher(32).save(tmp_path / "teacher.h5")
    opts = TrainOptions(data=clinic.root, run_dir=tmp_path / "run", image_size=32, cache_dir=tmp_path / "cache",
                        saliency_teacher=str(tmp_path / "teacher.h5"), command="test")
    opts.run_dir.mkdir()
    dataset = load_dataset(clinic.root, size=32, cache_dir=opts.cache_dir)
    train = dataset.subset(np.arange(16))
    sides: list[int] = []
    real_crop = qana.saliency.crop_images
    monkeypatch.setattr(qana.saliency, "crop_images", lambda src, boxes, size: sides.append(src.shape[1]) or real_crop(src, boxes, size))
    info = stage_saliency(opts, dataset, train)
    assert info["enabled"] and info["images"] == 16
    # crops are cut at twice the input size (the teacher's 32 is smaller), as the module says
    assert sides == [64] and "at twice the model input size, or at the\n   teacher's input size if that is larger" in qana.saliency.__doc__
    augmented = with_saliency_crops(opts, train)
    assert len(augmented) == 32
    np.testing.assert_array_equal(augmented.images[:16], train.images)
    np.testing.assert_array_equal(augmented.labels[16:], train.labels)
    assert not np.array_equal(augmented.images[16:], train.images)
    off = TrainOptions(data=clinic.root, run_dir=tmp_path / "run", command="test")
    assert stage_saliency(off, dataset, train) == {"enabled": False}
    assert with_saliency_crops(off, train) is train


def _teacher_run(path: Path, split: dict[str, np.ndarray], finished: bool = True) -> Path:
    """An earlier run's folder holding its split.npz, its float.h5 (the red teacher) and, when its
    float stage finished, that stage's marker float.json."""
    path.mkdir(parents=True)
    np.savez(path / "split.npz", **split)
    _red_teacher(32).save(path / "float.h5")
    if finished:
        (path / "float.json").write_text("{}")
    return path


SPLIT = {"train": np.arange(10), "val": np.arange(10, 14), "test": np.arange(14, 18), "image_ids": np.array([f"i{i}" for i in range(18)])}


def test_a_saliency_teacher_whose_run_is_being_redone_is_refused(tmp_path: Path) -> None:
    """A rerun (--fresh, other settings) removes float.json first but replaces float.h5 only at its
    float stage: that float.h5 was trained on the old split, so it must not choose the crops."""
    from qana.train import TrainOptions, check_teacher_paths, saliency_teacher_split_checked

    student = tmp_path / "student"
    student.mkdir()
    np.savez(student / "split.npz", **SPLIT)
    redone = _teacher_run(tmp_path / "redone", SPLIT, finished=False)
    opts = TrainOptions(data=tmp_path, run_dir=student, image_size=32, saliency_teacher=str(redone / "float.h5"))
    for check in (check_teacher_paths, saliency_teacher_split_checked):
        with pytest.raises(SaliencyError, match=r"float stage of its run .*redone has not finished"):
            check(opts)
    (redone / "float.json").write_text("{}")
    assert saliency_teacher_split_checked(opts) is True


def test_a_saliency_teacher_from_a_run_sees_images_with_its_runs_colour_constancy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shades-of-gray run's float.h5 gets corrected pixels in a plain run (as qana.distill's
    --teacher does); a plain teacher for a shades-of-gray run is refused before any stage."""
    import qana.saliency
    from qana.data import load_dataset
    from qana.preprocess import shades_of_gray
    from qana.train import TrainOptions, check_teacher_paths, stage_saliency
    from tests.synthetic import make_synthetic_ham

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=12, image_size=40, seed=3)
    dataset = load_dataset(clinic.root, size=32, cache_dir=tmp_path / "cache")
    split = {"train": np.arange(8), "val": np.arange(8, 10), "test": np.arange(10, 12), "image_ids": dataset.image_ids}
    teacher = _teacher_run(tmp_path / "teacher", split)
    (teacher / "options.json").write_text('{"image_size": 32, "colour_constancy": "shades-of-gray"}')
    opts = TrainOptions(data=clinic.root, run_dir=tmp_path / "run", image_size=32, cache_dir=tmp_path / "cache",
                        saliency_teacher=str(teacher / "float.h5"), command="test")
    opts.run_dir.mkdir()
    np.savez(opts.run_dir / "split.npz", **split)
    train = dataset.subset(split["train"])
    seen: list[np.ndarray] = []
    real = qana.saliency.gradcam
    monkeypatch.setattr(qana.saliency, "gradcam", lambda t, images, batch_size=64: seen.append(np.array(images)) or real(t, images))
    info = stage_saliency(opts, dataset, train)
    assert not np.array_equal(train.images, shades_of_gray(train.images))  # the correction changes these pixels
    np.testing.assert_array_equal(seen[0], shades_of_gray(train.images))
    assert info["teacher_colour_constancy"] == "shades-of-gray"

    (teacher / "split.npz").unlink()  # a model copied with only its run's settings: still seen its way
    seen.clear()
    stage_saliency(opts, dataset, train)
    np.testing.assert_array_equal(seen[0], shades_of_gray(train.images))

    (teacher / "options.json").write_text('{"image_size": 32, "colour_constancy": "none"}')
    from dataclasses import replace

    with pytest.raises(SaliencyError, match="colour constancy 'none' and this run with 'shades-of-gray'"):
        check_teacher_paths(replace(opts, colour_constancy="shades-of-gray"))


def test_both_kinds_of_teacher_refuse_the_same_files_for_the_same_reason(tmp_path: Path) -> None:
    """--teacher (qana.distill) and --saliency-teacher loaded model files with two copies of the
    checks and said different things (an unfixed size was "not square RGB" for one of them)."""
    import zipfile

    from qana.distill import TeacherError, load_teacher_model

    keras = tf_keras
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as z:
        z.writestr("x.txt", "not a model")
    inputs = keras.Input((None, None, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    keras.Model(inputs, keras.layers.Dense(7)(pooled)).save(tmp_path / "fcn.h5")
    inputs = keras.Input((32, 48, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    keras.Model(inputs, keras.layers.Dense(7)(pooled)).save(tmp_path / "wide.h5")
    for name, reason in [
        ("empty.keras", "cannot be loaded as a tf_keras model"),
        ("fcn.h5", "its image size is not fixed"),
        ("wide.h5", r"takes input \(None, 32, 48, 3\), not square RGB images"),
    ]:
        with pytest.raises(SaliencyError, match=reason):
            load_teacher(str(tmp_path / name))
        with pytest.raises(TeacherError, match=reason):
            load_teacher_model(tmp_path / name)
