"""The one place that owns feature names, dtypes and shapes.

Preprocessing writes examples with `make_example`, the trainer and evaluation read them with
`parse_examples`, and serving builds its signatures from the same names. Change a feature here
and every stage follows.

Example layout (one tf.train.Example per search request, candidates as lists)
------------------------------------------------------------------------------
A search request is stored once with all of its shown candidates, so the user's long-term
sequence (up to 1000 behaviours) is not repeated per candidate. The model consumes the same
layout: request-side tensors of shape [B, ...] and candidate tensors of shape [B, N]. A
per-candidate serving example is simply a request example with exactly one candidate.

Conventions
-----------
* Ids are vocabulary indices written by preprocessing (`vocab/*.txt`, line k holds the raw id
  of index k + 1). Index 0 (OOV_INDEX) means unknown / missing.
* Every list carries an explicit length; padding values are never used as masks
  (TF Serving's batching pads with the first element, not zero).
* Sequences are ordered most recent first. Behaviour i of a sequence happened
  `*_time_gap[i]` seconds before the request (always > 0: point in time).
* Categories are NUM_CATEGORY_LEVELS indices per item (coarse to fine), flattened row-major.
* Engagement is ENGAGEMENT_DIM floats per behaviour; what they mean depends on the input
  format and is recorded in metadata.json (`engagement_names`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

OOV_INDEX = 0
NUM_CATEGORY_LEVELS = 2
USER_PROFILE_DIM = 4
ENGAGEMENT_DIM = 4
DEFAULT_EMBEDDING_DIM = 32
DEFAULT_LONG_TERM_LENGTH = 1000
DEFAULT_REAL_TIME_LENGTH = 50
DEFAULT_MAX_CANDIDATES = 200
MAX_QUERY_TOKENS = 16
DEFAULT_QUERY_TOKEN_BUCKETS = 100_000
DEFAULT_PROFILE_BUCKETS = 1_000

SOURCE_UNKNOWN, SOURCE_FEED, SOURCE_SEARCH = 0, 1, 2
SOURCE_NAMES = {"feed": SOURCE_FEED, "search": SOURCE_SEARCH}

# Engagement meaning per input format (the model only sees ENGAGEMENT_DIM floats).
ENGAGEMENT_NAMES = {
    "canonical": ("watch_ratio", "like", "follow", "share"),
    "kuaisar": ("watch_ratio", "like", "follow", "forward"),
    "jdsearch": ("click", "follow", "cart", "order"),
}
DEFAULT_TASKS = ("click", "long_view", "like")
JDSEARCH_TASKS = ("click", "cart", "purchase")
# KuaiSAR's search log (src_inter.csv) carries only clicks (click_cnt): no watch time or like
# of the search result, so its requests have one task.
KUAISAR_TASKS = ("click",)
TASKS_BY_FORMAT = {"canonical": DEFAULT_TASKS, "kuaisar": KUAISAR_TASKS, "jdsearch": JDSEARCH_TASKS}

# ---- request-level features ----------------------------------------------------------------
REQUEST_ID = "request_id"  # bytes, for grouping (GAUC by request)
USER_ID = "user_id"  # bytes, raw user id, for grouping (GAUC by user)
USER_INDEX = "user_index"  # int64 vocabulary index
REQUEST_TIME = "request_time"  # int64, milliseconds since epoch
QUERY_TOKENS = "query_tokens"  # int64 list, token ids hashed into [1, query_token_buckets)
QUERY_LENGTH = "query_length"  # int64 scalar
QUERY_EMBEDDING = "query_embedding"  # float [embedding_dim], pretrained
USER_PROFILE = "user_profile"  # int64 [USER_PROFILE_DIM], hashed into [1, profile_buckets)

# ---- candidate features (lists of length num_candidates) -----------------------------------
NUM_CANDIDATES = "num_candidates"
CANDIDATE_ITEM = "candidate_item"
CANDIDATE_AUTHOR = "candidate_author"
CANDIDATE_CATEGORY = "candidate_category"  # [N * NUM_CATEGORY_LEVELS]
CANDIDATE_FEATURES = (CANDIDATE_ITEM, CANDIDATE_AUTHOR, CANDIDATE_CATEGORY)

# ---- behaviour sequences -------------------------------------------------------------------
LONG_TERM = "long"  # full-site behaviours strictly before the request, up to long_term_length
REAL_TIME = "rt"  # the last real_time_length behaviours strictly before the request
SEQUENCES = (LONG_TERM, REAL_TIME)
SEQ_LENGTH, SEQ_ITEM, SEQ_AUTHOR, SEQ_CATEGORY = "length", "item", "author", "category"
SEQ_ENGAGEMENT, SEQ_SOURCE, SEQ_TIME_GAP = "engagement", "source", "time_gap"
SEQ_FIELDS = (SEQ_ITEM, SEQ_AUTHOR, SEQ_CATEGORY, SEQ_ENGAGEMENT, SEQ_SOURCE, SEQ_TIME_GAP)
# Elements per behaviour for each field (category and engagement are flattened row-major).
SEQ_FIELD_WIDTH = {SEQ_ITEM: 1, SEQ_AUTHOR: 1, SEQ_CATEGORY: NUM_CATEGORY_LEVELS,
                   SEQ_ENGAGEMENT: ENGAGEMENT_DIM, SEQ_SOURCE: 1, SEQ_TIME_GAP: 1}
SEQ_FIELD_DTYPE = {SEQ_ITEM: "int64", SEQ_AUTHOR: "int64", SEQ_CATEGORY: "int64",
                   SEQ_ENGAGEMENT: "float32", SEQ_SOURCE: "int64", SEQ_TIME_GAP: "float32"}


def seq_feature(sequence: str, field: str) -> str:
    """Feature name of one field of a behaviour sequence, e.g. ('long', 'item') -> 'long_item'."""
    if sequence not in SEQUENCES:
        raise ValueError(f"unknown sequence {sequence!r}; expected one of {SEQUENCES}")
    if field not in SEQ_FIELDS + (SEQ_LENGTH,):
        raise ValueError(f"unknown sequence field {field!r}; expected one of {SEQ_FIELDS}")
    return f"{sequence}_{field}"


def label_feature(task: str) -> str:
    """Per-candidate 0/1 label of a task, e.g. 'label_click'."""
    return f"label_{task}"


def true_prob_feature(task: str) -> str:
    """Per-candidate true probability of a task (generated data only), e.g. 'prob_click'."""
    return f"prob_{task}"


# ---- dataset metadata (metadata.json at the preprocessing output root) ---------------------
METADATA_FILE = "metadata.json"
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"  # float32 [num_items + 1, embedding_dim], row 0 = 0
VOCAB_DIR = "vocab"
SPLITS = ("train", "eval", "test")


@dataclasses.dataclass
class DatasetMetadata:
    """What the trainer and serving must know about a preprocessed dataset."""

    input_format: str = "canonical"
    tasks: Sequence[str] = DEFAULT_TASKS
    embedding_dim: int = DEFAULT_EMBEDDING_DIM
    num_items: int = 0  # vocabulary size without OOV; embedding tables need num_items + 1 rows
    num_authors: int = 0
    num_categories: int = 0  # one shared vocabulary over all category levels
    num_users: int = 0
    query_token_buckets: int = DEFAULT_QUERY_TOKEN_BUCKETS
    profile_buckets: int = DEFAULT_PROFILE_BUCKETS
    long_term_length: int = DEFAULT_LONG_TERM_LENGTH
    real_time_length: int = DEFAULT_REAL_TIME_LENGTH
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    # "recent": the most recent long_term_length behaviours; "stage1": the top-K1 behaviours of
    # the whole history by cosine(query, behaviour) computed point in time (lifelong users).
    long_term_mode: str = "recent"
    engagement_names: Sequence[str] = ENGAGEMENT_NAMES["canonical"]
    has_true_probabilities: bool = False

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["tasks"], d["engagement_names"] = list(self.tasks), list(self.engagement_names)
        return json.dumps(d, indent=2, sort_keys=True)

    def save(self, directory: str) -> str:
        import tensorflow as tf  # gfile: works for local paths and gs:// alike

        path = os.path.join(directory, METADATA_FILE)
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(self.to_json())
        return path

    @classmethod
    def load(cls, directory: str) -> "DatasetMetadata":
        import tensorflow as tf

        path = directory if directory.endswith(".json") else os.path.join(directory, METADATA_FILE)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(
                f"{path} not found: point at the output directory of `python -m preprocessing`.")
        with tf.io.gfile.GFile(path) as f:
            raw = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; was it written by a newer version?")
        return cls(**raw)


# ---- writing --------------------------------------------------------------------------------
def _int64(values) -> "Any":
    from tensorflow.core.example import feature_pb2

    return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(v) for v in values]))


def _float(values) -> "Any":
    from tensorflow.core.example import feature_pb2

    return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[float(v) for v in values]))


def _bytes(values) -> "Any":
    from tensorflow.core.example import feature_pb2

    return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(
        value=[v.encode() if isinstance(v, str) else bytes(v) for v in values]))


def _flat(values) -> List:
    return np.asarray(values).reshape(-1).tolist()


def make_example(request: Mapping[str, Any], tasks: Sequence[str] = DEFAULT_TASKS):
    """Builds the tf.train.Example of one search request with its candidates.

    `request` maps feature names to Python/NumPy values: scalars for REQUEST_ID, USER_ID,
    USER_INDEX, REQUEST_TIME; lists for the rest. Sequences are given per field as
    `long_item`, `long_engagement` ([len, ENGAGEMENT_DIM]) etc.; lengths are derived from
    the item lists, so they can never disagree with the data. Labels `label_<task>` are
    required for every task; `prob_<task>` is optional. Raises ValueError naming the field
    when shapes are inconsistent.
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    f: Dict[str, Any] = {}
    f[REQUEST_ID] = _bytes([request[REQUEST_ID]])
    f[USER_ID] = _bytes([request[USER_ID]])
    f[USER_INDEX] = _int64([request.get(USER_INDEX, OOV_INDEX)])
    f[REQUEST_TIME] = _int64([request[REQUEST_TIME]])
    tokens = _flat(request.get(QUERY_TOKENS, []))[:MAX_QUERY_TOKENS]
    f[QUERY_TOKENS] = _int64(tokens)
    f[QUERY_LENGTH] = _int64([len(tokens)])
    f[QUERY_EMBEDDING] = _float(_flat(request[QUERY_EMBEDDING]))
    profile = _flat(request.get(USER_PROFILE, [OOV_INDEX] * USER_PROFILE_DIM))
    if len(profile) != USER_PROFILE_DIM:
        raise ValueError(f"{USER_PROFILE} has {len(profile)} values, expected {USER_PROFILE_DIM}")
    f[USER_PROFILE] = _int64(profile)

    n = len(_flat(request[CANDIDATE_ITEM]))
    f[NUM_CANDIDATES] = _int64([n])
    widths = {CANDIDATE_ITEM: 1, CANDIDATE_AUTHOR: 1, CANDIDATE_CATEGORY: NUM_CATEGORY_LEVELS}
    for name in CANDIDATE_FEATURES:
        values = _flat(request[name])
        if len(values) != n * widths[name]:
            raise ValueError(f"{name} has {len(values)} values, expected {n * widths[name]}")
        f[name] = _int64(values)
    for task in tasks:
        for name, required in ((label_feature(task), True), (true_prob_feature(task), False)):
            if name not in request:
                if required:
                    raise ValueError(f"missing label {name} for task {task!r}")
                continue
            values = _flat(request[name])
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} values, expected {n}")
            f[name] = _float(values)

    for seq in SEQUENCES:
        length = len(_flat(request.get(seq_feature(seq, SEQ_ITEM), [])))
        f[seq_feature(seq, SEQ_LENGTH)] = _int64([length])
        for field in SEQ_FIELDS:
            name = seq_feature(seq, field)
            values = _flat(request.get(name, []))
            expected = length * SEQ_FIELD_WIDTH[field]
            if len(values) != expected:
                raise ValueError(f"{name} has {len(values)} values, expected {expected}")
            f[name] = (_float if SEQ_FIELD_DTYPE[field] == "float32" else _int64)(values)
    return example_pb2.Example(features=feature_pb2.Features(feature=f))


