"""Serving signatures on the real ranking model (QIN preset, tiny dataset with the watch-time
task, heads calibrated and the fused score weighted as after `trainer.objectives`): listwise and
per-example paths agree, Classify/Regress conform to TF Serving, the expected watch time and the
calibration are inside the SavedModel, bad input is rejected, and every signature runs unchanged
in a clean process that imports only TensorFlow."""
import glob
import os

import numpy as np
import pytest

from common import features as F
from serving import savedmodel_check as C
from serving import signatures as S

TOL = 1e-5


def _build_model(data_dir, seed=0):
    from trainer import config as TC, model as TM

    metadata = F.DatasetMetadata.load(data_dir)
    config = TC.preset("qin")
    config.k1, config.k2, config.seed = 10, 4, seed
    model = TM.build_model(config.validate(), metadata,
                           np.load(os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE)),
                           TM.load_item_durations(data_dir, metadata))
    assert model.uses_item_duration == metadata.item_durations
    model(TM.dummy_features(metadata))
    return model, metadata


def _test_requests(data_dir):
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(data_dir, "test", "*.tfrecord.gz")))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


# A post-training as `python -m trainer.objectives` writes it: a map per task, tuned weights.
CLICK_KNOTS = {"method": "platt", "x": [0.0, 0.3, 0.6, 1.0], "y": [0.01, 0.2, 0.5, 0.9]}
WATCH_KNOTS = {"method": "isotonic", "x": [0.0, 5.0, 20.0, 1e4], "y": [0.5, 4.0, 30.0, 60.0]}
TUNED_WEIGHTS = {"click": 1.0, "long_view": 0.5, "watch_time": 0.3}


@pytest.fixture(scope="module")
def watch_time_dataset(tmp_path_factory):
    from tests.tiny_dataset import write_tiny_dataset

    return write_tiny_dataset(str(tmp_path_factory.mktemp("watch_time_dataset")),
                              tasks=F.WATCH_TIME_TASKS)


@pytest.fixture(scope="module")
def served(watch_time_dataset, tmp_path_factory):
    """(model, metadata, in-process signature functions, export dir, test requests)."""
    import tensorflow as tf
    from trainer import post_training

    tf.random.set_seed(0)
    model, metadata = _build_model(watch_time_dataset)
    post_training.apply_content(model, {
        "calibration": {"click": CLICK_KNOTS, F.WATCH_TIME: WATCH_KNOTS},
        "fusion": {"weights": TUNED_WEIGHTS}})
    export_dir = str(tmp_path_factory.mktemp("signatures") / "1")
    fns = S.save_servable(model, metadata, export_dir)
    return model, metadata, fns, export_dir, _test_requests(watch_time_dataset)


def _run(fn, inputs):
    import tensorflow as tf

    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def test_listwise_and_per_example_signatures_give_the_same_scores(served):
    import tensorflow as tf

    model, metadata, fns, _, requests = served
    assert len(requests) == 16
    dense = S.listwise_inputs([S.request_from_example(r) for r in requests], metadata)
    listwise = _run(fns[S.RANK_LISTWISE], dense)
    # The training path (parse_examples of whole request examples) gives the same numbers.
    direct = model(F.parse_examples(tf.constant(requests), metadata, with_labels=False))
    checked = 0
    for b, raw in enumerate(requests):
        n = int(dense[F.NUM_CANDIDATES][b])
        per_example = _run(fns[S.SERVING_DEFAULT],
                           {S.INPUTS: np.array(S.per_candidate_examples(raw, metadata),
                                               dtype=object)})
        alone = _run(fns[S.RANK_LISTWISE],
                     S.listwise_inputs([S.request_from_example(raw)], metadata))
        for key in list(metadata.tasks) + [S.SCORE]:
            assert per_example[key].shape == (n,)
            np.testing.assert_allclose(listwise[key][b, :n], per_example[key], atol=TOL)
            np.testing.assert_allclose(alone[key][0, :n], per_example[key], atol=TOL)
            np.testing.assert_allclose(direct[key].numpy()[b, :n], per_example[key], atol=TOL)
            checked += n
        for key in S.RSU_OUTPUTS:  # batching requests of other lengths changes nothing
            np.testing.assert_allclose(listwise[key][b, :n], alone[key][0, :n], atol=TOL)
    assert checked > 16 * 4
    # The scores are not a constant: the comparison above could fail.
    real = np.arange(listwise[S.SCORE].shape[1])[None, :] < dense[F.NUM_CANDIDATES][:, None]
    assert np.std(listwise[S.SCORE][real]) > 1e-4
    k2 = listwise[S.RSU_SELECTED_INDEX].shape[-1]
    assert k2 == 4 and listwise[S.RSU_SELECTED_INDEX].dtype == np.int32
    selected = listwise[S.RSU_SELECTED_INDEX]
    lengths = dense[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)]
    for b in range(len(requests)):  # selected positions are real long-term behaviours or -1
        valid = selected[b, :dense[F.NUM_CANDIDATES][b]]
        assert np.all((valid == -1) | ((valid >= 0) & (valid < lengths[b])))
    assert np.any(selected >= 0)


