"""Server-side batching of concurrent requests, configured like TF Serving.

`BatchingParameters` is TF Serving's proto (tensorflow.serving.BatchingParameters from
session_bundle_config.proto, same full name and field numbers). tensorflow-serving-api does not
ship that file, so the descriptor is built here; `parse_batching_parameters` reads exactly the
text format that `tensorflow_model_server --batching_parameters_file` reads.

`Batcher` is one queue per (model, version, signature), like TF Serving's per-signature batching
session: a request (a dict of NumPy arrays that share dimension 0) waits at most
`batch_timeout_micros` for peers; tasks whose inputs have the same names, dtypes and shapes
beyond dimension 0 are concatenated along dimension 0 up to `max_batch_size`, run once, and the
outputs are split back by each task's row count. Incompatible tasks are never merged: they wait
for the next batch. When `allowed_batch_sizes` is set the batch is padded up to the next allowed
size by repeating its first row (as TF Serving does) and the padding is cut off the outputs.
`pad_variable_length_inputs` is not supported (tasks with different inner shapes run in separate
batches instead), and a task larger than `max_batch_size` runs alone rather than being split.

`close_batches_early` (server flag --close-batches-early, not part of TF Serving's proto) runs
a forming batch at once when no other request for the same queue is being decoded: requests
announce themselves (`arrival`) when they start decoding, so under load batches still fill,
while a lone request no longer waits out batch_timeout_micros for peers that are not coming.
Stock TF Serving always waits the timeout; that is the default here too.

Requests are validated against the signature before they join a queue (serving.model_server.
server), and a merged batch that still fails (e.g. one request's tf.Example misses a feature
the model parses) is split in halves and re-run until the failing requests are alone, so one bad
request never fails its neighbours. The queue holds at most `max_enqueued_batches` batches worth
of rows; beyond that a request is refused at once with UNAVAILABLE, as TF Serving does.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np

from serving.model_server import errors

log = logging.getLogger(__name__)

_PROTO_FILE = "tensorflow_serving/servables/tensorflow/session_bundle_config.proto"


def _build_batching_parameters_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, wrappers_pb2
    from google.protobuf import message_factory

    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    except KeyError:
        fdp = descriptor_pb2.FileDescriptorProto(
            name=_PROTO_FILE, package="tensorflow.serving", syntax="proto3",
            dependency=["google/protobuf/wrappers.proto"])
        msg = fdp.message_type.add(name="BatchingParameters")
        F = descriptor_pb2.FieldDescriptorProto
        wrapped = (("max_batch_size", 1, ".google.protobuf.Int64Value"),
                   ("batch_timeout_micros", 2, ".google.protobuf.Int64Value"),
                   ("max_enqueued_batches", 3, ".google.protobuf.Int64Value"),
                   ("num_batch_threads", 4, ".google.protobuf.Int64Value"),
                   ("thread_pool_name", 5, ".google.protobuf.StringValue"))
        for name, number, type_name in wrapped:
            msg.field.add(name=name, number=number, type=F.TYPE_MESSAGE, type_name=type_name,
                          label=F.LABEL_OPTIONAL, json_name=name)
        msg.field.add(name="allowed_batch_sizes", number=6, type=F.TYPE_INT64,
                      label=F.LABEL_REPEATED)
        msg.field.add(name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL,
                      label=F.LABEL_OPTIONAL)
        _ = wrappers_pb2  # the dependency must be in the pool first
        pool.Add(fdp)
        descriptor = pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    return message_factory.GetMessageClass(descriptor)


BatchingParameters = _build_batching_parameters_class()

# TF Serving's defaults when a field is omitted (see batching_session / shared_batch_scheduler).
DEFAULT_MAX_BATCH_SIZE = 1000
DEFAULT_BATCH_TIMEOUT_MICROS = 0
DEFAULT_MAX_ENQUEUED_BATCHES = 100
DEFAULT_NUM_BATCH_THREADS = 4


class BatchingOptions:
    """Resolved batching settings (defaults filled in, validated)."""

    def __init__(self, max_batch_size=DEFAULT_MAX_BATCH_SIZE,
                 batch_timeout_micros=DEFAULT_BATCH_TIMEOUT_MICROS,
                 max_enqueued_batches=DEFAULT_MAX_ENQUEUED_BATCHES,
                 num_batch_threads=DEFAULT_NUM_BATCH_THREADS, allowed_batch_sizes=(),
                 close_batches_early=False):
        self.max_batch_size = int(max_batch_size)
        self.close_batches_early = bool(close_batches_early)
        self.batch_timeout_micros = int(batch_timeout_micros)
        self.max_enqueued_batches = int(max_enqueued_batches)
        self.num_batch_threads = int(num_batch_threads)
        self.allowed_batch_sizes = [int(s) for s in allowed_batch_sizes]
        if self.max_batch_size < 1 or self.num_batch_threads < 1 or self.max_enqueued_batches < 1:
            raise ValueError("max_batch_size, num_batch_threads and max_enqueued_batches must "
                             "be >= 1")
        if self.batch_timeout_micros < 0:
            raise ValueError("batch_timeout_micros must be >= 0")
        sizes = self.allowed_batch_sizes
        if sizes and (sorted(set(sizes)) != sizes or sizes[-1] != self.max_batch_size):
            raise ValueError("allowed_batch_sizes must be strictly increasing and end with "
                             f"max_batch_size={self.max_batch_size}; got {sizes}")

    @classmethod
    def from_proto(cls, p, close_batches_early=False) -> "BatchingOptions":
        if p.pad_variable_length_inputs:
            log.warning("pad_variable_length_inputs is not supported: requests whose inner "
                        "shapes differ run in separate batches")
        return cls(
            max_batch_size=p.max_batch_size.value if p.HasField("max_batch_size")
            else DEFAULT_MAX_BATCH_SIZE,
            batch_timeout_micros=p.batch_timeout_micros.value
            if p.HasField("batch_timeout_micros") else DEFAULT_BATCH_TIMEOUT_MICROS,
            max_enqueued_batches=p.max_enqueued_batches.value
            if p.HasField("max_enqueued_batches") else DEFAULT_MAX_ENQUEUED_BATCHES,
            num_batch_threads=p.num_batch_threads.value if p.HasField("num_batch_threads")
            else DEFAULT_NUM_BATCH_THREADS,
            allowed_batch_sizes=list(p.allowed_batch_sizes),
            close_batches_early=close_batches_early)

    def __repr__(self):
        return (f"BatchingOptions(max_batch_size={self.max_batch_size}, batch_timeout_micros="
                f"{self.batch_timeout_micros}, max_enqueued_batches={self.max_enqueued_batches},"
                f" num_batch_threads={self.num_batch_threads}, allowed_batch_sizes="
                f"{self.allowed_batch_sizes}, close_batches_early={self.close_batches_early})")


def parse_batching_parameters(text: str):
    """Parses BatchingParameters text format; raises ValueError naming the bad field/line."""
    from google.protobuf import text_format

    message = BatchingParameters()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ValueError(f"invalid BatchingParameters text format: {exc}") from exc
    return message


def load_batching_options(path: Optional[str], close_batches_early=False) -> BatchingOptions:
    if not path:
        return BatchingOptions(close_batches_early=close_batches_early)
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        return BatchingOptions.from_proto(parse_batching_parameters(text), close_batches_early)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _signature_of(inputs: Mapping[str, np.ndarray]):
    """What must agree for two tasks to share a batch: names, dtypes, shapes beyond dim 0."""
    return tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))


class _Task:
    __slots__ = ("inputs", "rows", "key", "future", "enqueued", "cost")

    def __init__(self, inputs, rows, key, cost):
        self.inputs, self.rows, self.key = inputs, rows, key
        self.future: Future = Future()
        self.enqueued = time.monotonic()
        self.cost = cost  # queue capacity (in rows) the task takes until a batch thread has it


class Batcher:
    """Merges concurrent calls of one function along dimension 0 (see module docstring).

    `run` takes a dict of arrays with a common dimension 0 and returns a dict of arrays whose
    dimension 0 is the total row count. Counters (`batches_run`, `tasks_run`, `batches_split`
    after a failure, `tasks_refused` for a full queue) are kept for monitoring and tests.
    """

    def __init__(self, run: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]],
                 options: BatchingOptions, name: str = "batcher"):
        self._run = run
        self.options = options
        self.name = name
        self._queue: "collections.deque[_Task]" = collections.deque()
        self._queued_rows = 0
        self._arriving = 0  # requests between `arrival()` and `submit()` (decoding inputs)
        self._arrival_of_thread = threading.local()
        self._cv = threading.Condition()
        self._closed = False
        # One batch is open (being filled) at a time, as in TF Serving's batch scheduler;
        # the other threads run batches that are already closed.
        self._forming = threading.Lock()
        self.batches_run = 0
        self.tasks_run = 0
        self.batches_split = 0
        self.tasks_refused = 0
        self.rows_run = 0  # rows of the merged batches, padding included
        self.rows_padded = 0
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for t in self._threads:
            t.start()

    # ---- client side ----------------------------------------------------------------------
    @contextlib.contextmanager
    def arrival(self):
        """Announces a request that will `submit` from this thread (it is decoding its inputs).
        With `close_batches_early`, a forming batch waits for its peers only while some are
        announced: when nobody could join, it runs at once instead of waiting out
        batch_timeout_micros (a lone request pays no batching delay)."""
        with self._cv:
            self._arriving += 1
        self._arrival_of_thread.open = True
        try:
            yield
        finally:
            if getattr(self._arrival_of_thread, "open", False):
                self._arrival_of_thread.open = False
                with self._cv:
                    self._arriving -= 1
                    self._cv.notify_all()

    def submit(self, inputs: Dict[str, np.ndarray]) -> Future:
        rows = {int(v.shape[0]) if v.ndim else -1 for v in inputs.values()}
        if len(rows) != 1 or -1 in rows:
            # Not batchable (scalars or disagreeing dimension 0): runs alone, never merged.
            rows_count, key = None, ("unbatchable", id(inputs))
        else:
            rows_count, key = rows.pop(), _signature_of(inputs)
        size = self.options.max_batch_size
        # Queue capacity a task takes: its rows rounded up to whole batches when it runs alone.
        cost = size if rows_count is None else \
            (rows_count if rows_count < size else -(-rows_count // size) * size)
        task = _Task(inputs, rows_count, key, cost)
        capacity = self.options.max_enqueued_batches * size
        with self._cv:
            if self._closed:
                raise errors.unavailable(f"{self.name} is shutting down")
            if self._queue and self._queued_rows + cost > capacity:
                self.tasks_refused += 1
                raise errors.unavailable(
                    f"batching queue of {self.name} is full ({len(self._queue)} requests, "
                    f"{self._queued_rows} rows waiting; max_enqueued_batches="
                    f"{self.options.max_enqueued_batches} x max_batch_size={size}); retry later")
            self._queue.append(task)
            self._queued_rows += cost
            if getattr(self._arrival_of_thread, "open", False):
                self._arrival_of_thread.open = False
                self._arriving -= 1
            self._cv.notify_all()
        return task.future

    def __call__(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return self.submit(inputs).result()

    def close(self, timeout: float = 10.0) -> None:
        """Stops accepting tasks, runs the queued ones, joins the threads."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self.batches_run:
            log.info("%s: %d requests in %d batches (%.1f per batch), %d of %d rows padding, "
                     "%d batches split after a failure, %d requests refused (queue full)",
                     self.name, self.tasks_run, self.batches_run,
                     self.tasks_run / self.batches_run, self.rows_padded, self.rows_run,
                     self.batches_split, self.tasks_refused)

    # ---- batch threads --------------------------------------------------------------------
    def _take_batch(self) -> Optional[List[_Task]]:
        with self._forming:
            return self._form_batch()

    def _form_batch(self) -> Optional[List[_Task]]:
        timeout = self.options.batch_timeout_micros / 1e6
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait(0.5)
            first = self._queue.popleft()
            self._queued_rows -= first.cost
            batch, rows = [first], first.rows
            if first.rows is None or first.rows >= self.options.max_batch_size:
                return batch
            deadline = first.enqueued + timeout
            while True:
                # Take every compatible queued task that fits; leave the others in order.
                kept = collections.deque()
                while self._queue:
                    task = self._queue.popleft()
                    if (task.key == first.key and
                            rows + task.rows <= self.options.max_batch_size):
                        batch.append(task)
                        rows += task.rows
                        self._queued_rows -= task.cost
                    else:
                        kept.append(task)
                self._queue.extendleft(reversed(kept))
                remaining = deadline - time.monotonic()
                if rows >= self.options.max_batch_size or remaining <= 0 or self._closed:
                    return batch
                if self.options.close_batches_early and not self._arriving:
                    return batch  # nobody is on the way to join this batch
                self._cv.wait(remaining)

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._execute(batch)

    def _execute(self, batch: List[_Task]) -> None:
        try:
            results = self._run_batch(batch)
        except Exception as exc:
            if len(batch) > 1:
                # Someone in the batch made it fail: re-run the halves so that only the
                # requests that fail on their own get the error.
                with self._cv:
                    self.batches_split += 1
                log.info("%s: a batch of %d requests failed (%s); re-running its halves",
                         self.name, len(batch), exc)
                middle = len(batch) // 2
                self._execute(batch[:middle])
                self._execute(batch[middle:])
            else:
                batch[0].future.set_exception(exc)
            return
        except BaseException as exc:  # every waiting request gets the error, the thread lives
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(exc)
            return
        for task, outputs in zip(batch, results):
            task.future.set_result(outputs)

    def _run_batch(self, batch: List[_Task]) -> List[Dict[str, np.ndarray]]:
        """Runs the tasks as one merged call; the outputs of each task, in order."""
        if len(batch) == 1 and (batch[0].rows is None or not self.options.allowed_batch_sizes):
            outputs = self._run(batch[0].inputs)
            self._count(1, batch[0].rows or 0, 0)
            return [outputs]
        sizes = [t.rows for t in batch]
        total = sum(sizes)
        padded = total
        if self.options.allowed_batch_sizes and batch[0].rows is not None:
            padded = next((s for s in self.options.allowed_batch_sizes if s >= total), total)
        merged = {}
        for name in batch[0].inputs:
            parts = [t.inputs[name] for t in batch]
            if padded > total:
                parts.append(np.repeat(parts[0][:1], padded - total, axis=0))
            merged[name] = np.concatenate(parts, axis=0)
        outputs = self._run(merged)
        self._count(len(batch), padded, padded - total)
        bad = [k for k, v in outputs.items() if np.ndim(v) == 0 or v.shape[0] != padded]
        if bad:
            raise errors.internal(
                f"outputs {bad} of a batched signature do not have the batch size {padded} "
                "as dimension 0; disable batching for this model")
        results, start = [], 0
        for size in sizes:
            results.append({k: v[start:start + size] for k, v in outputs.items()})
            start += size
        return results

    def _count(self, tasks: int, rows: int, padding: int) -> None:
        with self._cv:
            self.batches_run += 1
            self.tasks_run += tasks
            self.rows_run += rows
            self.rows_padded += padding
