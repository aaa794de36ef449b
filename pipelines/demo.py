"""`make demo`: the whole flow on generated data, end to end, on this machine.

  1. the Kubeflow pipeline through kfp.local: generate logs -> Beam preprocessing -> train QIN
     -> evaluate (with the oracle's row) -> metric gate -> export a TF Serving model version;
  2. a small comparison report (QIN against baselines) with its chart;
  3. the project's TF Serving-protocol gRPC server on 127.0.0.1 serving the exported version;
  4. the client ranking candidates for a few users and queries through the official stub;
  5. where the metrics table, the plots and the TensorBoard logs are.

    python -m pipelines.demo --output demo_output
"""
import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import time
from typing import List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


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
    matches = sorted(glob.glob(os.path.join(run_dir, task + "*")))
    if not matches:
        raise FileNotFoundError(f"no '{task}' step output under {run_dir}")
    return matches[0]


def _sample_user_queries(raw_dir: str, count: int):
    """(user, query text) pairs from the last generated search requests, in query words."""
    import pyarrow.parquet as pq

    vocab = pq.read_table(os.path.join(raw_dir, "query_vocab.parquet"),
                          columns=["token_id", "word"]).to_pydict()
    words = dict(zip(vocab["token_id"], vocab["word"]))
    requests = pq.read_table(os.path.join(raw_dir, "requests.parquet"),
                             columns=["user_id", "timestamp", "query_tokens"]).to_pandas()
    latest = requests.sort_values("timestamp").drop_duplicates("user_id", keep="last")
    for row in latest.tail(count).itertuples():
        yield row.user_id, " ".join(words[t] for t in row.query_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="where everything is written")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lifelong-users", type=int, default=0,
                        help="users with 10^4-10^5 behaviours; also switches the long-term "
                             "sequence to stage-1 (query-relevant) preselection")
    parser.add_argument("--report-presets", default="qin,din,dnn",
                        help="models compared in the demo's report ('' to skip the report)")
    parser.add_argument("--seed", type=int, default=7)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    from pipelines import run_local

    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    base_path = os.path.join(output, "models")

    _banner("1/4  Kubeflow pipeline (kfp.local): generate -> preprocess -> train -> evaluate "
            "-> gate -> export")
    run_dir = run_local.run(dict(
        users=args.users, items=args.items, requests=args.requests, seed=args.seed,
        lifelong_users=args.lifelong_users, epochs=args.epochs,
        long_term_mode="stage1" if args.lifelong_users else "recent",
        model_base_path=base_path, model_name="qin"), os.path.join(output, "pipeline_runs"))
    raw_dir = os.path.join(_task_dir(run_dir, "acquire-raw-logs"), "raw")
    data_dir = os.path.join(_task_dir(run_dir, "preprocess"), "data")
    model_dir = os.path.join(_task_dir(run_dir, "train"), "model")
    evaluate_dir = _task_dir(run_dir, "evaluate")
    metrics_table = os.path.join(evaluate_dir, "report")
    print(open(metrics_table).read())
    if not os.path.isdir(os.path.join(base_path, "qin")):
        print("the evaluation gate did not pass: no model version was exported", file=sys.stderr)
        return 1

    report_dir = os.path.join(output, "report")
    if args.report_presets:
        _banner(f"2/4  comparison report: {args.report_presets}")
        subprocess.run([sys.executable, "-m", "trainer.report", "--data", data_dir,
                        "--output", report_dir, "--presets", args.report_presets,
                        "--epochs", str(args.epochs), "--seed", str(args.seed)], check=True)

    _banner("3/4  TF Serving-protocol gRPC server on 127.0.0.1")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # TF Serving semantics: the model base path is the folder holding the numeric versions.
    server = subprocess.Popen([sys.executable, "-m", "serving.model_server", "--model-base-path",
                               os.path.join(base_path, "qin"), "--model-name", "qin",
                               "--port", str(port)])
    try:
        _wait_serving(address)
        print(f"serving {base_path}/qin at {address}")
        _banner("4/4  client: (user, query) -> ranked list")
        from serving import client

        store = client.open_feature_store(os.path.join(data_dir, "feature_store.sqlite"))
        stub, channel = client.make_stub(address)
        with channel:
            for user_id, query in _sample_user_queries(raw_dir, count=3):
                result = client.rank(stub, store, user_id, query, top_k=5)
                print()
                print(client.format_result(result))
    finally:
        server.terminate()  # SIGTERM: the server drains in-flight requests and exits
        server.wait(timeout=60)

    _banner("where things are")
    print(f"metrics table     {metrics_table}")
    print(f"metrics (JSON)    {os.path.join(evaluate_dir, 'metrics')}")
    if args.report_presets:
        print(f"report and plots  {report_dir}  ({', '.join(sorted(os.listdir(report_dir)))})")
    print(f"TensorBoard logs  {os.path.join(model_dir, 'logs')}   "
          f"(.venv/bin/tensorboard --logdir {os.path.join(model_dir, 'logs')})")
    print(f"exported model    {base_path}/qin  (saved_model_cli show --all --dir <version dir>)")
    print(f"serve it again    .venv/bin/python -m serving.model_server "
          f"--model-base-path {base_path}/qin --model-name qin --port 8500")
    print(json.dumps({"run_dir": run_dir, "data": data_dir, "model": model_dir}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
