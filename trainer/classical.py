"""Classical baseline: logistic regression and gradient-boosted trees over engineered features.

    python -m trainer.classical --data OUT --output E [--model logreg|gbdt|mlp|best] [--seed N]

A sequence model earns its place only if it beats what a careful engineer builds by hand from
the same data. This module reads the same TFRecords as the neural models (through
`trainer.data` and `common.features.parse_examples`), turns every shown candidate into one row
of plain features, fits scikit-learn's LogisticRegression and HistGradientBoostingClassifier
per task on the train split, picks the better learner per task on the eval split (GAUC by
request) and evaluates on the test split with `trainer.evaluate.compute_metrics`, writing
`E/metrics.json` and `E/metrics.md` in the format of `python -m trainer.evaluate`, so reports
read both alike. A regression task (watch time) gets the Poisson counterparts
(PoissonRegressor, HistGradientBoostingRegressor with Poisson loss), chosen by eval deviance.

Features of one candidate (groups can be left out with --drop-features):

* history_counts: for the long-term and the real-time sequence, the number of the user's
  earlier behaviours that share the candidate's category at each level (category1 = coarse,
  category2 = fine), its author, or that are the same item, each split by engagement depth:
  deep vs shallow (`deep_engagement_mask`); for the long-term sequence also the number of
  search-sourced behaviours per key and the share of the user's deep behaviours in the
  candidate's category at each level; the sequence lengths and the number of deep long-term
  behaviours.
* history_recency: the deep and shallow long-term counts per key, each behaviour weighted by
  0.5 ** (time gap / DECAY_HALF_LIFE_DAYS). The real-time sequence (the most recent
  `real_time_length` behaviours, in every long-term mode) gives the counts within the most
  recent N.
* history_similarity: cosine of the candidate's pretrained embedding (item_embeddings.npy) to
  the user's long-term behaviours: mean over deep and over shallow ones, maximum over deep ones,
  and the mean over deep and over shallow ones in the candidate's coarse category (a
  within-category affinity that category counts cannot see).
* query_match: cosine(query_embedding, candidate embedding), and for each category level the
  mean and maximum over the query's tokens of the smoothed click rate of (token, category)
  pairs on the train split.
* train_rates: the item's and the author's smoothed rate of every binary task on the train
  split, and their number of impressions there (popularity).

Statistics are estimated on the train split only: an item, author or (token, category) pair
unseen there gets the prior (the train rate) and zero impressions, whatever eval and test hold.
On the train rows themselves they are out of fold: requests are hashed into TRAIN_FOLDS folds
and a row's statistics exclude its own fold (counts scaled by folds / (folds - 1) so that they
keep the scale of the full-train counts used for eval and test); otherwise a row's own label
would leak into its features. Rates are smoothed towards the prior with the weight of
SMOOTHING_IMPRESSIONS impressions and given as log-odds; counts enter as log(1 + count).

Deep engagement, per engagement name of `metadata.engagement_names`
(DEEP_ENGAGEMENT_THRESHOLDS): a behaviour is deep when any of its named values reaches its
threshold: watch_ratio >= 0.8 or a like (canonical and KuaiSAR layouts), a cart or an order
(JDsearch, where a plain click is shallow). Every other real behaviour is shallow.

Display position is not a feature: the neural models do not see it either, and a ranker scores
candidates before they have one.

Learners: logistic regression (standardised features, lbfgs) is deterministic; the GBDT's seed
(`--seed`) draws the rows it holds out for early stopping. `--model mlp` fits scikit-learn's
MLPClassifier / MLPRegressor (standardised features, ReLU layers MLP_HIDDEN_UNITS, Adam, a
fixed MLP_EPOCHS epochs, `--seed` its initialisation and shuffling): a neural learner over the
same features, which separates what the neural rankers lose to trees from what they fail to
extract from ids and sequences (docs/REPORT.md). The fused ranking score is that of
the default `trainer.config.ModelConfig` (score formula and weights), as for the neural presets.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import warnings
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import common  # noqa: F401  (tf-keras switch before TensorFlow loads)
from common import features as F
from common.cli import HelpFormatter

logger = logging.getLogger("trainer")

LEARNERS = ("logreg", "gbdt")  # the ones `--model best` chooses between
# mlp: a small network over the same features, to tell what a neural learner makes of them
# apart from what it would have to learn from ids and sequences (not part of "best")
MODEL_CHOICES = LEARNERS + ("mlp", "best")
MLP_HIDDEN_UNITS = (64, 32)
MLP_EPOCHS = 8  # passes over train; eval GAUC peaked at 3-7 on the generated data
# A behaviour is deep when one of its engagement values reaches the threshold of its name.
DEEP_ENGAGEMENT_THRESHOLDS = {"watch_ratio": 0.8, "like": 0.5, "cart": 0.5, "order": 0.5}
DECAY_HALF_LIFE_DAYS = 7.0
SECONDS_PER_DAY = 86_400.0
SMOOTHING_IMPRESSIONS = 20.0
TRAIN_FOLDS = 5
FEATURE_GROUPS = ("history_counts", "history_recency", "history_similarity", "query_match",
                  "train_rates")
MATCH_KEYS = tuple(f"category{level + 1}" for level in range(F.NUM_CATEGORY_LEVELS)) + (
    "author", "item")
DEPTHS = ("deep", "shallow")
LOG1P, IDENTITY = "log1p", "identity"
RATE_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class FeatureColumn:
    name: str
    group: str
    transform: str  # LOG1P for counts, IDENTITY otherwise


def _history_columns() -> List[FeatureColumn]:
    columns = []
    for seq in F.SEQUENCES:
        for key in MATCH_KEYS:
            for depth in DEPTHS:
                columns.append(FeatureColumn(f"{seq}_{key}_{depth}_count", "history_counts",
                                             LOG1P))
    for key in MATCH_KEYS:
        columns.append(FeatureColumn(f"{F.LONG_TERM}_{key}_search_count", "history_counts",
                                     LOG1P))
    for key in MATCH_KEYS[:F.NUM_CATEGORY_LEVELS]:
        columns.append(FeatureColumn(f"{F.LONG_TERM}_{key}_deep_share", "history_counts",
                                     IDENTITY))
    columns += [FeatureColumn(f"{seq}_length", "history_counts", LOG1P) for seq in F.SEQUENCES]
    columns.append(FeatureColumn(f"{F.LONG_TERM}_deep_total", "history_counts", LOG1P))
    for key in MATCH_KEYS:
        for depth in DEPTHS:
            columns.append(FeatureColumn(f"{F.LONG_TERM}_{key}_{depth}_decayed",
                                         "history_recency", LOG1P))
    for name in ("deep_mean", "shallow_mean", "deep_max", "deep_same_category1_mean",
                 "shallow_same_category1_mean"):
        columns.append(FeatureColumn(f"{F.LONG_TERM}_similarity_{name}", "history_similarity",
                                     IDENTITY))
    columns.append(FeatureColumn("query_cosine", "query_match", IDENTITY))
    return columns


HISTORY_COLUMNS = _history_columns()  # computed per request batch, no train statistics needed


def statistic_columns(tasks: Sequence[str]) -> List[FeatureColumn]:
    """Columns estimated on the train split (their values depend on `tasks`)."""
    columns = []
    for key in MATCH_KEYS[:F.NUM_CATEGORY_LEVELS]:
        for stat in ("mean", "max"):
            columns.append(FeatureColumn(f"query_token_{key}_click_rate_{stat}", "query_match",
                                         IDENTITY))
    for entity in ("item", "author"):
        for task in F.binary_tasks(tasks):
            columns.append(FeatureColumn(f"{entity}_{task}_rate", "train_rates", IDENTITY))
        columns.append(FeatureColumn(f"{entity}_impressions", "train_rates", LOG1P))
    return columns


def deep_engagement_mask(engagement: np.ndarray, engagement_names: Sequence[str]) -> np.ndarray:
    """[..., ENGAGEMENT_DIM] engagement -> [...] bool: deep by DEEP_ENGAGEMENT_THRESHOLDS."""
    rules = [(i, DEEP_ENGAGEMENT_THRESHOLDS[name]) for i, name in enumerate(engagement_names)
             if name in DEEP_ENGAGEMENT_THRESHOLDS]
    if not rules:
        raise ValueError(f"engagement names {list(engagement_names)} (metadata.json) have no "
                         f"deep-engagement rule; known names: "
                         f"{sorted(DEEP_ENGAGEMENT_THRESHOLDS)}")
    deep = np.zeros(engagement.shape[:-1], bool)
    for index, threshold in rules:
        deep |= engagement[..., index] >= threshold
    return deep


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 0, x / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def _key_values(batch: Dict[str, np.ndarray], key: str, prefix: str) -> np.ndarray:
    """Ids of one match key: candidates (prefix 'candidate') or a sequence (prefix 'long')."""
    if key.startswith("category"):
        level = int(key[len("category"):]) - 1
        return batch[f"{prefix}_{F.SEQ_CATEGORY}"][..., level]
    return batch[f"{prefix}_{key}"]


def history_features(batch: Dict[str, np.ndarray], metadata: F.DatasetMetadata,
                     unit_item_embeddings: np.ndarray) -> Dict[str, np.ndarray]:
    """Every HISTORY_COLUMNS feature of a parsed batch (NumPy), each [B, N], counts raw.

    `unit_item_embeddings`: item_embeddings.npy with L2-normalised rows (row 0 stays zero).
    """
    out: Dict[str, np.ndarray] = {}
    candidate_embedding = unit_item_embeddings[batch[F.CANDIDATE_ITEM]]  # [B, N, D]
    query = _unit_rows(batch[F.QUERY_EMBEDDING].astype(np.float32))
    out["query_cosine"] = np.einsum("bnd,bd->bn", candidate_embedding, query)
    for seq in F.SEQUENCES:
        length = batch[F.seq_feature(seq, F.SEQ_LENGTH)]
        items = batch[F.seq_feature(seq, F.SEQ_ITEM)]
        valid = np.arange(items.shape[1])[None, :] < length[:, None]  # [B, L]
        deep = deep_engagement_mask(batch[F.seq_feature(seq, F.SEQ_ENGAGEMENT)],
                                    metadata.engagement_names) & valid
        by_depth = {"deep": deep, "shallow": valid & ~deep}
        out[f"{seq}_length"] = np.broadcast_to(length[:, None].astype(np.float64),
                                               batch[F.CANDIDATE_ITEM].shape)
        matches = {}
        for key in MATCH_KEYS:
            candidate = _key_values(batch, key, "candidate")
            behaviour = _key_values(batch, key, seq)
            matches[key] = ((candidate[:, :, None] == behaviour[:, None, :])
                            & (candidate[:, :, None] != F.OOV_INDEX) & valid[:, None, :])
            for depth, selected in by_depth.items():
                out[f"{seq}_{key}_{depth}_count"] = (
                    matches[key] & selected[:, None, :]).sum(-1).astype(np.float64)
        if seq != F.LONG_TERM:
            continue
        search = valid & (batch[F.seq_feature(seq, F.SEQ_SOURCE)] == F.SOURCE_SEARCH)
        decay = np.power(0.5, batch[F.seq_feature(seq, F.SEQ_TIME_GAP)].astype(np.float64)
                         / (DECAY_HALF_LIFE_DAYS * SECONDS_PER_DAY))
        deep_total = deep.sum(-1).astype(np.float64)[:, None]
        out[f"{seq}_deep_total"] = np.broadcast_to(deep_total, batch[F.CANDIDATE_ITEM].shape)
        for key in MATCH_KEYS:
            out[f"{seq}_{key}_search_count"] = (
                matches[key] & search[:, None, :]).sum(-1).astype(np.float64)
            for depth, selected in by_depth.items():
                out[f"{seq}_{key}_{depth}_decayed"] = np.einsum(
                    "bnl,bl->bn", matches[key].astype(np.float64), selected * decay)
        for key in MATCH_KEYS[:F.NUM_CATEGORY_LEVELS]:
            out[f"{seq}_{key}_deep_share"] = (out[f"{seq}_{key}_deep_count"]
                                              / np.maximum(deep_total, 1.0))
        behaviour_embedding = unit_item_embeddings[items]  # [B, L, D]
        cosine = np.einsum("bnd,bld->bnl", candidate_embedding, behaviour_embedding)
        same_category = matches[MATCH_KEYS[0]]
        for depth, selected in by_depth.items():
            weight = np.broadcast_to(selected[:, None, :], cosine.shape)
            out[f"{seq}_similarity_{depth}_mean"] = _masked_mean(cosine, weight)
            out[f"{seq}_similarity_{depth}_same_category1_mean"] = _masked_mean(
                cosine, weight & same_category)
        deep_cosine = np.where(deep[:, None, :], cosine, -np.inf).max(-1)
        out[f"{seq}_similarity_deep_max"] = np.where(np.isfinite(deep_cosine), deep_cosine, 0.0)
    return out


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    count = mask.sum(-1)
    return np.where(mask, values, 0.0).sum(-1) / np.maximum(count, 1)


# ---- one split as rows of candidates --------------------------------------------------------
@dataclasses.dataclass
class SplitRows:
    """One row per real candidate of a split: ids, labels, history features (raw)."""

    request_id: np.ndarray  # bytes
    user_id: np.ndarray  # bytes
    item: np.ndarray
    author: np.ndarray
    category: np.ndarray  # [R, NUM_CATEGORY_LEVELS]
    query_tokens: np.ndarray  # [R, MAX_QUERY_TOKENS], 0 beyond the query's length
    labels: Dict[str, np.ndarray]  # task -> [R]
    truth: Dict[str, np.ndarray]  # true_prob_feature(task) -> [R], generated data only
    history: Dict[str, np.ndarray]  # HISTORY_COLUMNS name -> [R]

    def __len__(self) -> int:
        return len(self.request_id)

    def folds(self) -> np.ndarray:
        """Fold of every row by a stable hash of its request id (out-of-fold statistics)."""
        folds = {rid: zlib.crc32(rid) % TRAIN_FOLDS for rid in np.unique(self.request_id)}
        return np.array([folds[rid] for rid in self.request_id], np.int64)


def rows_of_batch(batch: Dict[str, np.ndarray], metadata: F.DatasetMetadata,
                  unit_item_embeddings: np.ndarray) -> SplitRows:
    """The candidate rows of one parsed batch (padded candidates dropped)."""
    n = batch[F.CANDIDATE_ITEM].shape[1]
    mask = np.arange(n)[None, :] < batch[F.NUM_CANDIDATES][:, None]
    tokens = np.where(np.arange(F.MAX_QUERY_TOKENS)[None, :] < batch[F.QUERY_LENGTH][:, None],
                      batch[F.QUERY_TOKENS], 0)
    request_index = np.nonzero(mask)[0]
    history = history_features(batch, metadata, unit_item_embeddings)
    truth = {F.true_prob_feature(t): batch[F.true_prob_feature(t)][mask] for t in metadata.tasks
             if metadata.has_true_probabilities and F.true_prob_feature(t) in batch}
    return SplitRows(
        request_id=batch[F.REQUEST_ID][request_index], user_id=batch[F.USER_ID][request_index],
        item=batch[F.CANDIDATE_ITEM][mask], author=batch[F.CANDIDATE_AUTHOR][mask],
        category=batch[F.CANDIDATE_CATEGORY][mask], query_tokens=tokens[request_index],
        labels={t: batch[F.label_feature(t)][mask].astype(np.float64) for t in metadata.tasks},
        truth=truth, history={k: v[mask] for k, v in history.items()})


def concatenate_rows(parts: Sequence[SplitRows]) -> SplitRows:
    if not parts:
        raise ValueError("the split produced no batches")
    fields = {}
    for field in dataclasses.fields(SplitRows):
        values = [getattr(p, field.name) for p in parts]
        if isinstance(values[0], dict):
            fields[field.name] = {k: np.concatenate([v[k] for v in values]) for k in values[0]}
        else:
            fields[field.name] = np.concatenate(values)
    return SplitRows(**fields)


def read_split(data_dir: str, split: str, metadata: F.DatasetMetadata,
               unit_item_embeddings: np.ndarray, batch_size: int = 256) -> SplitRows:
    """Reads one split with `trainer.data` and turns it into candidate rows."""
    from trainer import data as data_lib

    dataset = data_lib.make_dataset(data_dir, split, metadata, batch_size, for_training=False)
    start, parts = time.time(), []
    for step, batch in enumerate(dataset):
        parts.append(rows_of_batch({k: v.numpy() for k, v in batch.items()}, metadata,
                                   unit_item_embeddings))
        if (step + 1) % 20 == 0:
            logger.info("%s: %d batches read (%.0fs)", split, step + 1, time.time() - start)
    rows = concatenate_rows(parts)
    logger.info("%s: %d requests, %d candidates (%.0fs)", split,
                len(np.unique(rows.request_id)), len(rows), time.time() - start)
    return rows


# ---- statistics of the train split -----------------------------------------------------------
@dataclasses.dataclass
class CountTable:
    """Impressions and positives per task of integer keys (sorted for lookup)."""

    keys: np.ndarray  # sorted unique int64
    positives: np.ndarray  # [K, T]
    impressions: np.ndarray  # [K]

    @classmethod
    def build(cls, keys: np.ndarray, labels: np.ndarray) -> "CountTable":
        """keys [R] (0 and below are unknown and left out), labels [R, T]."""
        keep = keys > 0
        unique, inverse = np.unique(keys[keep], return_inverse=True)
        positives = np.stack([np.bincount(inverse, weights=labels[keep, t],
                                          minlength=len(unique))
                              for t in range(labels.shape[1])], axis=-1)
        impressions = np.bincount(inverse, minlength=len(unique)).astype(np.float64)
        return cls(unique.astype(np.int64), positives.reshape(len(unique), labels.shape[1]),
                   impressions)

    def lookup(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(positives [..., T], impressions [...]) of `keys` of any shape; zeros when unseen."""
        flat = keys.reshape(-1)
        positives = np.zeros((len(flat), self.positives.shape[1]))
        impressions = np.zeros(len(flat))
        if len(self.keys):
            position = np.minimum(np.searchsorted(self.keys, flat), len(self.keys) - 1)
            found = (flat > 0) & (self.keys[position] == flat)
            positives[found] = self.positives[position[found]]
            impressions[found] = self.impressions[position[found]]
        return (positives.reshape(keys.shape + (self.positives.shape[1],)),
                impressions.reshape(keys.shape))


