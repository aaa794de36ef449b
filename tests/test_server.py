"""The gRPC model server, exercised through the official tensorflow_serving.apis stubs.

A real server listens on 127.0.0.1 (free port) and serves small SavedModels exported here
(tests/serving_toy_model.py); every RPC, the error codes, batching, health and the SIGTERM
drain are checked from the client side.
"""
import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, inference_pb2, input_pb2,
                                     model_management_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc, regression_pb2)
from tensorflow_serving.config import model_server_config_pb2

from serving.model_server.batching import BatchingOptions, parse_batching_parameters
from serving.model_server.server import ModelServer, ServerOptions
from tests.serving_toy_model import (WEIGHTS, example, export_toy_model, predict_request,
                                     warmup_log)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "toy"
WARMUPS = 3


def model_config(name, base_path, labels=None, policy="latest"):
    config = model_server_config_pb2.ModelConfig(name=name, base_path=base_path,
                                                 model_platform="tensorflow")
    if policy == "all":
        config.model_version_policy.all.SetInParent()
    for k, v in (labels or {}).items():
        config.version_labels[k] = v
    return config


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / MODEL
    export_toy_model(str(base / "1"), 1.0)
    export_toy_model(str(base / "2"), 2.0, warmup_requests=[warmup_log(MODEL)] * WARMUPS)
    return str(base)


