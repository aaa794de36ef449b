"""Small SavedModels with predict, classify and regress signatures for the server tests.

`serving_default`  x float32 [B, 4], ids int64 [B] -> y [B] (x . w), ids_times_two [B],
                   version [B] (the constant version the model was exported with) and
                   call_id [B] (a counter incremented once per graph execution, so a client can
                   see how many executions served its requests: batching merges them).
`classify`         inputs = serialized tf.Example with float feature x [4] ->
                   scores [B, 2] (softmax of [-y, y]), classes [B, 2] ("neg", "pos").
`regress`          inputs = serialized tf.Example -> outputs [B] = y.
`slow`             iterations int64 [B] -> done [B]: busy work for iterations[0] steps
                   (requests that stay in flight for a while).
"""
import os

import numpy as np

WEIGHTS = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)


def export_toy_model(path, version_value=1.0, warmup_requests=None):
    import tensorflow as tf

    class Toy(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(WEIGHTS)
            self.calls = tf.Variable(0, dtype=tf.int64)
            self.version = tf.constant(version_value, tf.float32)

        def _y(self, x):
            return tf.linalg.matvec(x, self.w)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x"),
                                      tf.TensorSpec([None], tf.int64, name="ids")])
        def predict(self, x, ids):
            call = self.calls.assign_add(1)
            b = tf.shape(x)[0]
            return {"y": self._y(x), "ids_times_two": ids * 2,
                    "version": tf.fill([b], self.version), "call_id": tf.fill([b], call)}

        def _parse(self, serialized):
            parsed = tf.io.parse_example(
                serialized, {"x": tf.io.FixedLenFeature([4], tf.float32)})
            return self._y(parsed["x"])

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(self, inputs):
            y = self._parse(inputs)
            scores = tf.nn.softmax(tf.stack([-y, y], axis=1))
            classes = tf.tile(tf.constant([["neg", "pos"]]), [tf.shape(y)[0], 1])
            return {"scores": scores, "classes": classes}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress(self, inputs):
            return {"outputs": self._parse(inputs)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="iterations")])
        def slow(self, iterations):
            m = tf.eye(64) * 0.5

            def body(i, acc):
                return i + 1, tf.matmul(acc, m) + tf.eye(64)

            _, acc = tf.while_loop(lambda i, _: i < iterations[0], body,
                                   [tf.constant(0, tf.int64), tf.eye(64)])
            return {"done": tf.fill(tf.shape(iterations), tf.reduce_sum(acc) * 0.0 + 1.0)}

    toy = Toy()
    tf.saved_model.save(toy, path, signatures={
        "serving_default": toy.predict, "classify": toy.classify, "regress": toy.regress,
        "slow": toy.slow})
    if warmup_requests:
        os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
        with tf.io.TFRecordWriter(os.path.join(path, "assets.extra",
                                               "tf_serving_warmup_requests")) as w:
            for log in warmup_requests:
                w.write(log.SerializeToString())
    return path


def predict_request(model_name, x, ids, signature="serving_default", version=None, label=None):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.asarray(x, np.float32)))
    request.inputs["ids"].CopyFrom(tf.make_tensor_proto(np.asarray(ids, np.int64)))
    return request


def warmup_log(model_name, rows=2):
    from tensorflow_serving.apis import prediction_log_pb2

    request = predict_request(model_name, np.ones((rows, 4)), np.arange(rows))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request))


def example(x):
    from tensorflow.core.example import example_pb2, feature_pb2

    return example_pb2.Example(features=feature_pb2.Features(feature={
        "x": feature_pb2.Feature(float_list=feature_pb2.FloatList(value=list(map(float, x))))}))
