"""PR2's ranking objectives for one trained model: calibrated heads and a fused score tuned for
what the product wants (arXiv 2409.11281), fitted on eval, judged on test, stored with the model.

    python -m trainer.objectives fit --data OUT --model-dir M --output O \\
        [--objective watch_time_at_click_floor] [--max-click-loss 0.01] [--k 10]

1. scores the eval and test splits with the model's raw heads;
2. fits a calibration map per task on eval (`trainer.calibration`: isotonic or Platt, chosen
   per task by held-out ECE) and measures ECE on test before and after;
3. tunes the fusion weights on eval, with the calibrated heads and the observed labels, for the
   stated objective (`trainer.fusion`), and measures on test clicks@K and watch time@K against
   ranking by p(click): on the labels, and on generated data on the true values;
4. writes `M/post_training.json` (`trainer.post_training`), reloads the model with it and checks
   that the model's own outputs equal the calibrated values and the tuned score;
5. writes `O/objectives_run.json`, `O/reliability.png` (reliability diagrams before / after, per
   task, test split) and `O/tradeoff.png` (clicks@K against watch time@K as the watch-time
   weight varies, on the true values of generated data, else the labels).

    python -m trainer.objectives retrieved --data OUT --model-dir M --raw RAW --output O \
        [--candidates N] [--max-click-loss 0.01] [--k 10] [--rule target|floor|margin]
        [--watch-time-target 0.05] [--write-weights]

tunes the fused score where the ranker works: not on the 12-20 logged impressions of a request
but on the N items retrieval hands it (the serving client ranks its `--candidates` = 100
content-retrieved items, the search call ~200). Every eval and test request gets the N items of
the whole corpus whose content embedding is closest to its query embedding
(`serving.client.retrieve`, the non-personalized baseline), scored by the post-trained model
(calibrated heads) with the request's own query, user and sequences from its example. Unshown
items have no labels, so the weights are chosen on eval by the model's calibrated predictions
(expected clicks@K = sum of calibrated p_click of the top K, expected watch time@K = sum of
calibrated E[T]) and judged on test by the generator's truth for any (request, item) pair
(`trainer.retrieval_oracle`). The truth's ceiling (the same grid on the true values) and
diagnostics that only generated data allows (weights best on test, chosen on eval by the truth,
the deployed ones) come alongside. `--rule` says how the predictions enforce the click floor
(`trainer.fusion.RULES`): `floor` the most predicted watch time within the predicted floor,
`target` (default) the least predicted click cost reaching a predicted watch time@K gain of
`--watch-time-target`, `margin` the floor with the predicted click changes scaled by how much
the model understates observed click changes on eval's logged lists (`logged_change_scale`);
every rule's choice is in the run's `rules`. Writes O/retrieved_run.json and its plot
O/retrieved_tradeoff.png, and with --write-weights the chosen weights into
M/post_training.json. `retrieved-summary --runs O1 O2 O3` prints the table.

    python -m trainer.objectives summarize --runs O1 O2 O3 [--retrieved R1 R2 R3] --output DOCS

averages the runs (e.g. one per data seed) into `DOCS/objectives.json` (mean; `std` and `runs`
alongside) and copies the first run's figures to `DOCS/objectives_reliability.png` and
`DOCS/objectives_tradeoff.png`; it prints the Markdown table of docs/REPORT.md's objectives
section. With `--retrieved` (the same models' `retrieved` runs) the retrieved-list fusion is
the headline `fusion` of objectives.json, the logged-list one moves to `fusion_logged`, and
`DOCS/objectives_retrieved_tradeoff.png` plots the first retrieved run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from typing import Dict, List, Mapping, Optional

import numpy as np

logger = logging.getLogger("trainer")
RUN_JSON, RELIABILITY_PNG, TRADEOFF_PNG = "objectives_run.json", "reliability.png", "tradeoff.png"
SUMMARY_JSON = "objectives.json"
DOCS_RELIABILITY_PNG, DOCS_TRADEOFF_PNG = "objectives_reliability.png", "objectives_tradeoff.png"


def _bins_dict(rb) -> Dict[str, list]:
    return {"count": rb.count.tolist(), "mean_prediction": rb.mean_prediction.tolist(),
            "mean_label": rb.mean_label.tolist()}


def _calibrate(eval_flat, test_flat, tasks) -> (Dict, Dict, Dict):
    """Per-task knots fitted on eval; test errors and reliability bins before and after."""
    from common import features as F
    from trainer import calibration as C
    from trainer import metrics as M

    knots, report, calibrated = {}, {}, {"eval": {}, "test": {}}
    for task in tasks:
        binary = F.is_binary_task(task)
        fit = C.fit_task(eval_flat[f"pred_{task}"], eval_flat[f"label_{task}"],
                         eval_flat["request_id"], binary)
        knots[task] = fit.knots
        for split, flat in (("eval", eval_flat), ("test", test_flat)):
            calibrated[split][task] = fit.knots(flat[f"pred_{task}"])
        y, before, after = (test_flat[f"label_{task}"], test_flat[f"pred_{task}"],
                            calibrated["test"][task])
        report[task] = {
            "method": fit.knots.method, "held_out_error_by_method": fit.held_out_error,
            "error": "ece" if binary else "ece_relative_to_mean_play_time",
            "ece_before": C.calibration_error(y, before, binary),
            "ece_after": C.calibration_error(y, after, binary),
            "mean_prediction_before": float(np.mean(before)),
            "mean_prediction_after": float(np.mean(after)), "mean_label": float(np.mean(y)),
            "bins_before": _bins_dict(M.reliability_bins(y, before, equal_mass=not binary)),
            "bins_after": _bins_dict(M.reliability_bins(y, after, equal_mass=not binary)),
        }
    return knots, report, calibrated


def _point_dict(point, reference) -> Dict[str, float]:
    return {"weights": point.weights, "clicks": point.clicks, "watch_time": point.watch_time,
            "clicks_change": point.clicks / reference.clicks - 1.0,
            "watch_time_gain": point.watch_time / reference.watch_time - 1.0}


def _fuse(eval_flat, test_flat, calibrated, tasks, objective, max_click_loss, k) -> Dict:
    """Weights tuned on eval labels; their effect on test (labels and, if known, the truth)."""
    from common import features as F
    from trainer import fusion

    chosen, reference, points = fusion.tune(
        calibrated["eval"], eval_flat[F.label_feature("click")],
        eval_flat[F.label_feature(F.WATCH_TIME)], eval_flat["request_id"], tasks, objective,
        max_click_loss, k)
    result = {"objective": fusion.describe(objective, max_click_loss, k), "k": k,
              "weights": chosen.weights, "eval": _point_dict(chosen, reference),
              "eval_reference": _point_dict(reference, reference)}
    judges = {"test_labels": (F.label_feature("click"), F.label_feature(F.WATCH_TIME))}
    truth = (F.true_prob_feature("click"), F.true_prob_feature(F.WATCH_TIME))
    if all(t in test_flat for t in truth):
        judges["test_oracle"] = truth
    curve_weights = [w for w in fusion.candidate_weights(tasks) if not w.get("long_view")]
    for name, (click_key, watch_key) in judges.items():
        clicks, watch = test_flat[click_key], test_flat[watch_key]
        groups = test_flat["request_id"]
        ref, tuned = fusion.evaluate_weights(
            calibrated["test"], clicks, watch, groups,
            [fusion.click_ranking(tasks), chosen.weights], k)
        curve = fusion.evaluate_weights(calibrated["test"], clicks, watch, groups,
                                        curve_weights, k)
        result[name] = dict(_point_dict(tuned, ref), reference=_point_dict(ref, ref),
                            curve=[_point_dict(p, ref) for p in curve])
        if name == "test_oracle":  # the ceiling: the same weights on the true values
            truth_values = {t: test_flat[F.true_prob_feature(t)] for t in tasks}
            ceiling_ref = fusion.evaluate_weights(truth_values, clicks, watch, groups,
                                                  [fusion.click_ranking(tasks)], k)[0]
            result["oracle_ranker_curve"] = [
                _point_dict(p, ceiling_ref) for p in fusion.evaluate_weights(
                    truth_values, clicks, watch, groups, curve_weights, k)]
    return result


def _watch_time_quality(flat, calibrated) -> Dict[str, float]:
    """How good the watch-time head is, on test: against the play time and the truth."""
    from common import features as F
    from trainer import metrics as M

    task = F.WATCH_TIME
    pred, label = calibrated["test"][task], flat[F.label_feature(task)]
    out = {"mean_prediction": float(np.mean(pred)), "mean_play_time": float(np.mean(label)),
           "correlation_with_play_time": float(np.corrcoef(pred, label)[0, 1])}
    truth = F.true_prob_feature(task)
    if truth in flat:
        groups = flat["request_id"]
        out["correlation_with_truth"] = float(np.corrcoef(pred, flat[truth])[0, 1])
        by_model = M.top_k_mean_sum(flat[truth], pred, groups, 10)
        by_truth = M.top_k_mean_sum(flat[truth], flat[truth], groups, 10)
        out["oracle_watch_time@10_ranked_by_prediction"] = by_model
        out["oracle_watch_time@10_ranked_by_truth"] = by_truth
        out["share_of_best_watch_time@10"] = by_model / by_truth
    return out


def _check_in_model(model, dataset, raw_test, knots, weights, tasks, batches: int = 3
                    ) -> float:
    """Largest relative gap between the reloaded model's outputs on the first test batches and
    the NumPy calibration of its raw outputs / the tuned score (0 up to float32 rounding)."""
    from trainer import evaluate as E
    from trainer import fusion

    served = E.predict_flat(model, dataset, model.metadata, max_batches=batches)
    n = len(served["request_id"])
    if not np.array_equal(served["request_id"], raw_test["request_id"][:n]):
        raise ValueError("the test split was read in another order on the second pass")
    expected = {t: knots[t](raw_test[f"pred_{t}"][:n]) for t in tasks}
    gaps = [np.max(np.abs(served[f"pred_{t}"] - expected[t])
                   / np.maximum(np.abs(expected[t]), 1e-3)) for t in tasks]
    score = fusion.fused_score(expected, weights)
    gaps.append(np.max(np.abs(served["score"] - score) / np.maximum(np.abs(score), 1e-6)))
    return float(max(gaps))


def fit_objectives(data_dir: str, model_dir: str, output_dir: str,
                   objective: Optional[str] = None, max_click_loss: Optional[float] = None,
                   k: Optional[int] = None, batch_size: int = 256) -> Dict:
    """Steps 1-5 of the module docstring; returns the run's numbers."""
    from common import features as F
    from trainer import data as data_lib
    from trainer import evaluate as E
    from trainer import fusion
    from trainer import model as model_lib
    from trainer import post_training
    from trainer.config import ModelConfig

    objective = objective or fusion.DEFAULT_OBJECTIVE
    max_click_loss = fusion.DEFAULT_MAX_CLICK_LOSS if max_click_loss is None else max_click_loss
    k = k or fusion.DEFAULT_K
    metadata = F.DatasetMetadata.load(data_dir)
    config = ModelConfig.load(model_dir)
    tasks = list(metadata.tasks)
    if config.score_formula != "product":
        raise ValueError("fusion tuning fits the product score; the model's score_formula is "
                         f"{config.score_formula!r}")
    model = model_lib.load_trained_model(model_dir, data_dir)
    for task in tasks:  # raw heads and the config's weights, whatever was fitted before
        model.calibration.assign(task, None)
    model.set_score_weights(config.score_weight_map(tasks))

    def dataset(split):
        return data_lib.make_dataset(data_dir, split, metadata, batch_size, for_training=False)

    flats = {split: E.predict_flat(model, dataset(split), metadata) for split in ("eval", "test")}
    knots, calibration_report, calibrated = _calibrate(flats["eval"], flats["test"], tasks)
    result = {"data": os.path.basename(os.path.normpath(data_dir)),
              "model_type": config.model_type, "watch_time_loss": config.watch_time_loss,
              "tasks": tasks, "calibration": calibration_report}
    if "click" in tasks and F.WATCH_TIME in tasks:
        result["fusion"] = _fuse(flats["eval"], flats["test"], calibrated, tasks, objective,
                                 max_click_loss, k)
        result["watch_time"] = _watch_time_quality(flats["test"], calibrated)
        weights = result["fusion"]["weights"]
        fusion_record = {"weights": weights, "objective": result["fusion"]["objective"],
                         "formula": "product"}
    else:
        weights = config.score_weight_map(tasks)
        fusion_record = {}
        logger.info("the data has no watch-time task (tasks %s): calibration only", tasks)
    post_training.save(model_dir, knots, fusion_record)
    reloaded = model_lib.load_trained_model(model_dir, data_dir)
    result["in_model_max_relative_gap"] = _check_in_model(
        reloaded, dataset("test"), flats["test"], knots, reloaded.score_weights, tasks)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, RUN_JSON), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    plot_reliability(result, os.path.join(output_dir, RELIABILITY_PNG))
    if "fusion" in result:
        plot_tradeoff(result, os.path.join(output_dir, TRADEOFF_PNG))
    return result


