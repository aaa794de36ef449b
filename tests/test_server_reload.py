"""Hot reload: new versions are picked up while requests run, broken ones never replace a
working version, and GetModelStatus tells what happened. Real server on 127.0.0.1, official
stubs, bounded thread pool, request count and time."""
import concurrent.futures
import os
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

from serving.model_server.batching import BatchingOptions
from serving.model_server.server import ModelServer, ServerOptions
from tests.serving_toy_model import WEIGHTS, export_toy_model, predict_request, warmup_log

MODEL = "toy"
State = get_model_status_pb2.ModelVersionStatus


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Versions exported once, copied into base paths by the tests (atomic rename)."""
    root = tmp_path_factory.mktemp("exports")
    return {v: export_toy_model(str(root / f"v{v}"), float(v)) for v in (1, 2, 3)}


def install(exports, base, version, source=None):
    """Copies an export next to the base path, then renames it in (what a deploy should do)."""
    staging = os.path.join(os.path.dirname(base), f".staging-{version}")
    shutil.copytree(source or exports[version], staging)
    os.rename(staging, os.path.join(base, str(version)))


def start(base, **kw):
    config = model_server_config_pb2.ModelConfig(name=MODEL, base_path=base)
    srv = ModelServer(ServerOptions([config], port=0, poll_wait_seconds=0.2,
                                    batching=BatchingOptions(max_batch_size=16,
                                                             batch_timeout_micros=1000), **kw))
    srv.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    return (srv, ch, prediction_service_pb2_grpc.PredictionServiceStub(ch),
            model_service_pb2_grpc.ModelServiceStub(ch))


def status(model_stub):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    return {s.version: s for s in model_stub.GetModelStatus(request, timeout=10)
            .model_version_status}


def wait_for(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_hot_reload_under_concurrent_load_fails_no_request(tmp_path, exports):
    base = str(tmp_path / MODEL)
    os.makedirs(base)
    install(exports, base, 1)
    srv, ch, stub, model_stub = start(base)
    stop = threading.Event()
    seen_versions, failures, answered = [], [], [0]
    by_worker = {w: [] for w in range(6)}  # each worker's own answers, in the order it got them
    lock = threading.Lock()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4)).astype(np.float32)

    def client(worker):
        for i in range(400):  # bounded per worker
            if stop.is_set():
                return
            try:
                response = stub.Predict(predict_request(MODEL, x, [worker, i]), timeout=30)
                out = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
                np.testing.assert_allclose(out["y"], x @ WEIGHTS, rtol=1e-5)
                by_worker[worker].append(int(out["version"][0]))
                with lock:
                    seen_versions.append(int(out["version"][0]))
                    answered[0] += 1
            except Exception as exc:  # any failure is recorded and fails the test
                with lock:
                    failures.append(repr(exc))

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            workers = [pool.submit(client, w) for w in range(6)]
            assert wait_for(lambda: answered[0] >= 20)
            install(exports, base, 2)
            assert wait_for(lambda: 2 in seen_versions[-5:]), "version 2 never served"
            install(exports, base, 3)
            assert wait_for(lambda: 3 in seen_versions[-5:]), "version 3 never served"
            shutil.rmtree(os.path.join(base, "3"))  # rollback by removing the bad release
            assert wait_for(lambda: seen_versions[-5:] == [2] * 5), "no rollback to 2"
            stop.set()
            for w in workers:
                w.result(timeout=60)
        assert not failures, failures[:3]
        assert answered[0] >= 40
        # Versions only move forward until the rollback: no worker gets an old version after a
        # newer one (per worker, because the shared list's order across threads is the order
        # they took the lock, not the order the server answered).
        for versions in by_worker.values():
            if 2 in versions:
                assert 1 not in versions[versions.index(2):], versions
            if 3 in versions:
                before_rollback = versions[versions.index(3):]
                assert 1 not in before_rollback, versions
        # Unloaded versions pass through UNLOADING to END once their last request finished.
        assert wait_for(lambda: {v: s.state for v, s in status(model_stub).items()} == {
            1: State.END, 2: State.AVAILABLE, 3: State.END}), status(model_stub)
        assert srv.manager.loaded_versions(MODEL) == [2]
    finally:
        stop.set()
        ch.close()
        srv.stop(1)


def test_broken_new_version_never_replaces_a_working_one(tmp_path, exports):
    base = str(tmp_path / MODEL)
    os.makedirs(base)
    install(exports, base, 1)
    srv, ch, stub, model_stub = start(base)
    try:
        # Version 2: a corrupt SavedModel. Version 3: loads, but its warmup request is wrong.
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        install(exports, base, 2, source=str(broken))
        assert wait_for(lambda: status(model_stub).get(2) is not None and
                        status(model_stub)[2].state == State.END)
        st = status(model_stub)[2]
        assert st.status.error_code != 0 and "version 2" in st.status.error_message
        bad_warmup = warmup_log(MODEL)
        del bad_warmup.predict_log.request.inputs["ids"]
        bad = export_toy_model(str(tmp_path / "bad_warmup"), 3.0, warmup_requests=[bad_warmup])
        install(exports, base, 3, source=bad)
        assert wait_for(lambda: status(model_stub).get(3) is not None and
                        status(model_stub)[3].state == State.END)
        assert "warmup" in status(model_stub)[3].status.error_message
        time.sleep(0.5)  # several polls: the broken versions are not retried
        assert srv.manager.loaded_versions(MODEL) == [1]
        assert status(model_stub)[1].state == State.AVAILABLE
        out = stub.Predict(predict_request(MODEL, np.ones((1, 4)), [1]), timeout=30)
        assert tf.make_ndarray(out.outputs["version"])[0] == 1.0
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(predict_request(MODEL, np.ones((1, 4)), [1], version=2), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Fixing the files of version 3 in place makes the server retry it.
        shutil.rmtree(os.path.join(base, "3"))
        install(exports, base, 3)
        assert wait_for(lambda: srv.manager.loaded_versions(MODEL) == [3])
        out = stub.Predict(predict_request(MODEL, np.ones((1, 4)), [1]), timeout=30)
        assert tf.make_ndarray(out.outputs["version"])[0] == 3.0
    finally:
        ch.close()
        srv.stop(1)


def test_partial_version_is_retried_as_its_files_arrive_while_load_never_fails(tmp_path,
                                                                               exports):
    """A version copied file by file (no atomic rename): the server sees saved_model.pb before
    the variables, then a truncated variables file. Each attempt fails while version 1 keeps
    serving every request; once the last file is complete the version is loaded and served."""
    base = str(tmp_path / MODEL)
    os.makedirs(base)
    install(exports, base, 1)
    srv, ch, stub, model_stub = start(base)
    stop = threading.Event()
    seen_versions, failures, answered = [], [], [0]
    lock = threading.Lock()
    x = np.ones((1, 4), np.float32)

    def client(worker):
        for i in range(2000):  # bounded per worker
            if stop.is_set():
                return
            try:
                out = stub.Predict(predict_request(MODEL, x, [worker]), timeout=30).outputs
                with lock:
                    seen_versions.append(float(tf.make_ndarray(out["version"])[0]))
                    answered[0] += 1
            except Exception as exc:  # any failure is recorded and fails the test
                with lock:
                    failures.append(repr(exc))
            time.sleep(0.005)

    source, target = exports[2], os.path.join(base, "2")
    data_file = os.path.join("variables", "variables.data-00000-of-00001")

    def failed_attempts():
        st = status(model_stub).get(2)
        return st.status.error_message if st is not None and st.state == State.END else None

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(client, w) for w in range(4)]
            assert wait_for(lambda: answered[0] >= 20)
            os.makedirs(target)
            for name in os.listdir(source):
                if name != "variables":
                    src = os.path.join(source, name)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(
                        src, os.path.join(target, name))
            assert wait_for(lambda: failed_attempts() is not None), status(model_stub)
            first_error = failed_attempts()
            os.makedirs(os.path.join(target, "variables"))
            shutil.copy2(os.path.join(source, "variables", "variables.index"),
                         os.path.join(target, "variables"))
            with open(os.path.join(source, data_file), "rb") as f:
                data = f.read()
            with open(os.path.join(target, data_file), "wb") as f:
                f.write(data[: len(data) // 2])  # the copy is still under way
            assert wait_for(lambda: failed_attempts() not in (None, first_error)), \
                "the changed files were not retried"
            print(f"partial copy failed with {first_error[-100:]!r}, then with "
                  f"{failed_attempts()[-100:]!r}")
            time.sleep(0.5)  # several polls on the incomplete version
            assert srv.manager.loaded_versions(MODEL) == [1]
            with open(os.path.join(target, data_file), "wb") as f:
                f.write(data)
            assert wait_for(lambda: seen_versions[-3:] == [2.0] * 3), "version 2 never served"
            stop.set()
            for w in workers:
                w.result(timeout=60)
        assert not failures, failures[:3]
        assert seen_versions.index(2.0) > 20 and 1.0 not in seen_versions[
            seen_versions.index(2.0):]
        assert status(model_stub)[2].state == State.AVAILABLE
    finally:
        stop.set()
        ch.close()
        srv.stop(1)
