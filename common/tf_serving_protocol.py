"""TensorFlow Serving's protocol constants, written once for the export and the model server.

These are fixed by TF Serving itself (tensorflow_serving/apis and the SignatureDef utilities
of TensorFlow): the method names that Classify / Regress check, the input key of example-based
signatures, their output keys, the default signature and the SavedModel tag. The exported
model's own output names (`score`, tasks, RSU outputs) live in `common.features`.
"""
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

DEFAULT_SIGNATURE = "serving_default"  # ModelSpec.signature_name when a request leaves it empty
EXAMPLE_INPUTS = "inputs"  # Classify / Regress / MultiInference feed serialized tf.Examples here
CLASSIFY_SCORES = "scores"
CLASSIFY_CLASSES = "classes"
REGRESS_OUTPUTS = "outputs"

SERVE_TAG = "serve"
SAVED_MODEL_FILE = "saved_model.pb"
FINGERPRINT_FILE = "fingerprint.pb"
# Warmup requests of a version: <version>/assets.extra/tf_serving_warmup_requests (TFRecord of
# PredictionLog, at most 1000 records).
WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000
DEFAULT_GRPC_PORT = 8500
DEFAULT_REST_PORT = 8501
