"""Synthetic short-video search logs in the canonical raw-log layout, with the latent truth.

    python -m preprocessing.synthetic --output raw --users 1000 --items 5000 --requests 20000 \\
        --seed 7 [--lifelong-users 5]

writes `items`, `users`, `behaviours`, `requests` and `query_vocab` Parquet files exactly as
docs/ARCHITECTURE.md section 1 specifies, plus `truth/` (the latent variables, never read by the
pipeline) so that tests and evaluation can check what a ranker should have learned. Every request
carries the generator's true probabilities (`p_click`, `p_long_view`, `p_like`) and the true
expected play time of every shown candidate (`expected_play_time_s`, next to the observed
`play_time_s`): the oracle's AUC/GAUC and expected clicks / watch time are the ceiling any model
can reach on these logs.

Generative model
----------------
World. T topics (default 16, human-readable names such as "cooking"), each with S subtopics
(default 4). Topic centres c_t are random unit vectors in R^D; each subtopic has a unit offset
o_{t,s}. An item has a topic, a subtopic, an author (authors publish within one topic, across all
its subtopics), a format class (`category_l2`: "vlog", "tutorial", ...: independent of the
subtopic), a duration, and a quality q_i ~ N(0, quality_std). Its latent vector is
normalize(c_t + subtopic_scale * o_{t,s} + latent noise) and its content embedding is a noisy view,
normalize(latent + embedding noise): cosine to its own topic centre is high but clearly below 1,
and the subtopic is only partly recoverable from it. `category_l1` is the topic name. So:
  * the within-topic subtopic is visible only (noisily) through embeddings and item ids, never
    through categories or authors;
  * quality is visible only through the item id (not in embedding, author or categories).

Queries. The vocabulary has `words_per_topic` words per topic ("cooking_3": embedding =
normalize(c_t + noise)) and generic words ("how", "best", ...: short random vectors). A query is
1-2 words of its topic plus 0-2 generic words; its embedding is the L2-normalised mean of its
token embeddings, so `query_vocab.parquet` is an exact encoder for new queries.

Users. A user has 4-8 interest topics with Dirichlet weights and one preferred subtopic per
interest topic (truth/user_interests.parquet), plus profile fields that carry no preference
(age_bucket, gender, city_tier are random; activity_level follows the history length). Feed
history lengths are log-normal around `mean_history` (clipped to 20-5000: tens to thousands);
lifelong users have 10^4-10^5 feed behaviours reaching back `lifelong_backlog_days` before the
common window of `days` (90). Requests are shared out in proportion to feed activity inside the
window, so searches per feed view are similar for everyone.

Feed behaviours (source=feed). A user's time span is cut into interest periods of about
`period_behaviours` (60) feed views each; in each period 1-2 interest topics are "current" and
the feed serves them (subtopic uniform, so merely *seeing* an item says nothing about affinity).
A `noise_share` (20%) of views are random items of any topic, nearly always short views.
Engagement marks affinity: a current-topic item of the preferred subtopic is watched deeply
(watch ratio >= 0.8, often liked, sometimes followed/shared) with probability `deep_if_preferred`
(0.75), any other with `deep_if_other` (0.12); every other view is short (watch ratio ~0.2, below
0.8). Deep engagement therefore concentrates on preferred subtopics; short views are mostly
noise (their preferred share is below the 1/S base rate).

Search requests. A request falls in the common window, never in the user's first period, and
asks about an interest topic that is current neither in the request's period nor in any period
touched by the last `recent_guard` (50) feed behaviours, nor searched-and-clicked within them, but
that was current in an earlier period (the request time is re-drawn a few times to find one;
failing that, a topic the history has not seen, recorded as topic_seen_before=False in
truth/requests.parquet). So the last ~50 behaviours say (almost) nothing about the query topic's
preferred subtopic; only the long-term full-site history does, through its deep engagements:
what QIN's relevance search (query -> topic, target -> subtopic) and engagement weighting
exploit. Past search clicks carry some affinity too (clicks favour it), less than the full-site
history; the denser the searches per feed view, the more they leak into recent behaviours.
Candidates: 12-20 per request, `query_topic_share` (60%) from the query topic, the rest from
other topics, in random order. With rel = [topic == query topic], aff = rel and [subtopic ==
preferred subtopic of the query topic]:
    p_click     = sigmoid(click_bias + relevance_effect * rel + affinity_effect * aff + q_i)
    p_long_view = p_click * sigmoid(long_view_bias + long_view_affinity * aff + q_i)
    p_like      = p_click * sigmoid(like_bias + like_affinity * aff + q_i)
(defaults -3.2, 1.8, 1.6; -0.6, 1.4; -2.2, 1.2) and labels are drawn from them (long_view and
like only for clicked candidates): click rate ~0.2, oracle click AUC ~0.8. A clicked candidate
is watched deeply when it is a long view (watch ratio 0.8-1.0 plus replays, mean 1.08) and
briefly otherwise (min(Beta(1.3, 5), 0.79), mean ~0.21); its `play_time_s` is watch ratio *
duration (0 when not clicked), and its true expected play time is
    E[play] = p_click * duration * (c_long * 1.08 + (1 - c_long) * 0.21)
with c_long = p_long_view / p_click: duration is independent of relevance, so ranking by
expected watch time and by p_click disagree, a trade-off the fused score has to settle. Each
clicked candidate is also appended to behaviours.parquet with source=search, 3 seconds to a few
minutes after the request (never before it), with engagement matching its long_view/like
labels: point-in-time joins must exclude these from their own request.

Determinism and scale. Output is a function of the seed alone: the world (topics, vocabulary,
items) and the per-user scalars (history length, interests, number of requests) come from fixed
child streams of numpy's SeedSequence, and each user's behaviours and requests from
SeedSequence(seed, spawn_key=(USER_STREAM, user)) - independent of chunking and row-group size.
Behaviours and requests are streamed through pyarrow ParquetWriters in row groups, so memory is
bounded by the item table plus one row group (10^7 behaviours fit comfortably).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common import features as F

# Child streams of the root SeedSequence (spawn_key[0]); never renumber: outputs would change.
WORLD_STREAM, ITEM_STREAM, USER_SCALAR_STREAM, USER_STREAM = 0, 1, 2, 3

TOPIC_NAMES = ("cooking", "travel", "fitness", "gaming", "music", "dance", "pets", "comedy",
               "beauty", "fashion", "tech", "cars", "sports", "education", "finance", "parenting")
GENERIC_WORDS = ("how", "best", "easy", "funny", "new", "top", "tips", "video", "latest", "ideas",
                 "beginner", "short", "review", "live", "daily", "challenge", "cheap", "quick",
                 "guide", "vs", "fails", "highlights", "home", "trending")
FORMAT_CLASSES = ("vlog", "tutorial", "clip", "montage", "live_replay")
AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-54", "55+")
GENDERS = ("f", "m", "unknown")
CITY_TIERS = ("tier1", "tier2", "tier3", "tier4", "rural")
WINDOW_START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z: start of the common window
DAY_MS = 86_400_000

ITEM_FILE, USER_FILE, BEHAVIOUR_FILE = "items.parquet", "users.parquet", "behaviours.parquet"
REQUEST_FILE, VOCAB_FILE, TRUTH_DIR = "requests.parquet", "query_vocab.parquet", "truth"


def _list_type(value_type):
    return pa.list_(pa.field("item", value_type))


ITEM_SCHEMA = pa.schema([("item_id", pa.string()), ("author_id", pa.string()),
                         ("category_l1", pa.string()), ("category_l2", pa.string()),
                         ("duration_s", pa.float32()), ("embedding", _list_type(pa.float32()))])
USER_SCHEMA = pa.schema([("user_id", pa.string()), ("age_bucket", pa.string()),
                         ("gender", pa.string()), ("activity_level", pa.string()),
                         ("city_tier", pa.string())])
BEHAVIOUR_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                              ("timestamp", pa.int64()), ("source", pa.string()),
                              ("watch_ratio", pa.float32()), ("play_time_s", pa.float32()),
                              ("like", pa.int8()), ("follow", pa.int8()), ("share", pa.int8())])
REQUEST_SCHEMA = pa.schema([("request_id", pa.string()), ("user_id", pa.string()),
                            ("timestamp", pa.int64()), ("query_tokens", _list_type(pa.int64())),
                            ("query_embedding", _list_type(pa.float32())),
                            ("candidate_item_ids", _list_type(pa.string())),
                            ("click", _list_type(pa.int8())), ("long_view", _list_type(pa.int8())),
                            ("like", _list_type(pa.int8())),
                            ("play_time_s", _list_type(pa.float32())),
                            ("p_click", _list_type(pa.float32())),
                            ("p_long_view", _list_type(pa.float32())),
                            ("p_like", _list_type(pa.float32())),
                            ("expected_play_time_s", _list_type(pa.float32()))])
VOCAB_SCHEMA = pa.schema([("token_id", pa.int64()), ("word", pa.string()),
                          ("embedding", _list_type(pa.float32()))])
# truth/
TRUTH_TOPIC_SCHEMA = pa.schema([("topic", pa.int32()), ("name", pa.string()),
                                ("centre", _list_type(pa.float32())),
                                ("subtopic_offsets", _list_type(_list_type(pa.float32())))])
TRUTH_ITEM_SCHEMA = pa.schema([("item_id", pa.string()), ("topic", pa.int32()),
                               ("subtopic", pa.int32()), ("quality", pa.float32()),
                               ("latent", _list_type(pa.float32()))])
TRUTH_USER_SCHEMA = pa.schema([("user_id", pa.string()), ("lifelong", pa.bool_()),
                               ("feed_behaviours", pa.int64()), ("requests", pa.int64())])
TRUTH_INTEREST_SCHEMA = pa.schema([("user_id", pa.string()), ("topic", pa.int32()),
                                   ("topic_name", pa.string()), ("weight", pa.float32()),
                                   ("preferred_subtopic", pa.int32())])
TRUTH_PERIOD_SCHEMA = pa.schema([("user_id", pa.string()), ("period", pa.int32()),
                                 ("start_ms", pa.int64()), ("end_ms", pa.int64()),
                                 ("current_topics", _list_type(pa.int32())),
                                 ("feed_behaviours", pa.int64())])
TRUTH_REQUEST_SCHEMA = pa.schema([("request_id", pa.string()), ("user_id", pa.string()),
                                  ("query_topic", pa.int32()), ("period", pa.int32()),
                                  ("topic_seen_before", pa.bool_()),
                                  ("relevant_candidates", pa.int32())])


@dataclasses.dataclass
class GeneratorConfig:
    """Every knob of the generative model (see the module docstring for what each one does)."""

    users: int = 1000
    items: int = 5000
    requests: int = 20000
    seed: int = 0
    lifelong_users: int = 0
    embedding_dim: int = F.DEFAULT_EMBEDDING_DIM
    topics: int = 16
    subtopics: int = 4
    min_candidates: int = 12
    max_candidates: int = 20
    mean_history: float = 500.0
    history_sigma: float = 1.0  # log-normal spread of feed history lengths
    min_history: int = 20
    max_history: int = 5000
    lifelong_min_history: int = 10_000
    lifelong_max_history: int = 100_000
    days: int = 90  # length of the common window (all requests fall in it)
    period_behaviours: int = 60  # feed views per interest period
    lifelong_backlog_days: int = 730
    words_per_topic: int = 6
    # latent / embedding geometry
    subtopic_scale: float = 0.7
    latent_noise: float = 0.25
    embedding_noise: float = 0.35
    query_word_noise: float = 0.5
    generic_word_norm: float = 0.6
    request_activity_power: float = 1.0
    min_interests: int = 4  # interest topics per user
    max_interests: int = 8
    # feed
    noise_share: float = 0.2
    two_current_topics_share: float = 0.5
    deep_if_preferred: float = 0.75
    deep_if_other: float = 0.12
    deep_if_noise: float = 0.03
    # search
    query_topic_share: float = 0.6
    click_bias: float = -3.2
    relevance_effect: float = 1.8
    affinity_effect: float = 1.6
    quality_std: float = 0.6
    long_view_bias: float = -0.6
    long_view_affinity: float = 1.4
    like_bias: float = -2.2
    like_affinity: float = 1.2
    recent_guard: int = F.DEFAULT_REAL_TIME_LENGTH  # feed behaviours kept free of query topics
    request_time_attempts: int = 8
    # streaming
    behaviour_row_group: int = 262_144
    request_row_group: int = 16_384

    def validate(self) -> None:
        """Raises ValueError with an actionable message for unusable settings."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.users >= 1, f"--users must be >= 1 (got {self.users})")
        need(self.requests >= 0, f"--requests must be >= 0 (got {self.requests})")
        need(0 <= self.lifelong_users <= self.users,
             f"--lifelong-users must be in [0, --users={self.users}] (got {self.lifelong_users})")
        need(self.embedding_dim >= 2, f"--embedding-dim must be >= 2 (got {self.embedding_dim})")
        need(self.topics >= 2, f"--topics must be >= 2 (got {self.topics})")
        need(self.subtopics >= 2, f"--subtopics must be >= 2 (got {self.subtopics})")
        need(self.items >= 2 * self.topics * self.subtopics,
             f"--items must be >= 2 * topics * subtopics = {2 * self.topics * self.subtopics} "
             f"so every subtopic has items (got {self.items})")
        need(1 <= self.min_candidates <= self.max_candidates,
             f"--candidates-per-request needs 1 <= min <= max (got {self.min_candidates}-"
             f"{self.max_candidates})")
        need(self.max_candidates <= self.items // self.topics,
             f"--candidates-per-request max {self.max_candidates} exceeds the items of one topic "
             f"(~{self.items // self.topics}); raise --items or lower the candidates")
        need(self.mean_history >= 1, f"--mean-history must be >= 1 (got {self.mean_history})")
        need(1 <= self.min_history <= self.max_history, "min_history must be in [1, max_history]")
        need(self.days >= 1, f"--days must be >= 1 (got {self.days})")
        need(self.period_behaviours >= 1,
             f"--period-behaviours must be >= 1 (got {self.period_behaviours})")
        need(1 <= self.min_interests <= self.max_interests,
             "interest topics per user need 1 <= min_interests <= max_interests")
        need(self.words_per_topic >= 2, "words_per_topic must be >= 2")
        for name in ("noise_share", "two_current_topics_share", "deep_if_preferred",
                     "deep_if_other", "deep_if_noise", "query_topic_share"):
            value = getattr(self, name)
            need(0.0 <= value <= 1.0, f"{name} must be a probability (got {value})")
        need(self.quality_std >= 0, "quality_std must be >= 0")
        need(self.recent_guard >= 0 and self.request_time_attempts >= 1,
             "recent_guard must be >= 0 and request_time_attempts >= 1")