# ---- the ranker on retrieved candidates ----------------------------------------------------
RETRIEVED_JSON, RETRIEVED_TRADEOFF_PNG = "retrieved_run.json", "retrieved_tradeoff.png"
DOCS_RETRIEVED_TRADEOFF_PNG = "objectives_retrieved_tradeoff.png"


class ItemTable:
    """Every item of the data dir's vocabulary as `serving.client.retrieve` reads a feature
    store: item_id, item_index, author_index, category [M, NUM_CATEGORY_LEVELS], embedding [M, D].

    Indices come from DATA/vocab (index k + 1 = line k, as preprocessing numbers them), the
    embedding from DATA/item_embeddings.npy and each item's author and categories
    (category_l1, category_l2 of the canonical reader) from RAW/items.parquet; `check` compares
    them with the candidates of a parsed batch."""

    def __init__(self, data_dir: str, raw_dir: str):
        import pyarrow.parquet as pq
        from common import features as F

        if F.NUM_CATEGORY_LEVELS != 2:
            raise ValueError("the item table maps category_l1 and category_l2 only")
        items = F.read_vocabulary(data_dir, "items")
        author_index = {a: k + 1 for k, a in enumerate(F.read_vocabulary(data_dir, "authors"))}
        category_index = {c: k + 1 for k, c in
                          enumerate(F.read_vocabulary(data_dir, "categories"))}
        raw = pq.read_table(os.path.join(raw_dir, "items.parquet"),
                            columns=["item_id", "author_id", "category_l1",
                                     "category_l2"]).to_pydict()
        row = {item: k for k, item in enumerate(raw["item_id"])}
        m = len(items)
        author = np.zeros(m + 1, np.int64)
        category = np.zeros((m + 1, F.NUM_CATEGORY_LEVELS), np.int64)
        for index, item in enumerate(items, start=1):
            k = row.get(item)
            if k is None:
                continue
            author[index] = author_index.get(raw["author_id"][k] or "", F.OOV_INDEX)
            category[index] = [category_index.get(raw[c][k] or "", F.OOV_INDEX)
                               for c in ("category_l1", "category_l2")]
        embedding = np.load(os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE))
        if embedding.shape[0] != m + 1:
            raise ValueError(f"item_embeddings.npy has {embedding.shape[0]} rows, the item "
                             f"vocabulary {m} items (+ row 0)")
        self.author, self.category = author, category  # by item index
        self._items = {"item_id": list(items), "item_index": np.arange(1, m + 1),
                       "author_index": author[1:], "category": category[1:],
                       "embedding": np.asarray(embedding[1:], np.float32)}

    def items(self) -> Dict:
        return self._items

    def check(self, batch) -> None:
        """Raises ValueError unless the table gives the batch's candidates their authors and
        categories (what preprocessing wrote into the examples)."""
        from common import features as F

        mask = F.candidate_mask(batch).numpy()
        item = batch[F.CANDIDATE_ITEM].numpy()[mask]
        bad = np.flatnonzero(
            (self.author[item] != batch[F.CANDIDATE_AUTHOR].numpy()[mask])
            | np.any(self.category[item] != batch[F.CANDIDATE_CATEGORY].numpy()[mask], axis=1))
        if len(bad):
            raise ValueError(f"the item table disagrees with the examples on {len(bad)} of "
                             f"{len(item)} candidates (first item index {item[bad[0]]}): is RAW "
                             "the input of DATA?")


