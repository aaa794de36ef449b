"""Benchmark of the synthetic log generator: behaviours generated per second and peak memory.

Each scale runs `preprocessing.synthetic.generate` in its own fresh Python process (so the peak
RSS of one scale is not inherited by the next) and reports wall time, CPU time, behaviours per
second (wall and CPU: the generator is single-threaded, so the CPU figure stays meaningful on a
shared machine), requests per second, peak resident memory and output size. The workload per
scale: users = behaviours / 550 (mean feed history 500 plus ~10% search clicks), 10 requests per
user, items = 2 x users (at least 2,000); `--lifelong-users` adds users with 10^4-10^5 behaviours.

Example (about 20 seconds of CPU):
  python -m benchmarks.bench_synthetic --behaviours 100000 1000000 --output bench_synthetic.json
Memory check at 10^7 behaviours (about 80 seconds of CPU, ~300 MB of Parquet in a temp dir):
  python -m benchmarks.bench_synthetic --behaviours 10000000 --lifelong-users 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN_HISTORY = 500


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def workload(behaviours: int, lifelong_users: int, seed: int) -> Dict[str, int]:
    users = max(10, round(behaviours / (MEAN_HISTORY * 1.1)))
    return dict(users=users, items=max(2000, 2 * users), requests=10 * users,
                lifelong_users=lifelong_users, mean_history=MEAN_HISTORY, seed=seed)


def _directory_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2 ** 20


def run_one(params: Dict[str, int], output: str) -> Dict[str, float]:
    """Runs in the child process: generate once and measure."""
    import preprocessing  # noqa: F401  (package init order)
    from preprocessing import synthetic

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    started, cpu_started = time.perf_counter(), cpu_seconds()
    summary = synthetic.generate(output, progress=True, **params)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    # ru_maxrss is KiB on Linux.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(params, behaviours=summary["behaviours"], requests_written=summary["requests"],
                seconds=round(seconds, 2), cpu_seconds=round(cpu, 2),
                behaviours_per_second=round(summary["behaviours"] / seconds),
                behaviours_per_cpu_second=round(summary["behaviours"] / max(cpu, 1e-9)),
                requests_per_second=round(summary["requests"] / seconds),
                peak_rss_mb=round(peak_mb, 1), output_mb=round(_directory_mb(output), 1))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--behaviours", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="approximate number of behaviours of each scale")
    parser.add_argument("--lifelong-users", type=int, default=0,
                        help="lifelong users (10^4-10^5 behaviours each) added to every scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None,
                        help="where the generated data goes (deleted afterwards); default: a "
                             "temporary directory")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # internal: one measurement in a fresh process
        params, output = json.loads(args.child)
        print(json.dumps(run_one(params, output)))
        return 0

    workdir = tempfile.mkdtemp(prefix="bench_synthetic_", dir=args.workdir)
    results = []
    try:
        for behaviours in args.behaviours:
            params = workload(behaviours, args.lifelong_users, args.seed)
            log(f"scale ~{behaviours:,} behaviours: {params}")
            output = os.path.join(workdir, f"scale_{behaviours}")
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_synthetic", "--child",
                 json.dumps([params, output])], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                text=True, check=True)
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            shutil.rmtree(output, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    header = ("behaviours", "users", "requests_written", "seconds", "cpu_seconds",
              "behaviours_per_second", "behaviours_per_cpu_second", "requests_per_second",
              "peak_rss_mb", "output_mb")
    print(" | ".join(header))
    for r in results:
        print(" | ".join(f"{r[h]:,}" if isinstance(r[h], int) else str(r[h]) for h in header))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
