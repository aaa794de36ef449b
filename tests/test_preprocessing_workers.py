"""Two local worker processes (multi_processing on the in-process runner) write exactly the
examples, dead letters and statistics of one worker."""
import glob
import json
import os

import tensorflow as tf

from preprocessing import pipeline as P
from tests.preprocessing_canonical_files import write_canonical
from tests.test_preprocessing_end_to_end import adversarial_tables


def _records(out, split):
    files = sorted(glob.glob(os.path.join(out, split, "*.tfrecord.gz")))
    return sorted(r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def _dead_letters(out):
    lines = []
    for path in glob.glob(os.path.join(out, "dead_letter", "*.jsonl")):
        with open(path) as f:
            lines += f.read().splitlines()
    return sorted(lines)


def test_two_workers_write_the_same_examples_as_one(tmp_path):
    raw = write_canonical(str(tmp_path / "raw"), adversarial_tables(seed=5))
    outputs = {}
    for workers in (1, 2):
        out = str(tmp_path / f"out{workers}")
        stats = P.run(["--input-format", "canonical", "--input", raw, "--output", out,
                       "--long-term-length", "5", "--real-time-length", "2",
                       "--num-shards", "2", "--workers", str(workers)],
                      progress=lambda m: None)
        outputs[workers] = (out, stats)
    (one, s1), (two, s2) = outputs[1], outputs[2]
    total = 0
    for split in ("train", "eval", "test"):
        assert len(glob.glob(os.path.join(two, split, "*.tfrecord.gz"))) == 2
        a, b = _records(one, split), _records(two, split)
        assert a == b
        total += len(a)
    assert total == s1["examples"] > 10
    assert _dead_letters(one) == _dead_letters(two) and _dead_letters(one)
    for key in ("examples_by_split", "dead_letters", "sequence_length", "behaviours",
                "candidates"):
        assert s1[key] == s2[key]
    with open(os.path.join(one, "metadata.json")) as f1, \
            open(os.path.join(two, "metadata.json")) as f2:
        assert json.load(f1) == json.load(f2)
    for name in ("items", "users", "authors", "categories"):
        with open(os.path.join(one, "vocab", f"{name}.txt")) as f1, \
                open(os.path.join(two, "vocab", f"{name}.txt")) as f2:
            assert f1.read() == f2.read()
