"""TWIN baseline: consistency-preserved two-stage interest network.

Follows Chang et al., "TWIN: TWo-stage Interest Network for Lifelong User Behavior Modeling in
CTR Prediction at Kuaishou" (KDD 2023, arXiv 2302.02352). GSU and ESU share one relevance
metric, per head h:

    alpha_h = (K_h W_h^h)(W_q^h q)^T / sqrt(d_k)  +  (K_c W_c) beta_h
    GSU:  top-K of the long-term sequence by mean_h alpha_h
    ESU:  u = concat_h softmax_{top-K}(alpha_h) . (K W_v^h),  then a linear output projection

K_h = inherent behaviour features (item id, author, category embeddings, content embedding),
K_c = user-behaviour cross features (engagement, source, time gap), each mapped to one scalar
per head by a linear layer (W_c beta). K_h W_h and K W_v are computed once per request; the
GSU then costs O(N * L) dot products per request. Padding never enters the top-K or the softmax.
"""
import tensorflow as tf

from trainer.layers import masking


class TwinUnit(tf.keras.layers.Layer):
    """call(target [B,N,Ft], behaviours [B,L,Fb], cross [B,L,C], mask [B,L])
    -> (u [B,N,H], positions [B,N,K] (-1 = none), weights [B,N,K] (mean over heads))."""

    def __init__(self, k=20, hidden_units=64, attention_units=32, num_heads=4, **kwargs):
        super().__init__(**kwargs)
        if attention_units % num_heads or hidden_units % num_heads:
            raise ValueError("attention_units and hidden_units must be divisible by num_heads")
        self.k, self.hidden_units = k, hidden_units
        self.attention_units, self.num_heads = attention_units, num_heads
        self.key_dim = attention_units // num_heads
        self.value_dim = hidden_units // num_heads
        self.inherent_keys = tf.keras.layers.Dense(attention_units, use_bias=False, name="w_h")
        self.target_query = tf.keras.layers.Dense(attention_units, use_bias=False, name="w_q")
        self.cross_bias = tf.keras.layers.Dense(num_heads, use_bias=False, name="w_c_beta")
        self.values = tf.keras.layers.Dense(hidden_units, name="w_v")
        self.output_projection = tf.keras.layers.Dense(hidden_units, name="output")

    def _heads(self, x, width):
        shape = tf.concat([tf.shape(x)[:-1], [self.num_heads, width]], axis=0)
        out = tf.reshape(x, shape)
        out.set_shape(x.shape[:-1].concatenate([self.num_heads, width]))
        return out

    def relevance(self, target, behaviours, cross):
        """alpha [B, N, L, heads]."""
        keys = self._heads(self.inherent_keys(behaviours), self.key_dim)  # [B, L, h, d]
        query = self._heads(self.target_query(target), self.key_dim)  # [B, N, h, d]
        alpha = tf.einsum("bnhd,blhd->bnlh", query, keys) / (self.key_dim ** 0.5)
        return alpha + self.cross_bias(cross)[:, tf.newaxis, :, :]

    def call(self, target, behaviours, cross, mask, training=None):
        alpha = self.relevance(target, behaviours, cross)
        batch, num_cand = tf.shape(target)[0], tf.shape(target)[1]
        valid_all = tf.broadcast_to(mask[:, tf.newaxis, :], tf.shape(alpha)[:3])
        indices, valid = masking.masked_top_k(tf.reduce_mean(alpha, -1), valid_all, self.k)
        kept_alpha = tf.gather(alpha, indices, batch_dims=2)  # [B, N, K, h]
        weights = masking.masked_softmax(kept_alpha, valid[..., tf.newaxis], axis=2)
        values = self._heads(self.values(tf.concat([behaviours, cross], -1)), self.value_dim)
        kept_values = masking.gather_positions(values, indices)  # [B, N, K, h, dv]
        heads = tf.einsum("bnkh,bnkhd->bnhd", weights, kept_values)
        out = self.output_projection(tf.reshape(heads, [batch, num_cand, self.hidden_units]))
        any_valid = tf.reduce_any(valid, axis=-1, keepdims=True)
        out = tf.where(any_valid, out, tf.zeros_like(out))
        return out, tf.where(valid, indices, -1), tf.reduce_mean(weights, axis=-1)

    def get_config(self):
        return {**super().get_config(), "k": self.k, "hidden_units": self.hidden_units,
                "attention_units": self.attention_units, "num_heads": self.num_heads}
