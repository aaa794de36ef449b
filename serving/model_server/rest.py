"""TF Serving's REST API (the JSON one, port 8501 by default) in front of the gRPC server's logic.

    POST /v1/models/NAME[/versions/N|/labels/L]:predict     {"instances": ...} or {"inputs": ...}
    POST /v1/models/NAME[/versions/N|/labels/L]:classify    {"context": {...}, "examples": [...]}
    POST /v1/models/NAME[/versions/N|/labels/L]:regress     (same body as classify)
    GET  /v1/models/NAME[/versions/N|/labels/L]             GetModelStatus as JSON
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata    GetModelMetadata as JSON

As in TF Serving (http_rest_api_handler.cc, json_tensor.cc), each request is turned into the gRPC
request proto (PredictRequest, ClassificationRequest, RegressionRequest, GetModelStatusRequest,
GetModelMetadataRequest) and run by the same `ServingApi` as the gRPC servicers: the same
models and versions, validation, size limits, batching queues and drain. JSON formats:
* predict, row format: "instances" is a list with one item per row; with one input an item is
  its value, with several an object {input: value}; the items are stacked along dimension 0.
  Answer: {"predictions": [...]} (one item per row; an object per row with several outputs).
* predict, columnar format: "inputs" is the value of the one input or an object {input: value}
  (each a whole tensor). Answer: {"outputs": value or {output: value}}.
* Values are nested lists typed by the signature: numbers for ints and floats (NaN, Infinity
  accepted), true/false for bools, strings or {"b64": "..."} for DT_STRING. String outputs whose
  name ends in "_bytes" (and any that is not UTF-8) come back as {"b64": "..."}.
* classify / regress: "examples" is a list of tf.Example objects {feature: value or list}
  (JSON ints -> int64_list, decimals -> float_list, strings and {"b64"} -> bytes_list, booleans
  -> int64 0/1); an optional "context" object makes an ExampleListWithContext. Answers:
  {"results": [[[label, score], ...], ...]} and {"results": [value, ...]}.
* Errors: {"error": "..."} with the HTTP status TF Serving maps the gRPC code to
  (`errors.http_status`: INVALID_ARGUMENT 400, NOT_FOUND 404, UNAVAILABLE 503, ...).

Why the standard library's http.server: the API is a thin JSON layer over the shared request
logic, so a threaded HTTP/1.1 server is enough and adds no dependency to the serving image. It
is bounded here: at most `max_connections` connections are served at once (the next ones get
503 at once), idle or slow connections are dropped after IDLE_TIMEOUT_SECONDS, a body is read
only when its Content-Length is within `max_body_bytes` (413 otherwise; parsed JSON takes up to
about 25x its size, which is why this limit is smaller than the gRPC message limit).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Tuple
from urllib.parse import unquote, urlsplit

import grpc
import numpy as np

from serving.model_server import errors

log = logging.getLogger("serving.model_server.rest")

IDLE_TIMEOUT_SECONDS = 30.0  # a connection that sends nothing for this long is closed
BYTES_SUFFIX = "_bytes"  # string outputs named so are binary: written as {"b64": ...}
B64_KEY = "b64"
INT64_MAX = 2**63 - 1

_SPEC = r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?"
PREDICTION_PATH = re.compile(_SPEC + r":(predict|classify|regress)", re.IGNORECASE)
MODEL_PATH = re.compile(_SPEC + r"(/metadata)?", re.IGNORECASE)


# ---- JSON -> tensors and Examples ---------------------------------------------------------------
def parse_json_object(body: bytes) -> dict:
    if not body:
        raise errors.invalid_argument("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)  # NaN, Infinity and -Infinity are accepted, as TF Serving does
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise errors.invalid_argument(f"JSON Parse error: {exc}") from None
    if not isinstance(doc, dict):
        raise errors.invalid_argument("JSON Parse error: the request body is not a JSON object")
    return doc


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(B64_KEY), str)


def _b64_decode(value, where: str) -> bytes:
    try:
        return base64.b64decode(value[B64_KEY], validate=True)
    except (binascii.Error, ValueError):
        raise errors.invalid_argument(f"{where}: {{\"b64\": ...}} holds invalid base64") from None


def _first_non_number(value) -> object:
    """The first leaf of a regular nested list that is not a JSON number or boolean."""
    for leaf in np.asarray(value, dtype=object).reshape(-1):
        if not isinstance(leaf, (int, float)):
            return leaf
    return None


def json_to_array(value, spec, where: str) -> np.ndarray:
    """A JSON value (scalar or nested lists) as an array of the signature input's dtype.

    Lists must be regular (same length at each level). Numbers must fit the dtype without loss
    (TF Serving's rule): ints within its range, decimals only for float inputs and within the
    float range."""
    dtype = spec.np_dtype
    if dtype == np.dtype(object):  # DT_STRING
        leaves = np.empty(0, dtype=object)
        try:
            leaves = np.asarray(value, dtype=object)
        except (ValueError, TypeError) as exc:
            raise errors.invalid_argument(f"{where}: lists of different lengths ({exc})") from None
        out = np.empty(leaves.shape, dtype=object)
        flat_out = out.reshape(-1)
        for i, leaf in enumerate(leaves.reshape(-1)):
            if isinstance(leaf, str):
                flat_out[i] = leaf.encode("utf-8")
            elif _is_b64(leaf):
                flat_out[i] = _b64_decode(leaf, where)
            else:
                raise errors.invalid_argument(
                    f"{where}: JSON value {json.dumps(leaf)[:80]} is not a string or "
                    f"{{\"b64\": ...}}, expected {spec.describe()} (or lists of different "
                    "lengths)")
        return out
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise errors.invalid_argument(
            f"{where}: not a regular nested list of numbers ({exc})") from None
    if array.size == 0:
        return array.astype(dtype)
    kind = array.dtype.kind
    if kind in "OUS":
        bad = _first_non_number(value)
        raise errors.invalid_argument(
            f"{where}: JSON value {json.dumps(bad)[:80]} is not of the expected type "
            f"{spec.describe()}" if bad is not None else
            f"{where}: an integer beyond 64 bits, expected {spec.describe()}")
    target = dtype.kind
    if target == "b":
        if kind != "b":
            raise errors.invalid_argument(f"{where}: expected true/false for {spec.describe()}")
        return array
    if kind == "b":
        raise errors.invalid_argument(f"{where}: true/false given for {spec.describe()}")
    if target in "iu":
        if kind not in "iu":
            raise errors.invalid_argument(
                f"{where}: decimal numbers given for {spec.describe()}; send whole numbers")
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise errors.invalid_argument(
                f"{where}: values outside the range of {spec.describe()}")
        return array.astype(dtype)
    if target == "f":
        if kind in "iu":
            exact = 2 ** (np.finfo(dtype).nmant + 1)
            if np.abs(array).max() > exact:
                raise errors.invalid_argument(
                    f"{where}: integers beyond {exact} cannot be converted to "
                    f"{spec.describe()} without loss of precision")
        else:
            finite = array[np.isfinite(array)]
            if finite.size and np.abs(finite).max() > np.finfo(dtype).max:
                raise errors.invalid_argument(
                    f"{where}: values beyond the range of {spec.describe()} cannot be "
                    "converted without loss of precision")
        return array.astype(dtype)
    raise errors.unimplemented(f"{where}: {spec.describe()} inputs cannot be sent as JSON")


def array_to_tensor_proto(array: np.ndarray, dtype_enum: int):
    """NumPy -> TensorProto, numbers as one tensor_content buffer (what make_tensor_proto sends)."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    proto = tensor_pb2.TensorProto(dtype=dtype_enum, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]))
    if array.dtype == np.dtype(object):
        proto.string_val.extend(array.reshape(-1).tolist())
    else:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto


def fill_predict_inputs(doc: dict, signature, request) -> bool:
    """Adds the tensors of a JSON predict body to `request`; True for the row format."""
    has_rows, has_columns = "instances" in doc, "inputs" in doc
    if has_rows == has_columns:
        raise errors.invalid_argument(
            "the JSON body needs exactly one of 'instances' (row format) and 'inputs' "
            "(columnar format)")
    names = sorted(signature.inputs)
    if not names:
        raise errors.invalid_argument(f"signature '{signature.name}' takes no inputs")
    columns: Dict[str, object] = {}
    if has_rows:
        rows = doc["instances"]
        if not isinstance(rows, list) or not rows:
            raise errors.invalid_argument("'instances' must be a non-empty list")
        named = isinstance(rows[0], dict) and not _is_b64(rows[0])
        if not named and len(names) > 1:
            raise errors.invalid_argument(
                f"'instances' is a plain list, but signature '{signature.name}' takes several "
                f"inputs {names}: give each instance as an object {{input: value}}")
        for i, row in enumerate(rows):
            if named != (isinstance(row, dict) and not _is_b64(row)):
                raise errors.invalid_argument(
                    f"instance {i} is {'not ' if named else ''}an object, unlike instance 0")
            if named and set(row) != set(names):
                raise errors.invalid_argument(
                    f"instance {i} has keys {sorted(row)}; signature '{signature.name}' takes "
                    f"{names}")
        if named:
            columns = {n: [row[n] for row in rows] for n in names}
        else:
            columns = {names[0]: rows}
    else:
        value = doc["inputs"]
        if isinstance(value, dict) and not _is_b64(value):
            extra = sorted(set(value) - set(names))
            if extra:
                raise errors.invalid_argument(
                    f"inputs {extra} are not in signature '{signature.name}'; it takes {names}")
            columns = {n: value[n] for n in names if n in value}
        elif len(names) > 1:
            raise errors.invalid_argument(
                f"'inputs' is a plain value, but signature '{signature.name}' takes several "
                f"inputs {names}: give an object {{input: value}}")
        else:
            columns = {names[0]: value}
    for name, value in columns.items():
        spec = signature.inputs[name]
        where = f"input '{name}'" + (" (stacked 'instances')" if has_rows else "")
        request.inputs[name].CopyFrom(
            array_to_tensor_proto(json_to_array(value, spec, where), spec.dtype_enum))
    return has_rows


def _feature(name: str, value):
    """One tf.Example feature from a JSON value or list, typed as TF Serving does: ints ->
    int64_list, decimals -> float_list (a list mixing both -> float_list, where stock TF Serving
    refuses it), strings and {"b64"} -> bytes_list, booleans -> int64 0/1."""
    from tensorflow.core.example import feature_pb2

    values = value if isinstance(value, list) else [value]
    kinds, out = set(), []
    for v in values:
        if isinstance(v, bool):
            kinds.add("int64")
            v = int(v)
        elif isinstance(v, int):
            if not -INT64_MAX - 1 <= v <= INT64_MAX:
                raise errors.invalid_argument(f"feature '{name}': {v} does not fit in int64")
            kinds.add("int64")
        elif isinstance(v, float):
            if np.isfinite(v) and abs(v) > np.finfo(np.float32).max:
                raise errors.invalid_argument(
                    f"feature '{name}': {v} cannot be converted to float without loss of "
                    "precision")
            kinds.add("float")
        elif isinstance(v, str):
            kinds.add("bytes")
            v = v.encode("utf-8")
        elif _is_b64(v):
            kinds.add("bytes")
            v = _b64_decode(v, f"feature '{name}'")
        else:
            raise errors.invalid_argument(
                f"feature '{name}' has an element of unexpected JSON type: "
                f"{json.dumps(v)[:80]}")
        out.append(v)
    if kinds == {"int64", "float"}:
        exact = 2 ** (np.finfo(np.float32).nmant + 1)
        if any(isinstance(v, int) and abs(v) > exact for v in out):
            raise errors.invalid_argument(
                f"feature '{name}' mixes decimals with integers beyond {exact}, which float "
                "cannot hold exactly")
        kinds = {"float"}
    if len(kinds) > 1:
        raise errors.invalid_argument(
            f"feature '{name}' mixes {' and '.join(sorted(kinds))} values; a feature has one "
            "type")
    kind = kinds.pop() if kinds else None
    if kind == "int64":
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=out))
    if kind == "float":
        return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=out))
    if kind == "bytes":
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=out))
    return feature_pb2.Feature()  # an empty list: a feature with no values


