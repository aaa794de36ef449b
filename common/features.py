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
* Candidates are stored in the order they were shown. When the input log keeps that order
  (metadata.json `display_order`), each candidate also carries its 0-based display position
  (`candidate_position`), read by the training loss only (a position-bias term, see
  trainer/model.py); it is never a serving input (a server does not know a position before it
  ranks) and an example without it parses as POSITION_UNKNOWN.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

OOV_INDEX = 0
NUM_CATEGORY_LEVELS = 2
USER_PROFILE_DIM = 4
ENGAGEMENT_DIM = 4
DEFAULT_EMBEDDING_DIM = 32
DEFAULT_LONG_TERM_LENGTH = 1000
DEFAULT_REAL_TIME_LENGTH = 50
DEFAULT_MAX_CANDIDATES = 200
DEFAULT_STAGE1_K = 100  # K1 of RSU stage 1: preprocessing's --stage1-k and the model's default
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
# The tasks of a format's logs without optional columns; a reader adds WATCH_TIME when its logs
# carry the play time of every shown candidate (canonical `play_time_s`), and metadata.json
# records the resulting list.
TASKS_BY_FORMAT = {"canonical": DEFAULT_TASKS, "kuaisar": KUAISAR_TASKS, "jdsearch": JDSEARCH_TASKS}

# Watch time (PR2's "play" objective): the play time in seconds of a shown candidate, 0 when it
# was not clicked. Its model output is the expected play time per impression, E[T | x] in
# seconds (Covington et al., "Deep Neural Networks for YouTube Recommendations", RecSys 2016,
# rank by expected watch time). Every other task is binary and its output a probability.
WATCH_TIME = "watch_time"
REGRESSION_TASKS = (WATCH_TIME,)
WATCH_TIME_TASKS = DEFAULT_TASKS + (WATCH_TIME,)  # canonical logs that carry play time


def is_binary_task(task: str) -> bool:
    """True for a 0/1 task (output = probability), False for a regression task (watch time)."""
    return task not in REGRESSION_TASKS


def binary_tasks(tasks: Sequence[str]) -> List[str]:
    """The 0/1 tasks of `tasks`, in order (AUC, log loss, ECE and Classify apply to these)."""
    return [t for t in tasks if is_binary_task(t)]


def regression_tasks(tasks: Sequence[str]) -> List[str]:
    """The real-valued tasks of `tasks`, in order (watch time)."""
    return [t for t in tasks if not is_binary_task(t)]

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
CANDIDATE_POSITION = "candidate_position"  # 0-based display position as shown (training only)
POSITION_UNKNOWN = -1  # the position of a candidate whose log does not keep the display order

# How each input format keeps the order candidates were shown in (DatasetMetadata
# `display_order_source`); every reader keeps the order it reads.
DISPLAY_ORDER_SOURCES = {
    "canonical": "requests.candidate_item_ids lists the candidates in the order shown",
    "kuaisar": "src_inter.csv rows of a search session, in file order (the order shown)",
    "jdsearch": "candidate_wid_list lists the products in the order shown",
}

# ---- behaviour sequences -------------------------------------------------------------------
LONG_TERM = "long"  # full-site behaviours strictly before the request, up to long_term_length
REAL_TIME = "rt"  # the last real_time_length behaviours strictly before the request
SEQUENCES = (LONG_TERM, REAL_TIME)
SEQ_LENGTH, SEQ_ITEM, SEQ_AUTHOR, SEQ_CATEGORY = "length", "item", "author", "category"
SEQ_ENGAGEMENT, SEQ_SOURCE, SEQ_TIME_GAP = "engagement", "source", "time_gap"
# ---- the feature table: one row per feature, every layout function below is derived from it --
REQUEST_LEVEL, CANDIDATE_LEVEL, SEQUENCE_LEVEL, LABEL_LEVEL = (
    "request", "candidate", "sequence", "label")
