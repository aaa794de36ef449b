"""A shared query/item embedding space learned from search clicks over anonymised token ids.

KuaiSAR and JDsearch ship no pretrained embeddings: queries, captions and product names are
lists of anonymised token ids. QIN's relevance search unit needs queries and items in one space
(cosine of query and behaviour in stage 1, of target item and behaviour in stage 2), so the
pipeline builds that space once, before the ranker, and freezes it (the ranker never trains it).

Training data: the readers' `prepare()` passes only the clicks of the train split, i.e. before
the pipeline's eval cutoff (preprocessing/splits.py). The ranker is evaluated in this space, so
clicks of eval and test requests must not shape it; query tokens seen only in held-out requests
still join the vocabulary, with zero vectors (see Vocabulary), which say nothing about clicks.

Model: a text two-tower trained with an in-batch softmax on (query tokens, clicked item tokens)
pairs, the loss being `tfrs.tasks.Retrieval` (sampled softmax over the other items of the batch,
clicks of the same item in one batch are not treated as negatives). Both towers are the same
function over ONE shared token table:

    encode(tokens) = L2-normalise( mean of table[t] over the known tokens t )

Why this shape and not a deeper tower per side:
* the serving client encodes a query it has never seen with the query vocabulary alone
  (docs/ARCHITECTURE.md: query embedding = L2-normalised mean of its token embeddings), so the
  query tower must be exactly that function of the exported table;
* one table for both sides keeps item-item cosine (RSU stage 2) meaningful, and items that were
  never clicked are still placed in the space through the tokens they share with clicked ones.

Feed co-engagement (optional, `coengagement_share` > 0; off by default). Queries name topics, so
query-click pairs alone pull an item towards its topic and say little about sub-interests inside
a topic. A user's deep feed engagements within a few consecutive views share topic and often the
sub-interest the user prefers, so (item caption, item caption) pairs of items deeply engaged by
the same user within `coengagement_window` consecutive feed behaviours (optionally at most
`coengagement_max_gap_s` apart) are mixed into the SAME in-batch softmax: every candidate is an
item text, so click pairs and item pairs are negatives of each other, and the query tower is
unchanged (an item text on the query side goes through the same `encode`). Deep = watch ratio
>= `coengagement_min_watch_ratio` or liked (`coengagement_pairs`). The readers pass only feed
behaviours strictly before the eval cutoff, the same cutoff as the clicks. `coengagement_share`
is the share of item pairs among the training pairs (subsampled with the seed when more are
available, all of them when fewer), `coengagement_weight` scales their loss. An item's text is
its caption alone: an item-id token would give items without an informative caption a vector
of their own, but only items engaged before the cutoff would get one, so warm and cold items
would live in different parts of the space (and the readers encode items from their captions).

Vocabulary: the token ids that occur in the training pairs (at least `min_token_count` times,
at most `max_vocab_size` most frequent), plus every other query token of the dataset with an
all-zero vector (it leaves the direction of a normalised mean unchanged, and keeps the tokens a
serving client looks up identical to those of the training examples). Tokens outside it are
ignored when encoding; a text
with no known token (empty caption, unseen tokens only) gets the all-zero vector, which the
ranker treats like the OOV embedding row, and is counted by the readers
(`items_zero_embedding`, `queries_zero_embedding` metrics).

Training is bounded (`epochs`, `max_steps`) and deterministic for a given `seed` on one machine
(seeded initialiser and shuffling; the process-wide op-determinism switch is not touched).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

import common  # noqa: F401  (tf-keras before TensorFlow loads)
from common import features as F

log = logging.getLogger(__name__)

MAX_QUERY_TRAIN_TOKENS = F.MAX_QUERY_TOKENS
MAX_ITEM_TRAIN_TOKENS = 64  # captions / product names are truncated to this many for training


@dataclasses.dataclass
class TextTowerConfig:
    """Hyper-parameters of the text two-tower (all training is bounded by epochs and max_steps)."""

    embedding_dim: int = F.DEFAULT_EMBEDDING_DIM
    epochs: int = 3
    max_steps: int = 20_000
    batch_size: int = 512
    learning_rate: float = 0.01
    temperature: float = 0.1  # softmax temperature on cosine scores (in [-1, 1])
    min_token_count: int = 1
    max_vocab_size: int = 1_000_000
    seed: int = 0
    log_every_steps: int = 500
    # feed co-engagement item pairs (module docstring); share 0 = off (query-click pairs only)
    coengagement_share: float = 0.0
    coengagement_weight: float = 1.0
    coengagement_window: int = 10  # consecutive feed behaviours of one user
    coengagement_max_gap_s: float = 0.0  # 0: no time limit within the window
    coengagement_min_watch_ratio: float = 0.8

    def validate(self) -> "TextTowerConfig":
        for name in ("embedding_dim", "epochs", "max_steps", "batch_size", "min_token_count",
                     "max_vocab_size", "log_every_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"text tower {name} must be >= 1 (got {getattr(self, name)!r})")
        if not self.learning_rate > 0 or not self.temperature > 0:
            raise ValueError("text tower learning_rate and temperature must be > 0")
        if not 0.0 <= self.coengagement_share < 1.0:
            raise ValueError("text tower coengagement_share must be in [0, 1) "
                             f"(got {self.coengagement_share!r})")
        if not self.coengagement_weight > 0 or int(self.coengagement_window) < 1 \
                or self.coengagement_max_gap_s < 0:
            raise ValueError("text tower coengagement_weight must be > 0, coengagement_window "
                             ">= 1 and coengagement_max_gap_s >= 0")
        return self

    @property
    def uses_coengagement(self) -> bool:
        return self.coengagement_share > 0

    @classmethod
    def from_options(cls, options) -> "TextTowerConfig":
        """Reads the optional fields from a dict or an argparse namespace (missing -> default).

        Recognised names: embedding_dim, seed, text_tower_epochs, text_tower_max_steps,
        text_tower_batch_size, text_tower_learning_rate, text_tower_temperature,
        text_tower_min_token_count, text_tower_max_vocab_size, text_tower_coengagement_share,
        text_tower_coengagement_weight, text_tower_coengagement_window,
        text_tower_coengagement_max_gap_s, text_tower_coengagement_min_watch_ratio.
        """
        def get(name):
            if options is None:
                return None
            if isinstance(options, dict):
                return options.get(name)
            return getattr(options, name, None)

        config = cls()
        for field in dataclasses.fields(cls):
            # Only the two dataset-wide settings are read unprefixed: a generic `epochs` or
            # `batch_size` of the caller must not silently configure this tower.
            shared = (field.name,) if field.name in ("embedding_dim", "seed") else ()
            for key in shared + (f"text_tower_{field.name}",):
                value = get(key)
                if value is not None:
                    setattr(config, field.name, type(getattr(config, field.name))(value))
        return config.validate()


class TextEncoder:
    """The frozen token table and the encoding function shared by queries and items.

    `token_ids[k]` is the raw token id of table row k + 1; row 0 is all zeros (unknown token).
    Picklable (NumPy only), so Beam workers can encode records without TensorFlow.
    """

    def __init__(self, token_ids: np.ndarray, table: np.ndarray):
        token_ids = np.asarray(token_ids, dtype=np.int64)
        table = np.asarray(table, dtype=np.float32)
        if table.ndim != 2 or table.shape[0] != len(token_ids) + 1:
            raise ValueError(f"table must have len(token_ids) + 1 = {len(token_ids) + 1} rows, "
                             f"got shape {table.shape}")
        self.token_ids = token_ids
        self.table = table
        self.table[0] = 0.0
        self._index: Optional[Dict[int, int]] = None

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def vocab_size(self) -> int:
        return len(self.token_ids)

    def __getstate__(self):
        return {"token_ids": self.token_ids, "table": self.table}

    def __setstate__(self, state):
        self.__init__(state["token_ids"], state["table"])

    def rows(self, tokens: Iterable[int]) -> List[int]:
        """Table rows of the known tokens (unknown ones are left out)."""
        if self._index is None:
            self._index = {int(t): k + 1 for k, t in enumerate(self.token_ids.tolist())}
        index = self._index
        return [index[t] for t in (int(t) for t in tokens) if t in index]

    def encode(self, tokens: Iterable[int]) -> np.ndarray:
        """L2-normalised mean of the known tokens' vectors; all zeros when none is known."""
        rows = self.rows(tokens)
        if not rows:
            return np.zeros(self.dim, np.float32)
        mean = self.table[rows].mean(axis=0)
        norm = float(np.linalg.norm(mean))
        return (mean / norm).astype(np.float32) if norm > 0 else np.zeros(self.dim, np.float32)

    def encode_tuple(self, tokens: Iterable[int]) -> Tuple[float, ...]:
        return tuple(float(v) for v in self.encode(tokens))

    def encode_query(self, tokens: Iterable[int]) -> Tuple[float, ...]:
        """Query embedding exactly as a serving client computes it from the query vocabulary
        (common.feature_store: the first MAX_QUERY_TOKENS known tokens, L2-normalised mean)."""
        rows = self.rows(tokens)[:F.MAX_QUERY_TOKENS]
        if not rows:
            return (0.0,) * self.dim
        mean = self.table[rows].mean(axis=0)
        norm = float(np.linalg.norm(mean))
        return tuple(float(v) for v in (mean / norm if norm > 0 else mean * 0.0))

    def query_vocab(self) -> Dict[str, object]:
        """Columns of the query vocabulary (docs/ARCHITECTURE.md, query_vocab.parquet).

        Anonymised datasets have no words, so `word` is the token id as text.
        """
        return {"token_id": self.token_ids.copy(),
                "word": [str(t) for t in self.token_ids.tolist()],
                "embedding": self.table[1:].copy()}

    def save(self, path: str) -> str:
        import io

        import tensorflow as tf

        buffer = io.BytesIO()  # np.savez seeks, which GFile (gs:// too) does not allow
        np.savez(buffer, token_ids=self.token_ids, table=self.table)
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str) -> "TextEncoder":
        import io

        import tensorflow as tf

        with tf.io.gfile.GFile(path, "rb") as f:
            data = np.load(io.BytesIO(f.read()))
            return cls(data["token_ids"], data["table"])


