"""The head stage keeps a retrained head only where it measurably beats the converted one."""

from __future__ import annotations

import numpy as np

from qana.train import MEASURABLE, bootstrap_wins


def test_a_clearly_better_head_wins_and_a_hair_better_one_does_not() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 1200)
    good = labels.copy()
    wrong = rng.random(1200) < 0.4
    good[wrong] = (labels[wrong] + 1) % 7
    better = good.copy()
    fixed = np.flatnonzero(wrong)[:200]  # 200 more right answers: a clear gain
    better[fixed] = labels[fixed]
    assert bootstrap_wins(labels, better, good, seed=0) >= MEASURABLE
    # a different head: 30 images fixed, 27 others broken -- net 3 of 1,200, within noise
    hair = good.copy()
    hair[np.flatnonzero(wrong)[:30]] = labels[np.flatnonzero(wrong)[:30]]
    broken = np.flatnonzero(~wrong)[:27]
    hair[broken] = (labels[broken] + 2) % 7
    assert (hair == labels).sum() - (good == labels).sum() == 3
    assert bootstrap_wins(labels, hair, good, seed=0) < MEASURABLE
    assert bootstrap_wins(labels, good, good, seed=0) == 0.0  # a tie is not a win
