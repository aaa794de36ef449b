"""`make demo`: the whole flow on generated data, end to end, on this machine.

  1. the Kubeflow pipeline through kfp.local: generate logs -> Beam preprocessing -> train QIN
     -> evaluate (with the oracle's row); build the item-to-item table, train PDR, evaluate
     retrieval (PDR vs the content baseline) -> release gate (floors, not worse than the
     served version, PDR recall@200) -> export a TF Serving model version, and PDR's query
     tower and index beside it;
  2. a small comparison (QIN against baselines) with its figure: one seed and the pipeline's
     budget, so it shows the tooling, not which model is better;
  3. the project's TF Serving-protocol gRPC server on 127.0.0.1 serving the latest version;
  4. search (serving.search: QRCF on the pipeline's item-to-item table, the exported PDR and
     the content baseline, merged, ranked by QIN) for a few users and queries: readable ranked
     lists with the retrievers that found each item, the behaviours that drove them, their
     relevance to the query and the user's engagement;
  5. where the metrics table, the figures, the TensorBoard logs and the logs are.

Every long step prints a counted line with its elapsed time; the output of the steps themselves
(TensorFlow, Beam, KFP's executor logs) goes to log files under OUTPUT/logs/, whose paths are
printed. --verbose shows it all on the terminal as well.

    python -m pipelines.demo --output demo_output [--verbose]
"""
import argparse
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from typing import List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "qin"
DEMO_STEPS = 4