def _example(obj, where: str, example) -> None:
    if not isinstance(obj, dict):
        raise errors.invalid_argument(f"{where} must be a JSON object {{feature: value}}")
    for name, value in obj.items():
        example.features.feature[name].CopyFrom(_feature(name, value))


def fill_example_input(doc: dict, input_proto) -> None:
    """"context" and "examples" of a classify/regress body -> tensorflow.serving.Input."""
    examples = doc.get("examples")
    if not isinstance(examples, list) or not examples:
        raise errors.invalid_argument("the JSON body needs 'examples', a non-empty list of "
                                      "objects {feature: value}")
    if "context" in doc:
        target = input_proto.example_list_with_context
        _example(doc["context"], "'context'", target.context)
    else:
        target = input_proto.example_list
    for i, obj in enumerate(examples):
        _example(obj, f"example {i}", target.examples.add())


# ---- tensors -> JSON -----------------------------------------------------------------------------
def _json_values(name: str, array: np.ndarray):
    """Nested lists of JSON-ready values; float32 written in their shortest exact form."""
    kind = array.dtype.kind
    if kind == "O" or kind == "S":
        binary = name.endswith(BYTES_SUFFIX)
        flat = []
        for v in array.reshape(-1).tolist():
            if not binary:
                try:
                    flat.append(v.decode("utf-8"))
                    continue
                except UnicodeDecodeError:
                    pass
            flat.append({B64_KEY: base64.b64encode(v).decode("ascii")})
        return np.array(flat, dtype=object).reshape(array.shape).tolist() if array.ndim \
            else flat[0]
    if array.dtype == np.float32 or array.dtype == np.float16:
        exact = np.array([_float32(v) for v in array.reshape(-1)], dtype=np.float64)
        return exact.reshape(array.shape).tolist()
    if kind in "fiub":
        return array.tolist()
    raise errors.unimplemented(f"output '{name}' of dtype {array.dtype} cannot be written as JSON")


