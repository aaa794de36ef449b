"""Production configs in serving/configs/ parse with TF Serving's own protos, agree with each
other, and work: the model config drives a real server, the readiness probe command is run."""
import http.server
import os
import subprocess
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
import yaml
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from serving.model_server import server as server_lib
from serving.model_server.batching import (BatchingOptions, load_batching_options,
                                           parse_batching_parameters)
from tests.serving_toy_model import export_toy_model, predict_request

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serving",
                       "configs")


def read(name):
    with open(os.path.join(CONFIGS, name)) as f:
        return f.read()


def model_server_config():
    return text_format.Parse(read("models.config"), model_server_config_pb2.ModelServerConfig())


def deployment_and_service():
    docs = [d for d in yaml.safe_load_all(read("kubernetes.yaml")) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    return kinds["Deployment"], kinds["Service"]


def container_args():
    deployment, _ = deployment_and_service()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container, dict(a.lstrip("-").split("=", 1) for a in container["args"])


def canary_example():
    """The commented canary block of models.config, uncommented and merged into its model."""
    lines = read("models.config").splitlines()
    begin, end = lines.index("# BEGIN canary example"), lines.index("# END canary example")
    snippet = "\n".join(line[2:] for line in lines[begin + 1:end])
    example = text_format.Parse(snippet, model_server_config_pb2.ModelConfig())
    config = model_server_config()
    (model,) = config.model_config_list.config
    model.ClearField("model_version_policy")
    model.MergeFrom(example)
    return config


def versions_served(model, on_disk):
    """The versions TF Serving's version policy loads from the numeric folders on disk."""
    policy = model.model_version_policy.WhichOneof("policy_choice") or "latest"
    if policy == "all":
        return set(on_disk)
    if policy == "specific":
        return set(model.model_version_policy.specific.versions) & set(on_disk)
    count = model.model_version_policy.latest.num_versions or 1
    return set(sorted(on_disk)[-count:])


def test_models_config_serves_a_first_export():
    (model,) = model_server_config().model_config_list.config
    assert model.name == "qin" and model.model_platform == "tensorflow"
    assert model.base_path.startswith("/models/")
    first_export = {1}  # `python -m serving.export` numbers the first version 1
    assert versions_served(model, first_export) == {1}
    # A pinned version or a label that names a version the first export lacks fails to load.
    if model.model_version_policy.HasField("specific"):
        assert set(model.model_version_policy.specific.versions) <= first_export
    assert set(dict(model.version_labels).values()) <= first_export, \
        "a label points at a version a first export does not have"
    # Later exports are served too (the release gate's export is the rollout).
    assert versions_served(model, {1, 2}) == {2}


def test_versions_served_follows_each_policy():
    config = model_server_config_pb2.ModelConfig()
    assert versions_served(config, {1, 3}) == {3}  # TF Serving's default: the latest
    config.model_version_policy.specific.versions.extend([1, 2])
    assert versions_served(config, {1, 3}) == {1}
    config.model_version_policy.all.SetInParent()
    assert versions_served(config, {1, 3}) == {1, 3}


def test_the_commented_canary_example_is_a_valid_release_config():
    (model,) = canary_example().model_config_list.config
    labels = dict(model.version_labels)
    assert labels == {"stable": 1, "canary": 2}
    served = versions_served(model, {1, 2})
    assert served == {1, 2} and set(labels.values()) <= served
    assert (model.name, model.base_path) == ("qin", "/models/qin")


def test_batching_parameters_are_valid_for_tf_serving():
    params = parse_batching_parameters(read("batching_parameters.txt"))
    options = BatchingOptions.from_proto(params)  # validates allowed_batch_sizes etc.
    assert params.HasField("max_batch_size") and params.HasField("batch_timeout_micros")
    assert params.HasField("num_batch_threads")
    assert options.allowed_batch_sizes[-1] == options.max_batch_size
    assert 0 < options.batch_timeout_micros <= 100_000  # never hold a request for long


def test_kubernetes_deployment_wires_the_configs():
    deployment, service = deployment_and_service()
    container, args = container_args()
    assert container["image"].startswith("tensorflow/serving")
    assert args["enable_batching"] == "true"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8500, "rest": 8501}
    assert args["port"] == "8500" and args["rest_api_port"] == "8501"
    assert {p["port"] for p in service["spec"]["ports"]} == {8500, 8501}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # The files the args name are the ones the config volume mounts.
    spec = deployment["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_volume = next(v for v in spec["volumes"] if "configMap" in v)
    for flag, name in (("model_config_file", "models.config"),
                       ("batching_parameters_file", "batching_parameters.txt")):
        assert args[flag] == f"{mounts[config_volume['name']]}/{name}"
        assert os.path.exists(os.path.join(CONFIGS, name))
    # Models are read where models.config says they are.
    (model,) = model_server_config().model_config_list.config
    assert any(model.base_path.startswith(path) for path in mounts.values())
    probe = container["readinessProbe"]
    command = " ".join(probe["exec"]["command"])
    assert f"/v1/models/{model.name}" in command and "AVAILABLE" in command


class _FakeRest(http.server.BaseHTTPRequestHandler):
    state = "AVAILABLE"

    def do_GET(self):
        body = ('{"model_version_status": [{"version": "2", "state": "%s", "status": '
                '{"error_code": "OK", "error_message": ""}}]}' % self.state).encode()
        code = 200 if self.path == "/v1/models/qin" else 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("state,ready", [("AVAILABLE", True), ("LOADING", False)])
def test_readiness_probe_command_reads_model_status(state, ready):
    container, _ = container_args()
    command = container["readinessProbe"]["exec"]["command"]
    httpd = http.server.HTTPServer(("127.0.0.1", 0), type("H", (_FakeRest,), {"state": state}))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        script = command[-1].replace("8501", str(httpd.server_address[1]))
        result = subprocess.run(command[:-1] + [script], timeout=20)
        assert (result.returncode == 0) == ready
    finally:
        httpd.shutdown()


def _serve(config, versions, tmp_path):
    """Our server on `config` (its base path moved to tmp_path) with toy `versions` on disk."""
    base = tmp_path / "qin"
    for version in versions:
        export_toy_model(str(base / str(version)), float(version))
    (model,) = config.model_config_list.config
    model.base_path = str(base)
    config_file = tmp_path / "models.config"
    config_file.write_text(text_format.MessageToString(config))
    batching_file = os.path.join(CONFIGS, "batching_parameters.txt")
    args = server_lib.build_parser().parse_args(
        ["--model-config-file", str(config_file), "--batching-parameters-file", batching_file,
         "--port", "0", "--file-system-poll-wait-seconds", "0"])
    options = server_lib.ServerOptions(
        server_lib.model_configs_from_args(args), port=0, poll_wait_seconds=0,
        batching=load_batching_options(args.batching_parameters_file))
    assert options.batching.max_batch_size == 16
    srv = server_lib.ModelServer(options)
    srv.start()
    return srv


def _served_version(stub, label=None):
    response = stub.Predict(predict_request("qin", np.ones((1, 4)), [1], label=label),
                            timeout=30)
    assert tf.make_ndarray(response.outputs["version"])[0] == float(
        response.model_spec.version.value)
    return response.model_spec.version.value


def test_our_server_runs_the_shipped_model_config_on_a_first_export(tmp_path):
    srv = _serve(model_server_config(), [1], tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            assert _served_version(stub) == 1
    finally:
        srv.stop(1)


def test_our_server_runs_the_canary_example_on_two_versions(tmp_path):
    config = canary_example()
    srv = _serve(config, [1, 2], tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for label, version in dict(config.model_config_list.config[0].version_labels).items():
                assert _served_version(stub, label) == version
            assert _served_version(stub) == 2  # no label: the newest loaded version
    finally:
        srv.stop(1)
