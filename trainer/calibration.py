"""Calibration of the ranking heads: fitted on eval, applied inside the model with stock TF ops.

Every head's output v (a probability, or the expected watch time in seconds) goes through a
monotone piecewise-linear map defined by CALIBRATION_KNOTS knots (x_k, y_k): linear between
knots, constant beyond the first and last. Two fits produce such knots:

* isotonic regression (Zadrozny & Elkan, "Transforming classifier scores into accurate
  multiclass probability estimates", KDD 2002): pool-adjacent-violators over the eval
  predictions sorted by value; the block centroids (mean prediction, mean label) are joined by
  straight lines. Applies to every task, watch time included (the label is then the play time);
* Platt scaling (Platt, "Probabilistic outputs for support vector machines", 1999):
  p' = sigmoid(a * logit(p) + b) by Newton's method on the log loss, with a >= 0 (a head
  ordered against its labels gets the flat map at the base rate); binary tasks only.

`fit_task` fits both (binary tasks) on one half of the eval requests and measures the expected
calibration error on the other half, both ways round, keeps the method with the lower held-out
ECE and refits it on the whole eval split. The knots are evaluated at the quantiles of the eval
predictions, so they are dense where the predictions are.

`CalibrationLayer` holds the knots as non-trainable variables of the model (so checkpoints and
the SavedModel carry them) and evaluates the map with `tf.searchsorted` and gathers; a task whose
knots were never fitted passes its value through unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

from trainer import metrics as M

CALIBRATION_KNOTS = 128
METHODS = ("isotonic", "platt")
PROBABILITY_FLOOR = 1e-6  # calibrated probabilities stay in [floor, 1 - floor]
_NEWTON_STEPS = 50


@dataclasses.dataclass
class Knots:
    """A monotone piecewise-linear map: x non-decreasing, y non-decreasing, same length."""

    method: str
    x: np.ndarray
    y: np.ndarray

    def __call__(self, values) -> np.ndarray:
        return piecewise_linear(values, self.x, self.y)

    def to_dict(self) -> Dict[str, object]:
        return {"method": self.method, "x": [float(v) for v in self.x],
                "y": [float(v) for v in self.y]}

    @classmethod
    def from_dict(cls, raw: Dict[str, object]) -> "Knots":
        return cls(str(raw["method"]), np.asarray(raw["x"], np.float64),
                   np.asarray(raw["y"], np.float64))


def piecewise_linear(values, knots_x, knots_y) -> np.ndarray:
    """NumPy twin of `CalibrationLayer`'s map: the same segment choice and clamping."""
    v = np.asarray(values, np.float64)
    kx, ky = np.asarray(knots_x, np.float64), np.asarray(knots_y, np.float64)
    idx = np.clip(np.searchsorted(kx, v, side="right"), 1, len(kx) - 1)
    x0, x1, y0, y1 = kx[idx - 1], kx[idx], ky[idx - 1], ky[idx]
    t = np.clip((v - x0) / np.maximum(x1 - x0, 1e-12), 0.0, 1.0)
    return y0 + t * (y1 - y0)


