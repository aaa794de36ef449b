"""Generated logs in KuaiSAR's and JDsearch's public layouts, with the true click probabilities on
the side, so that quality through the public-format readers is measured against the oracle.

    python -m preprocessing.synthetic --output raw --seed 0
    python -m preprocessing.synthetic_layouts --input raw --output kuaisar --layout kuaisar
    python -m preprocessing --input-format kuaisar --input kuaisar --output prep
    python -m preprocessing.synthetic_layouts --oracle-gauc prep \\
        --truth kuaisar/truth_probabilities.parquet --split test

Why: real public datasets have no ground truth, and the generator (preprocessing/synthetic.py)
writes only the canonical layout. Converting its output lets the token-only paths (text embeddings
trained from clicks, no pretrained vectors) be measured against the same oracle as the canonical
path: the oracle GAUC (true p_click) and the non-personalized oracle GAUC (the best any ranker
without user information can do) on the test split after preprocessing.

Input: the output directory of `python -m preprocessing.synthetic` with its `truth/` folder.
Output (--output), one layout per directory:

  kuaisar   rec_inter.csv, src_inter.csv, item_features.csv, user_features.csv in the published
            column order (KUAISAR_COLUMNS), read by preprocessing/kuaisar.py.
  jdsearch  user_behavior_data.txt, product_meta_data.txt with their headers, read by
            preprocessing/jdsearch.py.
  canonical no data (the generator's directory is the canonical input); only the side file, so
            the canonical path is evaluated by the same function.

plus, for every layout, TRUTH_FILE (`truth_probabilities.parquet`, one row per shown candidate
of every request the layout carries) and SUMMARY_FILE (`conversion.json`: what was written,
what the layout cannot carry, with counts).

Ids. Public files have integer ids: the item, user and request (search session) of the canonical
files get their row number in items.parquet, users.parquet and requests.parquet; authors and
category names get their rank among the sorted distinct canonical values. JDsearch has no user or
request id: its reader names them after the line number (`u<n>`, `r<n>`), and this converter asks
the reader's own parser for the ids of every line it writes (which also checks each line parses).
The side file keeps the layout's ids (`request_id`, `item_id`: exactly as the preprocessed
TFRecords and vocab/items.txt hold them) next to the canonical ones.

KuaiSAR mapping
  rec_inter.csv     every feed behaviour (source=feed). click = 1 for all: each generated feed
                    behaviour is a view with a play time (the generator logs no unopened
                    impressions). playing_time = play_time_s and duration_ms = duration_s in ms,
                    so playing_time / duration_ms is the watch ratio (the reader caps it at its
                    WATCH_RATIO_CAP); like, follow, forward (= share) as generated; search and
                    search_item_related = 0.
  src_inter.csv     one row per shown candidate of every request, in display order; keyword = the
                    request's query token ids ("[20, 34, 3]"); click_cnt = the click label (0/1).
                    The generator's search clicks in behaviours.parquet are NOT written: the
                    KuaiSAR reader derives a search behaviour from every click_cnt > 0 (at the
                    session time, engagement zero: the layout has no watch time or like of a
                    search result), so the long-view and like labels and the engagement of search
                    clicks are lost, as in the real dataset.
  item_features.csv caption = token ids (below); author_id; first level category = the topic
                    (category_l1), second level = the format class (category_l2); item_type
                    VIDEO; upload time and type are left empty (the generator has none).
  user_features.csv rec_active_level = activity_level, search_active_level = floor(log2(1 +
                    the user's number of requests)), onehot_feat1 = age_bucket, onehot_feat2 =
                    gender (city_tier has no column; it carries no preference). social_network.csv
                    is not written: the reader does not read it and the generator has no graph.
  Display order: the generator shows candidates in a random permutation and has no position
  effect; src_inter.csv keeps that order (the side file has `position`), and so does the KuaiSAR
  reader (a session's file row order is its display order): the examples carry the positions
  and the ranker's position-bias term has nothing real to learn on these logs.

Captions. Real captions name their topic; generated items have only a topic, a subtopic and a
content embedding. A caption (CaptionConfig) is, shuffled: 0-2 words of the item's topic (the
query vocabulary's topic words, so queries and captions share tokens), with probability
`subtopic_word_share` one of `subtopic_words` words of its subtopic (new token ids after the
query vocabulary: no query uses them), 0-2 generic words, 1-4 filler words (an item-specific
long tail) and, with probability `other_topic_word_share`, a word of another topic (noise).
Drawn from a child stream of the generator's seed (CAPTION_STREAM), so they are deterministic.
Nothing else about an item is in the public layouts: no embedding, no quality.

JDsearch mapping (one line per user; history-only lines for users without a request)
  test query        the user's last request (latest timestamp): query terms = token ids joined by
                    the reader's TERM_SEPARATOR; candidates in display order (the reader keeps
                    it); label = depth of the response: 0 none, 1 click, 2 click + long view,
                    3 click + like (the reader's TYPE_BY_LABEL: CLICK, CART, ORD). Earlier
                    requests are no requests in this layout: their clicks stay as history.
  history           every behaviour strictly before the test query, oldest first; query = the
                    terms of the request whose click it was for search behaviours, -1 for feed;
                    type by engagement depth over the reader's ENGAGEMENT_BY_TYPE (CLICK < FLW <
                    CART < ORD): ORD if followed or shared, CART if liked, FLW if watched deeply
                    (watch ratio above the generator's SHORT_WATCH_CAP), CLICK otherwise.
  times             history_time_list in seconds (the reader's TIME_UNIT_MS): 0 for the first
                    behaviour, then the gaps; the last entry is the gap to the test query.
                    Behaviour times are floored to the second and the query time rounded up, so
                    "strictly before" survives. As in the real dataset every user's time starts
                    at the same instant, so the reader's time split holds out the requests that
                    come latest in each user's own timeline, not the canonical split.
  product_meta      wid, name = caption terms, brand_id = author, cate_id_1 = topic, cate_id_2 =
                    format; names, levels 3-4 and shop_id empty.

Side file and the non-personalized oracle
  Columns: request_id, item_id (layout ids), canonical_request_id, canonical_item_id, position
  (display position in the generated list), click, p_click (the generator's value, from
  requests.parquet), p_click_nonpersonalized.
  The generator's click model is p_click = sigmoid(click_bias + relevance_effect * rel +
  affinity_effect * aff + q_i), rel = [item topic == query topic], aff = rel and [item subtopic
  == the user's preferred subtopic of the query topic]; aff is the only user term. The
  non-personalized probability replaces it by its population average: preferred subtopics are
  uniform over the S subtopics, so for a relevant candidate
      p_np = (1/S) * sigmoid(base + affinity_effect) + (1 - 1/S) * sigmoid(base),
  base = click_bias + relevance_effect + q_i, and p_np = p_click for the others. This is the
  Bayes-optimal prediction from the query and the item alone (dropping the term instead would
  under-rate relevant candidates). Before writing, the converter recomputes p_click from the truth
  with the formula above and refuses to continue if it differs from requests.parquet: a changed
  click model must be reflected here first.
  `oracle_gauc(preprocessed_dir, truth_file, split)` joins the side file to the preprocessed
  candidates of a split and returns the click GAUC by request (trainer/metrics.py) of both.

Memory: the whole generated log is held in memory (the default 1,000 users with ~0.5M behaviours
take well under a gigabyte).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.cli import HelpFormatter
from preprocessing import synthetic as syn

LAYOUTS = ("canonical", "kuaisar", "jdsearch")
TRUTH_FILE = "truth_probabilities.parquet"
SUMMARY_FILE = "conversion.json"
GENERATOR_FILE = "generator.json"
CAPTION_STREAM = 1_000  # spawn_key of the caption stream; the generator's streams are 0-3
PROBABILITY_TOLERANCE = 1e-5  # recomputed vs stored p_click (float32 storage)
CLICK_TASK = "click"

TRUTH_SCHEMA = pa.schema([("request_id", pa.string()), ("item_id", pa.string()),
                          ("canonical_request_id", pa.string()),
                          ("canonical_item_id", pa.string()), ("position", pa.int32()),
                          ("click", pa.int8()), ("p_click", pa.float32()),
                          ("p_click_nonpersonalized", pa.float32())])

# The published KuaiSAR columns in their published order (the reader needs a subset of them, see
# preprocessing.kuaisar.REQUIRED_COLUMNS, and finds columns by name).
KUAISAR_COLUMNS = {
    "rec_inter.csv": ("user_id", "item_id", "playing_time", "duration_ms", "time", "timestamp",
                      "click", "forward", "like", "follow", "search", "search_item_related"),
    "src_inter.csv": ("user_id", "search_session_id", "search_session_time",
                      "search_session_timestamp", "keyword", "search_source", "item_id",
                      "click_cnt", "item_type"),
    "item_features.csv": ("item_id", "caption", "author_id", "item_type", "upload_time",
                          "upload_type", "first_level_category_id", "first_level_category_name",
                          "second_level_category_id", "second_level_category_name",
                          "third_level_category_id", "third_level_category_name",
                          "fourth_level_category_id", "fourth_level_category_name"),
    "user_features.csv": ("user_id", "search_active_level", "rec_active_level", "onehot_feat1",
                          "onehot_feat2"),
}
KUAISAR_ITEM_TYPE = "VIDEO"  # every generated item is a short video
KUAISAR_SEARCH_SOURCE = 1  # one search entry point


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    """How caption tokens are drawn (module docstring, "Captions")."""

    topic_word_counts: Tuple[float, ...] = (0.1, 0.5, 0.4)  # P(0, 1, 2 words of the topic)
    subtopic_word_share: float = 0.6
    subtopic_words: int = 3  # distinct words per (topic, subtopic)
    max_generic_words: int = 2
    filler_words: Tuple[int, int] = (1, 4)  # min, max
    filler_vocabulary: int = 2000
    other_topic_word_share: float = 0.15


# ---- the generated log in memory --------------------------------------------------------------
@dataclasses.dataclass
class GeneratedLogs:
    """The canonical files and the truth, as arrays. Items, users and requests are numbered by
    their row in items.parquet / users.parquet / requests.parquet; candidates are flat arrays
    with `candidate_offsets` (request r owns [offsets[r], offsets[r + 1]))."""

    config: Dict[str, Any]
    item_ids: np.ndarray  # canonical ids (str), by item number
    item_author: np.ndarray  # author code (rank among sorted distinct author ids)
    item_category_l1: np.ndarray  # codes
    item_category_l2: np.ndarray
    category_l1_names: List[str]  # code -> name
    category_l2_names: List[str]
    item_duration_s: np.ndarray
    item_topic: np.ndarray
    item_subtopic: np.ndarray
    item_quality: np.ndarray
    user_ids: np.ndarray
    user_profile: Dict[str, np.ndarray]  # canonical profile column -> codes
    behaviour_user: np.ndarray
    behaviour_item: np.ndarray
    behaviour_time: np.ndarray
    behaviour_search: np.ndarray  # bool
    behaviour_watch_ratio: np.ndarray
    behaviour_play_time_s: np.ndarray
    behaviour_like: np.ndarray
    behaviour_follow: np.ndarray
    behaviour_share: np.ndarray
    request_ids: np.ndarray
    request_user: np.ndarray
    request_time: np.ndarray
    request_tokens: List[np.ndarray]
    request_query_topic: np.ndarray
    candidate_offsets: np.ndarray
    candidate_item: np.ndarray
    candidate_click: np.ndarray
    candidate_long_view: np.ndarray
    candidate_like: np.ndarray
    candidate_p_click: np.ndarray
    preferred_subtopic: np.ndarray  # [users, topics], -1 = not an interest
    vocab_token: np.ndarray
    vocab_word: np.ndarray

    @property
    def candidate_request(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.request_ids)), np.diff(self.candidate_offsets))

    @property
    def candidate_position(self) -> np.ndarray:
        return np.arange(len(self.candidate_item)) - np.repeat(
            self.candidate_offsets[:-1], np.diff(self.candidate_offsets))


def _numbers(values: pa.ChunkedArray, vocabulary: pa.Array, what: str) -> np.ndarray:
    index = pc.index_in(values, value_set=vocabulary)
    if index.null_count:
        missing = pc.filter(values, pc.is_null(index)).unique().to_pylist()[:5]
        raise ValueError(f"{what} not found in its table: {missing}")
    return index.to_numpy(zero_copy_only=False).astype(np.int64)


def _codes(values: pa.ChunkedArray) -> Tuple[np.ndarray, List[str]]:
    names = sorted(set(values.to_pylist()))
    return _numbers(values, pa.array(names, values.type), "value"), names


def _lists(column: pa.ChunkedArray) -> Tuple[np.ndarray, pa.Array]:
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, pc.list_flatten(column)


def load_generated(raw_dir: str) -> GeneratedLogs:
    """Reads a generated directory (canonical files + truth/) into GeneratedLogs."""
    truth = os.path.join(raw_dir, syn.TRUTH_DIR)
    generator_file = os.path.join(truth, GENERATOR_FILE)
    if not os.path.exists(generator_file):
        raise ValueError(f"{raw_dir} has no {syn.TRUTH_DIR}/{GENERATOR_FILE}: --input must be an "
                         "output directory of `python -m preprocessing.synthetic` (real logs "
                         "have no truth to convert)")
    with open(generator_file) as f:
        config = json.load(f)["config"]

    def read(name):
        return pq.read_table(os.path.join(raw_dir, name))

    items, truth_items = read(syn.ITEM_FILE), read(f"{syn.TRUTH_DIR}/items.parquet")
    item_ids = items.column("item_id").combine_chunks()
    truth_row = _numbers(item_ids, truth_items.column("item_id").combine_chunks(), "item")
    authors, _ = _codes(items.column("author_id"))
    cat1, cat1_names = _codes(items.column("category_l1"))
    cat2, cat2_names = _codes(items.column("category_l2"))

    users = read(syn.USER_FILE)
    user_ids = users.column("user_id").combine_chunks()
    profile = {name: _codes(users.column(name))[0] for name in users.column_names
               if name != "user_id"}

    behaviours = read(syn.BEHAVIOUR_FILE)
    requests = read(syn.REQUEST_FILE)
    request_ids = requests.column("request_id").combine_chunks()
    truth_requests = read(f"{syn.TRUTH_DIR}/requests.parquet")
    query_topic = truth_requests.column("query_topic").to_numpy()[
        _numbers(request_ids, truth_requests.column("request_id").combine_chunks(), "request")]
    token_offsets, tokens = _lists(requests.column("query_tokens"))
    tokens = tokens.to_numpy(zero_copy_only=False)
    offsets, candidates = _lists(requests.column("candidate_item_ids"))

    def flat(name, dtype):
        return pc.list_flatten(requests.column(name)).to_numpy(zero_copy_only=False).astype(dtype)

    interests = read(f"{syn.TRUTH_DIR}/user_interests.parquet")
    preferred = np.full((len(user_ids), int(config["topics"])), -1, np.int64)
    preferred[_numbers(interests.column("user_id"), user_ids, "user"),
              interests.column("topic").to_numpy()] = interests.column(
                  "preferred_subtopic").to_numpy()
    vocab = read(syn.VOCAB_FILE)
    return GeneratedLogs(
        config=config, item_ids=np.asarray(item_ids.to_pylist(), object),
        item_author=authors, item_category_l1=cat1, item_category_l2=cat2,
        category_l1_names=cat1_names, category_l2_names=cat2_names,
        item_duration_s=items.column("duration_s").to_numpy(),
        item_topic=truth_items.column("topic").to_numpy()[truth_row],
        item_subtopic=truth_items.column("subtopic").to_numpy()[truth_row],
        item_quality=truth_items.column("quality").to_numpy()[truth_row].astype(np.float64),
        user_ids=np.asarray(user_ids.to_pylist(), object), user_profile=profile,
        behaviour_user=_numbers(behaviours.column("user_id"), user_ids, "user"),
        behaviour_item=_numbers(behaviours.column("item_id"), item_ids, "item"),
        behaviour_time=behaviours.column("timestamp").to_numpy(),
        behaviour_search=pc.equal(behaviours.column("source"), "search").to_numpy(
            zero_copy_only=False),
        behaviour_watch_ratio=behaviours.column("watch_ratio").to_numpy(),
        behaviour_play_time_s=behaviours.column("play_time_s").to_numpy(),
        behaviour_like=behaviours.column("like").to_numpy().astype(bool),
        behaviour_follow=behaviours.column("follow").to_numpy().astype(bool),
        behaviour_share=behaviours.column("share").to_numpy().astype(bool),
        request_ids=np.asarray(request_ids.to_pylist(), object),
        request_user=_numbers(requests.column("user_id"), user_ids, "user"),
        request_time=requests.column("timestamp").to_numpy(),
        request_tokens=np.split(tokens, token_offsets[1:-1]) if len(request_ids) else [],
        request_query_topic=query_topic.astype(np.int64),
        candidate_offsets=offsets, candidate_item=_numbers(candidates, item_ids, "candidate"),
        candidate_click=flat("click", bool), candidate_long_view=flat("long_view", bool),
        candidate_like=flat("like", bool), candidate_p_click=flat("p_click", np.float64),
        preferred_subtopic=preferred,
        vocab_token=vocab.column("token_id").to_numpy(),
        vocab_word=np.asarray(vocab.column("word").to_pylist(), object))


# ---- true and non-personalized click probabilities ---------------------------------------------
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def click_probabilities(logs: GeneratedLogs) -> Tuple[np.ndarray, np.ndarray]:
    """(recomputed p_click, non-personalized p_click) of every candidate (module docstring).

    Raises ValueError when the recomputation does not reproduce requests.parquet's p_click."""
    cfg = logs.config
    request = logs.candidate_request
    item = logs.candidate_item
    topic = logs.request_query_topic[request]
    relevant = logs.item_topic[item] == topic
    affinity = relevant & (logs.item_subtopic[item]
                           == logs.preferred_subtopic[logs.request_user[request], topic])
    base = cfg["click_bias"] + cfg["relevance_effect"] * relevant + logs.item_quality[item]
    personalized = _sigmoid(base + cfg["affinity_effect"] * affinity)
    if len(item):
        error = float(np.max(np.abs(personalized - logs.candidate_p_click)))
        if error > PROBABILITY_TOLERANCE:
            raise ValueError(
                f"p_click recomputed from truth/ differs from requests.parquet by up to "
                f"{error:.3g}: the generator's click model is no longer sigmoid(click_bias + "
                "relevance_effect * rel + affinity_effect * aff + quality); update "
                "click_probabilities() first")
    share = 1.0 / float(cfg["subtopics"])
    nonpersonalized = np.where(
        relevant, share * _sigmoid(base + cfg["affinity_effect"]) + (1 - share) * _sigmoid(base),
        _sigmoid(base))
    return personalized, nonpersonalized


