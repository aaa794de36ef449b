"""Masking utilities shared by every attention and selection unit.

Masks always come from explicit lengths or counts (`long_length`, `rt_length`,
`num_candidates`), never from a pad id: TF Serving's batching pads variable-length inputs with
their first element, so a padded slot can hold any value. Every helper here guarantees that a
masked position contributes exactly zero, whatever its value.
"""
import tensorflow as tf

# Masked logits get this value: far below any real score, yet finite so that arithmetic on it
# never produces NaN, and exp(NEG_LARGE - max) underflows to exactly 0 in float32.
NEG_LARGE = -1e9


def length_mask(lengths, maxlen):
    """[B] lengths -> [B, maxlen] boolean mask, lengths clipped into [0, maxlen]."""
    lengths = tf.clip_by_value(tf.cast(lengths, tf.int32), 0, tf.cast(maxlen, tf.int32))
    return tf.sequence_mask(lengths, maxlen=maxlen)


def zero_masked(values, mask):
    """Replaces masked-out entries by 0. `mask` has the shape of `values` without trailing dims."""
    mask = tf.convert_to_tensor(mask)
    while mask.shape.rank < values.shape.rank:
        mask = mask[..., tf.newaxis]
    return tf.where(mask, values, tf.zeros_like(values))


def masked_logits(logits, mask):
    """Replaces masked-out logits by NEG_LARGE (the dtype's lowest value in float16)."""
    low = max(NEG_LARGE, float(logits.dtype.min)) if logits.dtype.is_floating else NEG_LARGE
    return tf.where(mask, logits, tf.fill(tf.shape(logits), tf.constant(low, logits.dtype)))


def masked_softmax(logits, mask, axis=-1):
    """Softmax over the valid positions only: weights sum to 1 over `mask`, are exactly 0
    elsewhere, and are all 0 (not NaN) when no position is valid. Computed in float32 (also
    under mixed precision) and returned in the dtype of `logits`."""
    dtype = logits.dtype
    weights = tf.nn.softmax(masked_logits(tf.cast(logits, tf.float32), mask), axis=axis)
    weights = tf.where(mask, weights, tf.zeros_like(weights))
    weights = tf.math.divide_no_nan(weights, tf.reduce_sum(weights, axis=axis, keepdims=True))
    return tf.cast(weights, dtype)


def normalize_weights(weights, mask, axis=-1):
    """Masks non-negative weights and rescales them to sum to 1 (all zero if none is valid)."""
    weights = tf.where(mask, weights, tf.zeros_like(weights))
    return tf.math.divide_no_nan(weights, tf.reduce_sum(weights, axis=axis, keepdims=True))


def masked_mean(values, mask, axis=1):
    """Mean of `values` [.., L, D] over the valid positions of `mask` [.., L]; 0 if none."""
    mask_f = tf.cast(mask, values.dtype)[..., tf.newaxis]
    total = tf.reduce_sum(zero_masked(values, mask), axis=axis)
    return tf.math.divide_no_nan(total, tf.reduce_sum(mask_f, axis=axis))


def masked_top_k(scores, mask, k):
    """Top-k over the last axis among valid positions.

    Returns (indices int32, valid bool), both [..., k] with k = min(k, size of the last axis).
    Invalid positions rank below every valid one, so they are only picked when fewer than k
    positions are valid, and then `valid` is False for them.
    """
    size = tf.shape(scores)[-1]
    k = tf.minimum(tf.cast(k, tf.int32), size)
    _, indices = tf.math.top_k(masked_logits(scores, mask), k=k, sorted=True)
    valid = tf.gather(mask, indices, batch_dims=mask.shape.rank - 1)
    return indices, valid


def pad_last_dim(values, size, pad_value):
    """Pads (or leaves) the last axis of `values` to exactly `size` entries with `pad_value`."""
    missing = tf.maximum(size - tf.shape(values)[-1], 0)
    rank = values.shape.rank
    paddings = tf.concat([tf.zeros([rank - 1, 2], tf.int32), [[0, missing]]], axis=0)
    padded = tf.pad(values, paddings, constant_values=pad_value)
    padded = padded[..., :size]
    return tf.ensure_shape(padded, values.shape[:-1].concatenate([size]))


def gather_positions(values, indices):
    """Per-row gather: values [B, L, ...], indices [B, ...idx] -> [B, ...idx, ...]."""
    return tf.gather(values, indices, batch_dims=1)
