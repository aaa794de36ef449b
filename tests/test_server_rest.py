"""TF Serving's JSON REST API of the model server: the same request through REST and gRPC gives
the same outputs (predict in row and columnar formats, classify, regress, versions and labels,
status and metadata), the same validation and limits answer with TF Serving's HTTP codes and
{"error": ...} bodies, hostile bodies and too many connections never take the server down, and
the drain finishes REST requests in flight. One server on 127.0.0.1 serves both APIs; HTTP
with the standard library's http.client, gRPC with the official stubs."""
import base64
import concurrent.futures
import http.client
import json
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc, regression_pb2)

from serving.model_server.batching import BatchingOptions
from serving.model_server.server import ModelServer, ServerOptions
from tests.serving_toy_model import WEIGHTS, example, export_toy_model, predict_request
from tests.test_server import MODEL, model_config, outputs

MAX_CONNECTIONS = 6
MAX_BODY_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("rest_models") / MODEL
    export_toy_model(str(base / "1"), 1.0)
    export_toy_model(str(base / "2"), 2.0)
    return str(base)


@pytest.fixture(scope="module")
def server(base_path):
    options = ServerOptions([model_config(MODEL, base_path, {"stable": 1, "canary": 2}, "all")],
                            port=0, poll_wait_seconds=0, max_request_elements=10_000,
                            batching=BatchingOptions(max_batch_size=64, batch_timeout_micros=500),
                            rest_api_port=0, rest_api_connections=MAX_CONNECTIONS,
                            rest_api_max_body_bytes=MAX_BODY_BYTES)
    srv = ModelServer(options)
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    srv.test_stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    srv.test_model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    yield srv
    channel.close()
    srv.stop(1)


