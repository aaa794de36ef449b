"""Hostile requests cannot make the model server allocate much: a TensorProto of a few bytes
that declares a huge shape, values repeated over a huge shape, tensor_content disagreeing with
the shape, or one ExampleListWithContext context copied into thousands of examples, are all
refused with INVALID_ARGUMENT before anything is decoded. The server runs in its own process so
that its peak resident memory (VmHWM in /proc/<pid>/status) can be measured around them."""
import os
import queue
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc

from tests.serving_toy_model import export_toy_model, predict_request
from tests.test_server import MODEL, assert_good_predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Peak memory a hostile request may add. Decoding the first request below as before would
# take about 360 MB.
MAX_PEAK_GROWTH_BYTES = 48 * 1024 * 1024


def start_server_process(args, timeout=120):
    """Starts `python -m serving.model_server args`; (process, port) once it prints READY.

    Its stderr is read continuously into `process.stderr_lines` (a full pipe would block the
    server's logging); `stderr_text(process)` joins it."""
    if "--rest-api-port" not in args:  # the default 8501 may be taken on a shared machine
        args = [*args, "--rest-api-port", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "serving.model_server", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stderr_lines = []
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    proc.stderr_reader = threading.Thread(
        target=lambda: [proc.stderr_lines.append(line) for line in proc.stderr], daemon=True)
    proc.stderr_reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if line.startswith("READY"):
            return proc, int(line.strip().rsplit(":", 1)[-1])
    proc.kill()
    proc.wait()
    raise AssertionError("server did not start: " + stderr_text(proc)[-3000:])


def stderr_text(proc):
    """What the process wrote to stderr (all of it once the process has exited)."""
    if proc.poll() is not None:
        proc.stderr_reader.join(10)
    return "".join(proc.stderr_lines)


def memory_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_memory(pid):
    """Resets VmHWM to the current RSS (Linux clear_refs 5); False where not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def declared_tensor(dtype, shape, **fields):
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]))
    for name, value in fields.items():
        if name == "tensor_content":
            proto.tensor_content = value
        else:
            getattr(proto, name).extend(value)
    return proto


def hostile_predict(x, ids, signature="serving_default"):
    request = predict_request(MODEL, np.ones((1, 4)), [1], signature=signature)
    request.inputs["x"].CopyFrom(x)
    request.inputs["ids"].CopyFrom(ids)
    return request


def hostile_requests():
    """name -> (RPC name, request, a word the error must contain)."""
    f32, i64 = types_pb2.DT_FLOAT, types_pb2.DT_INT64
    huge_x = declared_tensor(f32, [15_000_000, 4], float_val=[1.0])
    assert huge_x.ByteSize() < 32  # a few bytes on the wire, 240 MB once expanded
    strings = predict_request(MODEL, np.ones((1, 4)), [1], signature="classify")
    del strings.inputs["x"], strings.inputs["ids"]
    strings.inputs["inputs"].CopyFrom(
        declared_tensor(types_pb2.DT_STRING, [100_000], string_val=[b"e" * 100]))
    context = example_pb2.Example(features=feature_pb2.Features(feature={"pad": feature_pb2.Feature(
        bytes_list=feature_pb2.BytesList(value=[b"p" * 256 * 1024]))}))
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = MODEL
    classify.model_spec.signature_name = "classify"
    classify.input.example_list_with_context.context.CopyFrom(context)
    for _ in range(1000):
        classify.input.example_list_with_context.examples.add()
    return {
        "declared shape above the element limit": (
            "Predict", hostile_predict(huge_x, declared_tensor(i64, [15_000_000], int64_val=[1])),
            "declares"),
        "one value repeated over 400,000 elements": (
            "Predict", hostile_predict(declared_tensor(f32, [100_000, 4], float_val=[1.0]),
                                       declared_tensor(i64, [100_000], int64_val=[1])),
            "--max-broadcast-bytes"),
        "no value at all for 400,000 elements": (
            "Predict", hostile_predict(declared_tensor(f32, [100_000, 4]),
                                       declared_tensor(i64, [100_000], int64_val=[1])),
            "--max-broadcast-bytes"),
        "one string repeated 100,000 times": ("Predict", strings, "--max-broadcast-bytes"),
        "tensor_content shorter than the shape": (
            "Predict", hostile_predict(
                declared_tensor(f32, [100_000, 4], tensor_content=b"\0" * 16),
                declared_tensor(i64, [100_000], int64_val=[1])),
            "tensor_content"),
        "more values than the shape": (
            "Predict", hostile_predict(declared_tensor(f32, [1, 4], float_val=[1.0] * 8),
                                       declared_tensor(i64, [1], int64_val=[1])), "holds 8"),
        "negative dimension": (
            "Predict", hostile_predict(declared_tensor(f32, [-1, 4], float_val=[1.0] * 4),
                                       declared_tensor(i64, [1], int64_val=[1])), "negative"),
        "context copied into 1000 examples": ("Classify", classify, "context"),
    }


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile") / MODEL
    export_toy_model(str(base / "1"), 1.0)
    proc, port = start_server_process(
        ["--model-base-path", str(base), "--model-name", MODEL, "--port", "0",
         "--file-system-poll-wait-seconds", "0", "--grpc-max-message-bytes",
         str(MAX_MESSAGE_BYTES), "--lame-duck-seconds", "0", "--drain-seconds", "5"])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield proc, prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_hostile_tensors_are_refused_before_allocation(server_process):
    proc, stub = server_process
    for _ in range(3):  # warm: the first requests allocate their steady-state buffers
        assert_good_predict(stub)
    requests = hostile_requests()
    reset = reset_peak_memory(proc.pid)
    before = memory_kib(proc.pid, "VmRSS" if reset else "VmHWM") * 1024
    for case, (rpc, request, word) in requests.items():
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, rpc)(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.value.details())
        assert word in err.value.details(), (case, err.value.details())
        assert time.monotonic() - started < 5, case  # refused, not computed
    growth = memory_kib(proc.pid, "VmHWM") * 1024 - before
    print(f"peak RSS growth over {len(requests)} hostile requests: {growth / 2**20:.1f} MiB "
          f"(VmHWM reset: {reset})")
    assert growth < MAX_PEAK_GROWTH_BYTES, f"{growth / 2**20:.0f} MiB"
    assert_good_predict(stub)
    assert proc.poll() is None


def test_legitimate_requests_near_the_limits_still_work(server_process):
    _, stub = server_process
    # 100,000 rows sent in full (about 2.4 MB of tensor_content) under the 4 MB message limit.
    x = np.ones((100_000, 4), np.float32)
    response = stub.Predict(predict_request(MODEL, x, np.arange(100_000)), timeout=60)
    assert tf.make_ndarray(response.outputs["y"]).shape == (100_000,)
    # A scalar repeated over a small shape, as tf.make_tensor_proto(1.0, shape=...) sends it.
    request = predict_request(MODEL, np.ones((1, 4)), [1])
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(2.0, dtype=tf.float32, shape=[256, 4]))
    request.inputs["ids"].CopyFrom(tf.make_tensor_proto(3, dtype=tf.int64, shape=[256]))
    assert len(request.inputs["x"].float_val) == 1
    out = stub.Predict(request, timeout=60).outputs
    np.testing.assert_allclose(tf.make_ndarray(out["y"]), np.full(256, 2.0 * 2.5))
    np.testing.assert_array_equal(tf.make_ndarray(out["ids_times_two"]), np.full(256, 6))
