"""A model server that speaks TensorFlow Serving's gRPC API.

    python -m serving.model_server --model-base-path B/qin --model-name qin --port 8500

Why a server of our own: the stock `tensorflow_model_server` binary cannot be installed from
the package registries (nor Docker) on every machine, while `tensorflow-serving-api` (its protos
and stubs) can. This server implements the same services with those protos, so unmodified TF
Serving clients work against it, and the exported SavedModels stay loadable by the stock server
(see serving/configs/ for its production configuration).

Services: tensorflow.serving.PredictionService (Predict, Classify, Regress, MultiInference,
GetModelMetadata), tensorflow.serving.ModelService (GetModelStatus, HandleReloadConfigRequest)
and grpc.health.v1.Health (SERVING once every configured model has a loaded version).
Versions, labels, hot reload and warmup: see serving.model_server.model_manager; batching:
serving.model_server.batching.
Errors use TF Serving's status codes (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, ...) with a
message naming the problem; every RPC catches everything, so no request takes the server down.
SIGTERM/SIGINT drain: health turns NOT_SERVING, new RPCs are refused, in-flight RPCs finish
(up to --drain-seconds), and the process exits 0.
"""
from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Dict, List, Optional

import common  # noqa: F401  (legacy-Keras switch before TensorFlow loads)
import grpc
import numpy as np

from serving.model_server import errors
from serving.model_server.batching import BatchingOptions, load_batching_options
from serving.model_server.model_manager import (DEFAULT_SIGNATURE, ModelManager,
                                                ServableVersion, Signature)

log = logging.getLogger("serving.model_server")

CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
EXAMPLE_INPUT_KEY = "inputs"  # TF Serving: Classify/Regress feed serialized tf.Examples here
CLASSES_KEY, SCORES_KEY, REGRESS_OUTPUT_KEY = "classes", "scores", "outputs"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_REQUEST_ELEMENTS = 50_000_000
DEFAULT_MAX_BATCH_ROWS = 100_000


# ---- tensors ------------------------------------------------------------------------------------
def tensor_from_proto(name: str, proto, spec) -> np.ndarray:
    """TensorProto -> NumPy, checked against the signature's declared dtype and shape."""
    import tensorflow as tf

    if proto.dtype != spec.dtype_enum:
        got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "DT_INVALID"
        raise errors.invalid_argument(
            f"input '{name}' has dtype {got}, expected {spec.describe()}")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if spec.shape is not None:
        ok = len(shape) == len(spec.shape) and all(
            e < 0 or e == g for e, g in zip(spec.shape, shape))
        if not ok:
            raise errors.invalid_argument(
                f"input '{name}' has shape {list(shape)}, expected {spec.describe()}")
    try:
        array = tf.make_ndarray(proto)
    except Exception as exc:
        raise errors.invalid_argument(f"input '{name}': malformed TensorProto ({exc})") from exc
    if array.shape != shape:
        raise errors.invalid_argument(
            f"input '{name}' holds {array.size} values for shape {list(shape)}")
    return array


def tensor_to_proto(array: np.ndarray):
    import tensorflow as tf

    return tf.make_tensor_proto(array)


class ServerOptions:
    """Everything the server can be configured with (the CLI fills it)."""

    def __init__(self, model_configs, host="127.0.0.1", port=8500, enable_batching=True,
                 batching: Optional[BatchingOptions] = None, poll_wait_seconds=1.0,
                 max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                 max_request_elements=DEFAULT_MAX_REQUEST_ELEMENTS,
                 max_batch_rows=DEFAULT_MAX_BATCH_ROWS, reject_non_finite_inputs=True,
                 grpc_threads=64, drain_seconds=30.0, enable_warmup=True):
        self.model_configs = list(model_configs)
        self.host, self.port = host, port
        self.batching = (batching or BatchingOptions()) if enable_batching else None
        self.poll_wait_seconds = poll_wait_seconds
        self.max_message_bytes = max_message_bytes
        self.max_request_elements = max_request_elements
        self.max_batch_rows = max_batch_rows
        self.reject_non_finite_inputs = reject_non_finite_inputs
        self.grpc_threads = grpc_threads
        self.drain_seconds = drain_seconds
        self.enable_warmup = enable_warmup


