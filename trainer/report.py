"""Comparison report: QIN, every baseline and every ablation on one dataset, one command.

    python -m trainer.report --data OUT --output R [--presets qin,dnn,...] [--epochs 5]

trains every preset of `trainer.config` (or the ones given) with the code of
`python -m trainer.task` on the same data with the same seed, evaluates each with the code of
`python -m trainer.evaluate` on the test split (one process per preset), and writes

  R/report.md    Markdown table, one row per model plus the oracle (generated data)
  R/report.json  the same numbers, machine-readable
  R/report.png   bar chart of click AUC and click GAUC by request
  R/models/<preset>/, R/eval/<preset>/   each model's directory and metrics

For generated data (true probabilities known) the table states how much of the oracle's lift
over random each model captures: (metric - 0.5) / (oracle metric - 0.5), for click AUC and click
GAUC by request. Each preset runs in its own process (clean TensorFlow state, memory returned),
and runs are resumable: re-running the command continues unfinished trainings and re-evaluates.

The default report dataset is the generated one:

    python -m preprocessing.synthetic --output RAW
    python -m preprocessing --input-format canonical ... --output OUT   (see its --help)
    python -m trainer.report --data OUT --output R
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

from common.cli import HelpFormatter

logger = logging.getLogger("trainer")

BASELINES = ("dnn", "din", "sim_hard", "sim_soft", "twin")
REPORT_MD, REPORT_JSON, REPORT_PNG = "report.md", "report.json", "report.png"


def _run(command: List[str], label: str, log_path: str) -> None:
    """Runs a CLI, streams its log to a file and shows progress lines prefixed by `label`."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, cwd=os.getcwd())
        for line in process.stdout:
            log.write(line)
            if (" INFO epoch " in line or " INFO done" in line or " INFO wrote " in line
                    or "error" in line.lower()):
                print(f"[{label}] {line.rstrip()}", flush=True)
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"{label} failed with exit code {code}; see {log_path}")
    logger.info("%s finished in %.1fs", label, time.time() - start)


def summarise(preset: str, metrics: Dict, training: Optional[Dict], oracle: Optional[Dict]
              ) -> Dict[str, object]:
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
                   best_eval_gauc=training.get("best_eval_gauc"))
    return row


