"""Attention units (FAU, target attention, real-time unit, DIN, SIM, TWIN) against NumPy
references: weights sum to one over valid positions only, padding never leaks."""
import numpy as np
import pytest
import tensorflow as tf

from trainer.layers import masking
from trainer.layers.attention import TargetAttention
from trainer.layers.din import DinAttention
from trainer.layers.fused_attention import FusedAttentionUnit
from trainer.layers.real_time import RealTimeUnit
from trainer.layers.sim import SimSearchUnit
from trainer.layers.twin import TwinUnit

B, N, S, K, FI, FA, C = 2, 3, 7, 4, 6, 5, 8


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_masked_softmax(logits, mask):
    z = np.where(mask, logits, -np.inf)
    z = np.exp(z - np.max(np.where(mask, z, -1e30), axis=-1, keepdims=True))
    z = np.where(mask, z, 0.0)
    return z / np.maximum(z.sum(-1, keepdims=True), 1e-30)


def dense(layer, x):
    kernel = layer.kernel.numpy()
    out = x @ kernel
    return out + layer.bias.numpy() if layer.use_bias else out


def fau_inputs(seed=0, lengths=(5, 0)):
    rng = np.random.default_rng(seed)
    stage1_valid = np.arange(S)[None, :] < np.array(lengths)[:, None]  # [B, S]
    indices = np.stack([np.stack([rng.permutation(S)[:K] for _ in range(N)]) for _ in range(B)])
    valid = np.take_along_axis(np.repeat(stage1_valid[:, None], N, 1), indices, axis=2)
    return dict(
        target_id=rng.normal(size=(B, N, FI)).astype(np.float32),
        target_attr=rng.normal(size=(B, N, FA)).astype(np.float32),
        behaviour_id=rng.normal(size=(B, S, FI)).astype(np.float32),
        behaviour_attr=rng.normal(size=(B, S, FA)).astype(np.float32),
        cross=rng.random(size=(B, S, C)).astype(np.float32),
        indices=indices.astype(np.int32), valid=valid)


def run_fau(layer, x):
    return [t.numpy() for t in layer(
        tf.constant(x["target_id"]), tf.constant(x["target_attr"]),
        tf.constant(x["behaviour_id"]), tf.constant(x["behaviour_attr"]),
        tf.constant(x["cross"]), tf.constant(x["indices"]), tf.constant(x["valid"]))]


