"""A model server speaking TensorFlow Serving's gRPC API, kept apart from the model code.

It imports nothing of the QIN model: it serves any SavedModel, as stock TF Serving would.
"""
import common  # noqa: F401  (switches TensorFlow to tf-keras before it loads)