def predict_json(response, row_format: bool) -> dict:
    import tensorflow as tf

    arrays = {k: tf.make_ndarray(v) for k, v in sorted(response.outputs.items())}
    if not arrays:
        raise errors.invalid_argument("the signature returned no outputs")
    if not row_format:
        values = {k: _json_values(k, a) for k, a in arrays.items()}
        return {"outputs": next(iter(values.values())) if len(values) == 1 else values}
    rows = {a.shape[0] if a.ndim else None for a in arrays.values()}
    if len(rows) != 1 or None in rows:
        shapes = {k: list(a.shape) for k, a in arrays.items()}
        raise errors.invalid_argument(
            f"outputs {shapes} do not share dimension 0, so they cannot be written as rows; use "
            "the columnar format ('inputs') or an output_filter")
    values = {k: _json_values(k, a) for k, a in arrays.items()}
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    n = rows.pop()
    return {"predictions": [{k: v[i] for k, v in values.items()} for i in range(n)]}


def _float32(value: float) -> float:
    """A float32 proto field in its shortest exact decimal form (0.1, not 0.10000000149)."""
    return float(str(np.float32(value)))


def classify_json(response) -> dict:
    return {"results": [[[c.label, _float32(c.score)] for c in classifications.classes]
                        for classifications in response.result.classifications]}


