"""The intermediate records every input reader produces, so one core pipeline serves all formats.

A reader (canonical, KuaiSAR, JDsearch) is a PTransform from an input directory to a dict of
PCollections with these keys:

  "items"        ItemRecord        one per item
  "users"        UserRecord        one per user with a profile (users without one still work)
  "behaviours"   BehaviourRecord   full-site behaviours, any order (the core sorts them)
  "requests"     RequestRecord     search requests with their shown candidates and labels
  "dead_letter"  DeadLetter        rows rejected by the reader, with the reason

The core pipeline (preprocessing/pipeline.py) builds vocabularies, joins each request with its
user's behaviours strictly before the request time, splits by time and writes TFRecords.

Every reader lists a request's candidates in the order they were shown when its log keeps that
order, and says so in `prepare`'s result (`display_order`, `display_order_source`, recorded in
metadata.json); the core then writes each candidate's display position.
"""
from typing import Dict, List, NamedTuple, Optional, Tuple


class ItemRecord(NamedTuple):
    item_id: str
    author_id: str  # "" when unknown
    categories: Tuple[str, ...]  # coarse to fine, up to common.features.NUM_CATEGORY_LEVELS
    embedding: Optional[Tuple[float, ...]]  # pretrained content embedding, None if not supplied
    tokens: Tuple[int, ...] = ()  # caption / title token ids (used to build embeddings)
    duration_s: Optional[float] = None  # video length in seconds, None if the log gives none


class UserRecord(NamedTuple):
    user_id: str
    profile: Tuple[str, ...]  # up to common.features.USER_PROFILE_DIM raw field values


class BehaviourRecord(NamedTuple):
    user_id: str
    item_id: str
    timestamp_ms: int
    source: int  # common.features.SOURCE_FEED / SOURCE_SEARCH / SOURCE_UNKNOWN
    engagement: Tuple[float, ...]  # common.features.ENGAGEMENT_DIM values, format-specific


class RequestRecord(NamedTuple):
    request_id: str
    user_id: str
    timestamp_ms: int
    query_tokens: Tuple[int, ...]
    query_embedding: Optional[Tuple[float, ...]]  # None when the pipeline must build it
    candidate_item_ids: Tuple[str, ...]
    labels: Dict[str, List[float]]  # task -> per-candidate 0/1 label
    true_probabilities: Optional[Dict[str, List[float]]] = None  # generated data only
    # 0-based position each candidate was shown at, when the log keeps the display order and
    # candidate_item_ids is not simply that order (e.g. a merged duplicate leaves a gap);
    # None: the list index (the reader lists the candidates in the order shown)
    candidate_positions: Optional[Tuple[int, ...]] = None


class DeadLetter(NamedTuple):
    source: str  # which file / stage rejected it
    reason: str  # short machine-countable reason, e.g. "nan_embedding", "unknown_item"
    row: str  # the offending row, as text, for inspection
