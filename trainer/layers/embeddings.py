"""Embedding tables of the ranking model: trainable ID tables and the frozen content table.

`FeatureEmbeddings` owns every table (sizes from `DatasetMetadata`) and builds the two item
fields QIN (Guo et al., "Query-dominant User Interest Network for Large-Scale Search Ranking",
CIKM 2023) attends over: the ID field (item id + author id embeddings) and the
attribute/content field (category embeddings + pretrained multimodal content embedding). The
content table holds the pretrained `item_embeddings.npy` ([num_items + 1, D], row 0 zeros) as a
non-trainable weight, so the exported model looks vectors up itself and the ranker never
changes the space in which the RSU measures relevance. An optional frozen duration table
(`item_durations.npy`, seconds, 0 = unknown) gives each item's standardised log duration and a
known flag the same way.

Indices outside a table (a dataset/model mismatch, or serving traffic from a newer vocabulary)
map to index 0, the project-wide "unknown" index, instead of failing the whole request.
"""
import numpy as np
import tensorflow as tf

from common import features as F

NUM_SOURCES = 3  # SOURCE_UNKNOWN, SOURCE_FEED, SOURCE_SEARCH


def safe_index(ids, size):
    """int32 ids with anything outside [0, size) mapped to the unknown index 0."""
    ids = tf.cast(ids, tf.int32)
    return tf.where((ids >= 0) & (ids < size), ids, tf.zeros_like(ids))


class FeatureEmbeddings(tf.keras.layers.Layer):
    """All embedding tables, looked up through named methods.

    id tables (trainable, `dim` wide): items, authors, categories (one table shared by all
    category levels), users, query tokens, user-profile values.
    content table (frozen, D wide): the pretrained item embeddings.
    """

    def __init__(self, metadata, item_embeddings, dim, l2=0.0, item_durations=None, **kwargs):
        super().__init__(**kwargs)
        item_embeddings = np.asarray(item_embeddings, dtype=np.float32)
        expected = (metadata.num_items + 1, metadata.embedding_dim)
        if item_embeddings.shape != expected:
            raise ValueError(
                f"item embeddings have shape {item_embeddings.shape}, metadata.json expects "
                f"{expected} (num_items + 1, embedding_dim): are they from the same "
                f"preprocessing run?")
        if np.any(item_embeddings[F.OOV_INDEX] != 0):
            raise ValueError("row 0 (unknown item) of the item embeddings must be all zeros")
        if not np.all(np.isfinite(item_embeddings)):
            raise ValueError("item embeddings contain NaN or infinite values")
        self.dim = dim
        self.content_dim = metadata.embedding_dim
        self.sizes = {
            "item": metadata.num_items + 1,
            "author": metadata.num_authors + 1,
            "category": metadata.num_categories + 1,
            "user": metadata.num_users + 1,
            "query_token": max(metadata.query_token_buckets, 1),
            "profile": max(metadata.profile_buckets, 1),
        }
        regularizer = tf.keras.regularizers.l2(l2) if l2 else None
        self.tables = {
            name: self.add_weight(
                name=f"{name}_embeddings", shape=(size, dim), trainable=True,
                initializer=tf.keras.initializers.RandomNormal(stddev=0.05),
                regularizer=regularizer)
            for name, size in self.sizes.items()
        }
        self.content_table = self.add_weight(
            name="item_content_embeddings", shape=item_embeddings.shape, trainable=False,
            initializer=tf.keras.initializers.Constant(item_embeddings))
        self.duration_table = None
        if item_durations is not None:
            rows = duration_feature_rows(item_durations, metadata.num_items + 1)
            self.duration_table = self.add_weight(
                name="item_duration_features", shape=rows.shape, trainable=False,
                initializer=tf.keras.initializers.Constant(rows))

    # Lookups return the layer's compute dtype (float16 under a mixed_float16 policy); the
    # tables themselves stay float32.
    def lookup(self, table, ids):
        """[...] ids -> [..., dim]."""
        emb = tf.gather(self.tables[table], safe_index(ids, self.sizes[table]))
        return tf.cast(emb, self.compute_dtype)

    def content(self, item_ids, dtype=None):
        """[...] item ids -> [..., D] frozen pretrained content embeddings."""
        emb = tf.gather(self.content_table, safe_index(item_ids, self.sizes["item"]))
        return tf.cast(emb, dtype or self.compute_dtype)

    def duration(self, item_ids):
        """[...] item ids -> [..., DURATION_FEATURE_DIM] (standardised log duration, known flag);
        zeros for unknown items and items without a duration."""
        rows = tf.gather(self.duration_table, safe_index(item_ids, self.sizes["item"]))
        return tf.cast(rows, self.compute_dtype)

    def categories(self, category_ids):
        """[..., LEVELS] category ids -> [..., LEVELS * dim] (levels concatenated)."""
        emb = self.lookup("category", category_ids)
        width = F.NUM_CATEGORY_LEVELS * self.dim
        flat = tf.reshape(emb, tf.concat([tf.shape(emb)[:-2], [width]], axis=0))
        flat.set_shape(emb.shape[:-2].concatenate([width]))
        return flat

    def id_field(self, item_ids, author_ids):
        """ID field of an item: [item id emb, author id emb] -> [..., 2 * dim]."""
        return tf.concat([self.lookup("item", item_ids), self.lookup("author", author_ids)], -1)

    def attribute_field(self, item_ids, category_ids):
        """Attribute/content field: [category embs, content emb] -> [..., LEVELS*dim + D]."""
        return tf.concat([self.categories(category_ids), self.content(item_ids)], axis=-1)

    @property
    def id_field_dim(self):
        return 2 * self.dim

    @property
    def attribute_field_dim(self):
        return F.NUM_CATEGORY_LEVELS * self.dim + self.content_dim


