"""Engaged-interest centroids: how close a candidate is to what the user engaged with deeply,
inside the candidate's category, among the query-relevant behaviours.

QIN's stage 2 keeps the K2 behaviours *nearest* the target and the FAU attends over them. A
nearest-neighbour view is fragile when a user touched every sub-interest of a topic now and
then: some deeply watched item lies near any candidate. What separates the sub-interest a
user prefers is the *average* of their engagement inside the topic: the centroid of their
deeply engaged behaviours points to it, the centroid of the skipped ones away from it.
Measured with the classical baseline's features on generated logs (docs/REPORT.md, "Where the
gap to the GBDT is"): the cosine of the candidate to the mean of the user's deep behaviours of
its category adds 3.2 test GAUC points to a network over the non-personal features, the
nearest deep behaviour only 0.8.

For every candidate n and each of U learned engagement directions u, over the stage-1
behaviours i of the candidate's coarsest category (or, without a category, all of them):

    w_u(i)   = sigmoid(a_u . c_i + b_u)              c_i: engagement, source, time gap
    m_u      = sum_i w_u(i) e_i / sum_i w_u(i)       e_i: frozen content embedding
    out      = ( cos(e_target, m_u),  log1p(sum_i w_u(i)) )_u      -> [B, N, 2U]

The engagement directions are the learned counterpart of the classical "deep" / "shallow"
split. Without engagement weighting (the ablation) every w_u(i) = 1: the centroid of all the
category's behaviours. A candidate with no such behaviour gets zeros.
"""
import tensorflow as tf

from trainer.layers.relevance_search import cosine


class InterestCentroids(tf.keras.layers.Layer):
    """call(target_content [B,N,D], target_category [B,N], behaviour_content [B,S,D],
    behaviour_category [B,S], cross [B,S,C], valid [B,S]) -> [B, N, 2 * units]."""

    def __init__(self, units: int, use_engagement_weighting: bool = True, **kwargs):
        super().__init__(**kwargs)
        if units < 1:
            raise ValueError(f"InterestCentroids needs units >= 1, got {units}")
        self.units = int(units)
        self.use_engagement_weighting = use_engagement_weighting
        self.engagement = (tf.keras.layers.Dense(units, activation="sigmoid",
                                                 name="centroid_engagement")
                           if use_engagement_weighting else None)

    @property
    def output_dim(self) -> int:
        return 2 * self.units

    def call(self, target_content, target_category, behaviour_content, behaviour_category,
             cross, valid):
        dtype = tf.float32  # relevance in float32, as the RSU's
        if self.engagement is not None:
            weights = tf.cast(self.engagement(tf.cast(cross, self.compute_dtype)), dtype)
        else:
            weights = tf.ones(tf.concat([tf.shape(valid), [self.units]], 0), dtype)
        weights = weights * tf.cast(valid, dtype)[..., tf.newaxis]  # [B, S, U]
        # same coarsest category as the candidate (unknown category 0 matches everything)
        behaviour_category = tf.cast(behaviour_category, tf.int32)
        target_category = tf.cast(target_category, tf.int32)
        same = ((behaviour_category[:, tf.newaxis, :] == target_category[..., tf.newaxis])
                | (target_category[..., tf.newaxis] <= 0))  # [B, N, S]
        per_candidate = tf.cast(same, dtype)[..., tf.newaxis] * weights[:, tf.newaxis]
        mass = tf.reduce_sum(per_candidate, axis=2)  # [B, N, U]
        sums = tf.einsum("bnsu,bsd->bnud", per_candidate, tf.cast(behaviour_content, dtype))
        centroids = sums / tf.maximum(mass, 1e-6)[..., tf.newaxis]
        closeness = cosine(tf.cast(target_content, dtype)[:, :, tf.newaxis, :], centroids)
        closeness = tf.where(mass > 1e-6, closeness, 0.0)
        out = tf.concat([closeness, tf.math.log1p(mass)], axis=-1)
        return tf.cast(out, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "use_engagement_weighting": self.use_engagement_weighting}