def pool_adjacent_violators(x, y, weights=None):
    """Isotonic (non-decreasing) least-squares fit of y on x; returns the block centroids
    (weighted mean x, fitted y, block weight), in increasing x."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64)
    order = np.argsort(x, kind="stable")
    x, y, w = x[order], y[order], w[order]
    # blocks as stacks of (sum w*x, sum w*y, sum w)
    sx: List[float] = []
    sy: List[float] = []
    sw: List[float] = []
    for xi, yi, wi in zip(x * w, y * w, w):
        sx.append(xi)
        sy.append(yi)
        sw.append(wi)
        while len(sy) > 1 and sy[-2] / sw[-2] >= sy[-1] / sw[-1]:
            wx, wy, ww = sx.pop(), sy.pop(), sw.pop()
            sx[-1] += wx
            sy[-1] += wy
            sw[-1] += ww
    sw_arr = np.asarray(sw)
    return np.asarray(sx) / sw_arr, np.asarray(sy) / sw_arr, sw_arr


def _knot_positions(predictions: np.ndarray) -> np.ndarray:
    return np.quantile(predictions, np.linspace(0.0, 1.0, CALIBRATION_KNOTS))


def fit_isotonic(predictions, labels, binary: bool = True) -> Knots:
    """Isotonic calibration knots (see the module docstring)."""
    p = np.asarray(predictions, np.float64)
    cx, cy, _ = pool_adjacent_violators(p, labels)
    x = _knot_positions(p)
    y = np.interp(x, cx, cy)
    if binary:
        y = np.clip(y, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    return Knots("isotonic", x, np.maximum.accumulate(y))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    return np.log(p) - np.log1p(-p)


def fit_platt(predictions, labels) -> Knots:
    """Platt scaling knots: sigmoid(a * logit(p) + b), (a, b) minimising the log loss."""
    p = np.asarray(predictions, np.float64)
    y = np.asarray(labels, np.float64)
    z = _logit(p)
    a, b = 1.0, 0.0
    for _ in range(_NEWTON_STEPS):
        q = 1.0 / (1.0 + np.exp(-(a * z + b)))
        r = q * (1.0 - q) + 1e-12
        grad = np.array([np.sum((q - y) * z), np.sum(q - y)])
        hess = np.array([[np.sum(r * z * z), np.sum(r * z)], [np.sum(r * z), np.sum(r)]])
        step = np.linalg.solve(hess + 1e-9 * np.eye(2), grad)
        a, b = a - step[0], b - step[1]
        if np.max(np.abs(step)) < 1e-10:
            break
    if a < 0:  # a map must not reverse the head's order: the best non-decreasing one is flat
        a, b = 0.0, float(_logit(np.array([np.mean(y)]))[0])
    x = _knot_positions(p)
    y_knots = 1.0 / (1.0 + np.exp(-(a * _logit(x) + b)))
    return Knots("platt", x, np.clip(y_knots, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR))


def calibration_error(labels, values, binary: bool) -> float:
    """ECE for a binary task; for watch time the same binned gap relative to the mean label."""
    if binary:
        return M.expected_calibration_error(labels, values)
    mean = float(np.mean(labels))
    return M.expected_calibration_error(labels, values, relative_to=mean if mean else 1.0)


@dataclasses.dataclass
class TaskFit:
    knots: Knots
    held_out_error: Dict[str, float]  # method -> error of the 2-fold cross-fit on eval


def fit_task(predictions, labels, groups, binary: bool, methods: Optional[Sequence[str]] = None
             ) -> TaskFit:
    """Chooses the calibration method of one task by 2-fold cross-fitting over the eval
    requests (`groups`: request ids), then refits the chosen one on all of eval."""
    p = np.asarray(predictions, np.float64)
    y = np.asarray(labels, np.float64)
    methods = list(methods or (METHODS if binary else ("isotonic",)))
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    fold = np.random.default_rng(0).permutation(inverse.max() + 1)[inverse] % 2 == 0

    def fit(method, idx):
        return fit_platt(p[idx], y[idx]) if method == "platt" else \
            fit_isotonic(p[idx], y[idx], binary)

    errors = {}
    for method in methods:
        fold_errors = []
        for train in (fold, ~fold):
            knots = fit(method, train)
            fold_errors.append(calibration_error(y[~train], knots(p[~train]), binary))
        errors[method] = float(np.mean(fold_errors))
    best = min(methods, key=lambda m: errors[m])
    return TaskFit(fit(best, np.ones_like(fold)), errors)


# ---- inside the model --------------------------------------------------------------------
def _tf():
    import tensorflow as tf

    return tf


class CalibrationLayer(_tf().keras.layers.Layer):
    """Per-task piecewise-linear maps as non-trainable variables (identity until assigned)."""

    def __init__(self, tasks: Sequence[str], knots: int = CALIBRATION_KNOTS, **kwargs):
        super().__init__(**kwargs)
        tf = _tf()
        self.tasks = list(tasks)
        self.num_knots = int(knots)
        grid = np.linspace(0.0, 1.0, self.num_knots).astype(np.float32)
        self.knots_x, self.knots_y, self.enabled = {}, {}, {}
        for task in self.tasks:
            self.knots_x[task] = self.add_weight(
                name=f"{task}_knots_x", shape=[self.num_knots], trainable=False,
                initializer=tf.constant_initializer(grid), dtype=tf.float32)
            self.knots_y[task] = self.add_weight(
                name=f"{task}_knots_y", shape=[self.num_knots], trainable=False,
                initializer=tf.constant_initializer(grid), dtype=tf.float32)
            self.enabled[task] = self.add_weight(
                name=f"{task}_enabled", shape=[], trainable=False,
                initializer="zeros", dtype=tf.float32)

    def call(self, task: str, values):
        tf = _tf()
        values = tf.cast(values, tf.float32)
        kx, ky = self.knots_x[task], self.knots_y[task]
        flat = tf.reshape(values, [-1])
        idx = tf.clip_by_value(tf.searchsorted(kx, flat, side="right"), 1, self.num_knots - 1)
        x0, x1 = tf.gather(kx, idx - 1), tf.gather(kx, idx)
        y0, y1 = tf.gather(ky, idx - 1), tf.gather(ky, idx)
        t = tf.clip_by_value((flat - x0) / tf.maximum(x1 - x0, 1e-12), 0.0, 1.0)
        mapped = tf.reshape(y0 + t * (y1 - y0), tf.shape(values))
        return tf.where(self.enabled[task] > 0.5, mapped, values)

    def assign(self, task: str, knots: Optional[Knots]) -> None:
        """Sets a task's map (resampled to the layer's number of knots); None = identity."""
        if knots is None:
            self.enabled[task].assign(0.0)
            return
        x, y = np.asarray(knots.x, np.float64), np.asarray(knots.y, np.float64)
        if len(x) < self.num_knots:  # repeat the last knot: zero-width segments change nothing
            pad = self.num_knots - len(x)
            x, y = np.append(x, np.full(pad, x[-1])), np.append(y, np.full(pad, y[-1]))
        elif len(x) > self.num_knots:  # resample at evenly spaced knot positions
            x = np.interp(np.linspace(0, len(x) - 1, self.num_knots), np.arange(len(x)), x)
            y = knots(x)
        self.knots_x[task].assign(x.astype(np.float32))
        self.knots_y[task].assign(y.astype(np.float32))
        self.enabled[task].assign(1.0)