def retrieve_candidates(table, query_embeddings: np.ndarray, n: int) -> Dict[str, np.ndarray]:
    """The content-cosine baseline of the serving client (`serving.client.retrieve`) for every
    query: item_index, author_index [R, n], category [R, n, LEVELS], cosine [R, n]."""
    from serving.client import retrieve

    found = [retrieve(table, q, n) for q in query_embeddings]
    return {key: np.stack([f[key] for f in found]) for key in
            ("item_index", "author_index", "category", "cosine")}


def with_candidates(batch, candidates: Dict[str, np.ndarray], metadata) -> Dict:
    """The parsed batch's request-side features (query, user, sequences) with the candidate
    lists replaced: the dense dict `serving.signatures`' rank_listwise path gives the model."""
    import tensorflow as tf
    from common import features as F

    keep = {s.name for s in F.feature_specs(metadata, with_labels=False)}
    features = {k: v for k, v in batch.items() if k in keep}
    items = np.asarray(candidates["item_index"], np.int64)
    features[F.CANDIDATE_ITEM] = tf.constant(items)
    features[F.CANDIDATE_AUTHOR] = tf.constant(np.asarray(candidates["author_index"], np.int64))
    features[F.CANDIDATE_CATEGORY] = tf.constant(np.asarray(candidates["category"], np.int64))
    features[F.NUM_CANDIDATES] = tf.constant(np.full(items.shape[0], items.shape[1], np.int64))
    return features


