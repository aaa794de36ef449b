"""The generator's true click probability of any (request, item) pair, for retrieval
evaluation on generated data (preprocessing/synthetic.py writes the latent truth in
RAW/truth/).

The generator draws a click with

    p_click = sigmoid(click_bias + relevance_effect * rel + affinity_effect * aff + quality_i)

rel = [topic of item == query topic of the request], aff = rel and [subtopic of item ==
the user's preferred subtopic of the query topic] (module docstring of preprocessing/synthetic.py).
The same formula over every item of the corpus gives the oracle retriever (the corpus ranked by
p_click) and the expected clicks any retrieved list captures.

`ClickOracle.truth` extends it to the other true values of any (request, item) pair, with the
generator's own functions (`preprocessing.synthetic.search_engagement` and
`expected_play_time`): p(long view) = p_click * sigmoid(long_view_bias + long_view_affinity *
aff + q_i), p(like) likewise, and the expected play time p_click * duration * (c_long * E[deep
ratio] + (1 - c_long) * E[short ratio]) with the item's duration from RAW/items.parquet. On the
shown candidates these equal the generator's stored `p_click`, `p_long_view`, `p_like` and
`expected_play_time_s` (up to float32 rounding: the stored item quality is float32).
"""
from __future__ import annotations

import json
import os
import types
from typing import Dict, Optional, Sequence

import numpy as np


class ClickOracle:
    """p(click) of (request, item index) pairs from RAW/truth/ and the item vocabulary."""

    def __init__(self, config: Dict[str, float], item_topic: np.ndarray,
                 item_subtopic: np.ndarray, item_quality: np.ndarray,
                 request_topic: Dict[str, int], request_user: Dict[str, str],
                 preferred: Dict[tuple, int], item_duration: Optional[np.ndarray] = None):
        self.config = config
        # the generator's parameters as attributes, for preprocessing.synthetic's functions
        self.generator = types.SimpleNamespace(**config)
        self.item_topic = item_topic  # [num_items + 1], row 0 (unknown) = -1
        self.item_subtopic = item_subtopic
        self.item_quality = item_quality
        self.request_topic = request_topic
        self.request_user = request_user
        self.preferred = preferred  # (user_id, topic) -> preferred subtopic
        self.item_duration = item_duration  # [num_items + 1] seconds (RAW/items.parquet)

    @classmethod
    def from_raw(cls, raw_dir: str, item_vocabulary: Sequence[str]) -> "ClickOracle":
        """RAW = the generator's output folder; item_vocabulary = vocab/items.txt lines."""
        import pyarrow.parquet as pq

        truth = os.path.join(raw_dir, "truth")
        if not os.path.exists(os.path.join(truth, "generator.json")):
            raise FileNotFoundError(f"{truth}/generator.json not found: --raw must be the "
                                    "output folder of `python -m preprocessing.synthetic`")
        with open(os.path.join(truth, "generator.json")) as f:
            config = json.load(f)["config"]
        items = pq.read_table(os.path.join(truth, "items.parquet"),
                              columns=["item_id", "topic", "subtopic", "quality"]).to_pydict()
        position = {raw: k for k, raw in enumerate(items["item_id"])}
        n = len(item_vocabulary) + 1
        topic = np.full(n, -1, np.int64)
        subtopic = np.full(n, -1, np.int64)
        quality = np.zeros(n, np.float64)
        for index, raw in enumerate(item_vocabulary, start=1):
            k = position.get(raw)
            if k is not None:
                topic[index], subtopic[index] = items["topic"][k], items["subtopic"][k]
                quality[index] = items["quality"][k]
        duration = None
        if os.path.exists(os.path.join(raw_dir, "items.parquet")):
            raw_items = pq.read_table(os.path.join(raw_dir, "items.parquet"),
                                      columns=["item_id", "duration_s"]).to_pydict()
            seconds = dict(zip(raw_items["item_id"], raw_items["duration_s"]))
            duration = np.zeros(n, np.float32)
            for index, raw in enumerate(item_vocabulary, start=1):
                duration[index] = seconds.get(raw, 0.0)
        requests = pq.read_table(os.path.join(truth, "requests.parquet"),
                                 columns=["request_id", "user_id", "query_topic"]).to_pydict()
        interests = pq.read_table(os.path.join(truth, "user_interests.parquet"),
                                  columns=["user_id", "topic", "preferred_subtopic"]).to_pydict()
        return cls(config, topic, subtopic, quality,
                   dict(zip(requests["request_id"], requests["query_topic"])),
                   dict(zip(requests["request_id"], requests["user_id"])),
                   {(u, t): s for u, t, s in zip(interests["user_id"], interests["topic"],
                                                 interests["preferred_subtopic"])},
                   duration)

    def _relevance(self, request_id: str, items: np.ndarray):
        """(rel, aff) of items (vocabulary indices) for one request."""
        topic = self.request_topic[request_id]
        preferred = self.preferred.get((self.request_user[request_id], topic), -1)
        rel = self.item_topic[items] == topic
        return rel, rel & (self.item_subtopic[items] == preferred)

    def click_probability(self, request_ids: Sequence[str]) -> np.ndarray:
        """float64 [R, num_items + 1]: p(click) of every item for each request (column 0 = 0)."""
        from preprocessing.synthetic import search_click_probability

        out = np.zeros((len(request_ids), self.item_topic.shape[0]), np.float64)
        known = self.item_topic >= 0
        every = np.arange(self.item_topic.shape[0])
        for r, request_id in enumerate(request_ids):
            rel, aff = self._relevance(request_id, every)
            p = search_click_probability(self.generator, rel, aff, self.item_quality)
            out[r] = np.where(known, p, 0.0)
        return out

    def truth(self, request_ids: Sequence[str], items) -> Dict[str, np.ndarray]:
        """The true values of (request, item) pairs: `items` int [R, N] vocabulary indices (row r
        for request_ids[r]); float64 [R, N] per task name: click (p_click), long_view, like
        (unconditional probabilities, as the model's heads) and watch_time (expected play time
        in seconds). Unknown items (index 0, or not in the truth) get 0 everywhere."""
        from common import features as F
        from preprocessing.synthetic import expected_play_time, search_engagement

        if self.item_duration is None:
            raise FileNotFoundError("the expected play time needs the item durations of "
                                    "RAW/items.parquet, next to RAW/truth/")
        items = np.asarray(items, np.int64)
        if items.ndim != 2 or items.shape[0] != len(request_ids):
            raise ValueError(f"items must be [R = {len(request_ids)}, N], got {items.shape}")
        out = {t: np.zeros(items.shape, np.float64)
               for t in ("click", "long_view", "like", F.WATCH_TIME)}
        for r, request_id in enumerate(request_ids):
            row = items[r]
            known = (row > 0) & (self.item_topic[row] >= 0)
            rel, aff = self._relevance(request_id, row)
            p_click, c_long, c_like = search_engagement(self.generator, rel, aff,
                                                        self.item_quality[row])
            watch = expected_play_time(p_click, c_long,
                                       self.item_duration[row].astype(np.float64))
            for task, value in (("click", p_click), ("long_view", p_click * c_long),
                                ("like", p_click * c_like), (F.WATCH_TIME, watch)):
                out[task][r] = np.where(known, value, 0.0)
        return out
