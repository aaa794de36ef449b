"""Training throughput and peak memory of the ranking models on this machine.

    python -m benchmarks.bench_training [--models qin,din] [--long-lengths 200,1000]
                                        [--batch-sizes 256,1024] [--steps 5]

For every (model, long-term length, batch size) it builds a synthetic batch from the feature spec
(common.features: every sequence full, random ids, `--candidates` candidates per request),
compiles the model of `trainer.model.build_model` with Adam and the trainer's own train step
(`RankingModel.train_step`), runs `--warmup` untimed steps (tracing) and then `--steps`
timed steps, and reports

* candidates/s and requests/s (training examples per second),
* the peak resident memory of the process (resource.getrusage ru_maxrss): each configuration
  runs in its own subprocess, so the figure is that configuration's peak, TensorFlow's C++
  allocations included (tracemalloc would only see Python objects).

The batch size counts *candidates* by default (`--batch-unit candidates`: batch 256 with 8
candidates per request = 32 requests); `--batch-unit requests` makes it count requests.
Timings are wall-clock on whatever else the machine is doing: run it on an idle machine for
numbers to compare across commits.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_batch(metadata, requests, candidates, seed=0):
    """A training batch of `requests` random requests (common.features.random_request: full
    sequences, `candidates` candidates each, labels ~20% positive) in the parsed layout."""
    import numpy as np
    import tensorflow as tf

    from common import features as F

    rng = np.random.default_rng(seed)
    serialized = []
    for _ in range(requests):
        request = F.random_request(metadata, rng, candidates)
        for task in metadata.tasks:
            request[F.label_feature(task)] = (rng.random(candidates) < 0.2).astype(np.float32)
        serialized.append(F.make_example(request, metadata.tasks).SerializeToString())
    return F.parse_examples(tf.constant(serialized), metadata)


def run_one(model_name, long_length, requests, candidates, steps, warmup, num_items):
    """One configuration in this process; returns its measurements."""
    import numpy as np
    import tensorflow as tf

    from common import features as F
    from trainer import config as config_lib
    from trainer import model as model_lib

    metadata = F.DatasetMetadata(num_items=num_items, num_authors=num_items // 10,
                                 num_categories=200, num_users=10_000,
                                 long_term_length=long_length, real_time_length=50,
                                 max_candidates=candidates)
    rng = np.random.default_rng(0)
    item_embeddings = rng.normal(size=(num_items + 1, metadata.embedding_dim)).astype(np.float32)
    item_embeddings[0] = 0.0
    tf.keras.utils.set_random_seed(0)
    config = config_lib.preset(model_name)
    model = model_lib.build_model(config, metadata, item_embeddings)
    model(model_lib.dummy_features(metadata, 2, 2))
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    batch = synthetic_batch(metadata, requests, candidates)
    step = tf.function(model.train_step)
    start = time.perf_counter()
    for _ in range(warmup):
        logs = step(batch)
    float(logs["loss"])
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        logs = step(batch)
    loss = float(logs["loss"])  # waits for the last step
    elapsed = time.perf_counter() - start
    return {"model": model_name, "long_term_length": long_length, "requests_per_batch": requests,
            "candidates_per_batch": requests * candidates, "steps": steps,
            "seconds_per_step": elapsed / steps, "warmup_seconds": warmup_s,
            "requests_per_second": requests * steps / elapsed,
            "candidates_per_second": requests * candidates * steps / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "loss": loss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_training",
        description="Training examples per second and peak memory of QIN and DIN (or other "
                    "presets) on synthetic batches built from the feature spec; one subprocess "
                    "per configuration.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="qin,din", help="comma-separated presets")
    parser.add_argument("--long-lengths", default="200,1000",
                        help="long-term sequence lengths (every sequence full)")
    parser.add_argument("--batch-sizes", default="256,1024")
    parser.add_argument("--batch-unit", choices=("candidates", "requests"), default="candidates",
                        help="what --batch-sizes count")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per request")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (tracing) first")
    parser.add_argument("--num-items", type=int, default=50_000, help="item vocabulary size")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one config
    args = parser.parse_args(argv)

    if args.single:
        model_name, long_length, requests = args.single.split(":")
        import common  # noqa: F401

        result = run_one(model_name, int(long_length), int(requests), args.candidates,
                         args.steps, args.warmup, args.num_items)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    results = []
    configs = [(m, int(length), int(size)) for m in args.models.split(",")
               for length in args.long_lengths.split(",") for size in args.batch_sizes.split(",")]
    print(f"{len(configs)} configurations, {args.steps} timed steps each, batch unit "
          f"{args.batch_unit}, {args.candidates} candidates per request", flush=True)
    for i, (model_name, long_length, size) in enumerate(configs, 1):
        requests = size if args.batch_unit == "requests" else max(1, size // args.candidates)
        command = [sys.executable, "-m", "benchmarks.bench_training", "--single",
                   f"{model_name}:{long_length}:{requests}", "--candidates",
                   str(args.candidates), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--num-items", str(args.num_items)]
        print(f"[{i}/{len(configs)}] {model_name} long={long_length} batch={size} "
              f"{args.batch_unit} ...", flush=True)
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            print(f"  failed (exit {run.returncode}): {run.stderr[-1500:]}", flush=True)
            results.append({"model": model_name, "long_term_length": long_length,
                            "batch": size, "error": run.stderr[-500:]})
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        results.append(result)
        print(f"  {result['candidates_per_second']:.0f} candidates/s, "
              f"{result['requests_per_second']:.0f} requests/s, "
              f"{1000 * result['seconds_per_step']:.0f} ms/step, "
              f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    print("\n| model | long-term length | batch (candidates / requests) | candidates/s | "
          "requests/s | ms/step | peak RSS MB |\n|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['long_term_length']} | {r['batch']} | failed | | | |")
            continue
        print(f"| {r['model']} | {r['long_term_length']} | {r['candidates_per_batch']} / "
              f"{r['requests_per_batch']} | {r['candidates_per_second']:.0f} | "
              f"{r['requests_per_second']:.1f} | {1000 * r['seconds_per_step']:.0f} | "
              f"{r['peak_rss_mb']:.0f} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
