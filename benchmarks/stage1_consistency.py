"""Does serving's ScaNN stage 1 change the ranking? Eval GAUC with exact vs ScaNN stage 1.

Training examples built with `python -m preprocessing --long-term-mode stage1` hold, as their
long-term sequence, the exact point-in-time stage 1 (`common.relevance.stage1_top_k`: top-K1
behaviours of the whole history by cosine with the query). Serving answers the same question
with `serving.behaviour_index.Stage1Searcher` (ScaNN above `--scann-min-history` distinct
items). This script replays an evaluation split through the trained model twice:

  exact:  the examples as written (what the model was trained and selected on);
  served: the same requests with the long-term sequence replaced by the searcher's answer over
          the user's history in the feature store, strictly before the request time;

and reports, per task, GAUC by user and by request for both and their difference (target:
|delta GAUC| <= 0.002), plus the stage-1 recall of the served answer against the examples and
how many requests went through ScaNN. With the exact backend (`--scann-min-history` above every
history) the served sequences must equal the examples: `exact_sequence_match` checks the
training/serving pipeline itself.

    python -m benchmarks.stage1_consistency --data OUT --model-dir M --split eval \\
        --output stage1_consistency/ [--max-requests 5000] [--scann-min-history 16]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Mapping, Optional

import numpy as np

import serving  # noqa: F401  (legacy Keras switch before TensorFlow loads)
from common import features as F
from serving.behaviour_index import (BEHAVIOUR_FEATURES, Stage1Config, Stage1Result,
                                     Stage1Searcher, long_term_features)

GAUC_TARGET = 0.002
LONG_FIELDS = [F.SEQ_ITEM] + list(BEHAVIOUR_FEATURES) + [F.SEQ_TIME_GAP]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def with_long_term(batch: Mapping[str, np.ndarray], results: List[Stage1Result],
                   request_times_ms: np.ndarray, max_length: int) -> Dict[str, np.ndarray]:
    """A copy of a dense NumPy model-input batch whose long-term sequence (`long_*` and
    `long_length`) is replaced by the stage-1 results (one per request, most recent first),
    padded with zeros to `max_length` like `common.features.densify`."""
    out = dict(batch)
    size = len(results)
    for field in LONG_FIELDS:
        name = F.seq_feature(F.LONG_TERM, field)
        width = F.SEQ_FIELD_WIDTH[field]
        shape = (size, max_length) if width == 1 else (size, max_length, width)
        out[name] = np.zeros(shape, dtype=np.asarray(batch[name]).dtype)
    lengths = np.zeros(size, np.int64)
    for b, result in enumerate(results):
        sequence = long_term_features(result, int(request_times_ms[b]))
        n = min(len(result), max_length)
        lengths[b] = n
        for field in LONG_FIELDS:
            name = F.seq_feature(F.LONG_TERM, field)
            out[name][b, :n] = np.asarray(sequence[name])[:n].reshape(out[name][b, :n].shape)
    out[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)] = lengths.astype(
        np.asarray(batch[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)]).dtype)
    return out


def sequence_agreement(batch: Mapping[str, np.ndarray], results: List[Stage1Result]):
    """Per request: (same sequence as the example?, |served & example| / |example|).
    Behaviours are compared as (item, float32 time gap) pairs, so re-watched items are told
    apart and the gap is rounded exactly as the example stored it."""
    items = np.asarray(batch[F.seq_feature(F.LONG_TERM, F.SEQ_ITEM)])
    lengths = np.asarray(batch[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)])
    gaps = np.asarray(batch[F.seq_feature(F.LONG_TERM, F.SEQ_TIME_GAP)], np.float32)
    times = np.asarray(batch[F.REQUEST_TIME])
    same, recall = [], []
    for b, result in enumerate(results):
        n = int(lengths[b])
        want = list(zip(items[b, :n].tolist(), gaps[b, :n].tolist()))
        got_gaps = ((int(times[b]) - result.timestamps_ms) / 1000.0).astype(np.float32)
        got = list(zip(result.item_indices.tolist(), got_gaps.tolist()))
        same.append(got == want)
        recall.append(len(set(got) & set(want)) / n if n else float(not got))
    return same, recall


def run(args, store=None) -> Dict[str, object]:
    """Replays the split (see module doc). `store`: a FeatureStoreView (default: the SQLite
    store of the data directory or --feature-store)."""
    import tensorflow as tf

    from serving.client import open_feature_store
    from trainer import data as D
    from trainer import metrics as M
    from trainer.config import ModelConfig
    from trainer.evaluate import make_infer_fn
    from trainer.model import load_trained_model

    metadata = F.DatasetMetadata.load(args.data)
    if metadata.long_term_mode != "stage1" and not args.allow_recent_mode:
        raise SystemExit(
            f"{args.data} was preprocessed with --long-term-mode {metadata.long_term_mode!r}: "
            "its long-term sequences are not stage-1 selections, so replacing them measures "
            "something else. Preprocess with --long-term-mode stage1 (or pass "
            "--allow-recent-mode to measure anyway).")
    config = ModelConfig.load(args.model_dir)
    # K1 and the threshold the data was built with (metadata.json): the only ones that compare
    k1 = metadata.stage1_k or metadata.long_term_length
    threshold = metadata.stage1_threshold
    tasks = list(metadata.tasks)
    if store is None:
        store = open_feature_store(
            args.feature_store or os.path.join(args.data, "feature_store.sqlite"))
    served_config = Stage1Config(scann_min_history=args.scann_min_history)
    searcher = Stage1Searcher.from_feature_store(store, served_config)
    log(f"model {args.model_dir} ({config.model_type}), K1={k1}, stage 1 served exactly below "
        f"{args.scann_min_history} behaviours / distinct items, by ScaNN above")
    model = load_trained_model(args.model_dir, args.data)
    infer = make_infer_fn(model, tasks)
    dataset = D.make_dataset(args.data, args.split, metadata, args.batch_size, for_training=False)

    columns: Dict[str, List[np.ndarray]] = {}
    same_all, recall_all, backends = [], [], {}
    requests, start = 0, time.time()
    for batch in dataset:
        if args.max_requests and requests >= args.max_requests:
            break
        numpy_batch = {k: v.numpy() for k, v in batch.items()}
        times = numpy_batch[F.REQUEST_TIME]
        results = [searcher.top_k(user.decode(), numpy_batch[F.QUERY_EMBEDDING][b], k1,
                                  before_ms=int(times[b]), threshold=threshold)
                   for b, user in enumerate(numpy_batch[F.USER_ID])]
        for r in results:
            backends[r.backend] = backends.get(r.backend, 0) + 1
        same, recall = sequence_agreement(numpy_batch, results)
        same_all += same
        recall_all += recall
        served = with_long_term(numpy_batch, results, times, metadata.long_term_length)
        mask = numpy_batch[F.NUM_CANDIDATES][:, None] > np.arange(
            numpy_batch[F.CANDIDATE_ITEM].shape[1])[None, :]
        for variant, inputs in (("exact", batch),
                                ("served", {k: tf.constant(v) for k, v in served.items()})):
            out = infer(inputs)
            for t in tasks:
                columns.setdefault(f"{variant}_{t}", []).append(out[t].numpy()[mask])
        n = mask.shape[1]
        for t in tasks:
            columns.setdefault(f"label_{t}", []).append(numpy_batch[F.label_feature(t)][mask])
        columns.setdefault("request_id", []).append(
            np.repeat(numpy_batch[F.REQUEST_ID][:, None], n, axis=1)[mask])
        columns.setdefault("user_id", []).append(
            np.repeat(numpy_batch[F.USER_ID][:, None], n, axis=1)[mask])
        requests += len(results)
        log(f"{requests} requests ({time.time() - start:.0f}s), stage-1 recall so far "
            f"{np.mean(recall_all):.4f}")
    if not requests:
        raise SystemExit(f"the {args.split} split of {args.data} has no requests")
    flat = {k: np.concatenate(v) for k, v in columns.items()}
    result: Dict[str, object] = {
        "data": args.data, "model_dir": args.model_dir, "split": args.split, "k1": k1,
        "requests": requests, "candidates": int(len(flat["request_id"])),
        "stage1_backends": backends, "served_config": dataclasses.asdict(served_config),
        "stage1_recall_vs_examples": float(np.mean(recall_all)),
        "exact_sequence_match": float(np.mean(same_all)), "gauc_target": GAUC_TARGET,
        "tasks": {}}
    worst = 0.0
    for t in tasks:
        row = {}
        for variant in ("exact", "served"):
            m = M.task_metrics(flat[f"label_{t}"], flat[f"{variant}_{t}"], flat["request_id"],
                               flat["user_id"])
            row[variant] = {"gauc_user": m["gauc_user"], "gauc_request": m["gauc_request"],
                            "auc": m["auc"]}
        for key in ("gauc_user", "gauc_request", "auc"):
            row[f"delta_{key}"] = row["served"][key] - row["exact"][key]
        worst = max(worst, abs(row["delta_gauc_user"]), abs(row["delta_gauc_request"]))
        result["tasks"][t] = row
    result["max_abs_delta_gauc"] = worst
    result["within_target"] = bool(worst <= GAUC_TARGET)
    return result


def markdown(result: Mapping[str, object]) -> str:
    lines = [f"Stage 1 served vs exact on {result['split']} ({result['requests']} requests, "
             f"{result['candidates']} candidates, K1 = {result['k1']}).", "",
             f"* stage-1 recall of the served sequences vs the examples: "
             f"{result['stage1_recall_vs_examples']:.4f}; identical sequences: "
             f"{result['exact_sequence_match']:.4f}; backends {result['stage1_backends']}",
             f"* max |delta GAUC| = {result['max_abs_delta_gauc']:.5f} (target <= "
             f"{result['gauc_target']}): {'met' if result['within_target'] else 'NOT met'}", "",
             "| task | GAUC user exact | served | delta | GAUC request exact | served | delta |",
             "|---|---|---|---|---|---|---|"]
    for task, r in result["tasks"].items():
        lines.append(f"| {task} | {r['exact']['gauc_user']:.5f} | {r['served']['gauc_user']:.5f} "
                     f"| {r['delta_gauc_user']:+.5f} | {r['exact']['gauc_request']:.5f} | "
                     f"{r['served']['gauc_request']:.5f} | {r['delta_gauc_request']:+.5f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="output directory of `python -m preprocessing --long-term-mode "
                             "stage1` (metadata.json, TFRecords, feature_store.sqlite)")
    parser.add_argument("--model-dir", required=True,
                        help="trained model directory of `python -m trainer.task`")
    parser.add_argument("--split", default="eval", choices=F.SPLITS)
    parser.add_argument("--feature-store", help="default: DATA/feature_store.sqlite")
    parser.add_argument("--scann-min-history", type=int, default=Stage1Config.scann_min_history,
                        help="distinct items from which a user is served by ScaNN (default: "
                             "the serving default; 16 forces ScaNN for every user; a huge "
                             "value checks the exact path end to end)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-requests", type=int, default=0, help="stop after this many "
                        "requests (default: the whole split)")
    parser.add_argument("--allow-recent-mode", action="store_true",
                        help="run on data whose long-term mode is not stage1")
    parser.add_argument("--output", help="directory for stage1_consistency.{json,md}")
    args = parser.parse_args(argv)
    if args.scann_min_history < 16:
        parser.error("--scann-min-history must be >= 16")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "stage1_consistency.json"), "w") as f:
            json.dump(result, f, indent=2, default=float)
        with open(os.path.join(args.output, "stage1_consistency.md"), "w") as f:
            f.write(text + "\n")
        log(f"wrote {args.output}/stage1_consistency.{{json,md}}")
    return 0 if result["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
