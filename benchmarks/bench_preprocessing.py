"""Preprocessing throughput: requests and behaviours per second at two scales 10x apart, with 1
and 2 local worker processes (in-process Beam runner).

    .venv/bin/python -m benchmarks.bench_preprocessing            # small: 200 and 2000 requests
    .venv/bin/python -m benchmarks.bench_preprocessing --scale 1000 --workers 1 2

Data comes from preprocessing.synthetic (canonical layout). Each configuration runs the whole
`python -m preprocessing` path in a fresh subprocess (Beam start-up, TensorFlow import, the
pipeline and the feature store), so the figures include fixed costs; the growth between the two
scales separates them from the per-request cost. Prints a table and a JSON line per run.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(directory: str, requests: int, seed: int) -> None:
    from preprocessing.synthetic import generate as synthetic

    users = max(20, requests // 10)
    synthetic(directory, users=users, items=max(1000, requests), requests=requests, seed=seed,
              mean_history=40)


def run_once(raw: str, out: str, workers: int, extra) -> float:
    started = time.time()
    subprocess.run([sys.executable, "-m", "preprocessing", "--input-format", "canonical",
                    "--input", raw, "--output", out, "--workers", str(workers)] + list(extra),
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return time.time() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scale", type=int, default=200,
                        help="requests at the small scale; the large scale is 10x")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="keep generated data and outputs in this directory")
    args, extra = parser.parse_known_args(argv)
    base = args.keep or tempfile.mkdtemp(prefix="bench-prep-")
    results = []
    try:
        for requests in (args.scale, args.scale * 10):
            raw = os.path.join(base, f"raw{requests}")
            t0 = time.time()
            generate(raw, requests, args.seed)
            print(f"generated {requests} requests in {time.time() - t0:.1f}s", flush=True)
            for workers in args.workers:
                out = os.path.join(base, f"out{requests}_w{workers}")
                seconds = run_once(raw, out, workers, extra)
                with open(os.path.join(out, "stats.json")) as f:
                    stats = json.load(f)
                row = {"requests": stats["examples"], "behaviours": stats["behaviours"],
                       "workers": workers, "seconds": round(seconds, 2),
                       "requests_per_s": round(stats["examples"] / seconds, 1),
                       "behaviours_per_s": round(stats["behaviours"] / seconds, 1)}
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\n{'requests':>9} {'behaviours':>11} {'workers':>7} {'seconds':>8} "
          f"{'req/s':>8} {'beh/s':>9}")
    for r in results:
        print(f"{r['requests']:>9} {r['behaviours']:>11} {r['workers']:>7} {r['seconds']:>8.1f} "
              f"{r['requests_per_s']:>8.1f} {r['behaviours_per_s']:>9.1f}")
    by = {(r["requests"], r["workers"]): r["seconds"] for r in results}
    scales = sorted({r["requests"] for r in results})
    if len(scales) == 2:
        for w in args.workers:
            if (scales[0], w) in by and (scales[1], w) in by:
                print(f"workers={w}: 10x data -> {by[(scales[1], w)] / by[(scales[0], w)]:.2f}x "
                      "time")
    for s in scales:
        if (s, 1) in by and (s, 2) in by:
            print(f"{s} requests: 2 workers -> {by[(s, 1)] / by[(s, 2)]:.2f}x speed-up over 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
