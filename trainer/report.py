"""Comparison report: QIN, every baseline and every ablation on one dataset, one command.

    python -m trainer.report --data OUT --output R [--presets qin,dnn,gbdt,...] [--epochs 5] \
        [--seed 0 --seeds 3] [--tuning-trials 4] [--layout canonical --summary docs/report.json]

trains every preset of `trainer.config` (or the ones given) with the code of
`python -m trainer.task` on the same data, once per seed (--seed, --seed + 1, ... --seeds of
them), evaluates each with the code of `python -m trainer.evaluate` on the test split (one
process per preset and seed), and writes

  R/report.md    Markdown table, one row per model (mean ± standard deviation over the seeds)
                 plus the oracle (generated data), the budget and the verdict
  R/report.json  the same numbers per model and per seed, machine-readable
  R/report.png   per-model bars of click AUC and click GAUC by request with their values and
                 error bars over the seeds (the oracle as a line); learning curves (eval click
                 GAUC per epoch, from each model's training_summary.json); reliability
                 diagrams of the click probability (test split)
  R/models/<preset>/seed_<s>/, R/eval/<preset>/seed_<s>/   each run's model and evaluation
                 (eval also holds reliability.json, the reliability bins of every binary task)

Presets are those of `trainer.config` plus the classical baseline (`gbdt`, `logreg`: `python
-m trainer.classical --model ...` on the same TFRecords, one run per seed).

Tuning (`--tuning-trials N`): every neural preset gets the same N trials (trial 0 = the
command's settings, trials 1.. drawn from SEARCH_SPACE by the trial number, identical for every
preset), each trained with the first seed and scored by its best eval GAUC (the early-stopping
score, eval split); the best trial's settings are then trained with the other seeds, and only
the chosen trial enters the table. The classical baseline stops its boosting on its own
hold-out and takes no trials.

`--layout NAME --summary PATH` merges this report into PATH under NAME (other layouts stay):
{"<layout>": {"oracle": x, "nonpersonalized_oracle": x, "models": {"<preset>": {"gauc_mean": x,
"gauc_std": x, "seeds": n, ...}}}}, click GAUC by request on the report's split; the
non-personalized oracle needs the generated side file (`--truth`, see
`preprocessing.synthetic_layouts`).

For generated data (true probabilities known) the table states how much of the oracle's lift
over random each model captures: (metric - 0.5) / (oracle metric - 0.5), for click AUC and click
GAUC by request. The verdict claims a winner only from >= 3 seeds, by a paired comparison: per
seed, QIN minus the baseline on click GAUC by request, and a two-sided paired t-test at 5%.
Each run is its own process (clean TensorFlow state, memory returned), and runs are
resumable: re-running the command continues unfinished trainings and re-evaluates.

The default report dataset is the generated one:

    python -m preprocessing.synthetic --output RAW
    python -m preprocessing --input-format canonical ... --output OUT   (see its --help)
    python -m trainer.report --data OUT --output R --seeds 3
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from common.cli import HelpFormatter

logger = logging.getLogger("trainer")

# Non-neural presets: report name -> `python -m trainer.classical --model`.
CLASSICAL_PRESETS = {"gbdt": "gbdt", "logreg": "logreg"}
DEFAULT_CLASSICAL = ("gbdt",)  # in the default preset list, after every trainer.config preset
BASELINES = ("dnn", "din", "sim_hard", "sim_soft", "twin") + tuple(CLASSICAL_PRESETS)
ABLATIONS = ("qin_no_stage1", "qin_no_stage2", "qin_no_engagement", "qin_id_only")
# What the tuning trials draw from (trial 0 keeps the command's settings). Keys other than
# learning_rate are ModelConfig fields; a field a model type does not use changes nothing.
SEARCH_SPACE = {"learning_rate": (1e-3, 3e-3), "id_embedding_dim": (8, 16, 32),
                "hidden_units": (32, 64), "k2": (10, 20, 40), "dropout": (0.0, 0.1)}
REPORT_MD, REPORT_JSON, REPORT_PNG = "report.md", "report.json", "report.png"
RELIABILITY_JSON = "reliability.json"
# A winner is claimed only from at least this many seeds, by a paired test at this level.
MIN_SEEDS_FOR_A_CLAIM = 3
SIGNIFICANCE_LEVEL = 0.05
# Row metrics averaged over seeds (keys of `summarise`).
METRICS = ("auc", "gauc_request", "gauc_user", "logloss", "ndcg@10", "mrr")


# Lines of a run's log shown on the terminal (the whole log stays in R/logs/).
SHOWN_LOG_LINES = re.compile(r" INFO ((epoch \d+: eval .*)|(early stopping: .*)|(done: .*))$"
                             r"|^(error: .*)$|^(Traceback .*)$")


def _run(command: List[str], label: str, log_path: str) -> None:
    """Runs a CLI, streams its log to a file and shows its progress lines prefixed by `label`
    (per-epoch eval GAUC, early stopping, the end of training, errors)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO / WARNING lines
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, cwd=os.getcwd(), env=env)
        for line in process.stdout:
            log.write(line)
            shown = SHOWN_LOG_LINES.search(line.rstrip())
            if shown:
                text = next(group for group in shown.groups() if group)
                print(f"[{label}] {text}", flush=True)
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"{label} failed with exit code {code}; see {log_path}")
    logger.info("%s finished in %.1fs", label, time.time() - start)


