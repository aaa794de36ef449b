"""Start-up, shutdown and recovery of the model server, as stock TF Serving behaves:
the port opens only once the initial models are AVAILABLE; SIGTERM turns health NOT_SERVING,
keeps serving through a lame-duck period, then drains without failing a request in flight;
after kill -9 a restart next to several broken newer versions serves the newest loadable one
within one poll; a failed version is retried when any of its files changes. Loopback only,
official stubs, bounded loops with deadlines."""
import concurrent.futures
import os
import re
import signal
import threading
import time
from datetime import datetime

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from serving.model_server.server import ModelServer, ServerOptions
from tests.helpers import free_port
from tests.serving_toy_model import export_toy_model, predict_request, warmup_log
from tests.test_server import MODEL
from tests.test_server_hostile_requests import start_server_process, stderr_text
from tests.test_server_reload import State, exports, install, status, wait_for  # noqa: F401

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING



def health_status(port, timeout=1.0):
    """The health of the whole server, or the gRPC code when nobody answers."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError as exc:
            return exc.code()


def served_version(stub):
    response = stub.Predict(predict_request(MODEL, np.ones((1, 4)), [1]), timeout=30)
    return tf.make_ndarray(response.outputs["version"])[0]


def test_port_opens_only_once_the_initial_models_are_available(tmp_path, exports):
    base = str(tmp_path / MODEL)
    os.makedirs(base)  # no version yet
    port = free_port()
    config = model_server_config_pb2.ModelConfig(name=MODEL, base_path=base)
    srv = ModelServer(ServerOptions([config], port=port, poll_wait_seconds=0.2,
                                    enable_batching=False))
    failure = []
    starting = threading.Thread(target=lambda: _record(failure, srv.start), daemon=True)
    starting.start()
    try:
        time.sleep(1.0)
        assert starting.is_alive() and srv.port is None
        assert health_status(port) == grpc.StatusCode.UNAVAILABLE  # nothing listens yet
        install(exports, base, 1)
        starting.join(60)
        assert not starting.is_alive() and not failure, failure
        assert srv.port == port
        assert health_status(port) == SERVING
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert served_version(prediction_service_pb2_grpc.PredictionServiceStub(channel)) == 1
    finally:
        srv.abort_start()
        starting.join(30)
        srv.stop(1)
    # The old behaviour on request: the port answers at once, health says NOT_SERVING.
    empty = tmp_path / "empty"
    empty.mkdir()
    config = model_server_config_pb2.ModelConfig(name=MODEL, base_path=str(empty))
    early = ModelServer(ServerOptions([config], port=0, poll_wait_seconds=0.2,
                                      serve_before_models_load=True))
    try:
        assert health_status(early.start()) == NOT_SERVING
    finally:
        early.stop(1)
    # Polling off and nothing loadable: start() fails instead of waiting forever.
    never = ModelServer(ServerOptions([config], port=0, poll_wait_seconds=0))
    with pytest.raises(ValueError, match="no loadable version"):
        never.start()


def _record(failures, fn):
    try:
        fn()
    except Exception as exc:  # reported by the test thread
        failures.append(exc)


def slow_request(iterations):
    request = predict_request(MODEL, np.ones((1, 4)), [1], signature="slow")
    del request.inputs["x"], request.inputs["ids"]
    request.inputs["iterations"].CopyFrom(tf.make_tensor_proto(np.array([iterations])))
    return request


def test_sigterm_lame_duck_then_drain_fails_nothing_in_flight(tmp_path, exports):
    base = str(tmp_path / MODEL)
    os.makedirs(base)
    install(exports, base, 1)
    lame_duck = 1.0
    proc, port = start_server_process(
        ["--model-base-path", base, "--model-name", MODEL, "--port", "0",
         "--file-system-poll-wait-seconds", "0", "--lame-duck-seconds", str(lame_duck),
         "--drain-seconds", "30"])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    stop = threading.Event()
    results, lock = [], threading.Lock()

    def client():
        for _ in range(5000):  # bounded; ends at the latest when the server is gone
            if stop.is_set():
                return
            sent = time.monotonic()
            try:
                stub.Predict(predict_request(MODEL, np.ones((1, 4)), [1]), timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            with lock:
                results.append((sent, code))
            time.sleep(0.01)

    try:
        iterations, took = 2000, 0.0
        for _ in range(6):  # calibrate a request that stays in flight for ~3 s
            started = time.monotonic()
            stub.Predict(slow_request(iterations), timeout=60)
            took = time.monotonic() - started
            if took > 2.0:
                break
            iterations = int(iterations * min(20, 3.0 / max(took, 0.01)))
        assert took > 2.0, "could not make a slow request"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client) for _ in range(3)]
            time.sleep(0.3)
            sigterm_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: health_status(port, 0.5) == NOT_SERVING, 1.0), \
                "health did not turn NOT_SERVING at once"
            noticed = time.monotonic() - sigterm_at
            # A request that will be in flight when the drain starts (about 6 s)...
            in_flight = stub.Predict.future(slow_request(2 * iterations), timeout=120)
            in_flight_done = []
            in_flight.add_done_callback(lambda _: in_flight_done.append(time.monotonic()))
            # ... and the lame duck still serves, also on new connections.
            with grpc.insecure_channel(f"127.0.0.1:{port}") as fresh:
                assert served_version(prediction_service_pb2_grpc.PredictionServiceStub(fresh)) \
                    == 1
            assert proc.wait(timeout=60) == 0
            exited = time.monotonic() - sigterm_at
            assert in_flight.result().outputs["done"].float_val[0] == 1.0
            stop.set()
            for c in clients:
                c.result(timeout=60)
    finally:
        stop.set()
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"NOT_SERVING {noticed:.2f}s after SIGTERM, exit after {exited:.2f}s, "
          f"{len(results)} requests")
    assert exited >= lame_duck
    drain_started = sigterm_at + lame_duck
    assert in_flight_done[0] > drain_started + 0.2  # it was in flight during the drain
    # Everything sent before the drain (with slack for delivery) was served...
    early = {c for sent, c in results if sent < drain_started - 0.1}
    assert early == {grpc.StatusCode.OK}, early
    assert any(sigterm_at < sent < drain_started - 0.1 for sent, _ in results)
    # ... and what came later was refused with a status that says "retry elsewhere" (once
    # the last request in flight finished, gRPC itself stops and may cancel arriving calls).
    late = [c for sent, c in results if drain_started - 0.1 <= sent < in_flight_done[0]]
    assert set(late) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(late)
    assert grpc.StatusCode.UNAVAILABLE in late
    codes = {c for _, c in results}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE,
                     grpc.StatusCode.CANCELLED}, codes
    assert "lame duck" in stderr_text(proc)


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*model '(\w+)': (.*)$")


def load_events(stderr_text):
    """(seconds, message) of the model manager's log lines."""
    events = []
    for line in stderr_text.splitlines():
        m = LOG_TIME.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((t, m.group(3)))
    return events


