"""A model server that speaks TensorFlow Serving's gRPC API.

    python -m serving.model_server --model-base-path B/qin --model-name qin --port 8500

Why a server of our own: the stock `tensorflow_model_server` binary cannot be installed from
the package registries (nor Docker) on every machine, while `tensorflow-serving-api` (its protos
and stubs) can. This server implements the same services with those protos, so unmodified TF
Serving clients work against it, and the exported SavedModels stay loadable by the stock server
(see serving/configs/ for its production configuration).

Services: tensorflow.serving.PredictionService (Predict, Classify, Regress, MultiInference,
GetModelMetadata), tensorflow.serving.ModelService (GetModelStatus, HandleReloadConfigRequest)
and grpc.health.v1.Health (SERVING once every configured model has a loaded version), plus TF
Serving's JSON REST API on --rest-api-port (serving.model_server.rest). Both APIs run every
request through `ServingApi`: one code path for models, validation, limits and the drain.
Versions, labels, hot reload and warmup: see serving.model_server.model_manager; batching:
serving.model_server.batching.
Errors use TF Serving's status codes (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, ...) with a
message naming the problem; every RPC catches everything, so no request takes the server down.
SIGTERM/SIGINT drain: health turns NOT_SERVING, new RPCs are refused, in-flight RPCs finish
(up to --drain-seconds), and the process exits 0.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Dict, List, Optional

import common  # noqa: F401  (legacy-Keras switch before TensorFlow loads)
import grpc
import numpy as np

from common import tf_serving_protocol as P
from serving.model_server import errors
from serving.model_server.batching import BatchingOptions, load_batching_options
from serving.model_server.flags import (DEFAULT_LAME_DUCK_SECONDS, DEFAULT_MAX_BATCH_ROWS,
                                        DEFAULT_MAX_BROADCAST_BYTES, DEFAULT_MAX_MESSAGE_BYTES,
                                        DEFAULT_MAX_REQUEST_ELEMENTS,
                                        DEFAULT_REST_API_CONNECTIONS,
                                        DEFAULT_REST_API_MAX_BODY_BYTES, build_parser)
from serving.model_server.model_manager import ModelManager, ServableVersion, Signature

log = logging.getLogger("serving.model_server")

SIGNATURE_DEF_METADATA = "signature_def"  # the one GetModelMetadata field TF Serving serves
# Decoded bytes a request may take, per byte of the largest message the server accepts.
DECODED_BYTES_PER_MESSAGE_BYTE = 2
# What one decoded string element costs beyond its bytes (NumPy reference + TF string header).
STRING_ELEMENT_OVERHEAD_BYTES = 32

# NumPy kinds whose TensorProto values can be one raw little-endian buffer (tensor_content):
# booleans, integers, floats and complex numbers.
_BUFFER_KINDS = frozenset("biufc")
# TensorProto field holding the values of each dtype (by TensorFlow dtype name) and how many
# field entries make one element.
_VALUE_FIELDS = {
    "float32": ("float_val", 1), "float64": ("double_val", 1), "int64": ("int64_val", 1),
    "uint32": ("uint32_val", 1), "uint64": ("uint64_val", 1), "bool": ("bool_val", 1),
    "string": ("string_val", 1), "float16": ("half_val", 1), "bfloat16": ("half_val", 1),
    "complex64": ("scomplex_val", 2), "complex128": ("dcomplex_val", 2),
    **{name: ("int_val", 1) for name in ("int32", "int16", "int8", "uint8", "uint16", "qint8",
                                         "quint8", "qint16", "quint16", "qint32")},
}


class DeclaredTensor:
    """What a TensorProto will cost once decoded, computed from its declared shape and the
    values it actually carries, before anything is allocated."""

    def __init__(self, name: str, proto, spec):
        self.name, self.proto, self.spec = name, proto, spec
        if proto.dtype != spec.dtype_enum:
            import tensorflow as tf

            got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "DT_INVALID"
            raise errors.invalid_argument(
                f"input '{name}' has dtype {got}, expected {spec.describe()}")
        if proto.tensor_shape.unknown_rank:
            raise errors.invalid_argument(f"input '{name}' has no shape (unknown rank)")
        self.shape = tuple(d.size for d in proto.tensor_shape.dim)
        if any(d < 0 for d in self.shape):
            raise errors.invalid_argument(
                f"input '{name}' declares a negative dimension: {list(self.shape)}")
        if spec.shape is not None:
            ok = len(self.shape) == len(spec.shape) and all(
                e < 0 or e == g for e, g in zip(spec.shape, self.shape))
            if not ok:
                raise errors.invalid_argument(
                    f"input '{name}' has shape {list(self.shape)}, expected {spec.describe()}")
        self.elements = math.prod(self.shape)  # Python int: no overflow on hostile shapes
        dtype_name = spec.dtype_name
        if dtype_name not in _VALUE_FIELDS:
            raise errors.invalid_argument(
                f"input '{name}': dtype {dtype_name} cannot be sent in a request")
        field, per_element = _VALUE_FIELDS[dtype_name]
        self.content = b""
        if dtype_name == "string":
            values = proto.string_val
            present = len(values)
            missing = max(0, self.elements - present)
            last = len(values[-1]) if present else 0
            self.bytes = (sum(len(v) for v in values) + missing * last
                          + self.elements * STRING_ELEMENT_OVERHEAD_BYTES)
            self.broadcast_bytes = missing * (last + STRING_ELEMENT_OVERHEAD_BYTES)
        else:
            itemsize = spec.np_dtype.itemsize
            self.bytes = self.elements * itemsize
            self.content = proto.tensor_content
            if self.content:
                if len(self.content) != self.bytes:
                    raise errors.invalid_argument(
                        f"input '{name}' declares shape {list(self.shape)} ({self.bytes} bytes "
                        f"of {dtype_name}) but its tensor_content has "
                        f"{len(self.content)} bytes")
                present = self.elements
            else:
                entries = len(getattr(proto, field))
                if entries % per_element:
                    raise errors.invalid_argument(
                        f"input '{name}': {field} has {entries} entries, not a multiple of "
                        f"{per_element}")
                present = entries // per_element
            missing = max(0, self.elements - present)
            self.broadcast_bytes = missing * itemsize
        if present > self.elements:
            raise errors.invalid_argument(
                f"input '{name}' holds {present} values for shape {list(self.shape)} "
                f"({self.elements} elements)")

    def decode(self) -> np.ndarray:
        if self.content and self.spec.np_dtype.kind in _BUFFER_KINDS:
            # What tf.make_ndarray does, without its copy: a read-only view of the message's
            # bytes (TensorFlow copies it into its own tensor when the signature runs).
            return np.frombuffer(self.content, dtype=self.spec.np_dtype).reshape(self.shape)
        import tensorflow as tf

        try:
            array = tf.make_ndarray(self.proto)
        except Exception as exc:
            raise errors.invalid_argument(
                f"input '{self.name}': malformed TensorProto ({exc})") from exc
        if array.shape != self.shape:
            raise errors.invalid_argument(
                f"input '{self.name}' holds {array.size} values for shape {list(self.shape)}")
        return array


def tensor_from_proto(name: str, proto, spec) -> np.ndarray:
    """TensorProto -> NumPy, checked against the signature's declared dtype and shape."""
    return DeclaredTensor(name, proto, spec).decode()


