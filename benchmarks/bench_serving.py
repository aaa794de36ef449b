"""Serving latency and throughput: gRPC server vs the same SavedModel in-process.

    python -m benchmarks.bench_serving [--requests 200 --max-seconds 10 --concurrency 1,8,32]
                                       [--model-dir M --data OUT]   (a trained model)

One request = 1 user x 100 candidates x 1000 long-term behaviours (+ 50 real-time). Compared:
* path: `inprocess` (the loaded SavedModel's signature called directly, no serialization) vs
  `grpc` (python -m serving.model_server in a subprocess, official PredictionServiceStub) with
  batching on (--batching-parameters-file, see BATCHING below) and off;
* signature: `rank_listwise` (Predict with dense tensors, request-side work once) vs
  `regress_score` (Regress with an ExampleListWithContext: the query and history once as the
  context, the 100 candidates as tf.Examples that the model parses and scores one by one);
* concurrency 1, 8 and 32 client threads.
Prints p50/p95/p99 latency (ms) and QPS per configuration. Each configuration is bounded by
--requests and --max-seconds. Without --model-dir an untrained `qin` model is exported on
synthetic data of the same shapes (latency does not depend on the weights).
"""
from __future__ import annotations

import argparse
import concurrent.futures
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

BATCHING = ("max_batch_size { value: 3200 }\nbatch_timeout_micros { value: 2000 }\n"
            "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 100 }\n")


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
    latencies, lock = [], threading.Lock()
    deadline = time.perf_counter() + max_seconds
    issued = [0]

    def worker():
        while True:
            with lock:
                if issued[0] >= requests or time.perf_counter() > deadline:
                    return
                issued[0] += 1
            started = time.perf_counter()
            call()
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "qps": len(ms) / wall}


def start_server(base, batching_file):
    cmd = [sys.executable, "-m", "serving.model_server", "--model-base-path", base, "--model-name",
           "qin", "--port", "0", "--file-system-poll-wait-seconds", "0", "--log-level",
           "WARNING"]
    cmd += ["--batching-parameters-file", batching_file] if batching_file else \
        ["--no-enable-batching"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY"):
            return proc, int(line.strip().rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("the server did not start; run the command by hand: " + " ".join(cmd))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="requests per configuration")
    p.add_argument("--max-seconds", type=float, default=10.0, help="time cap per configuration")
    p.add_argument("--concurrency", default="1,8,32", help="client thread counts")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--long-term", type=int, default=1000, help="long-term behaviours")
    p.add_argument("--model", default="qin", help="trainer preset when no --model-dir")
    p.add_argument("--model-dir", help="trained model (trainer output); needs --data")
    p.add_argument("--data", help="preprocessing output of the trained model")
    p.add_argument("--paths", default="inprocess,grpc-batching,grpc-no-batching")
    p.add_argument("--signatures", default="rank_listwise,regress_score")
    p.add_argument("--output", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.model_dir and not args.data:
        p.error("--model-dir needs --data")

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    concurrency = [int(c) for c in args.concurrency.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        export_dir, base, md, serialized = export(args, workdir)
        dense, listwise, merged, regress = requests_for(md, serialized)
        batching_file = os.path.join(workdir, "batching.txt")
        with open(batching_file, "w") as f:
            f.write(BATCHING)
        for path in args.paths.split(","):
            proc = None
            if path == "inprocess":
                loaded = tf.saved_model.load(export_dir)
                fns = {"rank_listwise": lambda: loaded.signatures["rank_listwise"](
                           **{k: tf.constant(v) for k, v in dense.items()}),
                       "regress_score": lambda: loaded.signatures["regress_score"](
                           inputs=tf.constant(merged))}
            else:
                proc, port = start_server(base, batching_file if path == "grpc-batching"
                                          else None)
                channel = grpc.insecure_channel(
                    f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 1 << 28)])
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                fns = {"rank_listwise": lambda: stub.Predict(listwise, timeout=120),
                       "regress_score": lambda: stub.Regress(regress, timeout=120)}
            try:
                for signature in args.signatures.split(","):
                    fns[signature]()  # warm
                    for c in concurrency:
                        r = measure(fns[signature], c, args.requests, args.max_seconds)
                        r.update(path=path, signature=signature, concurrency=c)
                        results.append(r)
                        print(f"{path:<17} {signature:<14} c={c:<3} n={r['requests']:<4} "
                              f"p50={r['p50_ms']:8.1f} p95={r['p95_ms']:8.1f} "
                              f"p99={r['p99_ms']:8.1f} ms  qps={r['qps']:7.1f}", flush=True)
            finally:
                if proc is not None:
                    channel.close()
                    proc.terminate()
                    proc.wait(60)
    print(f"\nrequest: 1 user x {args.candidates} candidates x {args.long_term} long-term "
          f"behaviours; listwise request {listwise.ByteSize() / 1e3:.0f} KB, example request "
          f"{regress.ByteSize() / 1e3:.0f} KB")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
