"""Serving latency and throughput: gRPC server vs the same SavedModel in-process.

    python -m benchmarks.bench_serving [--requests 400 --max-seconds 20 --concurrency 1,32]
                                       [--model-dir M --data OUT]   (a trained model)

One request = 1 user x 100 candidates x 1000 long-term behaviours (+ 50 real-time). Compared:
* path: `inprocess` (the loaded SavedModel's signature called directly with keyword tensors,
  no serialization), `inprocess-flat` (the same concrete function called with its flat input
  list, as the server calls it: no per-call binding of the structured signature) vs
  `grpc-batching` (python -m serving.model_server in a subprocess, official
  PredictionServiceStub, batching with the shipped serving/configs/batching_parameters.txt),
  `grpc-early` (the same with --close-batches-early), `grpc-no-batching` and `rest` (the JSON
  REST API of the no-batching server, columnar format, one keep-alive connection per thread);
  `grpc-health` (a grpc.health.v1 Check on the no-batching server: the cost of one gRPC round
  trip between the two processes, whatever the model);
* signature: `rank_listwise` (Predict with dense tensors, request-side work once) vs
  `regress_score` (Regress with an ExampleListWithContext: the query and history once as the
  context, the 100 candidates as tf.Examples that the model parses and scores one by one);
* client threads (--concurrency).
All servers run at once and every configuration is measured in --rounds rounds that rotate
through the paths, so a shared machine's load drifts over all paths alike and the ratios of
one run compare like with like. Prints p50/p95/p99 latency (ms) and QPS per configuration, then
the ratios: gRPC p50 / in-process p50 at concurrency 1, batching QPS / no-batching QPS at the
highest concurrency. Each configuration is bounded by --requests and --max-seconds. Without
--model-dir an untrained `qin` model is exported on synthetic data of the same shapes (latency
does not depend on the weights).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import common  # noqa: F401
import numpy as np

from common import features as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_BATCHING = os.path.join(ROOT, "serving", "configs", "batching_parameters.txt")
PATHS = ("inprocess", "inprocess-flat", "grpc-batching", "grpc-early", "grpc-no-batching",
         "rest", "grpc-health")
BASELINES = ("inprocess", "inprocess-flat")


def synthetic_request(md: F.DatasetMetadata, candidates: int, rng) -> dict:
    """A random request with full sequences (common.features.random_request)."""
    return F.random_request(md, rng, candidates)


def export(args, workdir: str):
    """(export_dir, base_path, metadata, serialized request example)."""
    import tensorflow as tf
    from serving.export import export_model
    from trainer import config as trainer_config, model as trainer_model

    rng = np.random.default_rng(0)
    if args.model_dir:
        md = F.DatasetMetadata.load(args.data)
        model = trainer_model.load_trained_model(args.model_dir, args.data)
    else:
        md = F.DatasetMetadata(num_items=20_000, num_authors=2_000, num_categories=200,
                               num_users=1_000, long_term_length=args.long_term,
                               max_candidates=args.candidates)
        emb = rng.normal(size=(md.num_items + 1, md.embedding_dim)).astype(np.float32)
        emb[0] = 0
        model = trainer_model.build_model(trainer_config.preset(args.model), md, emb)
        model(trainer_model.dummy_features(md))
    example = F.make_example(synthetic_request(md, args.candidates, rng), md.tasks)
    serialized = example.SerializeToString()
    base = os.path.join(workdir, "models")
    print(f"exporting ({args.model_dir or 'untrained ' + args.model}) ...", file=sys.stderr,
          flush=True)
    summary = export_model(model, md, base, "qin", sample_requests=[serialized],
                           warmup_requests=1, verify=False, log=lambda m: None)
    _ = tf
    return summary["export_dir"], os.path.join(base, "qin"), md, serialized


def requests_for(md, serialized):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, regression_pb2
    from serving import signatures as S

    dense = S.listwise_inputs([S.request_from_example(serialized)], md)
    listwise = predict_pb2.PredictRequest()
    listwise.model_spec.name = "qin"
    listwise.model_spec.signature_name = S.RANK_LISTWISE
    for k, v in dense.items():
        listwise.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    context, candidates = S.split_request_example(serialized, md)
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "qin"
    regress.model_spec.signature_name = S.regress_signature(S.SCORE)
    regress.input.example_list_with_context.context.CopyFrom(context)
    regress.input.example_list_with_context.examples.extend(candidates)
    merged = np.array([S.merge_context(context, c).SerializeToString() for c in candidates],
                      dtype=object)
    return dense, listwise, merged, regress


def measure(call, concurrency: int, requests: int, max_seconds: float):
    """Runs `call` from `concurrency` threads until `requests` calls or `max_seconds`:
    (latencies in seconds of the answered calls, wall time in seconds, calls refused with
    UNAVAILABLE)."""
    latencies, lock = [], threading.Lock()
    deadline = time.perf_counter() + max_seconds
    issued, refused = [0], [0]

    def worker():
        while True:
            with lock:
                if issued[0] >= requests or time.perf_counter() > deadline:
                    return
                issued[0] += 1
            started = time.perf_counter()
            try:
                call()
            except Exception as exc:  # a full batching queue refuses at once, by design
                if getattr(exc, "code", lambda: None)() is None or \
                        exc.code().name != "UNAVAILABLE":
                    raise
                with lock:
                    refused[0] += 1
                continue
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return latencies, time.perf_counter() - started, refused[0]


def summarize(latencies, wall: float, refused: int = 0) -> dict:
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(latencies), "refused": refused,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "qps": len(latencies) / wall}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base, batching_file=None, extra=(), rest_port=0):
    """`python -m serving.model_server` on loopback: (process, gRPC port)."""
    cmd = [sys.executable, "-m", "serving.model_server", "--model-base-path", base, "--model-name",
           "qin", "--port", "0", "--file-system-poll-wait-seconds", "0", "--log-level",
           "WARNING", "--rest-api-port", str(rest_port), *extra]
    cmd += ["--batching-parameters-file", batching_file] if batching_file else \
        ["--no-enable-batching"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY"):
            return proc, int(line.strip().rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("the server did not start; run the command by hand: " + " ".join(cmd))


def inprocess_call(function, inputs: dict, path: str):
    """A call of a loaded signature: by keyword (`inprocess`) or flat (`inprocess-flat`)."""
    import tensorflow as tf

    if path == "inprocess":
        return lambda: function(**{k: tf.constant(v) for k, v in inputs.items()})
    order = [p.name for p in function.function_type.parameters.values()]
    return lambda: function._call_flat([tf.constant(inputs[k]) for k in order],
                                       function.captured_inputs)


def rest_caller(port: int, path: str, body: bytes):
    """A call of one JSON request over a keep-alive connection per client thread."""
    local = threading.local()

    def call():
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection("127.0.0.1", port,
                                                                       timeout=120)
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"REST {response.status}: {payload[:300]!r}")
        return payload

    return call


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=400, help="requests per configuration")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="time cap per configuration (all rounds)")
    p.add_argument("--rounds", type=int, default=4,
                   help="rounds per configuration, each running every path in turn")
    p.add_argument("--concurrency", default="1,8,32", help="client thread counts")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--long-term", type=int, default=1000, help="long-term behaviours")
    p.add_argument("--model", default="qin", help="trainer preset when no --model-dir")
    p.add_argument("--model-dir", help="trained model (trainer output); needs --data")
    p.add_argument("--data", help="preprocessing output of the trained model")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--signatures", default="rank_listwise,regress_score")
    p.add_argument("--batching-parameters-file", default=SHIPPED_BATCHING,
                   help="BatchingParameters of the batching servers")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="TensorFlow intra-op threads of every path alike: the servers get "
                        "--tensorflow-intra-op-parallelism, the in-process paths run with the "
                        "same setting (0 = TensorFlow's choice)")
    p.add_argument("--output", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.model_dir and not args.data:
        p.error("--model-dir needs --data")
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        p.error(f"unknown paths {unknown}; choose from {list(PATHS)}")

    import grpc
    import tensorflow as tf

    from serving.model_server.server import configure_tensorflow_threads

    # The servers' own setter, before any op: the pools cannot change once created.
    configure_tensorflow_threads(intra_op=args.intra_op_threads)
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    concurrency = [int(c) for c in args.concurrency.split(",")]
    results, processes, channels = [], [], []
    with tempfile.TemporaryDirectory() as workdir:
        export_dir, base, md, serialized = export(args, workdir)
        dense, listwise, merged, regress = requests_for(md, serialized)
        fns = {}
        try:
            for path in paths:
                if path in BASELINES:
                    loaded = tf.saved_model.load(export_dir)
                    fns[path] = {"rank_listwise": inprocess_call(
                                     loaded.signatures["rank_listwise"], dense, path),
                                 "regress_score": inprocess_call(
                                     loaded.signatures["regress_score"], {"inputs": merged}, path)}
                    continue
                if path in ("rest", "grpc-health"):
                    if "grpc-no-batching" not in paths:
                        p.error(f"the {path} path uses the grpc-no-batching server; list both")
                    continue
                batching = None if path == "grpc-no-batching" else args.batching_parameters_file
                extra = ["--close-batches-early"] if path == "grpc-early" else []
                extra += ["--tensorflow-intra-op-parallelism", str(args.intra_op_threads)]
                rest_port = free_port() if path == "grpc-no-batching" and "rest" in paths else 0
                proc, port = start_server(base, batching, extra, rest_port)
                processes.append(proc)
                channel = grpc.insecure_channel(
                    f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 1 << 28)])
                channels.append(channel)
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                fns[path] = {"rank_listwise": lambda s=stub: s.Predict(listwise, timeout=120),
                             "regress_score": lambda s=stub: s.Regress(regress, timeout=120)}
                if path == "grpc-no-batching" and "grpc-health" in paths:
                    health = health_pb2_grpc.HealthStub(channel)
                    check = health_pb2.HealthCheckRequest()
                    fns["grpc-health"] = dict.fromkeys(
                        ("rank_listwise", "regress_score"),
                        lambda h=health: h.Check(check, timeout=60))
                if rest_port:
                    body = json.dumps({"signature_name": "rank_listwise",
                                       "inputs": {k: v.tolist() for k, v in dense.items()}})
                    fns["rest"] = {"rank_listwise": rest_caller(
                        rest_port, "/v1/models/qin:predict", body.encode())}
            for signature in args.signatures.split(","):
                runnable = [path for path in paths if signature in fns[path]]
                for path in runnable:
                    fns[path][signature]()  # warm
                for c in concurrency:
                    collected = {path: ([], 0.0, 0) for path in runnable}
                    for r in range(args.rounds):
                        for path in runnable[r % len(runnable):] + runnable[:r % len(runnable)]:
                            latencies, wall, refused = measure(
                                fns[path][signature], c, -(-args.requests // args.rounds),
                                args.max_seconds / args.rounds)
                            before = collected[path]
                            collected[path] = (before[0] + latencies, before[1] + wall,
                                               before[2] + refused)
                    for path in runnable:
                        r = summarize(*collected[path])
                        r.update(path=path, signature=signature, concurrency=c)
                        results.append(r)
                        print(f"{path:<17} {signature:<14} c={c:<3} n={r['requests']:<4} "
                              f"p50={r['p50_ms']:8.1f} p95={r['p95_ms']:8.1f} "
                              f"p99={r['p99_ms']:8.1f} ms  qps={r['qps']:7.1f}"
                              + (f"  refused={r['refused']}" if r["refused"] else ""), flush=True)
        finally:
            for channel in channels:
                channel.close()
            for proc in processes:
                proc.terminate()
            for proc in processes:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"\nTensorFlow intra-op threads: {args.intra_op_threads or 'auto'} (every path)")
    print(f"request: 1 user x {args.candidates} candidates x {args.long_term} long-term "
          f"behaviours; listwise request {listwise.ByteSize() / 1e3:.0f} KB, example request "
          f"{regress.ByteSize() / 1e3:.0f} KB")
    ratios = summary_ratios(results, concurrency)
    for line in ratios["lines"]:
        print(line)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"results": results, "ratios": ratios["values"]}, f, indent=2)
    return 0


def summary_ratios(results, concurrency) -> dict:
    """The figures the serving targets are stated in, from one run's results."""
    at = {(r["path"], r["signature"], r["concurrency"]): r for r in results}
    lines, values = [], {}
    low, high = min(concurrency), max(concurrency)
    for baseline in BASELINES:
        base = at.get((baseline, "rank_listwise", low))
        for path in PATHS[len(BASELINES):]:
            r = at.get((path, "rank_listwise", low))
            if base and r:
                ratio = r["p50_ms"] / base["p50_ms"]
                values[f"{path}_p50_over_{baseline}_c{low}"] = ratio
                lines.append(f"rank_listwise c={low}: {path} p50 / {baseline} p50 = "
                             f"{ratio:.2f} ({r['p50_ms']:.1f} / {base['p50_ms']:.1f} ms)")
    off = at.get(("grpc-no-batching", "rank_listwise", high))
    for path in ("grpc-batching", "grpc-early"):
        on = at.get((path, "rank_listwise", high))
        if on and off:
            ratio = on["qps"] / off["qps"]
            values[f"{path}_qps_over_no_batching_c{high}"] = ratio
            lines.append(f"rank_listwise c={high}: {path} QPS / no-batching QPS = {ratio:.2f} "
                         f"({on['qps']:.0f} / {off['qps']:.0f})")
    return {"lines": lines, "values": values}


if __name__ == "__main__":
    sys.exit(main())