@pytest.fixture(scope="module")
def server(base_path):
    options = ServerOptions([model_config(MODEL, base_path, {"stable": 1, "canary": 2}, "all")],
                            port=0, poll_wait_seconds=0, max_request_elements=10_000,
                            batching=BatchingOptions(max_batch_size=64, batch_timeout_micros=500))
    srv = ModelServer(options)
    srv.start()
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_stub(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


def outputs(response):
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def assert_good_predict(stub):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = outputs(stub.Predict(predict_request(MODEL, x, [5, 6]), timeout=30))
    np.testing.assert_allclose(out["y"], x @ WEIGHTS, rtol=1e-6)


def test_predict_latest_version_with_output_filter(stub):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    response = stub.Predict(predict_request(MODEL, x, [1, 2, 3, 4, 5]), timeout=30)
    out = outputs(response)
    np.testing.assert_allclose(out["y"], x @ WEIGHTS, rtol=1e-5)
    np.testing.assert_array_equal(out["ids_times_two"], [2, 4, 6, 8, 10])
    np.testing.assert_array_equal(out["version"], [2.0] * 5)  # latest of {1, 2}
    assert response.model_spec.name == MODEL and response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    request = predict_request(MODEL, x, [1, 2, 3, 4, 5])
    request.output_filter.append("ids_times_two")
    assert set(stub.Predict(request, timeout=30).outputs) == {"ids_times_two"}


def test_response_values_are_in_typed_fields_as_tf_serving_writes_them(stub):
    # TF Serving answers with AsProtoField: clients read outputs[k].float_val / int64_val.
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    response = stub.Predict(predict_request(MODEL, x, [5, 6]), timeout=30)
    y, doubled = response.outputs["y"], response.outputs["ids_times_two"]
    assert not y.tensor_content and not doubled.tensor_content
    np.testing.assert_allclose(list(y.float_val), x @ WEIGHTS, rtol=1e-6)
    assert list(doubled.int64_val) == [10, 12]
    assert [d.size for d in y.tensor_shape.dim] == [2]


def test_warmup_requests_ran_before_serving(base_path):
    # Version 2 replays WARMUPS requests at load: its first real request is execution WARMUPS+1.
    srv = ModelServer(ServerOptions([model_config(MODEL, base_path)], port=0,
                                    poll_wait_seconds=0, enable_batching=False))
    srv.start()
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        out = outputs(stub.Predict(predict_request(MODEL, np.ones((1, 4)), [1]), timeout=30))
        assert int(out["call_id"][0]) == WARMUPS + 1
    finally:
        srv.stop(1)


def test_version_and_label_selection(stub):
    for spec, expected in (({"version": 1}, 1.0), ({"version": 2}, 2.0),
                           ({"label": "stable"}, 1.0), ({"label": "canary"}, 2.0)):
        response = stub.Predict(predict_request(MODEL, np.ones((1, 4)), [1], **spec), timeout=30)
        assert outputs(response)["version"][0] == expected, spec
        assert response.model_spec.version.value == int(expected)


def test_classify_example_list_and_context(stub):
    xs = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classify"
    request.input.example_list.examples.extend([example(x) for x in xs])
    result = stub.Classify(request, timeout=30).result
    y = np.asarray(xs, np.float32) @ WEIGHTS
    assert len(result.classifications) == 3
    for c, yi in zip(result.classifications, y):
        assert [k.label for k in c.classes] == ["neg", "pos"]
        pos = np.exp(yi) / (np.exp(yi) + np.exp(-yi))
        assert c.classes[1].score == pytest.approx(pos, rel=1e-5)
        assert c.classes[0].score == pytest.approx(1 - pos, rel=1e-4, abs=1e-6)
    # Context merged into each example; an example's own feature wins over the context.
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classify"
    ctx = request.input.example_list_with_context
    ctx.context.CopyFrom(example([0, 0, 0, 1]))
    ctx.examples.add()  # empty: takes x from the context
    ctx.examples.append(example([1, 0, 0, 0]))
    result = stub.Classify(request, timeout=30).result
    scores = [c.classes[1].score for c in result.classifications]
    assert scores[0] == pytest.approx(1 / (1 + np.exp(-2 * 3.0)), rel=1e-5)
    assert scores[1] == pytest.approx(1 / (1 + np.exp(-2 * 1.0)), rel=1e-5)


def test_regress(stub):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "regress"
    request.input.example_list.examples.extend([example([1, 1, 1, 1]), example([2, 0, 0, 0])])
    values = [r.value for r in stub.Regress(request, timeout=30).result.regressions]
    np.testing.assert_allclose(values, [WEIGHTS.sum(), 2 * WEIGHTS[0]], rtol=1e-6)


def test_multi_inference(stub):
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in (("classify", "tensorflow/serving/classify"),
                              ("regress", "tensorflow/serving/regress")):
        task = request.tasks.add()
        task.model_spec.name = MODEL
        task.model_spec.signature_name = signature
        task.method_name = method
    request.input.example_list.examples.extend([example([0, 0, 1, 0])])
    results = stub.MultiInference(request, timeout=30).results
    assert len(results) == 2
    assert results[0].classification_result.classifications[0].classes[1].score == \
        pytest.approx(1 / (1 + np.exp(-1.0)), rel=1e-5)
    assert results[1].regression_result.regressions[0].value == pytest.approx(0.5)
    assert results[1].model_spec.signature_name == "regress"


def test_get_model_metadata(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = MODEL
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=30)
    assert response.model_spec.version.value == 2
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    assert {"serving_default", "classify", "regress", "slow"} <= set(sig_map.signature_def)
    inputs = sig_map.signature_def["serving_default"].inputs
    assert inputs["x"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in inputs["x"].tensor_shape.dim] == [-1, 4]
    request.metadata_field[0] = "nonsense"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelMetadata(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_model_status(model_stub):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    statuses = model_stub.GetModelStatus(request, timeout=30).model_version_status
    assert {s.version: s.state for s in statuses} == {
        2: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
        1: get_model_status_pb2.ModelVersionStatus.AVAILABLE}
    request.model_spec.version_label = "stable"
    assert [s.version for s in model_stub.GetModelStatus(request).model_version_status] == [1]
    request.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as err:
        model_stub.GetModelStatus(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_reports_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", MODEL):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _nan_request():
    return predict_request(MODEL, [[1, np.nan, 0, 0]], [1])


def _wrong_dtype_request():
    request = predict_request(MODEL, np.ones((1, 4)), [1])
    request.inputs["ids"].CopyFrom(tf.make_tensor_proto(np.array([1.5], np.float32)))
    return request


def _wrong_shape_request():
    return predict_request(MODEL, np.ones((2, 3)), [1, 2])


def _missing_input_request():
    request = predict_request(MODEL, np.ones((1, 4)), [1])
    del request.inputs["ids"]
    return request


def _extra_input_request():
    request = predict_request(MODEL, np.ones((1, 4)), [1])
    request.inputs["bogus"].CopyFrom(tf.make_tensor_proto(np.ones(1, np.float32)))
    return request


def _bad_filter_request():
    request = predict_request(MODEL, np.ones((1, 4)), [1])
    request.output_filter.append("nope")
    return request


def _oversized_request():  # server limit: 10,000 elements
    return predict_request(MODEL, np.ones((3000, 4)), np.arange(3000))


BAD_REQUESTS = {
    "wrong_dtype": (_wrong_dtype_request, grpc.StatusCode.INVALID_ARGUMENT, ["ids", "int64"]),
    "wrong_shape": (_wrong_shape_request, grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "[?, 4]"]),
    "missing_input": (_missing_input_request, grpc.StatusCode.INVALID_ARGUMENT, ["ids"]),
    "extra_input": (_extra_input_request, grpc.StatusCode.INVALID_ARGUMENT, ["bogus"]),
    "nan": (_nan_request, grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "NaN"]),
    "oversized": (_oversized_request, grpc.StatusCode.INVALID_ARGUMENT, ["15000", "10000"]),
    "bad_output_filter": (_bad_filter_request, grpc.StatusCode.INVALID_ARGUMENT, ["nope"]),
    "unknown_model": (lambda: predict_request("other", np.ones((1, 4)), [1]),
                      grpc.StatusCode.NOT_FOUND, ["other"]),
    "unknown_version": (lambda: predict_request(MODEL, np.ones((1, 4)), [1], version=7),
                        grpc.StatusCode.NOT_FOUND, ["version 7"]),
    "unknown_label": (lambda: predict_request(MODEL, np.ones((1, 4)), [1], label="beta"),
                      grpc.StatusCode.NOT_FOUND, ["beta"]),
    "unknown_signature": (lambda: predict_request(MODEL, np.ones((1, 4)), [1],
                                                  signature="nope"),
                          grpc.StatusCode.NOT_FOUND, ["nope", "serving_default"]),
    "examples_to_predict_signature": (
        lambda: classification_pb2.ClassificationRequest(
            model_spec={"name": MODEL},
            input=input_pb2.Input(example_list=input_pb2.ExampleList(examples=[example([1] * 4)]))),
        grpc.StatusCode.INVALID_ARGUMENT, ["inputs"]),
    "empty_classify_input": (
        lambda: classification_pb2.ClassificationRequest(
            model_spec={"name": MODEL, "signature_name": "classify"}),
        grpc.StatusCode.INVALID_ARGUMENT, ["empty"]),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_code_and_server_keeps_serving(stub, case):
    make, code, words = BAD_REQUESTS[case]
    request = make()
    rpc = stub.Classify if isinstance(request, classification_pb2.ClassificationRequest) \
        else stub.Predict
    with pytest.raises(grpc.RpcError) as err:
        rpc(request, timeout=30)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details(), err.value.details()
    assert_good_predict(stub)


def test_message_size_limit_and_no_model_loaded(tmp_path, base_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = ModelServer(ServerOptions([model_config(MODEL, base_path),
                                     model_config("later", str(empty))], port=0,
                                    poll_wait_seconds=0, max_message_bytes=64 * 1024,
                                    serve_before_models_load=True))
    srv.start()
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        big = predict_request(MODEL, np.ones((5000, 4)), np.arange(5000))  # ~120 KB
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(big, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(predict_request("later", np.ones((1, 4)), [1]), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no loaded version" in err.value.details()
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service="later")).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service=MODEL)).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert_good_predict(stub)
        # HandleReloadConfigRequest: point "later" at the real models; it gets served.
        reload = model_management_pb2.ReloadConfigRequest()
        reload.config.model_config_list.config.extend(
            [model_config(MODEL, base_path), model_config("later", base_path)])
        response = model_service_pb2_grpc.ModelServiceStub(ch).HandleReloadConfigRequest(
            reload, timeout=60)
        assert response.status.error_code == 0
        out = outputs(stub.Predict(predict_request("later", np.ones((1, 4)), [1]), timeout=30))
        assert out["version"][0] == 2.0
        ch.close()
    finally:
        srv.stop(1)


def test_batching_merges_concurrent_requests(base_path):
    # A long batch timeout makes the merge deterministic: 16 concurrent requests of 1-3 rows
    # must run in far fewer than 16 executions, and every caller gets exactly its own rows.
    options = ServerOptions([model_config(MODEL, base_path)], port=0, poll_wait_seconds=0,
                            enable_warmup=False,
                            batching=BatchingOptions(max_batch_size=32,
                                                     batch_timeout_micros=300_000,
                                                     num_batch_threads=2))
    srv = ModelServer(options)
    srv.start()
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        rng = np.random.default_rng(1)
        xs = [rng.normal(size=(1 + i % 3, 4)).astype(np.float32) for i in range(16)]

        def call(i):
            ids = np.full(len(xs[i]), i)
            return outputs(stub.Predict(predict_request(MODEL, xs[i], ids), timeout=60))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, range(16)))
        for i, out in enumerate(results):
            np.testing.assert_allclose(out["y"], xs[i] @ WEIGHTS, rtol=1e-5)
            np.testing.assert_array_equal(out["ids_times_two"], np.full(len(xs[i]), 2 * i))
        executions = {int(out["call_id"][0]) for out in results}
        assert len(executions) <= 4, executions
        sig = srv.manager.resolve(MODEL).signature("serving_default")
        assert sig.executions == len(executions)
        assert sig.batcher.tasks_run == 16
    finally:
        srv.stop(1)


