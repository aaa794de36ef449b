"""Serving signatures of the ranking model: the one place that defines them.

The export, the tests, the gRPC server and the client all take signature names, input keys and
output keys from here, and `build_signatures` is the only function that wraps a model into
serving functions.

Signatures of an exported version
---------------------------------
``serving_default`` (predict)
    input ``inputs``: serialized tf.Example [B], each a request example (see
    `common.features`) with exactly ONE candidate. Outputs ``<task>`` [B] for every task (the
    probability of a binary task; for ``watch_time``, when the data has it, the expected play
    time in seconds) and the fused ``score`` [B]. A batch of examples is a batch of independent
    candidates. Heads are calibrated and the score uses the tuned fusion weights when the model
    was post-trained (`python -m trainer.objectives`).
``classify_<task>`` (tensorflow/serving/classify), binary tasks only
    input ``inputs`` as above; outputs ``scores`` [B, 2] = (1 - p, p) and ``classes`` [B, 2] =
    ("0", "1"). Works with TF Serving's Classify and MultiInference, with ExampleList and with
    ExampleListWithContext (the query and the behaviour sequences once as the context Example,
    the candidates as the list: the server merges the context into each candidate).
``regress_<task>``, ``regress_score`` (tensorflow/serving/regress)
    input ``inputs`` as above; output ``outputs`` [B] (the task probability, the expected watch
    time in seconds, or the fused score).
``rank_listwise`` (predict)
    dense tensors of B requests with N candidates each (see `listwise_input_specs`); the
    query- and user-side work runs once per request. Outputs ``<task>`` and ``score`` [B, N],
    ``rsu_selected_index`` int32 [B, N, K2] and ``rsu_selected_weight`` [B, N, K2]. Outputs at
    padded candidate positions (index >= ``num_candidates``) are meaningless.

All example-input signatures share ONE ``inputs`` placeholder in the exported graph: TF Serving's
MultiInference requires every task of a request to read the same input tensor.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from common import features as F
from common import tf_serving_protocol as P

# ---- names shared with the server and the client ------------------------------------------
# TF Serving's own constants live in common.tf_serving_protocol, the model's output keys in
# common.features; the names below are this model's signatures.
SERVING_DEFAULT = P.DEFAULT_SIGNATURE
RANK_LISTWISE = "rank_listwise"
PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD = (
    P.PREDICT_METHOD, P.CLASSIFY_METHOD, P.REGRESS_METHOD)

INPUTS = P.EXAMPLE_INPUTS  # the serialized-Example input of every example signature
CLASSIFY_SCORES, CLASSIFY_CLASSES, REGRESS_OUTPUTS = (
    P.CLASSIFY_SCORES, P.CLASSIFY_CLASSES, P.REGRESS_OUTPUTS)
CLASS_LABELS = (b"0", b"1")  # classify: index 1 is the positive class (the task happened)

SCORE = F.SCORE  # fused ranking score, output of the model and of every signature
RSU_SELECTED_INDEX, RSU_SELECTED_WEIGHT, RSU_OUTPUTS = (
    F.RSU_SELECTED_INDEX, F.RSU_SELECTED_WEIGHT, F.RSU_OUTPUTS)

SERVE_TAG, SAVED_MODEL_FILE, FINGERPRINT_FILE = (
    P.SERVE_TAG, P.SAVED_MODEL_FILE, P.FINGERPRINT_FILE)


def classify_signature(task: str) -> str:
    """Name of the Classify signature of a task, e.g. 'classify_click'."""
    return f"classify_{task}"


def regress_signature(target: str) -> str:
    """Name of the Regress signature of a task or of the fused score ('regress_score')."""
    return f"regress_{target}"


def regress_targets(tasks: Sequence[str]) -> List[str]:
    return list(tasks) + [SCORE]


def classify_tasks(tasks: Sequence[str]) -> List[str]:
    """Tasks with a Classify signature: the binary ones (watch time is only regressed)."""
    return F.binary_tasks(tasks)


def example_signature_names(tasks: Sequence[str]) -> List[str]:
    """Signatures whose only input is `inputs` (serialized tf.Example, one candidate each)."""
    return ([SERVING_DEFAULT] + [classify_signature(t) for t in classify_tasks(tasks)]
            + [regress_signature(t) for t in regress_targets(tasks)])


def signature_names(tasks: Sequence[str]) -> List[str]:
    """Every signature an exported version has."""
    return example_signature_names(tasks) + [RANK_LISTWISE]


def signature_methods(tasks: Sequence[str]) -> Dict[str, str]:
    """method_name of every signature (what TF Serving's Classify/Regress check)."""
    methods = {SERVING_DEFAULT: PREDICT_METHOD, RANK_LISTWISE: PREDICT_METHOD}
    methods.update({classify_signature(t): CLASSIFY_METHOD for t in classify_tasks(tasks)})
    methods.update({regress_signature(t): REGRESS_METHOD for t in regress_targets(tasks)})
    return methods


def predict_output_keys(tasks: Sequence[str], listwise: bool) -> List[str]:
    """Output keys of serving_default (listwise=False) or rank_listwise (listwise=True)."""
    keys = list(tasks) + [SCORE]
    return keys + list(RSU_OUTPUTS) if listwise else keys


# ---- listwise inputs ------------------------------------------------------------------------
def listwise_input_names(metadata: Optional[F.DatasetMetadata] = None) -> List[str]:
    """Inputs of rank_listwise: every model input of common.features' table."""
    return F.model_input_names(metadata or F.DatasetMetadata())


def listwise_input_shapes(metadata: F.DatasetMetadata
                          ) -> Dict[str, Tuple[str, List[Optional[int]]]]:
    """(dtype, shape) of every rank_listwise input; None = any size.

    B requests (dimension 0), N candidates per request, L behaviours per sequence (at most the
    dataset's `sequence_length` are used; longer inputs are truncated, the sequences being most
    recent first), T query tokens (at most MAX_QUERY_TOKENS used). Every list carries an
    explicit length (`query_length`, `long_length`, `rt_length`, `num_candidates`): padding
    values are never read as data. Derived from `common.features.dense_layout`.
    """
    layout = F.dense_layout(metadata, fixed_lengths=False, model_inputs_only=True)
    return {name: (dense.dtype, list(dense.shape)) for name, dense in layout.items()}


def listwise_input_specs(metadata: F.DatasetMetadata) -> Dict[str, Any]:
    """tf.TensorSpec of every rank_listwise input, named by its feature name."""
    import tensorflow as tf

    return {name: tf.TensorSpec(shape, tf.as_dtype(dtype), name=name)
            for name, (dtype, shape) in listwise_input_shapes(metadata).items()}


def _count_name(spec: F.FeatureSpec) -> Optional[str]:
    if spec.level == F.CANDIDATE_LEVEL:
        return F.NUM_CANDIDATES
    return spec.counted_by


def listwise_inputs(requests: Sequence[Mapping[str, Any]],
                    metadata: F.DatasetMetadata) -> Dict[str, np.ndarray]:
    """Builds the rank_listwise input dict (NumPy, batched and zero-padded) from requests.

    Each request maps feature names to values the way `common.features.make_example` takes
    them: `query_embedding`, `query_tokens`, `user_index`, `user_profile`, the candidate lists
    `candidate_item`, `candidate_author`, `candidate_category` ([N, NUM_CATEGORY_LEVELS] or
    flat) and the sequences per field (`long_item`, `long_engagement` [len, ENGAGEMENT_DIM],
    ...). Lengths and counts are derived from the lists, so they always agree with the data;
    sequences longer than the dataset's maximum are cut to it (most recent first).
    Raises ValueError naming the field when a request is inconsistent.
    """
    if not requests:
        raise ValueError("listwise_inputs needs at least one request")
    specs = {s.name: s for s in F.feature_specs(metadata, with_labels=False) if s.model_input}
    batch = len(requests)

    def flat(request, name, default=()):
        return np.asarray(request.get(name, default)).reshape(-1)

    # Counts first: the number of rows of every counted list, per request (cut to the maximum).
    counts: Dict[str, List[int]] = {F.NUM_CANDIDATES: [flat(r, F.CANDIDATE_ITEM).size
                                                       for r in requests]}
    for spec in specs.values():
        if spec.counted_by == F.QUERY_LENGTH:
            counts[F.QUERY_LENGTH] = [min(flat(r, spec.name).size, int(spec.width))
                                      for r in requests]
    for seq in F.SEQUENCES:
        counts[F.seq_feature(seq, F.SEQ_LENGTH)] = [
            min(flat(r, F.seq_feature(seq, F.SEQ_ITEM)).size, metadata.sequence_length(seq))
            for r in requests]

    out: Dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        if name in counts:
            out[name] = np.asarray(counts[name], np.int64)
            continue
        width = spec.resolved_width(metadata)
        count = _count_name(spec)
        if spec.scalar:
            out[name] = np.zeros([batch], spec.numpy_dtype)
        elif count is None:  # fixed-width request vector
            out[name] = np.zeros([batch, width], spec.numpy_dtype)
        elif spec.level == F.REQUEST_LEVEL:  # a counted request list (query tokens)
            out[name] = np.zeros([batch, max(max(counts[count]), 1)], spec.numpy_dtype)
        else:  # candidates and sequences: rows of `width` values
            rows = max(max(counts[count]), 0 if count == F.NUM_CANDIDATES else 1)
            out[name] = np.zeros([batch, rows] + ([width] if width > 1 else []),
                                 spec.numpy_dtype)

    for b, r in enumerate(requests):
        for name, spec in specs.items():
            if name in counts:
                continue
            width = spec.resolved_width(metadata)
            count = _count_name(spec)
            if spec.scalar:
                out[name][b] = np.asarray(r.get(name, spec.default)).reshape(-1)[0]
            elif count is None:
                values = flat(r, name, [spec.default] * width)
                if values.size != width:
                    raise ValueError(f"request {b}: {name} has {values.size} values, "
                                     f"expected {width}")
                out[name][b] = values
            elif spec.level == F.REQUEST_LEVEL:
                n = counts[count][b]
                out[name][b, :n] = flat(r, name)[:n]
            else:
                full = (flat(r, F.CANDIDATE_ITEM).size if count == F.NUM_CANDIDATES
                        else flat(r, F.seq_feature(spec.sequence, F.SEQ_ITEM)).size)
                values = flat(r, name)
                if values.size != full * width:
                    what = "candidates" if count == F.NUM_CANDIDATES else "behaviours"
                    raise ValueError(f"request {b}: {name} has {values.size} values, expected "
                                     f"{full * width} ({full} {what})")
                n = counts[count][b]
                out[name][b, :n] = values.reshape((full,) + out[name].shape[2:])[:n]
    return out


def request_from_example(example) -> Dict[str, Any]:
    """The make_example-style mapping of a request tf.train.Example (or its serialized bytes).

    Inverse of `common.features.make_example` for the features of the table (labels aside);
    feeds `listwise_inputs` with requests read from TFRecords (warmup, tests, replay tools).
    """
    from tensorflow.core.example import example_pb2

    if isinstance(example, (bytes, bytearray)):
        example = example_pb2.Example.FromString(bytes(example))
    feats = example.features.feature

    def values(name):
        if name not in feats:
            return []
        f = feats[name]
        kind = f.WhichOneof("kind")
        return list(getattr(f, kind).value) if kind else []

    r: Dict[str, Any] = {}
    for spec in F.feature_specs(F.DatasetMetadata(), with_labels=False):
        v = values(spec.name)
        if spec.name == F.NUM_CANDIDATES or spec.name in _DERIVED_COUNTS:
            continue  # counts are derived from the lists again
        if spec.scalar:
            if spec.dtype == "string":
                r[spec.name] = v[0].decode() if v else spec.default
            else:
                r[spec.name] = int(v[0]) if v else spec.default
            continue
        width = spec.width if spec.width != F.EMBEDDING_WIDTH else 1
        if not v and spec.level == F.REQUEST_LEVEL and not spec.counted_by \
                and spec.width != F.EMBEDDING_WIDTH:
            v = [spec.default] * int(width)
        arr = np.asarray(v, spec.numpy_dtype)
        if spec.level != F.REQUEST_LEVEL and int(width) > 1:
            arr = arr.reshape(-1, int(width))
        r[spec.name] = arr
    return r


# Counts that make_example derives from their lists (never read back as data).
_DERIVED_COUNTS = frozenset([F.QUERY_LENGTH] + [F.seq_feature(s, F.SEQ_LENGTH)
                                                for s in F.SEQUENCES])


# ---- per-candidate examples (serving_default, Classify, Regress, ExampleListWithContext) ----
def split_request_example(example, metadata: F.DatasetMetadata):
    """Splits a request example into (context Example, [one Example per candidate]).

    The context holds every request-level feature (query, user, behaviour sequences) once;
    each candidate Example holds `num_candidates` = 1 and that candidate's features. This is
    the ExampleListWithContext layout of a Classify/Regress/MultiInference request. Labels are
    not copied.
    """
    from tensorflow.core.example import example_pb2

    if isinstance(example, (bytes, bytearray)):
        example = example_pb2.Example.FromString(bytes(example))
    feats = example.features.feature
    context = example_pb2.Example()
    for name in F.request_feature_names(metadata):
        if name in feats:
            context.features.feature[name].CopyFrom(feats[name])
    items = list(feats[F.CANDIDATE_ITEM].int64_list.value)
    authors = list(feats[F.CANDIDATE_AUTHOR].int64_list.value)
    cats = list(feats[F.CANDIDATE_CATEGORY].int64_list.value)
    levels = F.NUM_CATEGORY_LEVELS
    if len(authors) != len(items) or len(cats) != len(items) * levels:
        raise ValueError(f"inconsistent candidate lists: {len(items)} items, {len(authors)} "
                         f"authors, {len(cats)} category values")
    candidates = []
    for k, item in enumerate(items):
        c = example_pb2.Example()
        c.features.feature[F.NUM_CANDIDATES].int64_list.value.append(1)
        c.features.feature[F.CANDIDATE_ITEM].int64_list.value.append(item)
        c.features.feature[F.CANDIDATE_AUTHOR].int64_list.value.append(authors[k])
        c.features.feature[F.CANDIDATE_CATEGORY].int64_list.value.extend(
            cats[k * levels:(k + 1) * levels])
        candidates.append(c)
    return context, candidates


def merge_context(context, example):
    """The Example TF Serving feeds for one entry of an ExampleListWithContext.

    TF Serving serializes the context and the example back to back, which protobuf parses as
    a merge in which the example's features win; this does exactly that.
    """
    from tensorflow.core.example import example_pb2

    return example_pb2.Example.FromString(
        context.SerializeToString() + example.SerializeToString())


def per_candidate_examples(example, metadata: F.DatasetMetadata) -> List[bytes]:
    """Serialized one-candidate examples of a request, in candidate order (serving_default)."""
    context, candidates = split_request_example(example, metadata)
    return [merge_context(context, c).SerializeToString() for c in candidates]


# ---- building the signatures ----------------------------------------------------------------
def _pad_or_cut(x, size: int):
    """Pads (with zeros) or cuts dimension 1 of x to exactly `size`."""
    import tensorflow as tf

    x = x[:, :size]
    pad = [[0, 0], [0, size - tf.shape(x)[1]]] + [[0, 0]] * (len(x.shape) - 2)
    return tf.pad(x, pad)


def _model_features(inputs: Mapping[str, Any], metadata: F.DatasetMetadata) -> Dict[str, Any]:
    """Listwise inputs -> the exact dense dict `parse_examples` gives the model.

    Validates what a dense caller can get wrong: counts larger than the lists they describe,
    NaN/Inf floats, fields of one list with different [B, N] or [B, L]. Failures are
    InvalidArgument errors. Every check is derived from the feature table.
    """
    import tensorflow as tf

    checks = []
    feats: Dict[str, Any] = {}
    batch = tf.shape(inputs[F.QUERY_EMBEDDING])[0]
    layout = F.dense_layout(metadata)
    specs = [s for s in F.feature_specs(metadata, with_labels=False) if s.model_input]
    # the list whose width a count is checked against: the first field counted by it
    first_of = {}
    for spec in specs:
        count = _count_name(spec)
        if count is not None:
            first_of.setdefault(count, spec.name)
    for spec in specs:
        value = inputs[spec.name]
        count = _count_name(spec)
        if spec.name in first_of:  # a count: it cannot exceed the width of its list
            listed = inputs[first_of[spec.name]]
            checks.append(tf.debugging.assert_less_equal(
                value, tf.cast(tf.shape(listed)[1], tf.int64),
                message=f"{spec.name} exceeds the width of {first_of[spec.name]}"))
            limit = layout[first_of[spec.name]].shape[1]  # None: any number of candidates
            feats[spec.name] = value if limit is None else tf.minimum(value, limit)
            continue
        if count is not None and first_of[count] != spec.name \
                and spec.level != F.REQUEST_LEVEL:
            checks.append(tf.debugging.assert_equal(
                tf.shape(value)[:2], tf.shape(inputs[first_of[count]])[:2],
                message=f"{spec.name} and {first_of[count]} have different "
                        f"{'[B, N]' if count == F.NUM_CANDIDATES else '[B, L]'}"))
        if spec.dtype == "float32":
            value = tf.debugging.check_numerics(value, f"{spec.name} has NaN or Inf")
        if spec.level == F.SEQUENCE_LEVEL or spec.counted_by == F.QUERY_LENGTH:
            value = _pad_or_cut(value, layout[spec.name].shape[1])
        feats[spec.name] = value
    # Grouping-only features: present so the dict matches parse_examples exactly.
    for spec in F.REQUEST_SPECS:
        if not spec.model_input:
            feats[spec.name] = (tf.fill([batch], spec.default) if spec.dtype == "string"
                                else tf.zeros([batch], tf.as_dtype(spec.dtype)))
    with tf.control_dependencies(checks):
        return {k: tf.identity(v) for k, v in feats.items()}


def _call_model(model, features, metadata: F.DatasetMetadata) -> Dict[str, Any]:
    import tensorflow as tf

    outputs = model(features, training=False)
    if not isinstance(outputs, Mapping):
        raise TypeError(f"the model must return a dict of outputs, got {type(outputs).__name__}")
    missing = [k for k in predict_output_keys(metadata.tasks, listwise=True) if k not in outputs]
    if missing:
        raise ValueError(f"the model's outputs lack {missing} (docs/ARCHITECTURE.md section 3 "
                         f"lists the output dict); it returned {sorted(outputs)}")
    result = {k: tf.cast(outputs[k], tf.float32) for k in list(metadata.tasks) + [SCORE]}
    result[RSU_SELECTED_INDEX] = tf.cast(outputs[RSU_SELECTED_INDEX], tf.int32)
    result[RSU_SELECTED_WEIGHT] = tf.cast(outputs[RSU_SELECTED_WEIGHT], tf.float32)
    return result


def build_signatures(model, metadata: F.DatasetMetadata) -> Dict[str, Any]:
    """Concrete functions of every serving signature of `model`, keyed by signature name.

    `model` takes the dict of `common.features.parse_examples` and returns the output dict of
    docs/ARCHITECTURE.md section 3. Pass the result as `signatures=` to tf.saved_model.save,
    then call `make_tf_serving_conformant` on the directory (or use `save_servable`).
    """
    import tensorflow as tf

    tasks = list(metadata.tasks)

    def per_candidate(serialized):
        parsed = F.parse_examples(serialized, metadata, with_labels=False)
        one = tf.debugging.assert_equal(
            parsed[F.NUM_CANDIDATES], tf.ones_like(parsed[F.NUM_CANDIDATES]),
            message="each tf.Example of an example signature must hold exactly one candidate "
                    "(num_candidates = 1); score whole lists with rank_listwise or an "
                    "ExampleListWithContext")
        with tf.control_dependencies([one]):
            parsed = {k: tf.identity(v) for k, v in parsed.items()}
        out = _call_model(model, parsed, metadata)
        return {k: out[k][:, 0] for k in tasks + [SCORE]}

    examples_spec = tf.TensorSpec([None], tf.string, name=INPUTS)

    @tf.function(input_signature=[examples_spec])
    def serving_default(inputs):
        return per_candidate(inputs)

    signatures = {SERVING_DEFAULT: serving_default.get_concrete_function()}

    def classify_fn(task):
        @tf.function(input_signature=[examples_spec])
        def classify(inputs):
            p = per_candidate(inputs)[task]
            scores = tf.stack([1.0 - p, p], axis=1)
            classes = tf.tile(tf.constant([list(CLASS_LABELS)]), [tf.shape(p)[0], 1])
            return {CLASSIFY_SCORES: scores, CLASSIFY_CLASSES: classes}
        return classify.get_concrete_function()

    def regress_fn(target):
        @tf.function(input_signature=[examples_spec])
        def regress(inputs):
            return {REGRESS_OUTPUTS: per_candidate(inputs)[target]}
        return regress.get_concrete_function()

    for task in classify_tasks(tasks):
        signatures[classify_signature(task)] = classify_fn(task)
    for target in regress_targets(tasks):
        signatures[regress_signature(target)] = regress_fn(target)

    specs = listwise_input_specs(metadata)

    @tf.function(input_signature=[specs])
    def rank_listwise(inputs):
        return _call_model(model, _model_features(inputs, metadata), metadata)

    signatures[RANK_LISTWISE] = rank_listwise.get_concrete_function()
    return signatures


def make_tf_serving_conformant(export_dir: str, tasks: Sequence[str]) -> None:
    """Rewrites the saved MetaGraph so that stock TF Serving accepts every signature.

    tf.saved_model.save marks every signature as predict and gives each its own input
    placeholder. TF Serving's Classify/Regress check the method name, and MultiInference
    requires all its tasks to read one input tensor. This sets the method names of the
    classify_/regress_ signatures and points every example signature at the `inputs`
    placeholder of serving_default (all of them take the same serialized Examples), then
    recomputes the SavedModel fingerprint. Raises ValueError when a signature does not
    conform afterwards.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(export_dir, SAVED_MODEL_FILE)
    saved = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(path, "rb") as f:
        saved.ParseFromString(f.read())
    methods = signature_methods(tasks)
    for meta_graph in saved.meta_graphs:
        sigs = meta_graph.signature_def
        missing = sorted(set(methods) - set(sigs))
        if missing:
            raise ValueError(f"{export_dir} lacks signatures {missing}")
        shared = sigs[SERVING_DEFAULT].inputs[INPUTS].name
        shared_node = shared.split(":")[0]
        renamed = {}
        for name in example_signature_names(tasks):
            own = sigs[name].inputs[INPUTS].name
            if own != shared:
                renamed[own.split(":")[0]] = shared_node
                sigs[name].inputs[INPUTS].name = shared
        for node in meta_graph.graph_def.node:
            for k, inp in enumerate(node.input):
                if inp.split(":")[0] in renamed:
                    node.input[k] = inp.replace(inp.split(":")[0], renamed[inp.split(":")[0]], 1)
        kept = [n for n in meta_graph.graph_def.node if n.name not in renamed]
        del meta_graph.graph_def.node[:]
        meta_graph.graph_def.node.extend(kept)
        for name, method in methods.items():
            sigs[name].method_name = method
            if not tf.compat.v1.saved_model.is_valid_signature(sigs[name]):
                raise ValueError(f"signature {name!r} does not conform to {method}: "
                                 f"{sigs[name]}")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(saved.SerializeToString())
    _rewrite_fingerprint(export_dir)


def _rewrite_fingerprint(export_dir: str) -> None:
    """fingerprint.pb hashes saved_model.pb; keep it true after the rewrite."""
    import tensorflow as tf

    try:
        from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting
    except ImportError:  # pragma: no cover - older TF without fingerprints
        return
    data = fingerprinting.CreateFingerprintDef(export_dir)
    with tf.io.gfile.GFile(os.path.join(export_dir, FINGERPRINT_FILE), "wb") as f:
        f.write(data)


def save_servable(model, metadata: F.DatasetMetadata, export_dir: str) -> Dict[str, Any]:
    """Saves `model` with every serving signature to `export_dir` (which must not exist).

    Only the model's variables are tracked (no Keras layer metadata), so the SavedModel holds
    plain TF functions over stock ops. Returns the in-process concrete functions, which give
    the reference outputs the reloaded model must reproduce.
    """
    import tensorflow as tf

    signatures = build_signatures(model, metadata)
    root = tf.Module()
    root.model_variables = list(model.variables)
    tf.saved_model.save(root, export_dir, signatures=signatures)
    make_tf_serving_conformant(export_dir, metadata.tasks)
    return signatures
