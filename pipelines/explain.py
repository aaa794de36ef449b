"""A search result as a reader sees it: readable items, the distinct past behaviours that drove
each score with their relevance to the query and the user's engagement, and the notes.

`explain(result, store, catalogue)` takes what `serving.search.Searcher.search` returns and
adds, from the feature store and the raw item table, what the result carries only as ids:

* each item as "i0042 (cooking / format_2, author a0017)", plus its title or caption when the
  raw items have one;
* drivers (the long-term behaviours QIN's RSU attended to) merged per item: the same item
  watched twice is one line with its summed attention weight and the number of views; each
  with its content similarity to the result item (what RSU stage 2 selects by; the drivers
  come ordered by attention x that similarity), the cosine of its content embedding and the
  query embedding (the relevance RSU stage 1 ranks by) and the user's engagement with it
  (watch ratio, like, follow, share);
* QRCF's seed behaviours merged per item likewise (with their number of views);
* the notes of the search (unknown query words, unknown user or empty history) and how many
  distinct behaviours explain the whole list.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

CATALOGUE_COLUMNS = ("item_id", "category_l1", "category_l2", "author_id", "title", "caption")


def load_catalogue(raw_dir: str) -> Dict[str, Dict[str, str]]:
    """item_id -> readable fields of the raw items.parquet (whichever of CATALOGUE_COLUMNS it
    has); empty when the raw logs have no item table."""
    import pyarrow.parquet as pq

    path = os.path.join(raw_dir, "items.parquet")
    if not os.path.exists(path):
        return {}
    present = [c for c in CATALOGUE_COLUMNS if c in pq.read_schema(path).names]
    table = pq.read_table(path, columns=present).to_pydict()
    return {str(item): {c: str(table[c][i]) for c in present if c != "item_id"}
            for i, item in enumerate(table["item_id"])}


def describe_item(item_id: str, catalogue: Mapping[str, Mapping[str, str]]) -> str:
    fields = catalogue.get(item_id, {})
    category = " / ".join(fields[c] for c in ("category_l1", "category_l2") if fields.get(c))
    parts = [p for p in (category, f"author {fields['author_id']}" if fields.get("author_id")
                         else "") if p]
    text = f"{item_id} ({', '.join(parts)})" if parts else item_id
    title = fields.get("title") or fields.get("caption")
    return f'{text} "{title}"' if title else text


def describe_engagement(values: Sequence[float], names: Sequence[str]) -> str:
    """"watched 92%, liked" for canonical engagement; other names as name=value."""
    words = []
    for name, value in zip(names, values):
        value = float(value)
        if name == "watch_ratio":
            words.append(f"watched {value:.0%}")
        elif name in ("like", "follow", "share", "forward"):
            if value >= 0.5:
                words.append({"like": "liked", "follow": "followed", "share": "shared",
                              "forward": "forwarded"}[name])
        elif value:
            words.append(f"{name}={value:g}")
    return ", ".join(words) or "no engagement"


def _ago(seconds: Optional[float]) -> str:
    if seconds is None:
        return "time unknown"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


def distinct_drivers(drivers) -> List[Dict]:
    """Drivers merged per item (summed weight and views, the most recent view, the similarity
    to the result item), in the order the search gave them (`serving.client.candidate_drivers`:
    attention x similarity to the item); merging is a no-op on drivers already distinct."""
    merged: Dict[str, Dict] = {}
    for d in drivers:
        entry = merged.setdefault(d.item_id, {"item_id": d.item_id, "weight": 0.0, "views": 0,
                                              "seconds_before": d.seconds_before,
                                              "target_similarity": d.target_similarity})
        entry["weight"] += float(d.weight)
        entry["views"] += int(d.views)
        entry["seconds_before"] = min(entry["seconds_before"], d.seconds_before)
    return list(merged.values())


def distinct_seeds(seeds) -> List:
    """QRCF seeds merged per item, in their order: [(first seed of the item, behaviours)]."""
    merged: Dict[str, List] = {}
    for seed in seeds:
        entry = merged.setdefault(seed.item_id, [seed, 0])
        entry[1] += 1
    return [tuple(entry) for entry in merged.values()]


class BehaviourLookup:
    """The user's behaviours before the request, by (item id, time), with the query relevance
    of their items."""

    def __init__(self, store, user_id: str, now_ms: int, query_embedding: np.ndarray):
        self.rows = store.behaviours_before(user_id, now_ms) if user_id else None
        self.now_ms = now_ms
        self.query = np.asarray(query_embedding, np.float32).reshape(-1)
        self.table = store.item_embeddings()
        self.store = store
        self.names = tuple(store.metadata().engagement_names)

    def engagement(self, item_id: str, seconds_before: float) -> Optional[np.ndarray]:
        if self.rows is None or not len(self.rows["item_id"]):
            return None
        at = self.now_ms - seconds_before * 1000.0
        same = np.flatnonzero(self.rows["item_id"] == item_id)
        if not len(same):
            return None
        nearest = same[np.argmin(np.abs(self.rows["timestamp_ms"][same] - at))]
        return self.rows["engagement"][nearest]

    def relevance(self, item_id: str) -> Optional[float]:
        index = int(self.store.item_index([item_id])[0])
        if index <= 0 or index >= len(self.table):
            return None
        return _cosine(self.table[index], self.query)


def explain(result, store, catalogue: Mapping[str, Mapping[str, str]], tasks_shown: int = 3
            ) -> str:
    """The readable ranked list of a `serving.search.SearchResult` (module docstring)."""
    _, query_embedding = store.encode_query(result.query)
    lookup = BehaviourLookup(store, result.user_id, result.now_ms, query_embedding)
    lines = [f"query {result.query!r}, user {result.user_id!r}: {len(result.items)} results "
             f"({'personalized' if result.personalized else 'non-personalized'} retrieval, "
             f"{result.counts.get('candidates', 0)} candidates ranked by model version "
             f"{result.model_version}, {result.timings_ms.get('total', 0.0):.0f} ms)"]
    lines += [f"  note: {note}" for note in result.notes]
    everywhere: Dict[str, int] = {}
    for rank, item in enumerate(result.items, 1):
        relevance = lookup.relevance(item.item_id)
        probabilities = ", ".join(f"p({t}) {v:.2f}" for t, v in
                                  list(item.task_scores.items())[:tasks_shown])
        found = ", ".join(f"{s} #{h.rank + 1}" for s, h in item.sources.items())
        lines.append(f"  {rank}. {describe_item(item.item_id, catalogue)}")
        lines.append(f"     score {item.score:.3f} ({probabilities}); query match "
                     f"{'n/a' if relevance is None else f'{relevance:.2f}'}; found by {found}")
        seeds = distinct_seeds(item.qrcf_seeds)
        if seeds:
            lines.append("     retrieved through " + "; ".join(
                f"{describe_item(seed.item_id, catalogue)} (query relevance "
                f"{seed.relevance:.2f}" + (f", {n} views" if n > 1 else "") + ")"
                for seed, n in seeds))
        drivers = distinct_drivers(item.drivers)
        if not drivers:
            lines.append("     drivers: none (no long-term behaviour attended to)")
        for d in drivers:
            everywhere[d["item_id"]] = everywhere.get(d["item_id"], 0) + 1
            behaviour_relevance = lookup.relevance(d["item_id"])
            engagement = lookup.engagement(d["item_id"], d["seconds_before"])
            views = f", {d['views']} views" if d["views"] > 1 else ""
            lines.append(
                f"     because of {describe_item(d['item_id'], catalogue)}: attention "
                f"{d['weight']:.2f}{views}, "
                + ("" if d["target_similarity"] is None
                   else f"similar to this item {d['target_similarity']:.2f}, ")
                + "query relevance "
                f"{'n/a' if behaviour_relevance is None else f'{behaviour_relevance:.2f}'}, "
                + (describe_engagement(engagement, lookup.names) if engagement is not None
                   else "engagement unknown")
                + f", {_ago(d['seconds_before'])}")
    if everywhere:
        shared = sorted((n, i) for i, n in everywhere.items() if n > 1)
        lines.append(f"  {len(everywhere)} distinct behaviour(s) explain the {len(result.items)}"
                     " results" + ("; behind several results: " + ", ".join(
                         f"{i} ({n})" for n, i in reversed(shared)) if shared else ""))
    return "\n".join(lines)
