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
* **affinity in the selection**: for candidates of the query's topic, the share of deep-engaged
  behaviours among the K2 stage 2 keeps, as a score for "the candidate is in the user's
  preferred subtopic" (AUC; 0.5 = no signal): how much of the planted affinity a model reading
  the selection's engagement could find;
* with `--model-dir` (a trained QIN): **attention mass** on deep-engaged behaviours of the
  user's preferred subtopic, for candidates of the preferred subtopic of the query topic (the
  behaviours that carry the planted affinity), from the model's `rsu_selected_index` /
  `rsu_selected_weight`, against their share of the selected behaviours;
* with `--model-dir` (any preset): **where the click logit comes from**: a least-squares fit,
  within each request (values minus the request's mean), of the model's click logit on the
  generator's three click terms, rel (candidate in the query topic), aff (rel and in the user's
  preferred subtopic) and q (item quality), next to the truth's own coefficients
  (`relevance_effect`, `affinity_effect`, 1). A term the model follows at a fraction of the
  truth's weight is a signal it did not learn (or could not see).

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

from preprocessing.synthetic import DEEP_WATCH_MIN_RATIO as DEEP_WATCH_RATIO


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


def logit_decomposition(groups, logits, terms: Dict[str, object]) -> Dict[str, float]:
    """Least squares of `logits` on the columns of `terms` after subtracting each group's mean
    from every variable (request fixed effects): {term: coefficient, "r2": share of the
    within-group variance explained}."""
    import numpy as np

    groups = np.asarray(groups)
    _, index = np.unique(groups, return_inverse=True)
    counts = np.bincount(index).astype(np.float64)

    def within(values):
        values = np.asarray(values, np.float64)
        return values - (np.bincount(index, values) / counts)[index]

    names = list(terms)
    x = np.stack([within(terms[name]) for name in names], axis=1)
    y = within(logits)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    total = float(np.sum(y * y))
    out = {name: float(c) for name, c in zip(names, coef)}
    out["r2"] = 1.0 - float(np.sum(residual * residual)) / total if total > 0 else 0.0
    return out


def _auc(labels, scores):
    """`trainer.metrics.auc`, with None (JSON null) instead of NaN when one class is absent."""
    import math

    from trainer.metrics import auc

    value = auc(labels, scores)
    return None if math.isnan(value) else value


def _generator_effects(raw_dir: str) -> Dict[str, float]:
    path = os.path.join(raw_dir, "truth", "generator.json")
    with open(path) as f:
        config = json.load(f)["config"]
    return {"rel": float(config["relevance_effect"]), "aff": float(config["affinity_effect"]),
            "q": 1.0}


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
    quality = np.zeros(len(vocab) + 1)
    quality[1:] = by_id.loc[vocab, "quality"].to_numpy()

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
    affinity_signal = {"aff": [], "deep_share": []}
    decomposition = {"request": [], "logit": [], "rel": [], "aff": [], "q": []}
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
            cands = b[F.CANDIDATE_ITEM][r][:int(b[F.NUM_CANDIDATES][r])]
            pref = preferred.get((user, q_topic))
            if out is not None:
                click = np.clip(out["click"].numpy()[r, :len(cands)], 1e-6, 1 - 1e-6)
                rel = topic[cands] == q_topic
                decomposition["request"] += [rid] * len(cands)
                decomposition["logit"] += np.log(click / (1 - click)).tolist()
                decomposition["rel"] += rel.astype(float).tolist()
                decomposition["aff"] += (rel & (subtopic[cands] == pref)).astype(float).tolist()
                decomposition["q"] += quality[cands].tolist()
            kept = stage1_top_k(b[F.QUERY_EMBEDDING][r], table[seq], k1)
            sums["stage1_precision"].append(np.mean(topic[seq[kept]] == q_topic))
            sums["recency_precision"].append(np.mean(topic[seq[:k1]] == q_topic))
            sums["history_topic_share"].append(np.mean(topic[seq] == q_topic))
            planted = (topic[seq] == q_topic) & (subtopic[seq] == pref) & \
                (watch >= DEEP_WATCH_RATIO)
            for c, item in enumerate(cands):
                if topic[item] != q_topic or len(kept) == 0:
                    continue
                cos = cosine_to_query(table[item], table[seq[kept]])
                second = kept[np.argsort(-cos, kind="stable")[:k2]]
                sums["stage2_precision"].append(np.mean(subtopic[seq[second]] == subtopic[item]))
                sums["stage1_subtopic_share"].append(np.mean(subtopic[seq[kept]] ==
                                                             subtopic[item]))
                if pref is not None:
                    affinity_signal["aff"].append(subtopic[item] == pref)
                    affinity_signal["deep_share"].append(
                        float(np.mean(watch[second] >= DEEP_WATCH_RATIO)))
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
        "affinity_auc_of_stage2_deep_share": _auc(affinity_signal["aff"],
                                                  affinity_signal["deep_share"]),
    }
    if decomposition["request"]:
        fitted = logit_decomposition(decomposition["request"], decomposition["logit"],
                                     {t: decomposition[t] for t in ("rel", "aff", "q")})
        truth = _generator_effects(args.raw)
        result["click_logit_decomposition"] = {
            "model": fitted, "truth": truth,
            "share_of_truth": {t: fitted[t] / truth[t] for t in truth},
            "candidates": len(decomposition["logit"])}
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
    rows.append(("stage 2: deep-engaged share as a score for the preferred subtopic (AUC)",
                 result.get("affinity_auc_of_stage2_deep_share"), "no signal 0.5"))
    lines += [f"| {name} | {fmt(value)} | {ref} |" for name, value, ref in rows]
    d = result.get("click_logit_decomposition")
    if d:
        lines += ["", f"Click logit within each request, least squares on the generator's terms "
                      f"({d['candidates']} candidates, R2 {d['model']['r2']:.3f})", "",
                  "| term | model | truth | share |", "|---|---|---|---|"]
        labels = {"rel": "rel: in the query topic", "aff": "aff: preferred subtopic",
                  "q": "q: item quality"}
        lines += [f"| {labels[t]} | {d['model'][t]:.3f} | {d['truth'][t]:.3f} | "
                  f"{d['share_of_truth'][t]:.0%} |" for t in ("rel", "aff", "q")]
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
    p.add_argument("--model-dir", help="a trained model directory: adds the click-logit "
                                       "decomposition (any preset) and, for QIN, the attention "
                                       "probes")
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
