"""Dice and HD95 against hand-computed values and an independent brute-force oracle; the empty rule."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_dense.tasks import metrics3d
from mamba_dense.tasks.metrics3d import (
    EMPTY_RULE, dice_coefficient, hausdorff_distance, mask_surface, score_case, summarize, summary_table, write_csv,
)


def _cube(shape, start, side=10) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m[tuple(slice(s, s + side) for s in start)] = True
    return m


def test_shifted_cube_hand_computed():
    # A 10^3 cube and the same cube shifted by 2 voxels along W.
    # Dice = 2 * (8 * 10 * 10) / (1000 + 1000) = 0.8.
    # Directed distances of the 488 surface voxels (10^3 - 8^3) of the shifted cube to the other's
    # surface, at 1 mm: 0 for the 288 voxels of the shared side faces (W in [2, 9]), 1 for the ring
    # at W = 10 (36) and the outer ring of the face W = 2 that is inside the other cube (28), 2 for
    # the ring and face at W = 11 (36 + 64) and the inner 6 x 6 of the face W = 2 (36).
    # 95th percentile -> 2 voxels; the same holds the other way round by symmetry.
    shape = (16, 16, 18)
    a, b = _cube(shape, (3, 3, 3)), _cube(shape, (3, 3, 5))
    assert dice_coefficient(a, b) == pytest.approx(0.8)
    assert int(mask_surface(b).sum()) == 488
    d = np.sort(metrics3d._brute_force_distances(mask_surface(b), mask_surface(a), (1.0, 1.0, 1.0)))
    values, counts = np.unique(d.round(6), return_counts=True)
    assert values.tolist() == [0.0, 1.0, 2.0] and counts.tolist() == [288, 64, 136]
    assert hausdorff_distance(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    # anisotropic: 1.5 mm along the shift axis -> 2 voxels = 3.0 mm (the other axes are finer:
    # the 95th percentile still lands among the voxels at W = 11)
    assert hausdorff_distance(a, b, (1.0, 1.0, 1.5)) == pytest.approx(3.0)
    assert hausdorff_distance(a, b, (1.0, 1.0, 1.5), percentile=100) == pytest.approx(3.0)
    # shifting along D instead: the spacing of D is what counts
    c = _cube(shape, (5, 3, 3))
    assert hausdorff_distance(a, c, (2.5, 1.0, 1.0)) == pytest.approx(5.0)
    assert hausdorff_distance(a, a, (2.5, 1.0, 1.0)) == 0.0 and dice_coefficient(a, a) == 1.0


def test_empty_masks_rule():
    shape = (155, 240, 240)
    empty = torch.zeros(shape, dtype=torch.bool)
    some = empty.clone()
    some[70:80, 100:110, 100:110] = True
    assert dice_coefficient(empty, empty) == 1.0 and hausdorff_distance(empty, empty) == 0.0
    assert dice_coefficient(some, empty) == 0.0 and dice_coefficient(empty, some) == 0.0
    # one empty: the volume diagonal in mm, which for BraTS is the challenge's 373.13 mm
    assert hausdorff_distance(empty, some) == pytest.approx(373.13, abs=0.01)
    assert hausdorff_distance(some, empty, (2.0, 1.0, 1.0)) == pytest.approx(math.sqrt(310**2 + 2 * 240**2))
    assert "373.13" in EMPTY_RULE


def _oracle_hd(p: np.ndarray, g: np.ndarray, spacing, q=95.0) -> float:
    """Independent numpy definition: 6-neighbour surfaces, all-pairs distances, max of directed percentiles."""
    def surface(m):
        pad = np.pad(m, 1)
        inner = pad[1:-1, 1:-1, 1:-1].copy()
        for ax in range(3):
            for shift in (-1, 1):
                inner &= np.roll(pad, shift, axis=ax)[1:-1, 1:-1, 1:-1]
        return m & ~inner

    sp = np.argwhere(surface(p)) * np.asarray(spacing)
    sg = np.argwhere(surface(g)) * np.asarray(spacing)
    dist = np.sqrt(((sp[:, None, :] - sg[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(dist.min(1), q), np.percentile(dist.min(0), q))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sz=st.sampled_from([0.5, 1.0, 3.0]))
def test_hd95_matches_bruteforce_oracle(seed, sz):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(5, 12, 3))
    p = rng.random(shape) < rng.uniform(0.05, 0.5)
    g = rng.random(shape) < rng.uniform(0.05, 0.5)
    if not p.any() or not g.any():
        return
    spacing = (sz, 1.0, 0.7)
    expected = _oracle_hd(p, g, spacing)
    assert hausdorff_distance(torch.from_numpy(p), torch.from_numpy(g), spacing) == pytest.approx(expected, rel=1e-6)


def test_scipy_and_torch_paths_agree(monkeypatch):
    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.random((12, 14, 10)) < 0.3)
    g = torch.from_numpy(rng.random((12, 14, 10)) < 0.3)
    with_scipy = hausdorff_distance(p, g, (1.2, 0.8, 2.0))
    monkeypatch.setattr(metrics3d, "_ndimage", None)
    assert hausdorff_distance(p, g, (1.2, 0.8, 2.0)) == pytest.approx(with_scipy, rel=1e-9)


def test_score_summary_and_csv(tmp_path):
    shape = (16, 16, 18)
    a, b = _cube(shape, (3, 3, 3)), _cube(shape, (3, 3, 5))
    empty = torch.zeros(shape, dtype=torch.bool)
    rows = score_case("case1", torch.stack([b, empty]), torch.stack([a, empty]), ["organ", "lesion"], (1, 1, 1))
    rows += score_case("case2", torch.stack([a, b]), torch.stack([a, empty]), ["organ", "lesion"], (1, 1, 1))
    assert [(r.case, r.structure, r.dice, r.hd95) for r in rows[:2]] == [
        ("case1", "organ", pytest.approx(0.8), pytest.approx(2.0)), ("case1", "lesion", 1.0, 0.0)]
    assert rows[3].dice == 0.0 and rows[3].gt_empty and not rows[3].pred_empty
    assert rows[3].hd95 == pytest.approx(math.sqrt(16**2 + 16**2 + 18**2))
    s = summarize(rows)
    assert s["organ"]["dice_mean"] == pytest.approx(0.9) and s["organ"]["hd95_mean"] == pytest.approx(1.0)
    assert s["lesion"]["gt_empty"] == 2 and s["lesion"]["cases"] == 2
    table = summary_table(s)
    assert "organ" in table and "90.00" in table and "empty masks" in table
    path = write_csv(rows, tmp_path / "out" / "per_case.csv")
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 4 and got[0]["case"] == "case1" and float(got[0]["dice"]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="must agree"):
        score_case("x", torch.stack([a]), torch.stack([a, b]), ["organ"], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distance(a, b, (1.0, 0.0, 1.0))
    for bad in (float("nan"), float("inf")):  # not a NaN distance that summaries would then skip
        with pytest.raises(ValueError, match="finite positive"):
            hausdorff_distance(a, b, (bad, 1.0, 1.0))
