"""Data-incremental learning at a clinic: `qana-client learn`, the feature cache, the stable split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic import make_synthetic_ham
from typer.testing import CliRunner

from client.cli import app
from client.clinic import SPLIT_FILE, ClinicError, persistent_split
from client.features import FeatureCache
from qana.bundle import load_bundle
from qana.data import load_dataset
from qana.head import head_from_npz, predict, quantize_head
from qana.splits import grouped_split

TINY_V2 = Path(__file__).parent / "fixtures" / "bundles" / "tiny-v2"
runner = CliRunner()


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(TINY_V2)


def grow(folder: Path, n_images: int, size: int, seed: int) -> list[str]:
    """Add images (new lesions, new ids) to a synthetic clinic folder, as new arrivals would."""
    extra = make_synthetic_ham(folder.parent / f"more-{seed}", n_images=n_images, image_size=size, seed=seed, image_id_offset=500_000)
    for image_id in extra.image_ids:
        (folder / "images" / f"{image_id}.jpg").write_bytes((extra.root / "images" / f"{image_id}.jpg").read_bytes())
    lines = extra.metadata.read_text().splitlines()[1:]
    with (folder / "HAM10000_metadata.csv").open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    return extra.image_ids


class BackboneSpy:
    """Counts the images that go through the Akida backbone (AkidaRuntime.features)."""

    def __init__(self, monkeypatch) -> None:
        from qana.runtime import AkidaRuntime

        self.calls: list[int] = []
        real = AkidaRuntime.features

        def spy(runtime, images, *args, **kwargs):
            self.calls.append(len(images))
            return real(runtime, images, *args, **kwargs)

        monkeypatch.setattr(AkidaRuntime, "features", spy)


def learn(*args) -> object:
    return runner.invoke(app, ["learn", "--device", "software", "--epochs", "5", *[str(a) for a in args]])


# --------------------------------------------------------------------------- the held-out split


def test_split_is_kept_when_the_folder_grows(tmp_path) -> None:
    rng = np.random.default_rng(0)
    lesions = np.array([f"L{i:03d}" for i in range(60) for _ in range(int(rng.integers(1, 3)))])
    labels = np.array([int(lesion[1:]) % 3 for lesion in lesions])
    path = tmp_path / SPLIT_FILE
    train, held, assigned = persistent_split(path, labels, lesions, 0.25, seed=0)
    assert assigned == 60
    # the first split is exactly the plain grouped split (what simulations reproduce)
    ref_train, ref_held = grouped_split(labels, lesions, (0.75, 0.25), seed=0)
    np.testing.assert_array_equal(train, ref_train)
    np.testing.assert_array_equal(held, ref_held)
    side = {lesion: "eval" for lesion in lesions[held]} | {lesion: "train" for lesion in lesions[train]}

    # the folder grows: new lesions, and a new image of an old lesion, inserted before the old rows
    new_lesions = np.array([f"N{i:03d}" for i in range(20)] + ["L000"])
    grown_lesions = np.concatenate([new_lesions, lesions])
    grown_labels = np.concatenate([np.arange(21) % 3, labels])
    # recomputing the split moves lesions between sides: the bug this state file prevents
    moved_train, _ = grouped_split(grown_labels, grown_lesions, (0.75, 0.25), seed=0)
    recomputed = set(grown_lesions[moved_train].tolist())
    assert any((lesion in recomputed) != (s == "train") for lesion, s in side.items())

    train2, held2, assigned2 = persistent_split(path, grown_labels, grown_lesions, 0.25, seed=0)
    assert assigned2 == 20
    assert sorted(np.concatenate([train2, held2]).tolist()) == list(range(len(grown_lesions)))
    for rows, name in ((train2, "train"), (held2, "eval")):
        for lesion in grown_lesions[rows].tolist():
            if lesion.startswith("L"):
                assert side[lesion] == name, lesion
    assert any(lesion.startswith("N") for lesion in grown_lesions[held2])  # new lesions are held out too
    # a third call with nothing new changes nothing
    before = path.read_bytes()
    train3, held3, assigned3 = persistent_split(path, grown_labels, grown_lesions, 0.25, seed=0)
    assert assigned3 == 0 and path.read_bytes() == before
    np.testing.assert_array_equal(train3, train2)
    np.testing.assert_array_equal(held3, held2)


def test_an_unreadable_split_file_is_an_error_not_a_silent_resplit(tmp_path) -> None:
    path = tmp_path / SPLIT_FILE
    path.write_text("{not json")
    with pytest.raises(ClinicError, match="split file .* is unreadable"):
        persistent_split(path, np.array([0, 1]), np.array(["a", "b"]), 0.5, seed=0)
    assert path.read_text() == "{not json"


# --------------------------------------------------------------------------- qana-client learn


def test_learn_runs_the_backbone_only_on_new_images_and_measures_forgetting(tmp_path, bundle, monkeypatch) -> None:
    size = bundle.input_shape[0]
    data = make_synthetic_ham(tmp_path / "data", n_images=40, image_size=size, seed=5).root
    cache = tmp_path / "cache"
    spy = BackboneSpy(monkeypatch)

    first = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache, "--bundle", TINY_V2)
    assert first.exit_code == 0, first.output
    assert sum(spy.calls) == 40 and "40 new" in first.output and "starting from the bundle head" in first.output
    deployed = cache / "deployed" / bundle.bundle_id
    head_1 = head_from_npz((deployed / "head.npz").read_bytes())
    split_1 = json.loads((cache / SPLIT_FILE).read_text())["lesions"]

    new_ids = grow(data, 8, size, seed=77)
    spy.calls.clear()
    second = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)  # the deployed bundle
    assert second.exit_code == 0, second.output
    assert sum(spy.calls) == 8, spy.calls  # a cache hit skips the backbone: only the new images ran
    assert "48 (8 new, 8 through the backbone; 40 earlier)" in second.output
    assert "starting from the deployed head" in second.output
    split_2 = json.loads((cache / SPLIT_FILE).read_text())["lesions"]
    assert {k: split_2[k] for k in split_1} == split_1 and len(split_2) > len(split_1)
    head_2 = head_from_npz((deployed / "head.npz").read_bytes())
    assert not np.array_equal(head_1.weights, head_2.weights)
    info = json.loads((deployed / "deployed.json").read_text())
    assert info["source"] == "qana-client learn" and info["new_images"] == 8

    # the reported before/after numbers are those of the two heads on the earlier held-out images
    dataset = load_dataset(data, size=size, cache_dir=None, class_names=bundle.classes)
    feats, computed = FeatureCache(cache, bundle).features(dataset, extractor=None)  # all cached: no extractor needed
    assert computed == 0
    earlier = np.array(
        [split_2[lesion] == "eval" and image not in new_ids for lesion, image in zip(dataset.lesion_ids, dataset.image_ids)]
    )
    assert earlier.any()
    top1 = [float(np.mean(predict(quantize_head(h, bundle.target), feats[earlier]) == dataset.labels[earlier])) for h in (head_1, head_2)]
    expected = f"earlier held-out ({int(earlier.sum())} images): top-1 {100 * top1[0]:.1f}% -> {100 * top1[1]:.1f}%"
    assert expected in second.output, second.output
    assert "on-device agreement 100.0%" in second.output

    # nothing new: nothing runs, nothing changes
    spy.calls.clear()
    before = (deployed / "head.npz").read_bytes()
    third = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert third.exit_code == 0 and sum(spy.calls) == 0 and "unchanged" in third.output
    assert (deployed / "head.npz").read_bytes() == before


def test_learn_on_bad_input_is_one_error_line_and_keeps_the_deployed_model(tmp_path, bundle) -> None:
    size = bundle.input_shape[0]
    data = make_synthetic_ham(tmp_path / "data", n_images=24, image_size=size, seed=3).root
    cache = tmp_path / "cache"
    missing = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert missing.exit_code == 2 and "no bundle is deployed" in missing.output
    assert learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache, "--bundle", TINY_V2).exit_code == 0
    deployed = cache / "deployed" / bundle.bundle_id
    saved = {p.name: p.read_bytes() for p in deployed.iterdir()}

    (data / "HAM10000_metadata.csv").unlink()
    result = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "HAM10000_metadata.csv" in errors[0], result.output
    assert {p.name: p.read_bytes() for p in deployed.iterdir()} == saved

    wrong = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache, "--bundle", tmp_path)
    assert wrong.exit_code == 2 and wrong.output.startswith("error: ")
    assert {p.name: p.read_bytes() for p in deployed.iterdir()} == saved


# --------------------------------------------------------------------------- failures keep what is stored


def first_learn(tmp_path: Path, bundle, n_images: int, seed: int) -> tuple[Path, Path, Path]:
    """A synthetic clinic whose first `learn` from the tiny bundle has deployed a head: (data, cache, deployed folder)."""
    data = make_synthetic_ham(tmp_path / "data", n_images=n_images, image_size=bundle.input_shape[0], seed=seed).root
    cache = tmp_path / "cache"
    first = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache, "--bundle", TINY_V2)
    assert first.exit_code == 0, first.output
    return data, cache, cache / "deployed" / bundle.bundle_id


def test_a_failed_learn_keeps_the_new_images_new_and_the_deployed_model_whole(tmp_path, bundle, monkeypatch) -> None:
    data, cache, deployed = first_learn(tmp_path, bundle, 30, seed=11)
    saved = {p.name: p.read_bytes() for p in deployed.iterdir()}
    grow(data, 8, bundle.input_shape[0], seed=78)

    # a step size that blows the head up: refused, nothing deployed changes
    diverged = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache, "--learning-rate", "1e30")
    assert diverged.exit_code == 2 and "--learning-rate" in diverged.output, diverged.output
    assert "Traceback" not in diverged.output and {p.name: p.read_bytes() for p in deployed.iterdir()} == saved
    # through the API, where no option range applies: a finite but exploded head is refused too
    # (Adam moves each weight by at most the step size, so no NaN or Inf ever shows up)
    from client.clinic import Clinic, ClinicConfig
    from qana.head import TrainConfig

    clinic = Clinic(ClinicConfig.from_node_config({"data-dir": str(data), "clinic-id": "clinic-x", "device": "software", "cache-dir": str(cache)}))
    with pytest.raises(ClinicError, match="the head update diverged"):
        clinic.learn(bundle.bundle_id, TrainConfig(epochs=1, learning_rate=1e38))
    assert {p.name: p.read_bytes() for p in deployed.iterdir()} == saved

    # a crash while the new deployed set is being written: the old set stays, as a whole
    import client.clinic as clinic_module

    def broken_head_bytes(head):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(clinic_module, "head_to_npz", broken_head_bytes)
    full = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert full.exit_code == 2 and "No space left on device" in full.output
    assert {p.name: p.read_bytes() for p in deployed.iterdir()} == saved
    assert [p.name for p in (cache / "deployed").iterdir()] == [bundle.bundle_id]  # no half-built folder left
    monkeypatch.undo()

    # the 8 images were cached by the failed runs but never learned: still new
    ok = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert ok.exit_code == 0, ok.output
    assert "38 (8 new, 0 through the backbone; 30 earlier)" in ok.output
    assert json.loads((deployed / "deployed.json").read_text())["new_images"] == 8
    again = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert again.exit_code == 0 and "unchanged" in again.output  # learned now: no longer new


def test_an_interrupted_swap_of_the_deployed_folder_is_undone(tmp_path, bundle) -> None:
    data, cache, deployed = first_learn(tmp_path, bundle, 24, seed=12)
    saved = {p.name: p.read_bytes() for p in deployed.iterdir()}
    # a crash between the swap's two renames leaves only `.ID.previous`
    deployed.rename(deployed.with_name(f".{deployed.name}.previous"))
    result = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert result.exit_code == 0 and "starting from the deployed head" in result.output, result.output
    assert {p.name: p.read_bytes() for p in deployed.iterdir()} == saved


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 truncated"])
def test_damaged_cache_files_are_rebuilt_and_a_damaged_head_is_named(tmp_path, bundle, damage) -> None:
    data, cache, deployed = first_learn(tmp_path, bundle, 24, seed=13)
    size = bundle.input_shape[0]
    # a feature cache and an image cache entry cut short (e.g. by a power cut): rebuilt, with no error
    features = cache / "features" / f"{bundle.bundle_id}.npz"
    features.write_bytes(damage)
    image_entry = next((cache / f"images-v1-{size}px-centre").rglob("*.npy"))
    image_entry.write_bytes(damage)
    saved = (deployed / "head.npz").read_bytes()
    rebuilt = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert rebuilt.exit_code == 0, rebuilt.output
    # the features were recomputed, but the seen-images record knows every image: none is new,
    # so the deployed head is not retrained on the same images
    assert "24 (0 new, 24 through the backbone" in rebuilt.output and "unchanged" in rebuilt.output, rebuilt.output
    assert (deployed / "head.npz").read_bytes() == saved
    # a clinic cache from before that record: the split file still knows every lesion
    features.write_bytes(damage)
    (cache / "seen" / f"{bundle.bundle_id}.json").unlink()
    by_lesion = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert by_lesion.exit_code == 0 and "24 (0 new, 24 through the backbone" in by_lesion.output, by_lesion.output
    assert "feature cache was unreadable" in by_lesion.output and (deployed / "head.npz").read_bytes() == saved
    # the deployed head is the clinic's own state: a damaged one is an error naming it, never replaced silently
    head = deployed / "head.npz"
    head.write_bytes(damage)
    named = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert named.exit_code == 2 and str(head) in named.output and "Traceback" not in named.output, named.output
    assert head.read_bytes() == damage


def test_a_deleted_feature_cache_does_not_make_learned_images_new(tmp_path, bundle) -> None:
    """Deleting the feature cache (to free space) costs a backbone pass, not a retraining."""
    data, cache, deployed = first_learn(tmp_path, bundle, 24, seed=16)
    saved = (deployed / "head.npz").read_bytes()
    (cache / "features" / f"{bundle.bundle_id}.npz").unlink()
    result = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert result.exit_code == 0 and "24 (0 new, 24 through the backbone" in result.output, result.output
    assert "unchanged" in result.output and (deployed / "head.npz").read_bytes() == saved
    # images added since are still new, and only they
    grow(data, 6, bundle.input_shape[0], seed=81)
    (cache / "features" / f"{bundle.bundle_id}.npz").unlink()
    grown = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert grown.exit_code == 0 and "30 (6 new, 30 through the backbone" in grown.output, grown.output


def _relabel(metadata: Path, image_id: str, dx: str) -> str:
    """Correct one image's diagnosis in the clinic's metadata; returns the old one."""
    import csv

    with metadata.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    row = next(r for r in rows if r["image_id"] == image_id)
    old, row["dx"] = row["dx"], dx
    with metadata.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return old


def test_a_corrected_diagnosis_is_relearned(tmp_path, bundle) -> None:
    """A diagnosis corrected in the metadata (say, after histology) has not been learned under its new label."""
    data, cache, deployed = first_learn(tmp_path, bundle, 40, seed=17)
    sides = json.loads((cache / SPLIT_FILE).read_text())["lesions"]
    dataset = load_dataset(data, size=bundle.input_shape[0], cache_dir=cache)
    row = next(i for i in range(len(dataset)) if sides[str(dataset.lesion_ids[i])] == "train")
    image_id = str(dataset.image_ids[row])
    old = dataset.class_names[int(dataset.labels[row])]
    new = next(c for c in bundle.classes if c != old)
    assert _relabel(data / "HAM10000_metadata.csv", image_id, new) == old
    saved = (deployed / "head.npz").read_bytes()
    result = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert "40 (1 new, 1 of them with a corrected diagnosis, 0 through the backbone; 39 earlier); new lesions: 0" in result.output
    assert (deployed / "head.npz").read_bytes() != saved and json.loads((deployed / "deployed.json").read_text())["new_images"] == 1
    again = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert again.exit_code == 0 and "40 (0 new" in again.output and "unchanged" in again.output, again.output
    # corrected back: the head last learned the other label, so it is new once more
    _relabel(data / "HAM10000_metadata.csv", image_id, old)
    back = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert back.exit_code == 0 and "1 of them with a corrected diagnosis" in back.output, back.output


def test_an_unreadable_seen_record_is_rebuilt_from_the_feature_cache(tmp_path, bundle, caplog) -> None:
    data, cache, deployed = first_learn(tmp_path, bundle, 24, seed=18)
    record = cache / "seen" / f"{bundle.bundle_id}.json"
    saved = (deployed / "head.npz").read_bytes()
    for damage in (b"", b'{"format": 1, "images": ["not", "a", "mapping"]}'):
        record.write_bytes(damage)
        with caplog.at_level("WARNING"):
            result = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
        assert result.exit_code == 0 and "24 (0 new, 0 through the backbone" in result.output, result.output
        assert f"seen-images record {record} is unreadable" in caplog.text
        assert (deployed / "head.npz").read_bytes() == saved
        assert json.loads(record.read_text())["format"] == 1  # rebuilt
        caplog.clear()


def test_a_new_class_the_data_lacks_is_an_error(tmp_path, bundle) -> None:
    data, cache, _ = first_learn(tmp_path, bundle, 24, seed=14)
    result = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache, "--new-class", "melanoma")
    assert result.exit_code == 2 and "new class 'melanoma': no image" in result.output, result.output
    assert learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache, "--seed", "-1").exit_code == 2


def test_new_images_of_held_out_lesions_only_do_not_retrain_the_head(tmp_path, bundle) -> None:
    """Nothing to train on: retraining on the same training images would replace the deployed head for nothing."""
    import csv

    from PIL import Image

    data, cache, deployed = first_learn(tmp_path, bundle, 60, seed=15)  # enough lesions per class for held-out ones
    saved = (deployed / "head.npz").read_bytes()
    sides = json.loads((cache / SPLIT_FILE).read_text())["lesions"]
    with (data / "HAM10000_metadata.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    held = next(r for r in rows if sides[r["lesion_id"]] == "eval")
    with Image.open(data / "images" / f"{held['image_id']}.jpg") as img:  # another photograph of a held-out lesion
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "images" / "ISIC_0999999.jpg")
    with (data / "HAM10000_metadata.csv").open("a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=list(rows[0])).writerow({**held, "image_id": "ISIC_0999999"})
    result = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert "61 (1 new, 1 through the backbone; 60 earlier); new lesions: 0 (0 held out)" in result.output
    assert "every new image belongs to a held-out lesion" in result.output and "unchanged" in result.output
    assert (deployed / "head.npz").read_bytes() == saved
    again = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert again.exit_code == 0 and "0 new" in again.output, again.output


def test_images_first_seen_in_a_round_that_does_not_train_stay_new_for_learn(tmp_path, bundle) -> None:
    # an evaluate round caches their features; they used to count as learned ("nothing new")
    from client.clinic import Clinic, ClinicConfig
    from protocols.messages import EvaluateSettings, TrainSettings

    data, cache, _ = first_learn(tmp_path, bundle, 40, seed=14)
    clinic = Clinic(ClinicConfig.from_node_config({"data-dir": str(data), "clinic-id": "clinic-x", "device": "software", "cache-dir": str(cache)}))
    head = bundle.load_head()
    grow(data, 8, bundle.input_shape[0], seed=78)
    arrived = {line.split(",")[0] for line in (data / "HAM10000_metadata.csv").read_text().splitlines() if line.startswith("HAM_078")}
    clinic.evaluate(head, EvaluateSettings(1, bundle.bundle_id, "ab" * 32))
    after_evaluate = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert after_evaluate.exit_code == 0 and "8 new, 0 through the backbone" in after_evaluate.output, after_evaluate.output
    # their lesions were given a side by the evaluate round, but they are new lesions all the same
    assert 0 < len(arrived) and f"new lesions: {len(arrived)} (" in after_evaluate.output, after_evaluate.output

    # a training round learns the new training-side images: they are not new for `learn` after it
    grow(data, 8, bundle.input_shape[0], seed=79)
    clinic.evaluate(head, EvaluateSettings(2, bundle.bundle_id, "ab" * 32))
    clinic.train(head, TrainSettings(3, bundle.bundle_id, "ab" * 32, local_epochs=2))
    after_train = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert after_train.exit_code == 0 and "8 new" not in after_train.output, after_train.output


def test_images_first_seen_by_an_interrupted_training_round_stay_new_for_learn(tmp_path, bundle, monkeypatch) -> None:
    """A training round caches new images' features before it trains; stopped (or failed) before
    training finished, it has learned nothing, so the next `learn` must still see them as new."""
    import client.clinic
    from client.clinic import Clinic, ClinicConfig
    from protocols.messages import TrainSettings

    data, cache, _ = first_learn(tmp_path, bundle, 40, seed=15)
    clinic = Clinic(ClinicConfig.from_node_config({"data-dir": str(data), "clinic-id": "clinic-x", "device": "software", "cache-dir": str(cache)}))
    grow(data, 8, bundle.input_shape[0], seed=80)

    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt("the clinic was stopped during the round's training")

    monkeypatch.setattr(client.clinic, "train_local_head", stopped)
    with pytest.raises(KeyboardInterrupt):
        clinic.train(bundle.load_head(), TrainSettings(1, bundle.bundle_id, "ab" * 32, local_epochs=2))
    monkeypatch.undo()
    after = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)
    assert after.exit_code == 0 and "8 new, 0 through the backbone" in after.output, after.output


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--proximal-mu", "nan", "is not a finite number"),
        ("--proximal-mu", "inf", "is not in the range"),
        ("--learning-rate", "nan", "is not a finite number"),
    ],
)
def test_learn_refuses_a_step_that_is_not_a_finite_number(tmp_path, option, value, message) -> None:
    """Click's range checks let NaN through; the update would then fail and blame the learning rate."""
    result = learn("--data", tmp_path, "--clinic-id", "clinic-x", "--cache-dir", tmp_path / "cache", option, value)
    assert result.exit_code == 2 and message in result.output and option in result.output, result.output