def score_retrieved(model, data_dir: str, split: str, metadata, table: ItemTable, n: int,
                    batch_size: int = 64, max_requests: Optional[int] = None) -> Dict:
    """Every request of the split ranks the `n` items the content baseline retrieves for its
    query from the whole corpus, with the model's (calibrated) heads.

    Returns request_id [R] (str), items [R, n] (item indices), cosine [R, n], pred {task:
    [R, n]} and score [R, n] (the model's own fused score)."""
    import time

    from common import features as F
    from trainer import data as data_lib
    from trainer import evaluate as E

    tasks = list(metadata.tasks)
    infer = E.make_infer_fn(model, tasks)
    ds = data_lib.make_dataset(data_dir, split, metadata, batch_size, for_training=False)
    parts: Dict[str, list] = {}
    seen, started = 0, time.time()
    for step, batch in enumerate(ds):
        if max_requests is not None and seen >= max_requests:
            break
        if step == 0:
            table.check(batch)
        take = len(batch[F.REQUEST_ID]) if max_requests is None else min(
            len(batch[F.REQUEST_ID]), max_requests - seen)
        batch = {k: v[:take] for k, v in batch.items()}
        candidates = retrieve_candidates(table, batch[F.QUERY_EMBEDDING].numpy(), n)
        out = infer(with_candidates(batch, candidates, metadata))
        parts.setdefault("request_id", []).append(
            np.asarray([r.decode() for r in batch[F.REQUEST_ID].numpy()]))
        parts.setdefault("items", []).append(candidates["item_index"])
        parts.setdefault("cosine", []).append(candidates["cosine"])
        parts.setdefault("score", []).append(out["score"].numpy())
        for t in tasks:
            parts.setdefault(f"pred_{t}", []).append(out[t].numpy())
        seen += take
        if (step + 1) % 5 == 0:
            logger.info("%s: %d requests x %d retrieved candidates scored (%.0fs)", split, seen,
                        n, time.time() - started)
    if not parts:
        raise ValueError(f"the {split} split produced no requests")
    flat = {k: np.concatenate(v) for k, v in parts.items()}
    flat["pred"] = {t: flat.pop(f"pred_{t}") for t in tasks}
    return flat