def _header(step: int, text: str, log_path: Optional[str] = None) -> None:
    where = f"   (log: {log_path})" if log_path else ""
    print(f"\n== {step}/{DEMO_STEPS}  {text}{where}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(address: str, timeout_s: float = 120.0) -> None:
    """Blocks until the server's gRPC health service reports SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.time() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"the server at {address} did not become SERVING in {timeout_s:.0f}s")


def _task_dir(run_dir: str, task: str) -> str:
    if os.path.isdir(os.path.join(run_dir, task)):  # "train", not "train-pdr"
        return os.path.join(run_dir, task)
    matches = sorted(glob.glob(os.path.join(run_dir, task + "*")))
    if not matches:
        raise FileNotFoundError(f"no '{task}' step output under {run_dir}")
    return matches[0]


def _sample_user_queries(raw_dir: str, count: int):
    """(user, query text, request time in ms) of the last generated search requests."""
    import pyarrow.parquet as pq

    vocab = pq.read_table(os.path.join(raw_dir, "query_vocab.parquet"),
                          columns=["token_id", "word"]).to_pydict()
    words = dict(zip(vocab["token_id"], vocab["word"]))
    requests = pq.read_table(os.path.join(raw_dir, "requests.parquet"),
                             columns=["user_id", "timestamp", "query_tokens"]).to_pandas()
    latest = requests.sort_values("timestamp").drop_duplicates("user_id", keep="last")
    for row in latest.tail(count).itertuples():
        yield row.user_id, " ".join(words[t] for t in row.query_tokens), int(row.timestamp)


def _pipeline_steps() -> int:
    from pipelines.pipeline import qin_pipeline

    return len(qin_pipeline.pipeline_spec.deployment_spec["executors"])


def _quiet_this_process() -> None:
    """Framework noise of the demo's own process (it imports TensorFlow for the search)."""
    # 3 also hides cuInit's error on GPU-less hosts when the PDR tower loads; importing the
    # project (`common`) already set the default 2, so that value is raised, a user's kept
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") == "2":
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("tensorflow", "absl", "kfp"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output",
                        help="where everything is written (default: demo_output)")
    parser.add_argument("--users", type=int, default=300, help="generated users (default: 300)")
    parser.add_argument("--items", type=int, default=1500, help="generated items (default: 1500)")
    parser.add_argument("--requests", type=int, default=6000,
                        help="generated search requests (default: 6000)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="training epochs, pipeline and comparison alike (default: 3)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="requests per batch, pipeline and comparison alike (default: 64)")
    parser.add_argument("--pdr-epochs", type=int, default=2,
                        help="PDR (retrieval) training epochs in the pipeline (default: 2)")
    parser.add_argument("--lifelong-users", type=int, default=0,
                        help="users with 10^4-10^5 behaviours; also switches the long-term "
                             "sequence to stage-1 (query-relevant) preselection (default: 0)")
    parser.add_argument("--report-presets", default="qin,din,dnn",
                        help="models compared in the demo's report, '' to skip it "
                             "(default: qin,din,dnn)")
    parser.add_argument("--seed", type=int, default=7, help="(default: 7)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show every line of the steps' logs (TensorFlow, Beam, KFP)")
    return parser


def run_pipeline(args, output: str, base_path: str, log_path: str) -> str:
    """The KFP pipeline through `python -m pipelines.run_local`; returns the run directory."""
    from pipelines import progress

    pipeline_root = os.path.join(output, "pipeline_runs")
    os.makedirs(pipeline_root, exist_ok=True)
    before = set(os.listdir(pipeline_root))
    command = [sys.executable, "-m", "pipelines.run_local", "--pipeline-root", pipeline_root,
               "--users", str(args.users), "--items", str(args.items),
               "--requests", str(args.requests), "--seed", str(args.seed),
               "--lifelong-users", str(args.lifelong_users), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--pdr-epochs", str(args.pdr_epochs),
               "--long-term-mode", "stage1" if args.lifelong_users else "recent",
               "--model-base-path", base_path, "--model-name", MODEL_NAME]
    env = progress.quiet_environment()
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    code = progress.run_logged(command, log_path, progress.KfpStages(_pipeline_steps()),
                               verbose=args.verbose, label="pipeline", env=env, cwd=REPO_ROOT)
    if code:
        sys.stdout.writelines(progress.tail(log_path))
        raise RuntimeError(f"the pipeline failed (exit code {code}); the whole log: {log_path}")
    new = sorted(set(os.listdir(pipeline_root)) - before)
    if not new:
        raise RuntimeError(f"the pipeline wrote no run directory under {pipeline_root}")
    return os.path.join(pipeline_root, new[-1])


def first_table(markdown: str) -> str:
    """The Markdown up to the end of its first table (title, counts, per-task metrics)."""
    lines, in_table = [], False
    for line in markdown.splitlines():
        if in_table and not line.startswith("|"):
            break
        in_table = in_table or line.startswith("|")
        lines.append(line)
    return "\n".join(lines)


def _test_gauc(metrics_path: str) -> float:
    with open(metrics_path) as f:
        metrics = json.load(f)
    tasks = metrics["model"]["tasks"]
    return float(tasks[next(iter(tasks))]["gauc_request"])


def run_report(args, data_dir: str, report_dir: str, log_path: str) -> dict:
    """The comparison with the pipeline's budget (epochs, batch size, seed, no early stop),
    so its QIN is trained like the pipeline's."""
    from pipelines import progress

    command = [sys.executable, "-m", "trainer.report", "--data", data_dir, "--output",
               report_dir, "--presets", args.report_presets, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--seeds", "1",
               "--early-stopping-patience", "0"]

    def watch(line: str) -> Optional[str]:
        text = line.rstrip()
        if " INFO [" in text and "] training " in text:  # "[2/3] training din, seed 7"
            return "   " + text.split(" INFO ", 1)[1]
        if " INFO " in text and " finished in " in text:  # "din seed 7 finished in 81.0s"
            return "      " + text.split(" INFO ", 1)[1]
        if text.startswith("[") and "] " in text:  # a run's epoch / done lines
            return "      " + text
        return None

    code = progress.run_logged(command, log_path, watch, verbose=args.verbose, label="report",
                               env=progress.quiet_environment(), cwd=REPO_ROOT)
    if code:
        sys.stdout.writelines(progress.tail(log_path))
        raise RuntimeError(f"the comparison failed (exit code {code}); log: {log_path}")
    with open(os.path.join(report_dir, "report.json")) as f:
        return json.load(f)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_this_process()
    from pipelines import progress, release_gate

    started = time.monotonic()
    output = os.path.abspath(args.output)
    logs = os.path.join(output, "logs")
    os.makedirs(logs, exist_ok=True)
    base_path = os.path.join(output, "models")
    model_root = os.path.join(base_path, MODEL_NAME)

    log = os.path.join(logs, "pipeline.log")
    _header(1, "Kubeflow pipeline (kfp.local): generate -> preprocess -> train -> evaluate; "
               "i2i table, PDR -> retrieval eval -> release gate -> export", log)
    run_dir = run_pipeline(args, output, base_path, log)
    raw_dir = os.path.join(_task_dir(run_dir, "acquire-raw-logs"), "raw")
    data_dir = os.path.join(_task_dir(run_dir, "preprocess"), "data")
    model_dir = os.path.join(_task_dir(run_dir, "train"), "model")
    item_to_item_dir = os.path.join(_task_dir(run_dir, "build-item-to-item"), "item_to_item")
    pdr_dir = os.path.join(_task_dir(run_dir, "train-pdr"), "pdr_model")
    retrieval_json = os.path.join(_task_dir(run_dir, "evaluate-retrieval"), "metrics.json")
    evaluate_dir = _task_dir(run_dir, "evaluate")
    # KFP names an output artifact's file after the output ("report", no extension); the
    # reader gets copies named for what they are, beside the demo's other outputs.
    evaluation = os.path.join(output, "evaluation")
    os.makedirs(evaluation, exist_ok=True)
    metrics_table = shutil.copyfile(os.path.join(evaluate_dir, "report"),
                                    os.path.join(evaluation, "metrics.md"))
    metrics_json = shutil.copyfile(os.path.join(evaluate_dir, "metrics.json"),
                                   os.path.join(evaluation, "metrics.json"))
    print()
    print(first_table(open(metrics_table).read()))
    print(f"(every metric: {metrics_table})")
    print(retrieval_line(retrieval_json))
    decision_path = os.path.join(_task_dir(run_dir, "release-gate"), "decision")
    if os.path.exists(decision_path):
        print(release_gate.summary_line(release_gate.read_json(decision_path)))
    served_version = release_gate.latest_served_version(model_root)
    if served_version is None:
        print("the release gate did not pass and no version was ever exported: nothing to "
              "serve", file=sys.stderr)
        return 1
    print(f"serving version {served_version} of {model_root}")
    pipeline_gauc = _test_gauc(metrics_json)

    report_dir = os.path.join(output, "report")
    if args.report_presets:
        log = os.path.join(logs, "report.log")
        _header(2, f"comparison: {args.report_presets} (one seed, the pipeline's budget)", log)
        report = run_report(args, data_dir, report_dir, log)
        print()
        for row in report["rows"]:
            print(f"   {row['model']:<6} test click GAUC (request) {row['gauc_request']:.4f}, "
                  f"AUC {row['auc']:.4f}")
        qin_rows = [r for r in report["rows"] if r["model"] == "qin"]
        if qin_rows:
            compared = qin_rows[0]["gauc_request"]
            why = ("the same model" if abs(compared - pipeline_gauc) < 1e-4 else
                   "training is not bit-reproducible across processes")
            print(f"\n   QIN test click GAUC: pipeline {pipeline_gauc:.4f}, comparison "
                  f"{compared:.4f} (retrained with the same data, seed and budget: {why})")
        improving = [r["model"] for r in report["rows"] if r.get("still_improving")]
        print(f"   Not a quality claim: one seed and a fixed budget of {args.epochs} epochs"
              + (f"; still improving at the last epoch: {', '.join(improving)}" if improving
                 else "") + ". For a claim: `python -m trainer.report --seeds 3` on a larger "
              "dataset (docs/REPORT.md).")
        if report.get("verdict"):
            print(f"   {report['verdict']}")
    else:
        _header(2, "comparison skipped (--report-presets '')")

    log = os.path.join(logs, "model_server.log")
    _header(3, "TF Serving-protocol gRPC server on 127.0.0.1", log)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    with open(log, "a") as server_log:
        # TF Serving semantics: the model base path is the folder holding the numeric versions.
        server = subprocess.Popen(
            [sys.executable, "-m", "serving.model_server", "--model-base-path", model_root,
             "--model-name", MODEL_NAME, "--port", str(port), "--rest-api-port", "0"],
            stdout=server_log, stderr=subprocess.STDOUT, env=progress.quiet_environment(),
            cwd=REPO_ROOT)
    try:
        server_started = time.monotonic()
        _wait_serving(address)
        print(f"   serving {model_root} (version {served_version}) at {address}, ready in "
              f"{progress.elapsed(time.monotonic() - server_started)}")
        _header(4, "search: (user, query) -> ranked list, explained")
        search_examples(data_dir, raw_dir, address, item_to_item_dir, base_path,
                        served_version)
    finally:
        server.terminate()  # SIGTERM: the server drains in-flight requests and exits
        server.wait(timeout=60)

    print(f"\n== where things are (demo took {progress.elapsed(time.monotonic() - started)})")
    tensorboard = os.path.join(model_dir, "logs")
    print(f"metrics table     {metrics_table}")
    print(f"metrics (JSON)    {metrics_json}")
    if args.report_presets:
        print(f"comparison        {os.path.join(report_dir, 'report.md')}, "
              f"{os.path.join(report_dir, 'report.png')}")
    print(f"TensorBoard       .venv/bin/tensorboard --logdir {tensorboard}   (train/, eval/)")
    print(f"exported model    {model_root}  (saved_model_cli show --all --dir <version dir>)")
    print(f"PDR export        {os.path.join(base_path, 'pdr_query')}, "
          f"{os.path.join(base_path, 'pdr_index')}  (beside each version; model {pdr_dir})")
    print(f"item-to-item      {item_to_item_dir}")
    print(f"retrieval metrics {retrieval_json}")
    print(f"serve it again    .venv/bin/python -m serving.model_server "
          f"--model-base-path {model_root} --model-name {MODEL_NAME} --port 8500")
    print(f"logs              {logs}")
    print(json.dumps({"run_dir": run_dir, "data": data_dir, "model": model_dir,
                      "pdr": pdr_dir, "item_to_item": item_to_item_dir}, indent=2))
    return 0


def retrieval_line(metrics_path: str) -> str:
    """Recall@200 of each retrieval source from the pipeline's retrieval evaluation."""
    with open(metrics_path) as f:
        metrics = json.load(f)
    found = [f"{source} {metrics[source]['recall@200']:.4f}"
             for source in ("pdr", "content", "qrcf", "merged")
             if isinstance(metrics.get(source), dict) and "recall@200" in metrics[source]]
    run = metrics.get("run", {})
    return (f"retrieval recall@200 of clicked items ({run.get('split')} split, "
            f"{run.get('requests')} requests, corpus {run.get('corpus_items')} items): "
            + ", ".join(found))


def search_examples(data_dir: str, raw_dir: str, address: str, item_to_item_dir: str,
                    base_path: str, served_version: int) -> None:
    """Ranked lists for the last requests of a few users, one with a word the vocabulary does
    not know, and one for a user the store has never seen. Retrieval: QRCF on the pipeline's
    item-to-item table, the PDR exported beside the served ranking version, and the content
    baseline (content only when that version has no PDR export, e.g. from an older run)."""
    from common.feature_store import FEATURE_STORE_FILE, SqliteFeatureStore
    from pipelines.explain import explain, load_catalogue
    from serving import client
    from serving.export_retrieval import INDEX_NAME, QUERY_MODEL_NAME
    from serving.item_index import MANIFEST_FILE
    from serving.search import CONTENT, SearchConfig, Searcher

    catalogue = load_catalogue(raw_dir)
    stub, channel = client.make_stub(address)
    config = SearchConfig(candidates=100, per_source=100)
    pdr_ready = all(os.path.exists(os.path.join(base_path, name, str(served_version),
                                                MANIFEST_FILE))
                    for name in (QUERY_MODEL_NAME, INDEX_NAME))
    if pdr_ready:
        searcher = Searcher.from_paths(data_dir, base_path, stub, served_version, config,
                                       item_to_item=item_to_item_dir)
        store = searcher.store
        quotas = ", ".join(f"{s} {q:g}" for s, q in config.quotas.items())
        print(f"   retrieval: PDR version {served_version} ({searcher.pdr.index_dir}), QRCF "
              f"({item_to_item_dir}) and the content baseline, quotas {quotas}; ranking: "
              "QIN over gRPC")
    else:
        store = SqliteFeatureStore(os.path.join(data_dir, FEATURE_STORE_FILE))
        searcher = Searcher(store, stub, config=SearchConfig(candidates=100, per_source=100,
                                                             quotas={CONTENT: 1.0}))
        print(f"   retrieval: content-embedding baseline only (version {served_version} has no "
              f"PDR export beside it); ranking: QIN over gRPC")
    examples = [(user, query, now_ms, 5) for user, query, now_ms in
                _sample_user_queries(raw_dir, count=3)]
    user, query, now_ms, _ = examples[0]
    examples.append((user, query + " zebra", now_ms, 2))  # an unknown word: reported in a note
    examples.append(("new_user", examples[1][1], examples[1][2], 2))  # cold start: a note too
    with channel:
        for user, query, now_ms, k in examples:
            result = searcher.search(user, query, now_ms=now_ms, k=k)
            print()
            print(explain(result, store, catalogue))


if __name__ == "__main__":
    sys.exit(main())