def test_classify_and_regress_match_serving_default(served):
    _, metadata, fns, _, requests = served
    raw = requests[0]
    examples = np.array(S.per_candidate_examples(raw, metadata), dtype=object)
    base = _run(fns[S.SERVING_DEFAULT], {S.INPUTS: examples})
    context, candidates = S.split_request_example(raw, metadata)
    # The ExampleListWithContext merge TF Serving does gives back the same examples.
    merged = np.array([S.merge_context(context, c).SerializeToString() for c in candidates],
                      dtype=object)
    assert len(candidates) == len(examples)
    assert S.classify_signature(F.WATCH_TIME) not in fns  # watch time is not a class
    for task in S.classify_tasks(metadata.tasks):
        out = _run(fns[S.classify_signature(task)], {S.INPUTS: merged})
        assert out[S.CLASSIFY_SCORES].shape == (len(examples), 2)
        np.testing.assert_allclose(out[S.CLASSIFY_SCORES][:, 1], base[task], atol=TOL)
        np.testing.assert_allclose(out[S.CLASSIFY_SCORES].sum(axis=1), 1.0, atol=TOL)
        assert out[S.CLASSIFY_CLASSES].tolist() == [list(S.CLASS_LABELS)] * len(examples)
    for task in metadata.tasks:
        reg = _run(fns[S.regress_signature(task)], {S.INPUTS: merged})
        np.testing.assert_allclose(reg[S.REGRESS_OUTPUTS], base[task], rtol=TOL, atol=TOL)
    reg = _run(fns[S.regress_signature(S.SCORE)], {S.INPUTS: merged})
    np.testing.assert_allclose(reg[S.REGRESS_OUTPUTS], base[S.SCORE], atol=TOL)


def test_saved_signature_defs_conform_to_tf_serving(served):
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    _, metadata, _, export_dir, _ = served
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, S.SAVED_MODEL_FILE), "rb") as f:
        saved.ParseFromString(f.read())
    sigs = saved.meta_graphs[0].signature_def
    assert set(S.signature_names(metadata.tasks)) <= set(sigs)
    for name, method in S.signature_methods(metadata.tasks).items():
        assert sigs[name].method_name == method, name
        assert tf.compat.v1.saved_model.is_valid_signature(sigs[name]), name
    example_inputs = {sigs[n].inputs[S.INPUTS].name for n in S.example_signature_names(
        metadata.tasks)}
    assert len(example_inputs) == 1  # MultiInference: one input tensor for every task
    assert S.classify_signature(F.WATCH_TIME) not in sigs
    assert S.regress_signature(F.WATCH_TIME) in sigs
    assert F.WATCH_TIME in sigs[S.RANK_LISTWISE].outputs
    for task in S.classify_tasks(metadata.tasks):
        outputs = sigs[S.classify_signature(task)].outputs
        assert set(outputs) == {S.CLASSIFY_SCORES, S.CLASSIFY_CLASSES}
        assert outputs[S.CLASSIFY_CLASSES].dtype == tf.string.as_datatype_enum
    assert set(sigs[S.RANK_LISTWISE].inputs) == set(S.listwise_input_names())
    assert set(sigs[S.RANK_LISTWISE].outputs) == set(S.predict_output_keys(metadata.tasks, True))
    assert set(sigs[S.SERVING_DEFAULT].outputs) == set(S.predict_output_keys(metadata.tasks,
                                                                             False))
    # The fingerprint was recomputed after the rewrite (its uuid field is random per call).
    from tensorflow.core.protobuf import fingerprint_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    with open(os.path.join(export_dir, S.FINGERPRINT_FILE), "rb") as f:
        saved_fp = fingerprint_pb2.FingerprintDef.FromString(f.read())
    fresh = fingerprint_pb2.FingerprintDef.FromString(
        fingerprinting.CreateFingerprintDef(export_dir))
    assert saved_fp.saved_model_checksum == fresh.saved_model_checksum != 0
    assert saved_fp.graph_def_program_hash == fresh.graph_def_program_hash


def test_item_embedding_table_is_inside_the_saved_model(served, watch_time_dataset):
    import tensorflow as tf

    _, _, _, export_dir, _ = served
    table = np.load(os.path.join(watch_time_dataset, F.ITEM_EMBEDDINGS_FILE))
    reader = tf.train.load_checkpoint(os.path.join(export_dir, "variables", "variables"))
    matches = [name for name, shape in reader.get_variable_to_shape_map().items()
               if tuple(shape) == table.shape and np.array_equal(reader.get_tensor(name), table)]
    assert matches, "the pretrained item embedding table is not among the saved variables"