# ---- reading --------------------------------------------------------------------------------
def request_feature_names(metadata: DatasetMetadata) -> List[str]:
    """Features that describe the request and the user (the context of a candidate list)."""
    names = [REQUEST_ID, USER_ID, USER_INDEX, REQUEST_TIME, QUERY_TOKENS, QUERY_LENGTH,
             QUERY_EMBEDDING, USER_PROFILE]
    for seq in SEQUENCES:
        names += [seq_feature(seq, SEQ_LENGTH)] + [seq_feature(seq, f) for f in SEQ_FIELDS]
    return names


def candidate_feature_names(metadata: DatasetMetadata, with_labels: bool = True) -> List[str]:
    names = [NUM_CANDIDATES] + list(CANDIDATE_FEATURES)
    if with_labels:
        names += [label_feature(t) for t in metadata.tasks]
        if metadata.has_true_probabilities:
            names += [true_prob_feature(t) for t in metadata.tasks]
    return names


def parsing_spec(metadata: DatasetMetadata, with_labels: bool = True) -> Dict[str, Any]:
    """tf.io.parse_example spec. Variable-length lists are RaggedFeatures (densified later)."""
    import tensorflow as tf

    spec: Dict[str, Any] = {
        REQUEST_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
        USER_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
        USER_INDEX: tf.io.FixedLenFeature([], tf.int64, default_value=OOV_INDEX),
        REQUEST_TIME: tf.io.FixedLenFeature([], tf.int64, default_value=0),
        QUERY_TOKENS: tf.io.RaggedFeature(tf.int64),
        QUERY_LENGTH: tf.io.FixedLenFeature([], tf.int64, default_value=0),
        QUERY_EMBEDDING: tf.io.FixedLenFeature([metadata.embedding_dim], tf.float32),
        USER_PROFILE: tf.io.FixedLenFeature([USER_PROFILE_DIM], tf.int64,
                                            default_value=[OOV_INDEX] * USER_PROFILE_DIM),
        NUM_CANDIDATES: tf.io.FixedLenFeature([], tf.int64),
    }
    for name in CANDIDATE_FEATURES:
        spec[name] = tf.io.RaggedFeature(tf.int64)
    if with_labels:
        for name in candidate_feature_names(metadata)[len(CANDIDATE_FEATURES) + 1:]:
            spec[name] = tf.io.RaggedFeature(tf.float32)
    for seq in SEQUENCES:
        spec[seq_feature(seq, SEQ_LENGTH)] = tf.io.FixedLenFeature([], tf.int64, default_value=0)
        for field in SEQ_FIELDS:
            dtype = tf.float32 if SEQ_FIELD_DTYPE[field] == "float32" else tf.int64
            spec[seq_feature(seq, field)] = tf.io.RaggedFeature(dtype)
    return spec


