"""Offline evaluation of a trained ranking model on one split.

    python -m trainer.evaluate --data OUT --model-dir M --split test --output E

runs the model over every request of the split, keeps the real candidates (the first
`num_candidates` of each list) and writes `E/metrics.json` and `E/metrics.md`: per binary task
AUC, log loss, expected calibration error (ECE), GAUC by request and by user; for watch time
(when the data has it) the mean prediction against the mean play time, MAE, RMSE and the
correlation with the play time; NDCG@5/@10, MRR and HIT@1/5/10 per request over its candidate
list, ranked by the model's fused `score`, on the click label and on graded relevance (the sum
of the binary task labels); clicks@10 and watch time@10 of that ranking. On generated data
(`metadata.has_true_probabilities`) the same metrics are computed for the oracle, which
predicts the true values `prob_<task>` / `expected_watch_time` and ranks by the same score
formula and weights: the best any model can do on that data; and the model's ranking is also
judged by the true expected clicks and watch time of its top 10.
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


def fused_score(probabilities: Dict[str, np.ndarray], config, tasks,
                weights: Optional[Dict[str, float]] = None) -> np.ndarray:
    """The ranking score of `trainer.config` (score_formula, score_weights) in NumPy; `weights`
    replaces the config's (e.g. the tuned weights a post-trained model ranks with)."""
    weights = ({t: float(weights.get(t, 0.0)) for t in tasks} if weights
               else config.score_weight_map(tasks))
    if config.score_formula == "sum":
        return sum(weights[t] * probabilities[t] for t in tasks)
    score = np.ones_like(probabilities[tasks[0]], dtype=np.float64)
    for t in tasks:
        score = score * np.power(np.maximum(probabilities[t], 1e-7), weights[t])
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

    Keys: request_id, user_id (bytes), label_<task>, pred_<task>, score, and the true values
    (`common.features.true_prob_feature`: prob_<task>, expected_watch_time) on generated data.
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
            truth = F.true_prob_feature(t)
            if metadata.has_true_probabilities and truth in batch:
                rows[truth] = batch[truth].numpy()
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


def watch_time_metrics(labels, predictions) -> Dict[str, float]:
    """How well an expected-watch-time prediction matches the observed play time (seconds)."""
    y = np.asarray(labels, np.float64)
    p = np.asarray(predictions, np.float64)
    corr = float(np.corrcoef(y, p)[0, 1]) if len(y) > 1 and np.std(p) > 0 and np.std(y) > 0 \
        else float("nan")
    return {"mean_prediction": float(p.mean()), "mean_label": float(y.mean()),
            "mae": float(np.mean(np.abs(p - y))), "rmse": float(np.sqrt(np.mean((p - y) ** 2))),
            "correlation": corr, "candidates": int(len(y))}


def _objective_metrics(flat, score, k: int = 10) -> Dict[str, float]:
    """clicks@k and watch time@k of ranking by `score`, on labels and (generated data) truth."""
    from trainer import metrics as M

    out = {}
    groups = flat["request_id"]
    for prefix, column in (("", F.label_feature), ("oracle_", F.true_prob_feature)):
        for name, task in (("clicks", "click"), ("watch_time", F.WATCH_TIME)):
            if column(task) in flat:
                out[f"{prefix}{name}@{k}"] = M.top_k_mean_sum(flat[column(task)], score,
                                                              groups, k)
    return out


def compute_metrics(flat: Dict[str, np.ndarray], metadata: F.DatasetMetadata, config,
                    score_weights: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """{"model": metrics, "oracle": metrics or absent, "counts": ...} from `predict_flat` rows.

    `score_weights`: the weights the model ranks with (its tuned ones), for the oracle's score.
    """
    from trainer import metrics as M

    tasks = list(metadata.tasks)
    binary = F.binary_tasks(tasks)
    labels = {t: flat[f"label_{t}"] for t in tasks}
    graded = sum(labels[t] for t in binary) if len(binary) > 1 else None
    result: Dict[str, object] = {
        "counts": {"candidates": int(len(flat["request_id"])),
                   "requests": int(len(np.unique(flat["request_id"]))),
                   "users": int(len(np.unique(flat["user_id"])))},
        "model": M.all_metrics(labels, {t: flat[f"pred_{t}"] for t in binary}, flat["score"],
                               flat["request_id"], flat["user_id"], binary,
                               graded_relevance=graded),
    }
    result["model"]["objectives"] = _objective_metrics(flat, flat["score"])
    for t in binary:
        result["model"]["tasks"][t]["ece"] = M.expected_calibration_error(
            labels[t], flat[f"pred_{t}"])
    for t in F.regression_tasks(tasks):
        result["model"].setdefault("regression", {})[t] = watch_time_metrics(
            labels[t], flat[f"pred_{t}"])
    truth_keys = {t: F.true_prob_feature(t) for t in tasks}
    if all(key in flat for key in truth_keys.values()):
        oracle = {t: flat[truth_keys[t]].astype(np.float64) for t in tasks}
        oracle_score = fused_score(oracle, config, tasks, score_weights)
        result["oracle"] = M.all_metrics(labels, oracle, oracle_score, flat["request_id"],
                                         flat["user_id"], binary, graded_relevance=graded)
        result["oracle"]["objectives"] = _objective_metrics(flat, oracle_score)
        for t in binary:
            result["oracle"]["tasks"][t]["ece"] = M.expected_calibration_error(
                labels[t], oracle[t])
        for t in F.regression_tasks(tasks):
            result["oracle"].setdefault("regression", {})[t] = watch_time_metrics(
                labels[t], oracle[t])
            result["model"]["regression"][t]["correlation_with_truth"] = float(
                np.corrcoef(oracle[t], flat[f"pred_{t}"])[0, 1])
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
             "| predictor | task | AUC | log loss | ECE | GAUC (request) | GAUC (user) | "
             "requests used / skipped |", "|---|---|---|---|---|---|---|---|"]
    for name in rows:
        for t in tasks:
            m = result[name]["tasks"][t]
            lines.append(f"| {name} | {t} | {_fmt(m['auc'])} | {_fmt(m['logloss'])} | "
                         f"{_fmt(m.get('ece'))} | "
                         f"{_fmt(m['gauc_request'])} | {_fmt(m['gauc_user'])} | "
                         f"{m['gauc_request_groups']} / {m['gauc_request_groups_skipped']} |")
    regression = [(name, t, result[name]["regression"][t]) for name in rows
                  for t in result[name].get("regression", {})]
    if regression:
        lines += ["", "| predictor | task | mean prediction (s) | mean play time (s) | MAE | "
                      "RMSE | correlation |", "|---|---|---|---|---|---|---|"]
        for name, t, m in regression:
            lines.append(f"| {name} | {t} | {_fmt(m['mean_prediction'])} | "
                         f"{_fmt(m['mean_label'])} | {_fmt(m['mae'])} | {_fmt(m['rmse'])} | "
                         f"{_fmt(m['correlation'])} |")
    objective_rows = [(name, result[name].get("objectives", {})) for name in rows]
    if any(values for _, values in objective_rows):
        keys = sorted({k for _, values in objective_rows for k in values})
        lines += ["", "Top 10 of each list by fused score (observed labels; oracle_ = the "
                      "generator's true values):", "",
                  "| predictor | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, values in objective_rows:
            lines.append(f"| {name} | " + " | ".join(_fmt(values.get(k)) for k in keys) + " |")
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
    result = compute_metrics(flat, metadata, config, model.score_weights)
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