EMBEDDING_WIDTH = "embedding_dim"  # a width read from DatasetMetadata.embedding_dim


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One feature of the request layout.

    `width` is the number of values per row: per request (request level), per candidate
    (candidate level) or per behaviour (sequence level); EMBEDDING_WIDTH means the dataset's
    embedding dimension. A `counted_by` feature is a list whose real length is carried by that
    explicit count feature (never inferred from padding). `model_input=False` marks features
    kept for grouping and bookkeeping only (ids, time): the model and the listwise serving
    signature do not read them.
    """

    name: str
    dtype: str  # "int64" | "float32" | "string"
    level: str
    width: Union[int, str] = 1
    default: Any = 0
    counted_by: Optional[str] = None
    scalar: bool = False  # one value per request (dense shape [B]); else a vector [B, width]
    model_input: bool = True
    required: bool = False  # make_example refuses a request without it (no default applies)
    # ids: the DatasetMetadata field holding the vocabulary size (indices 1..size, 0 unknown)
    vocabulary: Optional[str] = None
    sequence: Optional[str] = None  # the behaviour sequence a sequence-level feature belongs to
    # read by the training loss only (the display position): optional in examples (absent =
    # `default` for every candidate), never a model/serving input (model_input=False)
    training_only: bool = False

    def resolved_width(self, metadata: "DatasetMetadata") -> int:
        return metadata.embedding_dim if self.width == EMBEDDING_WIDTH else int(self.width)

    @property
    def numpy_dtype(self):
        return object if self.dtype == "string" else np.dtype(self.dtype)


REQUEST_SPECS = (
    FeatureSpec(REQUEST_ID, "string", REQUEST_LEVEL, default="", scalar=True, model_input=False,
                required=True),
    FeatureSpec(USER_ID, "string", REQUEST_LEVEL, default="", scalar=True, model_input=False,
                required=True),
    FeatureSpec(USER_INDEX, "int64", REQUEST_LEVEL, default=OOV_INDEX, scalar=True,
                vocabulary="num_users"),
    FeatureSpec(REQUEST_TIME, "int64", REQUEST_LEVEL, scalar=True, model_input=False,
                required=True),
    FeatureSpec(QUERY_TOKENS, "int64", REQUEST_LEVEL, width=MAX_QUERY_TOKENS,
                counted_by=QUERY_LENGTH, vocabulary="query_token_buckets"),
    FeatureSpec(QUERY_LENGTH, "int64", REQUEST_LEVEL, scalar=True),
    FeatureSpec(QUERY_EMBEDDING, "float32", REQUEST_LEVEL, width=EMBEDDING_WIDTH, required=True),
    FeatureSpec(USER_PROFILE, "int64", REQUEST_LEVEL, width=USER_PROFILE_DIM, default=OOV_INDEX,
                vocabulary="profile_buckets"),
)
NUM_CANDIDATES_SPEC = FeatureSpec(NUM_CANDIDATES, "int64", REQUEST_LEVEL, scalar=True)
CANDIDATE_SPECS = (
    FeatureSpec(CANDIDATE_ITEM, "int64", CANDIDATE_LEVEL, vocabulary="num_items"),
    FeatureSpec(CANDIDATE_AUTHOR, "int64", CANDIDATE_LEVEL, vocabulary="num_authors"),
    FeatureSpec(CANDIDATE_CATEGORY, "int64", CANDIDATE_LEVEL, width=NUM_CATEGORY_LEVELS,
                vocabulary="num_categories"),
    FeatureSpec(CANDIDATE_POSITION, "int64", CANDIDATE_LEVEL, default=POSITION_UNKNOWN,
                model_input=False, training_only=True),
)
# One entry per field of a behaviour; each sequence of SEQUENCES has every field. Adding a
# field here adds it to examples, parsing, the model's dense inputs, serving signatures, the
# point-in-time join and the behaviour index.
SEQUENCE_FIELD_SPECS = (
    FeatureSpec(SEQ_ITEM, "int64", SEQUENCE_LEVEL, vocabulary="num_items"),
    FeatureSpec(SEQ_AUTHOR, "int64", SEQUENCE_LEVEL, vocabulary="num_authors"),
    FeatureSpec(SEQ_CATEGORY, "int64", SEQUENCE_LEVEL, width=NUM_CATEGORY_LEVELS,
                vocabulary="num_categories"),
    FeatureSpec(SEQ_ENGAGEMENT, "float32", SEQUENCE_LEVEL, width=ENGAGEMENT_DIM),
    FeatureSpec(SEQ_SOURCE, "int64", SEQUENCE_LEVEL, vocabulary="num_sources"),
    FeatureSpec(SEQ_TIME_GAP, "float32", SEQUENCE_LEVEL),
)
SEQ_FIELDS = tuple(s.name for s in SEQUENCE_FIELD_SPECS)
# Elements per behaviour for each field (category and engagement are flattened row-major).
SEQ_FIELD_WIDTH = {s.name: int(s.width) for s in SEQUENCE_FIELD_SPECS}
SEQ_FIELD_DTYPE = {s.name: s.dtype for s in SEQUENCE_FIELD_SPECS}
# Fields a stored behaviour carries (the time gap is derived from the request time).
STORED_SEQ_FIELDS = tuple(f for f in SEQ_FIELDS if f != SEQ_TIME_GAP)
CANDIDATE_FEATURES = tuple(s.name for s in CANDIDATE_SPECS)

def seq_feature(sequence: str, field: str) -> str:
    """Feature name of one field of a behaviour sequence, e.g. ('long', 'item') -> 'long_item'."""
    if sequence not in SEQUENCES:
        raise ValueError(f"unknown sequence {sequence!r}; expected one of {SEQUENCES}")
    if field not in SEQ_FIELDS + (SEQ_LENGTH,):
        raise ValueError(f"unknown sequence field {field!r}; expected one of {SEQ_FIELDS}")
    return f"{sequence}_{field}"


def label_feature(task: str) -> str:
    """Per-candidate label of a task, e.g. 'label_click' (0/1), 'label_watch_time' (seconds)."""
    return f"label_{task}"


def true_prob_feature(task: str) -> str:
    """Per-candidate true value of a task (generated data only): the probability of a binary
    task ('prob_click'), the expected value of a regression task ('expected_watch_time')."""
    return f"prob_{task}" if is_binary_task(task) else f"expected_{task}"


# ---- model outputs (the ranking model's output dict; serving signatures reuse the keys) ------
SCORE = "score"  # fused ranking score [B, N]
RSU_SELECTED_INDEX = "rsu_selected_index"  # int32 [B, N, K2]: long-term positions, -1 = none
RSU_SELECTED_WEIGHT = "rsu_selected_weight"  # float32 [B, N, K2]: their attention weights
RSU_OUTPUTS = (RSU_SELECTED_INDEX, RSU_SELECTED_WEIGHT)


def model_output_names(tasks: Sequence[str]) -> List[str]:
    """Keys of the model's output dict: every task's probability, the score, the RSU outputs."""
    return list(tasks) + [SCORE] + list(RSU_OUTPUTS)


# ---- dataset metadata (metadata.json at the preprocessing output root) ---------------------
METADATA_FILE = "metadata.json"
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"  # float32 [num_items + 1, embedding_dim], row 0 = 0
# float32 [num_items + 1] seconds, 0 = unknown (row 0 and items whose log gives no duration);
# written only when the log gives durations (DatasetMetadata.item_durations)
ITEM_DURATIONS_FILE = "item_durations.npy"
VOCAB_DIR = "vocab"
SPLITS = ("train", "eval", "test")
LONG_TERM_MODES = ("recent", "stage1")


@dataclasses.dataclass
class DatasetMetadata:
    """What the trainer and serving must know about a preprocessed dataset: vocabulary sizes
    and every setting that shaped the examples (sequence lengths, long-term mode, stage-1 K and
    threshold, tasks), so that the model and the serving path read them instead of repeating
    them."""

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
    # "recent": the most recent long_term_length behaviours; "stage1": RSU stage 1 computed
    # point in time over the whole history: the top-stage1_k behaviours by cosine(query,
    # behaviour), only those with cosine >= stage1_threshold when it is set (lifelong users).
    long_term_mode: str = "recent"
    stage1_k: Optional[int] = None  # K1 of mode stage1 (= long_term_length); None otherwise
    stage1_threshold: Optional[float] = None  # eps of mode stage1; None = no threshold
    engagement_names: Sequence[str] = ENGAGEMENT_NAMES["canonical"]
    has_true_probabilities: bool = False
    # True when the log kept the order the candidates were shown in: examples then carry
    # CANDIDATE_POSITION and the model may learn a position bias. `display_order_source` says
    # where the order came from (DISPLAY_ORDER_SOURCES) or why it is unknown. Metadata written
    # before this was recorded loads as False with an empty source: order not recorded.
    display_order: bool = False
    display_order_source: str = ""
    # True when the item log gives video durations: ITEM_DURATIONS_FILE is then written and the
    # ranker reads each candidate's duration from it (watch time scales with it)
    item_durations: bool = False

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        self.engagement_names = tuple(self.engagement_names)
        if not isinstance(self.display_order, bool):
            raise ValueError(f"display_order must be true or false, got {self.display_order!r}")
        if not isinstance(self.item_durations, bool):
            raise ValueError(f"item_durations must be true or false, got {self.item_durations!r}")
        if not isinstance(self.display_order_source, str):
            raise ValueError("display_order_source must be a string, got "
                             f"{self.display_order_source!r}")
        if self.display_order and not self.display_order_source:
            raise ValueError("display_order is true but display_order_source does not say "
                             "where the order was read from")
        if self.long_term_mode not in LONG_TERM_MODES:
            raise ValueError(f"long_term_mode {self.long_term_mode!r}: expected one of "
                             f"{LONG_TERM_MODES}")
        if self.long_term_mode == "stage1":
            if self.stage1_k is None:
                self.stage1_k = self.long_term_length
            if self.stage1_k != self.long_term_length:
                raise ValueError(f"stage1 mode keeps stage1_k={self.stage1_k} behaviours, so "
                                 f"long_term_length must equal it (got {self.long_term_length})")
        elif self.stage1_k is not None or self.stage1_threshold is not None:
            raise ValueError("stage1_k and stage1_threshold only apply to long_term_mode "
                             f"'stage1' (mode is {self.long_term_mode!r})")

    @property
    def num_sources(self) -> int:
        return SOURCE_SEARCH  # sources are 1..SOURCE_SEARCH, 0 unknown

    def vocabulary_size(self, spec: "FeatureSpec") -> int:
        """Largest valid index of an id feature (indices 1..size; 0 is unknown/padding)."""
        if spec.vocabulary is None:
            raise ValueError(f"{spec.name} is not an id feature")
        size = int(getattr(self, spec.vocabulary))
        # hashed features map into [1, buckets)
        return size - 1 if spec.vocabulary.endswith("_buckets") else size

    def sequence_length(self, sequence: str) -> int:
        """Maximum number of behaviours of a sequence (LONG_TERM or REAL_TIME)."""
        if sequence == LONG_TERM:
            return int(self.long_term_length)
        if sequence == REAL_TIME:
            return int(self.real_time_length)
        raise ValueError(f"unknown sequence {sequence!r}; expected one of {SEQUENCES}")

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
            raise ValueError(f"{path} has unknown keys {unknown}; was it written by a newer "
                             "version?")
        return cls(**raw)


# ---- the layout derived from the table -------------------------------------------------------
def sequence_specs(sequence: str) -> List[FeatureSpec]:
    """The length feature and every field of one behaviour sequence, named `<seq>_<field>`."""
    specs = [FeatureSpec(seq_feature(sequence, SEQ_LENGTH), "int64", REQUEST_LEVEL, scalar=True)]
    return specs + [dataclasses.replace(s, name=seq_feature(sequence, s.name),
                                        counted_by=seq_feature(sequence, SEQ_LENGTH),
                                        sequence=sequence)
                    for s in SEQUENCE_FIELD_SPECS]


def label_specs(metadata: DatasetMetadata) -> List[FeatureSpec]:
    """Per-candidate labels of every task, and true values (probabilities, expected watch time)
    when the data has them."""
    specs = [FeatureSpec(label_feature(t), "float32", LABEL_LEVEL) for t in metadata.tasks]
    if metadata.has_true_probabilities:
        specs += [FeatureSpec(true_prob_feature(t), "float32", LABEL_LEVEL)
                  for t in metadata.tasks]
    return specs


def feature_specs(metadata: DatasetMetadata, with_labels: bool = True) -> List[FeatureSpec]:
    """Every feature of a request example, request side first, then the candidates."""
    specs = list(REQUEST_SPECS)
    for seq in SEQUENCES:
        specs += sequence_specs(seq)
    specs += [NUM_CANDIDATES_SPEC] + list(CANDIDATE_SPECS)
    return specs + (label_specs(metadata) if with_labels else [])


def request_feature_names(metadata: DatasetMetadata) -> List[str]:
    """Features that describe the request and the user (the context of a candidate list)."""
    return [s.name for s in feature_specs(metadata, with_labels=False)
            if s.level in (REQUEST_LEVEL, SEQUENCE_LEVEL) and s.name != NUM_CANDIDATES]


def candidate_feature_names(metadata: DatasetMetadata, with_labels: bool = True) -> List[str]:
    return [NUM_CANDIDATES] + [s.name for s in feature_specs(metadata, with_labels)
                               if s.level in (CANDIDATE_LEVEL, LABEL_LEVEL)]


def model_input_names(metadata: DatasetMetadata) -> List[str]:
    """The features the model reads (parse_examples without labels and bookkeeping ids)."""
    return [s.name for s in feature_specs(metadata, with_labels=False) if s.model_input]


class DenseFeature(NamedTuple):
    """dtype and dense shape of one model input; None = any size (batch, candidates)."""

    dtype: str
    shape: List[Optional[int]]
    level: str


def dense_layout(metadata: DatasetMetadata, with_labels: bool = False,
                 fixed_lengths: bool = True, model_inputs_only: bool = False
                 ) -> Dict[str, DenseFeature]:
    """The dense tensors of the model's input dict (what `parse_examples` returns).

    Shapes: request scalars [B]; request vectors [B, width]; candidate features [B, N] or
    [B, N, width]; sequence fields [B, L] or [B, L, width] with L the dataset's length of that
    sequence; labels [B, N]. With `fixed_lengths=False`, L and the query-token width are None
    (the listwise serving signature accepts any and cuts or pads them).
    """
    out: Dict[str, DenseFeature] = {}
    for spec in feature_specs(metadata, with_labels):
        if model_inputs_only and not spec.model_input:
            continue
        width = spec.resolved_width(metadata)
        tail = [width] if width > 1 else []
        if spec.scalar:
            shape: List[Optional[int]] = [None]
        elif spec.level == REQUEST_LEVEL:
            shape = [None, width if fixed_lengths or spec.counted_by is None else None]
        elif spec.level == SEQUENCE_LEVEL:
            length = metadata.sequence_length(spec.sequence) if fixed_lengths else None
            shape = [None, length] + tail
        else:  # candidate and label level
            shape = [None, None] + tail
        out[spec.name] = DenseFeature(spec.dtype, shape, spec.level)
    return out


# ---- writing --------------------------------------------------------------------------------
def _feature_proto(dtype: str, values) -> "Any":
    from tensorflow.core.example import feature_pb2

    if dtype == "int64":
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(v) for v in values]))
    if dtype == "float32":
        return feature_pb2.Feature(
            float_list=feature_pb2.FloatList(value=[float(v) for v in values]))
    return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(
        value=[v.encode() if isinstance(v, str) else bytes(v) for v in values]))


def _flat(values) -> List:
    return np.asarray(values).reshape(-1).tolist()


def _check_positions(values: List, n: int) -> None:
    """Display positions of one request: one per candidate, non-negative, all different."""
    if len(values) != n:
        raise ValueError(f"{CANDIDATE_POSITION} has {len(values)} values, expected {n}")
    if any(int(v) < 0 for v in values) or len(set(int(v) for v in values)) != n:
        raise ValueError(f"{CANDIDATE_POSITION} must hold distinct non-negative display "
                         f"positions, got {values[:10]}")


def make_example(request: Mapping[str, Any], tasks: Sequence[str] = DEFAULT_TASKS):
    """Builds the tf.train.Example of one search request with its candidates.

    `request` maps feature names to Python/NumPy values: scalars for REQUEST_ID, USER_ID,
    USER_INDEX, REQUEST_TIME; lists for the rest. Sequences are given per field as
    `long_item`, `long_engagement` ([len, ENGAGEMENT_DIM]) etc.; counts and lengths
    (query_length, num_candidates, long_length, ...) are derived from the lists, so they can
    never disagree with the data. Labels `label_<task>` are required for every task;
    `prob_<task>` is optional, and so is `candidate_position` (0-based display positions,
    distinct; written only when given). Raises ValueError naming the field when shapes are
    inconsistent.
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    f: Dict[str, Any] = {}
    counts: Dict[str, int] = {}
    for spec in REQUEST_SPECS:
        if spec.name in counts:
            f[spec.name] = _feature_proto(spec.dtype, [counts[spec.name]])
            continue
        if spec.required and spec.name not in request:
            raise ValueError(f"request lacks the required feature {spec.name!r}")
        if spec.scalar:
            f[spec.name] = _feature_proto(spec.dtype, [request.get(spec.name, spec.default)])
            continue
        width = int(spec.width) if spec.width != EMBEDDING_WIDTH else None
        if spec.counted_by:  # a variable-length list, cut to its maximum width
            values = _flat(request.get(spec.name, []))[:width]
            counts[spec.counted_by] = len(values)
        elif width is None:  # the embedding: its width is checked at parsing
            values = _flat(request[spec.name])
        else:
            values = _flat(request.get(spec.name, [spec.default] * width))
            if len(values) != width:
                raise ValueError(f"{spec.name} has {len(values)} values, expected {width}")
        f[spec.name] = _feature_proto(spec.dtype, values)

    n = len(_flat(request[CANDIDATE_ITEM]))
    f[NUM_CANDIDATES] = _feature_proto("int64", [n])
    for spec in CANDIDATE_SPECS:
        if spec.training_only and len(_flat(request.get(spec.name, []))) == 0:
            continue  # optional (the display position of a log without display order)
        values = _flat(request[spec.name])
        if spec.name == CANDIDATE_POSITION:
            _check_positions(values, n)
        if len(values) != n * int(spec.width):
            raise ValueError(f"{spec.name} has {len(values)} values, expected "
                             f"{n * int(spec.width)}")
        f[spec.name] = _feature_proto(spec.dtype, values)
    for task in tasks:
        for name, required in ((label_feature(task), True), (true_prob_feature(task), False)):
            if name not in request:
                if required:
                    raise ValueError(f"missing label {name} for task {task!r}")
                continue
            values = _flat(request[name])
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} values, expected {n}")
            f[name] = _feature_proto("float32", values)

    for seq in SEQUENCES:
        length_spec, *fields = sequence_specs(seq)
        length = len(_flat(request.get(seq_feature(seq, SEQ_ITEM), [])))
        f[length_spec.name] = _feature_proto("int64", [length])
        for spec in fields:
            values = _flat(request.get(spec.name, []))
            expected = length * int(spec.width)
            if len(values) != expected:
                raise ValueError(f"{spec.name} has {len(values)} values, expected {expected}")
            f[spec.name] = _feature_proto(spec.dtype, values)
    return example_pb2.Example(features=feature_pb2.Features(feature=f))


