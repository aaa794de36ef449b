"""Calibration of the heads (trainer/calibration.py): pool-adjacent-violators against a brute
force, Platt scaling recovers a known distortion, the per-task choice by held-out ECE, and the
TF map inside the model equals its NumPy twin (identity until fitted)."""
import itertools

import numpy as np
import pytest

from trainer import calibration as C
from trainer import metrics as M


def _isotonic_brute_force(y):
    """Least-squares non-decreasing fit of a short sequence, by trying every partition into
    consecutive blocks and keeping the best monotone one (hand-written reference)."""
    n, best, best_cost = len(y), None, np.inf
    for cuts in itertools.product([0, 1], repeat=n - 1):
        blocks, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                blocks.append((start, i))
                start = i
        blocks.append((start, n))
        fit = np.concatenate([np.full(e - s, np.mean(y[s:e])) for s, e in blocks])
        cost = np.sum((fit - y) ** 2)
        if np.all(np.diff(fit) >= -1e-12) and cost < best_cost - 1e-12:
            best, best_cost = fit, cost
    return best


def test_pool_adjacent_violators_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 9))
        x = np.sort(rng.random(n))
        y = rng.random(n).round(2)
        cx, cy, cw = C.pool_adjacent_violators(x, y)
        fitted = np.repeat(cy, cw.astype(int))
        np.testing.assert_allclose(fitted, _isotonic_brute_force(y), atol=1e-12)
        assert cw.sum() == n and np.all(np.diff(cy) > 0)
        # the block centroids are the mean x of their members
        np.testing.assert_allclose(np.repeat(cx, cw.astype(int)).sum(), x.sum())


def test_pool_adjacent_violators_hand_computed():
    cx, cy, cw = C.pool_adjacent_violators([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    np.testing.assert_allclose(cy, [1.0, 2.5, 4.0])
    np.testing.assert_allclose(cx, [1.0, 2.5, 4.0])
    np.testing.assert_allclose(cw, [1, 2, 1])


def _distorted(n, seed, power=2.0):
    """Labels drawn from q; the 'model' reports q ** (1 / power): over-confident upward."""
    rng = np.random.default_rng(seed)
    q = rng.beta(1.2, 4.0, n)
    y = (rng.random(n) < q).astype(float)
    return q ** (1.0 / power), y, q


def test_isotonic_and_platt_remove_a_known_distortion():
    p, y, q = _distorted(40_000, 1)
    before = M.expected_calibration_error(y, p)
    assert before > 0.1  # badly calibrated: the fit has something to remove
    for knots in (C.fit_isotonic(p, y), C.fit_platt(p, y)):
        p_test, y_test, _ = _distorted(40_000, 2)
        after = M.expected_calibration_error(y_test, knots(p_test))
        assert after < 0.01, knots.method
        assert np.all(np.diff(knots.y) >= 0) and np.all(np.diff(knots.x) >= 0)
        assert len(knots.x) == C.CALIBRATION_KNOTS
    # Platt's fit matches the mean label (its intercept's first-order condition)
    platt = C.fit_platt(p, y)
    assert abs(np.mean(platt(p)) - np.mean(y)) < 0.005


def test_fit_task_picks_the_method_with_lower_held_out_error():
    p, y, _ = _distorted(20_000, 3)
    groups = np.arange(len(p)) // 10
    fit = C.fit_task(p, y, groups, binary=True)
    assert set(fit.held_out_error) == {"isotonic", "platt"}
    assert fit.knots.method == min(fit.held_out_error, key=fit.held_out_error.get)
    watch = C.fit_task(p * 30.0, y * 20.0, groups, binary=False)
    assert set(watch.held_out_error) == {"isotonic"}  # Platt is for probabilities only
    assert watch.knots.y.max() > 1.0  # seconds, not clipped to a probability


def test_layer_equals_numpy_twin_and_is_identity_until_assigned():
    import tensorflow as tf

    layer = C.CalibrationLayer(["click", "watch_time"], dtype="float32")
    values = np.array([[-1.0, 0.0, 0.013, 0.5], [0.9999, 1.0, 3.0, 250.0]], np.float32)
    for task in ("click", "watch_time"):
        np.testing.assert_array_equal(layer(task, tf.constant(values)).numpy(), values)
    p, y, _ = _distorted(5000, 4)
    knots = C.fit_isotonic(p, y)
    layer.assign("click", knots)
    probe = np.concatenate([np.linspace(-0.1, 1.1, 301), p[:200]]).astype(np.float32)
    np.testing.assert_allclose(layer("click", tf.constant(probe)).numpy(),
                               C.piecewise_linear(probe, knots.x.astype(np.float32),
                                                  knots.y.astype(np.float32)), atol=1e-6)
    # beyond the knots the map is constant at the end values
    out = layer("click", tf.constant([-5.0, 5.0])).numpy()
    np.testing.assert_allclose(out, [knots.y[0], knots.y[-1]], atol=1e-6)
    # a map with fewer knots is resampled onto the layer's grid, with the same values
    short = C.Knots("isotonic", np.array([0.0, 10.0, 20.0]), np.array([1.0, 3.0, 30.0]))
    layer.assign("watch_time", short)
    grid = np.array([0.0, 5.0, 10.0, 15.0, 20.0, 40.0], np.float32)
    np.testing.assert_allclose(layer("watch_time", tf.constant(grid)).numpy(),
                               [1.0, 2.0, 3.0, 16.5, 30.0, 30.0], rtol=1e-5)
    layer.assign("watch_time", None)
    np.testing.assert_array_equal(layer("watch_time", tf.constant(grid)).numpy(), grid)


def test_knots_round_trip_through_json():
    knots = C.Knots("platt", np.array([0.0, 0.5, 1.0]), np.array([0.1, 0.4, 0.8]))
    again = C.Knots.from_dict(knots.to_dict())
    assert again.method == "platt"
    np.testing.assert_array_equal(again.x, knots.x)
    np.testing.assert_array_equal(again.y, knots.y)
    with pytest.raises(KeyError):
        C.Knots.from_dict({"x": [0.0], "y": [0.0]})


def test_platt_never_reverses_the_order_of_the_head():
    rng = np.random.default_rng(7)
    p = rng.random(2000)
    y = (rng.random(2000) < 1 - p).astype(float)  # labels run against the head
    knots = C.fit_platt(p, y)
    assert np.all(np.diff(knots.y) >= 0)
    np.testing.assert_allclose(knots.y, np.mean(y), rtol=1e-9)