@pytest.fixture(scope="module")
def clean_run(served):
    """Every signature called once in a fresh process that imports only TensorFlow."""
    _, metadata, _, export_dir, requests = served
    dense = S.listwise_inputs([S.request_from_example(r) for r in requests[:3]], metadata)
    examples = np.array(S.per_candidate_examples(requests[1], metadata), dtype=object)
    calls = [(S.RANK_LISTWISE, dense)] + [(name, {S.INPUTS: examples})
                                          for name in S.example_signature_names(metadata.tasks)]
    multi = (S.example_signature_names(metadata.tasks), examples)
    return calls, multi, C.run_clean(export_dir, calls, multi=multi)


def test_every_signature_runs_in_a_clean_tensorflow_process(served, clean_run):
    _, metadata, fns, _, _ = served
    calls, multi, run = clean_run
    assert {name for name, _ in calls} == set(S.signature_names(metadata.tasks))
    assert run.errors == []
    assert "tensorflow" in run.modules
    assert run.forbidden_modules == []
    assert not {"scann", "tensorflow_recommenders", "common", "trainer", "serving"} & set(
        run.modules)
    assert run.unregistered_ops == [] and run.python_callback_ops == []
    assert set(S.signature_names(metadata.tasks)) <= set(run.signatures)
    assert run.methods[S.classify_signature(metadata.tasks[0])] == S.CLASSIFY_METHOD
    expected = C.reference_outputs(fns, calls)
    for k, (name, _) in enumerate(calls):
        for outputs in (run.tf2[k], run.session[k]):
            diff, problems = C.compare(expected[k], outputs, TOL, name)
            assert problems == [], problems
    assert len(run.multi_input_tensors) == 1
    multi_scores = run.multi[(S.regress_signature(S.SCORE), S.REGRESS_OUTPUTS)]
    np.testing.assert_allclose(multi_scores, expected[1][S.SCORE], atol=TOL)
    summary = C.check_run(run, fns, calls, multi, TOL)
    assert summary["max_abs_difference"] <= TOL and summary["calls"] == len(calls)


def test_check_detects_outputs_that_differ(served, clean_run):
    import tensorflow as tf

    _, _, fns, _, _ = served
    calls, multi, run = clean_run

    def shifted(fn, offset):
        def call(**inputs):
            return {k: (v + tf.cast(offset, v.dtype) if v.dtype.is_floating else v)
                    for k, v in fn(**inputs).items()}
        return call

    within = {name: shifted(fn, TOL / 10) for name, fn in fns.items()}
    assert C.check_run(run, within, calls, multi, TOL)["max_abs_difference"] > 0
    beyond = {name: shifted(fn, 1e-3) for name, fn in fns.items()}
    with pytest.raises(C.SavedModelMismatch, match="max abs difference"):
        C.check_run(run, beyond, calls, multi, TOL)


def test_bad_requests_are_rejected_with_clear_errors(served):
    import tensorflow as tf

    _, metadata, fns, _, requests = served
    request = S.request_from_example(requests[3])
    dense = S.listwise_inputs([request], metadata)
    nan = dict(dense, **{F.QUERY_EMBEDDING: np.full_like(dense[F.QUERY_EMBEDDING], np.nan)})
    with pytest.raises(tf.errors.InvalidArgumentError, match="query_embedding has NaN"):
        _run(fns[S.RANK_LISTWISE], nan)
    too_long = dict(dense, **{F.NUM_CANDIDATES: dense[F.NUM_CANDIDATES] + 1})
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_candidates exceeds"):
        _run(fns[S.RANK_LISTWISE], too_long)
    length = F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)
    lying = dict(dense, **{length: dense[length] + 1})
    with pytest.raises(tf.errors.InvalidArgumentError, match="long_length exceeds"):
        _run(fns[S.RANK_LISTWISE], lying)
    whole_request = np.array([requests[3]], dtype=object)  # several candidates in one Example
    assert len(request[F.CANDIDATE_ITEM]) > 1
    with pytest.raises(tf.errors.InvalidArgumentError, match="exactly one candidate"):
        _run(fns[S.SERVING_DEFAULT], {S.INPUTS: whole_request})
    with pytest.raises(ValueError, match="candidate_author has"):
        S.listwise_inputs([dict(request, **{F.CANDIDATE_AUTHOR: [1]})], metadata)
    with pytest.raises(ValueError, match="query_embedding has 3 values"):
        S.listwise_inputs([dict(request, **{F.QUERY_EMBEDDING: [0.0, 1.0, 2.0]})], metadata)