def random_request(metadata: DatasetMetadata, rng, num_candidates: int,
                   sequence_lengths: Optional[Mapping[str, int]] = None,
                   request_time_ms: int = 10**12) -> Dict[str, Any]:
    """A random, well-formed request mapping (the input of `make_example` and of
    `serving.signatures.listwise_inputs`), drawn from the feature table: ids within their
    vocabularies, floats in [0, 1), time gaps positive and increasing (most recent first),
    all-zero labels. Sequences are full (`sequence_length`) unless `sequence_lengths` says
    otherwise. For benchmarks and tests that need shapes, not meaning."""
    lengths = {seq: metadata.sequence_length(seq) for seq in SEQUENCES}
    lengths.update(sequence_lengths or {})
    request: Dict[str, Any] = {REQUEST_ID: "random", USER_ID: "random",
                               REQUEST_TIME: int(request_time_ms)}
    rows = {CANDIDATE_LEVEL: {None: num_candidates}, SEQUENCE_LEVEL: lengths}
    for spec in feature_specs(metadata, with_labels=True):
        if spec.name in request or spec.scalar and spec.vocabulary is None:
            continue  # bookkeeping ids and counts (make_example derives counts)
        if spec.name == CANDIDATE_POSITION:
            if metadata.display_order:  # shown in the order listed
                request[spec.name] = np.arange(num_candidates, dtype=np.int64)
            continue
        width = spec.resolved_width(metadata)
        if spec.level == LABEL_LEVEL:
            request[spec.name] = np.zeros(num_candidates, np.float32)
            continue
        n = rows.get(spec.level, {}).get(spec.sequence, 1)
        shape = (n, width) if spec.level != REQUEST_LEVEL else (() if spec.scalar else (width,))
        if spec.vocabulary is not None:
            value = rng.integers(1, metadata.vocabulary_size(spec) + 1, shape)
        elif spec.name.endswith(SEQ_TIME_GAP):
            value = np.sort(rng.random(n) * 1e6).astype(np.float32) + 1.0
        else:
            value = rng.random(shape).astype(np.float32)
        request[spec.name] = value.reshape(-1) if width == 1 and spec.level != REQUEST_LEVEL \
            else value
    return request


