"""Target attention: how much each behaviour of a sequence matters for one candidate.

Scaled dot-product attention (Vaswani et al., "Attention Is All You Need", NeurIPS 2017) with
the candidate as the single query, as in the target-attention modules of DIN/SIM/TWIN and the
real-time branch of PR2's ranking model (arXiv 2409.11281). Keys and values are projected once
per request ([B, L, ...]); every candidate of the request attends with its own query, and the
softmax runs over the valid positions only (weights exactly 0 on padding, all 0 when the
sequence is empty).
"""
import tensorflow as tf

from trainer.layers import masking


class TargetAttention(tf.keras.layers.Layer):
    """call(target [B, N, Ft], sequence [B, L, Fs], mask [B, L]) -> (out [B, N, H], w [B, N, L])."""

    def __init__(self, hidden_units=64, attention_units=32, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units, self.attention_units = hidden_units, attention_units
        self.query = tf.keras.layers.Dense(attention_units, use_bias=False, name="query")
        self.key = tf.keras.layers.Dense(attention_units, use_bias=False, name="key")
        self.value = tf.keras.layers.Dense(hidden_units, name="value")

    def call(self, target, sequence, mask):
        logits = tf.einsum("bna,bla->bnl", self.query(target), self.key(sequence))
        weights = masking.masked_softmax(logits / (self.attention_units ** 0.5),
                                         mask[:, tf.newaxis, :])
        return tf.einsum("bnl,blh->bnh", weights, self.value(sequence)), weights

    def get_config(self):
        return {**super().get_config(), "hidden_units": self.hidden_units,
                "attention_units": self.attention_units}
