"""Helpers shared by the test files: reading a preprocessing output back, sequences and labels
by raw id, a clean subprocess environment, a free loopback port. One copy here instead of one
per test file."""
import glob
import os
import socket
from typing import Dict, List, Tuple

from common import features as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_examples(out_dir: str, batch_size: int = 16
                  ) -> Tuple[F.DatasetMetadata, Dict[str, Tuple[str, Dict]]]:
    """(metadata, {request_id: (split, row)}) of every example a preprocessing run wrote, read
    back with tf.data and `common.features.parse_examples` (rows are NumPy, dense)."""
    import tensorflow as tf

    metadata = F.DatasetMetadata.load(out_dir)
    result = {}
    for split in F.SPLITS:
        files = sorted(glob.glob(os.path.join(out_dir, split, "*.tfrecord.gz")))
        if not files:
            continue
        ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch_size).map(
            lambda s: F.parse_examples(s, metadata))
        for batch in ds.as_numpy_iterator():
            for b in range(batch[F.REQUEST_ID].shape[0]):
                row = {name: value[b] for name, value in batch.items()}
                result[row[F.REQUEST_ID].decode()] = (split, row)
    return metadata, result


def item_vocabulary(out_dir: str) -> List[str]:
    """Raw item id of every index (index 0 = unknown = "")."""
    return [""] + F.read_vocabulary(out_dir, "items")


def long_sequence(row, items: List[str]):
    """The long-term sequence of a parsed row as (raw item, time gap s, source, engagement)."""
    n = int(row[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)])
    field = lambda name: row[F.seq_feature(F.LONG_TERM, name)][:n]  # noqa: E731
    return [(items[int(i)], float(g), int(s), tuple(float(x) for x in e))
            for i, g, s, e in zip(field(F.SEQ_ITEM), field(F.SEQ_TIME_GAP),
                                  field(F.SEQ_SOURCE), field(F.SEQ_ENGAGEMENT))]


def labels(row, items: List[str], task: str) -> Dict[str, float]:
    """{raw candidate item: label} of one task in a parsed row."""
    n = int(row[F.NUM_CANDIDATES])
    return {items[int(i)]: float(v) for i, v in
            zip(row[F.CANDIDATE_ITEM][:n], row[F.label_feature(task)][:n])}


def subprocess_env(**extra: str) -> Dict[str, str]:
    """The environment of a child Python process that imports the project: the repo on the
    path, TensorFlow's startup noise down."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
