"""TF Serving warmup file: real requests replayed by the server before it marks a version ready.

`<version>/assets.extra/tf_serving_warmup_requests` is a TFRecord of
`tensorflow_serving.apis.prediction_log_pb2.PredictionLog` (TF Serving reads at most 1000).
Each sample request of the test split contributes one record per way a caller reaches the
model, so every signature's kernels are loaded and its graphs compiled before live traffic:

* Predict on `rank_listwise` (dense request with its candidates),
* Predict on `serving_default` (one serialized Example per candidate),
* Classify on `classify_<first binary task>` and Regress on `regress_score` with an
  ExampleListWithContext (query and sequences once, candidates as the list),
* MultiInference over every classify/regress signature with the same input (on data with watch
  time this includes `regress_watch_time`, the expected play time).

`read_warmup` parses the file back and `warmup_calls` turns each record into the signature
calls TF Serving would make (contexts merged into every example), for replay and tests.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from common import features as F
from common import tf_serving_protocol as P
from serving import signatures as S

WARMUP_DIR, WARMUP_FILE = P.WARMUP_DIR, P.WARMUP_FILE
MAX_WARMUP_RECORDS = P.MAX_WARMUP_RECORDS  # TF Serving ignores records beyond this
RECORDS_PER_REQUEST = 5


def warmup_path(export_dir: str) -> str:
    return os.path.join(export_dir, WARMUP_DIR, WARMUP_FILE)


def read_sample_requests(data_dir: str, count: int, split: str = "test") -> List[bytes]:
    """Up to `count` serialized request examples of `split` that have at least one candidate.

    Raises FileNotFoundError naming the pattern when the split has no files, ValueError when
    it has no usable request. Requests without candidates are skipped (a list of zero examples
    is not a valid Classify request).
    """
    import tensorflow as tf

    pattern = F.tfrecord_pattern(data_dir, split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {split} TFRecords match {pattern}: warmup samples come from "
                                f"the preprocessing output (or export with --warmup-requests 0)")
    samples: List[bytes] = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        raw = record.numpy()
        ex = tf.train.Example.FromString(raw)
        if ex.features.feature[F.CANDIDATE_ITEM].int64_list.value:
            samples.append(raw)
        if len(samples) >= count:
            break
    if not samples:
        raise ValueError(f"{pattern} holds no request with a candidate to warm up with")
    return samples


def _model_spec(request, model_name: str, signature: str) -> None:
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature


def _example_list_with_context(target, context, candidates) -> None:
    target.example_list_with_context.context.CopyFrom(context)
    for c in candidates:
        target.example_list_with_context.examples.add().CopyFrom(c)


def build_warmup_logs(serialized_requests: Sequence[bytes], metadata: F.DatasetMetadata,
                      model_name: str) -> List:
    """PredictionLog records for the sample requests (RECORDS_PER_REQUEST each)."""
    import tensorflow as tf
    from tensorflow_serving.apis import (classification_pb2, inference_pb2, predict_pb2,
                                         prediction_log_pb2, regression_pb2)

    if len(serialized_requests) * RECORDS_PER_REQUEST > MAX_WARMUP_RECORDS:
        raise ValueError(f"{len(serialized_requests)} sample requests make more than "
                         f"{MAX_WARMUP_RECORDS} warmup records, which TF Serving ignores")
    tasks = list(metadata.tasks)
    logs = []
    for raw in serialized_requests:
        request = S.request_from_example(raw)
        dense = S.listwise_inputs([request], metadata)
        listwise = predict_pb2.PredictRequest()
        _model_spec(listwise, model_name, S.RANK_LISTWISE)
        for key, value in dense.items():
            listwise.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        logs.append(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=listwise)))

        per_candidate = S.per_candidate_examples(raw, metadata)
        predict = predict_pb2.PredictRequest()
        _model_spec(predict, model_name, S.SERVING_DEFAULT)
        predict.inputs[S.INPUTS].CopyFrom(
            tf.make_tensor_proto(np.asarray(per_candidate, dtype=object), dtype=tf.string))
        logs.append(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=predict)))

        context, candidates = S.split_request_example(raw, metadata)
        classify = classification_pb2.ClassificationRequest()
        _model_spec(classify, model_name, S.classify_signature(S.classify_tasks(tasks)[0]))
        _example_list_with_context(classify.input, context, candidates)
        logs.append(prediction_log_pb2.PredictionLog(
            classify_log=prediction_log_pb2.ClassifyLog(request=classify)))

        regress = regression_pb2.RegressionRequest()
        _model_spec(regress, model_name, S.regress_signature(S.SCORE))
        _example_list_with_context(regress.input, context, candidates)
        logs.append(prediction_log_pb2.PredictionLog(
            regress_log=prediction_log_pb2.RegressLog(request=regress)))

        multi = inference_pb2.MultiInferenceRequest()
        for name in S.example_signature_names(tasks):
            method = S.signature_methods(tasks)[name]
            if method == S.PREDICT_METHOD:
                continue
            task = multi.tasks.add()
            _model_spec(task, model_name, name)
            task.method_name = method
        _example_list_with_context(multi.input, context, candidates)
        logs.append(prediction_log_pb2.PredictionLog(
            multi_inference_log=prediction_log_pb2.MultiInferenceLog(request=multi)))
    return logs


def write_warmup(export_dir: str, logs: Sequence) -> str:
    """Writes the records to `<export_dir>/assets.extra/tf_serving_warmup_requests`."""
    import tensorflow as tf

    if len(logs) > MAX_WARMUP_RECORDS:
        raise ValueError(f"{len(logs)} warmup records; TF Serving reads at most "
                         f"{MAX_WARMUP_RECORDS}")
    path = warmup_path(export_dir)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    return path


def read_warmup(export_dir_or_file: str) -> List:
    """Parses every record of a warmup file as PredictionLog (raises on a malformed record)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = export_dir_or_file
    if tf.io.gfile.isdir(path):
        path = warmup_path(path)
    logs = []
    for k, record in enumerate(tf.data.TFRecordDataset([path])):
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(record.numpy())
        except Exception as e:  # DecodeError: name the record
            raise ValueError(f"{path}: record {k} is not a PredictionLog: {e}") from e
        if log.WhichOneof("log_type") is None:
            raise ValueError(f"{path}: record {k} is an empty PredictionLog")
        logs.append(log)
    return logs