def regress_json(response) -> dict:
    return {"results": [_float32(r.value) for r in response.result.regressions]}


def _message_json(message) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def metadata_json(response) -> dict:
    from tensorflow_serving.apis import get_model_metadata_pb2

    from serving.model_server.server import SIGNATURE_DEF_METADATA

    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata[SIGNATURE_DEF_METADATA].Unpack(signature_defs)
    return {"model_spec": _message_json(response.model_spec),
            "metadata": {SIGNATURE_DEF_METADATA: _message_json(signature_defs)}}


# ---- routing ------------------------------------------------------------------------------------
class RestApi:
    """HTTP method + path + body -> (HTTP status, JSON document), through `ServingApi`.

    Requests pass the same `RequestGate` as RPCs: counted for the drain, refused with 503 once
    it started."""

    def __init__(self, api, gate):
        self.api, self.gate = api, gate

    @staticmethod
    def _model_spec(spec, name: str, version: Optional[str], label: Optional[str]) -> None:
        spec.name = unquote(name)
        if version is not None:
            number = int(version)
            if number > INT64_MAX:
                raise errors.invalid_argument(f"version {version} is not a valid int64")
            spec.version.value = number
        elif label is not None:
            spec.version_label = unquote(label)

    @staticmethod
    def _signature_name(doc: dict) -> str:
        name = doc.get("signature_name", "")
        if not isinstance(name, str):
            raise errors.invalid_argument("'signature_name' must be a string")
        return name

    def handle(self, method: str, target: str, body: bytes) -> Tuple[int, dict]:
        path = urlsplit(target).path
        try:
            with self.gate.enter():
                return 200, self._route(method, path, body)
        except Exception as exc:
            err = errors.from_exception(exc)
            if err.code == grpc.StatusCode.INTERNAL:
                log.exception("REST %s %s failed", method, path)
            elif not self.gate.closed:
                log.info("REST %s %s rejected: %s", method, path, err)
            return errors.http_status(err), {"error": err.message}

    def _route(self, method: str, path: str, body: bytes) -> dict:
        from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                             get_model_status_pb2, predict_pb2, regression_pb2)

        from serving.model_server.server import SIGNATURE_DEF_METADATA

        match = PREDICTION_PATH.fullmatch(path) if method == "POST" else None
        if match:
            name, version, label, verb = match.groups()
            doc = parse_json_object(body)
            if verb.lower() == "predict":
                request = predict_pb2.PredictRequest()
                self._model_spec(request.model_spec, name, version, label)
                request.model_spec.signature_name = self._signature_name(doc)
                row_format = []

                def fill(signature, req):
                    row_format.append(fill_predict_inputs(doc, signature, req))

                response = self.api.predict(request, fill_inputs=fill)
                return predict_json(response, row_format[0])
            request = classification_pb2.ClassificationRequest() if verb.lower() == "classify" \
                else regression_pb2.RegressionRequest()
            self._model_spec(request.model_spec, name, version, label)
            request.model_spec.signature_name = self._signature_name(doc)
            fill_example_input(doc, request.input)
            if verb.lower() == "classify":
                return classify_json(self.api.classify(request))
            return regress_json(self.api.regress(request))
        match = MODEL_PATH.fullmatch(path) if method == "GET" else None
        if match:
            name, version, label, metadata = match.groups()
            if metadata:
                request = get_model_metadata_pb2.GetModelMetadataRequest()
                self._model_spec(request.model_spec, name, version, label)
                request.metadata_field.append(SIGNATURE_DEF_METADATA)
                return metadata_json(self.api.get_model_metadata(request))
            request = get_model_status_pb2.GetModelStatusRequest()
            self._model_spec(request.model_spec, name, version, label)
            return _message_json(self.api.get_model_status(request))
        if not path.lower().startswith("/v1/"):
            raise errors.not_found(f"no such path: {path}; the API lives under /v1/models/")
        raise errors.invalid_argument(f"Malformed request: {method} {path}")