# Typed TensorProto field of each NumPy dtype in a response (TF Serving's AsProtoField), and the
# NumPy view its values are written through.
_RESPONSE_FIELDS = {
    np.dtype(np.float32): ("float_val", None), np.dtype(np.float64): ("double_val", None),
    np.dtype(np.int64): ("int64_val", None), np.dtype(np.int32): ("int_val", None),
    np.dtype(np.int16): ("int_val", None), np.dtype(np.int8): ("int_val", None),
    np.dtype(np.uint8): ("int_val", None), np.dtype(np.uint16): ("int_val", None),
    np.dtype(np.uint32): ("uint32_val", None), np.dtype(np.uint64): ("uint64_val", None),
    np.dtype(np.bool_): ("bool_val", None), np.dtype(np.float16): ("half_val", np.uint16),
    np.dtype(np.complex64): ("scomplex_val", np.float32),
    np.dtype(np.complex128): ("dcomplex_val", np.float64),
}
_DTYPE_ENUMS: Dict[np.dtype, int] = {}  # NumPy dtype -> tensorflow.DataType, filled on use


def tensor_to_proto(array: np.ndarray):
    """NumPy -> TensorProto with the values in the typed fields (float_val, int64_val, ...),
    as TF Serving writes responses (clients read `outputs[k].float_val`), without
    tf.make_tensor_proto's per-call overhead. Strings and other dtypes go through it."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    field = _RESPONSE_FIELDS.get(array.dtype)  # native byte order only
    if field is None:
        import tensorflow as tf

        return tf.make_tensor_proto(array)
    enum = _DTYPE_ENUMS.get(array.dtype)
    if enum is None:
        import tensorflow as tf

        enum = _DTYPE_ENUMS[array.dtype] = tf.dtypes.as_dtype(array.dtype).as_datatype_enum
    name, view = field
    flat = np.ascontiguousarray(array).reshape(-1)
    proto = tensor_pb2.TensorProto(dtype=enum, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]))
    getattr(proto, name).extend((flat if view is None else flat.view(view)).tolist())
    return proto


class ServerOptions:
    """Everything the server can be configured with (the CLI fills it).

    `reload_allowed_roots` are folders a HandleReloadConfigRequest base_path may lie in, on top
    of the base paths of `model_configs` (always allowed, with everything under them).
    `rest_api_port`: None serves no REST API, 0 any free port (like `port`); the command line's
    --rest-api-port 0 means None, as in TF Serving.
    """

    def __init__(self, model_configs, host="127.0.0.1", port=P.DEFAULT_GRPC_PORT,
                 enable_batching=True, batching: Optional[BatchingOptions] = None,
                 poll_wait_seconds=1.0,
                 max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                 max_request_elements=DEFAULT_MAX_REQUEST_ELEMENTS,
                 max_batch_rows=DEFAULT_MAX_BATCH_ROWS, reject_non_finite_inputs=True,
                 grpc_threads=64, drain_seconds=30.0, enable_warmup=True,
                 max_broadcast_bytes=DEFAULT_MAX_BROADCAST_BYTES,
                 reject_non_finite_outputs=True, serve_before_models_load=False,
                 startup_timeout_seconds: Optional[float] = None,
                 allow_model_config_reload=True, reload_allowed_roots=(),
                 allow_empty_model_config_reload=False,
                 lame_duck_seconds=DEFAULT_LAME_DUCK_SECONDS,
                 rest_api_port: Optional[int] = None,
                 rest_api_connections=DEFAULT_REST_API_CONNECTIONS,
                 rest_api_max_body_bytes=DEFAULT_REST_API_MAX_BODY_BYTES):
        self.model_configs = list(model_configs)
        self.host, self.port = host, port
        self.batching = (batching or BatchingOptions()) if enable_batching else None
        self.poll_wait_seconds = poll_wait_seconds
        self.max_message_bytes = max_message_bytes
        self.max_decoded_bytes = DECODED_BYTES_PER_MESSAGE_BYTE * max_message_bytes
        self.max_request_elements = max_request_elements
        self.max_batch_rows = max_batch_rows
        self.max_broadcast_bytes = max_broadcast_bytes
        self.reject_non_finite_inputs = reject_non_finite_inputs
        self.reject_non_finite_outputs = reject_non_finite_outputs
        self.grpc_threads = grpc_threads
        self.drain_seconds = drain_seconds
        self.enable_warmup = enable_warmup
        self.serve_before_models_load = serve_before_models_load
        self.startup_timeout_seconds = startup_timeout_seconds
        self.allow_model_config_reload = allow_model_config_reload
        self.reload_allowed_roots = [c.base_path for c in self.model_configs] + \
            [r for r in reload_allowed_roots if r]
        self.allow_empty_model_config_reload = allow_empty_model_config_reload
        self.lame_duck_seconds = lame_duck_seconds
        self.rest_api_port = rest_api_port
        self.rest_api_connections = rest_api_connections
        self.rest_api_max_body_bytes = rest_api_max_body_bytes


# ---- request logic (shared by the RPCs and by warmup) --------------------------------------------
class Inference:
    """Runs Predict / Classify / Regress / MultiInference on a resolved version."""

    def __init__(self, options: ServerOptions):
        self.options = options

    def _check_declared_size(self, declared: List[DeclaredTensor]) -> None:
        """Every limit, on declared shapes, before a single tensor is decoded."""
        o = self.options
        elements = sum(t.elements for t in declared)
        if elements > o.max_request_elements:
            raise errors.invalid_argument(
                f"request declares {elements} tensor elements, more than the server's limit of "
                f"{o.max_request_elements} (--max-request-elements); split it")
        for t in declared:
            if t.shape and t.shape[0] > o.max_batch_rows:
                raise errors.invalid_argument(
                    f"input '{t.name}' has {t.shape[0]} rows, more than the server's limit of "
                    f"{o.max_batch_rows} (--max-batch-rows)")
        expanded = sum(t.broadcast_bytes for t in declared)
        if expanded > o.max_broadcast_bytes:
            raise errors.invalid_argument(
                f"request tensors hold fewer values than their shapes declare; repeating the "
                f"last value would take {expanded} bytes, more than the server's limit of "
                f"{o.max_broadcast_bytes} (--max-broadcast-bytes); send every value")
        decoded = sum(t.bytes for t in declared)
        if decoded > o.max_decoded_bytes:
            raise errors.invalid_argument(
                f"request tensors would take {decoded} bytes once decoded, more than the "
                f"server's limit of {o.max_decoded_bytes} (twice --grpc-max-message-bytes)")

    def _check_finite_outputs(self, sig: Signature, outputs: Dict[str, np.ndarray],
                              keys) -> None:
        """A numeric overflow inside the model must not come back as an OK NaN score."""
        if not self.options.reject_non_finite_outputs:
            return
        for k in keys:
            a = outputs.get(k)
            if a is None or a.dtype.kind not in "fc" or not a.size:
                continue
            finite = np.isfinite(a)
            if not finite.all():
                raise errors.invalid_argument(
                    f"signature '{sig.name}' computed {int(a.size - finite.sum())} NaN/Inf "
                    f"values in output '{k}' from these inputs (numeric overflow: check the "
                    "input magnitudes)")

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
        with sig.arrival(batch):  # a batch being formed may wait for this request
            declared = [DeclaredTensor(k, request.inputs[k], sig.inputs[k]) for k in sig.inputs]
            self._check_declared_size(declared)
            arrays = {t.name: t.decode() for t in declared}
            if self.options.reject_non_finite_inputs:
                for k, a in arrays.items():
                    if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
                        bad = int(np.size(a) - np.isfinite(a).sum())
                        raise errors.invalid_argument(
                            f"input '{k}' contains {bad} NaN/Inf values; the server rejects "
                            "non-finite inputs (--allow-non-finite-inputs to pass them "
                            "through)")
            outputs = sig.run(arrays, batch=batch)
        self._check_finite_outputs(sig, outputs, wanted or sig.output_keys)
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
            listed, ctx = input_proto.example_list.examples, b""
        elif kind == "example_list_with_context":
            listed = input_proto.example_list_with_context.examples
            ctx = input_proto.example_list_with_context.context.SerializeToString()
        else:
            raise errors.invalid_argument(
                "Input is empty: set input.example_list or input.example_list_with_context")
        if not listed:
            raise errors.invalid_argument("Input has no examples")
        if len(listed) > self.options.max_batch_rows:
            raise errors.invalid_argument(
                f"Input has {len(listed)} examples, more than the server's limit of "
                f"{self.options.max_batch_rows} (--max-batch-rows)")
        # The context is copied into every example: a small message could claim a lot.
        decoded = sum(e.ByteSize() + len(ctx) + STRING_ELEMENT_OVERHEAD_BYTES for e in listed)
        if decoded > self.options.max_decoded_bytes:
            raise errors.invalid_argument(
                f"Input would take {decoded} bytes once the context is merged into its "
                f"{len(listed)} examples, more than the server's limit of "
                f"{self.options.max_decoded_bytes} (twice --grpc-max-message-bytes)")
        # Concatenated serialized messages parse as their merge, the example's own features
        # winning over the context's: exactly what TF Serving does.
        return np.array([ctx + e.SerializeToString() for e in listed], dtype=object)

    def _run_examples(self, sig: Signature, examples: np.ndarray, batch: bool):
        if P.EXAMPLE_INPUTS not in sig.inputs or len(sig.inputs) != 1:
            raise errors.invalid_argument(
                f"signature '{sig.name}' cannot take tf.Examples: it needs exactly one input "
                f"'{P.EXAMPLE_INPUTS}' (DT_STRING), it has {sorted(sig.inputs)}")
        spec = sig.inputs[P.EXAMPLE_INPUTS]
        if spec.np_dtype != np.dtype(object):
            raise errors.invalid_argument(
                f"signature '{sig.name}' input '{P.EXAMPLE_INPUTS}' is {spec.describe()}, "
                "expected DT_STRING serialized tf.Examples")
        outputs = sig.run({P.EXAMPLE_INPUTS: examples}, batch=batch)
        self._check_finite_outputs(sig, outputs, (P.CLASSIFY_SCORES, P.REGRESS_OUTPUTS))
        return outputs, len(examples)

    def _classification(self, sig: Signature, outputs, n: int):
        from tensorflow_serving.apis import classification_pb2

        if P.CLASSIFY_CLASSES not in outputs and P.CLASSIFY_SCORES not in outputs:
            raise errors.invalid_argument(
                f"signature '{sig.name}' is not a classification signature: it outputs "
                f"{sig.output_keys}, expected '{P.CLASSIFY_CLASSES}' and/or "
                f"'{P.CLASSIFY_SCORES}'")
        classes = outputs.get(P.CLASSIFY_CLASSES)
        scores = outputs.get(P.CLASSIFY_SCORES)
        if scores is not None and scores.ndim == 1:
            scores = scores[:, None]
        if classes is not None and classes.ndim == 1:
            classes = classes[:, None]
        for name, value in ((P.CLASSIFY_CLASSES, classes), (P.CLASSIFY_SCORES, scores)):
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

        if P.REGRESS_OUTPUTS not in outputs:
            raise errors.invalid_argument(
                f"signature '{sig.name}' is not a regression signature: it outputs "
                f"{sig.output_keys}, expected '{P.REGRESS_OUTPUTS}'")
        values = outputs[P.REGRESS_OUTPUTS]
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1 or values.shape[0] != n:
            raise errors.invalid_argument(
                f"output '{P.REGRESS_OUTPUTS}' of '{sig.name}' has shape "
                f"{list(values.shape)}, expected [{n}] or [{n}, 1]")
        result = regression_pb2.RegressionResult()
        for v in values:
            result.regressions.add().value = float(v)
        return result

    def classify(self, servable: ServableVersion, request, batch=True):
        from tensorflow_serving.apis import classification_pb2

        sig = servable.signature(request.model_spec.signature_name)
        with sig.arrival(batch):
            outputs, n = self._run_examples(sig, self._serialized_examples(request.input),
                                            batch)
        response = classification_pb2.ClassificationResponse()
        self._fill_spec(response.model_spec, servable, sig.name)
        response.result.CopyFrom(self._classification(sig, outputs, n))
        return response

    def regress(self, servable: ServableVersion, request, batch=True):
        from tensorflow_serving.apis import regression_pb2

        sig = servable.signature(request.model_spec.signature_name)
        with sig.arrival(batch):
            outputs, n = self._run_examples(sig, self._serialized_examples(request.input),
                                            batch)
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
            name = task.model_spec.signature_name or P.DEFAULT_SIGNATURE
            if name in seen:
                raise errors.invalid_argument(f"signature '{name}' is used by two tasks")
            seen.add(name)
            if task.method_name not in (P.CLASSIFY_METHOD, P.REGRESS_METHOD):
                raise errors.unimplemented(
                    f"task method_name '{task.method_name}' is not supported; use "
                    f"'{P.CLASSIFY_METHOD}' or '{P.REGRESS_METHOD}'")
            sig = servable.signature(name)
            outputs, n = self._run_examples(sig, examples, batch)
            result = response.results.add()
            self._fill_spec(result.model_spec, servable, sig.name)
            if task.method_name == P.CLASSIFY_METHOD:
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


class RequestGate:
    """Counts the RPCs in flight. Once closed (the drain), new RPCs get UNAVAILABLE from here:
    a status clients may safely retry elsewhere, since the request never ran (gRPC itself
    would cancel calls that arrive while it stops)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._inflight = 0
        self._closed = False

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def closed(self) -> bool:
        return self._closed

    @contextlib.contextmanager
    def enter(self):
        with self._cv:
            if self._closed:
                raise errors.unavailable("the server is shutting down; retry on another replica")
            self._inflight += 1
        try:
            yield
        finally:
            with self._cv:
                self._inflight -= 1
                if not self._inflight:
                    self._cv.notify_all()

    def close_and_wait(self, timeout: float) -> int:
        """Refuses new RPCs, waits up to `timeout` s for the running ones; how many remain."""
        with self._cv:
            self._closed = True
            self._cv.wait_for(lambda: not self._inflight, timeout)
            return self._inflight