# ---- world: topics, vocabulary, items --------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


def topic_name(t: int) -> str:
    return TOPIC_NAMES[t] if t < len(TOPIC_NAMES) else f"topic{t}"


@dataclasses.dataclass
class World:
    centres: np.ndarray  # [T, D] unit
    offsets: np.ndarray  # [T, S, D] unit
    vocab_words: List[str]  # token id k+1 -> vocab_words[k]
    vocab_embeddings: np.ndarray  # [V, D] float32
    item_topic: np.ndarray  # [I] int
    item_subtopic: np.ndarray
    item_quality: np.ndarray  # [I] float64
    item_latent: np.ndarray  # [I, D] float32
    item_embedding: np.ndarray  # [I, D] float32
    item_author: np.ndarray  # [I] int
    item_format: np.ndarray
    item_duration: np.ndarray  # float32 seconds
    topic_items: List[np.ndarray]  # items of each topic
    bucket_order: np.ndarray  # items sorted by (topic, subtopic)
    bucket_start: np.ndarray  # [T * S] offset of bucket topic * S + subtopic in bucket_order
    bucket_size: np.ndarray  # [T * S]
    item_order: np.ndarray  # items sorted by topic (stable)
    topic_start: np.ndarray  # [T + 1] offsets of each topic in item_order