# ---- reading --------------------------------------------------------------------------------
def _tf_dtype(dtype: str):
    import tensorflow as tf

    return {"int64": tf.int64, "float32": tf.float32, "string": tf.string}[dtype]


def parsing_spec(metadata: DatasetMetadata, with_labels: bool = True) -> Dict[str, Any]:
    """tf.io.parse_example spec. Variable-length lists are RaggedFeatures (densified later)."""
    import tensorflow as tf

    spec: Dict[str, Any] = {}
    for s in feature_specs(metadata, with_labels):
        dtype = _tf_dtype(s.dtype)
        if s.scalar:
            required = s.name in (NUM_CANDIDATES,)
            spec[s.name] = (tf.io.FixedLenFeature([], dtype) if required else
                            tf.io.FixedLenFeature([], dtype, default_value=s.default))
        elif s.level == REQUEST_LEVEL and not s.counted_by:
            width = s.resolved_width(metadata)
            spec[s.name] = (tf.io.FixedLenFeature([width], dtype) if s.width == EMBEDDING_WIDTH
                            else tf.io.FixedLenFeature([width], dtype,
                                                       default_value=[s.default] * width))
        else:
            spec[s.name] = tf.io.RaggedFeature(dtype)
    return spec


def densify(parsed: Mapping[str, Any], metadata: DatasetMetadata) -> Dict[str, Any]:
    """Turns parse_example output into the dense tensors of `dense_layout`.

    Shapes (B = batch of requests, N = max candidates in the batch, L/R = sequence lengths):
    query_tokens [B, MAX_QUERY_TOKENS], candidate_item/author [B, N],
    candidate_category [B, N, NUM_CATEGORY_LEVELS], labels [B, N],
    long_item [B, L], long_category [B, L, LEVELS], long_engagement [B, L, ENGAGEMENT_DIM],
    and likewise for rt_* with R, candidate_position [B, N] (POSITION_UNKNOWN where an
    example has none). Padding is 0 and always accompanied by an explicit length.
    """
    import tensorflow as tf

    layout = dense_layout(metadata, with_labels=True)
    out: Dict[str, Any] = {}
    for name, value in parsed.items():
        if not isinstance(value, tf.RaggedTensor):
            out[name] = value
            continue
        dense = layout[name]
        if dense.level == SEQUENCE_LEVEL or dense.level == REQUEST_LEVEL:
            # fixed width: cut or pad to the dataset's maximum (rows are flattened row-major)
            per_row = int(np.prod(dense.shape[2:], dtype=np.int64))
            flat = value.to_tensor(shape=[None, dense.shape[1] * per_row])
            out[name] = tf.reshape(flat, [-1] + dense.shape[1:]) if per_row > 1 else flat
        elif name == CANDIDATE_POSITION:  # optional: absent or short rows -> unknown
            width = tf.shape(parsed[CANDIDATE_ITEM].to_tensor())[1]
            flat = value.to_tensor(default_value=POSITION_UNKNOWN)[:, :width]
            out[name] = tf.pad(flat, [[0, 0], [0, width - tf.shape(flat)[1]]],
                               constant_values=POSITION_UNKNOWN)
        else:  # candidate lists: as wide as the longest list of the batch
            flat = value.to_tensor()
            out[name] = (tf.reshape(flat, [tf.shape(flat)[0], -1] + dense.shape[2:])
                         if len(dense.shape) > 2 else flat)
    for seq in SEQUENCES:
        length = seq_feature(seq, SEQ_LENGTH)
        out[length] = tf.minimum(parsed[length], metadata.sequence_length(seq))
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