def _guard(method):
    """Runs one RPC; converts every failure into a gRPC status (the server never crashes)."""
    name = method.__name__

    def wrapper(self, request, context):
        try:
            with self.gate.enter():
                return method(self, request, context)
        except Exception as exc:
            err = errors.from_exception(exc)
            if err.code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            elif self.gate.closed:  # every late request of a drain: not worth a line each
                log.debug("%s rejected: %s", name, err)
            else:
                log.info("%s rejected: %s", name, err)
            context.abort(err.code, err.message)

    wrapper.__name__ = name
    wrapper.__doc__ = method.__doc__
    return wrapper


class ServingApi:
    """What every request does, whatever the transport: the gRPC servicers and the REST API
    (serving.model_server.rest) both call these methods with TF Serving's request protos and
    get its response protos back, or a ServingError. Versions are held for the duration of a
    request (`acquire`), so both APIs see the same models, validation and limits."""

    def __init__(self, server: "ModelServer"):
        self.server = server
        self.manager, self.inference = server.manager, server.inference

    def acquire(self, spec):
        """Context manager: the version a ModelSpec names, kept loaded while in use."""
        version, label = _spec_version(spec)
        return self.manager.acquire(spec.name, version, label)

    def predict(self, request, fill_inputs=None):
        """`fill_inputs(signature, request)`, when given, adds the inputs once the version and
        its signature are known (the REST API types JSON values by the signature)."""
        with self.acquire(request.model_spec) as servable:
            if fill_inputs is not None:
                fill_inputs(servable.signature(request.model_spec.signature_name), request)
            return self.inference.predict(servable, request)

    def classify(self, request):
        with self.acquire(request.model_spec) as servable:
            return self.inference.classify(servable, request)

    def regress(self, request):
        with self.acquire(request.model_spec) as servable:
            return self.inference.regress(servable, request)

    def multi_inference(self, request):
        if not request.tasks:
            raise errors.invalid_argument("MultiInferenceRequest has no tasks")
        specs = [t.model_spec for t in request.tasks]
        names = {s.name for s in specs}
        versions = {_spec_version(s) for s in specs}
        if len(names) != 1 or len(versions) != 1:
            raise errors.invalid_argument(
                "all MultiInference tasks must use the same model name and version; got "
                f"names {sorted(names)}")
        with self.acquire(specs[0]) as servable:
            return self.inference.multi_inference(servable, request)

    def get_model_metadata(self, request):
        from tensorflow_serving.apis import get_model_metadata_pb2

        fields = list(request.metadata_field)
        if not fields:
            raise errors.invalid_argument("metadata_field is empty; ask for 'signature_def'")
        unsupported = [f for f in fields if f != SIGNATURE_DEF_METADATA]
        if unsupported:
            raise errors.invalid_argument(
                f"metadata_field {unsupported} not supported; only '{SIGNATURE_DEF_METADATA}'")
        with self.acquire(request.model_spec) as servable:
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.model_name
            response.model_spec.version.value = servable.version
            response.metadata[SIGNATURE_DEF_METADATA].Pack(servable.signature_def_map())
            return response

    def get_model_status(self, request):
        from tensorflow_serving.apis import get_model_status_pb2

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

    def reload_config(self, request):
        from tensorflow_serving.apis import model_management_pb2, status_pb2

        options = self.server.options
        if not options.allow_model_config_reload:
            raise errors.permission_denied(
                "this server refuses model config reloads (--disable-model-config-reload)")
        kind = request.config.WhichOneof("config")
        if kind != "model_config_list":
            raise errors.invalid_argument(
                "ReloadConfigRequest.config must hold a model_config_list "
                f"(got {kind or 'nothing'})")
        configs = list(request.config.model_config_list.config)
        if not configs and not options.allow_empty_model_config_reload:
            raise errors.invalid_argument(
                "model_config_list is empty, which would unload every model; refused "
                "(--allow-empty-model-config-reload accepts it)")
        for config in configs:  # all checked before anything changes
            if not path_within_roots(config.base_path, options.reload_allowed_roots):
                raise errors.permission_denied(
                    f"model '{config.name}': base_path {config.base_path!r} is outside "
                    "the folders this server may load from (the configured base paths "
                    "and --reload-allowed-roots)")
        try:
            self.manager.set_configs(configs)
        except ValueError as exc:
            raise errors.invalid_argument(f"invalid model config: {exc}") from exc
        self.manager.poll_once()  # like TF Serving, answer once the new config is loaded
        self.server.update_health()
        response = model_management_pb2.ReloadConfigResponse()
        response.status.CopyFrom(status_pb2.StatusProto(error_code=0))
        return response