def _fmt(value, percent=False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{100 * value:.1f}%" if percent else f"{value:.4f}"


def to_markdown(report: Dict) -> str:
    rows = report["rows"]
    has_oracle = report.get("oracle") is not None
    header = ["model", "click AUC", "click GAUC (request)", "GAUC (user)", "log loss",
              "NDCG@10", "MRR"]
    if has_oracle:
        header += ["AUC lift captured", "GAUC lift captured"]
    header += ["best epoch / epochs"]
    lines = [f"# Model comparison on `{report['data']}` ({report['split']} split)", "",
             f"Same data, seed {report['seed']}, {report['epochs']} epochs max, batch "
             f"{report['batch_size']} requests, learning rate {report['learning_rate']}. "
             f"Task for AUC/GAUC and relevance for ranking metrics: `{report['task']}`.", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]

    def line(r, is_oracle=False):
        cells = [("**oracle** (true probabilities)" if is_oracle else r["model"]),
                 _fmt(r["auc"]), _fmt(r["gauc_request"]), _fmt(r["gauc_user"]),
                 _fmt(r["logloss"]), _fmt(r["ndcg@10"]), _fmt(r["mrr"])]
        if has_oracle:
            cells += (["100%", "100%"] if is_oracle else
                      [_fmt(r.get("auc_lift_captured"), True),
                       _fmt(r.get("gauc_request_lift_captured"), True)])
        cells.append("" if is_oracle else f"{_fmt(r.get('best_epoch'))} / {_fmt(r.get('epochs'))}")
        return "| " + " | ".join(cells) + " |"

    if has_oracle:
        lines.append(line(report["oracle"], True))
    lines += [line(r) for r in rows]
    lines += ["", "Lift captured = (model - 0.5) / (oracle - 0.5): the share of the best "
                  "achievable improvement over random ranking.", ""]
    verdict = report.get("verdict")
    if verdict:
        lines.append(verdict)
    return "\n".join(lines) + "\n"


def verdict(rows: List[Dict]) -> Optional[str]:
    by_model = {r["model"]: r for r in rows}
    if "qin" not in by_model:
        return None
    baselines = [by_model[b] for b in BASELINES if b in by_model]
    if not baselines:
        return None
    qin = by_model["qin"]["gauc_request"]
    margins = {b["model"]: qin - b["gauc_request"] for b in baselines}
    best = max(baselines, key=lambda r: r["gauc_request"])
    wins = all(m > 0 for m in margins.values())
    detail = ", ".join(f"{k} {v:+.4f}" for k, v in margins.items())
    return (f"QIN {'beats' if wins else 'does NOT beat'} every baseline on click GAUC by request "
            f"(QIN {qin:.4f}; best baseline {best['model']} {best['gauc_request']:.4f}; "
            f"QIN minus baseline: {detail}).")


def plot(report: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["rows"]
    names = [r["model"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    for offset, key, label in ((-0.2, "auc", "click AUC"),
                               (0.2, "gauc_request", "click GAUC (request)")):
        values = [r[key] if math.isfinite(r[key]) else 0.0 for r in rows]
        ax.bar(x + offset, values, width=0.4, label=label)
    if report.get("oracle") is not None:
        ax.axhline(report["oracle"]["auc"], color="C0", linestyle="--", linewidth=1,
                   label="oracle AUC")
        ax.axhline(report["oracle"]["gauc_request"], color="C1", linestyle="--", linewidth=1,
                   label="oracle GAUC (request)")
    ax.axhline(0.5, color="grey", linewidth=0.8)
    finite = [v for r in rows for v in (r["auc"], r["gauc_request"]) if math.isfinite(v)]
    low = min(finite + [0.5]) - 0.02
    ax.set_ylim(max(0.0, low), 1.0)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("metric on the test split")
    ax.set_title(f"Ranking models on {os.path.basename(os.path.normpath(report['data']))}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _task_arguments(args, preset: str, model_dir: str) -> List[str]:
    argv = ["--data", args.data, "--model-dir", model_dir, "--model", preset,
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--learning-rate", str(args.learning_rate), "--seed", str(args.seed),
            "--early-stopping-patience", str(args.early_stopping_patience),
            "--log-every-steps", str(args.log_every_steps)]
    if args.steps_per_epoch:
        argv += ["--steps-per-epoch", str(args.steps_per_epoch)]
    if args.config:
        argv += ["--config", args.config]
    return argv


def run_one(args) -> None:
    """Trains and evaluates one preset in this process (the report runs one process each)."""
    import tensorflow as tf

    from trainer import evaluate, task

    preset = args.run_one
    model_dir = os.path.join(args.output, "models", preset)
    task.train(task.build_parser().parse_args(_task_arguments(args, preset, model_dir)))
    tf.keras.backend.clear_session()
    evaluate.evaluate(args.data, model_dir, args.split, os.path.join(args.output, "eval", preset))


def run_report(args) -> Dict:
    from trainer import config as config_lib

    presets = [p.strip() for p in args.presets.split(",") if p.strip()] if args.presets \
        else list(config_lib.PRESETS)
    unknown = [p for p in presets if p not in config_lib.PRESETS]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; choose from {', '.join(config_lib.PRESETS)}")
    from common import features as F

    F.DatasetMetadata.load(args.data)  # fail fast on a wrong --data
    os.makedirs(args.output, exist_ok=True)
    python = sys.executable
    rows, oracle_metrics, task = [], None, None
    for i, preset in enumerate(presets, 1):
        model_dir = os.path.join(args.output, "models", preset)
        eval_dir = os.path.join(args.output, "eval", preset)
        log_path = os.path.join(args.output, "logs", f"{preset}.log")
        logger.info("[%d/%d] training %s", i, len(presets), preset)
        command = [python, "-m", "trainer.report", "--run-one", preset, "--data", args.data,
                   "--output", args.output, "--epochs", str(args.epochs),
                   "--batch-size", str(args.batch_size), "--learning-rate",
                   str(args.learning_rate), "--seed", str(args.seed),
                   "--early-stopping-patience", str(args.early_stopping_patience),
                   "--log-every-steps", str(args.log_every_steps), "--split", args.split]
        if args.steps_per_epoch:
            command += ["--steps-per-epoch", str(args.steps_per_epoch)]
        if args.config:
            command += ["--config", args.config]
        _run(command, preset, log_path)
        with open(os.path.join(eval_dir, "metrics.json")) as f:
            metrics = json.load(f)
        training = None
        summary_path = os.path.join(model_dir, "training_summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                training = json.load(f)
        oracle_metrics = oracle_metrics or metrics.get("oracle")
        task = next(iter(metrics["model"]["tasks"]))
        rows.append(summarise(preset, metrics["model"], training, oracle_metrics))
    oracle_row = summarise("oracle", oracle_metrics, None, None) if oracle_metrics else None
    report = {"data": args.data, "split": args.split, "seed": args.seed, "epochs": args.epochs,
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
                    "trainer.config) on one preprocessed dataset with the same seed, and write "
                    "a comparison table (report.md, report.json) and chart (report.png). On "
                    "generated data the table includes the oracle and the share of its lift "
                    "each model captures. Re-running resumes unfinished trainings.",
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
    parser.add_argument("--seed", type=int, default=0, help="the same seed for every model")
    parser.add_argument("--early-stopping-patience", type=int, default=2,
                        help="stop a model after this many epochs without a better eval GAUC "
                             "(0: never stop early)")
    parser.add_argument("--config", default=None,
                        help="JSON overrides applied to every preset (e.g. sizes)")
    parser.add_argument("--split", default="test", choices=("eval", "test"),
                        help="split the table is computed on")
    parser.add_argument("--log-every-steps", type=int, default=100,
                        help="training progress line every N steps (in each model's log)")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal
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
