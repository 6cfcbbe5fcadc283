"""benchmarks/rerun_from_bundle.py: a shipped bundle's run directory, rebuilt from the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark
from synthetic import make_synthetic_ham

from qana.bundle import PACKAGE_BUNDLES, load_bundle, write_bundle

rerun = load_benchmark("rerun_from_bundle")


def test_the_bundle_command_is_pointed_at_the_new_run_and_data() -> None:
    manifest = {"training": {"command": "qana train --data ../d --run-dir runs/a --seed 0 --epochs 40"}}
    words = rerun.rerun_command(manifest, Path("runs/b"), Path("/data"))
    assert words[:2] == ["qana", "train"]
    assert words.count("--run-dir") == 1 and words[words.index("--run-dir") + 1] == "runs/b"
    assert words.count("--data") == 1 and words[words.index("--data") + 1] == "/data"
    assert words[words.index("--epochs") + 1] == "40" and words[words.index("--seed") + 1] == "0"


@pytest.mark.parametrize("option", ["--pretrain-epochs 100", "--pretrain-epochs=100", "--saliency-teacher t.h5"])
def test_a_stage_the_bundle_does_not_carry_is_refused(option: str) -> None:
    manifest = {"training": {"command": f"qana train --data d --run-dir r {option}"}}
    with pytest.raises(SystemExit, match=option.split("=")[0].split()[0]):
        rerun.rerun_command(manifest, Path("x"), Path("d"))


def test_a_bundle_without_keras_models_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        rerun.main([str(PACKAGE_BUNDLES / "v2-s7"), str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "does not ship float.h5, quantized.h5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _bundle_with_keras_models(tmp_path: Path, data: Path, split: dict) -> Path:
    shipped = load_bundle(PACKAGE_BUNDLES / "v2-s7")
    manifest = {k: v for k, v in shipped.manifest.items() if k not in ("files", "format_version")}
    manifest["training"] = {"command": f"qana train --data {data} --run-dir runs/old --seed 3", "split": split}
    models = {}
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in rerun.KERAS_MODELS:
        models[name] = tmp_path / name
        models[name].write_bytes(f"stand-in for {name}".encode())
    return write_bundle(tmp_path / "bundle", shipped.path / "model.fbz", (shipped.path / "head.npz").read_bytes(), manifest, models).path


@pytest.mark.timeout(300)
def test_the_run_is_split_as_recorded_and_resumes_after_the_quantized_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=60, image_size=32, seed=5)
    wrong = {"n_images": 60, "n_lesions": 1, "train": 1, "val": 1, "test": 1}
    bundle = _bundle_with_keras_models(tmp_path / "b1", clinic.root, wrong)
    # A split that does not match the bundle's record: refused, nothing copied.
    assert rerun.main([str(bundle), str(tmp_path / "run1"), "--data", str(clinic.root)]) == 2
    assert "error: the split differs" in capsys.readouterr().err
    assert not (tmp_path / "run1" / "quantized.h5").exists()
    made = json.loads((tmp_path / "run1" / "split.json").read_text())

    bundle = _bundle_with_keras_models(tmp_path / "b2", clinic.root, {k: made[k] for k in wrong})
    run = tmp_path / "run2"
    assert rerun.main([str(bundle), str(run), "--data", str(clinic.root)]) == 0
    printed = capsys.readouterr().out
    assert f"--run-dir {run}" in printed and "--seed 3" in printed
    for name in rerun.KERAS_MODELS:
        assert (run / name).read_bytes() == (bundle / name).read_bytes()
    finished = {p.stem for p in run.glob("*.json")} - {"options"}
    assert finished == {"split", "saliency", "pretrain", "float", "quantized"}
    # An existing run directory is never reused.
    with pytest.raises(SystemExit) as exit_info:
        rerun.main([str(bundle), str(run), "--data", str(clinic.root)])
    assert exit_info.value.code == 2
