"""The model server under faults and hostile callers: a bad request inside a merged batch fails
alone, a full batching queue refuses at once, numeric overflow never comes back as an OK NaN,
reloads cannot point the server outside its folders, and `--help` answers without loading the
heavy modules. Real servers on 127.0.0.1, official tensorflow_serving.apis stubs, bounded
request counts and deadlines."""
import concurrent.futures
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import (classification_pb2, model_management_pb2,
                                     model_service_pb2_grpc, prediction_service_pb2_grpc)

from serving.model_server.batching import BatchingOptions
from serving.model_server.server import ModelServer, ServerOptions
from tests.serving_toy_model import WEIGHTS, example, export_toy_model, predict_request
from tests.test_server import MODEL, model_config, outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT_MAX = np.finfo(np.float32).max


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two model folders: the one the servers serve and one elsewhere (for reload attacks)."""
    root = tmp_path_factory.mktemp("robustness")
    served = root / "served" / MODEL
    export_toy_model(str(served / "1"), 1.0)
    elsewhere = root / "elsewhere" / MODEL
    export_toy_model(str(elsewhere / "1"), 7.0)
    return str(served), str(elsewhere)


class Running:
    """An in-process server with a channel and stubs; a context manager that stops it."""

    def __init__(self, configs, **options):
        self.server = ModelServer(ServerOptions(configs, port=0, poll_wait_seconds=0,
                                                enable_warmup=False, **options))
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.channel.close()
        self.server.stop(1)


def classify_request(xs):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classify"
    request.input.example_list.examples.extend(
        [example(x) if x is not None else example_pb2.Example() for x in xs])
    return request


def call_all(calls, workers=16):
    """Runs the zero-argument callables at once; per call the result or the grpc.RpcError."""
    def run(call):
        try:
            return call()
        except grpc.RpcError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, calls))


def test_malformed_example_in_a_merged_batch_fails_alone(models):
    served, _ = models
    batching = BatchingOptions(max_batch_size=64, batch_timeout_micros=300_000,
                               num_batch_threads=2)
    with Running([model_config(MODEL, served)], batching=batching) as srv:
        rng = np.random.default_rng(3)
        good = [[rng.normal(size=4).tolist() for _ in range(2)] for _ in range(8)]
        requests = [classify_request(xs) for xs in good]
        bad = 3
        requests[bad] = classify_request([good[bad][0], None])  # second example lacks "x"
        results = call_all([lambda r=r: srv.predict.Classify(r, timeout=60) for r in requests])
        assert isinstance(results[bad], grpc.RpcError), results[bad]
        assert results[bad].code() == grpc.StatusCode.INVALID_ARGUMENT, results[bad].details()
        for i, response in enumerate(results):
            if i == bad:
                continue
            assert not isinstance(response, grpc.RpcError), (i, response)
            y = np.asarray(good[i], np.float32) @ WEIGHTS
            scores = [c.classes[1].score for c in response.result.classifications]
            np.testing.assert_allclose(scores, 1 / (1 + np.exp(-2 * y)), rtol=1e-4)
        batcher = srv.server.manager.resolve(MODEL).signature("classify").batcher
        assert batcher.batches_split >= 1  # the requests were merged, then separated
        assert batcher.tasks_run >= 7


def test_numeric_overflow_is_invalid_argument_and_fails_alone_in_a_batch(models):
    served, _ = models
    batching = BatchingOptions(max_batch_size=64, batch_timeout_micros=300_000)
    with Running([model_config(MODEL, served)], batching=batching) as srv:
        xs = [np.full((1, 4), i, np.float32) for i in range(6)]
        overflow = 2
        xs[overflow] = np.full((1, 4), FLOAT_MAX, np.float32)  # finite input, x . w overflows
        results = call_all([lambda x=x: srv.predict.Predict(predict_request(MODEL, x, [1]),
                                                            timeout=60) for x in xs])
        err = results[overflow]
        assert isinstance(err, grpc.RpcError), outputs(err)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN/Inf" in err.details() and "'y'" in err.details()
        for i, response in enumerate(results):
            if i != overflow:
                assert not isinstance(response, grpc.RpcError), (i, response)
                np.testing.assert_allclose(outputs(response)["y"], xs[i] @ WEIGHTS, rtol=1e-6)
        # Alone, through Classify (its scores are softmax of +-inf: NaN), the same code.
        with pytest.raises(grpc.RpcError) as err:
            srv.predict.Classify(classify_request([[FLOAT_MAX] * 4]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def slow_request(iterations, rows=1):
    request = predict_request(MODEL, np.ones((1, 4)), [1], signature="slow")
    del request.inputs["x"]
    del request.inputs["ids"]
    request.inputs["iterations"].CopyFrom(tf.make_tensor_proto(np.full(rows, iterations)))
    return request


def test_full_batching_queue_refuses_at_once(models):
    served, _ = models
    # One batch thread, batches of 4 rows, one batch may wait: with requests of 4 rows, one
    # runs, one waits, and the third concurrent request onwards finds the queue full (the
    # queue is bounded in batches of rows, not in requests).
    batching = BatchingOptions(max_batch_size=4, batch_timeout_micros=0, max_enqueued_batches=1,
                               num_batch_threads=1)
    with Running([model_config(MODEL, served)], batching=batching) as srv:
        iterations, took = 2000, 0.0
        for _ in range(5):  # calibrate: one request keeps the batch thread busy for ~0.6 s
            started = time.monotonic()
            srv.predict.Predict(slow_request(iterations), timeout=60)
            took = time.monotonic() - started
            if took > 0.5:
                break
            iterations = int(iterations * min(20, 0.8 / max(took, 0.01)))
        assert took > 0.5, "could not make a slow request"

        def timed():
            started = time.monotonic()
            try:
                srv.predict.Predict(slow_request(iterations, rows=4), timeout=120)
                return "ok", time.monotonic() - started
            except grpc.RpcError as exc:
                return exc.code(), time.monotonic() - started

        results = call_all([timed] * 10)
        refused = [t for code, t in results if code == grpc.StatusCode.UNAVAILABLE]
        served_ok = [t for code, t in results if code == "ok"]
        assert len(refused) + len(served_ok) == 10, results
        assert 2 <= len(served_ok) <= 3 and len(refused) >= 7, results
        assert max(refused) < took / 2, results  # refused at once, not after waiting
        batcher = srv.server.manager.resolve(MODEL).signature("slow").batcher
        assert batcher.tasks_refused == len(refused)
        # The queue drained: the server takes requests again.
        srv.predict.Predict(slow_request(1), timeout=60)


def reload_request(*configs):
    request = model_management_pb2.ReloadConfigRequest()
    request.config.model_config_list.SetInParent()
    request.config.model_config_list.config.extend(configs)
    return request


def version_served(srv, name):
    response = srv.predict.Predict(predict_request(name, np.ones((1, 4)), [1]), timeout=30)
    return outputs(response)["version"][0]


def test_reload_is_confined_to_the_configured_folders(models, monkeypatch):
    served, elsewhere = models
    link = os.path.join(served, "link-out")  # inside the base path, pointing outside it
    if not os.path.islink(link):
        os.symlink(os.path.dirname(elsewhere), link)
    monkeypatch.chdir(served)
    with Running([model_config(MODEL, served)]) as srv:
        hostile = {
            "absolute elsewhere": elsewhere,
            "dot-dot escape": os.path.join(served, "..", "..", "elsewhere", MODEL),
            "relative ../..": os.path.join("..", "..", "elsewhere", MODEL),
            "symlink out": os.path.join(served, "link-out", MODEL),
            "sibling with common prefix": served + "-evil",
            "other file system": "gs://some-bucket/models/" + MODEL,
        }
        for case, path in hostile.items():
            with pytest.raises(grpc.RpcError) as err:
                srv.models.HandleReloadConfigRequest(
                    reload_request(model_config(MODEL, served), model_config("x", path)),
                    timeout=30)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, case
            assert "outside" in err.value.details(), case
        assert srv.server.manager.model_names() == [MODEL]  # nothing was applied
        with pytest.raises(grpc.RpcError) as err:
            srv.models.HandleReloadConfigRequest(reload_request(), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "empty" in err.value.details()
        assert version_served(srv, MODEL) == 1.0
        # Inside the configured base path (here relative to the working directory): accepted.
        response = srv.models.HandleReloadConfigRequest(
            reload_request(model_config(MODEL, served), model_config("copy", ".")), timeout=60)
        assert response.status.error_code == 0
        assert version_served(srv, "copy") == 1.0

    roots = [os.path.dirname(elsewhere)]
    with Running([model_config(MODEL, served)], reload_allowed_roots=roots,
                 allow_empty_model_config_reload=True) as srv:
        response = srv.models.HandleReloadConfigRequest(
            reload_request(model_config(MODEL, elsewhere)), timeout=60)
        assert response.status.error_code == 0
        assert version_served(srv, MODEL) == 7.0
        response = srv.models.HandleReloadConfigRequest(reload_request(), timeout=60)
        assert response.status.error_code == 0 and srv.server.manager.model_names() == []

    with Running([model_config(MODEL, served)], allow_model_config_reload=False) as srv:
        with pytest.raises(grpc.RpcError) as err:
            srv.models.HandleReloadConfigRequest(
                reload_request(model_config(MODEL, served)), timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert version_served(srv, MODEL) == 1.0


def test_help_is_fast_and_shows_the_batching_switch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "serving.model_server", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--enable-batching, --no-enable-batching" in result.stdout
    assert "--no-enable-batching (default" not in result.stdout
    for flag in ("--lame-duck-seconds", "--serve-before-models-load", "--reload-allowed-roots",
                 "--disable-model-config-reload", "--max-broadcast-bytes"):
        assert flag in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    heavy = {m for m in imported if m.split(".")[0] in ("tensorflow", "grpc", "numpy")}
    assert not heavy, sorted(heavy)[:5]
    # A bad flag is refused as quickly, before anything heavy loads.
    result = subprocess.run([sys.executable, "-m", "serving.model_server", "--port", "x"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--port" in result.stderr
