"""Code shared by preprocessing, trainer and serving.

Importing this package switches TensorFlow to legacy Keras (tf-keras, Keras 2), which
TensorFlow Recommenders 0.7.7 requires. The switch only works before TensorFlow is first
imported, so every entry package (preprocessing, trainer, serving, pipelines) imports
`common` first; users never have to export TF_USE_LEGACY_KERAS themselves.
"""
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ start-up chatter (CUDA probing on a CPU machine) is harmless noise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if "tensorflow" in sys.modules:  # pragma: no cover - depends on import order of the caller
    _tf = sys.modules["tensorflow"]
    _keras_version = getattr(getattr(_tf, "keras", None), "__version__", "2")
    if str(_keras_version).startswith("3"):
        raise ImportError(
            "TensorFlow was imported before the project packages, so it picked Keras 3; "
            "TensorFlow Recommenders needs tf-keras. Import `common` (or any of preprocessing, "
            "trainer, serving) before `tensorflow`, or set TF_USE_LEGACY_KERAS=1."
        )
