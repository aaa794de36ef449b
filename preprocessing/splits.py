"""The train/eval/test split by request time, shared by the pipeline and the readers' prepare().

Requests are ordered by timestamp. With n valid requests, T_test is the timestamp of the request
at rank n - ceil(n * test_fraction) and T_eval the one at rank n - ceil(n * (test_fraction +
eval_fraction)): timestamp >= T_test -> test, T_eval <= timestamp < T_test -> eval, the rest ->
train. Requests with equal timestamps always share a split, so the held-out part can be slightly
larger than asked.

Why a module of its own: the KuaiSAR and JDsearch readers train their text embedding space in
`prepare()`, before Beam starts, and must hold out exactly the requests the pipeline later puts
in eval and test; otherwise the held-out clicks shape the space the ranker is evaluated in. Both
sides import the rule from here (NumPy only, no Beam).
"""
from __future__ import annotations

import math
from typing import Iterable, Tuple

import numpy as np

from preprocessing.options import DEFAULT_EVAL_FRACTION, DEFAULT_TEST_FRACTION

NEVER = int(np.iinfo(np.int64).max)  # cutoff of an empty split: no timestamp reaches it


def request_timestamps_to_cutoffs(timestamps: Iterable[int], eval_fraction: float,
                                  test_fraction: float) -> Tuple[int, int]:
    """(T_eval, T_test) of the split rule in the module docstring (max int64 when empty)."""
    ordered = np.sort(np.asarray(list(timestamps), np.int64))
    n = len(ordered)
    if n == 0:
        return NEVER, NEVER
    n_test = math.ceil(n * test_fraction - 1e-9)  # tolerance: 100 * (0.1 + 0.2) = 30.000...04
    n_held = math.ceil(n * (test_fraction + eval_fraction) - 1e-9)
    t_test = int(ordered[n - n_test]) if n_test else NEVER
    t_eval = int(ordered[n - n_held]) if n_held else NEVER
    return min(t_eval, t_test), t_test


def split_of(timestamp_ms: int, cutoffs: Tuple[int, int]) -> str:
    t_eval, t_test = cutoffs
    if timestamp_ms >= t_test:
        return "test"
    if timestamp_ms >= t_eval:
        return "eval"
    return "train"


def split_fractions(options=None) -> Tuple[float, float]:
    """(eval_fraction, test_fraction) from a dict or an argparse namespace, with the defaults
    of `python -m preprocessing` for missing ones; ValueError when they leave nothing to train."""
    def get(name, default):
        value = options.get(name) if isinstance(options, dict) else getattr(options, name, None)
        return float(default if value is None else value)

    eval_fraction = get("eval_fraction", DEFAULT_EVAL_FRACTION)
    test_fraction = get("test_fraction", DEFAULT_TEST_FRACTION)
    for name, value in (("eval_fraction", eval_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1) (got {value!r})")
    if eval_fraction + test_fraction >= 1.0:
        raise ValueError(f"eval_fraction + test_fraction must be < 1 (got {eval_fraction!r} + "
                         f"{test_fraction!r}): nothing would be left to train on")
    return eval_fraction, test_fraction