# ---- request logic (shared by the RPCs and by warmup) --------------------------------------------
class Inference:
    """Runs Predict / Classify / Regress / MultiInference on a resolved version."""

    def __init__(self, options: ServerOptions):
        self.options = options

    def _check_size(self, arrays: Dict[str, np.ndarray]) -> None:
        elements = sum(int(a.size) for a in arrays.values())
        if elements > self.options.max_request_elements:
            raise errors.invalid_argument(
                f"request has {elements} tensor elements, more than the server's limit of "
                f"{self.options.max_request_elements} (--max-request-elements); split it")
        for name, a in arrays.items():
            if a.ndim and a.shape[0] > self.options.max_batch_rows:
                raise errors.invalid_argument(
                    f"input '{name}' has {a.shape[0]} rows, more than the server's limit of "
                    f"{self.options.max_batch_rows} (--max-batch-rows)")

    def predict(self, servable: ServableVersion, request, batch=True):
        from tensorflow_serving.apis import predict_pb2

        sig = servable.signature(request.model_spec.signature_name)
        missing = sorted(set(sig.inputs) - set(request.inputs))
        if missing:
            raise errors.invalid_argument(
                "missing inputs " + ", ".join(f"'{k}' ({sig.inputs[k].describe()})"
                                              for k in missing)
                + f" for signature '{sig.name}'")
        extra = sorted(set(request.inputs) - set(sig.inputs))
        if extra:
            raise errors.invalid_argument(
                f"inputs {extra} are not in signature '{sig.name}'; it takes "
                f"{sorted(sig.inputs)}")
        wanted = list(request.output_filter)
        unknown = sorted(set(wanted) - set(sig.output_keys))
        if unknown:
            raise errors.invalid_argument(
                f"output_filter names {unknown}, which signature '{sig.name}' does not output; "
                f"outputs: {sig.output_keys}")
        arrays = {k: tensor_from_proto(k, request.inputs[k], sig.inputs[k]) for k in sig.inputs}
        self._check_size(arrays)
        if self.options.reject_non_finite_inputs:
            for k, a in arrays.items():
                if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
                    bad = int(np.size(a) - np.isfinite(a).sum())
                    raise errors.invalid_argument(
                        f"input '{k}' contains {bad} NaN/Inf values; the server rejects "
                        "non-finite inputs (--allow-non-finite-inputs to pass them through)")
        outputs = sig.run(arrays, batch=batch)
        response = predict_pb2.PredictResponse()
        self._fill_spec(response.model_spec, servable, sig.name)
        for k in (wanted or sig.output_keys):
            response.outputs[k].CopyFrom(tensor_to_proto(outputs[k]))
        return response

    @staticmethod
    def _fill_spec(spec, servable: ServableVersion, signature_name: str) -> None:
        spec.name = servable.model_name
        spec.version.value = servable.version
        spec.signature_name = signature_name

    # -- tf.Example based APIs --
    def _serialized_examples(self, input_proto) -> np.ndarray:
        kind = input_proto.WhichOneof("kind")
        if kind == "example_list":
            examples = [e.SerializeToString() for e in input_proto.example_list.examples]
        elif kind == "example_list_with_context":
            ctx = input_proto.example_list_with_context.context.SerializeToString()
            # Concatenated serialized messages parse as their merge, the example's own
            # features winning over the context's: exactly what TF Serving does.
            examples = [ctx + e.SerializeToString()
                        for e in input_proto.example_list_with_context.examples]
        else:
            raise errors.invalid_argument(
                "Input is empty: set input.example_list or input.example_list_with_context")
        if not examples:
            raise errors.invalid_argument("Input has no examples")
        if len(examples) > self.options.max_batch_rows:
            raise errors.invalid_argument(
                f"Input has {len(examples)} examples, more than the server's limit of "
                f"{self.options.max_batch_rows} (--max-batch-rows)")
        return np.array(examples, dtype=object)

    def _run_examples(self, sig: Signature, examples: np.ndarray, batch: bool):
        if EXAMPLE_INPUT_KEY not in sig.inputs or len(sig.inputs) != 1:
            raise errors.invalid_argument(
                f"signature '{sig.name}' cannot take tf.Examples: it needs exactly one input "
                f"'{EXAMPLE_INPUT_KEY}' (DT_STRING), it has {sorted(sig.inputs)}")
        spec = sig.inputs[EXAMPLE_INPUT_KEY]
        if spec.np_dtype != np.dtype(object):
            raise errors.invalid_argument(
                f"signature '{sig.name}' input '{EXAMPLE_INPUT_KEY}' is {spec.describe()}, "
                "expected DT_STRING serialized tf.Examples")
        return sig.run({EXAMPLE_INPUT_KEY: examples}, batch=batch), len(examples)

    def _classification(self, sig: Signature, outputs, n: int):
        from tensorflow_serving.apis import classification_pb2

        if CLASSES_KEY not in outputs and SCORES_KEY not in outputs:
            raise errors.invalid_argument(
                f"signature '{sig.name}' is not a classification signature: it outputs "
                f"{sig.output_keys}, expected '{CLASSES_KEY}' and/or '{SCORES_KEY}'")
        classes = outputs.get(CLASSES_KEY)
        scores = outputs.get(SCORES_KEY)
        if scores is not None and scores.ndim == 1:
            scores = scores[:, None]
        if classes is not None and classes.ndim == 1:
            classes = classes[:, None]
        for name, value in ((CLASSES_KEY, classes), (SCORES_KEY, scores)):
            if value is not None and (value.ndim != 2 or value.shape[0] != n):
                raise errors.invalid_argument(
                    f"output '{name}' of '{sig.name}' has shape {list(value.shape)}, expected "
                    f"[{n}, num_classes]")
        if classes is not None and scores is not None and classes.shape != scores.shape:
            raise errors.invalid_argument(
                f"outputs classes {list(classes.shape)} and scores {list(scores.shape)} of "
                f"'{sig.name}' disagree")
        result = classification_pb2.ClassificationResult()
        width = (scores if scores is not None else classes).shape[1]
        for i in range(n):
            c = result.classifications.add()
            for j in range(width):
                cls = c.classes.add()
                if classes is not None:
                    label = classes[i, j]
                    cls.label = label.decode() if isinstance(label, bytes) else str(label)
                if scores is not None:
                    cls.score = float(scores[i, j])
        return result

    def _regression(self, sig: Signature, outputs, n: int):
        from tensorflow_serving.apis import regression_pb2

        if REGRESS_OUTPUT_KEY not in outputs:
            raise errors.invalid_argument(
                f"signature '{sig.name}' is not a regression signature: it outputs "
                f"{sig.output_keys}, expected '{REGRESS_OUTPUT_KEY}'")
        values = outputs[REGRESS_OUTPUT_KEY]
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1 or values.shape[0] != n:
            raise errors.invalid_argument(
                f"output '{REGRESS_OUTPUT_KEY}' of '{sig.name}' has shape "
                f"{list(values.shape)}, expected [{n}] or [{n}, 1]")
        result = regression_pb2.RegressionResult()
        for v in values:
            result.regressions.add().value = float(v)
        return result

    def classify(self, servable: ServableVersion, request, batch=True):
        from tensorflow_serving.apis import classification_pb2

        sig = servable.signature(request.model_spec.signature_name)
        outputs, n = self._run_examples(sig, self._serialized_examples(request.input), batch)
        response = classification_pb2.ClassificationResponse()
        self._fill_spec(response.model_spec, servable, sig.name)
        response.result.CopyFrom(self._classification(sig, outputs, n))
        return response

    def regress(self, servable: ServableVersion, request, batch=True):
        from tensorflow_serving.apis import regression_pb2

        sig = servable.signature(request.model_spec.signature_name)
        outputs, n = self._run_examples(sig, self._serialized_examples(request.input), batch)
        response = regression_pb2.RegressionResponse()
        self._fill_spec(response.model_spec, servable, sig.name)
        response.result.CopyFrom(self._regression(sig, outputs, n))
        return response

    def multi_inference(self, servable: ServableVersion, request, batch=True):
        from tensorflow_serving.apis import inference_pb2

        if not request.tasks:
            raise errors.invalid_argument("MultiInferenceRequest has no tasks")
        examples = self._serialized_examples(request.input)
        seen = set()
        response = inference_pb2.MultiInferenceResponse()
        for task in request.tasks:
            name = task.model_spec.signature_name or DEFAULT_SIGNATURE
            if name in seen:
                raise errors.invalid_argument(f"signature '{name}' is used by two tasks")
            seen.add(name)
            if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise errors.unimplemented(
                    f"task method_name '{task.method_name}' is not supported; use "
                    f"'{CLASSIFY_METHOD}' or '{REGRESS_METHOD}'")
            sig = servable.signature(name)
            outputs, n = self._run_examples(sig, examples, batch)
            result = response.results.add()
            self._fill_spec(result.model_spec, servable, sig.name)
            if task.method_name == CLASSIFY_METHOD:
                result.classification_result.CopyFrom(self._classification(sig, outputs, n))
            else:
                result.regression_result.CopyFrom(self._regression(sig, outputs, n))
        return response

    def warmup(self, servable: ServableVersion, entry) -> None:
        """Replays one PredictionLog against a version being loaded (no batching)."""
        kind = entry.WhichOneof("log_type")
        if kind == "predict_log":
            self.predict(servable, entry.predict_log.request, batch=False)
        elif kind == "classify_log":
            self.classify(servable, entry.classify_log.request, batch=False)
        elif kind == "regress_log":
            self.regress(servable, entry.regress_log.request, batch=False)
        elif kind == "multi_inference_log":
            self.multi_inference(servable, entry.multi_inference_log.request, batch=False)
        else:
            raise errors.invalid_argument(f"unsupported warmup record type {kind!r}")