def test_a_file_in_the_way_of_the_default_cache_is_named(tmp_path, monkeypatch) -> None:
    import client.clinic

    blocker = tmp_path / "clinics"
    blocker.write_text("not a folder")
    monkeypatch.setattr(client.clinic, "DEFAULT_CACHE_ROOT", blocker)
    data = make_synthetic_ham(tmp_path / "data", n_images=4, image_size=16, seed=1).root
    result = learn("--data", data, "--clinic-id", "clinic-x")
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: cache folder {blocker / 'clinic-x'}: {blocker} is a file, not a folder"), result.output


def test_learn_adds_a_requested_new_class_whose_images_are_already_cached(tmp_path, bundle) -> None:
    # the federation deployed a head without "df"; the clinic's df images were cached in that
    # round, and `learn --new-class df` used to stop at "nothing new"
    from client.clinic import Clinic, ClinicConfig
    from protocols.messages import EvaluateSettings
    from qana.head import select_classes

    data = make_synthetic_ham(tmp_path / "data", n_images=40, image_size=bundle.input_shape[0], seed=16).root
    cache = tmp_path / "cache"
    clinic = Clinic(ClinicConfig.from_node_config({"data-dir": str(data), "clinic-id": "clinic-x", "device": "software", "cache-dir": str(cache)}))
    clinic.adopt_bundle(bundle)
    without_df = select_classes(bundle.load_head(), [c for c in bundle.classes if c != "df"])
    clinic.evaluate(without_df, EvaluateSettings(1, bundle.bundle_id, "ab" * 32))
    plain = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache)  # learns what the round cached
    assert plain.exit_code == 0 and "df training image(s)" in plain.output and "add one with --new-class" in plain.output, plain.output
    result = learn("--data", data, "--clinic-id", "clinic-x", "--cache-dir", cache, "--new-class", "df")
    assert result.exit_code == 0 and "new class(es) added to the head: df" in result.output, result.output