def reference_fau(layer, x, lam):
    g = lambda v: np.take_along_axis(v[:, None], x["indices"][..., None], axis=2)  # noqa: E731
    scale = np.sqrt(layer.attention_units)
    logits_id = np.einsum("bna,bnka->bnk", dense(layer.query_id, x["target_id"]),
                          g(dense(layer.key_id, x["behaviour_id"]))) / scale
    mixed = np_masked_softmax(logits_id, x["valid"])
    if layer.attention_fields == "both":
        logits_attr = np.einsum("bna,bnka->bnk", dense(layer.query_attr, x["target_attr"]),
                                g(dense(layer.key_attr, x["behaviour_attr"]))) / scale
        mixed = lam * mixed + (1 - lam) * np_masked_softmax(logits_attr, x["valid"])
    if layer.use_engagement_weighting:
        depth = 2 * sigmoid(dense(layer.depth_out,
                                  np.maximum(dense(layer.depth_hidden, x["cross"]), 0)))
        gate = sigmoid(dense(layer.fusion_gate, x["cross"]))
        mixed = mixed * g(depth)[..., 0]
    else:
        gate = sigmoid(layer.constant_gate_logit.numpy())
    h = gate * dense(layer.value_id, x["behaviour_id"]) + (1 - gate) * dense(
        layer.value_attr, x["behaviour_attr"])
    if layer.use_engagement_weighting:  # the behaviour's engagement is part of its value
        h = h + dense(layer.value_cross, x["cross"])
    w = np.where(x["valid"], mixed, 0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
    return np.einsum("bnk,bnkh->bnh", w, g(h)), w


@pytest.mark.parametrize("fields,engagement,lam", [("both", True, None), ("both", False, 0.3),
                                                   ("id", True, None)])
def test_fau_matches_reference_and_normalises_over_valid(fields, engagement, lam):
    x = fau_inputs(seed=1)
    layer = FusedAttentionUnit(hidden_units=8, attention_units=4, attention_fields=fields,
                               fusion_lambda=lam, use_engagement_weighting=engagement)
    u, w = run_fau(layer, x)
    lam_value = layer.fusion_weight().numpy()
    if fields == "id":
        assert lam_value == 1.0
    ref_u, ref_w = reference_fau(layer, x, lam_value)
    np.testing.assert_allclose(w, ref_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(u, ref_u, rtol=1e-4, atol=1e-5)
    has_valid = x["valid"].any(-1)
    np.testing.assert_allclose(w.sum(-1)[has_valid], 1.0, rtol=1e-5)
    assert np.all(w[~x["valid"]] == 0)


def test_fau_output_tells_deep_from_shallow_engagement_with_the_same_items():
    """Same behaviours, same attention: only their engagement differs (uniformly, so the
    renormalised weights are equal). With engagement weighting the interest vector differs by
    the engagement value term (the affinity signal); without, a neighbourhood of skipped items
    looks exactly like one of items watched to the end."""
    x = fau_inputs(seed=2)
    deep, shallow = dict(x), dict(x)
    deep["cross"] = np.ones_like(x["cross"])
    shallow["cross"] = np.full_like(x["cross"], 0.05)
    for engagement in (True, False):
        layer = FusedAttentionUnit(hidden_units=8, attention_units=4, attention_fields="id",
                                   use_engagement_weighting=engagement)
        u_deep, _ = run_fau(layer, deep)
        u_shallow, _ = run_fau(layer, shallow)
        has_valid = x["valid"].any(-1)
        gap = np.abs(u_deep - u_shallow)[has_valid].max()
        assert (gap > 1e-3) if engagement else (gap < 1e-6), (engagement, gap)


def test_fau_empty_selection_is_finite_zero():
    x = fau_inputs(seed=2, lengths=(0, 0))
    u, w = run_fau(FusedAttentionUnit(hidden_units=8, attention_units=4), x)
    assert np.all(np.isfinite(u)) and np.all(u == 0) and np.all(w == 0)


def test_fau_padding_cannot_leak():
    x = fau_inputs(seed=3)
    layer = FusedAttentionUnit(hidden_units=8, attention_units=4)
    u, w = run_fau(layer, x)
    y = {k: v.copy() for k, v in x.items()}
    rng = np.random.default_rng(9)
    padded = ~(np.arange(S)[None, :] < np.array([5, 0])[:, None])
    for name in ("behaviour_id", "behaviour_attr", "cross"):
        y[name][padded] = rng.normal(size=y[name][padded].shape) * 100
    u2, w2 = run_fau(layer, y)
    np.testing.assert_allclose(u2, u, atol=1e-6)
    np.testing.assert_allclose(w2, w, atol=1e-7)


def fau_relevance(x, seed=5):
    rng = np.random.default_rng(seed)
    return np.where(x["valid"], rng.uniform(-0.2, 1.0, size=x["valid"].shape), 0.0).astype(
        np.float32)


def run_fau_with_relevance(layer, x, relevance):
    return [t.numpy() for t in layer(
        tf.constant(x["target_id"]), tf.constant(x["target_attr"]),
        tf.constant(x["behaviour_id"]), tf.constant(x["behaviour_attr"]),
        tf.constant(x["cross"]), tf.constant(x["indices"]), tf.constant(x["valid"]),
        relevance=tf.constant(relevance))]


@pytest.mark.parametrize("engagement", [True, False])
def test_fau_intensity_pools_match_reference(engagement):
    """Beside u_long: relevance mass, filled share and relevance-weighted engagement
    directions, each summed over the K kept behaviours and divided by K (not renormalised)."""
    x = fau_inputs(seed=4)
    relevance = fau_relevance(x)
    layer = FusedAttentionUnit(hidden_units=8, attention_units=4,
                               use_engagement_weighting=engagement, intensity_units=3)
    u, w = run_fau_with_relevance(layer, x, relevance)
    assert u.shape == (B, N, layer.output_units) == (B, N, 8 + 2 + (3 if engagement else 0))
    ref_u, ref_w = reference_fau(layer, x, layer.fusion_weight().numpy())
    np.testing.assert_allclose(u[..., :8], ref_u, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, rtol=1e-4, atol=1e-6)
    r = np.where(x["valid"], relevance, 0) / K
    np.testing.assert_allclose(u[..., 8], r.sum(-1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(u[..., 9], x["valid"].sum(-1) / K, rtol=1e-6)
    if engagement:
        directions = np.maximum(dense(layer.intensity_engagement, x["cross"]), 0)  # [B, S, U]
        gathered = np.take_along_axis(directions[:, None], x["indices"][..., None], axis=2)
        np.testing.assert_allclose(u[..., 10:], np.einsum("bnk,bnku->bnu", r, gathered),
                                   rtol=1e-4, atol=1e-6)


def test_fau_intensity_tells_many_close_behaviours_from_one():
    """Renormalised attention gives the same u_long to a target whose K slots hold one
    behaviour and to one whose slots hold four copies of it; the intensity pools differ."""
    x = fau_inputs(seed=6, lengths=(S, S))
    one, many = dict(x), dict(x)
    same = np.zeros_like(x["indices"])  # every slot points at behaviour 0
    one["indices"], many["indices"] = same, same
    one["valid"] = np.zeros_like(x["valid"])
    one["valid"][..., 0] = True
    many["valid"] = np.ones_like(x["valid"])
    relevance = np.full(x["valid"].shape, 0.9, np.float32)
    layer = FusedAttentionUnit(hidden_units=8, attention_units=4, intensity_units=2)
    u_one, _ = run_fau_with_relevance(layer, one, relevance)
    u_many, _ = run_fau_with_relevance(layer, many, relevance)
    np.testing.assert_allclose(u_one[..., :8], u_many[..., :8], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u_many[..., 8], 4 * u_one[..., 8], rtol=1e-5)


def test_fau_intensity_needs_relevance_and_is_zero_without_behaviours():
    x = fau_inputs(seed=2, lengths=(0, 0))
    layer = FusedAttentionUnit(hidden_units=8, attention_units=4, intensity_units=2)
    with pytest.raises(ValueError, match="stage-2 relevance"):
        run_fau(layer, x)
    u, _ = run_fau_with_relevance(layer, x, np.ones(x["valid"].shape, np.float32))
    assert np.all(u == 0)
    with pytest.raises(ValueError, match="intensity_units"):
        FusedAttentionUnit(intensity_units=-1)


def seq_case(seed=0, length=6, lengths=(4, 0, 6)):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    tokens = rng.normal(size=(b, length, FA)).astype(np.float32)
    target = rng.normal(size=(b, N, FI)).astype(np.float32)
    mask = masking.length_mask(np.array(lengths), length)
    return tokens, target, mask


def perturb_padding(tokens, mask, seed=5):
    rng = np.random.default_rng(seed)
    out = tokens.copy()
    pad = ~mask.numpy()
    out[pad] = rng.normal(size=out[pad].shape) * 50
    return out


def test_target_attention_weights_and_padding():
    tokens, target, mask = seq_case()
    layer = TargetAttention(hidden_units=8, attention_units=4)
    out, w = [t.numpy() for t in layer(target, tokens, mask)]
    logits = dense(layer.query, target) @ np.swapaxes(dense(layer.key, tokens), 1, 2) / 2.0
    ref_w = np_masked_softmax(logits, mask.numpy()[:, None, :])
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out, np.einsum("bnl,blh->bnh", ref_w, dense(layer.value, tokens)),
                               rtol=1e-4, atol=1e-6)
    assert np.all(out[1] == 0)  # empty sequence
    out2, _ = layer(target, perturb_padding(tokens, mask), mask)
    np.testing.assert_allclose(out2.numpy(), out, atol=1e-6)


def test_real_time_unit_masks_padding_in_self_and_target_attention():
    tokens, target, mask = seq_case(seed=1)
    layer = RealTimeUnit(hidden_units=8, num_heads=2, attention_units=4, max_length=6)
    out, w = [t.numpy() for t in layer(tokens, mask, target)]
    assert out.shape == (3, N, 8) and np.all(np.isfinite(out))
    np.testing.assert_allclose(w.sum(-1)[[0, 2]], 1.0, rtol=1e-5)
    assert np.all(w[0, :, 4:] == 0) and np.all(w[1] == 0) and np.all(out[1] == 0)
    out2, _ = layer(perturb_padding(tokens, mask), mask, target)
    np.testing.assert_allclose(out2.numpy(), out, atol=1e-5)


def test_din_weights_zero_on_padding_and_no_leak():
    tokens, target, mask = seq_case(seed=2)
    layer = DinAttention(hidden_units=8, attention_units=4)
    out, w = [t.numpy() for t in layer(tokens, mask, target)]
    q, k = dense(layer.query, target), dense(layer.key, tokens)
    qb, kb = np.broadcast_arrays(q[:, :, None], k[:, None])
    unit = np.concatenate([qb, kb, qb - kb, qb * kb], -1)
    ref_w = dense(layer.activation_out, sigmoid(dense(layer.activation_hidden, unit)))[..., 0]
    ref_w = np.where(mask.numpy()[:, None], ref_w, 0)
    np.testing.assert_allclose(w, ref_w, rtol=1e-4, atol=1e-6)
    assert np.all(out[1] == 0)
    out2, _ = layer(perturb_padding(tokens, mask), mask, target)
    np.testing.assert_allclose(out2.numpy(), out, atol=1e-5)


def sim_case(seed=0, length=9, lengths=(7, 0)):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    return dict(
        target_id=rng.normal(size=(b, N, FI)).astype(np.float32),
        target_attr=rng.normal(size=(b, N, FA)).astype(np.float32),
        target_category=rng.integers(1, 4, size=(b, N, 2)),
        behaviour_id=rng.normal(size=(b, length, FI)).astype(np.float32),
        behaviour_attr=rng.normal(size=(b, length, FA)).astype(np.float32),
        behaviour_category=rng.integers(1, 4, size=(b, length, 2)),
        cross=rng.random(size=(b, length, C)).astype(np.float32),
        mask=masking.length_mask(np.array(lengths), length))


def test_sim_hard_keeps_most_recent_same_category():
    x = sim_case()
    layer = SimSearchUnit(mode="hard", k=2, hidden_units=8, num_heads=2)
    out, positions, w = [t.numpy() for t in layer(**x)]
    for n in range(N):
        cat = x["target_category"][0, n, -1]
        expected = [i for i in range(7) if x["behaviour_category"][0, i, -1] == cat][:2]
        got = positions[0, n][positions[0, n] >= 0].tolist()
        assert got == expected
        if got:
            np.testing.assert_allclose(w[0, n, :len(got)].sum(), 1.0, rtol=1e-5)
        assert np.all(w[0, n][positions[0, n] < 0] == 0)
    assert np.all(positions[1] == -1) and np.all(out[1] == 0) and np.all(np.isfinite(out))


def test_sim_soft_top_k_by_inner_product_and_no_padding_leak():
    x = sim_case(seed=1)
    layer = SimSearchUnit(mode="soft", k=3, hidden_units=8, num_heads=2)
    out, positions, w = [t.numpy() for t in layer(**x)]
    scores = np.einsum("nf,lf->nl", x["target_id"][0], x["behaviour_id"][0, :7])
    assert positions[0].tolist() == np.argsort(-scores, axis=-1)[:, :3].tolist()
    y = dict(x)
    for name in ("behaviour_id", "behaviour_attr", "cross"):
        y[name] = perturb_padding(x[name], x["mask"])
    out2, positions2, _ = [t.numpy() for t in layer(**y)]
    assert np.array_equal(positions2, positions)
    np.testing.assert_allclose(out2, out, atol=1e-5)


def test_twin_gsu_and_esu_share_the_relevance():
    x = sim_case(seed=2)
    target = np.concatenate([x["target_id"], x["target_attr"]], -1)
    behaviours = np.concatenate([x["behaviour_id"], x["behaviour_attr"]], -1)
    layer = TwinUnit(k=3, hidden_units=8, attention_units=4, num_heads=2)
    out, positions, w = [t.numpy() for t in layer(target, behaviours, x["cross"], x["mask"])]
    # alpha by hand: per head (K_h W_h)(W_q q) / sqrt(d) + K_c W_c beta
    kh = dense(layer.inherent_keys, behaviours).reshape(2, 9, 2, 2)
    q = dense(layer.target_query, target).reshape(2, N, 2, 2)
    alpha = np.einsum("bnhd,blhd->bnlh", q, kh) / np.sqrt(2) + dense(
        layer.cross_bias, x["cross"])[:, None]
    top = np.argsort(-alpha[0, :, :7].mean(-1), axis=-1)[:, :3]
    assert positions[0].tolist() == top.tolist()
    kept = np.take_along_axis(alpha[0], top[..., None], axis=1)  # [N, 3, heads]
    ref_w = np.exp(kept - kept.max(1, keepdims=True))
    ref_w = (ref_w / ref_w.sum(1, keepdims=True)).mean(-1)
    np.testing.assert_allclose(w[0], ref_w, rtol=1e-4)
    assert np.all(positions[1] == -1) and np.all(out[1] == 0) and np.all(w[1] == 0)
    out2, _, _ = layer(target, perturb_padding(behaviours, x["mask"]),
                       perturb_padding(x["cross"], x["mask"]), x["mask"])
    np.testing.assert_allclose(out2.numpy(), out, atol=1e-5)


def test_interest_centroids_match_a_numpy_reference():
    from trainer.layers.interest_centroids import InterestCentroids

    rng = np.random.default_rng(3)
    d, units = 5, 3
    target = rng.normal(size=(B, N, d)).astype(np.float32)
    target_category = np.array([[1, 2, 0], [2, 2, 1]], np.int64)  # 0: unknown, matches all
    behaviours = rng.normal(size=(B, S, d)).astype(np.float32)
    behaviour_category = rng.integers(1, 3, size=(B, S)).astype(np.int32)
    cross = rng.normal(size=(B, S, C)).astype(np.float32)
    valid = np.arange(S)[None, :] < np.array([[5], [0]])  # the second request has no history
    layer = InterestCentroids(units)
    out = layer(target, target_category, behaviours, behaviour_category, cross, valid).numpy()
    assert out.shape == (B, N, 2 * units)

    weights = sigmoid(dense(layer.engagement, cross.astype(np.float64))) * valid[..., None]
    expected = np.zeros((B, N, 2 * units))
    for b in range(B):
        for n in range(N):
            same = (behaviour_category[b] == target_category[b, n]) | (target_category[b, n] == 0)
            for u in range(units):
                w = weights[b, :, u] * same
                mass = w.sum()
                expected[b, n, units + u] = np.log1p(mass)
                if mass > 1e-6:
                    centroid = (w[:, None] * behaviours[b]).sum(0) / mass
                    expected[b, n, u] = centroid @ target[b, n] / (
                        np.linalg.norm(centroid) * np.linalg.norm(target[b, n]))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert np.all(out[1] == 0)  # no valid behaviour: zeros, not NaN

    # the ablation: every weight 1, so the centroid of the category's valid behaviours
    plain = InterestCentroids(units, use_engagement_weighting=False)
    flat = plain(target, target_category, behaviours, behaviour_category, cross, valid).numpy()
    same = behaviour_category[0] == 1
    centroid = behaviours[0][same & valid[0]].mean(0)
    cos = centroid @ target[0, 0] / (np.linalg.norm(centroid) * np.linalg.norm(target[0, 0]))
    np.testing.assert_allclose(flat[0, 0, :units], cos, rtol=1e-4)
    np.testing.assert_allclose(flat[0, 0, units:], np.log1p((same & valid[0]).sum()), rtol=1e-5)
    with pytest.raises(ValueError, match="units >= 1"):
        InterestCentroids(0)