def _start_and_kill(args):
    """Starts the server, checks what it serves, kills it with SIGKILL; (ready seconds,
    served version, model manager events)."""
    started = time.monotonic()
    proc, port = start_server_process(args, timeout=100)
    ready = time.monotonic() - started
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            version = served_version(prediction_service_pb2_grpc.PredictionServiceStub(channel))
        assert health_status(port) == SERVING
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return ready, version, load_events(stderr_text(proc))


def _span(events, start_prefix, end_prefix):
    start = next(t for t, msg in events if msg.startswith(start_prefix))
    end = next(t for t, msg in events if msg.startswith(end_prefix))
    return end - start


def test_restart_after_kill_9_serves_the_newest_loadable_version_within_two_loads(tmp_path,
                                                                                 exports):
    base = str(tmp_path / MODEL)
    os.makedirs(base)
    install(exports, base, 1)
    args = ["--model-base-path", base, "--model-name", MODEL, "--port", "0",
            # Far longer than the test: loading one version per poll could never pass.
            "--file-system-poll-wait-seconds", "300", "--lame-duck-seconds", "0"]
    # One model load, alone: version 1 is the only version.
    _, version, events = _start_and_kill(args)
    assert version == 1
    one_load = _span(events, "loading version 1", "version 1 available")

    bad_warmup = warmup_log(MODEL)
    del bad_warmup.predict_log.request.inputs["ids"]  # v2 loads fully, then its warmup fails
    install(exports, base, 2, source=export_toy_model(str(tmp_path / "v2"), 2.0,
                                                      warmup_requests=[bad_warmup]))
    for version in (3, 4):  # corrupt SavedModels
        broken = tmp_path / f"broken{version}"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
        install(exports, base, version, source=str(broken))
    timings = []
    for attempt in ("first start", "after kill -9"):
        ready, version, events = _start_and_kill(args)
        assert version == 1, attempt
        failed = [msg.split()[2] for _, msg in events if msg.startswith("loading version")
                  and "failed" in msg]
        assert sorted(failed) == ["2", "3", "4"], failed
        # From the first load to the newest loadable version serving: version 2 fails only
        # after a full load, and version 1 loads alongside it, so about one load, not two.
        all_loads = _span(events, "loading version 4", "version 1 available")
        v1_starts = next(t for t, msg in events if msg.startswith("loading version 1 "))
        v2_fails = next(t for t, msg in events if msg.startswith("loading version 2 ")
                        and "failed" in msg)
        assert v1_starts < v2_fails, "the fallback version must load alongside the newest"
        timings.append((attempt, ready, all_loads, one_load))
        assert all_loads <= 2 * one_load + 0.5, timings
    for attempt, ready, all_loads, one_load in timings:
        print(f"{attempt}: READY after {ready:.1f}s; versions 4..1 tried in {all_loads:.2f}s, "
              f"one load of version 1 alone {one_load:.2f}s")


