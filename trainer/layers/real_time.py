"""Real-time unit: the user's most recent behaviours, modelled as in PR2's ranking stage.

Follows Kuaishou's PR2 (arXiv 2409.11281), whose ranking model handles real-time behaviours
with self-attention followed by target attention with the candidate:

    x_j   = W_in [id field, attribute field, cross features]_j + p_j   (p = position embedding)
    z     = LayerNorm(x + MultiHeadSelfAttention(x, mask))              once per request
    z'    = LayerNorm(z + FFN(z))
    u_rt  = TargetAttention(candidate, z', mask)                        per candidate

Self-attention uses tf.keras.layers.MultiHeadAttention with a [B, R, R] mask built from
`rt_length`, so padded behaviours are never attended to; padded rows are ignored by the target
attention. An empty sequence yields a zero vector.
"""
import tensorflow as tf

from trainer.layers import masking
from trainer.layers.attention import TargetAttention


class RealTimeUnit(tf.keras.layers.Layer):
    """call(tokens [B, R, F], mask [B, R], target [B, N, Ft]) -> (u_rt [B, N, H], w [B, N, R])."""

    def __init__(self, hidden_units=64, num_heads=4, attention_units=32, max_length=50,
                 dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units, self.num_heads = hidden_units, num_heads
        self.attention_units, self.max_length, self.dropout = attention_units, max_length, dropout
        self.input_projection = tf.keras.layers.Dense(hidden_units, name="input_projection")
        self.position = tf.keras.layers.Embedding(max_length, hidden_units, name="position")
        self.self_attention = tf.keras.layers.MultiHeadAttention(
            num_heads=num_heads, key_dim=hidden_units // num_heads, dropout=dropout,
            name="self_attention")
        self.norm1 = tf.keras.layers.LayerNormalization(name="norm1")
        self.ffn_hidden = tf.keras.layers.Dense(2 * hidden_units, activation="relu", name="ffn1")
        self.ffn_out = tf.keras.layers.Dense(hidden_units, name="ffn2")
        self.norm2 = tf.keras.layers.LayerNormalization(name="norm2")
        self.target_attention = TargetAttention(hidden_units, attention_units,
                                                name="target_attention")

    def encode(self, tokens, mask, training=None):
        """Request-side: the self-attended sequence [B, R, H]."""
        length = tf.shape(tokens)[1]
        positions = tf.minimum(tf.range(length), self.max_length - 1)
        x = self.input_projection(tokens) + self.position(positions)[tf.newaxis]
        x = masking.zero_masked(x, mask)
        pair_mask = mask[:, :, tf.newaxis] & mask[:, tf.newaxis, :]
        attended = self.self_attention(x, x, attention_mask=pair_mask, training=training)
        z = self.norm1(x + attended)
        z = self.norm2(z + self.ffn_out(self.ffn_hidden(z)))
        return masking.zero_masked(z, mask)

    def call(self, tokens, mask, target, training=None):
        return self.target_attention(target, self.encode(tokens, mask, training=training), mask)

    def get_config(self):
        return {**super().get_config(), "hidden_units": self.hidden_units,
                "num_heads": self.num_heads, "attention_units": self.attention_units,
                "max_length": self.max_length, "dropout": self.dropout}