DURATION_FEATURE_DIM = 2


def duration_feature_rows(item_durations, num_rows: int) -> np.ndarray:
    """float32 [num_rows, 2] from durations in seconds (0 = unknown): log1p(seconds)
    standardised over the items with a duration, and 1 where the duration is known. The
    standardisation is stored in the rows, so a reloaded or exported model needs no constants.
    """
    seconds = np.asarray(item_durations, dtype=np.float64)
    if seconds.shape != (num_rows,):
        raise ValueError(f"item durations have shape {seconds.shape}, metadata.json expects "
                         f"({num_rows},) (num_items + 1): are they from the same preprocessing "
                         f"run?")
    if not np.all(np.isfinite(seconds)) or np.any(seconds < 0):
        raise ValueError("item durations must be finite seconds >= 0 (0 = unknown)")
    known = seconds > 0
    known[F.OOV_INDEX] = False
    rows = np.zeros((num_rows, DURATION_FEATURE_DIM), np.float32)
    if known.any():
        logs = np.log1p(seconds[known])
        rows[known, 0] = (logs - logs.mean()) / max(float(logs.std()), 1e-6)
        rows[known, 1] = 1.0
    return rows


def behaviour_cross_features(engagement, source, time_gap, mask):
    """User-behaviour cross features [..., ENGAGEMENT_DIM + NUM_SOURCES + 1]: engagement values,
    source one-hot and log1p(time gap in hours). Zero at masked (padded) positions."""
    engagement = tf.cast(engagement, tf.float32)
    source = tf.one_hot(safe_index(source, NUM_SOURCES), NUM_SOURCES)
    hours = tf.maximum(tf.cast(time_gap, tf.float32), 0.0) / 3600.0
    cross = tf.concat([engagement, source, tf.math.log1p(hours)[..., tf.newaxis]], axis=-1)
    cross = tf.where(tf.math.is_finite(cross), cross, tf.zeros_like(cross))
    return tf.where(mask[..., tf.newaxis], cross, tf.zeros_like(cross))


CROSS_FEATURE_DIM = F.ENGAGEMENT_DIM + NUM_SOURCES + 1