def test_failed_version_is_retried_when_any_of_its_files_changes(tmp_path, exports):
    base = str(tmp_path / MODEL)
    os.makedirs(base)
    install(exports, base, 1)
    bad_warmup = warmup_log(MODEL)
    del bad_warmup.predict_log.request.inputs["ids"]
    install(exports, base, 2, source=export_toy_model(str(tmp_path / "v2"), 2.0,
                                                      warmup_requests=[bad_warmup]))
    config = model_server_config_pb2.ModelConfig(name=MODEL, base_path=base)
    srv = ModelServer(ServerOptions([config], port=0, poll_wait_seconds=0.1,
                                    enable_batching=False))
    srv.start()
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        model_stub = model_service_pb2_grpc.ModelServiceStub(ch)
        assert wait_for(lambda: status(model_stub).get(2) is not None and
                        status(model_stub)[2].state == State.END)
        message = status(model_stub)[2].status.error_message
        assert "warmup" in message
        time.sleep(0.5)  # several polls: unchanged files, no retry
        assert status(model_stub)[2].status.error_message == message
        assert srv.manager.loaded_versions(MODEL) == [1]
        # Only the warmup file is fixed (saved_model.pb and variables untouched): retried.
        warmup_file = os.path.join(base, "2", "assets.extra", "tf_serving_warmup_requests")
        with tf.io.TFRecordWriter(warmup_file) as w:
            w.write(warmup_log(MODEL).SerializeToString())
        assert wait_for(lambda: srv.manager.loaded_versions(MODEL) == [2])
        assert served_version(prediction_service_pb2_grpc.PredictionServiceStub(ch)) == 2
        ch.close()
    finally:
        srv.stop(1)
