"""The pipeline's release gate: bless a candidate model only if it clears the absolute floors
and is not worse than the version being served, as TFX's Evaluator does.

    python -m pipelines.release_gate decide --metrics CANDIDATE/metrics.json \\
        --model-base-path B --model-name qin [--min-click-gauc 0.55] [--min-click-auc 0.55] \\
        [--min-gain-over-served 0.0] [--retrieval-metrics E/retrieval_metrics.json \\
        [--min-pdr-recall 0.0] [--max-pdr-recall-below-content 0.02]] [--output decision.json]
    python -m pipelines.release_gate record --metrics CANDIDATE/metrics.json \\
        --version-dir B/qin/3 [--name metrics.json]

`decide` reads the candidate's `trainer.evaluate` metrics.json and the metrics recorded beside
the latest served version, `B/<model_name>/<version>/assets.extra/metrics.json` (the latest
numeric version holding a saved_model.pb: what TF Serving's latest-version policy serves), and
prints the decision as JSON (exit code 0 either way; `blessed` says it):

* floors: the first task's GAUC by request >= --min-click-gauc and AUC >= --min-click-auc;
* served baseline: each of those metrics >= the served version's + --min-gain-over-served,
  computed on the same split (a served version evaluated on another split is not comparable:
  not blessed). Nothing served yet, or a served version without recorded metrics (exported
  by hand, or by a run older than this gate): floors only, and the decision says so.
* retrieval (only with --retrieval-metrics, the `trainer.evaluate_retrieval` output of the
  candidate's PDR): PDR recall@200 >= --min-pdr-recall (default 0.0: off, since what a floor
  means depends on the corpus size; random retrieval reaches 200 / corpus items) and >= the
  content baseline's recall@200 on the same requests - --max-pdr-recall-below-content
  (default 0.02). PDR fills most of the search call's candidates, so a PDR clearly worse than
  the non-personalized cosine baseline is not released; the margin tolerates the sampling
  noise of a small test split. Without the file the decision is the ranking checks alone.

`record` writes the candidate's metrics beside a version the export step has just published,
so the next run's gate compares with them (`--name retrieval_metrics.json` for the retrieval
metrics: kept for the record, the gate does not compare them with the served version's).
The served metrics come from that version's own evaluation run; when the data changed between
runs, the two test sets differ too.

Paths may be local or any filesystem tf.io.gfile reaches (gs://).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

# Beside a served version, in the folder TF Serving reserves for extra files.
SERVED_METRICS_PATH = os.path.join("assets.extra", "metrics.json")
SERVED_RETRIEVAL_METRICS_NAME = "retrieval_metrics.json"
SAVED_MODEL_FILE = "saved_model.pb"
# gated metric of evaluate's metrics.json (model.tasks.<first task>.<key>) -> floor flag
GATED_METRICS = {"gauc_request": "min_click_gauc", "auc": "min_click_auc"}
DEFAULT_FLOOR = 0.55
# retrieval check: trainer.evaluate_retrieval's retrieval_metrics.json, <source>.<metric>
RETRIEVAL_METRIC = "recall@200"
RETRIEVAL_SOURCE, RETRIEVAL_BASELINE = "pdr", "content"
DEFAULT_MIN_PDR_RECALL = 0.0
DEFAULT_MAX_PDR_RECALL_BELOW_CONTENT = 0.02
_NUMERIC = re.compile(r"^\d+/?$")


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _join(parent: str, name: str) -> str:
    return parent.rstrip("/") + "/" + name if "://" in parent else os.path.join(parent, name)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(path)


def read_json(path: str) -> Dict:
    with _gfile().GFile(path) as f:
        return json.load(f)


def latest_served_version(model_root: str) -> Optional[int]:
    """The largest numeric version folder of `model_root` holding a saved_model.pb, or None."""
    gfile = _gfile()
    if not gfile.isdir(model_root):
        return None
    versions = sorted((int(name.rstrip("/")) for name in gfile.listdir(model_root)
                       if _NUMERIC.match(name)), reverse=True)
    for version in versions:
        if gfile.exists(_join(_join(model_root, str(version)), SAVED_MODEL_FILE)):
            return version
    return None


def served_metrics(model_root: str) -> Tuple[Optional[int], Optional[Dict]]:
    """(latest served version, its recorded metrics or None)."""
    version = latest_served_version(model_root)
    if version is None:
        return None, None
    path = _join(_join(model_root, str(version)), SERVED_METRICS_PATH)
    return version, (read_json(path) if _gfile().exists(path) else None)


def record(metrics: Dict, version_dir: str, name: str = "metrics.json") -> str:
    """Writes `metrics` to <version_dir>/assets.extra/<name>; returns the path."""
    gfile = _gfile()
    path = _join(_join(version_dir, _parent(SERVED_METRICS_PATH)), name)
    gfile.makedirs(_parent(path))
    temporary = path + ".tmp"
    with gfile.GFile(temporary, "w") as f:
        f.write(json.dumps(metrics, indent=2, sort_keys=True))
    gfile.rename(temporary, path, overwrite=True)
    return path


def _gated_values(metrics: Dict) -> Tuple[str, Dict[str, float]]:
    tasks = metrics["model"]["tasks"]
    task = next(iter(tasks))
    return task, {key: float(tasks[task].get(key, float("nan"))) for key in GATED_METRICS}


def _retrieval_value(retrieval: Dict, source: str) -> float:
    values = retrieval.get(source)
    value = values.get(RETRIEVAL_METRIC) if isinstance(values, dict) else None
    return float("nan") if value is None else float(value)


def retrieval_checks(retrieval: Dict, min_pdr_recall: float = DEFAULT_MIN_PDR_RECALL,
                     max_below_content: float = DEFAULT_MAX_PDR_RECALL_BELOW_CONTENT
                     ) -> List[Dict]:
    """The retrieval checks of a `trainer.evaluate_retrieval` retrieval_metrics.json: PDR
    recall@200 against the floor and against the content baseline minus the margin."""
    pdr = _retrieval_value(retrieval, RETRIEVAL_SOURCE)
    content = _retrieval_value(retrieval, RETRIEVAL_BASELINE)
    metric = f"{RETRIEVAL_SOURCE}_{RETRIEVAL_METRIC}"
    floor = float(min_pdr_recall)
    threshold = content - float(max_below_content)
    return [{"metric": metric, "candidate": pdr, "against": "floor", "threshold": floor,
             "passed": pdr >= floor},
            {"metric": metric, "candidate": pdr,
             "against": f"{RETRIEVAL_BASELINE} baseline - {float(max_below_content):g}",
             "baseline": content, "threshold": threshold, "passed": pdr >= threshold}]


def decide(candidate: Dict, floors: Dict[str, float], served: Optional[Dict] = None,
           served_version: Optional[int] = None, min_gain_over_served: float = 0.0,
           retrieval: Optional[Dict] = None, min_pdr_recall: float = DEFAULT_MIN_PDR_RECALL,
           max_pdr_recall_below_content: float = DEFAULT_MAX_PDR_RECALL_BELOW_CONTENT) -> Dict:
    """The gate's decision: {"blessed", "baseline", "checks": [...], "reasons": [...]}.

    `floors`: GATED_METRICS flag name -> minimum; `served`: the served version's metrics.json
    (None: floors only); `retrieval`: the candidate's retrieval_metrics.json (None: no
    retrieval check). NaN never passes."""
    task, values = _gated_values(candidate)
    checks: List[Dict] = []
    reasons: List[str] = []
    for key, flag in GATED_METRICS.items():
        floor = float(floors[flag])
        passed = values[key] >= floor
        checks.append({"metric": f"{task}_{key}", "candidate": values[key],
                       "against": "floor", "threshold": floor, "passed": passed})
    if served_version is None:
        baseline = "floor only: no version is served yet"
    elif served is None:
        baseline = (f"floor only: served version {served_version} has no recorded metrics "
                    f"({SERVED_METRICS_PATH})")
    elif served.get("split") != candidate.get("split"):
        baseline = f"served version {served_version}"
        reasons.append(f"served version {served_version} was evaluated on split "
                       f"{served.get('split')!r}, the candidate on {candidate.get('split')!r}: "
                       "not comparable")
    else:
        baseline = f"served version {served_version}"
        served_task, served_values = _gated_values(served)
        if served_task != task:
            reasons.append(f"served version {served_version} was gated on task "
                           f"{served_task!r}, the candidate on {task!r}: not comparable")
        else:
            for key in GATED_METRICS:
                threshold = served_values[key] + min_gain_over_served
                passed = values[key] >= threshold
                checks.append({"metric": f"{task}_{key}", "candidate": values[key],
                               "against": f"version {served_version}",
                               "served": served_values[key], "threshold": threshold,
                               "passed": passed})
    if retrieval is not None:
        checks += retrieval_checks(retrieval, min_pdr_recall, max_pdr_recall_below_content)
    for check in checks:
        if not check["passed"]:
            reasons.append(f"{check['metric']} {check['candidate']:.4f} < {check['threshold']:.4f}"
                           f" ({check['against']})")
    decision = {"blessed": not reasons, "baseline": baseline, "served_version": served_version,
                "split": candidate.get("split"), "checks": checks, "reasons": reasons}
    if retrieval is not None:
        decision["retrieval_split"] = (retrieval.get("run") or {}).get("split")
    return decision


def summary_line(decision: Dict) -> str:
    """One line for logs: every check, the baseline and PASS / FAIL."""
    parts = []
    for check in decision["checks"]:
        value = check["candidate"]
        shown = f"{value:.4f}" if math.isfinite(value) else "nan"
        parts.append(f"{check['metric']} {shown} >= {check['threshold']:.4f} "
                     f"({check['against']})")
    verdict = "PASS" if decision["blessed"] else "FAIL"
    why = "" if decision["blessed"] else "; " + "; ".join(decision["reasons"])
    return (f"release gate vs {decision['baseline']}: " + ", ".join(parts)
            + f" -> {verdict}{why}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.release_gate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    decide_cmd = commands.add_parser("decide", help="bless or reject a candidate (JSON out)")
    decide_cmd.add_argument("--metrics", required=True,
                            help="the candidate's metrics.json (python -m trainer.evaluate)")
    decide_cmd.add_argument("--model-base-path", required=True,
                            help="folder (or gs:// URL) holding <model-name>/<version>/")
    decide_cmd.add_argument("--model-name", default="qin", help="(default: qin)")
    decide_cmd.add_argument("--min-click-gauc", type=float, default=DEFAULT_FLOOR,
                            help=f"floor of the first task's GAUC by request (default: "
                                 f"{DEFAULT_FLOOR})")
    decide_cmd.add_argument("--min-click-auc", type=float, default=DEFAULT_FLOOR,
                            help=f"floor of the first task's AUC (default: {DEFAULT_FLOOR})")
    decide_cmd.add_argument("--min-gain-over-served", type=float, default=0.0,
                            help="how much each gated metric must exceed the served "
                                 "version's (default: 0.0, i.e. not worse)")
    decide_cmd.add_argument("--retrieval-metrics", default=None,
                            help="the candidate PDR's retrieval_metrics.json (python -m "
                                 "trainer.evaluate_retrieval); adds the retrieval checks "
                                 "(default: none)")
    decide_cmd.add_argument("--min-pdr-recall", type=float, default=DEFAULT_MIN_PDR_RECALL,
                            help=f"floor of PDR {RETRIEVAL_METRIC} (default: "
                                 f"{DEFAULT_MIN_PDR_RECALL}, i.e. off)")
    decide_cmd.add_argument("--max-pdr-recall-below-content", type=float,
                            default=DEFAULT_MAX_PDR_RECALL_BELOW_CONTENT,
                            help=f"how far PDR {RETRIEVAL_METRIC} may fall below the content "
                                 f"baseline's (default: "
                                 f"{DEFAULT_MAX_PDR_RECALL_BELOW_CONTENT})")
    decide_cmd.add_argument("--output", default=None,
                            help="also write the decision JSON to this file")
    record_cmd = commands.add_parser("record", help="write metrics beside a published version")
    record_cmd.add_argument("--metrics", required=True, help="metrics.json to record")
    record_cmd.add_argument("--version-dir", required=True,
                            help="the published version folder, B/<model-name>/<version>")
    record_cmd.add_argument("--name", default="metrics.json",
                            help="file name under <version-dir>/assets.extra (default: "
                                 f"metrics.json; {SERVED_RETRIEVAL_METRICS_NAME} for the "
                                 "retrieval metrics)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    candidate = read_json(args.metrics)
    if args.command == "record":
        print(record(candidate, args.version_dir, args.name))
        return 0
    version, served = served_metrics(_join(args.model_base_path, args.model_name))
    retrieval = read_json(args.retrieval_metrics) if args.retrieval_metrics else None
    decision = decide(candidate, {"min_click_gauc": args.min_click_gauc,
                                  "min_click_auc": args.min_click_auc},
                      served, version, args.min_gain_over_served, retrieval,
                      args.min_pdr_recall, args.max_pdr_recall_below_content)
    text = json.dumps(decision, indent=2)
    if args.output:
        with _gfile().GFile(args.output, "w") as f:
            f.write(text)
    print(summary_line(decision), file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