def test_batching_parameters_text_format():
    params = parse_batching_parameters(
        "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 1000 }\n"
        "num_batch_threads { value: 2 }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 8\n")
    options = BatchingOptions.from_proto(params)
    assert (options.max_batch_size, options.batch_timeout_micros, options.num_batch_threads,
            options.allowed_batch_sizes) == (8, 1000, 2, [4, 8])
    with pytest.raises(ValueError, match="max_batch_sizes"):
        parse_batching_parameters("max_batch_sizes { value: 8 }")
    with pytest.raises(ValueError, match="allowed_batch_sizes"):
        BatchingOptions(max_batch_size=8, allowed_batch_sizes=[4, 6])


def test_sigterm_drains_in_flight_requests(tmp_path, base_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.model_server", "--model-base-path", base_path,
         "--model-name", MODEL, "--port", "0", "--file-system-poll-wait-seconds", "0",
         "--no-enable-batching", "--drain-seconds", "60", "--rest-api-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 90
        while not line.startswith("READY") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert line.startswith("READY"), proc.stderr.read()
        port = int(line.split(":")[-1])
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        assert_good_predict(stub)
        slow = predict_request(MODEL, np.ones((1, 4)), [1], signature="slow")
        del slow.inputs["x"]
        del slow.inputs["ids"]
        # Calibrate: a request that stays in flight for about 1.5 s.
        iterations = 2000
        for _ in range(4):
            slow.inputs["iterations"].CopyFrom(tf.make_tensor_proto(np.array([iterations])))
            started = time.monotonic()
            stub.Predict(slow, timeout=60)
            took = time.monotonic() - started
            if took > 1.0:
                break
            iterations = int(iterations * min(20, 1.5 / max(took, 0.01)))
        future = stub.Predict.future(slow, timeout=120)
        time.sleep(0.3)
        assert not future.done()
        proc.send_signal(signal.SIGTERM)
        response = future.result()  # the in-flight request completes
        assert tf.make_ndarray(response.outputs["done"])[0] == 1.0
        assert proc.wait(timeout=60) == 0
        with pytest.raises(grpc.RpcError) as err:  # nobody listens any more
            stub.Predict(predict_request(MODEL, np.ones((1, 4)), [1]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        ch.close()
        assert "draining" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tensorflow_thread_flags_set_the_pools_before_any_op_and_refuse_late_changes():
    # A fresh interpreter: the pools of this test process are already created.
    script = (
        "import tensorflow as tf\n"
        "from serving.model_server.server import configure_tensorflow_threads as c\n"
        "c(1, 2)\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads())\n"
        "tf.constant(1.0) + 1.0\n"
        "c(1, 2)  # same values after the first op: nothing to change, no error\n"
        "try:\n"
        "    c(3, 0)\n"
        "except ValueError as e:\n"
        "    print('refused:', 'before any op runs' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "1 2"
    assert lines[-1] == "refused: True"


def test_out_of_range_numeric_flags_are_refused_before_tensorflow_loads():
    for flag, value, message in (("--tensorflow-intra-op-parallelism", "-1", "must be >= 0"),
                                 ("--port", "-5", "must be >= 0"),
                                 ("--grpc-threads", "0", "must be >= 1"),
                                 ("--max-request-elements", "-3", "must be >= 1"),
                                 ("--drain-seconds", "-1", "must be >= 0"),
                                 ("--lame-duck-seconds", "nan", "must be >= 0"),
                                 ("--grpc-threads", "many", "'many' is not an integer")):
        refused = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "serving.model_server",
             "--model-base-path", ROOT, flag, value],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2, (flag, value)
        assert f"argument {flag}: {message}" in refused.stderr, refused.stderr[-500:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in refused.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "tensorflow" not in imported and "grpc" not in imported, (flag, value)