def build_vocabulary(pairs: Sequence[Tuple[Sequence[int], Sequence[int]]],
                     config: TextTowerConfig) -> np.ndarray:
    """Raw token ids of the training vocabulary, most frequent first (ties by id)."""
    counts: Counter = Counter()
    for query, item in pairs:
        counts.update(int(t) for t in query)
        counts.update(int(t) for t in item)
    kept = [(-c, t) for t, c in counts.items() if c >= config.min_token_count]
    kept.sort()
    return np.asarray([t for _, t in kept[:config.max_vocab_size]], dtype=np.int64)


FeedEngagement = Tuple[str, int, str, float, bool]  # (user, time ms, item, watch ratio, liked)


def coengagement_pairs(events: Iterable[FeedEngagement], window: int, cutoff_ms: int,
                       min_watch_ratio: float = 0.8, max_gap_ms: int = 0
                       ) -> List[Tuple[str, str]]:
    """(earlier item, later item) pairs deeply engaged by one user within `window` consecutive
    feed behaviours (module docstring), in user order then time order.

    `events` are a user's feed behaviours (any order; equal times keep their input order).
    Behaviours at or after `cutoff_ms` are dropped first: a pair never involves one, and since
    they come after every kept behaviour they do not move the windows of the kept ones. Shallow
    behaviours count towards the window but make no pair; deep = watch ratio >= min_watch_ratio
    or liked. Pairs of an item with itself are left out; `max_gap_ms` > 0 also drops pairs more
    than that far apart in time.
    """
    by_user: Dict[str, List[Tuple[int, int, str, bool]]] = {}
    for n, (user, time_ms, item, watch_ratio, liked) in enumerate(events):
        if int(time_ms) >= cutoff_ms:
            continue
        deep = float(watch_ratio) >= min_watch_ratio or bool(liked)
        by_user.setdefault(str(user), []).append((int(time_ms), n, str(item), deep))
    pairs: List[Tuple[str, str]] = []
    for user in sorted(by_user):
        feed = sorted(by_user[user])
        for i, (t_i, _, item_i, deep_i) in enumerate(feed):
            if not deep_i:
                continue
            for t_j, _, item_j, deep_j in feed[i + 1:i + 1 + window]:
                if max_gap_ms and t_j - t_i > max_gap_ms:
                    break
                if deep_j and item_j != item_i:
                    pairs.append((item_i, item_j))
    return pairs


