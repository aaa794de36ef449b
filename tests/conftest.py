"""Test-wide setup: the project switches TensorFlow to tf-keras before anything imports TF."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small preprocessed dataset (TFRecords + metadata + assets) written straight from the
    feature spec, for model, trainer and serving tests that must not depend on Beam."""
    from tests.tiny_dataset import write_tiny_dataset

    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny_dataset")))