def input_examples(inp) -> List[bytes]:
    """Serialized examples TF Serving feeds for a tensorflow_serving.apis Input message."""
    kind = inp.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in inp.example_list.examples]
    if kind == "example_list_with_context":
        ctx = inp.example_list_with_context.context
        return [S.merge_context(ctx, e).SerializeToString()
                for e in inp.example_list_with_context.examples]
    raise ValueError(f"Input has no examples (kind {kind!r})")


def warmup_calls(logs: Iterable) -> List[Tuple[str, Dict[str, np.ndarray]]]:
    """(signature name, {input key: ndarray}) of every signature call the logs make."""
    import tensorflow as tf

    calls = []
    for log in logs:
        kind = log.WhichOneof("log_type")
        if kind == "predict_log":
            req = log.predict_log.request
            calls.append((req.model_spec.signature_name or S.SERVING_DEFAULT,
                          {k: tf.make_ndarray(v) for k, v in req.inputs.items()}))
        elif kind in ("classify_log", "regress_log"):
            req = getattr(log, kind).request
            examples = np.asarray(input_examples(req.input), dtype=object)
            calls.append((req.model_spec.signature_name or S.SERVING_DEFAULT,
                          {S.INPUTS: examples}))
        elif kind == "multi_inference_log":
            req = log.multi_inference_log.request
            examples = np.asarray(input_examples(req.input), dtype=object)
            for task in req.tasks:
                calls.append((task.model_spec.signature_name, {S.INPUTS: examples}))
        else:
            raise ValueError(f"unsupported warmup record type {kind!r}")
    return calls