def truth_table(logs: GeneratedLogs, request_ids: np.ndarray, item_ids: np.ndarray,
                rows: Optional[np.ndarray] = None) -> pa.Table:
    """The side file: one row per candidate in `rows` (flat candidate indices; all by default),
    keyed by the layout's `request_ids` / `item_ids` (one per selected candidate)."""
    _, nonpersonalized = click_probabilities(logs)
    rows = np.arange(len(logs.candidate_item)) if rows is None else rows
    return pa.table({
        "request_id": pa.array(list(request_ids), pa.string()),
        "item_id": pa.array(list(item_ids), pa.string()),
        "canonical_request_id": pa.array(list(logs.request_ids[logs.candidate_request[rows]]),
                                         pa.string()),
        "canonical_item_id": pa.array(list(logs.item_ids[logs.candidate_item[rows]]), pa.string()),
        "position": pa.array(logs.candidate_position[rows], pa.int32()),
        "click": pa.array(logs.candidate_click[rows].astype(np.int8), pa.int8()),
        "p_click": pa.array(logs.candidate_p_click[rows], pa.float32()),
        "p_click_nonpersonalized": pa.array(nonpersonalized[rows], pa.float32()),
    }, schema=TRUTH_SCHEMA)


# ---- captions ---------------------------------------------------------------------------------
def caption_tokens(logs: GeneratedLogs, config: CaptionConfig = CaptionConfig()
                   ) -> List[np.ndarray]:
    """Caption token ids of every item (module docstring, "Captions")."""
    topic_names = [syn.topic_name(t) for t in range(int(logs.config["topics"]))]
    topic_of_word = {f"{name}_": t for t, name in enumerate(topic_names)}
    topic_words: List[List[int]] = [[] for _ in topic_names]
    generic_words = []
    for token, word in zip(logs.vocab_token, logs.vocab_word):
        prefix = word[:word.rfind("_") + 1]
        if prefix in topic_of_word:
            topic_words[topic_of_word[prefix]].append(int(token))
        elif word in syn.GENERIC_WORDS:
            generic_words.append(int(token))
    subtopics = int(logs.config["subtopics"])
    first_subtopic_word = int(logs.vocab_token.max()) + 1
    first_filler = first_subtopic_word + len(topic_names) * subtopics * config.subtopic_words
    rng = np.random.default_rng(np.random.SeedSequence(entropy=int(logs.config["seed"]),
                                                       spawn_key=(CAPTION_STREAM,)))
    captions = []
    for topic, subtopic in zip(logs.item_topic, logs.item_subtopic):
        words = list(rng.choice(topic_words[topic], rng.choice(
            len(config.topic_word_counts), p=config.topic_word_counts), replace=False))
        if rng.random() < config.subtopic_word_share:
            words.append(first_subtopic_word + (topic * subtopics + subtopic)
                         * config.subtopic_words + int(rng.integers(config.subtopic_words)))
        words += list(rng.choice(generic_words, int(rng.integers(config.max_generic_words + 1)),
                                 replace=False))
        low, high = config.filler_words
        words += list(first_filler + rng.integers(0, config.filler_vocabulary,
                                                  int(rng.integers(low, high + 1))))
        if rng.random() < config.other_topic_word_share:
            other = (topic + 1 + int(rng.integers(len(topic_names) - 1))) % len(topic_names)
            words.append(int(rng.choice(topic_words[other])))
        captions.append(rng.permutation(np.asarray(words, np.int64)))
    return captions


