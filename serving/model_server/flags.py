"""Command-line flags of the model server and their defaults.

Kept apart from server.py and free of heavy imports (gRPC, NumPy, TensorFlow) so that
`python -m serving.model_server --help` answers at once; the server modules are imported only
after the arguments parsed.
"""
from __future__ import annotations

import argparse

from common import tf_serving_protocol as P

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_REQUEST_ELEMENTS = 50_000_000
DEFAULT_MAX_BATCH_ROWS = 100_000
# A TensorProto may hold fewer values than its shape declares (TF repeats the last one); the
# expansion is what lets a tiny message claim a huge tensor, so it gets its own small budget.
DEFAULT_MAX_BROADCAST_BYTES = 1024 * 1024
DEFAULT_LAME_DUCK_SECONDS = 1.5
# JSON takes up to ~25x its size once parsed (a Python object per value), so REST bodies get a
# smaller limit than gRPC messages.
DEFAULT_REST_API_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_REST_API_CONNECTIONS = 64


def _bounded(cast, low: float, what: str):
    """An argparse type: `cast` of the text, refused below `low` at parse time (before the
    server imports TensorFlow and gRPC, so a typo costs no start-up)."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= low:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be >= {low:g}; got {text}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


NON_NEGATIVE_INT = _bounded(int, 0, "an integer")
POSITIVE_INT = _bounded(int, 1, "an integer")
NON_NEGATIVE_SECONDS = _bounded(float, 0.0, "a number of seconds")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.model_server",
        description="Serve SavedModels over TensorFlow Serving's gRPC API (PredictionService, "
                    "ModelService, grpc health) and its JSON REST API. Versions are the numeric "
                    "folders under the model base path; new ones are picked up while serving.",
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
    g.add_argument("--file-system-poll-wait-seconds", type=NON_NEGATIVE_SECONDS, default=1.0,
                   help="how often to look for new/removed versions; 0 = load once at start")
    g.add_argument("--no-warmup", action="store_true",
                   help="do not replay assets.extra/tf_serving_warmup_requests on load")
    g.add_argument("--serve-before-models-load", action="store_true",
                   help="open the port at once (health NOT_SERVING until the models load); by "
                        "default, as in TF Serving, the port opens once every configured model "
                        "has an AVAILABLE version")
    g = p.add_argument_group("model config reloads (ModelService.HandleReloadConfigRequest)")
    g.add_argument("--disable-model-config-reload", action="store_true",
                   help="refuse every HandleReloadConfigRequest (PERMISSION_DENIED)")
    g.add_argument("--reload-allowed-roots", default="",
                   help="comma-separated folders a reloaded base_path may lie in, besides the "
                        "base paths configured at start")
    g.add_argument("--allow-empty-model-config-reload", action="store_true",
                   help="accept a reload with an empty model_config_list (unloads every model)")
    g = p.add_argument_group("batching")
    g.add_argument("--enable-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="merge concurrent requests along dimension 0; --no-enable-batching "
                        "runs every request on its own")
    g.add_argument("--batching-parameters-file",
                   help="BatchingParameters text file (max_batch_size, batch_timeout_micros, "
                        "max_enqueued_batches, num_batch_threads, allowed_batch_sizes)")
    g.add_argument("--close-batches-early", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="run a forming batch at once when no other request for its signature "
                        "is being decoded (nobody could join it) instead of waiting out "
                        "batch_timeout_micros; stock TF Serving always waits")
    g = p.add_argument_group("network and limits")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    g.add_argument("--port", type=NON_NEGATIVE_INT, default=P.DEFAULT_GRPC_PORT,
                   help="gRPC port (0 = any free port)")
    g.add_argument("--rest-api-port", type=NON_NEGATIVE_INT, default=P.DEFAULT_REST_PORT,
                   help="port of TF Serving's JSON REST API (/v1/models/...); 0 disables it")
    g.add_argument("--rest-api-num-threads", type=POSITIVE_INT,
                   default=DEFAULT_REST_API_CONNECTIONS,
                   help="REST connections served at once (one thread each); more get 503")
    g.add_argument("--rest-api-max-body-bytes", type=POSITIVE_INT,
                   default=DEFAULT_REST_API_MAX_BODY_BYTES,
                   help="largest REST request body (413 above); parsed JSON takes up to ~25x "
                        "this, so it is smaller than the gRPC message limit")
    g.add_argument("--grpc-max-message-bytes", type=POSITIVE_INT, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest request/response message; larger ones get RESOURCE_EXHAUSTED. "
                        "A request's decoded tensors may take at most twice this")
    g.add_argument("--max-request-elements", type=POSITIVE_INT,
                   default=DEFAULT_MAX_REQUEST_ELEMENTS,
                   help="largest total number of tensor elements one request declares "
                        "(INVALID_ARGUMENT above)")
    g.add_argument("--max-batch-rows", type=POSITIVE_INT, default=DEFAULT_MAX_BATCH_ROWS,
                   help="largest dimension 0 / number of examples in one request")
    g.add_argument("--max-broadcast-bytes", type=POSITIVE_INT, default=DEFAULT_MAX_BROADCAST_BYTES,
                   help="largest expansion of a TensorProto that holds fewer values than its "
                        "shape declares (the last value repeated)")
    g.add_argument("--allow-non-finite-inputs", action="store_true",
                   help="pass NaN/Inf float inputs to the model instead of rejecting them")
    g.add_argument("--allow-non-finite-outputs", action="store_true",
                   help="return NaN/Inf model outputs instead of INVALID_ARGUMENT")
    g.add_argument("--grpc-threads", type=POSITIVE_INT, default=64,
                   help="RPC worker threads (more than 2 x max_batch_size helps batching)")
    g.add_argument("--tensorflow-intra-op-parallelism", type=NON_NEGATIVE_INT, default=0,
                   help="threads one TensorFlow op may use (0 = TensorFlow's choice, as in "
                        "tensorflow_model_server). On a few cores with many small requests, 1 "
                        "is faster: concurrency then comes from requests (docs/BENCHMARKS.md)")
    g.add_argument("--tensorflow-inter-op-parallelism", type=NON_NEGATIVE_INT, default=0,
                   help="ops TensorFlow may run at once (0 = TensorFlow's choice)")
    g = p.add_argument_group("shutdown")
    g.add_argument("--lame-duck-seconds", type=NON_NEGATIVE_SECONDS,
                   default=DEFAULT_LAME_DUCK_SECONDS,
                   help="on SIGTERM, how long health says NOT_SERVING while requests are still "
                        "served (load balancers move away) before the drain starts")
    g.add_argument("--drain-seconds", type=NON_NEGATIVE_SECONDS, default=30.0,
                   help="on SIGTERM, how long in-flight requests may take to finish")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return p
