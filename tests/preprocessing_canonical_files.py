"""Tiny canonical raw-log directories (docs/ARCHITECTURE.md section 1) written by tests."""
import os
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DIM = 4
BASE_MS = 1_700_000_000_000


def _emb(seed: int, dim: int = DIM) -> List[float]:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def default_tables(num_items: int = 6, num_users: int = 2) -> Dict[str, List[Dict[str, Any]]]:
    items = [{"item_id": f"i{k}", "author_id": f"a{k % 3}", "category_l1": f"c{k % 2}",
              "category_l2": f"f{k % 3}", "duration_s": 10.0 + k, "embedding": _emb(k)}
             for k in range(num_items)]
    users = [{"user_id": f"u{k}", "age_bucket": "20-30", "gender": "f" if k % 2 else "m",
              "activity_level": "high", "city_tier": str(k)} for k in range(num_users)]
    behaviours, requests = [], []
    for u in range(num_users):
        for j in range(5):
            behaviours.append(behaviour(f"u{u}", f"i{(u + j) % num_items}", BASE_MS + j * 1000))
        for r in range(3):
            requests.append(request(f"r{u}_{r}", f"u{u}", BASE_MS + 2500 + r * 1000,
                                    [f"i{(u + r) % num_items}", f"i{(u + r + 1) % num_items}"]))
    return {"items": items, "users": users, "behaviours": behaviours, "requests": requests}


def behaviour(user: str, item: str, t: int, source: str = "feed", watch_ratio: float = 0.5,
              like: int = 0) -> Dict[str, Any]:
    return {"user_id": user, "item_id": item, "timestamp": t, "source": source,
            "watch_ratio": watch_ratio, "play_time_s": 5.0, "like": like, "follow": 0,
            "share": 0}


def request(rid: str, user: str, t: int, candidates: List[str], tokens=(3, 5),
            clicks: Optional[List[int]] = None, embedding=None) -> Dict[str, Any]:
    n = len(candidates)
    clicks = clicks if clicks is not None else [1] + [0] * (n - 1)
    return {"request_id": rid, "user_id": user, "timestamp": t, "query_tokens": list(tokens),
            "query_embedding": embedding if embedding is not None else _emb(100 + len(rid)),
            "candidate_item_ids": candidates, "click": clicks, "long_view": [0] * n,
            "like": [0] * n}


SCHEMAS = {
    "items": pa.schema([("item_id", pa.string()), ("author_id", pa.string()),
                        ("category_l1", pa.string()), ("category_l2", pa.string()),
                        ("duration_s", pa.float32()), ("embedding", pa.list_(pa.float32()))]),
    "users": pa.schema([("user_id", pa.string()), ("age_bucket", pa.string()),
                        ("gender", pa.string()), ("activity_level", pa.string()),
                        ("city_tier", pa.string())]),
    "behaviours": pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                             ("timestamp", pa.int64()), ("source", pa.string()),
                             ("watch_ratio", pa.float32()), ("play_time_s", pa.float32()),
                             ("like", pa.int8()), ("follow", pa.int8()), ("share", pa.int8())]),
    "requests": pa.schema([("request_id", pa.string()), ("user_id", pa.string()),
                           ("timestamp", pa.int64()), ("query_tokens", pa.list_(pa.int64())),
                           ("query_embedding", pa.list_(pa.float32())),
                           ("candidate_item_ids", pa.list_(pa.string())),
                           ("click", pa.list_(pa.int8())), ("long_view", pa.list_(pa.int8())),
                           ("like", pa.list_(pa.int8()))]),
    "query_vocab": pa.schema([("token_id", pa.int64()), ("word", pa.string()),
                              ("embedding", pa.list_(pa.float32()))]),
}


def write_canonical(directory: str, tables: Dict[str, List[Dict[str, Any]]],
                    query_vocab: bool = True) -> str:
    os.makedirs(directory, exist_ok=True)
    for name, rows in tables.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[name]),
                       os.path.join(directory, f"{name}.parquet"))
    if query_vocab and "query_vocab" not in tables:
        rows = [{"token_id": t, "word": f"w{t}", "embedding": _emb(1000 + t)} for t in range(8)]
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS["query_vocab"]),
                       os.path.join(directory, "query_vocab.parquet"))
    return directory
