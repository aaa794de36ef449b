"""Restart after kill -9 next to broken newer versions, against one model load alone.

    python -m benchmarks.bench_restart --version-dir models/qin/1

Builds a scratch model base path from one exported version: version 1 (the export), version 2
(the same SavedModel whose warmup file holds a request missing an input, so it fails only
after a full load), versions 3 and 4 (corrupt `saved_model.pb`). For each scenario it starts
`python -m serving.model_server` (loopback, ephemeral port), waits until the port opens (the
server opens it once its initial model is AVAILABLE), kills it with SIGKILL and reads the
model manager's log:

* `alone`: only version 1 on disk: one model load (log: loading -> available);
* `broken newer`: versions 1-4: from "loading version 4" to "version 1 available".

Prints the seconds of each and their ratio (the serving issue's target: <= 2x one load), and
the wall time from process start to the open port.
"""
import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*model '[^']*': (.*)$")


def _events(text):
    events = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m:
            events.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(),
                           m.group(2)))
    return events


def _span(events, start, end):
    t0 = next(t for t, msg in events if msg.startswith(start))
    t1 = next(t for t, msg in events if msg.startswith(end))
    return t1 - t0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_and_kill(base, name, timeout):
    port = _free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "serving.model_server", "--model-base-path",
                             base, "--model-name", name, "--port", str(port),
                             "--file-system-poll-wait-seconds", "300",
                             "--lame-duck-seconds", "0"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    ready = None
    while time.monotonic() - started < timeout and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                ready = time.monotonic() - started
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    log.seek(0)
    text = log.read()
    os.unlink(log.name)
    if ready is None:
        raise SystemExit(f"the server did not open its port within {timeout}s:\n{text[-3000:]}")
    return ready, _events(text)


def build_base(version_dir, root):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from common import tf_serving_protocol as P

    base = os.path.join(root, "model")
    shutil.copytree(version_dir, os.path.join(base, "1"))
    shutil.copytree(version_dir, os.path.join(base, "2"))
    warmup = os.path.join(base, "2", P.WARMUP_DIR, P.WARMUP_FILE)
    if not os.path.exists(warmup):
        raise SystemExit(f"{version_dir} has no warmup file: version 2 could not fail late")
    first = prediction_log_pb2.PredictionLog.FromString(
        next(iter(tf.data.TFRecordDataset(warmup))).numpy())
    request = getattr(first, first.WhichOneof("log_type")).request
    inputs = getattr(request, "inputs", None)
    if inputs is None or not len(inputs):
        raise SystemExit("the first warmup record is not a Predict request")
    del inputs[sorted(inputs)[0]]
    with tf.io.TFRecordWriter(warmup) as writer:
        writer.write(first.SerializeToString())
    for version in (3, 4):
        os.makedirs(os.path.join(base, str(version)))
        with open(os.path.join(base, str(version), "saved_model.pb"), "wb") as f:
            f.write(b"not a SavedModel")
    return base


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_restart",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--version-dir", required=True,
                        help="one exported model version (with its warmup file)")
    parser.add_argument("--repeats", type=int, default=3, help="starts per scenario")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the port")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench-restart-")
    try:
        base = build_base(os.path.abspath(args.version_dir), root)
        aside = os.path.join(root, "aside")
        os.makedirs(aside)
        rows = []
        for _ in range(args.repeats):
            for v in ("2", "3", "4"):
                shutil.move(os.path.join(base, v), os.path.join(aside, v))
            ready_alone, events = start_and_kill(base, "model", args.timeout)
            one = _span(events, "loading version 1", "version 1 available")
            for v in ("2", "3", "4"):
                shutil.move(os.path.join(aside, v), os.path.join(base, v))
            ready_broken, events = start_and_kill(base, "model", args.timeout)
            broken = _span(events, "loading version 4", "version 1 available")
            rows.append((one, broken, ready_alone, ready_broken))
            print(f"one load alone {one:.2f}s (port open after {ready_alone:.1f}s); "
                  f"versions 4..1 until version 1 serves {broken:.2f}s (port open after "
                  f"{ready_broken:.1f}s); ratio {broken / one:.2f}", flush=True)
        ratios = sorted(b / o for o, b, _, _ in rows)
        print(f"median ratio {ratios[len(ratios) // 2]:.2f} (target <= 2.0) over "
              f"{len(rows)} pairs")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
