"""DIN baseline: target attention over the recent behaviours with an activation unit.

Follows Zhou et al., "Deep Interest Network for Click-Through Rate Prediction" (KDD 2018):

    w_j   = MLP([q, k_j, q - k_j, q * k_j])      activation unit, one scalar per behaviour
    u     = sum_j w_j v_j                        weights NOT softmax-normalised (as in DIN)

q = the candidate, k_j / v_j = projections of behaviour j (computed once per request). Padded
behaviours get weight exactly 0, so an empty sequence yields a zero vector.
"""
import tensorflow as tf


class DinAttention(tf.keras.layers.Layer):
    """call(tokens [B, R, F], mask [B, R], target [B, N, Ft]) -> (u [B, N, H], w [B, N, R])."""

    def __init__(self, hidden_units=64, attention_units=32, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units, self.attention_units = hidden_units, attention_units
        self.query = tf.keras.layers.Dense(attention_units, name="query")
        self.key = tf.keras.layers.Dense(attention_units, name="key")
        self.value = tf.keras.layers.Dense(hidden_units, name="value")
        self.activation_hidden = tf.keras.layers.Dense(36, activation="sigmoid",
                                                       name="activation_hidden")
        self.activation_out = tf.keras.layers.Dense(1, name="activation_out")

    def call(self, tokens, mask, target, training=None):
        q = self.query(target)[:, :, tf.newaxis, :]  # [B, N, 1, A]
        k = self.key(tokens)[:, tf.newaxis, :, :]  # [B, 1, R, A]
        q, k = q + tf.zeros_like(k), k + tf.zeros_like(q)  # broadcast to [B, N, R, A]
        unit_input = tf.concat([q, k, q - k, q * k], axis=-1)
        weights = tf.squeeze(self.activation_out(self.activation_hidden(unit_input)), -1)
        valid = tf.broadcast_to(mask[:, tf.newaxis, :], tf.shape(weights))
        weights = tf.where(valid, weights, tf.zeros_like(weights))
        return tf.einsum("bnr,brh->bnh", weights, self.value(tokens)), weights

    def get_config(self):
        return {**super().get_config(), "hidden_units": self.hidden_units,
                "attention_units": self.attention_units}
