"""benchmarks/contrast_hue.py: the hue turn it reports is the training contrast's own."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark
from synthetic import make_synthetic_ham

pytest.importorskip("tensorflow")

from tests.test_augment import _pink  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "contrast_hue.py"


def test_grey_contrast_turns_no_hue_and_per_channel_contrast_does():
    bench = load_benchmark("contrast_hue")
    images = _pink(3)  # a colour cast the +-20 % contrast never clips
    for factor in bench.FACTORS:
        assert bench.hue_turns(images, "grey", factor).max() < 0.01
        per_channel = bench.hue_turns(images, "per-channel", factor)
        assert per_channel.size == images[..., 0].size and np.median(per_channel) > 0.5
    grey_images = np.full((1, 8, 8, 3), 128, np.uint8)
    assert bench.hue_turns(grey_images, "per-channel", 0.8).size == 0  # hue without meaning is not counted


def test_the_script_prints_both_contrasts_and_refuses_a_negative_limit(tmp_path: Path):
    data = make_synthetic_ham(tmp_path / "ham", n_images=6, image_size=40, seed=3).root
    out = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--image-size", "16"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("per-channel", "grey"))]
    assert [(r[0], r[1]) for r in rows] == [("per-channel", "0.8"), ("per-channel", "1.2"), ("grey", "0.8"), ("grey", "1.2")]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--limit", "-1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--limit must be at least 0, not -1" in bad.stderr