def _spec_version(spec):
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def _guard(method):
    """Runs one RPC; converts every failure into a gRPC status (the server never crashes)."""
    name = method.__name__

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            err = errors.from_exception(exc)
            if err.code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            else:
                log.info("%s rejected: %s", name, err)
            context.abort(err.code, err.message)

    wrapper.__name__ = name
    wrapper.__doc__ = method.__doc__
    return wrapper


def _servicers():
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_management_pb2, model_service_pb2_grpc,
                                         prediction_service_pb2_grpc)
    from tensorflow_serving.apis import status_pb2

    class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def __init__(self, manager: ModelManager, inference: Inference):
            self.manager, self.inference = manager, inference

        def _acquire(self, spec):
            version, label = _spec_version(spec)
            return self.manager.acquire(spec.name, version, label)

        @_guard
        def Predict(self, request, context):
            with self._acquire(request.model_spec) as servable:
                return self.inference.predict(servable, request)

        @_guard
        def Classify(self, request, context):
            with self._acquire(request.model_spec) as servable:
                return self.inference.classify(servable, request)

        @_guard
        def Regress(self, request, context):
            with self._acquire(request.model_spec) as servable:
                return self.inference.regress(servable, request)

        @_guard
        def MultiInference(self, request, context):
            if not request.tasks:
                raise errors.invalid_argument("MultiInferenceRequest has no tasks")
            specs = [t.model_spec for t in request.tasks]
            names = {s.name for s in specs}
            versions = {_spec_version(s) for s in specs}
            if len(names) != 1 or len(versions) != 1:
                raise errors.invalid_argument(
                    "all MultiInference tasks must use the same model name and version; got "
                    f"names {sorted(names)}")
            with self._acquire(specs[0]) as servable:
                return self.inference.multi_inference(servable, request)

        @_guard
        def GetModelMetadata(self, request, context):
            fields = list(request.metadata_field)
            if not fields:
                raise errors.invalid_argument("metadata_field is empty; ask for 'signature_def'")
            unsupported = [f for f in fields if f != "signature_def"]
            if unsupported:
                raise errors.invalid_argument(
                    f"metadata_field {unsupported} not supported; only 'signature_def'")
            with self._acquire(request.model_spec) as servable:
                response = get_model_metadata_pb2.GetModelMetadataResponse()
                response.model_spec.name = servable.model_name
                response.model_spec.version.value = servable.version
                response.metadata["signature_def"].Pack(servable.signature_def_map())
                return response

    class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
        def __init__(self, manager: ModelManager, server: "ModelServer"):
            self.manager, self.server = manager, server

        @_guard
        def GetModelStatus(self, request, context):
            version, label = _spec_version(request.model_spec)
            statuses = self.manager.version_status(request.model_spec.name, version, label)
            response = get_model_status_pb2.GetModelStatusResponse()
            for v in sorted(statuses, reverse=True):
                st = statuses[v]
                entry = response.model_version_status.add()
                entry.version = v
                entry.state = st.state
                entry.status.error_code = st.error_code
                entry.status.error_message = st.error_message
            return response

        @_guard
        def HandleReloadConfigRequest(self, request, context):
            kind = request.config.WhichOneof("config")
            if kind != "model_config_list":
                raise errors.invalid_argument(
                    "ReloadConfigRequest.config must hold a model_config_list "
                    f"(got {kind or 'nothing'})")
            try:
                self.manager.set_configs(request.config.model_config_list.config)
            except ValueError as exc:
                raise errors.invalid_argument(f"invalid model config: {exc}") from exc
            self.manager.poll_once()  # like TF Serving, answer once the new config is loaded
            self.server.update_health()
            response = model_management_pb2.ReloadConfigResponse()
            response.status.CopyFrom(status_pb2.StatusProto(error_code=0))
            return response

    return PredictionServicer, ModelServicer


