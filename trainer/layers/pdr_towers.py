"""The two towers of PDR, PR2's personalized dense retrieval (Kuaishou, arXiv 2409.11281).

PR2's dual encoder adds to the query tower "the user profile and behaviour representations
weighted by attention to the query"; JD's DPSR (arXiv 2006.02282) and Taobao's MGDSPR (arXiv
2106.09297) build the same query-user tower (query tokens + profile + history attended by the
query). Both towers end in an L2-normalised vector, so a dot product is a cosine and the
item index can be searched by maximum inner product.

Inputs are the dense tensors of `common.features.parse_examples` (request level [B, ...],
sequence level [B, L, ...]), any sequence length L and query width T: the explicit lengths
(`query_length`, `long_length`) mask the padding, never the padding values.
"""
from __future__ import annotations

import tensorflow as tf

from common import features as F


def _l2_normalize(x):
    return tf.math.l2_normalize(x, axis=-1, epsilon=1e-12)


def _masked_mean(values, mask):
    """Mean over axis 1 of values [B, L, d] where mask [B, L] is true; zeros when none."""
    weight = tf.cast(mask, values.dtype)[..., None]
    return tf.reduce_sum(values * weight, axis=1) / tf.maximum(tf.reduce_sum(weight, axis=1), 1.0)


INTEREST_ENGAGEMENTS = ("watch_ratio", "deep")
INTEREST_GATES = ("relu", "hard")


def interest_engagement_weight(engagement, mode: str = "deep",
                               deep_watch_ratio: float = 0.8):
    """[B, L] engagement factor of the interest read-out from engagement [B, L, E] (watch
    ratio first, like second, as in the canonical and KuaiSAR formats; JD search's first value
    is the click, so there every behaviour counts as deep): "watch_ratio" = the watch ratio
    clipped to [0, 1]; "deep" = 1 for a deep engagement (watch ratio >= deep_watch_ratio or
    a like), else 0."""
    watch = engagement[..., 0]
    if mode == "watch_ratio":
        return tf.clip_by_value(watch, 0.0, 1.0)
    deep = watch >= deep_watch_ratio
    if engagement.shape[-1] is None or engagement.shape[-1] > 1:
        deep |= engagement[..., 1] > 0
    return tf.cast(deep, engagement.dtype)


def interest_summary_vector(content, relevance, engagement, mask, threshold: float = 0.5,
                            engagement_mode: str = "deep", gate: str = "hard",
                            deep_watch_ratio: float = 0.8):
    """[B, D] normalize(sum_i w_i c_i) of QueryUserTower's interest read-out: content [B, L, D]
    (raw content embeddings of the behaviours), relevance [B, L] (cos(query, c_i)),
    engagement [B, L, E], mask [B, L]; w_i = relevance gate x engagement factor (the tower's
    docstring). Zeros when no behaviour qualifies."""
    if gate == "hard":  # on-topic or not: no weight by closeness to the query
        factor = tf.cast(relevance > threshold, relevance.dtype)
    else:
        factor = tf.nn.relu(relevance - threshold)
    weight = factor * interest_engagement_weight(engagement, engagement_mode, deep_watch_ratio)
    weight *= tf.cast(mask, weight.dtype)
    return _l2_normalize(tf.einsum("bl,bld->bd", weight, content))