def test_listwise_inputs_pads_cuts_and_counts(served):
    _, metadata, fns, _, _ = served
    rng = np.random.default_rng(3)
    max_long = metadata.long_term_length

    def request(n, long_len, rt_len, tokens):
        r = {F.QUERY_EMBEDDING: rng.normal(size=metadata.embedding_dim), F.USER_INDEX: 3,
             F.QUERY_TOKENS: np.arange(1, tokens + 1), F.USER_PROFILE: [1, 2, 3, 4],
             F.CANDIDATE_ITEM: np.arange(1, n + 1), F.CANDIDATE_AUTHOR: np.ones(n, int),
             F.CANDIDATE_CATEGORY: np.ones((n, F.NUM_CATEGORY_LEVELS), int)}
        for seq, length in ((F.LONG_TERM, long_len), (F.REAL_TIME, rt_len)):
            r[F.seq_feature(seq, F.SEQ_ITEM)] = np.arange(length) % metadata.num_items + 1
            r[F.seq_feature(seq, F.SEQ_AUTHOR)] = np.ones(length, int)
            r[F.seq_feature(seq, F.SEQ_CATEGORY)] = np.ones((length, 2), int)
            r[F.seq_feature(seq, F.SEQ_ENGAGEMENT)] = rng.random((length, F.ENGAGEMENT_DIM))
            r[F.seq_feature(seq, F.SEQ_SOURCE)] = np.ones(length, int)
            r[F.seq_feature(seq, F.SEQ_TIME_GAP)] = np.arange(length) + 1.0
        return r

    reqs = [request(5, max_long + 7, 0, 20), request(2, 3, 4, 1)]
    dense = S.listwise_inputs(reqs, metadata)
    shapes = S.listwise_input_shapes(metadata)
    assert set(dense) == set(shapes) == set(S.listwise_input_names())
    for name, (dtype, shape) in shapes.items():
        assert dense[name].dtype == np.dtype(dtype), name
        assert len(dense[name].shape) == len(shape), name
    assert dense[F.NUM_CANDIDATES].tolist() == [5, 2]
    assert dense[F.CANDIDATE_ITEM][1].tolist() == [1, 2, 0, 0, 0]
    assert dense[F.QUERY_LENGTH].tolist() == [F.MAX_QUERY_TOKENS, 1]
    assert dense[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)].tolist() == [max_long, 3]
    assert dense[F.seq_feature(F.LONG_TERM, F.SEQ_ITEM)].shape == (2, max_long)
    assert dense[F.seq_feature(F.REAL_TIME, F.SEQ_LENGTH)].tolist() == [0, 4]
    out = _run(fns[S.RANK_LISTWISE], dense)
    assert out[S.SCORE].shape == (2, 5)
    assert np.all(np.isfinite(out[S.SCORE]))
    # A request scored alone or next to another gives the same scores.
    alone = _run(fns[S.RANK_LISTWISE], S.listwise_inputs(reqs[1:], metadata))
    np.testing.assert_allclose(out[S.SCORE][1, :2], alone[S.SCORE][0], atol=TOL)


def test_served_outputs_are_calibrated_expected_watch_time_and_tuned_score(served):
    """The SavedModel applies the calibration maps and the tuned weights: its outputs equal the
    uncalibrated model's heads mapped by the knots in NumPy, and its score the product form."""
    import tensorflow as tf
    from trainer import calibration, fusion

    model, metadata, fns, _, requests = served
    dense = S.listwise_inputs([S.request_from_example(r) for r in requests], metadata)
    listwise = _run(fns[S.RANK_LISTWISE], dense)
    # the heads before calibration, from the same weights
    _, logits = model._forward(F.parse_examples(tf.constant(requests), metadata,
                                                with_labels=False))
    raw = model._head_outputs(logits)
    real = np.arange(listwise[S.SCORE].shape[1])[None, :] < dense[F.NUM_CANDIDATES][:, None]
    expected = {t: raw[t].numpy()[real] for t in metadata.tasks}
    for task, knots in (("click", CLICK_KNOTS), (F.WATCH_TIME, WATCH_KNOTS)):
        expected[task] = calibration.Knots.from_dict(knots)(expected[task])
    for task in metadata.tasks:
        np.testing.assert_allclose(listwise[task][real], expected[task], rtol=1e-5, atol=1e-6)
    assert np.all((listwise["click"][real] >= 0.01) & (listwise["click"][real] <= 0.9))
    # expected watch time in seconds, not a probability: beyond 1 somewhere
    assert np.all(listwise[F.WATCH_TIME][real] >= 0.5) and np.max(
        listwise[F.WATCH_TIME][real]) > 1.0
    score = fusion.fused_score(expected, dict(TUNED_WEIGHTS, like=0.0))
    np.testing.assert_allclose(listwise[S.SCORE][real], score, rtol=1e-4)
    # the raw heads differ from the served ones: the check above could fail
    assert np.max(np.abs(raw["click"].numpy()[real] - listwise["click"][real])) > 1e-3