def _pad(rows: List[List[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, :len(r)] = r
    return out


def train_text_encoder(pairs: Sequence[Tuple[Sequence[int], Sequence[int]]],
                       config: Optional[TextTowerConfig] = None,
                       item_keys: Optional[Sequence[str]] = None,
                       query_tokens: Iterable[int] = (),
                       item_pairs: Sequence[Tuple[Sequence[int], Sequence[int]]] = (),
                       item_pair_keys: Optional[Sequence[str]] = None,
                       ) -> Tuple[TextEncoder, Dict[str, object]]:
    """Trains the two-tower on (query tokens, clicked item tokens) pairs; returns the frozen
    encoder and training statistics (pairs used/skipped, steps, first/last loss, seconds).

    `item_keys` (one per pair, e.g. the item id) lets the in-batch softmax skip clicks on the
    same item as negatives. Pairs whose query or item has no vocabulary token are skipped and
    counted. With no usable pair the encoder has an empty vocabulary (every text encodes to
    zeros) rather than failing: the readers still produce data, and the stats say why.

    `query_tokens` (every token of every query of the dataset) are added to the vocabulary
    with an all-zero vector when training did not see them: a zero vector leaves the direction
    of a normalised mean unchanged, and the serving client (which keeps only vocabulary
    tokens) then sees the same query tokens as the training examples.

    `item_pairs` (item caption tokens, co-engaged item caption tokens), with the second item's
    id in `item_pair_keys`, are mixed in when `config.coengagement_share` > 0 (module
    docstring, `mix_item_pairs`); otherwise they are ignored and training is today's.
    """
    config = (config or TextTowerConfig()).validate()
    pairs = list(pairs)
    keys = list(item_keys) if item_keys is not None else [f"#{n}" for n in range(len(pairs))]
    kinds = [0] * len(pairs)
    extra_stats: Dict[str, object] = {}
    if config.uses_coengagement:
        chosen = mix_item_pairs(len(pairs), len(item_pairs), config.coengagement_share,
                                config.seed)
        item_pair_keys = item_pair_keys if item_pair_keys is not None else \
            [f"@{n}" for n in range(len(item_pairs))]
        pairs += [item_pairs[k] for k in chosen]
        keys += [str(item_pair_keys[k]) for k in chosen]
        kinds += [1] * len(chosen)
        extra_stats = {"coengagement_pairs_available": len(item_pairs),
                       "coengagement_pairs_drawn": len(chosen),
                       "coengagement_share": config.coengagement_share,
                       "coengagement_weight": config.coengagement_weight}
    encoder, stats = _train(pairs, config, keys, kinds)
    stats.update(extra_stats)
    known = set(encoder.token_ids.tolist())
    extra = sorted({int(t) for t in query_tokens} - known)
    stats["untrained_query_tokens"] = len(extra)
    if extra:
        encoder = TextEncoder(
            np.concatenate([encoder.token_ids, np.asarray(extra, np.int64)]),
            np.concatenate([encoder.table, np.zeros((len(extra), encoder.dim), np.float32)]))
    return encoder, stats


def mix_item_pairs(num_click_pairs: int, num_item_pairs: int, share: float,
                   seed: int) -> List[int]:
    """Indices of the item pairs to train on, so that they make up `share` of all training
    pairs: round(num_click_pairs * share / (1 - share)) of them drawn without replacement
    (seeded, in index order), or all when fewer are available (or there is no click pair)."""
    if share <= 0 or num_item_pairs == 0:
        return []
    wanted = round(num_click_pairs * share / (1.0 - share)) if num_click_pairs else num_item_pairs
    if wanted >= num_item_pairs:
        return list(range(num_item_pairs))
    rng = np.random.default_rng([int(seed), 1])
    return sorted(rng.choice(num_item_pairs, wanted, replace=False).tolist())


def _train(pairs, config: TextTowerConfig, item_keys, kinds=None
           ) -> Tuple[TextEncoder, Dict[str, object]]:
    """`kinds[n]` = 0 for a (query, clicked item) pair, 1 for a co-engaged item pair."""
    started = time.time()
    kinds = kinds if kinds is not None else [0] * len(pairs)
    vocab = build_vocabulary(pairs, config)
    index = {int(t): k + 1 for k, t in enumerate(vocab.tolist())}
    queries, items, keys, weights = [], [], [], []
    key_index: Dict[str, int] = {}
    skipped = 0
    used_item_pairs = 0
    for n, (query, item) in enumerate(pairs):
        q = [index[t] for t in (int(x) for x in query) if t in index]
        i = [index[t] for t in (int(x) for x in item) if t in index]
        if not q or not i:
            skipped += 1
            continue
        # a click's query keeps the serving client's first MAX_QUERY_TOKENS known tokens; an
        # item text on the query side is truncated like any item text
        queries.append(q[:MAX_ITEM_TRAIN_TOKENS if kinds[n] else MAX_QUERY_TRAIN_TOKENS])
        items.append(i)
        key = item_keys[n] if item_keys is not None else str(n)
        keys.append(key_index.setdefault(key, len(key_index)))
        weights.append(config.coengagement_weight if kinds[n] else 1.0)
        used_item_pairs += kinds[n]
    stats: Dict[str, object] = {"pairs": len(pairs), "pairs_used": len(queries),
                                "pairs_skipped_no_tokens": skipped, "vocab_size": len(vocab),
                                "embedding_dim": config.embedding_dim, "seed": config.seed}
    if used_item_pairs:
        stats.update(coengagement_pairs_used=used_item_pairs,
                     coengagement_share_used=round(used_item_pairs / len(queries), 4))
    dim = config.embedding_dim
    if not queries:
        stats.update(steps=0, seconds=round(time.time() - started, 3))
        log.warning("text two-tower: no usable (query, clicked item) pair; all vectors are zero")
        return TextEncoder(vocab, np.zeros((len(vocab) + 1, dim), np.float32)), stats

    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    rng = np.random.default_rng(config.seed)
    initial = rng.normal(0.0, 0.1, size=(len(vocab) + 1, dim)).astype(np.float32)
    initial[0] = 0.0

    class TwoTower(tfrs.Model):
        """Shared-table mean-pooling towers with TFRS's in-batch softmax retrieval loss."""

        def __init__(self):
            super().__init__()
            self.table = tf.Variable(initial, name="token_table")
            self.task = tfrs.tasks.Retrieval(temperature=config.temperature,
                                             remove_accidental_hits=True)

        def encode(self, tokens):
            mask = tf.cast(tokens > 0, tf.float32)[..., None]
            summed = tf.reduce_sum(tf.gather(self.table, tokens) * mask, axis=1)
            return tf.math.l2_normalize(summed / tf.maximum(tf.reduce_sum(mask, 1), 1.0), -1)

        def compute_loss(self, batch, training=False):
            return self.task(self.encode(batch["query"]), self.encode(batch["item"]),
                             sample_weight=batch.get("weight"),
                             candidate_ids=batch["key"], compute_metrics=False,
                             compute_batch_metrics=False)

    data = {"query": _pad(queries, max(len(q) for q in queries)
                          if used_item_pairs else MAX_QUERY_TRAIN_TOKENS),
            "item": _pad(items, MAX_ITEM_TRAIN_TOKENS),
            "key": np.asarray(keys, np.int64)}
    if used_item_pairs and config.coengagement_weight != 1.0:
        data["weight"] = np.asarray(weights, np.float32)
    steps_per_epoch = -(-len(queries) // config.batch_size)
    total_steps = min(config.max_steps, steps_per_epoch * config.epochs)
    dataset = (tf.data.Dataset.from_tensor_slices(data)
               .shuffle(len(queries), seed=config.seed, reshuffle_each_iteration=True)
               .batch(config.batch_size).repeat(config.epochs).take(total_steps))
    model = TwoTower()
    optimizer = tf.keras.optimizers.Adam(config.learning_rate)

    @tf.function(reduce_retracing=True)
    def train_step(batch):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(batch, training=True)
        grads = tape.gradient(loss, [model.table])
        optimizer.apply_gradients(zip(grads, [model.table]))
        return loss

    losses = []
    log.info("text two-tower: %d pairs, vocabulary %d, %d steps (batch %d, %d epochs max)",
             len(queries), len(vocab), total_steps, config.batch_size, config.epochs)
    for step, batch in enumerate(dataset, start=1):
        losses.append(float(train_step(batch)))
        if step % config.log_every_steps == 0 or step == total_steps:
            log.info("text two-tower: step %d/%d loss %.4f", step, total_steps, losses[-1])
    table = model.table.numpy()
    stats.update(steps=len(losses), first_loss=losses[0], last_loss=losses[-1],
                 mean_loss_first_epoch=float(np.mean(losses[:steps_per_epoch])),
                 mean_loss_last_epoch=float(np.mean(losses[-steps_per_epoch:])),
                 seconds=round(time.time() - started, 3))
    return TextEncoder(vocab, table), stats
