"""Offline evaluation of a trained ranking model on one split.

    python -m trainer.evaluate --data OUT --model-dir M --split test --output E

runs the model over every request of the split, keeps the real candidates (the first
`num_candidates` of each list) and writes `E/metrics.json` and `E/metrics.md`: per task AUC, log
loss, GAUC by request and by user; NDCG@5/@10, MRR and HIT@1/5/10 per request over its
candidate list, ranked by the model's fused `score`, on the click label and on graded relevance
(the sum of the task labels). On generated data (`metadata.has_true_probabilities`) the same
metrics are computed for the oracle, which predicts the true probabilities `prob_<task>` and
ranks by the same score formula: the best any model can do on that data.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, Optional

import numpy as np

import common  # noqa: F401  (tf-keras switch before TensorFlow loads)
from common import features as F
from common.cli import HelpFormatter

logger = logging.getLogger("trainer")
METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"


def fused_score(probabilities: Dict[str, np.ndarray], config, tasks) -> np.ndarray:
    """The ranking score of `trainer.config` (score_formula, score_weights) in NumPy."""
    weights = config.score_weight_map(tasks)
    if config.score_formula == "sum":
        return sum(weights[t] * probabilities[t] for t in tasks)
    score = np.ones_like(probabilities[tasks[0]], dtype=np.float64)
    for t in tasks:
        score = score * np.power(np.clip(probabilities[t], 1e-7, 1.0), weights[t])
    return score


def make_infer_fn(model, tasks):
    """A tf.function returning the float32 task probabilities and score of `model`."""
    import tensorflow as tf

    tasks = list(tasks)

    @tf.function(reduce_retracing=True)
    def infer(features):
        outputs = model(features, training=False)
        return {k: tf.cast(outputs[k], tf.float32) for k in tasks + ["score"]}

    return infer


def predict_flat(model, dataset, metadata: F.DatasetMetadata, max_batches: Optional[int] = None,
                 progress_every: int = 0, infer=None) -> Dict[str, np.ndarray]:
    """Runs `model` over a dataset of parsed feature dicts; returns one row per real candidate.

    Keys: request_id, user_id (bytes), label_<task>, pred_<task>, score, and prob_<task> when the
    data has true probabilities.
    """
    tasks = list(metadata.tasks)
    infer = infer or make_infer_fn(model, tasks)
    columns: Dict[str, list] = {}
    start = time.time()
    for step, batch in enumerate(dataset):
        if max_batches is not None and step >= max_batches:
            break
        out = infer(batch)
        mask = F.candidate_mask(batch).numpy()
        n = mask.shape[1]
        rows = {
            "request_id": np.repeat(batch[F.REQUEST_ID].numpy()[:, None], n, axis=1),
            "user_id": np.repeat(batch[F.USER_ID].numpy()[:, None], n, axis=1),
            "score": out["score"].numpy(),
        }
        for t in tasks:
            rows[f"label_{t}"] = batch[F.label_feature(t)].numpy()
            rows[f"pred_{t}"] = out[t].numpy()
            prob = F.true_prob_feature(t)
            if metadata.has_true_probabilities and prob in batch:
                rows[f"prob_{t}"] = batch[prob].numpy()
        for key, value in rows.items():
            if value.shape[:2] != mask.shape:
                raise ValueError(f"{key} has shape {value.shape}, expected {mask.shape} "
                                 f"(one value per candidate)")
            columns.setdefault(key, []).append(value[mask])
        if progress_every and (step + 1) % progress_every == 0:
            logger.info("evaluated %d batches (%.1fs)", step + 1, time.time() - start)
    if not columns:
        raise ValueError("the evaluation split produced no batches")
    return {k: np.concatenate(v) for k, v in columns.items()}


def compute_metrics(flat: Dict[str, np.ndarray], metadata: F.DatasetMetadata, config
                    ) -> Dict[str, object]:
    """{"model": metrics, "oracle": metrics or absent, "counts": ...} from `predict_flat` rows."""
    from trainer import metrics as M

    tasks = list(metadata.tasks)
    labels = {t: flat[f"label_{t}"] for t in tasks}
    graded = sum(labels[t] for t in tasks) if len(tasks) > 1 else None
    result: Dict[str, object] = {
        "counts": {"candidates": int(len(flat["request_id"])),
                   "requests": int(len(np.unique(flat["request_id"]))),
                   "users": int(len(np.unique(flat["user_id"])))},
        "model": M.all_metrics(labels, {t: flat[f"pred_{t}"] for t in tasks}, flat["score"],
                               flat["request_id"], flat["user_id"], tasks,
                               graded_relevance=graded),
    }
    if all(f"prob_{t}" in flat for t in tasks):
        oracle = {t: flat[f"prob_{t}"].astype(np.float64) for t in tasks}
        result["oracle"] = M.all_metrics(labels, oracle, fused_score(oracle, config, tasks),
                                         flat["request_id"], flat["user_id"], tasks,
                                         graded_relevance=graded)
    return result


def _fmt(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.4f}"


def to_markdown(result: Dict[str, object], title: str = "Evaluation") -> str:
    """Markdown tables: one row per model (model, oracle) and task, then ranking metrics."""
    rows = [name for name in ("model", "oracle") if name in result]
    tasks = list(result["model"]["tasks"])
    lines = [f"# {title}", "",
             "Candidates: {candidates}, requests: {requests}, users: {users}.".format(
                 **result["counts"]), "",
             "| predictor | task | AUC | log loss | GAUC (request) | GAUC (user) | "
             "requests used / skipped |", "|---|---|---|---|---|---|---|"]
    for name in rows:
        for t in tasks:
            m = result[name]["tasks"][t]
            lines.append(f"| {name} | {t} | {_fmt(m['auc'])} | {_fmt(m['logloss'])} | "
                         f"{_fmt(m['gauc_request'])} | {_fmt(m['gauc_user'])} | "
                         f"{m['gauc_request_groups']} / {m['gauc_request_groups_skipped']} |")
    for key, label in (("ranking", "click label"), ("ranking_graded", "graded relevance")):
        if key not in result["model"]:
            continue
        metric_names = [k for k in result["model"][key]
                        if k.startswith(("ndcg", "mrr", "hit"))]
        lines += ["", f"Ranking by fused score, relevance = {label} "
                      f"({result['model'][key]['relevance']}); requests without any relevant "
                      f"candidate are skipped ({result['model'][key]['requests_skipped']}).", "",
                  "| predictor | " + " | ".join(metric_names) + " |",
                  "|---" * (len(metric_names) + 1) + "|"]
        for name in rows:
            m = result[name][key]
            lines.append(f"| {name} | " + " | ".join(_fmt(m[k]) for k in metric_names) + " |")
    lines += ["", "GAUC: per-group AUC weighted by the group's candidate count; groups with a "
                  "single class are skipped (counted above)."]
    return "\n".join(lines) + "\n"


def write_outputs(result: Dict[str, object], output_dir: str, title: str) -> Dict[str, str]:
    import tensorflow as tf

    tf.io.gfile.makedirs(output_dir)
    paths = {"json": os.path.join(output_dir, METRICS_JSON),
             "markdown": os.path.join(output_dir, METRICS_MD)}
    with tf.io.gfile.GFile(paths["json"], "w") as f:
        f.write(json.dumps(result, indent=2, sort_keys=True, default=_json_default))
    with tf.io.gfile.GFile(paths["markdown"], "w") as f:
        f.write(to_markdown(result, title))
    return paths


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def evaluate(data_dir: str, model_dir: str, split: str = "test", output_dir: Optional[str] = None,
             batch_size: int = 256, max_batches: Optional[int] = None) -> Dict[str, object]:
    """Loads the trained model of `model_dir`, evaluates it on `split`, writes the outputs."""
    from trainer import data as data_lib
    from trainer import model as model_lib
    from trainer.config import ModelConfig

    metadata = F.DatasetMetadata.load(data_dir)
    config = ModelConfig.load(model_dir)
    model = model_lib.load_trained_model(model_dir, data_dir)
    dataset = data_lib.make_dataset(data_dir, split, metadata, batch_size, for_training=False)
    logger.info("evaluating %s on %s/%s", model_dir, data_dir, split)
    flat = predict_flat(model, dataset, metadata, max_batches=max_batches, progress_every=20)
    result = compute_metrics(flat, metadata, config)
    result["split"] = split
    result["model_type"] = config.model_type
    if output_dir:
        paths = write_outputs(result, output_dir, f"{config.model_type} on {split}")
        logger.info("wrote %s and %s", paths["json"], paths["markdown"])
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Evaluate a model trained by `python -m trainer.task` on one split of the "
                    "preprocessing output: per-task AUC and log loss, GAUC by request and by "
                    "user, NDCG@5/@10, MRR and HIT@k per request; on generated data also the "
                    "oracle (true probabilities). Writes OUTPUT/metrics.json and metrics.md.",
        formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True, help="output directory of python -m preprocessing")
    parser.add_argument("--model-dir", required=True,
                        help="model directory written by python -m trainer.task "
                             "(model_config.json + final/)")
    parser.add_argument("--split", default="test", choices=F.SPLITS, help="split to evaluate")
    parser.add_argument("--output", required=True, help="directory for metrics.json/metrics.md")
    parser.add_argument("--batch-size", type=int, default=256, help="requests per batch")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="evaluate only the first N batches (quick look); default: all")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = evaluate(args.data, args.model_dir, args.split, args.output, args.batch_size,
                          args.max_batches)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(result, f"{result['model_type']} on {args.split}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