# ---- writers ------------------------------------------------------------------------------------
def _token_list(tokens: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(t)) for t in tokens) + "]"


def _datetime_text(timestamps_ms: np.ndarray) -> np.ndarray:
    text = np.datetime_as_string(np.asarray(timestamps_ms, "datetime64[ms]"), unit="s")
    return np.char.replace(text.astype(str), "T", " ")


def _write_csv(path: str, columns: Sequence[str], data: Dict[str, Any]) -> int:
    import pandas as pd

    frame = pd.DataFrame({c: data[c] for c in columns})
    frame.to_csv(path, index=False, lineterminator="\n")
    return len(frame)


def _empty(n: int) -> np.ndarray:
    return np.full(n, "", object)


def write_kuaisar(logs: GeneratedLogs, output_dir: str, log=lambda m: None) -> Dict[str, Any]:
    """KuaiSAR CSV files + side file (module docstring, "KuaiSAR mapping"); returns counts."""
    from preprocessing import kuaisar

    for name, required in kuaisar.REQUIRED_COLUMNS.items():  # the reader's needs are covered
        assert set(required) <= set(KUAISAR_COLUMNS[name]), name
    os.makedirs(output_dir, exist_ok=True)
    user_code = np.arange(len(logs.user_ids)).astype(str)
    item_code = np.arange(len(logs.item_ids)).astype(str)
    counts: Dict[str, Any] = {}

    feed = np.flatnonzero(~logs.behaviour_search)
    n = len(feed)
    counts["feed_rows"] = _write_csv(os.path.join(output_dir, kuaisar.REC_INTER),
                                     KUAISAR_COLUMNS[kuaisar.REC_INTER], {
        "user_id": user_code[logs.behaviour_user[feed]],
        "item_id": item_code[logs.behaviour_item[feed]],
        "playing_time": np.rint(logs.behaviour_play_time_s[feed].astype(np.float64) * 1000
                                ).astype(np.int64),
        "duration_ms": np.rint(logs.item_duration_s[logs.behaviour_item[feed]].astype(np.float64)
                               * 1000).astype(np.int64),
        "time": _datetime_text(logs.behaviour_time[feed]),
        "timestamp": logs.behaviour_time[feed], "click": np.ones(n, np.int64),
        "forward": logs.behaviour_share[feed].astype(np.int64),
        "like": logs.behaviour_like[feed].astype(np.int64),
        "follow": logs.behaviour_follow[feed].astype(np.int64),
        "search": np.zeros(n, np.int64), "search_item_related": np.zeros(n, np.int64)})
    log(f"kuaisar: {kuaisar.REC_INTER}: {n:,} feed behaviours")

    request = logs.candidate_request
    session_ids = np.arange(len(logs.request_ids)).astype(str)
    keywords = np.asarray([_token_list(t) for t in logs.request_tokens], object)
    m = len(request)
    counts["search_rows"] = _write_csv(os.path.join(output_dir, kuaisar.SRC_INTER),
                                       KUAISAR_COLUMNS[kuaisar.SRC_INTER], {
        "user_id": user_code[logs.request_user[request]], "search_session_id": session_ids[request],
        "search_session_time": _datetime_text(logs.request_time)[request],
        "search_session_timestamp": logs.request_time[request], "keyword": keywords[request],
        "search_source": np.full(m, KUAISAR_SEARCH_SOURCE),
        "item_id": item_code[logs.candidate_item],
        "click_cnt": logs.candidate_click.astype(np.int64),
        "item_type": np.full(m, KUAISAR_ITEM_TYPE, object)})
    counts["search_sessions"] = len(session_ids)
    counts["search_clicks"] = int(logs.candidate_click.sum())
    counts["search_behaviours_not_written"] = int(logs.behaviour_search.sum())
    log(f"kuaisar: {kuaisar.SRC_INTER}: {len(session_ids):,} sessions, {m:,} shown candidates")

    captions = caption_tokens(logs)
    k = len(item_code)
    counts["items"] = _write_csv(os.path.join(output_dir, kuaisar.ITEM_FEATURES),
                                 KUAISAR_COLUMNS[kuaisar.ITEM_FEATURES], {
        "item_id": item_code, "caption": [_token_list(c) for c in captions],
        "author_id": logs.item_author, "item_type": np.full(k, KUAISAR_ITEM_TYPE, object),
        "upload_time": _empty(k), "upload_type": _empty(k),
        "first_level_category_id": logs.item_category_l1,
        "first_level_category_name": np.asarray(logs.category_l1_names, object)[
            logs.item_category_l1],
        "second_level_category_id": logs.item_category_l2,
        "second_level_category_name": np.asarray(logs.category_l2_names, object)[
            logs.item_category_l2],
        "third_level_category_id": _empty(k), "third_level_category_name": _empty(k),
        "fourth_level_category_id": _empty(k), "fourth_level_category_name": _empty(k)})
    requests_per_user = np.bincount(logs.request_user, minlength=len(user_code))
    counts["users"] = _write_csv(os.path.join(output_dir, kuaisar.USER_FEATURES),
                                 KUAISAR_COLUMNS[kuaisar.USER_FEATURES], {
        "user_id": user_code,
        "search_active_level": np.floor(np.log2(1 + requests_per_user)).astype(np.int64),
        "rec_active_level": logs.user_profile["activity_level"],
        "onehot_feat1": logs.user_profile["age_bucket"],
        "onehot_feat2": logs.user_profile["gender"]})
    log(f"kuaisar: {kuaisar.ITEM_FEATURES}: {k:,} items, {kuaisar.USER_FEATURES}: "
        f"{len(user_code):,} users")

    truth = truth_table(logs, session_ids[request], item_code[logs.candidate_item])
    pq.write_table(truth, os.path.join(output_dir, TRUTH_FILE))
    counts["truth_rows"] = truth.num_rows
    counts["requests_written"] = len(session_ids)
    counts["requests_dropped"] = 0
    return counts