def densify(parsed: Mapping[str, Any], metadata: DatasetMetadata) -> Dict[str, Any]:
    """Turns parse_example output into dense tensors of the model's input shapes.

    Shapes (B = batch of requests, N = max candidates in the batch, L/R = sequence lengths):
    query_tokens [B, MAX_QUERY_TOKENS], candidate_item/author [B, N],
    candidate_category [B, N, NUM_CATEGORY_LEVELS], labels [B, N],
    long_item [B, L], long_category [B, L, LEVELS], long_engagement [B, L, ENGAGEMENT_DIM],
    and likewise for rt_* with R. Padding is 0 and always accompanied by an explicit length.
    """
    import tensorflow as tf

    out: Dict[str, Any] = {}
    for name, value in parsed.items():
        if not isinstance(value, tf.RaggedTensor):
            out[name] = value
    out[QUERY_TOKENS] = parsed[QUERY_TOKENS].to_tensor(shape=[None, MAX_QUERY_TOKENS])
    for name in candidate_feature_names(metadata, with_labels=True):
        if name == NUM_CANDIDATES or name not in parsed:
            continue
        value = parsed[name]
        if name == CANDIDATE_CATEGORY:  # rows hold N * LEVELS values, padded at the end
            dense = value.to_tensor()
            out[name] = tf.reshape(dense, [tf.shape(dense)[0], -1, NUM_CATEGORY_LEVELS])
        else:
            out[name] = value.to_tensor()
    for seq, max_len in ((LONG_TERM, metadata.long_term_length),
                         (REAL_TIME, metadata.real_time_length)):
        for field in SEQ_FIELDS:
            name = seq_feature(seq, field)
            width = SEQ_FIELD_WIDTH[field]
            dense = parsed[name].to_tensor(shape=[None, max_len * width])
            out[name] = tf.reshape(dense, [-1, max_len, width]) if width > 1 else dense
        length = seq_feature(seq, SEQ_LENGTH)
        out[length] = tf.minimum(parsed[length], max_len)
    return out


