"""Errors that travel back to clients with TF Serving's status codes.

Every RPC handler in `serving.model_server.server` and every REST request
(`serving.model_server.rest`) catches everything: a `ServingError` keeps its code and message,
a TensorFlow `InvalidArgumentError` raised while running a signature becomes INVALID_ARGUMENT
(that is how a signature rejects NaN with `tf.debugging.check_numerics`), and anything else
becomes INTERNAL. No request can take the server down. REST answers carry the HTTP status TF
Serving maps each code to (`http_status`).
"""
from __future__ import annotations

import grpc


class ServingError(Exception):
    """An error with the gRPC status code TF Serving would use for it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def failed_precondition(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def unimplemented(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNIMPLEMENTED, message)


def resource_exhausted(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def internal(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INTERNAL, message)


def from_exception(exc: BaseException) -> ServingError:
    """Maps any exception raised while serving a request to a ServingError."""
    if isinstance(exc, ServingError):
        return exc
    try:
        import tensorflow as tf

        if isinstance(exc, tf.errors.InvalidArgumentError):
            return invalid_argument(exc.message)
        if isinstance(exc, tf.errors.ResourceExhaustedError):
            return resource_exhausted(exc.message)
        if isinstance(exc, tf.errors.OpError):
            return internal(f"{type(exc).__name__}: {exc.message}")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (ValueError, TypeError)):
        return invalid_argument(str(exc))
    return internal(f"{type(exc).__name__}: {exc}")


def permission_denied(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.PERMISSION_DENIED, message)


# The HTTP status TF Serving's REST API answers for each gRPC code (its http_server.cc).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def http_status(error: ServingError) -> int:
    return HTTP_STATUS.get(error.code, 500)
