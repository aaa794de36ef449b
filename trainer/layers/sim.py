"""SIM baselines: search-based user interest modelling over the long-term sequence.

Follows Pi et al., "Search-based User Interest Modeling with Lifelong Sequential Behavior Data
for Click-Through Rate Prediction" (CIKM 2020, arXiv 2006.05639):

* General Search Unit (GSU), per candidate, keeps K behaviours:
  - hard search: behaviours whose category (level `category_level`) equals the target's, the
    K most recent of them (sequences are ordered most recent first);
  - soft search: top-K by inner product of the learned ID-field embeddings of target and
    behaviour (trained through the ESU and the rest of the model; SIM's separate auxiliary
    soft-search network is not reproduced).
* Exact Search Unit (ESU): multi-head target attention (tf.keras.layers.MultiHeadAttention,
  one query = the candidate) over the K kept behaviours.

Padding and behaviours not kept get weight exactly 0; with nothing kept the interest is 0.
"""
import tensorflow as tf

from trainer.layers import masking


class SimSearchUnit(tf.keras.layers.Layer):
    """call(target_id [B,N,Fi], target_attr [B,N,Fa], target_category [B,N,LEVELS],
    behaviour_id [B,L,Fi], behaviour_attr [B,L,Fa], behaviour_category [B,L,LEVELS],
    cross [B,L,C], mask [B,L]) -> (u [B,N,H], positions [B,N,K] (-1 = none), weights [B,N,K])."""

    def __init__(self, mode="hard", k=20, hidden_units=64, num_heads=4, category_level=-1,
                 **kwargs):
        super().__init__(**kwargs)
        if mode not in ("hard", "soft"):
            raise ValueError(f"SIM mode must be 'hard' or 'soft', got {mode!r}")
        self.mode, self.k, self.hidden_units = mode, k, hidden_units
        self.num_heads, self.category_level = num_heads, category_level
        self.behaviour_projection = tf.keras.layers.Dense(hidden_units, name="behaviour_tokens")
        self.esu = tf.keras.layers.MultiHeadAttention(
            num_heads=num_heads, key_dim=hidden_units // num_heads, output_shape=hidden_units,
            name="esu")

    def search(self, target_id, target_category, behaviour_id, behaviour_category, mask):
        """GSU: (indices into L [B, N, K], valid [B, N, K])."""
        batch, num_cand = tf.shape(target_id)[0], tf.shape(target_id)[1]
        length = tf.shape(mask)[1]
        valid = tf.broadcast_to(mask[:, tf.newaxis, :], [batch, num_cand, length])
        if self.mode == "hard":
            target_cat = target_category[..., self.category_level]  # [B, N]
            behaviour_cat = behaviour_category[..., self.category_level]  # [B, L]
            same = tf.equal(target_cat[:, :, tf.newaxis], behaviour_cat[:, tf.newaxis, :])
            valid = valid & same & (target_cat[:, :, tf.newaxis] > 0)
            recency = -tf.cast(tf.range(length), target_id.dtype)  # most recent first
            scores = tf.broadcast_to(recency[tf.newaxis, tf.newaxis], [batch, num_cand, length])
        else:
            scores = tf.einsum("bnf,blf->bnl", target_id, behaviour_id)
        return masking.masked_top_k(scores, valid, self.k)

    def call(self, target_id, target_attr, target_category, behaviour_id, behaviour_attr,
             behaviour_category, cross, mask, training=None):
        indices, valid = self.search(target_id, target_category, behaviour_id,
                                     behaviour_category, mask)
        tokens = self.behaviour_projection(tf.concat([behaviour_id, behaviour_attr, cross], -1))
        kept = masking.gather_positions(tokens, indices)  # [B, N, K, H]
        batch, num_cand, k = tf.shape(indices)[0], tf.shape(indices)[1], tf.shape(indices)[2]
        target = tf.concat([target_id, target_attr], -1)
        query = tf.reshape(target, [-1, 1, target.shape[-1]])
        values = tf.reshape(kept, [-1, k, self.hidden_units])
        flat_valid = tf.reshape(valid, [-1, 1, k])
        out, scores = self.esu(query, values, attention_mask=flat_valid,
                               return_attention_scores=True, training=training)
        any_valid = tf.reduce_any(valid, axis=-1, keepdims=True)
        out = tf.reshape(out, [batch, num_cand, self.hidden_units])
        out = tf.where(any_valid, out, tf.zeros_like(out))
        weights = tf.reshape(tf.reduce_mean(scores, axis=1), [batch, num_cand, k])
        weights = tf.where(valid, weights, tf.zeros_like(weights))
        return out, tf.where(valid, indices, -1), weights

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "k": self.k,
                "hidden_units": self.hidden_units, "num_heads": self.num_heads,
                "category_level": self.category_level}