def parse_examples(serialized, metadata: DatasetMetadata, with_labels: bool = True):
    """Parses a batch of serialized request examples into dense model inputs (see `densify`)."""
    import tensorflow as tf

    parsed = tf.io.parse_example(serialized, parsing_spec(metadata, with_labels))
    return densify(parsed, metadata)


def candidate_mask(features: Mapping[str, Any]):
    """[B, N] boolean mask of real (non-padded) candidates, from the explicit count."""
    import tensorflow as tf

    n = tf.shape(features[CANDIDATE_ITEM])[1]
    return tf.sequence_mask(features[NUM_CANDIDATES], maxlen=n)


def read_vocabulary(directory: str, name: str) -> List[str]:
    """Raw ids of vocabulary `name` (items, authors, categories, users); index k+1 -> line k."""
    import tensorflow as tf

    path = os.path.join(directory, VOCAB_DIR, f"{name}.txt")
    with tf.io.gfile.GFile(path) as f:
        return [line.rstrip("\n") for line in f]


def tfrecord_pattern(directory: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return os.path.join(directory, split, "*.tfrecord.gz")


# ---- hashing of open-ended categorical values ------------------------------------------------
def query_token_index(token_id: int, buckets: int = DEFAULT_QUERY_TOKEN_BUCKETS) -> int:
    """Maps a raw query/caption token id to [1, buckets); 0 stays reserved for padding/unknown."""
    return int(token_id) % (buckets - 1) + 1


def profile_value_index(field: str, value: Any, buckets: int = DEFAULT_PROFILE_BUCKETS) -> int:
    """Stable hash of one user-profile field value into [1, buckets); missing values map to 0."""
    import zlib

    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return OOV_INDEX
    return zlib.crc32(f"{field}={value}".encode()) % (buckets - 1) + 1