def summarise(preset: str, metrics: Dict, training: Optional[Dict], oracle: Optional[Dict]
              ) -> Dict[str, object]:
    """One run's row: the first task's metrics, ranking metrics, lift captured, epochs."""
    from trainer.metrics import lift_captured

    task = next(iter(metrics["tasks"]))
    m = metrics["tasks"][task]
    row = {"model": preset, "task": task, "auc": m["auc"], "gauc_request": m["gauc_request"],
           "gauc_user": m["gauc_user"], "logloss": m["logloss"],
           "ndcg@10": metrics["ranking"]["ndcg@10"], "mrr": metrics["ranking"]["mrr"]}
    if oracle is not None:
        o = oracle["tasks"][task]
        row["auc_lift_captured"] = lift_captured(m["auc"], o["auc"])
        row["gauc_request_lift_captured"] = lift_captured(m["gauc_request"], o["gauc_request"])
    if training is not None:
        row.update(best_epoch=training.get("best_epoch"),
                   epochs=training.get("epochs_completed"),
                   best_eval_gauc=training.get("best_eval_gauc"),
                   stopped_early=bool(training.get("stopped_early")),
                   eval_gauc_per_epoch=[h.get("eval_gauc") for h in training.get("history", [])])
    return row


def _mean_std(values: Sequence[float]):
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), None
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def aggregate(preset: str, runs: List[Dict], oracle: Optional[Dict]) -> Dict[str, object]:
    """A model's row over its seeds: the mean of every metric, its standard deviation
    (`<metric>_std`, None with one seed) and the per-seed rows (`per_seed`)."""
    from trainer.metrics import lift_captured

    row: Dict[str, object] = {"model": preset, "task": runs[0]["task"],
                              "seeds": [r["seed"] for r in runs], "per_seed": runs}
    for key in METRICS:
        row[key], row[f"{key}_std"] = _mean_std([r[key] for r in runs])
    if oracle is not None:
        row["auc_lift_captured"] = lift_captured(row["auc"], oracle["auc"])
        row["gauc_request_lift_captured"] = lift_captured(row["gauc_request"],
                                                          oracle["gauc_request"])
    # "still improving": the best epoch was the last one the budget allowed, in every seed
    row["still_improving"] = all(r.get("best_epoch") is not None and not r.get("stopped_early")
                                 and r.get("best_epoch") == r.get("epochs") for r in runs)
    row["best_epoch"] = [r.get("best_epoch") for r in runs]
    row["epochs"] = [r.get("epochs") for r in runs]
    return row