def build_world(cfg: GeneratorConfig) -> World:
    """Topics, query vocabulary and items: the part shared by all users."""
    T, S, D, I = cfg.topics, cfg.subtopics, cfg.embedding_dim, cfg.items  # noqa: E741 (paper's notation)
    rng = _stream(cfg.seed, WORLD_STREAM)
    centres = _unit(rng.normal(size=(T, D)))
    offsets = _unit(rng.normal(size=(T, S, D)))
    words, vectors = [], []
    for t in range(T):
        for j in range(cfg.words_per_topic):
            words.append(f"{topic_name(t)}_{j}")
            noise = cfg.query_word_noise * _unit(rng.normal(size=D))
            vectors.append(_unit(centres[t] + noise))
    for w in GENERIC_WORDS:
        words.append(w)
        vectors.append(cfg.generic_word_norm * _unit(rng.normal(size=D)))
    vocab_embeddings = np.asarray(vectors, dtype=np.float32)

    rng = _stream(cfg.seed, ITEM_STREAM)
    # The first T*S items cover every (topic, subtopic) once, so no bucket is ever empty; item
    # indices are then shuffled so that ids do not reveal topics.
    topic = np.concatenate([np.repeat(np.arange(T), S), rng.integers(0, T, I - T * S)])
    subtopic = np.concatenate([np.tile(np.arange(S), T), rng.integers(0, S, I - T * S)])
    perm = rng.permutation(I)
    topic, subtopic = topic[perm], subtopic[perm]
    quality = rng.normal(0.0, cfg.quality_std, I)
    latent_noise = cfg.latent_noise * rng.normal(size=(I, D)) / np.sqrt(D)
    latent = _unit(centres[topic] + cfg.subtopic_scale * offsets[topic, subtopic] + latent_noise)
    embedding = _unit(latent + cfg.embedding_noise * rng.normal(size=(I, D)) / np.sqrt(D))
    # Authors publish inside one topic, across its subtopics: an author reveals the topic
    # (like category_l1) but neither the subtopic nor quality.
    authors_per_topic = max(1, I // (8 * T))
    author = topic * authors_per_topic + rng.integers(0, authors_per_topic, I)
    fmt = rng.integers(0, len(FORMAT_CLASSES), I)
    duration = np.clip(rng.lognormal(np.log(30.0), 0.8, I), 3.0, 600.0).astype(np.float32)

    order = np.argsort(topic, kind="stable")
    topic_start = np.searchsorted(topic[order], np.arange(T + 1))
    topic_items = [order[topic_start[t]:topic_start[t + 1]] for t in range(T)]
    bucket = topic * S + subtopic
    bucket_order = np.argsort(bucket, kind="stable")
    bucket_size = np.bincount(bucket, minlength=T * S)
    bucket_start = np.concatenate([[0], np.cumsum(bucket_size)[:-1]])
    return World(centres=centres, offsets=offsets, vocab_words=words,
                 vocab_embeddings=vocab_embeddings, item_topic=topic, item_subtopic=subtopic,
                 item_quality=quality, item_latent=latent.astype(np.float32),
                 item_embedding=embedding.astype(np.float32), item_author=author,
                 item_format=fmt, item_duration=duration, topic_items=topic_items,
                 bucket_order=bucket_order, bucket_start=bucket_start,
                 bucket_size=bucket_size, item_order=order, topic_start=topic_start)


# ---- per-user scalars (drawn for all users at once from one stream) --------------------------
@dataclasses.dataclass
class UserScalars:
    lifelong: np.ndarray  # [U] bool
    feed_length: np.ndarray  # [U] int64
    requests: np.ndarray  # [U] int64
    interests: List[np.ndarray]  # topics
    weights: List[np.ndarray]
    preferred: List[np.ndarray]  # preferred subtopic of each interest topic
    profile: np.ndarray  # [U, 4] object (age_bucket, gender, activity_level, city_tier)


def draw_user_scalars(cfg: GeneratorConfig) -> UserScalars:
    U = cfg.users
    rng = _stream(cfg.seed, USER_SCALAR_STREAM)
    lifelong = np.zeros(U, bool)
    lifelong[rng.choice(U, cfg.lifelong_users, replace=False)] = True
    median = cfg.mean_history / np.exp(cfg.history_sigma ** 2 / 2)
    length = np.clip(rng.lognormal(np.log(median), cfg.history_sigma, U),
                     cfg.min_history, cfg.max_history)
    life_length = np.exp(rng.uniform(np.log(cfg.lifelong_min_history),
                                     np.log(cfg.lifelong_max_history), U))
    length = np.where(lifelong, life_length, length).astype(np.int64)
    # Requests go to users in proportion to their feed activity inside the common window
    # (to the power request_activity_power: 1 = searches per feed view equal for everyone).
    window_share = np.where(lifelong, cfg.days / (cfg.days + cfg.lifelong_backlog_days), 1.0)
    weight = np.maximum(length * window_share, 1.0) ** cfg.request_activity_power
    requests = rng.multinomial(cfg.requests, weight / weight.sum()) if cfg.requests else \
        np.zeros(U, np.int64)
    interests, weights, preferred = [], [], []
    k_max = min(cfg.max_interests, cfg.topics)
    for _ in range(U):
        k = int(rng.integers(min(cfg.min_interests, k_max), k_max + 1))
        interests.append(np.sort(rng.choice(cfg.topics, k, replace=False)))
        weights.append(rng.dirichlet(np.full(k, 2.0)))
        preferred.append(rng.integers(0, cfg.subtopics, k))
    activity = np.select([lifelong, length < 100, length < 500, length < 2000],
                         ["lifelong", "low", "medium", "high"], "very_high")
    profile = np.stack([np.asarray(AGE_BUCKETS)[rng.integers(0, len(AGE_BUCKETS), U)],
                        np.asarray(GENDERS)[rng.choice(3, U, p=[0.48, 0.48, 0.04])],
                        activity, np.asarray(CITY_TIERS)[rng.integers(0, len(CITY_TIERS), U)]],
                       axis=1)
    return UserScalars(lifelong=lifelong, feed_length=length, requests=requests,
                       interests=interests, weights=weights, preferred=preferred,
                       profile=profile)


# ---- one user's timeline ---------------------------------------------------------------------
@dataclasses.dataclass
class UserLog:
    """One user's behaviours (sorted by time) and requests, as item indices and arrays."""

    b_item: np.ndarray
    b_time: np.ndarray
    b_search: np.ndarray  # bool
    b_watch: np.ndarray
    b_like: np.ndarray
    b_follow: np.ndarray
    b_share: np.ndarray
    r_time: np.ndarray  # [R]
    r_tokens: List[np.ndarray]
    r_embedding: np.ndarray  # [R, D]
    r_candidates: List[np.ndarray]
    r_labels: Dict[str, List[np.ndarray]]  # click / long_view / like -> per request int8
    r_probs: Dict[str, List[np.ndarray]]
    r_play_time: List[np.ndarray]  # per request, play time (s) of each candidate, 0 = no click
    r_expected_play_time: List[np.ndarray]  # true expected play time of each candidate
    r_topic: np.ndarray
    r_period: np.ndarray
    r_seen_before: np.ndarray
    period_start: np.ndarray  # [P] ms
    period_end: np.ndarray
    period_current: np.ndarray  # [P, 2] topics, -1 = none
    period_counts: np.ndarray


DEEP_REPLAY_SHARE, DEEP_REPLAY_GAMMA = 0.3, (1.5, 0.4)  # replays: share, gamma (shape, scale)
DEEP_WATCH_MIN_RATIO = 0.8  # a deep view is watched to at least this share (short ones stay below)
SHORT_WATCH_BETA, SHORT_WATCH_CAP = (1.3, 5.0), 0.79


def _deep_watch_ratio(rng, n):
    # Fully watched, often re-watched: 0.8-1.0, plus a tail of replays up to ~3x.
    wr = rng.uniform(DEEP_WATCH_MIN_RATIO, 1.0, n)
    replay = rng.random(n) < DEEP_REPLAY_SHARE
    return np.where(replay, wr + rng.gamma(DEEP_REPLAY_GAMMA[0], DEEP_REPLAY_GAMMA[1], n), wr)


def _short_watch_ratio(rng, n):
    return np.minimum(rng.beta(SHORT_WATCH_BETA[0], SHORT_WATCH_BETA[1], n), SHORT_WATCH_CAP)


def _short_watch_ratio_mean(grid: int = 200_001) -> float:
    """E[min(X, SHORT_WATCH_CAP)] for X ~ Beta(a, b), by the trapezoidal rule on a fine grid."""
    import math

    a, b = SHORT_WATCH_BETA
    x = np.linspace(0.0, 1.0, grid)[1:-1]
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    pdf = np.exp(log_norm + (a - 1) * np.log(x) + (b - 1) * np.log1p(-x))
    return float(np.trapezoid(np.minimum(x, SHORT_WATCH_CAP) * pdf, x))


# Mean watch ratio of a clicked search result: deep (a long view) or short; with the item's
# duration these give the true expected play time of every shown candidate.
DEEP_WATCH_RATIO_MEAN = 0.9 + DEEP_REPLAY_SHARE * DEEP_REPLAY_GAMMA[0] * DEEP_REPLAY_GAMMA[1]
SHORT_WATCH_RATIO_MEAN = _short_watch_ratio_mean()


def expected_play_time(p_click, p_long_given_click, duration_s):
    """True expected play time (seconds) of a shown candidate:
    p_click * duration * (c_long * E[deep ratio] + (1 - c_long) * E[short ratio])."""
    return p_click * duration_s * (p_long_given_click * DEEP_WATCH_RATIO_MEAN
                                   + (1.0 - p_long_given_click) * SHORT_WATCH_RATIO_MEAN)


def search_click_probability(cfg: GeneratorConfig, is_rel, aff, quality):
    """p_click of search results (see `search_engagement`)."""
    return _sigmoid(cfg.click_bias + cfg.relevance_effect * is_rel
                    + cfg.affinity_effect * aff + quality)


def search_engagement(cfg: GeneratorConfig, is_rel, aff, quality):
    """(p_click, p(long view | click), p(like | click)) of search results shown for a query:
    is_rel = [item topic == query topic], aff = is_rel and [item subtopic == the user's
    preferred subtopic of the query topic], quality = the items' q_i (module docstring)."""
    p_click = search_click_probability(cfg, is_rel, aff, quality)
    c_long = _sigmoid(cfg.long_view_bias + cfg.long_view_affinity * aff + quality)
    c_like = _sigmoid(cfg.like_bias + cfg.like_affinity * aff + quality)
    return p_click, c_long, c_like


def simulate_user(u: int, cfg: GeneratorConfig, world: World, us: UserScalars) -> UserLog:
    """Feed timeline, search requests and search clicks of user `u` (own random stream)."""
    rng = _stream(cfg.seed, USER_STREAM, u)
    T, S = cfg.topics, cfg.subtopics
    interests, weights = us.interests[u], us.weights[u]
    pref_of_topic = np.full(T, -1)
    pref_of_topic[interests] = us.preferred[u]
    is_interest = np.zeros(T, bool)
    is_interest[interests] = True
    n = int(us.feed_length[u])
    window_end = WINDOW_START_MS + cfg.days * DAY_MS
    span_start = WINDOW_START_MS - (cfg.lifelong_backlog_days * DAY_MS if us.lifelong[u] else 0)

    # Interest periods: the user's attention moves on every ~period_behaviours feed views, so
    # periods are equal slices of the user's time span (at least 3 periods).
    P = max(3, int(round(n / cfg.period_behaviours)))
    bounds = span_start + (np.arange(P + 1) * (window_end - span_start)) // P
    starts, ends = bounds[:-1], bounds[1:]
    # Current topics per period: 1 or 2 interest topics, drawn by weight without replacement
    # (Gumbel top-k, vectorised over periods).
    n_current = np.minimum(np.where(rng.random(P) < cfg.two_current_topics_share, 2, 1),
                           len(interests))
    keys = np.log(weights)[None, :] + rng.gumbel(size=(P, len(interests)))
    ranked = interests[np.argsort(-keys, axis=1)]
    current = np.full((P, 2), -1)
    current[:, 0] = ranked[:, 0]
    two = n_current == 2
    current[two, 1] = ranked[two, 1]

    # Feed behaviours, in time order.
    counts = rng.multinomial(n, np.full(P, 1.0 / P))
    bp = np.repeat(np.arange(P), counts)
    b_time = np.sort(starts[bp] + (rng.random(n) * (ends - starts)[bp]).astype(np.int64))
    noise = rng.random(n) < cfg.noise_share
    col = (rng.random(n) * n_current[bp]).astype(np.int64)
    topic = current[bp, col]
    sub = rng.integers(0, S, n)
    pick = rng.random(n)
    bucket = topic * S + sub  # uniform item of the (topic, subtopic) bucket
    item = world.bucket_order[world.bucket_start[bucket]
                              + (pick * world.bucket_size[bucket]).astype(np.int64)]
    item[noise] = rng.integers(0, cfg.items, int(noise.sum()))
    topic = world.item_topic[item]
    affinity = ~noise & (world.item_subtopic[item] == pref_of_topic[topic])
    deep_p = np.where(noise, cfg.deep_if_noise,
                      np.where(affinity, cfg.deep_if_preferred, cfg.deep_if_other))
    deep = rng.random(n) < deep_p
    watch = np.where(deep, _deep_watch_ratio(rng, n), _short_watch_ratio(rng, n))
    like = rng.random(n) < np.where(deep, 0.35, 0.01)
    follow = rng.random(n) < np.where(deep, 0.05, 0.002)
    share = rng.random(n) < np.where(deep, 0.04, 0.002)

    # Request times: inside the common window, never in the user's first period. A time is
    # re-drawn (a few times) until some interest topic qualifies as a query topic: current in an
    # earlier period that had feed behaviours, and current neither in the request's period nor
    # in any period of the last `recent_guard` feed behaviours.
    ever_current = np.zeros((P, T), bool)
    for c in range(2):
        has = current[:, c] >= 0
        ever_current[np.flatnonzero(has), current[has, c]] = True
    seen_through = np.logical_or.accumulate(ever_current & (counts > 0)[:, None], axis=0)
    open_periods = np.flatnonzero((ends > WINDOW_START_MS) & (np.arange(P) >= 1))
    lo = np.maximum(starts[open_periods], WINDOW_START_MS)

    def pools(t: int, j: int) -> Tuple[np.ndarray, np.ndarray, int]:
        idx = int(np.searchsorted(b_time, t))  # feed behaviours strictly before t
        recent = np.unique(np.append(bp[max(0, idx - cfg.recent_guard):idx], j))
        excluded = ever_current[recent].any(axis=0)
        first = int(recent[0]) if idx > cfg.recent_guard else 0
        seen = seen_through[first - 1] if first > 0 else np.zeros(T, bool)
        if cfg.recent_guard == 0:
            guard_start = t  # no guard: no earlier search counts as recent
        else:
            guard_start = int(b_time[idx - cfg.recent_guard]) if idx > cfg.recent_guard else -1
        return is_interest & seen & ~excluded, is_interest & ~excluded, guard_start

    R = int(us.requests[u])
    r_time = np.zeros(R, np.int64)
    r_pidx = np.zeros(R, np.int64)
    for k in range(R):
        for _ in range(cfg.request_time_attempts):
            pos = int(rng.integers(0, len(open_periods)))
            j = int(open_periods[pos])
            r_time[k] = lo[pos] + int(rng.random() * (ends[j] - lo[pos]))
            r_pidx[k] = j
            if pools(int(r_time[k]), j)[0].any():
                break
    order = np.argsort(r_time, kind="stable")
    r_time, r_pidx = r_time[order], r_pidx[order]

    words_per_topic = cfg.words_per_topic
    n_generic = len(GENERIC_WORDS)
    tokens_out: List[np.ndarray] = []
    emb_out = np.zeros((R, cfg.embedding_dim), np.float32)
    cands_out: List[np.ndarray] = []
    labels: Dict[str, List[np.ndarray]] = {t: [] for t in F.DEFAULT_TASKS}
    probs: Dict[str, List[np.ndarray]] = {t: [] for t in F.DEFAULT_TASKS}
    play_out: List[np.ndarray] = []
    expected_play_out: List[np.ndarray] = []
    r_topic = np.zeros(R, np.int32)
    r_seen = np.zeros(R, bool)
    s_item, s_time, s_watch, s_like, s_follow, s_share = [], [], [], [], [], []
    searched_time, searched_topic = [], []  # earlier search clicks, for the recency guard
    for k in range(R):
        t = int(r_time[k])
        strict, loose, guard_start = pools(t, int(r_pidx[k]))
        if searched_time:
            # Topics searched and clicked within the guard window would leak affinity into the
            # last behaviours: avoid them when another topic qualifies.
            st, sp = np.concatenate(searched_time), np.concatenate(searched_topic)
            recent_search = np.zeros(T, bool)
            recent_search[sp[(st >= guard_start) & (st < t)]] = True
            strict_ok, loose_ok = strict & ~recent_search, loose & ~recent_search
        else:
            strict_ok, loose_ok = strict, loose
        for mask in (strict_ok, loose_ok, strict, loose, is_interest):
            if mask.any():
                pool = np.flatnonzero(mask)
                break
        w = weights[np.searchsorted(interests, pool)]
        qt = int(pool[rng.choice(len(pool), p=w / w.sum())]) if len(pool) > 1 else int(pool[0])
        r_topic[k], r_seen[k] = qt, strict[qt]
        # Query: 1-2 topic words + 0-2 generic words, in random order.
        tw = qt * words_per_topic + rng.choice(words_per_topic, 1 + (rng.random() < 0.4),
                                               replace=False)
        gw = T * words_per_topic + rng.choice(n_generic, rng.integers(0, 3), replace=False)
        tokens = rng.permutation(np.concatenate([tw, gw])).astype(np.int64) + 1
        tokens_out.append(tokens)
        emb_out[k] = _unit(world.vocab_embeddings[tokens - 1].mean(axis=0))
        # Candidates: query-topic items and items of other topics, shuffled.
        nc = int(rng.integers(cfg.min_candidates, cfg.max_candidates + 1))
        topic_items = world.topic_items[qt]
        n_rel = min(int(rng.binomial(nc, cfg.query_topic_share)), len(topic_items))
        n_other = min(nc - n_rel, cfg.items - len(topic_items))
        rel = topic_items[rng.choice(len(topic_items), n_rel, replace=False)]
        pos = rng.choice(cfg.items - len(topic_items), n_other, replace=False)
        pos = np.where(pos < world.topic_start[qt], pos, pos + len(topic_items))
        cands = rng.permutation(np.concatenate([rel, world.item_order[pos]]))
        cands_out.append(cands)
        is_rel = world.item_topic[cands] == qt
        aff = is_rel & (world.item_subtopic[cands] == pref_of_topic[qt])
        q = world.item_quality[cands]
        p_click, c_long, c_like = search_engagement(cfg, is_rel, aff, q)
        click = rng.random(len(cands)) < p_click
        long_view = click & (rng.random(len(cands)) < c_long)
        liked = click & (rng.random(len(cands)) < c_like)
        for task, lab, p in (("click", click, p_click), ("long_view", long_view, p_click * c_long),
                             ("like", liked, p_click * c_like)):
            labels[task].append(lab.astype(np.int8))
            probs[task].append(p.astype(np.float32))
        duration = world.item_duration[cands]
        expected_play_out.append(
            expected_play_time(p_click, c_long, duration.astype(np.float64)).astype(np.float32))
        play = np.zeros(len(cands), np.float32)
        # Search clicks become full-site behaviours a few seconds after the request.
        clicked = np.flatnonzero(click)
        if len(clicked):
            m = len(clicked)
            s_item.append(cands[clicked])
            times = t + 1000 * (3 + 15 * np.arange(m) + rng.integers(0, 10, m))
            s_time.append(times)
            searched_time.append(times)
            searched_topic.append(world.item_topic[cands[clicked]])
            lv = long_view[clicked]
            s_watch.append(np.where(lv, _deep_watch_ratio(rng, m), _short_watch_ratio(rng, m)))
            # the same play time as the search behaviour's (watch ratio * duration, float32)
            play[clicked] = s_watch[-1].astype(np.float32) * duration[clicked]
            s_like.append(liked[clicked])
            s_follow.append(rng.random(m) < np.where(liked[clicked], 0.1, 0.005))
            s_share.append(rng.random(m) < np.where(liked[clicked], 0.05, 0.002))
        play_out.append(play)

    def cat(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    all_item = np.concatenate([item, cat(s_item, np.int64)])
    all_time = np.concatenate([b_time, cat(s_time, np.int64)])
    all_search = np.concatenate([np.zeros(n, bool), np.ones(len(all_item) - n, bool)])
    order = np.argsort(all_time, kind="stable")
    return UserLog(
        b_item=all_item[order], b_time=all_time[order], b_search=all_search[order],
        b_watch=np.concatenate([watch, cat(s_watch, np.float64)])[order].astype(np.float32),
        b_like=np.concatenate([like, cat(s_like, bool)])[order].astype(np.int8),
        b_follow=np.concatenate([follow, cat(s_follow, bool)])[order].astype(np.int8),
        b_share=np.concatenate([share, cat(s_share, bool)])[order].astype(np.int8),
        r_time=r_time, r_tokens=tokens_out, r_embedding=emb_out, r_candidates=cands_out,
        r_labels=labels, r_probs=probs, r_play_time=play_out,
        r_expected_play_time=expected_play_out, r_topic=r_topic, r_period=r_pidx.astype(np.int32),
        r_seen_before=r_seen, period_start=starts, period_end=ends, period_current=current,
        period_counts=counts)


# ---- Arrow helpers ---------------------------------------------------------------------------
def _list_array(parts: Sequence[np.ndarray], values: pa.Array, value_type) -> pa.Array:
    offsets = np.zeros(len(parts) + 1, np.int32)
    if parts:
        np.cumsum([len(p) for p in parts], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values,
                                    type=_list_type(value_type))


def _numeric_lists(parts: Sequence[np.ndarray], value_type) -> pa.Array:
    flat = np.concatenate(parts) if parts else np.zeros(0)
    return _list_array(parts, pa.array(flat, value_type), value_type)


def _fixed_lists(matrix: np.ndarray, value_type=pa.float32()) -> pa.Array:
    rows, dim = matrix.shape
    offsets = np.arange(rows + 1, dtype=np.int32) * dim
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                    pa.array(matrix.reshape(-1), value_type),
                                    type=_list_type(value_type))


def entity_ids(prefix: str, count: int) -> pa.Array:
    """`count` ids zero-padded to the width of the largest: 300 users are u000 ... u299."""
    width = len(str(max(count - 1, 0)))
    return pa.array([f"{prefix}{k:0{width}d}" for k in range(count)], pa.string())


class _Output:
    """Writes files under a local directory or a pyarrow-supported URI (gs://, s3://...).

    Each file is written as `<name>.partial` and renamed when complete, so a crashed run never
    leaves a truncated file under the final name."""

    def __init__(self, root: str):
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(root)
        self.fs.create_dir(self.root, recursive=True)
        self.fs.create_dir(f"{self.root}/{TRUTH_DIR}", recursive=True)
        self._pending: List[Tuple[str, str]] = []

    def writer(self, name: str, schema: pa.Schema) -> pq.ParquetWriter:
        final = f"{self.root}/{name}"
        partial = final + ".partial"
        self._pending.append((partial, final))
        return pq.ParquetWriter(partial, schema, filesystem=self.fs, compression="snappy")

    def table(self, name: str, table: pa.Table) -> None:
        with self.writer(name, table.schema) as w:
            w.write_table(table)

    def text(self, name: str, text: str) -> None:
        with self.fs.open_output_stream(f"{self.root}/{name}") as f:
            f.write(text.encode())

    def commit(self) -> None:
        for partial, final in self._pending:
            self.fs.move(partial, final)
        self._pending = []


class _Buffered:
    """Accumulates columns and writes one row group whenever `rows` reach the threshold."""

    def __init__(self, writer: pq.ParquetWriter, build: Callable[[list], pa.Table], rows: int):
        self.writer, self.build, self.threshold = writer, build, rows
        self.parts: list = []
        self.rows = 0
        self.written = 0

    def add(self, part, rows: int) -> None:
        self.parts.append(part)
        self.rows += rows
        if self.rows >= self.threshold:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.writer.write_table(self.build(self.parts))
            self.written += self.rows
            self.parts, self.rows = [], 0


# ---- the generator ---------------------------------------------------------------------------
def generate(output_dir: str, users: int = 1000, items: int = 5000, requests: int = 20000,
             seed: int = 0, progress: bool = False, **options: Any) -> Dict[str, Any]:
    """Writes synthetic logs to `output_dir` (canonical layout + truth/); returns a summary.

    `options` are any other GeneratorConfig fields (lifelong_users, embedding_dim, topics,
    subtopics, min_candidates, max_candidates, mean_history, ...). With `progress` a line is
    printed to stderr every few seconds.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(GeneratorConfig)})
    if unknown:
        raise TypeError(f"unknown generator options {unknown}")
    cfg = GeneratorConfig(users=users, items=items, requests=requests, seed=seed, **options)
    cfg.validate()
    started = time.time()
    log = (lambda m: print(f"[synthetic] {m}", file=sys.stderr, flush=True)) if progress else \
        (lambda m: None)

    world = build_world(cfg)
    us = draw_user_scalars(cfg)
    out = _Output(output_dir)
    item_ids = entity_ids("i", cfg.items)
    user_ids = entity_ids("u", cfg.users)
    log(f"world: {cfg.topics} topics x {cfg.subtopics} subtopics, {cfg.items:,} items, "
        f"{cfg.users:,} users ({cfg.lifelong_users} lifelong), {int(us.feed_length.sum()):,} feed "
        f"behaviours and {cfg.requests:,} requests to generate")

    fmt = np.asarray(FORMAT_CLASSES)
    author_ids = pa.array([f"a{a}" for a in world.item_author], pa.string())
    out.table(ITEM_FILE, pa.table({
        "item_id": item_ids, "author_id": author_ids,
        "category_l1": pa.array([topic_name(t) for t in world.item_topic], pa.string()),
        "category_l2": pa.array(fmt[world.item_format], pa.string()),
        "duration_s": pa.array(world.item_duration, pa.float32()),
        "embedding": _fixed_lists(world.item_embedding)}, schema=ITEM_SCHEMA))
    out.table(USER_FILE, pa.table({
        "user_id": user_ids, "age_bucket": pa.array(us.profile[:, 0], pa.string()),
        "gender": pa.array(us.profile[:, 1], pa.string()),
        "activity_level": pa.array(us.profile[:, 2], pa.string()),
        "city_tier": pa.array(us.profile[:, 3], pa.string())}, schema=USER_SCHEMA))
    out.table(VOCAB_FILE, pa.table({
        "token_id": pa.array(np.arange(1, len(world.vocab_words) + 1), pa.int64()),
        "word": pa.array(world.vocab_words, pa.string()),
        "embedding": _fixed_lists(world.vocab_embeddings)}, schema=VOCAB_SCHEMA))
    out.table(f"{TRUTH_DIR}/topics.parquet", pa.table({
        "topic": pa.array(np.arange(cfg.topics), pa.int32()),
        "name": pa.array([topic_name(t) for t in range(cfg.topics)], pa.string()),
        "centre": _fixed_lists(world.centres.astype(np.float32)),
        "subtopic_offsets": pa.ListArray.from_arrays(
            pa.array(np.arange(cfg.topics + 1, dtype=np.int32) * cfg.subtopics),
            _fixed_lists(world.offsets.reshape(-1, cfg.embedding_dim).astype(np.float32)),
            type=_list_type(_list_type(pa.float32())))}, schema=TRUTH_TOPIC_SCHEMA))
    out.table(f"{TRUTH_DIR}/items.parquet", pa.table({
        "item_id": item_ids, "topic": pa.array(world.item_topic, pa.int32()),
        "subtopic": pa.array(world.item_subtopic, pa.int32()),
        "quality": pa.array(world.item_quality, pa.float32()),
        "latent": _fixed_lists(world.item_latent)}, schema=TRUTH_ITEM_SCHEMA))
    out.table(f"{TRUTH_DIR}/users.parquet", pa.table({
        "user_id": user_ids, "lifelong": pa.array(us.lifelong),
        "feed_behaviours": pa.array(us.feed_length, pa.int64()),
        "requests": pa.array(us.requests, pa.int64())}, schema=TRUTH_USER_SCHEMA))
    owner = np.repeat(np.arange(cfg.users), [len(x) for x in us.interests])
    topics_flat = np.concatenate(us.interests)
    out.table(f"{TRUTH_DIR}/user_interests.parquet", pa.table({
        "user_id": user_ids.take(pa.array(owner)), "topic": pa.array(topics_flat, pa.int32()),
        "topic_name": pa.array([topic_name(t) for t in topics_flat], pa.string()),
        "weight": pa.array(np.concatenate(us.weights), pa.float32()),
        "preferred_subtopic": pa.array(np.concatenate(us.preferred), pa.int32())},
        schema=TRUTH_INTEREST_SCHEMA))

    def behaviour_table(parts):
        users_, logs = zip(*parts)
        sizes = [len(lg.b_item) for lg in logs]
        item_idx = np.concatenate([lg.b_item for lg in logs])
        return pa.table({
            "user_id": user_ids.take(pa.array(np.repeat(users_, sizes))),
            "item_id": item_ids.take(pa.array(item_idx)),
            "timestamp": pa.array(np.concatenate([lg.b_time for lg in logs]), pa.int64()),
            "source": pa.DictionaryArray.from_arrays(
                pa.array(np.concatenate([lg.b_search for lg in logs]).astype(np.int8)),
                pa.array(["feed", "search"])).cast(pa.string()),
            "watch_ratio": pa.array(np.concatenate([lg.b_watch for lg in logs]), pa.float32()),
            "play_time_s": pa.array(np.concatenate([lg.b_watch for lg in logs])
                                    * world.item_duration[item_idx], pa.float32()),
            "like": pa.array(np.concatenate([lg.b_like for lg in logs]), pa.int8()),
            "follow": pa.array(np.concatenate([lg.b_follow for lg in logs]), pa.int8()),
            "share": pa.array(np.concatenate([lg.b_share for lg in logs]), pa.int8()),
        }, schema=BEHAVIOUR_SCHEMA)

    def request_table(parts):
        ids, users_, times, tokens, emb, cands = [], [], [], [], [], []
        labels = {t: [] for t in F.DEFAULT_TASKS}
        probs = {t: [] for t in F.DEFAULT_TASKS}
        play, expected_play = [], []
        for u, lg in parts:
            ids += [f"r{u}-{k}" for k in range(len(lg.r_time))]
            users_.append(np.full(len(lg.r_time), u))
            times.append(lg.r_time)
            tokens += lg.r_tokens
            emb.append(lg.r_embedding)
            cands += lg.r_candidates
            for t in F.DEFAULT_TASKS:
                labels[t] += lg.r_labels[t]
                probs[t] += lg.r_probs[t]
            play += lg.r_play_time
            expected_play += lg.r_expected_play_time
        cand_values = item_ids.take(pa.array(np.concatenate(cands)))
        cols = {"request_id": pa.array(ids, pa.string()),
                "user_id": user_ids.take(pa.array(np.concatenate(users_))),
                "timestamp": pa.array(np.concatenate(times), pa.int64()),
                "query_tokens": _numeric_lists(tokens, pa.int64()),
                "query_embedding": _fixed_lists(np.concatenate(emb)),
                "candidate_item_ids": _list_array(cands, cand_values, pa.string())}
        for t in F.DEFAULT_TASKS:
            cols[t] = _numeric_lists(labels[t], pa.int8())
        cols["play_time_s"] = _numeric_lists(play, pa.float32())
        for t in F.DEFAULT_TASKS:
            cols[f"p_{t}"] = _numeric_lists(probs[t], pa.float32())
        cols["expected_play_time_s"] = _numeric_lists(expected_play, pa.float32())
        return pa.table(cols, schema=REQUEST_SCHEMA)

    def truth_request_table(parts):
        ids, users_, topic, period, seen, nrel = [], [], [], [], [], []
        for u, lg in parts:
            ids += [f"r{u}-{k}" for k in range(len(lg.r_time))]
            users_.append(np.full(len(lg.r_time), u))
            topic.append(lg.r_topic)
            period.append(lg.r_period)
            seen.append(lg.r_seen_before)
            nrel += [int((world.item_topic[c] == t).sum())
                     for c, t in zip(lg.r_candidates, lg.r_topic)]
        return pa.table({"request_id": pa.array(ids, pa.string()),
                         "user_id": user_ids.take(pa.array(np.concatenate(users_))),
                         "query_topic": pa.array(np.concatenate(topic), pa.int32()),
                         "period": pa.array(np.concatenate(period), pa.int32()),
                         "topic_seen_before": pa.array(np.concatenate(seen)),
                         "relevant_candidates": pa.array(nrel, pa.int32())},
                        schema=TRUTH_REQUEST_SCHEMA)

    def period_table(parts):
        users_, periods, starts, ends, current, counts = [], [], [], [], [], []
        for u, lg in parts:
            users_.append(np.full(len(lg.period_start), u))
            periods.append(np.arange(len(lg.period_start)))
            starts.append(lg.period_start)
            ends.append(lg.period_end)
            current += [c[c >= 0] for c in lg.period_current]
            counts.append(lg.period_counts)
        return pa.table({"user_id": user_ids.take(pa.array(np.concatenate(users_))),
                         "period": pa.array(np.concatenate(periods), pa.int32()),
                         "start_ms": pa.array(np.concatenate(starts), pa.int64()),
                         "end_ms": pa.array(np.concatenate(ends), pa.int64()),
                         "current_topics": _numeric_lists(current, pa.int32()),
                         "feed_behaviours": pa.array(np.concatenate(counts), pa.int64())},
                        schema=TRUTH_PERIOD_SCHEMA)

    streams = {
        "behaviours": _Buffered(out.writer(BEHAVIOUR_FILE, BEHAVIOUR_SCHEMA), behaviour_table,
                                cfg.behaviour_row_group),
        "requests": _Buffered(out.writer(REQUEST_FILE, REQUEST_SCHEMA), request_table,
                              cfg.request_row_group),
        "truth_requests": _Buffered(out.writer(f"{TRUTH_DIR}/requests.parquet",
                                               TRUTH_REQUEST_SCHEMA), truth_request_table,
                                    cfg.request_row_group),
        "periods": _Buffered(out.writer(f"{TRUTH_DIR}/user_periods.parquet", TRUTH_PERIOD_SCHEMA),
                             period_table, cfg.request_row_group),
    }
    search_behaviours = impressions = clicks = 0
    last_report = time.time()
    for u in range(cfg.users):
        lg = simulate_user(u, cfg, world, us)
        search_behaviours += int(lg.b_search.sum())
        impressions += sum(len(c) for c in lg.r_candidates)
        clicks += sum(int(c.sum()) for c in lg.r_labels["click"])
        streams["behaviours"].add((u, lg), len(lg.b_item))
        if len(lg.r_time):
            streams["requests"].add((u, lg), len(lg.r_time))
            streams["truth_requests"].add((u, lg), len(lg.r_time))
        streams["periods"].add((u, lg), len(lg.period_start))
        if progress and (time.time() - last_report > 5 or u == cfg.users - 1):
            last_report = time.time()
            done = streams["behaviours"].written + streams["behaviours"].rows
            elapsed = max(time.time() - started, 1e-9)
            log(f"users {u + 1:,}/{cfg.users:,} ({100 * (u + 1) / cfg.users:.0f}%), "
                f"behaviours {done:,} ({done / elapsed:,.0f}/s)")
    for s in streams.values():
        s.flush()
        s.writer.close()
    behaviours = streams["behaviours"].written
    elapsed = time.time() - started
    summary = {
        "output_dir": output_dir, "seed": cfg.seed, "users": cfg.users,
        "lifelong_users": cfg.lifelong_users, "items": cfg.items,
        "requests": streams["requests"].written, "behaviours": behaviours,
        "feed_behaviours": behaviours - search_behaviours, "search_behaviours": search_behaviours,
        "impressions": impressions, "clicks": clicks,
        "click_rate": round(clicks / impressions, 4) if impressions else 0.0,
        "embedding_dim": cfg.embedding_dim, "seconds": round(elapsed, 2),
        "behaviours_per_second": round(behaviours / max(elapsed, 1e-9), 1),
    }
    out.text(f"{TRUTH_DIR}/generator.json", json.dumps(
        {"config": dataclasses.asdict(cfg), "summary": {k: v for k, v in summary.items()
                                                        if k not in ("seconds", "output_dir",
                                                                     "behaviours_per_second")}},
        indent=2, sort_keys=True))
    out.commit()
    log(f"done in {elapsed:.1f}s: {behaviours:,} behaviours, {summary['requests']:,} requests "
        f"-> {output_dir}")
    return summary


# ---- CLI -------------------------------------------------------------------------------------
def _candidate_range(text: str) -> Tuple[int, int]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
        else:
            lo = hi = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, e.g. 12-20 (got {text!r})")
    return lo, hi


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults and keeps the generative-model text (epilog) as written."""


def build_parser() -> argparse.ArgumentParser:
    d = GeneratorConfig()
    p = argparse.ArgumentParser(
        prog="python -m preprocessing.synthetic",
        description="Generate synthetic short-video search logs in the canonical raw-log layout "
                    "(docs/ARCHITECTURE.md section 1) plus truth/ with the latent variables. "
                    "The generative model is described below.",
        epilog=__doc__[__doc__.index("Generative model"):],
        formatter_class=_HelpFormatter)
    p.add_argument("--output", required=True, default=argparse.SUPPRESS,
                   help="output directory (local path or a pyarrow URI such as gs://bucket/dir); "
                        "created if missing, generated files are overwritten")
    p.add_argument("--users", type=int, default=d.users, help="number of users")
    p.add_argument("--items", type=int, default=d.items,
                   help="number of items (>= 2 * topics * subtopics)")
    p.add_argument("--requests", type=int, default=d.requests,
                   help="number of search requests, spread over users by activity")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="random seed: the output is a deterministic function of it")
    p.add_argument("--lifelong-users", type=int, default=d.lifelong_users,
                   help="users with lifelong histories of 10^4-10^5 behaviours (reaching back "
                        "--lifelong-backlog-days before the common window)")
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim,
                   help="dimension D of item, query and vocabulary embeddings")
    p.add_argument("--topics", type=int, default=d.topics,
                   help="number of topics (category_l1; queries ask about one topic)")
    p.add_argument("--subtopics", type=int, default=d.subtopics,
                   help="subtopics per topic: the latent within-topic taste a user prefers")
    p.add_argument("--candidates-per-request", type=_candidate_range,
                   default=f"{d.min_candidates}-{d.max_candidates}", metavar="MIN-MAX",
                   help="candidates shown per request, uniform in MIN-MAX (or a fixed N)")
    p.add_argument("--mean-history", type=float, default=d.mean_history,
                   help="mean feed behaviours per ordinary user (log-normal, clipped to "
                        f"[{d.min_history}, {d.max_history}])")
    p.add_argument("--days", type=int, default=d.days,
                   help="length of the common time window holding all requests")
    p.add_argument("--period-behaviours", type=int, default=d.period_behaviours,
                   help="feed views per interest period (1-2 current feed topics per period)")
    p.add_argument("--lifelong-backlog-days", type=int, default=d.lifelong_backlog_days,
                   help="how far before the window lifelong users' histories start")
    p.add_argument("--noise-share", type=float, default=d.noise_share,
                   help="share of feed views that are random items (almost always short views)")
    p.add_argument("--relevance-effect", type=float, default=d.relevance_effect,
                   help="click logit bonus of a candidate in the query's topic")
    p.add_argument("--affinity-effect", type=float, default=d.affinity_effect,
                   help="extra click logit bonus when it is also the user's preferred subtopic")
    p.add_argument("--quality-std", type=float, default=d.quality_std,
                   help="std of the per-item quality added to click/long-view/like logits")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    lo, hi = args.candidates_per_request
    try:
        summary = generate(
            args.output, users=args.users, items=args.items, requests=args.requests,
            seed=args.seed, progress=True, lifelong_users=args.lifelong_users,
            embedding_dim=args.embedding_dim, topics=args.topics, subtopics=args.subtopics,
            min_candidates=lo, max_candidates=hi, mean_history=args.mean_history, days=args.days,
            period_behaviours=args.period_behaviours,
            lifelong_backlog_days=args.lifelong_backlog_days,
            noise_share=args.noise_share, relevance_effect=args.relevance_effect,
            affinity_effect=args.affinity_effect, quality_std=args.quality_std)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