@dataclasses.dataclass
class KeyStatistics:
    """A CountTable over all train rows and one per fold (for out-of-fold lookups)."""

    full: CountTable
    per_fold: List[CountTable]

    @classmethod
    def build(cls, keys: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> "KeyStatistics":
        """keys [R] or [R, M] (M keys per row, e.g. query tokens), labels [R, T], folds [R]."""
        if keys.ndim == 2:
            width = keys.shape[1]
            return cls.build(keys.reshape(-1), np.repeat(labels, width, axis=0),
                             np.repeat(folds, width))
        return cls(CountTable.build(keys, labels),
                   [CountTable.build(keys[folds == k], labels[folds == k])
                    for k in range(TRAIN_FOLDS)])

    def lookup(self, keys: np.ndarray, folds: Optional[np.ndarray] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
        """Counts of `keys` ([R] or [R, M]); with `folds` ([R], train rows) out of fold,
        rescaled to the full-train scale."""
        positives, impressions = self.full.lookup(keys)
        if folds is None:
            return positives, impressions
        for k, table in enumerate(self.per_fold):
            selected = folds == k
            fold_positives, fold_impressions = table.lookup(keys[selected])
            positives[selected] -= fold_positives
            impressions[selected] -= fold_impressions
        scale = TRAIN_FOLDS / (TRAIN_FOLDS - 1)
        return positives * scale, impressions * scale


def log_odds(rate):
    rate = np.clip(rate, RATE_EPSILON, 1.0 - RATE_EPSILON)
    return np.log(rate / (1.0 - rate))


def smoothed_log_odds(positives: np.ndarray, impressions: np.ndarray, prior: float
                      ) -> np.ndarray:
    """Log-odds of the rate positives / impressions pulled towards `prior` with the weight of
    SMOOTHING_IMPRESSIONS impressions (an unseen key gets the prior)."""
    return log_odds((positives + SMOOTHING_IMPRESSIONS * prior)
                    / (impressions + SMOOTHING_IMPRESSIONS))


@dataclasses.dataclass
class TrainStatistics:
    """Item, author and (query token, category) statistics of the train split."""

    tasks: Tuple[str, ...]  # the binary tasks, in the column order of the tables
    prior: Dict[str, float]  # train rate of every binary task
    item: KeyStatistics
    author: KeyStatistics
    token_category: List[KeyStatistics]  # one per category level
    category_buckets: int  # key of a (token, category) pair: token * buckets + category

    @classmethod
    def fit(cls, train: SplitRows, metadata: F.DatasetMetadata) -> "TrainStatistics":
        """Statistics of the train rows (and of each of their folds)."""
        binary = tuple(F.binary_tasks(metadata.tasks))
        labels = np.stack([train.labels[t] for t in binary], axis=-1)
        folds = train.folds()
        buckets = int(metadata.num_categories) + 1
        token_category = [KeyStatistics.build(
            cls._pair_keys(train.query_tokens, train.category[:, level], buckets),
            labels[:, [0]], folds) for level in range(F.NUM_CATEGORY_LEVELS)]
        return cls(binary, {t: float(train.labels[t].mean()) for t in binary},
                   KeyStatistics.build(train.item, labels, folds),
                   KeyStatistics.build(train.author, labels, folds), token_category, buckets)

    @staticmethod
    def _pair_keys(tokens: np.ndarray, category: np.ndarray, buckets: int) -> np.ndarray:
        """[R, M] keys of (token, category) pairs; 0 (unknown) where either is unknown."""
        valid = (tokens > 0) & (category[:, None] > 0) & (category[:, None] < buckets)
        return np.where(valid, tokens * buckets + category[:, None], 0)

    def features(self, rows: SplitRows, out_of_fold: bool) -> Dict[str, np.ndarray]:
        """The statistic_columns of `rows`; `out_of_fold` for the train rows themselves."""
        folds = rows.folds() if out_of_fold else None
        out: Dict[str, np.ndarray] = {}
        click_prior = self.prior[self.tasks[0]]
        for level, stats in enumerate(self.token_category):
            keys = self._pair_keys(rows.query_tokens, rows.category[:, level],
                                   self.category_buckets)
            positives, impressions = stats.lookup(keys, folds)
            pair_log_odds = smoothed_log_odds(positives[..., 0], impressions, click_prior)
            has_token = keys > 0
            key = MATCH_KEYS[level]
            prior_log_odds = log_odds(click_prior)
            out[f"query_token_{key}_click_rate_mean"] = np.where(
                has_token.any(-1), _masked_mean(pair_log_odds, has_token), prior_log_odds)
            out[f"query_token_{key}_click_rate_max"] = np.where(
                has_token.any(-1), np.where(has_token, pair_log_odds, -np.inf).max(-1),
                prior_log_odds)
        for entity, stats, ids in (("item", self.item, rows.item),
                                   ("author", self.author, rows.author)):
            positives, impressions = stats.lookup(ids, folds)
            for t_index, task in enumerate(self.tasks):
                out[f"{entity}_{task}_rate"] = smoothed_log_odds(
                    positives[:, t_index], impressions, self.prior[task])
            out[f"{entity}_impressions"] = impressions
        return out


# ---- design matrix, learners, selection -----------------------------------------------------
def check_feature_groups(groups: Sequence[str]) -> None:
    unknown = sorted(set(groups) - set(FEATURE_GROUPS))
    if unknown:
        raise ValueError(f"unknown feature groups {unknown}; choose from {list(FEATURE_GROUPS)}")


def feature_columns(tasks: Sequence[str], drop_groups: Sequence[str] = ()) -> List[FeatureColumn]:
    """The columns of the design matrix, without those of `drop_groups`."""
    check_feature_groups(drop_groups)
    columns = [c for c in HISTORY_COLUMNS + statistic_columns(tasks)
               if c.group not in drop_groups]
    if not columns:
        raise ValueError("every feature group was dropped: nothing is left to learn from")
    return columns


def design_matrix(rows: SplitRows, statistics: Dict[str, np.ndarray],
                  columns: Sequence[FeatureColumn]) -> np.ndarray:
    values = {**rows.history, **statistics}
    matrix = np.empty((len(rows), len(columns)), np.float64)
    for j, column in enumerate(columns):
        value = np.asarray(values[column.name], np.float64)
        matrix[:, j] = np.log1p(np.maximum(value, 0.0)) if column.transform == LOG1P else value
    return matrix


def make_learner(name: str, binary: bool, seed: int):
    """A fresh scikit-learn estimator: `logreg` (linear), `gbdt` (histogram boosting) or `mlp`
    (a small network)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, PoissonRegressor
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "logreg":
        linear = (LogisticRegression(C=1.0, max_iter=2000) if binary
                  else PoissonRegressor(alpha=1e-4, max_iter=1000))
        return make_pipeline(StandardScaler(), linear)
    if name == "gbdt":
        settings = dict(learning_rate=0.05, max_iter=500, max_leaf_nodes=31,
                        min_samples_leaf=50, l2_regularization=1.0, early_stopping=True,
                        validation_fraction=0.1, n_iter_no_change=30, random_state=seed)
        return (HistGradientBoostingClassifier(**settings) if binary
                else HistGradientBoostingRegressor(loss="poisson", **settings))
    if name == "mlp":
        # a fixed number of epochs: sklearn's early stopping scores a classifier by accuracy,
        # which barely moves on click data
        settings = dict(hidden_layer_sizes=MLP_HIDDEN_UNITS, batch_size=256,
                        learning_rate_init=1e-3, max_iter=MLP_EPOCHS, early_stopping=False,
                        n_iter_no_change=MLP_EPOCHS, random_state=seed)
        network = MLPClassifier(**settings) if binary else MLPRegressor(**settings)
        return make_pipeline(StandardScaler(), network)
    raise ValueError(f"unknown learner {name!r}; choose one of {MODEL_CHOICES[:-1]}")


class ConstantPredictor:
    """The train mean, for a task whose train labels have a single value."""

    def __init__(self, value: float):
        self.value = float(value)

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        return np.full(len(matrix), self.value)


def fit_task(name: str, task: str, matrix: np.ndarray, labels: np.ndarray, seed: int):
    binary = F.is_binary_task(task)
    if binary and len(np.unique(labels > 0.5)) < 2 or not binary and np.all(labels == 0):
        logger.warning("task %s has a single label value on train: %s predicts the constant "
                       "%.4f", task, name, float(labels.mean()))
        return ConstantPredictor(labels.mean())
    model = make_learner(name, binary, seed)
    with warnings.catch_warnings():
        # the network runs its fixed MLP_EPOCHS by design, not short of convergence
        from sklearn.exceptions import ConvergenceWarning

        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(matrix, (labels > 0.5).astype(np.int64) if binary else labels)
    return model


def predict_task(model, task: str, matrix: np.ndarray) -> np.ndarray:
    if isinstance(model, ConstantPredictor) or not F.is_binary_task(task):
        # a squared-loss network can go below 0; watch time cannot
        return np.maximum(np.asarray(model.predict(matrix), np.float64), 0.0)
    return model.predict_proba(matrix)[:, 1]


def selection_metric(task: str, labels: np.ndarray, predictions: np.ndarray,
                     request_id: np.ndarray) -> Tuple[str, float, bool]:
    """(name, value, higher is better) the learner of a task is chosen by on eval: GAUC by
    request for a binary task, mean Poisson deviance for watch time."""
    from trainer import metrics as M

    if F.is_binary_task(task):
        return "gauc_request", M.grouped_auc(labels, predictions, request_id).value, True
    from sklearn.metrics import mean_poisson_deviance

    return ("poisson_deviance",
            float(mean_poisson_deviance(labels, np.maximum(predictions, RATE_EPSILON))), False)


def choose(scores: Dict[str, float], higher_is_better: bool) -> str:
    """The learner with the better finite eval value; the first listed on a tie or NaN."""
    best = next(iter(scores))
    for name, value in scores.items():
        current = scores[best]
        if np.isfinite(value) and (not np.isfinite(current) or
                                   (value > current if higher_is_better else value < current)):
            best = name
    return best


# ---- the whole run ---------------------------------------------------------------------------
def load_unit_item_embeddings(data_dir: str) -> np.ndarray:
    import os

    import tensorflow as tf

    path = os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: point --data at the output directory of "
                                f"`python -m preprocessing`")
    with tf.io.gfile.GFile(path, "rb") as f:
        return _unit_rows(np.load(f).astype(np.float32))


@dataclasses.dataclass
class PreparedData:
    """The design matrices of train, eval and the evaluated split (one feature extraction,
    any number of fits)."""

    metadata: F.DatasetMetadata
    split: str
    dropped_groups: List[str]
    columns: List[FeatureColumn]
    rows: Dict[str, SplitRows]
    matrices: Dict[str, np.ndarray]

    def without(self, groups: Sequence[str]) -> "PreparedData":
        """The same data without the columns of feature `groups` (an ablation, no re-read)."""
        columns = feature_columns(self.metadata.tasks, list(self.dropped_groups) + list(groups))
        keep = [self.columns.index(c) for c in columns]
        return dataclasses.replace(
            self, dropped_groups=sorted(set(self.dropped_groups) | set(groups)),
            columns=columns, matrices={k: m[:, keep] for k, m in self.matrices.items()})


def prepare(data_dir: str, split: str = "test", batch_size: int = 256,
            drop_groups: Sequence[str] = (), progress: Callable[[str], None] = logger.info
            ) -> PreparedData:
    """Reads train, eval and `split`, fits the train statistics, builds the design matrices."""
    if split not in ("eval", "test"):
        raise ValueError(f"evaluate on eval or test, not {split!r}: the learners are fitted on "
                         f"train")
    check_feature_groups(drop_groups)
    metadata = F.DatasetMetadata.load(data_dir)
    columns = feature_columns(metadata.tasks, drop_groups)
    embeddings = load_unit_item_embeddings(data_dir)
    rows = {name: read_split(data_dir, name, metadata, embeddings, batch_size)
            for name in dict.fromkeys(["train", "eval", split])}
    statistics = TrainStatistics.fit(rows["train"], metadata)
    matrices = {name: design_matrix(r, statistics.features(r, out_of_fold=name == "train"),
                                    columns) for name, r in rows.items()}
    progress(f"{len(columns)} features per candidate; train rows {len(rows['train'])}")
    return PreparedData(metadata, split, list(drop_groups), columns, rows, matrices)


def fit_and_evaluate(data: PreparedData, model: str = "best", seed: int = 0,
                     progress: Callable[[str], None] = logger.info) -> Dict[str, object]:
    """Fits `model` per task on train, chooses per task on eval (model "best"), evaluates on
    the prepared split. Returns the metrics dict of `trainer.evaluate` plus `classical`
    (learners chosen, their eval scores, the features)."""
    from trainer import evaluate as evaluate_lib
    from trainer.config import ModelConfig

    if model not in MODEL_CHOICES:
        raise ValueError(f"unknown model {model!r}; choose one of {MODEL_CHOICES}")
    tasks, train, evaluation = list(data.metadata.tasks), data.rows["train"], data.rows["eval"]
    learners = LEARNERS if model == "best" else (model,)
    chosen, selection, predictions = {}, {}, {}
    for task in tasks:
        scores, fitted = {}, {}
        for learner in learners:
            start = time.time()
            fitted[learner] = fit_task(learner, task, data.matrices["train"],
                                       train.labels[task], seed)
            metric, value, higher = selection_metric(
                task, evaluation.labels[task],
                predict_task(fitted[learner], task, data.matrices["eval"]),
                evaluation.request_id)
            scores[learner] = value
            progress(f"{task}: {learner} fitted ({time.time() - start:.0f}s"
                     f"{_iterations(fitted[learner])}), eval {metric} {value:.4f}")
        chosen[task] = choose(scores, higher)
        selection[task] = {"metric": metric, "scores": scores}
        if len(learners) > 1:
            progress(f"{task}: {chosen[task]} chosen on eval")
        predictions[task] = predict_task(fitted[chosen[task]], task,
                                         data.matrices[data.split])
    target = data.rows[data.split]
    config = ModelConfig()
    flat = {"request_id": target.request_id, "user_id": target.user_id,
            "score": evaluate_lib.fused_score(predictions, config, tasks), **target.truth}
    for task in tasks:
        flat[F.label_feature(task)] = target.labels[task]
        flat[f"pred_{task}"] = predictions[task]
    result = evaluate_lib.compute_metrics(flat, data.metadata, config)
    result["split"] = data.split
    result["model_type"] = "classical"
    result["classical"] = {
        "requested": model, "chosen": chosen, "seed": seed, "eval_selection": selection,
        "features": [c.name for c in data.columns], "train_candidates": len(train),
        "dropped_groups": list(data.dropped_groups),
    }
    return result


def _iterations(model) -> str:
    return f", {model.n_iter_} boosting rounds" if hasattr(model, "n_iter_") and not hasattr(
        model, "steps") else ""


def write_result(result: Dict[str, object], output_dir: str,
                 progress: Callable[[str], None] = logger.info) -> None:
    """metrics.json and metrics.md, as `python -m trainer.evaluate` writes them."""
    from trainer import evaluate as evaluate_lib

    paths = evaluate_lib.write_outputs(result, output_dir, title(result))
    progress(f"wrote {paths['json']} and {paths['markdown']}")


def run(data_dir: str, output_dir: Optional[str] = None, model: str = "best", seed: int = 0,
        split: str = "test", batch_size: int = 256, drop_groups: Sequence[str] = (),
        progress: Callable[[str], None] = logger.info) -> Dict[str, object]:
    """`prepare` + `fit_and_evaluate`; writes the metrics files when `output_dir` is given."""
    if model not in MODEL_CHOICES:
        raise ValueError(f"unknown model {model!r}; choose one of {MODEL_CHOICES}")
    result = fit_and_evaluate(prepare(data_dir, split, batch_size, drop_groups, progress),
                              model, seed, progress)
    if output_dir:
        write_result(result, output_dir, progress)
    return result


def title(result: Dict[str, object]) -> str:
    chosen = result["classical"]["chosen"]
    return "classical baseline ({}) on {}".format(
        ", ".join(f"{t}: {learner}" for t, learner in sorted(chosen.items())), result["split"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.classical",
        description="Classical baseline: per-candidate features engineered from the same "
                    "TFRecords as the neural models (counts of the user's earlier behaviours "
                    "sharing the candidate's category, author or item, split by engagement "
                    "depth and decayed by time; embedding similarity to the history and the "
                    "query; query-token/category, item and author click rates and popularity "
                    "estimated on the train split only), a logistic regression and a "
                    "gradient-boosted tree model (scikit-learn) per task fitted on train, the "
                    "better one per task chosen on eval, evaluated on test with the metrics of "
                    "python -m trainer.evaluate. Writes OUTPUT/metrics.json and metrics.md.",
        formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True,
                        help="output directory of python -m preprocessing")
    parser.add_argument("--output", required=True, help="directory for metrics.json/metrics.md")
    parser.add_argument("--model", default="best", choices=MODEL_CHOICES,
                        help="logreg: logistic regression; gbdt: histogram gradient boosting; "
                             "mlp: a 64-32 ReLU network (standardised features, "
                             f"{MLP_EPOCHS} epochs); best: logreg and gbdt, the better per task "
                             "by eval GAUC by request")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the GBDT's early-stopping hold-out and of the MLP's "
                             "initialisation and shuffling (logistic regression is "
                             "deterministic)")
    parser.add_argument("--split", default="test", choices=("eval", "test"),
                        help="split to evaluate on")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="requests per batch when reading the TFRecords")
    parser.add_argument("--drop-features", default=None,
                        help="comma-separated feature groups to leave out (ablation), from: "
                             + ", ".join(FEATURE_GROUPS) + "; default: none")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    drop = [g.strip() for g in (args.drop_features or "").split(",") if g.strip()]
    try:
        result = run(args.data, args.output, args.model, args.seed, args.split,
                     args.batch_size, drop)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from trainer.evaluate import to_markdown

    print(to_markdown(result, title(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
