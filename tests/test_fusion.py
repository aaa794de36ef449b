"""Score fusion tuned for an objective (trainer/fusion.py): the NumPy score equals the product
form, the choice honours the click floor, and tuning finds the trade-off planted in toy lists."""
import numpy as np
import pytest

from common import features as F
from trainer import fusion
from trainer import metrics as M

TASKS = ("click", "long_view", "like", F.WATCH_TIME)


def test_fused_score_is_the_weighted_product():
    outputs = {"click": np.array([0.2, 0.5]), "long_view": np.array([0.1, 0.3]),
               "like": np.array([0.05, 0.0]), F.WATCH_TIME: np.array([4.0, 9.0])}
    weights = {"click": 1.0, "long_view": 0.5, "like": 0.0, F.WATCH_TIME: 0.3}
    expected = outputs["click"] * outputs["long_view"] ** 0.5 * outputs[F.WATCH_TIME] ** 0.3
    np.testing.assert_allclose(fusion.fused_score(outputs, weights), expected, rtol=1e-12)
    np.testing.assert_allclose(fusion.fused_score(outputs, {"click": 0.0}), [1.0, 1.0])


def test_choose_respects_the_click_floor():
    ref = fusion.Point({"click": 1.0}, clicks=2.0, watch_time=50.0)
    points = [ref, fusion.Point({"a": 1}, 1.985, 52.0), fusion.Point({"a": 2}, 1.97, 60.0),
              fusion.Point({"a": 3}, 2.1, 51.0)]
    assert fusion.choose(points, ref, "watch_time_at_click_floor", 0.01).weights == {"a": 1}
    assert fusion.choose(points, ref, "watch_time_at_click_floor", 0.02).weights == {"a": 2}
    assert fusion.choose(points, ref, "clicks").weights == {"a": 3}
    assert fusion.choose(points, ref, "watch_time").weights == {"a": 2}
    with pytest.raises(ValueError, match="objective"):
        fusion.choose(points, ref, "revenue")


def _toy_lists(requests=400, n=16, seed=0):
    """Lists where watch time = p_click * duration, durations independent of p_click."""
    rng = np.random.default_rng(seed)
    p = rng.beta(1.0, 4.0, (requests, n))
    duration = rng.lognormal(np.log(30.0), 0.8, (requests, n))
    groups = np.repeat(np.arange(requests), n)
    outputs = {"click": p.ravel(), "long_view": 0.5 * p.ravel(), "like": 0.1 * p.ravel(),
               F.WATCH_TIME: (p * duration).ravel()}
    return outputs, groups


def test_tune_trades_a_little_click_for_more_watch_time_on_the_truth():
    outputs, groups = _toy_lists()
    chosen, reference, points = fusion.tune(outputs, outputs["click"], outputs[F.WATCH_TIME],
                                            groups, TASKS, k=5)
    assert len(points) == len(fusion.candidate_weights(TASKS))
    assert chosen.clicks >= 0.99 * reference.clicks
    assert chosen.watch_time > 1.02 * reference.watch_time  # a real gain exists and is taken
    assert chosen.weights[F.WATCH_TIME] > 0
    # the reference is ranking by p(click): the most clicks of any ranking on the truth
    assert reference.clicks >= max(p.clicks for p in points) - 1e-12
    np.testing.assert_allclose(
        reference.clicks, M.top_k_mean_sum(outputs["click"], outputs["click"], groups, 5))
    with pytest.raises(ValueError, match="watch_time"):
        fusion.tune(outputs, outputs["click"], outputs[F.WATCH_TIME], groups, ("click",))