def _lists_flat(values: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {t: np.asarray(v, np.float64).reshape(-1) for t, v in values.items()}


def tune_on_lists(pred_eval, pred_test, truth_test, tasks, objective: str,
                  max_click_loss: float, k: int, truth_eval=None,
                  deployed: Optional[Dict[str, float]] = None, rule: Optional[str] = None,
                  watch_time_target: Optional[float] = None,
                  click_scale: Optional[float] = None) -> Dict:
    """Fusion on fixed-size candidate lists ([R, N] arrays per task).

    * model (honest): the weights are chosen on eval where only the model is known, by its
      calibrated predictions (expected clicks@K = sum of calibrated p_click over the top K,
      expected watch time@K = sum of calibrated E[T]); judged on test with the truth against
      ranking by the model's p(click);
    * truth_ceiling: the same grid on the true values, chosen and judged on test against
      ranking by the true p(click): what any ranker could get on these lists;
    * diagnostics: the model's heads with the weights best on test by the truth
      (`model_best_on_test`), chosen on eval by the truth (`model_chosen_on_eval_truth`, only
      possible on generated data), and the `deployed` weights (tuned on the logged lists).

    With objective watch_time_at_click_floor, `rule` (`fusion.RULES`) says how the model's
    predictions enforce the floor; `rules` holds every rule's choice (eval predicted, test
    predicted, test truth) and `weights` / `test_oracle` the one of `rule`. `click_scale` is the
    `margin` rule's factor (measured on eval's logged lists by `fit_retrieved`; 1 if unknown).
    """
    from common import features as F
    from trainer import fusion

    def groups(values):
        r, n = np.asarray(next(iter(values.values()))).shape
        return np.repeat(np.arange(r), n)

    click, watch = "click", F.WATCH_TIME
    pe, pt, tt = _lists_flat(pred_eval), _lists_flat(pred_test), _lists_flat(truth_test)
    ge, gt = groups(pred_eval), groups(pred_test)
    grid = fusion.candidate_weights(tasks)
    reference_weights = fusion.click_ranking(tasks)

    def judged(weights_list):  # the model's ranking on test, judged by the truth
        return fusion.evaluate_weights(pt, tt[click], tt[watch], gt, weights_list, k)

    rule = rule or fusion.DEFAULT_RULE
    watch_time_target = (fusion.DEFAULT_WATCH_TIME_TARGET if watch_time_target is None
                         else watch_time_target)
    click_scale = 1.0 if click_scale is None else click_scale
    chosen, eval_ref, eval_points = fusion.tune(pe, pe[click], pe[watch], ge, tasks, objective,
                                                max_click_loss, k, grid)
    rules = {}
    if objective == fusion.DEFAULT_OBJECTIVE:
        for name in fusion.RULES:
            point = fusion.choose_by_rule(eval_points, eval_ref, name, max_click_loss,
                                          watch_time_target, click_scale)
            p_ref, p_point = fusion.evaluate_weights(pt, pt[click], pt[watch], gt,
                                                     [reference_weights, point.weights], k)
            t_ref, t_point = judged([reference_weights, point.weights])
            rules[name] = {"weights": point.weights,
                           "eval_predicted": _point_dict(point, eval_ref),
                           "test_predicted": _point_dict(p_point, p_ref),
                           "test_oracle": _point_dict(t_point, t_ref)}
        chosen = next((p for p in eval_points if p.weights == rules[rule]["weights"]), eval_ref)
    ref, tuned = judged([reference_weights, chosen.weights])
    predicted_ref, predicted = fusion.evaluate_weights(
        pt, pt[click], pt[watch], gt, [reference_weights, chosen.weights], k)
    curve = judged(grid)
    predicted_curve = fusion.evaluate_weights(pt, pt[click], pt[watch], gt, grid, k)
    result = {
        "objective": (fusion.describe_rule(rule, max_click_loss, watch_time_target, k) if rules
                      else fusion.describe(objective, max_click_loss, k)), "k": k,
        "rule": rule if rules else None, "rules": rules,
        "watch_time_target": watch_time_target, "click_scale": click_scale,
        "requests": {"eval": int(ge.max() + 1), "test": int(gt.max() + 1)},
        "candidates": int(np.asarray(pred_test[click]).shape[1]),
        "weights": chosen.weights,
        "eval_predicted": _point_dict(chosen, eval_ref),
        "test_predicted": _point_dict(predicted, predicted_ref),
        "test_oracle": dict(_point_dict(tuned, ref), reference=_point_dict(ref, ref),
                            curve=[_point_dict(p, ref) for p in curve]),
        "test_predicted_curve": [_point_dict(p, predicted_ref) for p in predicted_curve],
    }
    best = fusion.choose(curve, ref, objective, max_click_loss)
    result["model_best_on_test"] = _point_dict(best, ref)
    if truth_eval is not None:
        te = _lists_flat(truth_eval)
        by_truth = fusion.tune(pe, te[click], te[watch], ge, tasks, objective, max_click_loss,
                               k, grid)[0]
        result["model_chosen_on_eval_truth"] = _point_dict(judged([by_truth.weights])[0], ref)
    if deployed:
        result["deployed_weights"] = _point_dict(judged([deployed])[0], ref)
    truth_curve = fusion.evaluate_weights(tt, tt[click], tt[watch], gt, grid, k)
    truth_ref = fusion.evaluate_weights(tt, tt[click], tt[watch], gt, [reference_weights], k)[0]
    ceiling = fusion.choose(truth_curve, truth_ref, objective, max_click_loss)
    result["truth_ceiling"] = dict(_point_dict(ceiling, truth_ref),
                                   reference=_point_dict(truth_ref, truth_ref),
                                   curve=[_point_dict(p, truth_ref) for p in truth_curve])
    watch_only = fusion.evaluate_weights(tt, tt[click], tt[watch], gt,
                                         [{t: float(t == watch) for t in tasks}], k)[0]
    result["truth_by_expected_watch_time"] = _point_dict(watch_only, truth_ref)
    # how far the model's reference is from the truth's (same lists, same judge)
    result["model_click_ranking_share_of_truth"] = {
        "clicks": ref.clicks / truth_ref.clicks, "watch_time": ref.watch_time /
        truth_ref.watch_time}
    return result


def logged_change_scale(model, data_dir: str, metadata, tasks, k: int, max_click_loss: float,
                        batch_size: int = 256) -> Dict[str, float]:
    """The `margin` rule's factor, from eval's logged lists (where labels exist): how much the
    observed click (and watch-time) change of each fused ranking exceeds the change the model's
    calibrated heads predict (`fusion.change_scale`, rankings predicted to lose at most 5
    floors' worth of clicks)."""
    from common import features as F
    from trainer import data as data_lib
    from trainer import evaluate as E
    from trainer import fusion

    flat = E.predict_flat(model, data_lib.make_dataset(data_dir, "eval", metadata, batch_size,
                                                       for_training=False), metadata)
    pred = {t: flat[f"pred_{t}"] for t in tasks}
    groups = flat["request_id"]
    grid = [fusion.click_ranking(tasks)] + fusion.candidate_weights(tasks)
    predicted = fusion.evaluate_weights(pred, pred["click"], pred[F.WATCH_TIME], groups, grid, k)
    observed = fusion.evaluate_weights(pred, flat[F.label_feature("click")],
                                       flat[F.label_feature(F.WATCH_TIME)], groups, grid, k)
    return fusion.change_scale(predicted[1:], predicted[0], observed[1:], observed[0],
                               5 * max_click_loss)


def fit_retrieved(data_dir: str, model_dir: str, raw_dir: str, output_dir: str,
                  candidates: Optional[int] = None, objective: Optional[str] = None,
                  max_click_loss: Optional[float] = None, k: Optional[int] = None,
                  batch_size: int = 64, max_requests: Optional[int] = None,
                  write_weights: bool = False, rule: Optional[str] = None,
                  watch_time_target: Optional[float] = None) -> Dict:
    """The fusion tuned where the ranker works: on the candidates retrieval hands it (module
    docstring, `retrieved`). Reads the model as served (calibration and fusion of
    M/post_training.json); writes O/retrieved_run.json, and the chosen weights into
    M/post_training.json only with `write_weights`."""
    from common import features as F
    from serving.client import DEFAULT_CANDIDATES
    from trainer import fusion
    from trainer import model as model_lib
    from trainer import post_training
    from trainer.calibration import Knots
    from trainer.config import ModelConfig
    from trainer.retrieval_oracle import ClickOracle

    candidates = candidates or DEFAULT_CANDIDATES
    objective = objective or fusion.DEFAULT_OBJECTIVE
    max_click_loss = fusion.DEFAULT_MAX_CLICK_LOSS if max_click_loss is None else max_click_loss
    k = k or fusion.DEFAULT_K
    if candidates < k:
        raise ValueError(f"--candidates {candidates} is fewer than the top K = {k}")
    metadata = F.DatasetMetadata.load(data_dir)
    tasks = list(metadata.tasks)
    if "click" not in tasks or F.WATCH_TIME not in tasks:
        raise ValueError(f"the retrieved-list fusion needs click and watch_time (tasks {tasks})")
    config = ModelConfig.load(model_dir)
    if config.score_formula != "product":
        raise ValueError("fusion tuning fits the product score; the model's score_formula is "
                         f"{config.score_formula!r}")
    content = post_training.load(model_dir) or {}
    if not content.get("calibration"):
        logger.warning("%s has no calibration (run `fit` first): the expected clicks and watch "
                       "time of the raw heads choose the weights", model_dir)
    model = model_lib.load_trained_model(model_dir, data_dir)
    deployed = {t: float(model.score_weights.get(t, 0.0)) for t in tasks}
    table = ItemTable(data_dir, raw_dir)
    oracle = ClickOracle.from_raw(raw_dir, F.read_vocabulary(data_dir, "items"))
    logged = logged_change_scale(model, data_dir, metadata, tasks, k, max_click_loss,
                                 batch_size)
    scored, truth = {}, {}
    for split in ("eval", "test"):
        scored[split] = score_retrieved(model, data_dir, split, metadata, table, candidates,
                                        batch_size, max_requests)
        truth[split] = oracle.truth(scored[split]["request_id"], scored[split]["items"])
    result = {"data": os.path.basename(os.path.normpath(data_dir)),
              "model_type": config.model_type, "tasks": tasks,
              "retrieval": f"content cosine top {candidates} of {len(table.items()['item_id'])}"
                           " items (serving.client.retrieve)",
              "calibrated": bool(content.get("calibration")),
              "deployed_weights": deployed,
              "fusion": tune_on_lists(scored["eval"]["pred"], scored["test"]["pred"],
                                      truth["test"], tasks, objective, max_click_loss, k,
                                      truth_eval=truth["eval"], deployed=deployed, rule=rule,
                                      watch_time_target=watch_time_target,
                                      click_scale=logged["clicks"]),
              "logged_eval_change_scale": logged}
    if write_weights:
        weights = result["fusion"]["weights"]
        post_training.save(model_dir, {t: Knots.from_dict(v) for t, v in
                                       content.get("calibration", {}).items()},
                           {"weights": weights, "formula": "product",
                            "objective": result["fusion"]["objective"],
                            "rule": result["fusion"]["rule"],
                            "candidates": f"retrieved:{candidates}"})
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, RETRIEVED_JSON), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    plot_retrieved_tradeoff(result, os.path.join(output_dir, RETRIEVED_TRADEOFF_PNG))
    return result


