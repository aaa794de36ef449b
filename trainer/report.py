"""Comparison report: QIN, every baseline and every ablation on one dataset, one command.

    python -m trainer.report --data OUT --output R [--presets qin,dnn,...] [--epochs 5] \
        [--seed 0 --seeds 3]

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
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from common.cli import HelpFormatter

logger = logging.getLogger("trainer")

BASELINES = ("dnn", "din", "sim_hard", "sim_soft", "twin")
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
    verdict_text = report.get("verdict")
    if verdict_text:
        lines.append(verdict_text)
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


def _task_arguments(args, preset: str, model_dir: str, seed: int) -> List[str]:
    argv = ["--data", args.data, "--model-dir", model_dir, "--model", preset,
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--learning-rate", str(args.learning_rate), "--seed", str(seed),
            "--early-stopping-patience", str(args.early_stopping_patience),
            "--log-every-steps", str(args.log_every_steps)]
    if args.steps_per_epoch:
        argv += ["--steps-per-epoch", str(args.steps_per_epoch)]
    if args.config:
        argv += ["--config", args.config]
    return argv


def run_directories(output: str, preset: str, seed: int) -> Dict[str, str]:
    run = f"seed_{seed}"
    return {"model": os.path.join(output, "models", preset, run),
            "eval": os.path.join(output, "eval", preset, run),
            "log": os.path.join(output, "logs", f"{preset}_{run}.log")}


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
    dirs = run_directories(args.output, preset, seed)
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


def run_report(args) -> Dict:
    from trainer import config as config_lib

    presets = [p.strip() for p in args.presets.split(",") if p.strip()] if args.presets \
        else list(config_lib.PRESETS)
    unknown = [p for p in presets if p not in config_lib.PRESETS]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; choose from {', '.join(config_lib.PRESETS)}")
    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    from common import features as F

    F.DatasetMetadata.load(args.data)  # fail fast on a wrong --data
    os.makedirs(args.output, exist_ok=True)
    seeds = [args.seed + i for i in range(args.seeds)]
    python = sys.executable
    rows, oracle_metrics, task = [], None, None
    total, done = len(presets) * len(seeds), 0
    for preset in presets:
        runs, reliability = [], None
        for seed in seeds:
            done += 1
            dirs = run_directories(args.output, preset, seed)
            logger.info("[%d/%d] training %s, seed %d", done, total, preset, seed)
            command = [python, "-m", "trainer.report", "--run-one", preset, "--data", args.data,
                       "--output", args.output, "--epochs", str(args.epochs),
                       "--batch-size", str(args.batch_size), "--learning-rate",
                       str(args.learning_rate), "--seed", str(seed),
                       "--early-stopping-patience", str(args.early_stopping_patience),
                       "--log-every-steps", str(args.log_every_steps), "--split", args.split]
            if args.steps_per_epoch:
                command += ["--steps-per-epoch", str(args.steps_per_epoch)]
            if args.config:
                command += ["--config", args.config]
            _run(command, f"{preset} seed {seed}", dirs["log"])
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
              "presets": presets, "rows": rows, "oracle": oracle_row}
    report["verdict"] = verdict(rows)
    with open(os.path.join(args.output, REPORT_JSON), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    with open(os.path.join(args.output, REPORT_MD), "w") as f:
        f.write(to_markdown(report))
    plot(report, os.path.join(args.output, REPORT_PNG))
    return report


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
                        help="comma-separated presets; default: all of trainer.config.PRESETS")
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
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal: one run
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