# ---- HTTP server --------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connection
    timeout = IDLE_TIMEOUT_SECONDS
    server: "RestServer"

    def _dispatch(self, method: str) -> None:
        body = b""
        if method == "POST" or self.headers.get("Content-Length") is not None:
            body = self._read_body()  # read even when unused: the next request follows it
            if body is None:
                return
        status, doc = self.server.rest.handle(method, self.path, body)
        self._send(status, doc)

    def _read_body(self) -> Optional[bytes]:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            self._send(411, {"error": "a POST needs a Content-Length header (chunked bodies "
                                      "are not accepted)"})
            return None
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._send(400, {"error": f"invalid Content-Length {length!r}"})
            return None
        if size > self.server.max_body_bytes:
            self.close_connection = True  # the body is never read
            self._send(413, {"error": f"request body of {size} bytes is larger than the server's "
                                      f"limit of {self.server.max_body_bytes} bytes "
                                      "(--rest-api-max-body-bytes)"})
            return None
        body = self.rfile.read(size)
        if len(body) != size:
            self.close_connection = True
            return None
        return body

    def _send(self, status: int, doc: dict) -> None:
        payload = json.dumps(doc).encode("utf-8")
        if self.server.rest.gate.closed:
            self.close_connection = True  # draining: the client should reconnect elsewhere
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        log.debug("%s %s", self.address_string(), format % args)


_BUSY_BODY = json.dumps({"error": "too many open connections; retry later"}).encode()
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(_BUSY_BODY)
                 + _BUSY_BODY)


class RestServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on concurrent connections and a clean stop.

    A thread serves each connection; beyond `max_connections` a new connection gets 503 at
    once. `stop()` stops accepting and shuts the open connections down (after the drain, only
    idle keep-alive connections are left)."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: bursts of new connections wait, not fail

    def __init__(self, address: Tuple[str, int], rest: RestApi, max_connections: int,
                 max_body_bytes: int):
        self.rest = rest
        self.max_body_bytes = max_body_bytes
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set = set()
        self._open_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        super().__init__(address, _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request) -> None:
        with self._open_lock:
            if request not in self._open:
                return
            self._open.discard(request)
        self._slots.release()

    def handle_error(self, request, client_address):  # a broken connection is not a crash
        log.debug("REST connection from %s ended with an error", client_address, exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="rest-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(10)
        self.server_close()
        with self._open_lock:
            open_connections = list(self._open)
        for connection in open_connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