class QueryAttendedBehaviours(tf.keras.layers.Layer):
    """Target attention over the user's long-term behaviours with the query as the target.

    For behaviour i with item-id embedding x_i, projected frozen content embedding c_i,
    engagement e_i and query cosine r_i = cos(query embedding, content embedding of i) (RSU
    stage 1's relevance, QIN arXiv 2310.06444):

        a_i = softmax_i( <W_q q, W_k [c_i, e_i]> / sqrt(d) + v^T [r_i, e_i] )   over valid i
        u   = sum_i a_i * W_v [x_i, c_i, e_i]

    The bias term lets the tower learn that deep engagement with query-relevant items says
    most about which items of the query's topic the user prefers (QIN's engagement weighting),
    the bilinear term which behaviours are about the query. A user without behaviours gives
    u = 0.
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.query_proj = tf.keras.layers.Dense(units, use_bias=False, name="query_proj")
        self.key_proj = tf.keras.layers.Dense(units, use_bias=False, name="key_proj")
        self.value_proj = tf.keras.layers.Dense(units, name="value_proj")
        self.bias = tf.keras.layers.Dense(1, name="relevance_engagement_bias")

    def call(self, query, item_id_emb, content_emb, relevance, engagement, mask):
        keys = self.key_proj(tf.concat([content_emb, engagement], axis=-1))  # [B, L, d]
        logits = tf.einsum("bd,bld->bl", self.query_proj(query), keys) / tf.sqrt(
            tf.cast(self.units, query.dtype))
        logits += tf.squeeze(self.bias(tf.concat([relevance[..., None], engagement], -1)), -1)
        logits = tf.where(mask, logits, tf.fill(tf.shape(logits), logits.dtype.min))
        weights = tf.nn.softmax(logits, axis=-1) * tf.cast(mask, logits.dtype)
        values = self.value_proj(tf.concat([item_id_emb, content_emb, engagement], axis=-1))
        return tf.einsum("bl,bld->bd", weights, values), weights


class QueryUserTower(tf.keras.layers.Layer):
    """PDR's query-user tower: query tokens and the pretrained query embedding, the user
    profile and user id, and the long-term behaviours attended with the query as the target
    (QueryAttendedBehaviours), through an MLP to one L2-normalised vector [B, output_dim].

    With `interest_summary`, the tower also reads s = normalize(sum_i w_i c_i) over the raw
    content embeddings c_i of the long-term behaviours, w_i = g_i * e_i with r_i = cos(query,
    c_i): the relevance gate g_i = [r_i > interest_threshold] (`interest_gate="hard"`) or
    max(r_i - interest_threshold, 0) ("relu"), and the engagement factor e_i = 1 for a deep
    engagement, watch ratio >= deep_watch_ratio or a like, else 0 (`interest_engagement=
    "deep"`), or the clipped watch ratio ("watch_ratio"). It is the query-relevant, deeply
    engaged part of the history in the content space itself, QIN's RSU stage 1 with
    engagement weighting (arXiv 2310.06444) as a fixed, parameter-free read-out (zeros when no
    behaviour qualifies). "deep" and "hard" keep the subtopic signal: with the linear watch
    ratio the many short views of a topic's other subtopics outweigh the few deep views of the
    preferred one, and weighting by r_i favours the behaviours nearest the topic centre.

    With `use_user=False` only the query inputs are read: the query-only dual encoder
    baseline, same code with the user inputs off.
    """

    def __init__(self, metadata: F.DatasetMetadata, item_embeddings, output_dim: int = 64,
                 id_dim: int = 32, hidden: int = 128, use_user: bool = True,
                 item_id_embedding: tf.keras.layers.Layer = None,
                 interest_summary: bool = False, interest_threshold: float = 0.5,
                 interest_engagement: str = "deep", deep_watch_ratio: float = 0.8,
                 interest_gate: str = "hard", **kwargs):
        super().__init__(**kwargs)
        if interest_engagement not in INTEREST_ENGAGEMENTS:
            raise ValueError(f"interest_engagement must be one of {INTEREST_ENGAGEMENTS}, got "
                             f"{interest_engagement!r}")
        if interest_gate not in INTEREST_GATES:
            raise ValueError(f"interest_gate must be one of {INTEREST_GATES}, got "
                             f"{interest_gate!r}")
        self.interest_gate = interest_gate
        self.use_user = use_user
        self.interest_summary = interest_summary
        self.interest_threshold = interest_threshold
        self.interest_engagement = interest_engagement
        self.deep_watch_ratio = deep_watch_ratio
        self.token_embedding = tf.keras.layers.Embedding(metadata.query_token_buckets, id_dim,
                                                         name="query_token_embedding")
        self.query_proj = tf.keras.layers.Dense(id_dim, name="query_embedding_proj")
        if use_user:
            self.profile_embedding = tf.keras.layers.Embedding(
                metadata.profile_buckets, id_dim, name="profile_embedding")
            self.user_embedding = tf.keras.layers.Embedding(metadata.num_users + 1, id_dim,
                                                            name="user_embedding")
            self.content = tf.constant(item_embeddings, tf.float32)  # frozen, row = item index
            self.content_proj = tf.keras.layers.Dense(id_dim, name="content_proj")
            self.item_id_embedding = item_id_embedding or tf.keras.layers.Embedding(
                metadata.num_items + 1, id_dim, name="behaviour_item_embedding")
            self.attention = QueryAttendedBehaviours(id_dim, name="query_attention")
        self.mlp = tf.keras.Sequential([tf.keras.layers.Dense(hidden, activation="relu"),
                                        tf.keras.layers.Dense(output_dim)], name="mlp")

    def call(self, features, return_attention: bool = False):
        tokens = tf.cast(features[F.QUERY_TOKENS], tf.int64)
        token_mask = tf.sequence_mask(features[F.QUERY_LENGTH], tf.shape(tokens)[1])
        query_emb = tf.cast(features[F.QUERY_EMBEDDING], tf.float32)
        query = tf.concat([_masked_mean(self.token_embedding(tokens), token_mask),
                           self.query_proj(query_emb)], axis=-1)
        parts = [query]
        attention = None
        if self.use_user:
            profile = tf.reduce_mean(self.profile_embedding(
                tf.cast(features[F.USER_PROFILE], tf.int64)), axis=1)
            user = self.user_embedding(tf.cast(features[F.USER_INDEX], tf.int64))
            items = tf.cast(features[F.seq_feature(F.LONG_TERM, F.SEQ_ITEM)], tf.int64)
            items = tf.where((items >= 0) & (items < tf.shape(self.content, out_type=tf.int64)[0]),
                             items, tf.zeros_like(items))
            mask = tf.sequence_mask(features[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)],
                                    tf.shape(items)[1])
            raw_engagement = tf.cast(features[F.seq_feature(F.LONG_TERM, F.SEQ_ENGAGEMENT)],
                                     tf.float32)
            raw_content = tf.gather(self.content, items)  # [B, L, D]
            relevance = tf.reduce_sum(
                _l2_normalize(raw_content) * _l2_normalize(query_emb)[:, None, :], axis=-1)
            engagement = tf.clip_by_value(raw_engagement, 0.0, 1.0)
            attended, attention = self.attention(
                query, self.item_id_embedding(items), self.content_proj(raw_content),
                relevance, engagement, mask)
            parts += [profile, user, attended]
            if self.interest_summary:
                parts.append(interest_summary_vector(
                    raw_content, relevance, raw_engagement, mask, self.interest_threshold,
                    self.interest_engagement, self.interest_gate, self.deep_watch_ratio))
        out = _l2_normalize(self.mlp(tf.concat(parts, axis=-1)))
        return (out, attention) if return_attention else out


class ItemTower(tf.keras.layers.Layer):
    """PDR's item tower: item id, author, categories (one shared vocabulary, one embedding per
    level) and the frozen pretrained content embedding, through an MLP to one L2-normalised
    vector [..., output_dim]. Inputs are item indices [...] (row of the content table),
    author indices [...] and category indices [..., NUM_CATEGORY_LEVELS]."""

    def __init__(self, metadata: F.DatasetMetadata, item_embeddings, output_dim: int = 64,
                 id_dim: int = 32, hidden: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.content = tf.constant(item_embeddings, tf.float32)
        self.item_embedding = tf.keras.layers.Embedding(metadata.num_items + 1, id_dim,
                                                        name="item_embedding")
        self.author_embedding = tf.keras.layers.Embedding(metadata.num_authors + 1, id_dim,
                                                          name="author_embedding")
        self.category_embedding = tf.keras.layers.Embedding(metadata.num_categories + 1, id_dim,
                                                            name="category_embedding")
        self.content_proj = tf.keras.layers.Dense(id_dim, name="content_proj")
        self.mlp = tf.keras.Sequential([tf.keras.layers.Dense(hidden, activation="relu"),
                                        tf.keras.layers.Dense(output_dim)], name="mlp")

    def call(self, item, author, category):
        item = tf.cast(item, tf.int64)
        item = tf.where((item >= 0) & (item < tf.shape(self.content, out_type=tf.int64)[0]),
                        item, tf.zeros_like(item))
        category = self.category_embedding(tf.cast(category, tf.int64))  # [..., levels, d]
        levels = tf.unstack(category, num=F.NUM_CATEGORY_LEVELS, axis=-2)
        parts = [self.item_embedding(item), self.author_embedding(tf.cast(author, tf.int64)),
                 *levels, self.content_proj(tf.gather(self.content, item))]
        return _l2_normalize(self.mlp(tf.concat(parts, axis=-1)))