def retrieved_summary(run_dirs: List[str]) -> str:
    """Markdown table of several `retrieved` runs (one per data seed): per run and mean ± std."""
    runs = []
    for d in run_dirs:
        with open(os.path.join(d, RETRIEVED_JSON)) as f:
            runs.append(json.load(f))
    k = runs[0]["fusion"]["k"]
    columns = [("model, chosen on eval by its predictions (the run's rule)", "test_oracle"),
               ("model, best on test (diagnostic)", "model_best_on_test"),
               ("model, chosen on eval by the truth (diagnostic)",
                "model_chosen_on_eval_truth"),
               ("model, deployed weights (tuned on logged lists)", "deployed_weights"),
               ("truth's ceiling", "truth_ceiling")]
    lines = [f"{runs[0]['fusion']['objective']}; {runs[0]['retrieval']}; true watch time@{k} "
             f"gain / true clicks@{k} change vs ranking by p(click) (the model's for the model "
             "rows, the true one for the ceiling), on test.", "",
             "| ranking | " + " | ".join(r["data"] for r in runs) + " | mean ± std |",
             "|---|" + "---|" * (len(runs) + 1)]
    rows = [(title, [r["fusion"].get(key) for r in runs]) for title, key in columns]
    for name in runs[0]["fusion"].get("rules") or {}:
        rows.insert(-1, (f"model, `{name}` rule (chosen on eval by its predictions)",
                         [(r["fusion"].get("rules") or {}).get(name, {}).get("test_oracle")
                          for r in runs]))
    for title, points in rows:
        if not all(points):
            continue
        cells = [f"{_weights_text(p['weights'])}: {100 * p['watch_time_gain']:+.2f}% / "
                 f"{100 * p['clicks_change']:+.2f}%" for p in points]
        g = _mean_std([p["watch_time_gain"] for p in points])
        c = _mean_std([p["clicks_change"] for p in points])
        lines.append(f"| {title} | " + " | ".join(cells) +
                     f" | {100 * g['mean']:+.2f}% ± {100 * g['std']:.2f}% / "
                     f"{100 * c['mean']:+.2f}% ± {100 * c['std']:.2f}% |")
    return "\n".join(lines) + "\n"


def _weights_text(weights: Mapping[str, float]) -> str:
    short = {"watch_time": "a", "long_view": "b"}
    text = ", ".join(f"{short.get(t, t)}={w:g}" for t, w in weights.items()
                     if w and t != "click")
    return text or "p(click)"