def _engagement_types(logs: GeneratedLogs) -> np.ndarray:
    """JDsearch behaviour type of every behaviour (module docstring, "history")."""
    from preprocessing import jdsearch

    depth = jdsearch.ENGAGEMENT_BY_TYPE
    by_depth = sorted(depth, key=lambda behaviour_type: sum(depth[behaviour_type]))
    click, deep, cart, order = by_depth  # CLICK < FLW < CART < ORD
    return np.where(logs.behaviour_follow | logs.behaviour_share, order,
                    np.where(logs.behaviour_like, cart,
                             np.where(logs.behaviour_watch_ratio > syn.SHORT_WATCH_CAP, deep,
                                      click))).astype(object)


def write_jdsearch(logs: GeneratedLogs, output_dir: str, log=lambda m: None) -> Dict[str, Any]:
    """JDsearch text files + side file (module docstring, "JDsearch mapping"); returns counts."""
    from preprocessing import jdsearch

    os.makedirs(output_dir, exist_ok=True)
    sep, join = jdsearch.TERM_SEPARATOR, jdsearch.LIST_SEPARATOR.join
    grade_of = {label: grade for grade, label in
                ((1, "click"), (2, "long_view"), (3, "like"))}
    labels = np.select([logs.candidate_like, logs.candidate_long_view, logs.candidate_click],
                       [grade_of["like"], grade_of["long_view"], grade_of["click"]], 0)
    queries = [sep.join(str(int(t)) for t in tokens) for tokens in logs.request_tokens]
    types = _engagement_types(logs)
    item_code = np.arange(len(logs.item_ids)).astype(str)

    order = np.lexsort((np.arange(len(logs.behaviour_time)), logs.behaviour_time,
                        logs.behaviour_user))
    user_starts = np.searchsorted(logs.behaviour_user[order], np.arange(len(logs.user_ids) + 1))
    request_order = np.lexsort((np.arange(len(logs.request_ids)), logs.request_time,
                                logs.request_user))
    request_starts = np.searchsorted(logs.request_user[request_order],
                                     np.arange(len(logs.user_ids) + 1))
    offsets = logs.candidate_offsets
    counts = {"users": len(logs.user_ids), "lines": 0, "history_only_lines": 0,
              "requests_written": 0, "requests_dropped_not_last_of_user": 0,
              "history_behaviours": 0, "behaviours_after_last_request": 0,
              "search_behaviours_without_request": 0}
    truth_rows, truth_request_ids = [], []
    path = os.path.join(output_dir, jdsearch.BEHAVIOUR_FILES[0])
    last_report = time.time()
    with open(path, "w", newline="") as f:
        f.write("\t".join(jdsearch.BEHAVIOUR_COLUMNS) + "\n")
        line_number = 1
        for user in range(len(logs.user_ids)):
            behaviours = order[user_starts[user]:user_starts[user + 1]]
            requests = request_order[request_starts[user]:request_starts[user + 1]]
            test_request = int(requests[-1]) if len(requests) else None
            if test_request is not None:
                request_time = int(logs.request_time[test_request])
                history = behaviours[logs.behaviour_time[behaviours] < request_time]
                counts["requests_dropped_not_last_of_user"] += len(requests) - 1
                counts["behaviours_after_last_request"] += len(behaviours) - len(history)
            else:
                history = behaviours
            # the request each search behaviour clicked from: the latest earlier request of the
            # user that showed the item and had it clicked
            clicked_in: Dict[int, int] = {}
            next_request = 0
            history_queries = []
            for b in history:
                if not logs.behaviour_search[b]:
                    history_queries.append(jdsearch.NO_QUERY)
                    continue
                while (next_request < len(requests)
                       and logs.request_time[requests[next_request]] <= logs.behaviour_time[b]):
                    r = int(requests[next_request])
                    for c in range(offsets[r], offsets[r + 1]):
                        if logs.candidate_click[c]:
                            clicked_in[int(logs.candidate_item[c])] = r
                    next_request += 1
                r = clicked_in.get(int(logs.behaviour_item[b]))
                if r is None:
                    counts["search_behaviours_without_request"] += 1
                    history_queries.append(jdsearch.NO_QUERY)
                else:
                    history_queries.append(queries[r])
            times = logs.behaviour_time[history]
            start = int(times[0]) if len(times) else (
                request_time if test_request is not None else 0)
            seconds = (times - start) // jdsearch.TIME_UNIT_MS
            if test_request is not None:
                final = -(-(request_time - start) // jdsearch.TIME_UNIT_MS)  # rounded up
            else:
                final = int(seconds[-1]) if len(seconds) else 0  # no query: gap 0
            gaps = np.diff(np.concatenate([[0], seconds, [final]]))
            if test_request is None:
                cands, grades, query = [], [], ""
                counts["history_only_lines"] += 1
            else:
                span = slice(offsets[test_request], offsets[test_request + 1])
                cands = item_code[logs.candidate_item[span]]
                grades = labels[span]
                query = queries[test_request]
            line = "\t".join([
                query, join(cands), join(f"{float(g):.1f}" for g in grades),
                join(history_queries), join(item_code[logs.behaviour_item[history]]),
                join(types[history]), join(str(int(g)) for g in gaps)])
            line_number += 1
            parsed_request, parsed_behaviours, _ = jdsearch.parse_behaviour_line(line_number, line)
            if len(parsed_behaviours) != len(history) + int(logs.candidate_click[
                    offsets[test_request]:offsets[test_request + 1]].sum()
                    if test_request is not None else 0):
                raise AssertionError(f"line {line_number}: the reader parses a different history")
            if test_request is not None:
                truth_rows.append(np.arange(offsets[test_request], offsets[test_request + 1]))
                truth_request_ids += [parsed_request.request_id] * len(cands)
                counts["requests_written"] += 1
            counts["history_behaviours"] += len(history)
            f.write(line + "\n")
            counts["lines"] += 1
            if time.time() - last_report > 5:
                last_report = time.time()
                log(f"jdsearch: {user + 1:,}/{len(logs.user_ids):,} users written")
    log(f"jdsearch: {jdsearch.BEHAVIOUR_FILES[0]}: {counts['lines']:,} lines, "
        f"{counts['requests_written']:,} test queries, {counts['history_behaviours']:,} "
        "history behaviours")

    captions = caption_tokens(logs)
    with open(os.path.join(output_dir, jdsearch.PRODUCT_FILES[0]), "w", newline="") as f:
        f.write("\t".join(jdsearch.PRODUCT_COLUMNS) + "\n")
        for item, caption in enumerate(captions):
            row = dict.fromkeys(jdsearch.PRODUCT_COLUMNS, "")
            row.update(wid=item_code[item], name=sep.join(str(int(t)) for t in caption),
                       brand_id=str(logs.item_author[item]),
                       cate_id_1=str(logs.item_category_l1[item]),
                       cate_id_2=str(logs.item_category_l2[item]))
            f.write("\t".join(row[c] for c in jdsearch.PRODUCT_COLUMNS) + "\n")
    counts["items"] = len(captions)
    log(f"jdsearch: {jdsearch.PRODUCT_FILES[0]}: {len(captions):,} products")

    rows = np.concatenate(truth_rows) if truth_rows else np.zeros(0, np.int64)
    truth = truth_table(logs, np.asarray(truth_request_ids, object),
                        item_code[logs.candidate_item[rows]], rows)
    pq.write_table(truth, os.path.join(output_dir, TRUTH_FILE))
    counts["truth_rows"] = truth.num_rows
    return counts


def write_canonical_truth(logs: GeneratedLogs, output_dir: str, log=lambda m: None
                          ) -> Dict[str, Any]:
    """Only the side file, keyed by the canonical ids (the generated directory is the input)."""
    os.makedirs(output_dir, exist_ok=True)
    truth = truth_table(logs, logs.request_ids[logs.candidate_request],
                        logs.item_ids[logs.candidate_item])
    pq.write_table(truth, os.path.join(output_dir, TRUTH_FILE))
    return {"truth_rows": truth.num_rows, "requests_written": len(logs.request_ids),
            "requests_dropped": 0}


WRITERS: Dict[str, Callable[..., Dict[str, Any]]] = {
    "canonical": write_canonical_truth, "kuaisar": write_kuaisar, "jdsearch": write_jdsearch}


def convert(input_dir: str, output_dir: str, layout: str, progress: bool = False
            ) -> Dict[str, Any]:
    """Writes `layout` of the generated logs in `input_dir` to `output_dir`; returns the summary
    also written to SUMMARY_FILE."""
    if layout not in WRITERS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    log = (lambda m: print(f"[synthetic_layouts] {m}", file=sys.stderr, flush=True)) if progress \
        else (lambda m: None)
    started = time.time()
    logs = load_generated(input_dir)
    log(f"read {input_dir}: {len(logs.user_ids):,} users, {len(logs.item_ids):,} items, "
        f"{len(logs.behaviour_time):,} behaviours, {len(logs.request_ids):,} requests "
        f"({time.time() - started:.1f}s)")
    counts = WRITERS[layout](logs, output_dir, log)
    summary = {"layout": layout, "seed": logs.config["seed"],
               "generated": {"users": len(logs.user_ids), "items": len(logs.item_ids),
                             "behaviours": len(logs.behaviour_time),
                             "requests": len(logs.request_ids),
                             "candidates": len(logs.candidate_item)},
               "written": counts, "truth_file": TRUTH_FILE,
               "caption_config": dataclasses.asdict(CaptionConfig()) if layout != "canonical"
               else None}
    with open(os.path.join(output_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True, default=int)
    log(f"done in {time.time() - started:.1f}s -> {output_dir}")
    return summary


# ---- the oracle through a preprocessed dataset --------------------------------------------------
@dataclasses.dataclass
class OracleGauc:
    """Click GAUC by request of the true and the non-personalized probabilities on a split."""

    split: str
    oracle: float
    nonpersonalized_oracle: float
    requests: int
    candidates: int
    groups_used: int  # requests with a click and a non-click
    groups_skipped: int
    click_mismatches: int  # preprocessed label != side file label (should be 0)
    canonical_request_ids: Tuple[str, ...]


def read_examples(data_dir: str, splits: Sequence[str]) -> Iterable[Tuple[str, str, List[str],
                                                                        List[float]]]:
    """(split, request id, candidate item ids, click labels) of every preprocessed request."""
    import glob

    import tensorflow as tf

    from common import features as F

    items = [""] + F.read_vocabulary(data_dir, "items")
    label = F.label_feature(CLICK_TASK)
    for split in splits:
        files = sorted(glob.glob(F.tfrecord_pattern(data_dir, split)))
        for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
            feature = tf.train.Example.FromString(record.numpy()).features.feature
            yield (split, feature[F.REQUEST_ID].bytes_list.value[0].decode(),
                   [items[i] for i in feature[F.CANDIDATE_ITEM].int64_list.value],
                   list(feature[label].float_list.value))


def oracle_gauc(data_dir: str, truth_file: str, split: Union[str, Sequence[str]] = "test",
                canonical_request_ids: Optional[Iterable[str]] = None) -> OracleGauc:
    """Joins the side file to the preprocessed candidates of `split` (a split name, "all", or a
    list of names) and returns the oracle and non-personalized-oracle click GAUC by request.

    `canonical_request_ids` restricts the evaluation to those generated requests (to compare
    layouts on the same requests). Raises ValueError when a preprocessed candidate has no
    side-file row: an oracle over a partial join would be misleading."""
    from common import features as F
    from trainer.metrics import grouped_auc

    if split == "all":
        splits = list(F.SPLITS)
    else:
        splits = [split] if isinstance(split, str) else list(split)
    table = pq.read_table(truth_file)
    key = {(r, i): k for k, (r, i) in enumerate(zip(table.column("request_id").to_pylist(),
                                                    table.column("item_id").to_pylist()))}
    canonical = table.column("canonical_request_id").to_pylist()
    wanted = None if canonical_request_ids is None else set(canonical_request_ids)
    rows, groups, labels, unmatched, evaluated = [], [], [], [], []
    for _, request_id, items, clicks in read_examples(data_dir, splits):
        matched = [key.get((request_id, item)) for item in items]
        if any(m is None for m in matched):
            unmatched += [(request_id, item) for item, m in zip(items, matched) if m is None]
            continue
        if wanted is not None and canonical[matched[0]] not in wanted:
            continue
        evaluated.append(canonical[matched[0]])
        rows += matched
        groups += [request_id] * len(items)
        labels += clicks
    if unmatched:
        raise ValueError(f"{len(unmatched)} preprocessed candidates of {data_dir} have no row in "
                         f"{truth_file} (first: {unmatched[:3]}): is it the side file of the "
                         "layout that was preprocessed?")
    rows = np.asarray(rows, np.int64)
    labels = np.asarray(labels, np.float64)
    side_click = table.column("click").to_numpy()[rows] if len(rows) else np.zeros(0)
    oracle = grouped_auc(labels, table.column("p_click").to_numpy()[rows], groups)
    nonpersonalized = grouped_auc(
        labels, table.column("p_click_nonpersonalized").to_numpy()[rows], groups)
    return OracleGauc(split="+".join(splits), oracle=oracle.value,
                      nonpersonalized_oracle=nonpersonalized.value, requests=len(evaluated),
                      candidates=len(rows), groups_used=oracle.groups_used,
                      groups_skipped=oracle.groups_skipped,
                      click_mismatches=int(np.sum((labels > 0.5) != (side_click > 0))),
                      canonical_request_ids=tuple(evaluated))


# ---- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocessing.synthetic_layouts",
        description="Convert generated logs (the output of `python -m preprocessing.synthetic`, "
                    "with truth/) into KuaiSAR's or JDsearch's public layout, plus "
                    f"{TRUTH_FILE} (true and non-personalized p(click) of every shown candidate, "
                    "keyed like the preprocessed TFRecords). Or, with --oracle-gauc, report the "
                    "oracle and non-personalized-oracle click GAUC by request of a preprocessed "
                    "split. The mapping of every field is described below.",
        epilog=__doc__[__doc__.index("Ids."):], formatter_class=_HelpFormatter)
    p.add_argument("--input", help="generated directory (canonical files + truth/)")
    p.add_argument("--output", help="directory to write the layout and the side file into")
    p.add_argument("--layout", choices=LAYOUTS,
                   help="kuaisar / jdsearch: the public files + side file; canonical: only the "
                        "side file (preprocess the generated directory itself)")
    p.add_argument("--oracle-gauc", metavar="PREPROCESSED",
                   help="instead of converting: output directory of `python -m preprocessing` "
                        "to evaluate the oracle on (needs --truth)")
    p.add_argument("--truth", help=f"the side file ({TRUTH_FILE}) of the preprocessed layout")
    p.add_argument("--split", default="test", choices=("train", "eval", "test", "all"),
                   help="split to evaluate with --oracle-gauc")
    return p


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """Shows meaningful defaults and keeps the mapping text (epilog) as written."""


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.oracle_gauc:
            if not args.truth:
                parser.error("--oracle-gauc needs --truth (the side file of that layout)")
            result = dataclasses.asdict(oracle_gauc(args.oracle_gauc, args.truth, args.split))
            result.pop("canonical_request_ids")
            print(json.dumps(result, indent=2))
            return 0
        if not (args.input and args.output and args.layout):
            parser.error("converting needs --input, --output and --layout "
                         "(or use --oracle-gauc PREPROCESSED --truth FILE)")
        summary = convert(args.input, args.output, args.layout, progress=True)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True, default=int))
    return 0


if __name__ == "__main__":
    sys.exit(main())
