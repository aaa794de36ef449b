"""PDR, personalized dense retrieval: PR2's dual encoder (Kuaishou, arXiv 2409.11281) on TFRS.

The query-user tower (query tokens, query embedding, user profile, behaviours attended with
the query as the target) and the item tower (item id, author, categories, content embedding)
are in trainer/layers/pdr_towers.py; this module trains them with `tfrs.tasks.Retrieval`:

* Sampled softmax over in-batch negatives. Examples are the *clicked* candidates of the
  requests of a batch (a request with several clicks gives several positives sharing its query
  vector); every other positive of the batch is a negative, except the other clicks of the same
  request (masked with `score_mask`: they are positives of that query too).
* logQ correction: `candidate_sampling_probability` = each item's share of the training
  clicks (add-one smoothed), because popular items appear as in-batch negatives more often
  than the softmax over the corpus assumes (Yi et al., RecSys 2019).
* `remove_accidental_hits`: a negative row holding the query's positive item is masked.
* Hard negatives (extra candidate rows shared by the batch, `PDRConfig.hard_negatives`):
  "shown" = the shown-but-not-clicked candidates of the batch's requests; "mined" = per
  positive, one item drawn from ranks [mined_rank_low, mined_rank_high) of the corpus under
  the model's item vectors of the start of the epoch (an earlier model, refreshed each epoch
  by `RefreshMiningTable`; Facebook EBR, arXiv 2006.11632, mines ranks 101-500); "both".
* Several feedback objectives as sample weights: a positive weighs
  click_weight + long_view_weight * long_view + like_weight * like.

`use_user=False` turns the user inputs off: the query-only dual encoder baseline.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from common import features as F
from trainer.layers.pdr_towers import (INTEREST_ENGAGEMENTS, INTEREST_GATES, ItemTower,
                                       QueryUserTower)

CONFIG_FILE = "pdr_config.json"
FINAL_WEIGHTS_DIR = "final"
FINAL_WEIGHTS_PREFIX = "weights"
HARD_NEGATIVES = ("none", "shown", "mined", "both")
CLICK_TASK = "click"


@dataclasses.dataclass
class PDRConfig:
    """Settings of the PDR dual encoder and its training loss (module docstring)."""

    output_dim: int = 64
    id_dim: int = 32
    hidden: int = 128
    use_user: bool = True  # False: the query-only dual encoder
    # the parameter-free query-relevant engaged-interest read-out of QueryUserTower
    interest_summary: bool = True
    interest_threshold: float = 0.5
    # Which behaviours the read-out averages: engagement factor "deep" = 1 for a deep
    # engagement (watch ratio >= deep_watch_ratio or a like), else 0, or "watch_ratio" (the
    # clipped watch ratio, the earlier read-out); relevance factor "hard" = [cos(query,
    # behaviour) > interest_threshold] or "relu" = max(cos - interest_threshold, 0) (earlier).
    # The deep, hard read-out raised eval recall@200 by +0.011 / +0.013 on two generated
    # datasets (docs/RETRIEVAL.md): the linear watch ratio lets the many short views of other
    # subtopics outweigh the deep views of the preferred one, and weighting by closeness to the
    # query favours the behaviours nearest the topic centre, which say least about the subtopic.
    interest_engagement: str = "deep"
    deep_watch_ratio: float = 0.8
    interest_gate: str = "hard"
    temperature: float = 0.05  # softmax temperature over cosines
    logq_correction: bool = True
    remove_accidental_hits: bool = True
    hard_negatives: str = "none"
    max_shown_negatives: int = 256  # shown-but-not-clicked rows per batch (random subset)
    mined_rank_low: int = 100
    mined_rank_high: int = 500
    # Feedback objectives as sample weights of the clicked positives; long views and likes
    # weighing as much again as the click raised eval recall@100 by 0.012 (docs/RETRIEVAL.md)
    click_weight: float = 1.0
    long_view_weight: float = 1.0
    like_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.hard_negatives not in HARD_NEGATIVES:
            raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVES}, got "
                             f"{self.hard_negatives!r}")
        if not 0 <= self.mined_rank_low < self.mined_rank_high:
            raise ValueError("need 0 <= mined_rank_low < mined_rank_high")
        if self.interest_engagement not in INTEREST_ENGAGEMENTS:
            raise ValueError(f"interest_engagement must be one of {INTEREST_ENGAGEMENTS}, got "
                             f"{self.interest_engagement!r}")
        if self.interest_gate not in INTEREST_GATES:
            raise ValueError(f"interest_gate must be one of {INTEREST_GATES}, got "
                             f"{self.interest_gate!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if min(self.click_weight, self.long_view_weight, self.like_weight) < 0 or \
                self.click_weight <= 0:
            raise ValueError("feedback weights must be >= 0 and click_weight > 0")

    def save(self, model_dir: str) -> str:
        path = os.path.join(model_dir, CONFIG_FILE)
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, model_dir: str) -> "PDRConfig":
        """The config a model was trained with; fields its file lacks (saved before they
        existed) take the value that reproduces that model (LEGACY_DEFAULTS), not today's
        default."""
        with tf.io.gfile.GFile(os.path.join(model_dir, CONFIG_FILE)) as f:
            return cls(**{**LEGACY_DEFAULTS, **json.load(f)})

    @classmethod
    def from_json(cls, text: Optional[str]) -> "PDRConfig":
        """From a JSON object or a path to a .json file; defaults when None."""
        if not text:
            return cls()
        if text.strip().startswith("{"):
            return cls(**json.loads(text))
        with tf.io.gfile.GFile(text) as f:
            return cls(**json.load(f))


# Values of fields added after models were saved without them: what those models ran with.
LEGACY_DEFAULTS = {"interest_engagement": "watch_ratio", "interest_gate": "relu"}


@dataclasses.dataclass
class ItemCorpus:
    """The items the index serves: vocabulary index, author, categories and whether the item
    has a content embedding (a zero row of item_embeddings.npy has none)."""

    item_index: np.ndarray  # int64 [M]
    author_index: np.ndarray  # int64 [M]
    category: np.ndarray  # int64 [M, NUM_CATEGORY_LEVELS]
    has_embedding: np.ndarray  # bool [M]

    def __len__(self) -> int:
        return int(self.item_index.shape[0])

    @classmethod
    def from_store(cls, store, item_embeddings: Optional[np.ndarray] = None) -> "ItemCorpus":
        """Every item of a feature store (common.feature_store.FeatureStore.items())."""
        items = store.items()
        index = np.asarray(items["item_index"], np.int64)
        embedding = (np.asarray(items["embedding"], np.float32) if item_embeddings is None
                     else np.asarray(item_embeddings, np.float32)[index])
        return cls(item_index=index, author_index=np.asarray(items["author_index"], np.int64),
                   category=np.asarray(items["category"], np.int64).reshape(
                       len(index), F.NUM_CATEGORY_LEVELS),
                   has_embedding=np.any(embedding != 0, axis=1))

    @classmethod
    def from_data_dir(cls, data_dir: str) -> "ItemCorpus":
        from common.feature_store import FEATURE_STORE_FILE, SqliteFeatureStore

        path = os.path.join(data_dir, FEATURE_STORE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: the item corpus (authors, categories) "
                                    "comes from the feature store `python -m preprocessing` "
                                    "writes")
        with SqliteFeatureStore(path) as store:
            return cls.from_store(store)

    def subset(self, keep: np.ndarray) -> "ItemCorpus":
        return ItemCorpus(self.item_index[keep], self.author_index[keep], self.category[keep],
                          self.has_embedding[keep])


def click_counts(data_dir: str, split: str, num_items: int) -> np.ndarray:
    """float64 [num_items + 1]: clicks of each item over a split (a pass over its labels)."""
    from trainer import data as data_lib

    spec = {F.CANDIDATE_ITEM: tf.io.RaggedFeature(tf.int64),
            F.label_feature(CLICK_TASK): tf.io.RaggedFeature(tf.float32)}
    files = data_lib.list_files(data_dir, split)
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(1024).map(
        lambda s: tf.io.parse_example(s, spec))
    counts = np.zeros(num_items + 1, np.float64)
    for batch in ds:
        items = batch[F.CANDIDATE_ITEM].flat_values.numpy()
        clicks = batch[F.label_feature(CLICK_TASK)].flat_values.numpy()
        items = np.where((items >= 0) & (items <= num_items), items, 0)
        np.add.at(counts, items, clicks)
    return counts


def sampling_probability(counts: np.ndarray) -> np.ndarray:
    """float32: add-one smoothed share of the clicks of each item (logQ correction)."""
    smoothed = np.asarray(counts, np.float64) + 1.0
    return (smoothed / smoothed.sum()).astype(np.float32)


class PDRModel(tfrs.Model):
    """PR2's personalized dense retrieval (arXiv 2409.11281) as a TFRS two-tower model:
    `call(features)` is the query-user vector [B, output_dim]; `item_vectors(...)` the item
    vectors; `compute_loss` the sampled softmax of the module docstring."""

    def __init__(self, config: PDRConfig, metadata: F.DatasetMetadata, item_embeddings,
                 corpus: ItemCorpus, item_probability: Optional[np.ndarray] = None):
        super().__init__()
        self.config = config
        self.metadata = metadata
        self.query_tower = QueryUserTower(metadata, item_embeddings, config.output_dim,
                                          config.id_dim, config.hidden, config.use_user,
                                          interest_summary=config.interest_summary,
                                          interest_threshold=config.interest_threshold,
                                          interest_engagement=config.interest_engagement,
                                          deep_watch_ratio=config.deep_watch_ratio,
                                          interest_gate=config.interest_gate,
                                          name="query_tower")
        self.item_tower = ItemTower(metadata, item_embeddings, config.output_dim,
                                    config.id_dim, config.hidden, name="item_tower")
        self.task = tfrs.tasks.Retrieval(remove_accidental_hits=config.remove_accidental_hits,
                                         temperature=config.temperature)
        if item_probability is None:
            item_probability = np.full(metadata.num_items + 1, 1.0 / (metadata.num_items + 1))
        self.item_probability = tf.constant(item_probability, tf.float32)
        self.corpus_item = tf.constant(corpus.item_index, tf.int64)
        self.corpus_author = tf.constant(corpus.author_index, tf.int64)
        self.corpus_category = tf.constant(corpus.category, tf.int64)
        self.mining_table = tf.Variable(tf.zeros([len(corpus), config.output_dim]),
                                        trainable=False, name="mining_table",
                                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self._rng = tf.random.Generator.from_seed(config.seed)

    def call(self, features, training=False):
        return self.query_tower(features)

    def item_vectors(self, item, author, category):
        return self.item_tower(item, author, category)

    def corpus_vectors(self, corpus: Optional[ItemCorpus] = None, batch_size: int = 8192
                       ) -> np.ndarray:
        """float32 [M, output_dim]: the item vectors of `corpus` (default: the model's own
        corpus, the one mining uses), in corpus order."""
        if corpus is None:
            item, author, category = self.corpus_item, self.corpus_author, self.corpus_category
        else:
            item = tf.constant(corpus.item_index, tf.int64)
            author = tf.constant(corpus.author_index, tf.int64)
            category = tf.constant(corpus.category, tf.int64)
        out = []
        n = int(item.shape[0])
        for start in range(0, n, batch_size):
            end = min(n, start + batch_size)
            out.append(self.item_tower(item[start:end], author[start:end],
                                       category[start:end]).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.output_dim), np.float32)

    def refresh_mining_table(self) -> None:
        """The corpus vectors of the current weights become the "earlier model" for mining."""
        self.mining_table.assign(self.corpus_vectors())

    def _positives(self, features):
        labels = features[F.label_feature(CLICK_TASK)]
        valid = F.candidate_mask(features)
        return tf.where(valid & (labels > 0)), tf.where(valid & (labels <= 0))

    def _feedback_weight(self, features, positions):
        c = self.config
        weight = tf.fill([tf.shape(positions)[0]], tf.constant(c.click_weight, tf.float32))
        for task, w in (("long_view", c.long_view_weight), ("like", c.like_weight)):
            name = F.label_feature(task)
            if w and name in features:
                weight += w * tf.gather_nd(tf.cast(features[name], tf.float32), positions)
        return weight

    def compute_loss(self, features, training=False):
        c = self.config
        query = self.query_tower(features)  # [B, d]: once per request
        positions, negatives = self._positives(features)
        rows = positions[:, 0]
        query = tf.gather(query, rows)  # [M, d]: one row per clicked candidate
        items = [tf.gather_nd(features[F.CANDIDATE_ITEM], positions)]
        authors = [tf.gather_nd(features[F.CANDIDATE_AUTHOR], positions)]
        categories = [tf.gather_nd(features[F.CANDIDATE_CATEGORY], positions)]
        if c.hard_negatives in ("shown", "both"):
            negatives = tf.random.shuffle(negatives, seed=c.seed)[:c.max_shown_negatives]
            items.append(tf.gather_nd(features[F.CANDIDATE_ITEM], negatives))
            authors.append(tf.gather_nd(features[F.CANDIDATE_AUTHOR], negatives))
            categories.append(tf.gather_nd(features[F.CANDIDATE_CATEGORY], negatives))
        if c.hard_negatives in ("mined", "both"):
            corpus_size = tf.shape(self.corpus_item)[0]
            high = tf.minimum(c.mined_rank_high, corpus_size)
            low = tf.minimum(c.mined_rank_low, high - 1)
            scores = tf.matmul(tf.stop_gradient(query), self.mining_table, transpose_b=True)
            _, top = tf.math.top_k(scores, k=high)  # [M, high] corpus positions
            pick = self._rng.uniform([tf.shape(query)[0]], low, high, dtype=tf.int32)
            mined = tf.gather(top, pick, batch_dims=1)
            items.append(tf.gather(self.corpus_item, mined))
            authors.append(tf.gather(self.corpus_author, mined))
            categories.append(tf.gather(self.corpus_category, mined))
        item = tf.concat(items, 0)
        candidates = self.item_tower(item, tf.concat(authors, 0), tf.concat(categories, 0))
        # The other clicks of the same request are positives of this query too: not negatives.
        num_positives = tf.shape(rows)[0]
        same_request = tf.equal(rows[:, None], rows[None, :]) & ~tf.eye(num_positives,
                                                                          dtype=tf.bool)
        extra = tf.shape(item)[0] - num_positives
        score_mask = tf.concat([~same_request, tf.ones([num_positives, extra], tf.bool)], 1)
        probability = (tf.gather(self.item_probability, item) if c.logq_correction else None)
        return self.task(query, candidates,
                         sample_weight=self._feedback_weight(features, positions),
                         candidate_sampling_probability=probability, candidate_ids=item,
                         compute_metrics=False, score_mask=score_mask)


class RefreshMiningTable(tf.keras.callbacks.Callback):
    """Before every epoch: the corpus vectors of the current weights become the mining table
    (the "earlier model" whose ranks mined_rank_low..high give the mined hard negatives)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.model.refresh_mining_table()


