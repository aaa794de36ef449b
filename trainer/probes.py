"""Mechanism probes: does each of QIN's mechanisms find what the generator planted?

On generated logs (`python -m preprocessing.synthetic`, which keeps its latent truth in
`RAW/truth/`) the truth says, for every item, its topic and subtopic, for every user the
preferred subtopic of each interest topic, and for every request its query topic. So each step
of QIN can be checked against what it is meant to find, on the requests of a split:

* **stage-1 precision**: share of the K1 behaviours RSU stage 1 keeps (top-K1 by cosine of the
  query embedding, `common.relevance.stage1_top_k`) that are in the query's topic, against the
  K1 most recent behaviours (a recency selection) and against the history as a whole;
* **stage-2 precision**: for candidates of the query's topic, share of the K2 behaviours stage 2
  keeps (top-K2 of stage 1 by cosine to the candidate) that are in the candidate's subtopic,
  against that subtopic's share of stage 1;
* **embedding separation**: share of each item's 10 nearest items (content cosine) in its
  topic, and, among those, in its subtopic; chance levels are 1 / topics and 1 / subtopics;
* with `--model-dir` (a trained QIN): **attention mass** on deep-engaged behaviours of the
  user's preferred subtopic, for candidates of the preferred subtopic of the query topic (the
  behaviours that carry the planted affinity), from the model's `rsu_selected_index` /
  `rsu_selected_weight`, against their share of the selected behaviours.

    python -m trainer.probes --data OUT --raw RAW [--model-dir M] [--split test]

prints a table and writes `--output` (JSON) when given. Stage 1 and 2 are computed with the
model's K1 / K2 (`--k1`, `--k2`, by default the model's or `ModelConfig`'s).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional

DEEP_WATCH_RATIO = 0.8  # the generator's deep engagement: watched to at least 80 %


def _truth(raw_dir: str):
    import pandas as pd

    truth = os.path.join(raw_dir, "truth")
    if not os.path.isdir(truth):
        raise FileNotFoundError(f"{truth} not found: --raw must be the output directory of "
                                "`python -m preprocessing.synthetic` (it keeps the latent truth)")
    items = pd.read_parquet(os.path.join(truth, "items.parquet"))
    interests = pd.read_parquet(os.path.join(truth, "user_interests.parquet"))
    requests = pd.read_parquet(os.path.join(truth, "requests.parquet"))
    return items, interests, requests


def embedding_separation(embeddings, topic, subtopic, neighbours: int = 10) -> Dict[str, float]:
    """Share of each item's nearest items (cosine) in its topic, and in its subtopic among
    those of its topic (items with index >= 1; row 0 is the unknown item)."""
    import numpy as np

    emb = np.asarray(embeddings[1:], np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = emb / np.maximum(norms, 1e-12)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1)[:, :neighbours]
    t, s = np.asarray(topic[1:]), np.asarray(subtopic[1:])
    same_topic = t[nearest] == t[:, None]
    same_sub = same_topic & (s[nearest] == s[:, None])
    return {"topic_purity@10": float(same_topic.mean()),
            "subtopic_purity_within_topic@10": float(same_sub.sum() / max(same_topic.sum(), 1))}


def run(args) -> Dict[str, object]:
    import numpy as np

    from common import features as F
    from common.relevance import cosine_to_query, stage1_top_k
    from trainer import data as D
    from trainer.config import ModelConfig

    metadata = F.DatasetMetadata.load(args.data)
    if metadata.long_term_mode != "recent":
        raise ValueError("probes read stage 1 from the full recent sequence: preprocess with "
                         "--long-term-mode recent")
    table = np.load(os.path.join(args.data, F.ITEM_EMBEDDINGS_FILE))
    items, interests, requests = _truth(args.raw)
    vocab = F.read_vocabulary(args.data, "items")
    by_id = items.set_index("item_id")
    topic = np.full(len(vocab) + 1, -1)
    subtopic = np.full(len(vocab) + 1, -1)
    topic[1:] = by_id.loc[vocab, "topic"].to_numpy()
    subtopic[1:] = by_id.loc[vocab, "subtopic"].to_numpy()
    preferred = {(u, int(t)): int(s) for u, t, s in zip(
        interests["user_id"], interests["topic"], interests["preferred_subtopic"])}
    query_topic = dict(zip(requests["request_id"], requests["query_topic"]))

    model, config = None, ModelConfig()
    if args.model_dir:
        from trainer.model import load_trained_model

        config = ModelConfig.load(args.model_dir).resolved_for(metadata)
        model = load_trained_model(args.model_dir, args.data)
    k1 = args.k1 or config.resolved_for(metadata).k1
    k2 = args.k2 or config.k2

    sums = {name: [] for name in ("stage1_precision", "recency_precision", "history_topic_share",
                                  "stage2_precision", "stage1_subtopic_share",
                                  "attention_on_planted", "planted_share_of_selected")}
    seen = 0
    for batch in D.make_dataset(args.data, args.split, metadata, 64, for_training=False):
        out = model(batch, training=False) if model is not None else None
        b = {k: v.numpy() for k, v in batch.items()}
        for r in range(b[F.REQUEST_ID].shape[0]):
            if args.max_requests and seen >= args.max_requests:
                break
            seen += 1
            rid, user = b[F.REQUEST_ID][r].decode(), b[F.USER_ID][r].decode()
            q_topic = int(query_topic[rid])
            n = int(b[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)][r])
            if n == 0:
                continue
            seq = b[F.seq_feature(F.LONG_TERM, F.SEQ_ITEM)][r][:n]
            watch = b[F.seq_feature(F.LONG_TERM, F.SEQ_ENGAGEMENT)][r][:n, 0]
            kept = stage1_top_k(b[F.QUERY_EMBEDDING][r], table[seq], k1)
            sums["stage1_precision"].append(np.mean(topic[seq[kept]] == q_topic))
            sums["recency_precision"].append(np.mean(topic[seq[:k1]] == q_topic))
            sums["history_topic_share"].append(np.mean(topic[seq] == q_topic))
            pref = preferred.get((user, q_topic))
            planted = (topic[seq] == q_topic) & (subtopic[seq] == pref) & \
                (watch >= DEEP_WATCH_RATIO)
            cands = b[F.CANDIDATE_ITEM][r][:int(b[F.NUM_CANDIDATES][r])]
            for c, item in enumerate(cands):
                if topic[item] != q_topic or len(kept) == 0:
                    continue
                cos = cosine_to_query(table[item], table[seq[kept]])
                second = kept[np.argsort(-cos, kind="stable")[:k2]]
                sums["stage2_precision"].append(np.mean(subtopic[seq[second]] == subtopic[item]))
                sums["stage1_subtopic_share"].append(np.mean(subtopic[seq[kept]] ==
                                                             subtopic[item]))
                if out is not None and pref is not None and subtopic[item] == pref:
                    positions = out[F.RSU_SELECTED_INDEX].numpy()[r, c]
                    weights = out[F.RSU_SELECTED_WEIGHT].numpy()[r, c]
                    valid = (positions >= 0) & (positions < n)
                    if valid.any():
                        hit = planted[positions[valid]]
                        sums["attention_on_planted"].append(float(weights[valid][hit].sum()))
                        sums["planted_share_of_selected"].append(float(hit.mean()))
        if args.max_requests and seen >= args.max_requests:
            break
    result: Dict[str, object] = {
        "split": args.split, "requests": seen, "k1": k1, "k2": k2,
        "probes": {k: (float(np.mean(v)) if v else None) for k, v in sums.items()},
        "embeddings": embedding_separation(table, topic, subtopic),
        "chance": {"topic": 1.0 / max(len(set(items["topic"])), 1),
                   "subtopic": 1.0 / max(len(set(items["subtopic"])), 1)},
    }
    return result


def to_markdown(result: Dict[str, object]) -> str:
    p, e, c = result["probes"], result["embeddings"], result["chance"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [
        ("stage 1: share in the query topic (top-K1 by query cosine)", p["stage1_precision"],
         f"recency {fmt(p['recency_precision'])}, whole history "
         f"{fmt(p['history_topic_share'])}"),
        ("stage 2: share in the candidate's subtopic (query-topic candidates)",
         p["stage2_precision"], f"its share of stage 1 {fmt(p['stage1_subtopic_share'])}"),
        ("attention on deep-engaged behaviours of the preferred subtopic",
         p["attention_on_planted"], f"their share of the selected "
                                    f"{fmt(p['planted_share_of_selected'])}"),
        ("content space: 10 nearest items in the same topic", e["topic_purity@10"],
         f"chance {fmt(c['topic'])}"),
        ("content space: same subtopic among those of the topic",
         e["subtopic_purity_within_topic@10"], f"chance {fmt(c['subtopic'])}"),
    ]
    lines = [f"Mechanism probes on {result['split']} ({result['requests']} requests, "
             f"K1 = {result['k1']}, K2 = {result['k2']})", "",
             "| probe | value | reference |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(value)} | {ref} |" for name, value, ref in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from common.cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="python -m trainer.probes", formatter_class=HelpFormatter,
        description="Check QIN's mechanisms against the generator's truth: stage-1 and stage-2 "
                    "precision, the content space's topic and subtopic separation, and (with "
                    "a trained model) the attention mass on the behaviours that carry the "
                    "planted affinity.")
    p.add_argument("--data", required=True,
                   help="preprocessing output of generated logs (recent long-term mode)")
    p.add_argument("--raw", required=True,
                   help="the generator's output directory (its truth/ folder is read)")
    p.add_argument("--model-dir", help="a trained QIN model directory (adds attention probes)")
    p.add_argument("--split", default="test", choices=("train", "eval", "test"))
    p.add_argument("--k1", type=int, help="stage-1 size (default: the model's K1)")
    p.add_argument("--k2", type=int, help="stage-2 size (default: the model's K2)")
    p.add_argument("--max-requests", type=int, default=0, help="0: every request of the split")
    p.add_argument("--output", help="write the probes as JSON here")
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_markdown(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