def test_lesions_arriving_a_few_at_a_time_are_still_held_out_at_the_asked_share(tmp_path) -> None:
    # one new lesion per class per batch: each batch split on its own held out none, ever
    path = tmp_path / SPLIT_FILE
    lesions = [f"L{i:03d}" for i in range(70)]
    labels = [i % 7 for i in range(70)]
    persistent_split(path, np.array(labels), np.array(lesions), 0.2, seed=0)
    for batch in range(10):
        lesions += [f"B{batch}-{c}" for c in range(7)]
        labels += list(range(7))
        _, held, assigned = persistent_split(path, np.array(labels), np.array(lesions), 0.2, seed=0)
        assert assigned == 7
    new_held = [lesion for lesion in np.array(lesions)[held].tolist() if lesion.startswith("B")]
    assert 12 <= len(new_held) <= 16  # 20 % of 70 new lesions, class by class
    sides = json.loads(path.read_text())["lesions"]
    for c in range(7):
        mine = [side for lesion, side in sides.items() if labels[lesions.index(lesion)] == c]
        assert mine.count("eval") == round(0.2 * len(mine))


def test_learn_refuses_a_seed_smote_cannot_take(tmp_path) -> None:
    """sklearn/imblearn take seeds below 2**32; a larger one failed in SMOTE and was blamed on the learning rate."""
    result = learn("--data", tmp_path, "--clinic-id", "clinic-x", "--cache-dir", tmp_path / "cache", "--seed", 2**32)
    assert result.exit_code == 2 and "is not in the range" in result.output and "--seed" in result.output, result.output
