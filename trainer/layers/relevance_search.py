"""Relevance Search Unit (RSU) of QIN.

Follows Guo et al., "Query-dominant User Interest Network for Large-Scale Search Ranking"
(CIKM 2023, arXiv 2310.06444): a two-stage cascade over the user's long-term (full-site)
behaviours, both stages measuring cosine similarity between frozen pretrained multimodal
embeddings that put queries and items in one space:

    stage 1 (once per request):    S1 = top-K1_i cos(e_query, c_i)   over valid behaviours i,
                                   behaviours with cos < eps dropped (PR2's relevance threshold)
    stage 2 (once per candidate):  S2 = top-K2_{i in S1} cos(c_target, c_i)

Validity always comes from the explicit sequence length. Stage 1 keeps every valid behaviour
when there are at most K1 of them. When preprocessing already ran stage 1 over the whole
history (`long_term_mode == "stage1"`), the input holds exactly the stage-1 result and stage 1
here is the identity on its first K1 positions. Ablations: without stage 1 every valid
behaviour goes to stage 2; without stage 2 every candidate keeps all of S1.

The unit has no weights and uses only stock TensorFlow ops (normalise, matmul, top_k, gather).
"""
import tensorflow as tf

from trainer.layers import masking


def normalize64(x):
    """L2-normalises the last axis in float64 (zero vectors stay zero)."""
    x = tf.cast(x, tf.float64)
    return x * tf.math.rsqrt(tf.maximum(tf.reduce_sum(x * x, axis=-1, keepdims=True), 1e-24))


def cosine(a, b):
    """Cosine along the last axis of broadcastable a and b, as float32; 0 when either vector
    is zero. Float64 inside, for the reason given in `RelevanceSearchUnit`."""
    return tf.cast(tf.reduce_sum(normalize64(a) * normalize64(b), axis=-1), tf.float32)


class RelevanceSearchUnit(tf.keras.layers.Layer):
    """Relevances are cosines computed in float64 and rounded once to float32. In float32 a
    matmul or reduction rounds differently depending on the batch and sequence shapes it is
    blocked into, so one behaviour's score would differ in the last bit between a request served
    alone and the same request batched or padded with others, and near-ties (re-watched copies
    of one item) would select different behaviours in the listwise and per-example signatures.
    In float64 those differences are ~1e-16 and vanish in the final rounding: the scores, and so
    the selections, are the same whatever the shapes around them, at matmul speed and memory.

    stage1(query, contents, mask) -> (positions [B, S], valid [B, S]);
    stage2(targets, stage-1 contents, stage-1 valid) -> (indices into S [B, N, K], valid);
    stage2_scored: the same plus the kept behaviours' target relevance [B, N, K]."""

    def __init__(self, k1=100, k2=20, threshold=None, use_stage1=True, use_stage2=True,
                 precomputed_stage1=False, **kwargs):
        super().__init__(**kwargs)
        if k2 > k1:
            raise ValueError(f"k2={k2} exceeds k1={k1}")
        self.k1, self.k2, self.threshold = k1, k2, threshold
        self.use_stage1, self.use_stage2 = use_stage1, use_stage2
        self.precomputed_stage1 = precomputed_stage1

    def query_relevance(self, query, contents):
        """cos(query [B, D], contents [B, L, D]) -> [B, L]."""
        return tf.cast(tf.einsum("bd,bld->bl", normalize64(query), normalize64(contents)),
                       tf.float32)

    def stage1(self, query, contents, mask):
        batch, length = tf.shape(mask)[0], tf.shape(mask)[1]
        if not self.use_stage1:
            positions = tf.broadcast_to(tf.range(length)[tf.newaxis], [batch, length])
            return positions, mask
        keep = mask
        if self.threshold is not None:
            keep = keep & (self.query_relevance(query, contents) >= self.threshold)
        if self.precomputed_stage1:
            size = tf.minimum(self.k1, length)
            positions = tf.broadcast_to(tf.range(size)[tf.newaxis], [batch, size])
            return positions, keep[:, :size]
        return masking.masked_top_k(self.query_relevance(query, contents), keep, self.k1)

    def target_relevance(self, targets, contents):
        """cos(targets [B, N, D], contents [B, S, D]) -> [B, N, S]."""
        return tf.cast(tf.einsum("bnd,bsd->bns", normalize64(targets), normalize64(contents)),
                       tf.float32)

    def stage2(self, targets, contents, valid):
        indices, valid, _ = self.stage2_scored(targets, contents, valid)
        return indices, valid

    def stage2_scored(self, targets, contents, valid):
        """`stage2` plus the target relevance of every kept behaviour [B, N, K] (0 where not
        valid), computed once: the FAU's interest intensity weighs behaviours by it."""
        batch, num_cand = tf.shape(targets)[0], tf.shape(targets)[1]
        size = tf.shape(valid)[1]
        valid_per_target = tf.broadcast_to(valid[:, tf.newaxis, :], [batch, num_cand, size])
        relevance = self.target_relevance(targets, contents)  # [B, N, S]
        if not self.use_stage2:
            indices = tf.broadcast_to(tf.range(size)[tf.newaxis, tf.newaxis],
                                      [batch, num_cand, size])
            kept = valid_per_target
        else:
            indices, kept = masking.masked_top_k(relevance, valid_per_target, self.k2)
        selected = tf.gather(relevance, indices, batch_dims=2)
        return indices, kept, tf.where(kept, selected, tf.zeros_like(selected))

    def call(self, query, contents, mask, targets):
        """Both stages. Returns (positions in the input sequence [B, N, K], -1 where invalid;
        valid [B, N, K])."""
        positions1, valid1 = self.stage1(query, contents, mask)
        indices, valid = self.stage2(targets, masking.gather_positions(contents, positions1),
                                     valid1)
        positions = tf.gather(positions1, indices, batch_dims=1)
        return tf.where(valid, positions, -1), valid

    def get_config(self):
        return {**super().get_config(), "k1": self.k1, "k2": self.k2,
                "threshold": self.threshold, "use_stage1": self.use_stage1,
                "use_stage2": self.use_stage2, "precomputed_stage1": self.precomputed_stage1}
