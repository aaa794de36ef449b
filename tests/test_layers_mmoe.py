"""MMOE head: shapes, gates are distributions over experts, logits follow the formula."""
import numpy as np
import tensorflow as tf

from trainer.layers.mmoe import MMoE


def test_mmoe_shapes_gates_and_formula():
    tasks = ("click", "long_view", "like")
    layer = MMoE(tasks, num_experts=3, expert_units=[5], tower_units=[4])
    x = np.random.default_rng(0).normal(size=(2, 7, 6)).astype(np.float32)
    logits, gates = layer(tf.constant(x))
    assert set(logits) == set(tasks) and set(gates) == set(tasks)
    for task in tasks:
        assert logits[task].shape == (2, 7)
        assert gates[task].shape == (2, 7, 3)
        np.testing.assert_allclose(gates[task].numpy().sum(-1), 1.0, rtol=1e-6)
        assert np.all(gates[task].numpy() > 0)
    # NumPy reference for one task
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    lin = lambda d, v: v @ d.kernel.numpy() + d.bias.numpy()  # noqa: E731
    experts = np.stack([relu(lin(e.layers[0], x)) for e in layer.experts], axis=-2)
    g = lin(layer.gates["like"], x)
    g = np.exp(g - g.max(-1, keepdims=True))
    g /= g.sum(-1, keepdims=True)
    mixed = (g[..., None] * experts).sum(-2)
    ref = lin(layer.heads["like"], relu(lin(layer.towers["like"].layers[0], mixed)))[..., 0]
    np.testing.assert_allclose(logits["like"].numpy(), ref, rtol=1e-4, atol=1e-5)
    # gates differ per task (one gate per task, not shared)
    assert not np.allclose(gates["click"].numpy(), gates["like"].numpy())