# ---- figures -----------------------------------------------------------------------------
def plot_reliability(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["calibration"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        r = result["calibration"][task]
        top = 0.0
        for key, style, label in (("bins_before", "o--", "raw head"),
                                  ("bins_after", "s-", f"calibrated ({r['method']})")):
            b = r[key]
            ece = r["ece_before" if key == "bins_before" else "ece_after"]
            ax.plot(b["mean_prediction"], b["mean_label"], style, ms=4,
                    label=f"{label}, ECE {ece:.4f}")
            top = max(top, max(b["mean_prediction"] + b["mean_label"]))
        ax.plot([0, top], [0, top], color="grey", lw=0.8, label="perfect")
        unit = " (s)" if r["error"] != "ece" else ""
        ax.set_xlabel(f"mean prediction{unit}")
        ax.set_ylabel(f"mean label{unit}")
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.suptitle("Reliability on test: raw heads and heads calibrated on eval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fusion = result["fusion"]
    judge = "test_oracle" if "test_oracle" in fusion else "test_labels"
    k = fusion["k"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    curves = [(fusion[judge]["curve"], "o-", "model heads: p_click * E[T]^a")]
    if "oracle_ranker_curve" in fusion:
        curves.append((fusion["oracle_ranker_curve"], ".--", "true values (ceiling)"))
    for curve, style, label in curves:
        xs = [100 * p["clicks_change"] for p in curve]
        ys = [100 * p["watch_time_gain"] for p in curve]
        ax.plot(xs, ys, style, ms=4, label=label)
        for p, x, y in zip(curve, xs, ys):
            a = p["weights"].get("watch_time", 0.0)
            if a in (0.1, 0.25, 0.5, 1.0, 2.0) and style == "o-":
                ax.annotate(f"a={a:g}", (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    tuned = fusion[judge]
    ax.plot([100 * tuned["clicks_change"]], [100 * tuned["watch_time_gain"]], "r*", ms=14,
            label="tuned on eval: " + ", ".join(f"{t} {w:g}" for t, w in
                                                 tuned["weights"].items() if w))
    ax.axvline(-1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(5.0, color="grey", lw=0.8, ls=":")
    truth = "true expected" if judge == "test_oracle" else "observed"
    ax.set_xlabel(f"change of {truth} clicks@{k} vs ranking by p(click) (%)")
    ax.set_ylabel(f"gain of {truth} watch time@{k} vs ranking by p(click) (%)")
    ax.set_title(f"Fusion trade-off on test ({result['data']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_retrieved_tradeoff(result: Dict, path: str) -> None:
    """clicks@K against watch time@K on the retrieved lists of test as the watch-time weight
    varies (b = 0): the model judged by the truth, the model's own prediction of the same
    rankings, the truth's ranking (ceiling), and every rule's choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fusion = result["fusion"]
    k = fusion["k"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for curve, style, label in (
            (fusion["test_oracle"].get("curve"), "o-", "model heads, judged by the truth"),
            (fusion.get("test_predicted_curve"), "x:", "model heads, as the model predicts"),
            (fusion["truth_ceiling"].get("curve"), ".--", "true values (ceiling)")):
        if not curve:
            continue
        curve = [p for p in curve if not p["weights"].get("long_view")]
        ax.plot([100 * p["clicks_change"] for p in curve],
                [100 * p["watch_time_gain"] for p in curve], style, ms=4, label=label)
    for (name, rule), marker in zip((fusion.get("rules") or {}).items(), "*PX"):
        p = rule["test_oracle"]
        ax.plot([100 * p["clicks_change"]], [100 * p["watch_time_gain"]], marker, ms=11,
                label=f"rule {name}: {_weights_text(rule['weights'])}")
    ax.axvline(-1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(5.0, color="grey", lw=0.8, ls=":")
    ax.set_xlim(-8, 0.5)
    ax.set_ylim(-1, 30)
    ax.set_xlabel(f"change of clicks@{k} vs ranking by p(click) (%)")
    ax.set_ylabel(f"gain of watch time@{k} vs ranking by p(click) (%)")
    ax.set_title(f"Fusion on retrieved candidates, test ({result['data']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- several runs ------------------------------------------------------------------------
def _mean_std(values: List[float]) -> Dict[str, float]:
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def _retrieved_fusion(run_dirs: List[str]) -> (Dict, Dict):
    """The headline fusion of several `retrieved` runs: the run's rule judged by the truth on
    test (mean, std, per run), every rule's and the truth ceiling's means alongside."""
    runs = []
    for d in run_dirs:
        with open(os.path.join(d, RETRIEVED_JSON)) as f:
            runs.append(json.load(f))
    fusions = [r["fusion"] for r in runs]
    k = fusions[0]["k"]
    gain, change = f"oracle_watch_time@{k}_gain", f"oracle_clicks@{k}_change"

    def stats(points):
        g = _mean_std([p["watch_time_gain"] for p in points])
        c = _mean_std([p["clicks_change"] for p in points])
        return {gain: g["mean"], change: c["mean"]}, {gain: g["std"], change: c["std"]}

    mean, std = stats([f["test_oracle"] for f in fusions])
    headline = dict(mean, objective=fusions[0]["objective"], rule=fusions[0].get("rule"),
                    candidates=runs[0]["retrieval"], runs=[r["data"] for r in runs],
                    weights=[f["weights"] for f in fusions],
                    per_run=[{gain: f["test_oracle"]["watch_time_gain"],
                              change: f["test_oracle"]["clicks_change"]} for f in fusions],
                    logged_eval_click_scale=[r["logged_eval_change_scale"]["clicks"]
                                             for r in runs])
    headline["truth_ceiling"] = stats([f["truth_ceiling"] for f in fusions])[0]
    headline["model_best_on_test"] = stats([f["model_best_on_test"] for f in fusions])[0]
    headline["rules"] = {}
    for name in fusions[0].get("rules") or {}:
        rule_mean = stats([f["rules"][name]["test_oracle"] for f in fusions])[0]
        headline["rules"][name] = dict(
            rule_mean, weights=[f["rules"][name]["weights"] for f in fusions],
            per_run=[{gain: f["rules"][name]["test_oracle"]["watch_time_gain"],
                      change: f["rules"][name]["test_oracle"]["clicks_change"]}
                     for f in fusions])
    return headline, std


def summarize(run_dirs: List[str], output_dir: str,
              retrieved_dirs: Optional[List[str]] = None) -> Dict:
    """docs/objectives.json from several runs (mean, with std and the per-run values). With
    `retrieved_dirs` (the same models' `retrieved` runs) the retrieved-list fusion, what the
    ranker sees when serving, is the headline `fusion`, the logged-list one `fusion_logged`."""
    runs = []
    for d in run_dirs:
        with open(os.path.join(d, RUN_JSON)) as f:
            runs.append(json.load(f))
    tasks = runs[0]["tasks"]
    summary: Dict = {"runs": [r["data"] for r in runs], "calibration": {}, "std": {}}
    for task in tasks:
        entry, std = {}, {}
        for key in ("ece_before", "ece_after"):
            stats = _mean_std([r["calibration"][task][key] for r in runs])
            entry[key], std[key] = stats["mean"], stats["std"]
        entry["error"] = runs[0]["calibration"][task]["error"]
        entry["methods"] = [r["calibration"][task]["method"] for r in runs]
        summary["calibration"][task] = entry
        summary["std"][task] = std
    if all("fusion" in r for r in runs):
        judge = "test_oracle" if all("test_oracle" in r["fusion"] for r in runs) else \
            "test_labels"
        k = runs[0]["fusion"]["k"]
        gains = _mean_std([r["fusion"][judge]["watch_time_gain"] for r in runs])
        changes = _mean_std([r["fusion"][judge]["clicks_change"] for r in runs])
        prefix = "oracle_" if judge == "test_oracle" else ""
        summary["fusion"] = {
            "objective": runs[0]["fusion"]["objective"],
            f"{prefix}watch_time@{k}_gain": gains["mean"],
            f"{prefix}clicks@{k}_change": changes["mean"],
            "weights": [r["fusion"]["weights"] for r in runs],
            "per_run": [{f"{prefix}watch_time@{k}_gain": r["fusion"][judge]["watch_time_gain"],
                         f"{prefix}clicks@{k}_change": r["fusion"][judge]["clicks_change"]}
                        for r in runs],
        }
        summary["std"]["fusion"] = {f"{prefix}watch_time@{k}_gain": gains["std"],
                                    f"{prefix}clicks@{k}_change": changes["std"]}
    if retrieved_dirs:
        if "fusion" in summary:
            summary["fusion_logged"] = summary.pop("fusion")
            summary["fusion_logged"]["candidates"] = "the request's logged impressions"
            summary["std"]["fusion_logged"] = summary["std"].pop("fusion")
        summary["fusion"], summary["std"]["fusion"] = _retrieved_fusion(retrieved_dirs)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, SUMMARY_JSON), "w") as f:
        f.write(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if retrieved_dirs:
        with open(os.path.join(retrieved_dirs[0], RETRIEVED_JSON)) as f:
            plot_retrieved_tradeoff(json.load(f),
                                    os.path.join(output_dir, DOCS_RETRIEVED_TRADEOFF_PNG))
    for name, target in ((RELIABILITY_PNG, DOCS_RELIABILITY_PNG),
                         (TRADEOFF_PNG, DOCS_TRADEOFF_PNG)):
        source = os.path.join(run_dirs[0], name)
        if os.path.exists(source):
            shutil.copyfile(source, os.path.join(output_dir, target))
    return summary


def summary_markdown(summary: Dict) -> str:
    n = len(summary["runs"])
    lines = ["| task | error | before calibration | after calibration | method per run |",
             "|---|---|---|---|---|"]
    for task, e in summary["calibration"].items():
        s = summary["std"][task]
        lines.append(f"| {task} | {e['error']} | {e['ece_before']:.4f} ± {s['ece_before']:.4f} "
                     f"| {e['ece_after']:.4f} ± {s['ece_after']:.4f} | "
                     f"{', '.join(e['methods'])} |")
    for name in ("fusion", "fusion_logged"):
        if name not in summary:
            continue
        f, s = summary[name], summary["std"][name]
        where = f" on {f['candidates']}" if "candidates" in f else ""
        lines += ["", f"{name}: {f['objective']}{where} (mean ± std over {n} runs).", "",
                  "| measure | mean | std | per run |", "|---|---|---|---|"]
        for key in [k for k in f if k.endswith(("_gain", "_change"))]:
            per_run = ", ".join(f"{100 * r[key]:+.2f}%" for r in f["per_run"])
            lines.append(f"| {key} | {100 * f[key]:+.2f}% | {100 * s[key]:.2f}% | {per_run} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.objectives",
        description="Calibrate every head and tune the fused score of a trained model on eval; "
                    "judge both on test (fit), or average several runs (summarize).")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="calibrate and tune one model")
    fit.add_argument("--data", required=True, help="output directory of python -m preprocessing")
    fit.add_argument("--model-dir", required=True, help="directory of python -m trainer.task")
    fit.add_argument("--output", required=True, help="directory for the run's JSON and figures")
    fit.add_argument("--objective", default="watch_time_at_click_floor",
                     choices=("watch_time_at_click_floor", "clicks", "watch_time"),
                     help="what the fused score is tuned for")
    fit.add_argument("--max-click-loss", type=float, default=0.01,
                     help="watch_time_at_click_floor: largest relative loss of clicks@K allowed")
    fit.add_argument("--k", type=int, default=10, help="top K of each list")
    fit.add_argument("--batch-size", type=int, default=256, help="requests per batch")
    ret = sub.add_parser(
        "retrieved", help="tune the fused score on the candidates retrieval hands the ranker "
                          "(generated data: judged by the generator's truth)")
    ret.add_argument("--data", required=True, help="output directory of python -m preprocessing")
    ret.add_argument("--model-dir", required=True,
                     help="trained model, post-trained by `fit` (its calibrated heads are used)")
    ret.add_argument("--raw", required=True,
                     help="the generator's output folder (items.parquet, truth/) DATA came from")
    ret.add_argument("--output", required=True, help="directory for retrieved_run.json")
    ret.add_argument("--candidates", type=int, default=None,
                     help="items retrieved per request (content-cosine top N; default: the "
                          "serving client's --candidates)")
    ret.add_argument("--objective", default="watch_time_at_click_floor",
                     choices=("watch_time_at_click_floor", "clicks", "watch_time"))
    ret.add_argument("--max-click-loss", type=float, default=0.01,
                     help="watch_time_at_click_floor: largest relative loss of clicks@K allowed")
    ret.add_argument("--k", type=int, default=10, help="top K of each list")
    ret.add_argument("--batch-size", type=int, default=64, help="requests per batch")
    ret.add_argument("--max-requests", type=int, default=None,
                     help="score the first N requests of eval and of test only")
    ret.add_argument("--rule", default="target", choices=("floor", "target", "margin"),
                     help="watch_time_at_click_floor: how the model's predictions enforce the "
                          "click floor (floor: most predicted watch time within the predicted "
                          "floor; target, the default: least predicted click cost reaching "
                          "--watch-time-target; margin: floor with the predicted click changes "
                          "scaled by their measured understatement on eval's logged lists)")
    ret.add_argument("--watch-time-target", type=float, default=0.05,
                     help="target rule: predicted watch time@K gain to reach")
    ret.add_argument("--write-weights", action="store_true",
                     help="store the chosen weights in MODEL_DIR/post_training.json (the "
                          "calibration is kept)")
    rsum = sub.add_parser("retrieved-summary", help="table of several retrieved runs")
    rsum.add_argument("--runs", nargs="+", required=True, help="output directories of retrieved")
    summ = sub.add_parser("summarize", help="average several fit runs into objectives.json")
    summ.add_argument("--runs", nargs="+", required=True, help="output directories of fit")
    summ.add_argument("--output", required=True, help="directory for objectives.json and figures")
    summ.add_argument("--retrieved", nargs="+", default=None,
                      help="output directories of retrieved for the same models: their fusion "
                           "becomes the headline, the logged-list one moves to fusion_logged")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "fit":
            import common  # noqa: F401  (tf-keras switch before TensorFlow loads)

            result = fit_objectives(args.data, args.model_dir, args.output, args.objective,
                                    args.max_click_loss, args.k, args.batch_size)
            print(json.dumps({t: {k: v for k, v in r.items() if not k.startswith("bins")}
                              for t, r in result["calibration"].items()}, indent=2))
            if "fusion" in result:
                print(json.dumps({k: v for k, v in result["fusion"].items()
                                  if k in ("objective", "weights", "eval")}, indent=2))
        elif args.command == "retrieved":
            import common  # noqa: F401,F811

            result = fit_retrieved(args.data, args.model_dir, args.raw, args.output,
                                   args.candidates, args.objective, args.max_click_loss, args.k,
                                   args.batch_size, args.max_requests, args.write_weights,
                                   args.rule, args.watch_time_target)
            print(json.dumps({k: v for k, v in result["fusion"].items()
                              if not isinstance(v, dict) or "curve" not in v}, indent=2))
            print(retrieved_summary([args.output]))
        elif args.command == "retrieved-summary":
            print(retrieved_summary(args.runs))
        else:
            print(summary_markdown(summarize(args.runs, args.output, args.retrieved)))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