class ModelServer:
    """The server as a Python object (tests and benchmarks run it in-process).

    `start()` loads the models (first poll), binds the port and returns it (port 0 = pick a
    free one); `stop(grace)` drains.
    """

    def __init__(self, options: ServerOptions):
        from grpc_health.v1 import health

        self.options = options
        self.inference = Inference(options)
        self.health = health.HealthServicer()
        self.manager = ModelManager(
            options.model_configs, batching=options.batching,
            poll_wait_seconds=options.poll_wait_seconds,
            warmup=self.inference.warmup if options.enable_warmup else None,
            on_change=self.update_health)
        self._server: Optional[grpc.Server] = None
        self.port: Optional[int] = None

    def update_health(self) -> None:
        from grpc_health.v1 import health_pb2

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, \
            health_pb2.HealthCheckResponse.NOT_SERVING
        names = self.manager.model_names()
        for name in names:
            self.health.set(name, serving if self.manager.available(name) else not_serving)
        self.health.set("", serving if self.manager.available() else not_serving)

    def start(self) -> int:
        from grpc_health.v1 import health_pb2_grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        prediction_cls, model_cls = _servicers()
        self.update_health()
        limit = self.options.max_message_bytes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.options.grpc_threads,
                                       thread_name_prefix="rpc"),
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            prediction_cls(self.manager, self.inference), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            model_cls(self.manager, self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        address = f"{self.options.host}:{self.options.port}"
        self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind {address}")
        self._server.start()
        self.manager.start()
        self.update_health()
        return self.port

    def stop(self, grace: Optional[float] = None) -> None:
        """Refuses new RPCs, lets in-flight ones finish (up to `grace` s), unloads models."""
        grace = self.options.drain_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
        self.manager.stop()

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()


# ---- command line ------------------------------------------------------------------------------
def _parse_version_labels(text: str) -> Dict[str, int]:
    labels = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, version = item.partition("=")
        if not sep or not name or not version.strip().isdigit():
            raise ValueError(f"bad --version-labels entry {item!r}; expected label=version, "
                             "e.g. stable=3,canary=4")
        labels[name.strip()] = int(version)
    return labels


def _version_policy(config, text: str) -> None:
    kind, _, arg = text.partition(":")
    if kind == "latest":
        config.model_version_policy.latest.num_versions = int(arg or 1)
    elif kind == "all":
        config.model_version_policy.all.SetInParent()
    elif kind == "specific":
        versions = [int(v) for v in arg.split(",") if v.strip()]
        if not versions:
            raise ValueError("--model-version-policy specific needs versions, e.g. specific:3,4")
        config.model_version_policy.specific.versions.extend(versions)
    else:
        raise ValueError(f"bad --model-version-policy {text!r}; use latest[:N], all or "
                         "specific:V1,V2")


def model_configs_from_args(args) -> list:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    if args.model_config_file:
        import tensorflow as tf

        with tf.io.gfile.GFile(args.model_config_file) as f:
            text = f.read()
        server_config = model_server_config_pb2.ModelServerConfig()
        try:
            text_format.Parse(text, server_config)
        except text_format.ParseError as exc:
            raise ValueError(f"{args.model_config_file}: invalid ModelServerConfig text "
                             f"format: {exc}") from exc
        if server_config.WhichOneof("config") != "model_config_list":
            raise ValueError(f"{args.model_config_file} has no model_config_list")
        return list(server_config.model_config_list.config)
    if not args.model_base_path:
        raise ValueError("give --model-base-path (and --model-name) or --model-config-file")
    config = model_server_config_pb2.ModelConfig(name=args.model_name,
                                                 base_path=args.model_base_path,
                                                 model_platform="tensorflow")
    _version_policy(config, args.model_version_policy)
    for label, version in _parse_version_labels(args.version_labels or "").items():
        config.version_labels[label] = version
    return [config]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.model_server",
        description="Serve SavedModels over TensorFlow Serving's gRPC API (PredictionService, "
                    "ModelService, grpc health). Versions are the numeric folders under the "
                    "model base path; new ones are picked up while serving.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--model-base-path", help="folder holding numeric version folders "
                   "(local or gs://), e.g. B/qin containing 1/, 2/")
    g.add_argument("--model-name", default="default", help="name clients put in ModelSpec.name")
    g.add_argument("--model-config-file", help="ModelServerConfig text file (several models, "
                   "version policies and labels); replaces --model-base-path/--model-name")
    g.add_argument("--model-version-policy", default="latest:1",
                   help="latest[:N] (newest N working versions), all, or specific:V1,V2")
    g.add_argument("--version-labels", default="",
                   help="label=version pairs, e.g. stable=3,canary=4 (ModelSpec.version_label)")
    g.add_argument("--file-system-poll-wait-seconds", type=float, default=1.0,
                   help="how often to look for new/removed versions; 0 = load once at start")
    g.add_argument("--no-warmup", action="store_true",
                   help="do not replay assets.extra/tf_serving_warmup_requests on load")
    g = p.add_argument_group("batching")
    g.add_argument("--enable-batching", dest="enable_batching", action="store_true",
                   default=True, help="merge concurrent requests along dimension 0 (default on)")
    g.add_argument("--no-enable-batching", dest="enable_batching", action="store_false",
                   help="run every request on its own")
    g.add_argument("--batching-parameters-file",
                   help="BatchingParameters text file (max_batch_size, batch_timeout_micros, "
                        "max_enqueued_batches, num_batch_threads, allowed_batch_sizes)")
    g = p.add_argument_group("network and limits")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8500, help="gRPC port (0 = any free port)")
    g.add_argument("--grpc-max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest request/response message; larger ones get RESOURCE_EXHAUSTED")
    g.add_argument("--max-request-elements", type=int, default=DEFAULT_MAX_REQUEST_ELEMENTS,
                   help="largest total number of tensor elements in one request "
                        "(INVALID_ARGUMENT above)")
    g.add_argument("--max-batch-rows", type=int, default=DEFAULT_MAX_BATCH_ROWS,
                   help="largest dimension 0 / number of examples in one request")
    g.add_argument("--allow-non-finite-inputs", action="store_true",
                   help="pass NaN/Inf float inputs to the model instead of rejecting them")
    g.add_argument("--grpc-threads", type=int, default=64,
                   help="RPC worker threads (more than 2 x max_batch_size helps batching)")
    g.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM, how long in-flight requests may take to finish")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        configs = model_configs_from_args(args)
        batching = load_batching_options(args.batching_parameters_file) \
            if args.enable_batching else None
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = ServerOptions(
        configs, host=args.host, port=args.port, enable_batching=args.enable_batching,
        batching=batching, poll_wait_seconds=args.file_system_poll_wait_seconds,
        max_message_bytes=args.grpc_max_message_bytes,
        max_request_elements=args.max_request_elements, max_batch_rows=args.max_batch_rows,
        reject_non_finite_inputs=not args.allow_non_finite_inputs,
        grpc_threads=args.grpc_threads, drain_seconds=args.drain_seconds,
        enable_warmup=not args.no_warmup)
    server = ModelServer(options)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        port = server.start()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("serving %s on %s:%d (batching %s)", server.manager.model_names(), args.host, port,
             options.batching or "off")
    print(f"READY {args.host}:{port}", flush=True)
    while not stop.wait(1.0):
        pass
    log.info("draining: refusing new requests, finishing in-flight ones (up to %.0fs)",
             options.drain_seconds)
    started = time.monotonic()
    server.stop()
    log.info("stopped after %.2fs", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