def _servicers():
    """The gRPC servicer classes: each RPC is one ServingApi call behind `_guard`."""
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def __init__(self, api: ServingApi, gate: "RequestGate"):
            self.api, self.gate = api, gate

        @_guard
        def Predict(self, request, context):
            return self.api.predict(request)

        @_guard
        def Classify(self, request, context):
            return self.api.classify(request)

        @_guard
        def Regress(self, request, context):
            return self.api.regress(request)

        @_guard
        def MultiInference(self, request, context):
            return self.api.multi_inference(request)

        @_guard
        def GetModelMetadata(self, request, context):
            return self.api.get_model_metadata(request)

    class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
        def __init__(self, api: ServingApi, gate: "RequestGate"):
            self.api, self.gate = api, gate

        @_guard
        def GetModelStatus(self, request, context):
            return self.api.get_model_status(request)

        @_guard
        def HandleReloadConfigRequest(self, request, context):
            return self.api.reload_config(request)

    return PredictionServicer, ModelServicer


def _normalized_path(path: str) -> str:
    """Absolute, `..`-free form of a local (symlinks resolved) or URL-style (gs://) path."""
    scheme, sep, rest = path.partition("://")
    if sep:
        return f"{scheme}://" + posixpath.normpath("/" + rest).lstrip("/")
    return os.path.realpath(path)