def call_rest(port, method, path, body=None, headers=None, timeout=60):
    """(status, parsed JSON body, response headers) of one request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        payload = response.read()
        return response.status, json.loads(payload), dict(response.getheaders())
    finally:
        connection.close()


def post(server, path, body, **kw):
    status, doc, _ = call_rest(server.rest_port, "POST", path, body, **kw)
    return status, doc


def test_predict_row_and_columnar_formats_match_grpc(server):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    ids = np.arange(10, 15)
    expected = outputs(server.test_stub.Predict(predict_request(MODEL, x, ids), timeout=30))
    rows = [{"x": row.tolist(), "ids": int(i)} for row, i in zip(x, ids)]
    status, doc = post(server, f"/v1/models/{MODEL}:predict", {"instances": rows})
    assert status == 200, doc
    predictions = doc["predictions"]
    assert len(predictions) == 5 and set(predictions[0]) == set(expected)
    for key in ("y", "ids_times_two", "version"):
        got = np.array([p[key] for p in predictions], dtype=expected[key].dtype)
        np.testing.assert_array_equal(got, expected[key])  # bit for bit: the same graph
    np.testing.assert_allclose(expected["y"], x @ WEIGHTS, rtol=1e-5)
    status, doc = post(server, f"/v1/models/{MODEL}:predict",
                       {"signature_name": "serving_default",
                        "inputs": {"x": x.tolist(), "ids": ids.tolist()}})
    assert status == 200, doc
    for key in ("y", "ids_times_two", "version"):
        np.testing.assert_array_equal(np.array(doc["outputs"][key], expected[key].dtype),
                                      expected[key])
    # float32 outputs are written in their shortest exact form and parse back to the same bits
    assert all(len(repr(v)) <= 16 for v in doc["outputs"]["y"])


def test_versions_and_labels_in_the_url(server):
    body = {"inputs": {"x": [[1, 1, 1, 1]], "ids": [1]}}
    for path, version in ((f"/v1/models/{MODEL}", 2.0), (f"/v1/models/{MODEL}/versions/1", 1.0),
                          (f"/v1/models/{MODEL}/labels/stable", 1.0),
                          (f"/v1/models/{MODEL}/labels/canary", 2.0)):
        status, doc = post(server, path + ":predict", body)
        assert status == 200, (path, doc)
        assert doc["outputs"]["version"] == [version], path


def test_string_inputs_as_b64_match_grpc_classify(server):
    xs = [[1, 0, 0, 0], [0, 0, 2, 0], [0, 1, 0, 1]]
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classify"
    request.input.example_list.examples.extend([example(x) for x in xs])
    grpc_result = server.test_stub.Classify(request, timeout=30).result
    grpc_scores = np.array([[c.score for c in r.classes] for r in grpc_result.classifications],
                           np.float32)
    instances = [{"b64": base64.b64encode(example(x).SerializeToString()).decode()}
                 for x in xs]
    status, doc = post(server, f"/v1/models/{MODEL}:predict",
                       {"signature_name": "classify", "instances": instances})
    assert status == 200, doc
    np.testing.assert_array_equal(np.array([p["scores"] for p in doc["predictions"]],
                                           np.float32), grpc_scores)
    assert [p["classes"] for p in doc["predictions"]] == [["neg", "pos"]] * 3


def test_classify_and_regress_json_examples_match_grpc(server):
    xs = [[1.5, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 2.0]]
    context = {"x": [0.0, 0.0, 0.0, 1.0]}
    for verb, proto_cls in (("classify", classification_pb2.ClassificationRequest),
                            ("regress", regression_pb2.RegressionRequest)):
        request = proto_cls()
        request.model_spec.name = MODEL
        request.model_spec.signature_name = verb
        with_context = request.input.example_list_with_context
        with_context.context.CopyFrom(example(context["x"]))
        with_context.examples.add()  # takes x from the context
        with_context.examples.extend([example(x) for x in xs])
        body = {"signature_name": verb, "context": context,
                "examples": [{}] + [{"x": x} for x in xs]}
        status, doc = post(server, f"/v1/models/{MODEL}:{verb}", body)
        assert status == 200, doc
        if verb == "classify":
            result = server.test_stub.Classify(request, timeout=30).result
            expected = [[[c.label, c.score] for c in r.classes] for r in result.classifications]
            assert [[label for label, _ in r] for r in doc["results"]] == \
                [[label for label, _ in r] for r in expected]
            np.testing.assert_array_equal(
                np.array([[s for _, s in r] for r in doc["results"]], np.float32),
                np.array([[s for _, s in r] for r in expected], np.float32))
        else:
            result = server.test_stub.Regress(request, timeout=30).result
            expected = np.array([r.value for r in result.regressions], np.float32)
            np.testing.assert_array_equal(np.array(doc["results"], np.float32), expected)
            np.testing.assert_allclose(expected, [WEIGHTS[3], 1.5 * WEIGHTS[0],
                                                  WEIGHTS[1] + 2 * WEIGHTS[3]], rtol=1e-6)


def test_model_status_and_metadata_are_the_grpc_answers_as_json(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    grpc_status = server.test_model_stub.GetModelStatus(request, timeout=30)
    status, doc, headers = call_rest(server.rest_port, "GET", f"/v1/models/{MODEL}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert doc == json_format.MessageToDict(grpc_status, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
    assert {s["version"]: s["state"] for s in doc["model_version_status"]} == \
        {"2": "AVAILABLE", "1": "AVAILABLE"}
    assert doc["model_version_status"][0]["status"]["error_code"] == "OK"
    status, doc, _ = call_rest(server.rest_port, "GET", f"/v1/models/{MODEL}/labels/stable")
    assert status == 200 and [s["version"] for s in doc["model_version_status"]] == ["1"]
    status, doc, _ = call_rest(server.rest_port, "GET", f"/v1/models/{MODEL}/versions/1/metadata")
    assert status == 200, doc
    assert doc["model_spec"]["name"] == MODEL and doc["model_spec"]["version"] == "1"
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = MODEL
    request.model_spec.version.value = 1
    request.metadata_field.append("signature_def")
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    server.test_stub.GetModelMetadata(request, timeout=30).metadata["signature_def"].Unpack(
        signature_defs)
    assert doc["metadata"]["signature_def"] == json_format.MessageToDict(
        signature_defs, preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True)
    x = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["x"]
    assert x["dtype"] == "DT_FLOAT"


def grpc_error(server, request):
    with pytest.raises(grpc.RpcError) as err:
        server.test_stub.Predict(request, timeout=30)
    return err.value.code(), err.value.details()


BAD_BODIES = {
    # name: (path, body, HTTP status, words in the error)
    "unknown model": ("/v1/models/other:predict", {"instances": [1.0]}, 404, ["other"]),
    "unknown version": (f"/v1/models/{MODEL}/versions/7:predict", {"instances": [1.0]}, 404,
                        ["version 7"]),
    "unknown label": (f"/v1/models/{MODEL}/labels/beta:predict", {"instances": [1.0]}, 404,
                      ["beta"]),
    "unknown signature": (f"/v1/models/{MODEL}:predict",
                          {"signature_name": "nope", "instances": [1.0]}, 404, ["nope"]),
    "not JSON": (f"/v1/models/{MODEL}:predict", b"{instances: [", 400, ["JSON"]),
    "not an object": (f"/v1/models/{MODEL}:predict", b"[1, 2]", 400, ["object"]),
    "both formats": (f"/v1/models/{MODEL}:predict", {"instances": [], "inputs": {}}, 400,
                     ["exactly one"]),
    "plain list for two inputs": (f"/v1/models/{MODEL}:predict", {"instances": [1.0]}, 400,
                                  ["several inputs"]),
    "instance keys differ": (f"/v1/models/{MODEL}:predict",
                             {"instances": [{"x": [1, 2, 3, 4]}]}, 400, ["keys"]),
    "ragged rows": (f"/v1/models/{MODEL}:predict",
                    {"instances": [{"x": [1, 2, 3, 4], "ids": 1}, {"x": [1, 2], "ids": 2}]},
                    400, ["'x'"]),
    "decimal for int64": (f"/v1/models/{MODEL}:predict",
                          {"inputs": {"x": [[1, 2, 3, 4]], "ids": [1.5]}}, 400,
                          ["'ids'", "int64"]),
    "string for float": (f"/v1/models/{MODEL}:predict",
                         {"inputs": {"x": [[1, "a", 3, 4]], "ids": [1]}}, 400, ['"a"']),
    "integer beyond float32": (f"/v1/models/{MODEL}:predict",
                               {"inputs": {"x": [[2**30 + 1, 0, 0, 0]], "ids": [1]}}, 400,
                               ["precision"]),
    "extra input": (f"/v1/models/{MODEL}:predict",
                    {"inputs": {"x": [[1, 2, 3, 4]], "ids": [1], "bogus": [1]}}, 400,
                    ["bogus"]),
    "missing input": (f"/v1/models/{MODEL}:predict", {"inputs": {"x": [[1, 2, 3, 4]]}}, 400,
                      ["missing", "ids"]),
    "bad base64": (f"/v1/models/{MODEL}:predict",
                   {"signature_name": "classify", "instances": [{"b64": "***"}]}, 400,
                   ["base64"]),
    "mixed feature types": (f"/v1/models/{MODEL}:classify",
                            {"signature_name": "classify", "examples": [{"x": [1.0, "a"]}]},
                            400, ["mixes"]),
    "no examples": (f"/v1/models/{MODEL}:regress", {"signature_name": "regress"}, 400,
                    ["examples"]),
    "unknown verb": (f"/v1/models/{MODEL}:explain", {}, 400, ["Malformed"]),
    "deeply nested": (f"/v1/models/{MODEL}:predict",
                      b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, ["JSON"]),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_rest_request_gets_code_and_error_body(server, case):
    path, body, code, words = BAD_BODIES[case]
    status, doc = post(server, path, body)
    assert status == code, doc
    assert set(doc) == {"error"}
    for word in words:
        assert word in doc["error"], doc["error"]
    status, doc = post(server, f"/v1/models/{MODEL}:predict",
                       {"inputs": {"x": [[1, 1, 1, 1]], "ids": [1]}})
    assert status == 200, doc


def test_same_validation_and_limits_as_grpc(server):
    cases = {
        "nan": ([[1.0, float("nan"), 0.0, 0.0]], [1]),
        "oversized": (np.ones((3000, 4)).tolist(), list(range(3000))),  # limit 10,000 elements
        "wrong shape": ([[1.0, 2.0, 3.0]], [1]),
    }
    for name, (x, ids) in cases.items():
        code, details = grpc_error(server, predict_request(MODEL, x, ids))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        status, doc = post(server, f"/v1/models/{MODEL}:predict",
                           {"inputs": {"x": x, "ids": ids}})
        assert (status, doc) == (400, {"error": details}), name


def raw_exchange(port, data: bytes) -> bytes:
    """What the server answers to `data` on a raw connection (until it closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        if data:
            s.sendall(data)
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return answer
            answer += chunk


def test_oversized_body_and_unknown_paths(server):
    port = server.rest_port
    # The declared length is refused before a byte of the body is read.
    answer = raw_exchange(port, f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\n"
                                f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
    assert "--rest-api-max-body-bytes" in json.loads(body)["error"]
    status, doc, _ = call_rest(port, "GET", "/metrics")
    assert status == 404 and "error" in doc
    status, doc, _ = call_rest(port, "DELETE", f"/v1/models/{MODEL}")
    assert status == 400 and "Malformed" in doc["error"]
    # A POST without Content-Length is refused without waiting for a body.
    answer = raw_exchange(port, f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\n"
                                "\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 411")


def test_keep_alive_connection_serves_many_requests(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    body = json.dumps({"inputs": {"x": [[1, 0, 0, 0]], "ids": [1]}})
    try:
        for _ in range(20):
            connection.request("POST", f"/v1/models/{MODEL}:predict", body)
            response = connection.getresponse()
            assert response.status == 200
            assert json.loads(response.read())["outputs"]["y"] == [1.0]
    finally:
        connection.close()


def test_connections_beyond_the_limit_get_503_and_the_server_recovers(server):
    idle = [socket.create_connection(("127.0.0.1", server.rest_port), timeout=30)
            for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # every idle connection holds its slot
        head, _, body = raw_exchange(server.rest_port, b"").partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and "connections" in json.loads(body)["error"]
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, doc, _ = call_rest(server.rest_port, "GET", f"/v1/models/{MODEL}")
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200, doc


def test_concurrent_rest_and_grpc_requests_agree(server):
    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(1 + i % 3, 4)).astype(np.float32) for i in range(24)]

    def call(i):
        ids = np.full(len(xs[i]), i)
        if i % 2:
            status, doc = post(server, f"/v1/models/{MODEL}:predict",
                               {"inputs": {"x": xs[i].tolist(), "ids": ids.tolist()}})
            assert status == 200, doc
            return np.array(doc["outputs"]["y"], np.float32), doc["outputs"]["ids_times_two"]
        out = outputs(server.test_stub.Predict(predict_request(MODEL, xs[i], ids), timeout=60))
        return out["y"], out["ids_times_two"].tolist()

    with concurrent.futures.ThreadPoolExecutor(MAX_CONNECTIONS - 1) as pool:
        results = list(pool.map(call, range(len(xs))))
    for i, (y, doubled) in enumerate(results):
        np.testing.assert_allclose(y, xs[i] @ WEIGHTS, rtol=1e-5)
        assert doubled == [2 * i] * len(xs[i])


def test_drain_finishes_rest_requests_in_flight_and_refuses_new_ones(base_path):
    srv = ModelServer(ServerOptions([model_config(MODEL, base_path)], port=0,
                                    poll_wait_seconds=0, enable_batching=False, rest_api_port=0))
    srv.start()
    port = srv.rest_port
    stopping = None
    try:
        iterations, took = 2000, 0.0
        for _ in range(6):  # calibrate a request that stays in flight for ~2 s
            started = time.monotonic()
            status, doc = post(srv, f"/v1/models/{MODEL}:predict",
                               {"signature_name": "slow", "inputs": [iterations]})
            assert status == 200, doc
            took = time.monotonic() - started
            if took > 1.5:
                break
            iterations = int(iterations * min(20, 2.0 / max(took, 0.01)))
        assert took > 1.5, "could not make a slow request"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post, srv, f"/v1/models/{MODEL}:predict",
                                    {"signature_name": "slow", "inputs": [iterations]})
            deadline = time.monotonic() + 30
            while srv.gate.inflight == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert srv.gate.inflight == 1
            stopping = threading.Thread(target=srv.stop, args=(60,))
            stopping.start()
            while not srv.gate.closed:
                time.sleep(0.01)
            status, doc, headers = call_rest(port, "GET", f"/v1/models/{MODEL}")
            assert status == 503 and "shutting down" in doc["error"]
            assert headers.get("Connection") == "close"
            status, doc = in_flight.result(timeout=120)
            assert status == 200 and doc == {"outputs": [1.0]}
        stopping.join(60)
        assert not stopping.is_alive()
        with pytest.raises(OSError):
            call_rest(port, "GET", f"/v1/models/{MODEL}", timeout=5)
    finally:
        if stopping is None:
            srv.stop(1)
