"""The generator's true click probability of any (request, item) pair, for retrieval
evaluation on generated data (preprocessing/synthetic.py writes the latent truth in
RAW/truth/).

The generator draws a click with

    p_click = sigmoid(click_bias + relevance_effect * rel + affinity_effect * aff + quality_i)

rel = [topic of item == query topic of the request], aff = rel and [subtopic of item ==
the user's preferred subtopic of the query topic] (module docstring of preprocessing/synthetic.py).
The same formula over every item of the corpus gives the oracle retriever (the corpus ranked by
p_click) and the expected clicks any retrieved list captures.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Sequence

import numpy as np


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class ClickOracle:
    """p(click) of (request, item index) pairs from RAW/truth/ and the item vocabulary."""

    def __init__(self, config: Dict[str, float], item_topic: np.ndarray,
                 item_subtopic: np.ndarray, item_quality: np.ndarray,
                 request_topic: Dict[str, int], request_user: Dict[str, str],
                 preferred: Dict[tuple, int]):
        self.config = config
        self.item_topic = item_topic  # [num_items + 1], row 0 (unknown) = -1
        self.item_subtopic = item_subtopic
        self.item_quality = item_quality
        self.request_topic = request_topic
        self.request_user = request_user
        self.preferred = preferred  # (user_id, topic) -> preferred subtopic

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
        requests = pq.read_table(os.path.join(truth, "requests.parquet"),
                                 columns=["request_id", "user_id", "query_topic"]).to_pydict()
        interests = pq.read_table(os.path.join(truth, "user_interests.parquet"),
                                  columns=["user_id", "topic", "preferred_subtopic"]).to_pydict()
        return cls(config, topic, subtopic, quality,
                   dict(zip(requests["request_id"], requests["query_topic"])),
                   dict(zip(requests["request_id"], requests["user_id"])),
                   {(u, t): s for u, t, s in zip(interests["user_id"], interests["topic"],
                                                 interests["preferred_subtopic"])})

    def click_probability(self, request_ids: Sequence[str]) -> np.ndarray:
        """float64 [R, num_items + 1]: p(click) of every item for each request (column 0 = 0)."""
        c = self.config
        out = np.zeros((len(request_ids), self.item_topic.shape[0]), np.float64)
        known = self.item_topic >= 0
        for r, request_id in enumerate(request_ids):
            topic = self.request_topic[request_id]
            preferred = self.preferred.get((self.request_user[request_id], topic), -1)
            rel = self.item_topic == topic
            aff = rel & (self.item_subtopic == preferred)
            p = _sigmoid(c["click_bias"] + c["relevance_effect"] * rel
                         + c["affinity_effect"] * aff + self.item_quality)
            out[r] = np.where(known, p, 0.0)
        return out