def path_within_roots(path: str, roots) -> bool:
    """True when `path` is one of `roots` or lies under one (after normalization)."""
    if not path:
        return False
    target = _normalized_path(path)
    for root in roots:
        root = _normalized_path(root).rstrip("/")
        if target == root or target.startswith(root + "/"):
            return True
    return False


class StartupInterrupted(Exception):
    """`abort_start()` was called while the server waited for its initial models."""


class ModelServer:
    """The server as a Python object (tests and benchmarks run it in-process).

    `start()` loads the models and, as TF Serving does, binds the port only once every
    configured model has an AVAILABLE version (`serve_before_models_load` binds at once); it
    returns the port (port 0 = pick a free one); the REST API, when configured, opens at the
    same time (`rest_port`). `shutdown()` is the SIGTERM sequence: lame duck (health NOT_SERVING
    while requests are still served), then `stop(grace)` drains both APIs.
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
        self._health_lock = threading.Lock()
        self._lame_duck = False
        self._abort_start = threading.Event()
        self.gate = RequestGate()
        self.api = ServingApi(self)
        self._rest = None
        self.rest_port: Optional[int] = None

    def update_health(self) -> None:
        from grpc_health.v1 import health_pb2

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, \
            health_pb2.HealthCheckResponse.NOT_SERVING
        with self._health_lock:
            names = self.manager.model_names()
            for name in names:
                up = self.manager.available(name) and not self._lame_duck
                self.health.set(name, serving if up else not_serving)
            up = self.manager.available() and not self._lame_duck
            self.health.set("", serving if up else not_serving)

    def abort_start(self) -> None:
        """Makes a `start()` that waits for the initial models raise StartupInterrupted."""
        self._abort_start.set()

    def _wait_for_initial_models(self) -> None:
        deadline = None if self.options.startup_timeout_seconds is None else \
            time.monotonic() + self.options.startup_timeout_seconds
        logged = False
        while not self.manager.available():
            missing = [n for n in self.manager.model_names() if not self.manager.available(n)]
            if self.options.poll_wait_seconds <= 0:
                raise ValueError(
                    f"models {missing} have no loadable version and polling is off "
                    "(--file-system-poll-wait-seconds 0); see the load errors above, or use "
                    "--serve-before-models-load")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"models {missing} got no AVAILABLE version within "
                                   f"{self.options.startup_timeout_seconds:.0f}s")
            if not logged:
                log.info("waiting for models %s to load before opening the port", missing)
                logged = True
            if self._abort_start.wait(min(0.1, self.options.poll_wait_seconds)):
                raise StartupInterrupted("start-up interrupted while models were loading")

    def start(self) -> int:
        from grpc_health.v1 import health_pb2_grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        prediction_cls, model_cls = _servicers()
        self.update_health()
        if not self.options.serve_before_models_load:
            try:
                self.manager.start()
                self._wait_for_initial_models()
            except BaseException:
                self.manager.stop()
                raise
        limit = self.options.max_message_bytes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.options.grpc_threads,
                                       thread_name_prefix="rpc"),
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            prediction_cls(self.api, self.gate), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            model_cls(self.api, self.gate), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        address = f"{self.options.host}:{self.options.port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio raises instead of returning 0 on some versions
            raise OSError(f"cannot bind {address}: {exc}") from exc
        if not self.port:
            raise OSError(f"cannot bind {address}")
        if self.options.rest_api_port is not None:
            self._start_rest()
        self._server.start()
        if self.options.serve_before_models_load:
            self.manager.start()
        self.update_health()
        return self.port

    def _start_rest(self) -> None:
        from serving.model_server.rest import RestApi, RestServer

        address = (self.options.host, self.options.rest_api_port)
        try:
            self._rest = RestServer(address, RestApi(self.api, self.gate),
                                    max_connections=self.options.rest_api_connections,
                                    max_body_bytes=self.options.rest_api_max_body_bytes)
        except OSError as exc:
            if not self.options.serve_before_models_load:
                self.manager.stop()
            raise OSError(f"cannot bind the REST API to {address[0]}:{address[1]}: {exc}") \
                from exc
        self.rest_port = self._rest.port
        self._rest.start()

    def enter_lame_duck(self) -> None:
        """Health turns NOT_SERVING for every service; requests are still served."""
        with self._health_lock:
            self._lame_duck = True
        self.update_health()

    def shutdown(self, lame_duck_seconds: Optional[float] = None,
                 grace: Optional[float] = None) -> None:
        """What SIGTERM does: lame duck for `lame_duck_seconds`, then `stop(grace)`."""
        lame_duck_seconds = self.options.lame_duck_seconds if lame_duck_seconds is None \
            else lame_duck_seconds
        self.enter_lame_duck()
        if lame_duck_seconds > 0:
            time.sleep(lame_duck_seconds)
        self.stop(grace)

    def stop(self, grace: Optional[float] = None) -> None:
        """Refuses new RPCs, lets in-flight ones finish (up to `grace` s), unloads models."""
        grace = self.options.drain_seconds if grace is None else grace
        with self._health_lock:
            self._lame_duck = True
            self.health.enter_graceful_shutdown()
        started = time.monotonic()
        running = self.gate.inflight
        left = self.gate.close_and_wait(grace)
        if running or left:
            log.info("drain: %d requests were in flight, %d still running after %.2fs", running,
                     left, time.monotonic() - started)
        if self._rest is not None:
            self._rest.stop()
        if self._server is not None:
            # Only RPCs that arrive now (refused by the gate) or stragglers past `grace` remain.
            self._server.stop(max(0.5, grace - (time.monotonic() - started))).wait()
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


def main(argv: Optional[List[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


def options_from_args(args, configs, batching) -> ServerOptions:
    roots = [r.strip() for r in (args.reload_allowed_roots or "").split(",") if r.strip()]
    return ServerOptions(
        configs, host=args.host, port=args.port, enable_batching=args.enable_batching,
        batching=batching, poll_wait_seconds=args.file_system_poll_wait_seconds,
        max_message_bytes=args.grpc_max_message_bytes,
        max_request_elements=args.max_request_elements, max_batch_rows=args.max_batch_rows,
        max_broadcast_bytes=args.max_broadcast_bytes,
        reject_non_finite_inputs=not args.allow_non_finite_inputs,
        reject_non_finite_outputs=not args.allow_non_finite_outputs,
        grpc_threads=args.grpc_threads, drain_seconds=args.drain_seconds,
        enable_warmup=not args.no_warmup,
        serve_before_models_load=args.serve_before_models_load,
        allow_model_config_reload=not args.disable_model_config_reload,
        reload_allowed_roots=roots,
        allow_empty_model_config_reload=args.allow_empty_model_config_reload,
        lame_duck_seconds=args.lame_duck_seconds,
        rest_api_port=args.rest_api_port or None,
        rest_api_connections=args.rest_api_num_threads,
        rest_api_max_body_bytes=args.rest_api_max_body_bytes)


def configure_tensorflow_threads(intra_op: int = 0, inter_op: int = 0) -> None:
    """Sets TensorFlow's thread pools (0 = TensorFlow's choice); must run before any op.

    Raises ValueError for a negative count, or when TensorFlow already runs with other values
    (the pools cannot change once created)."""
    import tensorflow as tf

    if intra_op < 0 or inter_op < 0:
        raise ValueError("--tensorflow-intra-op-parallelism and --tensorflow-inter-op-"
                         f"parallelism must be >= 0; got {intra_op} and {inter_op}")
    threading_config = tf.config.threading
    for wanted, get, set_ in (
            (intra_op, threading_config.get_intra_op_parallelism_threads,
             threading_config.set_intra_op_parallelism_threads),
            (inter_op, threading_config.get_inter_op_parallelism_threads,
             threading_config.set_inter_op_parallelism_threads)):
        if wanted and get() != wanted:
            try:
                set_(wanted)
            except RuntimeError as exc:
                raise ValueError(f"TensorFlow is already initialised; thread counts must be "
                                 f"set before any op runs ({exc})") from exc


def run(args) -> int:
    """Runs the server for parsed command-line `args` until SIGTERM/SIGINT; the exit code."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        configure_tensorflow_threads(args.tensorflow_intra_op_parallelism,
                                     args.tensorflow_inter_op_parallelism)
        configs = model_configs_from_args(args)
        batching = load_batching_options(args.batching_parameters_file,
                                         close_batches_early=args.close_batches_early) \
            if args.enable_batching else None
        options = options_from_args(args, configs, batching)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = ModelServer(options)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        server.abort_start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        port = server.start()
    except StartupInterrupted:
        log.info("stopped while the initial models were loading")
        return 0
    except (ValueError, OSError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("serving %s on %s:%d (batching %s; TensorFlow threads: intra-op %s, inter-op %s)",
             server.manager.model_names(), args.host, port, options.batching or "off",
             args.tensorflow_intra_op_parallelism or "auto",
             args.tensorflow_inter_op_parallelism or "auto")
    if server.rest_port is not None:
        log.info("REST API on http://%s:%d/v1/models/", args.host, server.rest_port)
        print(f"REST {args.host}:{server.rest_port}", flush=True)
    print(f"READY {args.host}:{port}", flush=True)
    while not stop.wait(1.0):
        pass
    log.info("lame duck: health NOT_SERVING, still serving for %.1fs", options.lame_duck_seconds)
    started = time.monotonic()
    server.enter_lame_duck()
    time.sleep(max(0.0, options.lame_duck_seconds))
    log.info("draining: refusing new requests, finishing in-flight ones (up to %.0fs)",
             options.drain_seconds)
    server.stop()
    log.info("stopped after %.2fs", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