def _fmt(value, percent=False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{100 * value:.1f}%" if percent else f"{value:.4f}"


def _fmt_mean(row: Dict, key: str) -> str:
    std = row.get(f"{key}_std")
    return _fmt(row[key]) + ("" if std is None else f" ± {std:.4f}")


def _epochs_cell(row: Dict) -> str:
    pairs = sorted({(b, e) for b, e in zip(row.get("best_epoch", []), row.get("epochs", []))},
                   key=str)
    return ", ".join(f"{_fmt(b)} / {_fmt(e)}" for b, e in pairs)


def budget_line(report: Dict) -> str:
    seeds = report["seeds"]
    return (f"Same data, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
            f"{report['epochs']} epochs max, early stopping patience "
            f"{report.get('early_stopping_patience', 'n/a')}, batch {report['batch_size']} "
            f"requests, learning rate {report['learning_rate']}.")


def to_markdown(report: Dict) -> str:
    rows = report["rows"]
    has_oracle = report.get("oracle") is not None
    header = ["model", "click AUC", "click GAUC (request)", "GAUC (user)", "log loss",
              "NDCG@10", "MRR"]
    if has_oracle:
        header += ["AUC lift captured", "GAUC lift captured"]
    header += ["best epoch / epochs"]
    several = len(report["seeds"]) > 1
    lines = [f"# Model comparison on `{report['data']}` ({report['split']} split)", "",
             budget_line(report) + " Task for AUC/GAUC and relevance for ranking metrics: "
             f"`{report['task']}`." + (" Values: mean ± standard deviation over the seeds."
                                       if several else ""), "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]

    def line(r, is_oracle=False):
        cells = [("**oracle** (true probabilities)" if is_oracle else r["model"])]
        cells += [_fmt(r[k]) if is_oracle else _fmt_mean(r, k) for k in METRICS]
        if has_oracle:
            cells += (["100%", "100%"] if is_oracle else
                      [_fmt(r.get("auc_lift_captured"), True),
                       _fmt(r.get("gauc_request_lift_captured"), True)])
        cells.append("" if is_oracle else _epochs_cell(r))
        return "| " + " | ".join(cells) + " |"

    if has_oracle:
        lines.append(line(report["oracle"], True))
    lines += [line(r) for r in rows]
    lines += ["", "Lift captured = (model - 0.5) / (oracle - 0.5): the share of the best "
                  "achievable improvement over random ranking.", ""]
    improving = [r["model"] for r in rows if r.get("still_improving")]
    if improving:
        lines += [f"Still improving when the budget ran out (best epoch = last epoch, no early "
                  f"stop): {', '.join(improving)}; their numbers are those of undertrained "
                  "models.", ""]
    tuning = report.get("tuning")
    if tuning:
        chosen = ", ".join(f"{name} trial {t['chosen']['trial']}"
                           for name, t in tuning["presets"].items())
        lines += [f"Tuning: {tuning['trials']} trials per neural preset (trial 0 = the given "
                  f"settings; the same draws from {json.dumps(tuning['search_space'])} for "
                  f"every preset), chosen on {tuning['selected_on']}: {chosen}.", ""]
    for text in (report.get("verdict"), report.get("ablations")):
        if text:
            lines += [text, ""]
    return "\n".join(lines) + "\n"


def _regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (Lentz), for the Student t distribution."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _regularized_incomplete_beta(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log(1.0 - x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * result


def paired_comparison(first: Sequence[float], second: Sequence[float]) -> Dict[str, float]:
    """Per-seed differences first - second: mean, standard deviation, Student's t and the
    two-sided p-value of the paired t-test (n - 1 degrees of freedom)."""
    differences = [a - b for a, b in zip(first, second)]
    n = len(differences)
    mean, std = _mean_std(differences)
    out = {"n": n, "differences": differences, "mean": mean, "std": std, "t": float("nan"),
           "p_value": float("nan")}
    if n >= 2 and std is not None:
        if std == 0.0:
            out["t"] = math.copysign(math.inf, mean) if mean else 0.0
            out["p_value"] = 0.0 if mean else 1.0
        else:
            t = mean / (std / math.sqrt(n))
            df = n - 1
            out["t"] = t
            out["p_value"] = _regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    return out


def verdict(rows: List[Dict]) -> Optional[str]:
    """What the comparison supports on click GAUC by request, QIN against each baseline.

    A winner is claimed only with >= MIN_SEEDS_FOR_A_CLAIM seeds common to QIN and the
    baseline, from the paired per-seed differences (two-sided paired t-test at
    SIGNIFICANCE_LEVEL); otherwise the observed differences are given as what they are."""
    by_model = {r["model"]: r for r in rows}
    if "qin" not in by_model:
        return None
    baselines = [by_model[b] for b in BASELINES if b in by_model]
    if not baselines:
        return None

    def per_seed(row):
        return {r["seed"]: r["gauc_request"] for r in row["per_seed"]}

    qin = per_seed(by_model["qin"])
    comparisons = {}
    for b in baselines:
        seeds = sorted(set(qin) & set(per_seed(b)))
        comparisons[b["model"]] = paired_comparison([qin[s] for s in seeds],
                                                    [per_seed(b)[s] for s in seeds])
    fewest = min(c["n"] for c in comparisons.values())
    detail = ", ".join(f"{name} {c['mean']:+.4f}" for name, c in comparisons.items())
    if fewest < MIN_SEEDS_FOR_A_CLAIM:
        return (f"No winner is claimed: {fewest} seed(s), and a claim needs >= "
                f"{MIN_SEEDS_FOR_A_CLAIM} seeds and a paired per-seed comparison. Observed QIN "
                f"minus baseline on click GAUC by request (mean over {fewest} seed(s), this "
                f"budget; not a quality claim): {detail}.")
    outcomes = {}
    for name, c in comparisons.items():
        significant = math.isfinite(c["p_value"]) and c["p_value"] < SIGNIFICANCE_LEVEL
        outcomes[name] = ("beats" if significant and c["mean"] > 0 else
                          "loses to" if significant and c["mean"] < 0 else "ties with")
    tests = "; ".join(f"{name} {c['mean']:+.4f} ± {c['std']:.4f} (p = {c['p_value']:.3f}, "
                      f"{outcomes[name]})" for name, c in comparisons.items())
    beaten = [n for n, o in outcomes.items() if o == "beats"]
    if len(beaten) == len(outcomes):
        head = "QIN beats every baseline"
    elif beaten:
        head = f"QIN beats {', '.join(beaten)} but not every baseline"
    else:
        head = "QIN beats no baseline"
    return (f"{head} on click GAUC by request (paired per-seed differences over {fewest} "
            f"seeds, two-sided paired t-test at {SIGNIFICANCE_LEVEL:.0%}; QIN minus baseline, "
            f"mean ± standard deviation: {tests}).")


def ablation_costs(rows: List[Dict]) -> Optional[str]:
    """What removing each QIN mechanism costs on click GAUC by request: full QIN minus the
    ablation, paired per seed (mean ± standard deviation, paired t-test p-value)."""
    by_model = {r["model"]: r for r in rows}
    present = [a for a in ABLATIONS if a in by_model]
    if "qin" not in by_model or not present:
        return None

    def per_seed(row):
        return {r["seed"]: r["gauc_request"] for r in row["per_seed"]}

    qin = per_seed(by_model["qin"])
    parts = []
    for name in present:
        other = per_seed(by_model[name])
        seeds = sorted(set(qin) & set(other))
        c = paired_comparison([qin[s] for s in seeds], [other[s] for s in seeds])
        spread = "" if c["std"] is None else f" ± {c['std']:.4f}"
        test = f", p = {c['p_value']:.3f}" if math.isfinite(c["p_value"]) else ""
        parts.append(f"{name} {c['mean']:+.4f}{spread} ({c['n']} seed(s){test})")
    return ("Cost of each ablation (full QIN minus the ablation, click GAUC by request, paired "
            "per seed): " + "; ".join(parts) + ".")


def plot(report: Dict, path: str) -> None:
    """report.png: bars with values and error bars, learning curves, reliability diagrams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["rows"]
    names = [r["model"] for r in rows]
    calibration = [(r["model"], r.get("reliability")) for r in rows if r.get("reliability")]
    panels = 2 + bool(calibration)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.0))
    bars, curves = axes[0], axes[1]

    x = np.arange(len(rows))
    finite_values = []
    for offset, key, label, color in ((-0.2, "auc", "click AUC", "C0"),
                                      (0.2, "gauc_request", "click GAUC (request)", "C1")):
        values = [r[key] if math.isfinite(r[key]) else 0.0 for r in rows]
        errors = [r.get(f"{key}_std") or 0.0 for r in rows]
        finite_values += [v for v in values if v]
        drawn = bars.bar(x + offset, values, width=0.4, label=label, color=color,
                         yerr=errors if any(errors) else None, capsize=3)
        bars.bar_label(drawn, labels=[f"{v:.3f}" for v in values], fontsize=7, padding=2,
                       rotation=90)
    oracle = report.get("oracle")
    if oracle is not None:
        for key, color, label in (("auc", "C0", "oracle AUC"),
                                  ("gauc_request", "C1", "oracle GAUC (request)")):
            bars.axhline(oracle[key], color=color, linestyle="--", linewidth=1, label=label)
            finite_values.append(oracle[key])
    low = min(finite_values + [0.5]) - 0.02
    high = max(finite_values + [0.5])
    bars.set_ylim(max(0.0, low), min(1.0, high + 0.08))
    bars.set_xticks(x)
    bars.set_xticklabels(names, rotation=30, ha="right")
    bars.set_ylabel(f"{report['split']} split")
    seeds = len(report["seeds"])
    bars.set_title("Test metrics" + (f" (mean ± sd over {seeds} seeds)" if seeds > 1
                                     else " (one seed)"))
    bars.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    for i, row in enumerate(rows):
        for j, run in enumerate(row["per_seed"]):
            curve = [v if v is not None and math.isfinite(v) else np.nan
                     for v in run.get("eval_gauc_per_epoch", [])]
            if curve:
                curves.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3,
                            color=f"C{i}", alpha=0.9 if j == 0 else 0.4,
                            label=row["model"] if j == 0 else None)
    curves.set_xlabel("epoch")
    curves.set_ylabel("eval click GAUC (request)")
    curves.set_title("Learning curves (eval split, every seed)")
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.legend(fontsize=7, loc="lower right")

    if calibration:
        diagram = axes[2]
        diagram.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
        top = 0.05
        for i, (name, bins) in enumerate(calibration):
            diagram.plot(bins["mean_prediction"], bins["mean_label"], marker="o", markersize=3,
                         color=f"C{names.index(name)}", label=name)
            top = max([top] + list(bins["mean_prediction"]) + list(bins["mean_label"]))
        diagram.set_xlim(0, min(1.0, top * 1.1))
        diagram.set_ylim(0, min(1.0, top * 1.1))
        diagram.set_xlabel("mean predicted click probability (bin)")
        diagram.set_ylabel("observed click rate (bin)")
        diagram.set_title(f"Reliability, {report['split']} split (first seed)")
        diagram.legend(fontsize=7, loc="upper left")
    data_name = os.path.basename(os.path.normpath(report["data"]))
    fig.suptitle(f"{', '.join(names)} on {data_name}: {budget_line(report)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trial_settings(trial: int, learning_rate: float, config: Optional[str]) -> Dict:
    """The learning rate and the --config JSON of tuning trial `trial`: trial 0 is the
    command's own settings; trial t >= 1 draws every SEARCH_SPACE key with random.Random(t), so
    every preset gets the same trials, on top of the command's --config."""
    from trainer import config as config_lib

    overrides = config_lib.read_overrides(config) if config else {}
    if trial > 0:
        rng = random.Random(trial)
        drawn = {key: rng.choice(values) for key, values in SEARCH_SPACE.items()}
        learning_rate = drawn.pop("learning_rate")
        overrides = {**overrides, **drawn}
    return {"learning_rate": learning_rate,
            "config": json.dumps(overrides, sort_keys=True) if overrides else None}


def _task_arguments(args, preset: str, model_dir: str, seed: int) -> List[str]:
    argv = ["--data", args.data, "--model-dir", model_dir, "--model", preset,
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--learning-rate", str(args.learning_rate), "--seed", str(seed),
            "--early-stopping-patience", str(args.early_stopping_patience),
            "--log-every-steps", str(args.log_every_steps)]
    if args.steps_per_epoch:
        argv += ["--steps-per-epoch", str(args.steps_per_epoch)]
    if args.cold_start_rate is not None:
        argv += ["--cold-start-rate", str(args.cold_start_rate)]
    if args.config:
        argv += ["--config", args.config]
    return argv


def run_directories(output: str, preset: str, seed: int, trial: Optional[int] = None
                    ) -> Dict[str, str]:
    """Where one run's model, evaluation and log go; tuning trials get their own folders."""
    run = f"seed_{seed}" if trial is None else os.path.join(f"trial_{trial}", f"seed_{seed}")
    return {"model": os.path.join(output, "models", preset, run),
            "eval": os.path.join(output, "eval", preset, run),
            "log": os.path.join(output, "logs", f"{preset}_{run.replace(os.sep, '_')}.log")}


def run_one(args) -> None:
    """Trains and evaluates one preset and seed in this process (one process per run):
    `trainer.evaluate`'s metrics.json / metrics.md, plus reliability.json from the same
    predictions."""
    import tensorflow as tf

    from common import features as F
    from trainer import data as data_lib
    from trainer import evaluate, task
    from trainer import metrics as M
    from trainer import model as model_lib
    from trainer.config import ModelConfig

    preset, seed = args.run_one, args.seed
    dirs = run_directories(args.output, preset, seed, args.trial)
    task.train(task.build_parser().parse_args(_task_arguments(args, preset, dirs["model"],
                                                              seed)))
    tf.keras.backend.clear_session()
    metadata = F.DatasetMetadata.load(args.data)
    config = ModelConfig.load(dirs["model"])
    model = model_lib.load_trained_model(dirs["model"], args.data)
    dataset = data_lib.make_dataset(args.data, args.split, metadata, 256, for_training=False)
    flat = evaluate.predict_flat(model, dataset, metadata)
    result = evaluate.compute_metrics(flat, metadata, config, model.score_weights)
    result.update(split=args.split, model_type=config.model_type)
    evaluate.write_outputs(result, dirs["eval"], f"{config.model_type} on {args.split}")
    reliability = {}
    for name in F.binary_tasks(metadata.tasks):
        bins = M.reliability_bins(flat[f"label_{name}"], flat[f"pred_{name}"])
        reliability[name] = {"count": bins.count.tolist(),
                             "mean_prediction": bins.mean_prediction.tolist(),
                             "mean_label": bins.mean_label.tolist()}
    with open(os.path.join(dirs["eval"], RELIABILITY_JSON), "w") as f:
        json.dump(reliability, f, indent=2)


def _read_json(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _train_and_evaluate(args, preset: str, seed: int, trial: Optional[int],
                        settings: Dict) -> Dict[str, str]:
    """One neural run (trainer.task, then trainer.evaluate on --split) in its own process."""
    dirs = run_directories(args.output, preset, seed, trial)
    command = [sys.executable, "-m", "trainer.report", "--run-one", preset, "--data", args.data,
               "--output", args.output, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--learning-rate",
               str(settings["learning_rate"]), "--seed", str(seed),
               "--early-stopping-patience", str(args.early_stopping_patience),
               "--log-every-steps", str(args.log_every_steps), "--split", args.split]
    if trial is not None:
        command += ["--trial", str(trial)]
    if args.steps_per_epoch:
        command += ["--steps-per-epoch", str(args.steps_per_epoch)]
    if args.cold_start_rate is not None:
        command += ["--cold-start-rate", str(args.cold_start_rate)]
    if settings["config"]:
        command += ["--config", settings["config"]]
    label = f"{preset} seed {seed}" + ("" if trial is None else f" trial {trial}")
    _run(command, label, dirs["log"])
    return dirs


def _classical(args, preset: str, seed: int) -> Dict[str, str]:
    """One classical-baseline run (python -m trainer.classical); skipped when its metrics on
    this split are already there (it has no checkpoint to resume from)."""
    dirs = run_directories(args.output, preset, seed)
    done = _read_json(os.path.join(dirs["eval"], "metrics.json"))
    if done is not None and done.get("split") == args.split:
        logger.info("%s seed %d: evaluation on %s found, not refitted", preset, seed, args.split)
        return dirs
    _run([sys.executable, "-m", "trainer.classical", "--data", args.data, "--output",
          dirs["eval"], "--model", CLASSICAL_PRESETS[preset], "--seed", str(seed),
          "--split", args.split], f"{preset} seed {seed}", dirs["log"])
    return dirs


def _tune(args, preset: str, seed: int, done: List[int], total: int) -> Dict:
    """Runs the tuning trials of one neural preset with `seed`; the best by eval GAUC."""
    trials = []
    for trial in range(args.tuning_trials):
        settings = trial_settings(trial, args.learning_rate, args.config)
        done[0] += 1
        logger.info("[%d/%d] tuning %s, trial %d, seed %d: learning rate %g, config %s",
                    done[0], total, preset, trial, seed, settings["learning_rate"],
                    settings["config"] or "{}")
        try:
            dirs = _train_and_evaluate(args, preset, seed, trial, settings)
        except RuntimeError as e:  # e.g. a draw the data refuses (K2 above the data's K1)
            logger.warning("%s trial %d failed and is left out: %s", preset, trial, e)
            trials.append({"trial": trial, "eval_gauc": float("-inf"), "error": str(e),
                           **settings})
            continue
        summary = _read_json(os.path.join(dirs["model"], "training_summary.json")) or {}
        score = summary.get("best_eval_gauc")
        score = float(score) if score is not None and math.isfinite(score) else float("-inf")
        trials.append({"trial": trial, "eval_gauc": score, **settings})
    if all("error" in t for t in trials):
        raise RuntimeError(f"every tuning trial of {preset} failed; see its logs in "
                           f"{os.path.join(args.output, 'logs')}")
    best = max(trials, key=lambda t: t["eval_gauc"])  # ties: the earlier trial
    logger.info("%s: trial %d chosen (eval GAUC %.4f)", preset, best["trial"], best["eval_gauc"])
    return {"chosen": best, "trials": trials}


def _presets(args) -> List[str]:
    from trainer import config as config_lib

    known = list(config_lib.PRESETS) + list(CLASSICAL_PRESETS)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()] if args.presets \
        else list(config_lib.PRESETS) + list(DEFAULT_CLASSICAL)
    unknown = [p for p in presets if p not in known]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; choose from {', '.join(known)}")
    return presets


def run_report(args) -> Dict:
    presets = _presets(args)
    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if args.tuning_trials < 1:
        raise ValueError("--tuning-trials must be >= 1 (1: no tuning, the given settings)")
    if (args.summary is None) != (args.layout is None):
        raise ValueError("--summary and --layout go together: the summary file keeps one entry "
                         "per layout")
    from common import features as F

    F.DatasetMetadata.load(args.data)  # fail fast on a wrong --data
    if args.truth and not os.path.exists(args.truth):
        raise FileNotFoundError(f"--truth {args.truth} does not exist")
    os.makedirs(args.output, exist_ok=True)
    seeds = [args.seed + i for i in range(args.seeds)]
    tuned = args.tuning_trials > 1
    neural = [p for p in presets if p not in CLASSICAL_PRESETS]
    total = (len(presets) * len(seeds)
             + (len(neural) * (args.tuning_trials - 1) if tuned else 0))
    done = [0]
    rows, oracle_metrics, task, tuning = [], None, None, {}
    for preset in presets:
        runs, reliability = [], None
        settings, trial = trial_settings(0, args.learning_rate, args.config), None
        if tuned and preset in neural:
            tuning[preset] = _tune(args, preset, seeds[0], done, total)
            chosen = tuning[preset]["chosen"]
            trial = chosen["trial"]
            settings = {"learning_rate": chosen["learning_rate"], "config": chosen["config"]}
        for seed in seeds:
            if tuned and preset in neural and seed == seeds[0]:
                dirs = run_directories(args.output, preset, seed, trial)  # the trial's own run
            elif preset in CLASSICAL_PRESETS:
                done[0] += 1
                logger.info("[%d/%d] fitting %s, seed %d", done[0], total, preset, seed)
                dirs = _classical(args, preset, seed)
            else:
                done[0] += 1
                logger.info("[%d/%d] training %s, seed %d", done[0], total, preset, seed)
                dirs = _train_and_evaluate(args, preset, seed, trial, settings)
            metrics = _read_json(os.path.join(dirs["eval"], "metrics.json"))
            training = _read_json(os.path.join(dirs["model"], "training_summary.json"))
            oracle_metrics = oracle_metrics or metrics.get("oracle")
            task = next(iter(metrics["model"]["tasks"]))
            row = summarise(preset, metrics["model"], training, oracle_metrics)
            row["seed"] = seed
            runs.append(row)
            if reliability is None:
                reliability = (_read_json(os.path.join(dirs["eval"], RELIABILITY_JSON))
                               or {}).get(task)
        oracle_row = summarise("oracle", oracle_metrics, None, None) if oracle_metrics else None
        row = aggregate(preset, runs, oracle_row)
        row["reliability"] = reliability
        rows.append(row)
    oracle_row = summarise("oracle", oracle_metrics, None, None) if oracle_metrics else None
    report = {"data": args.data, "split": args.split, "seeds": seeds, "epochs": args.epochs,
              "early_stopping_patience": args.early_stopping_patience,
              "batch_size": args.batch_size, "learning_rate": args.learning_rate, "task": task,
              "cold_start_rate": args.cold_start_rate, "presets": presets, "rows": rows,
              "oracle": oracle_row,
              "tuning": {"trials": args.tuning_trials, "search_space": SEARCH_SPACE,
                         "selected_on": "best eval click GAUC by request, first seed",
                         "presets": tuning} if tuned else None}
    report["verdict"] = verdict(rows)
    report["ablations"] = ablation_costs(rows)
    with open(os.path.join(args.output, REPORT_JSON), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    with open(os.path.join(args.output, REPORT_MD), "w") as f:
        f.write(to_markdown(report))
    plot(report, os.path.join(args.output, REPORT_PNG))
    if args.summary:
        truth = None
        if args.truth:
            from preprocessing.synthetic_layouts import oracle_gauc

            truth = oracle_gauc(args.data, args.truth, args.split)
        write_layout_summary(args.summary, args.layout, report,
                             truth.nonpersonalized_oracle if truth else None,
                             truth.oracle if truth else None)
    return report


def layout_summary(report: Dict, nonpersonalized_oracle: Optional[float],
                   truth_oracle: Optional[float] = None) -> Dict:
    """One layout's entry of the summary file: the oracles and, per model, the mean and
    standard deviation of click GAUC by request over its seeds (and the per-seed values, so
    comparisons stay paired). The oracle comes from the side file when given (public layouts
    carry no true probabilities in their TFRecords), else from the evaluation's oracle row."""
    def number(value):
        return None if value is None or not math.isfinite(value) else float(value)

    oracle = report.get("oracle")
    if truth_oracle is None and oracle:
        truth_oracle = oracle["gauc_request"]
    return {"oracle": number(truth_oracle),
            "nonpersonalized_oracle": number(nonpersonalized_oracle),
            "split": report["split"], "task": report["task"], "budget": budget_line(report),
            "models": {r["model"]: {"gauc_mean": number(r["gauc_request"]),
                                    "gauc_std": number(r.get("gauc_request_std")),
                                    "seeds": len(r["per_seed"]),
                                    "per_seed": {str(p["seed"]): number(p["gauc_request"])
                                                 for p in r["per_seed"]}}
                       for r in report["rows"]}}


def write_layout_summary(path: str, layout: str, report: Dict,
                         nonpersonalized_oracle: Optional[float],
                         truth_oracle: Optional[float] = None) -> Dict:
    """Replaces `layout`'s entry of the summary JSON at `path` (created when missing; the
    other layouts are kept) and writes it atomically."""
    summary = _read_json(path) or {}
    summary[layout] = layout_summary(report, nonpersonalized_oracle, truth_oracle)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)
    logger.info("%s: layout %r written", path, layout)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.report",
        description="Train and evaluate QIN, every baseline and every ablation (the presets of "
                    "trainer.config) on one preprocessed dataset with the same seeds, and write "
                    "a comparison table (report.md, report.json: mean and standard deviation "
                    "over the seeds) and a figure (report.png: bars with values and error bars, "
                    "learning curves, reliability diagrams). On generated data the table "
                    "includes the oracle and the share of its lift each model captures. A "
                    f"winner is claimed only from >= {MIN_SEEDS_FOR_A_CLAIM} seeds. Re-running "
                    "resumes unfinished trainings.",
        formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True,
                        help="output of `python -m preprocessing` (for the default report: the "
                             "generated dataset of preprocessing.synthetic)")
    parser.add_argument("--output", required=True,
                        help="report directory (report.md, report.json, report.png, one "
                             "model directory and evaluation per preset, logs)")
    parser.add_argument("--presets", default=None,
                        help="comma-separated presets: those of trainer.config.PRESETS and the "
                             f"classical {', '.join(CLASSICAL_PRESETS)} (python -m "
                             "trainer.classical); default: every trainer.config preset and "
                             f"{', '.join(DEFAULT_CLASSICAL)}")
    parser.add_argument("--epochs", type=int, default=5,
                        help="maximum epochs per model (python -m trainer.task --epochs)")
    parser.add_argument("--batch-size", type=int, default=256, help="requests per batch")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="training steps per epoch; default: one pass over the train split")
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="Adam learning rate of every model")
    parser.add_argument("--seed", type=int, default=0,
                        help="first seed; every model is trained with the same seeds")
    parser.add_argument("--seeds", type=int, default=1,
                        help=f"number of seeds (--seed, --seed + 1, ...); a winner is claimed "
                             f"only from >= {MIN_SEEDS_FOR_A_CLAIM}, by a paired per-seed "
                             "comparison")
    parser.add_argument("--early-stopping-patience", type=int, default=2,
                        help="stop a model after this many epochs without a better eval GAUC "
                             "(0: never stop early)")
    parser.add_argument("--config", default=None,
                        help="JSON overrides applied to every preset (e.g. sizes)")
    parser.add_argument("--split", default="test", choices=("eval", "test"),
                        help="split the table is computed on")
    parser.add_argument("--log-every-steps", type=int, default=100,
                        help="training progress line every N steps (in each model's log)")
    parser.add_argument("--cold-start-rate", type=float, default=None,
                        help="python -m trainer.task --cold-start-rate for every neural run; "
                             "default: the trainer's")
    parser.add_argument("--tuning-trials", type=int, default=1,
                        help="trials per neural preset over learning rate, sizes and K2, the "
                             "same for every preset, chosen on eval GAUC with the first seed; "
                             "1: no tuning")
    parser.add_argument("--layout", default=None,
                        help="name of this data's layout in --summary (canonical, kuaisar, ...)")
    parser.add_argument("--summary", default=None,
                        help="JSON file that keeps one entry per layout (e.g. docs/report.json); "
                             "this report replaces --layout's entry")
    parser.add_argument("--truth", default=None,
                        help="generated side file (truth_probabilities.parquet of "
                             "preprocessing.synthetic_layouts): the oracle and the "
                             "non-personalized oracle in --summary")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal: one run
    parser.add_argument("--trial", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    try:
        if args.run_one:
            run_one(args)
            return 0
        report = run_report(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