def build_pdr_model(config: PDRConfig, metadata: F.DatasetMetadata, item_embeddings,
                    corpus: ItemCorpus, item_probability=None) -> PDRModel:
    """A PDRModel with its variables created (one call on an all-padding batch)."""
    from trainer.model import dummy_features

    model = PDRModel(config, metadata, item_embeddings, corpus, item_probability)
    model(dummy_features(metadata, 2, 2))
    model.item_vectors(tf.constant([0], tf.int64), tf.constant([0], tf.int64),
                       tf.zeros([1, F.NUM_CATEGORY_LEVELS], tf.int64))
    return model


def final_weights_path(model_dir: str) -> str:
    return os.path.join(model_dir, FINAL_WEIGHTS_DIR, FINAL_WEIGHTS_PREFIX)


def load_pdr_model(model_dir: str, data_dir: str, corpus: Optional[ItemCorpus] = None
                   ) -> PDRModel:
    """Rebuilds a trained PDR model from MODEL_DIR/pdr_config.json + DATA and loads final/."""
    from trainer.task import load_item_embeddings

    config = PDRConfig.load(model_dir)
    metadata = F.DatasetMetadata.load(data_dir)
    corpus = corpus or ItemCorpus.from_data_dir(data_dir)
    model = build_pdr_model(config, metadata, load_item_embeddings(data_dir), corpus)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, FINAL_WEIGHTS_DIR))
    if latest is None:
        raise FileNotFoundError(f"no trained PDR weights under {model_dir}/{FINAL_WEIGHTS_DIR}: "
                                "train with `python -m trainer.pdr_task`")
    model.load_weights(latest).expect_partial()
    return model
