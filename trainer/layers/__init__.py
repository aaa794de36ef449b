"""Keras layers of the QIN ranking model and its baselines (one unit per module)."""
import common  # noqa: F401  (switches TensorFlow to tf-keras before it loads)
