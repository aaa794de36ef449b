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


# The end-to-end files that take minutes, longest first. `make test` runs the suite on two
# pytest-xdist workers, a file per worker at a time (--dist loadfile, in collection order), so
# starting these first keeps one worker from being left with a long file at the end.
LONGEST_FILES_FIRST = (
    "test_readme_commands.py", "test_pipelines.py", "test_export.py", "test_fusion.py",
    "test_evaluate_report.py", "test_trainer.py", "test_signatures.py", "test_client.py",
    "test_distributed_training.py", "test_search.py", "test_evaluate_search.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Moves the longest files to the front, keeping each file's own test order."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
