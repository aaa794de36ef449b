"""Every preset on the tiny dataset: builds, trains (loss goes down), documented outputs;
candidate independence, padding invariance, loss formula, config round trip, reload, export."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from common import features as F
from trainer import config as C
from trainer import model as M

BATCH = 16


@pytest.fixture(scope="module")
def data(tiny_dataset):
    metadata = F.DatasetMetadata.load(tiny_dataset)
    embeddings = np.load(os.path.join(tiny_dataset, F.ITEM_EMBEDDINGS_FILE))
    files = sorted(glob.glob(os.path.join(tiny_dataset, "train", "*.tfrecord.gz")))
    train = (tf.data.TFRecordDataset(files, compression_type="GZIP").batch(BATCH)
             .map(lambda s: F.parse_examples(s, metadata)).cache())
    batches = list(train)
    return dict(dir=tiny_dataset, metadata=metadata, embeddings=embeddings, train=train,
                batch=batches[0])


def small(name, **overrides):
    """Preset with sizes for the tiny data (K1 < L so stage 1 actually filters)."""
    cfg = C.preset(name)
    return C.ModelConfig(**{**cfg.to_dict(), "k1": 12, "k2": 5, "id_embedding_dim": 8,
                            "hidden_units": 16, "attention_units": 8, "expert_units": [16],
                            "tower_units": [8], **overrides}).validate()


def build(data, cfg, seed=0):
    tf.keras.utils.set_random_seed(seed)
    model = M.build_model(cfg, data["metadata"], data["embeddings"])
    model(data["batch"])
    return model


def numpy_outputs(outputs):
    return {k: v.numpy() for k, v in outputs.items()}


def check_outputs(out, batch, cfg, tasks):
    b, n = batch[F.CANDIDATE_ITEM].shape
    for task in tasks:
        p = out[task]
        assert p.shape == (b, n) and p.dtype == np.float32
        assert np.all(np.isfinite(p)) and np.all((p > 0) & (p < 1))
    assert out[F.SCORE].shape == (b, n) and np.all(np.isfinite(out[F.SCORE]))
    index, weight = out[F.RSU_SELECTED_INDEX], out[F.RSU_SELECTED_WEIGHT]
    assert index.shape == (b, n, cfg.k2) and index.dtype == np.int32
    assert weight.shape == (b, n, cfg.k2) and np.all(np.isfinite(weight))
    long_length = batch[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)].numpy()
    assert np.all(index >= -1) and np.all(index < long_length[:, None, None])
    assert np.all(weight[index < 0] == 0) and np.all(weight >= 0)
    assert np.all(weight.sum(-1) <= 1 + 1e-5)
    for row in index.reshape(-1, cfg.k2):  # a behaviour is kept at most once
        kept = row[row >= 0]
        assert len(set(kept.tolist())) == len(kept)
    if not cfg.uses_long_term:
        assert np.all(index == -1) and np.all(weight == 0)
    else:
        assert (index >= 0).any()


@pytest.mark.parametrize("name", C.PRESETS)
def test_preset_trains_and_has_documented_outputs(data, name):
    cfg = small(name)
    model = build(data, cfg)
    # Eager steps: a handful of them costs less than tracing the train graph on 2 CPU cores.
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), run_eagerly=True)
    train = data["train"].take(2)

    def mean_loss():
        return float(np.mean([float(model.compute_loss(b)) for b in train]))

    before = mean_loss()
    history = model.fit(train, epochs=3, verbose=0).history
    after = mean_loss()
    assert np.isfinite(history["loss"]).all()
    assert after < before, (before, after)
    for task in data["metadata"].tasks:
        auc = history[f"{task}_auc"][-1]
        assert 0.0 <= auc <= 1.0
    out = numpy_outputs(model(data["batch"]))
    check_outputs(out, data["batch"], cfg, data["metadata"].tasks)
    if cfg.model_type == "qin" and cfg.use_stage2:  # K2 attended behaviours, all reported
        has = (out[F.RSU_SELECTED_INDEX] >= 0).any(-1)
        np.testing.assert_allclose(out[F.RSU_SELECTED_WEIGHT].sum(-1)[has], 1.0, rtol=1e-5)


def single_candidate(batch, b, n):
    out = {}
    for name, value in batch.items():
        if name in F.CANDIDATE_FEATURES or name.startswith(("label_", "prob_")):
            out[name] = value[b:b + 1, n:n + 1]
        elif name == F.NUM_CANDIDATES:
            out[name] = tf.ones([1], value.dtype)
        else:
            out[name] = value[b:b + 1]
    return out


@pytest.mark.parametrize("name", ["qin", "qin_no_stage2", "din", "sim_hard", "sim_soft", "twin"])
def test_candidates_are_scored_independently(data, name):
    cfg = small(name)
    model = build(data, cfg)
    batch = data["batch"]
    full = numpy_outputs(model(batch))
    counts = batch[F.NUM_CANDIDATES].numpy()
    checked = 0
    for b in range(3):
        for n in range(counts[b]):
            one = numpy_outputs(model(single_candidate(batch, b, n)))
            for key in list(data["metadata"].tasks) + [F.SCORE, F.RSU_SELECTED_WEIGHT]:
                np.testing.assert_allclose(one[key][0, 0], full[key][b, n], rtol=1e-4,
                                           atol=1e-5, err_msg=key)
            assert np.array_equal(one[F.RSU_SELECTED_INDEX][0, 0], full[F.RSU_SELECTED_INDEX][b, n])
            checked += 1
    assert checked >= 6


def check_independent_and_padding_inert(model, data, full):
    """Each candidate scored alone gives its outputs in `full` (the whole batch's), and random
    values in padded slots change no valid output."""
    batch = data["batch"]
    for b, n in ((0, 0), (1, 1), (2, 0)):
        one = numpy_outputs(model(single_candidate(batch, b, n)))
        for task in data["metadata"].tasks:
            np.testing.assert_allclose(one[task][0, 0], full[task][b, n], rtol=1e-4, atol=1e-5)
    scrambled = numpy_outputs(model(scramble_padding(batch, data["metadata"])))
    valid = F.candidate_mask(batch).numpy()
    for task in data["metadata"].tasks:
        np.testing.assert_allclose(scrambled[task][valid], full[task][valid], rtol=1e-5,
                                   atol=1e-6)


def test_interest_intensity_keeps_candidates_independent_and_padding_inert(data):
    cfg = small("qin", interest_intensity_units=4)
    model = build(data, cfg)
    assert model.long_term_unit.output_units == cfg.hidden_units + 2 + 4
    plain = build(data, small("qin", interest_intensity_units=0))
    assert model.count_params() > plain.count_params()
    batch = data["batch"]
    full = numpy_outputs(model(batch))
    check_independent_and_padding_inert(model, data, full)


def test_interest_centroids_keep_candidates_independent_and_padding_inert(data):
    cfg = small("qin", interest_centroid_units=3)
    model = build(data, cfg)
    plain = build(data, small("qin"))
    assert model.interest_centroids is not None and plain.interest_centroids is None
    assert model.count_params() > plain.count_params()
    batch = data["batch"]
    full = numpy_outputs(model(batch))
    assert not np.allclose(full["click"], numpy_outputs(plain(batch))["click"])
    check_independent_and_padding_inert(model, data, full)
    with pytest.raises(ValueError, match="interest_centroid_units"):
        small("qin", interest_centroid_units=-1)


def scramble_padding(batch, metadata, seed=0):
    """Writes random but well-formed values into every padded slot (as TF Serving's batching
    may), leaving the valid prefix of every list untouched."""
    rng = np.random.default_rng(seed)
    out = dict(batch)
    for seq in F.SEQUENCES:
        lengths = batch[F.seq_feature(seq, F.SEQ_LENGTH)].numpy()
        for field in F.SEQ_FIELDS:
            name = F.seq_feature(seq, field)
            value = batch[name].numpy().copy()
            pad = np.arange(value.shape[1])[None, :] >= lengths[:, None]
            high = {F.SEQ_ITEM: metadata.num_items, F.SEQ_AUTHOR: metadata.num_authors,
                    F.SEQ_CATEGORY: metadata.num_categories, F.SEQ_SOURCE: 2}.get(field)
            noise = (rng.integers(1, high + 1, size=value.shape) if high
                     else rng.random(size=value.shape) * 1e4)
            value[pad] = noise.astype(value.dtype)[pad]
            out[name] = tf.constant(value)
    counts = batch[F.NUM_CANDIDATES].numpy()
    for name in F.CANDIDATE_FEATURES:
        value = batch[name].numpy().copy()
        pad = np.arange(value.shape[1])[None, :] >= counts[:, None]
        value[pad] = rng.integers(1, 9, size=value.shape)[pad]
        out[name] = tf.constant(value)
    return out


@pytest.mark.parametrize("name", ["qin", "din", "sim_hard", "twin"])
def test_padding_values_cannot_change_outputs(data, name):
    model = build(data, small(name))
    batch = data["batch"]
    scrambled = scramble_padding(batch, data["metadata"])
    assert not np.array_equal(scrambled[F.seq_feature(F.LONG_TERM, F.SEQ_ITEM)].numpy(),
                              batch[F.seq_feature(F.LONG_TERM, F.SEQ_ITEM)].numpy())
    a, b = numpy_outputs(model(batch)), numpy_outputs(model(scrambled))
    valid = F.candidate_mask(batch).numpy()
    for key in a:
        np.testing.assert_allclose(b[key][valid], a[key][valid], rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def test_loss_is_weighted_masked_cross_entropy(data):
    weights = {"click": 1.0, "long_view": 0.5, "like": 2.0}
    model = build(data, small("qin", task_loss_weights=weights))
    batch = data["batch"]
    loss = float(model.compute_loss(batch))
    out = numpy_outputs(model(batch))
    mask = F.candidate_mask(batch).numpy()
    expected = 0.0
    for task, w in weights.items():
        p = out[task][mask].astype(np.float64)
        y = batch[F.label_feature(task)].numpy()[mask]
        expected += w * np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_score_formulas(data):
    batch = data["batch"]
    out = numpy_outputs(build(data, small("dnn"))(batch))
    expected = out["click"] * out["long_view"] ** 0.5 * out["like"] ** 0.5
    np.testing.assert_allclose(out[F.SCORE], expected, rtol=1e-4)
    cfg = small("dnn", score_formula="sum", score_weights={"click": 2.0, "like": 1.0})
    out = numpy_outputs(build(data, cfg)(batch))
    np.testing.assert_allclose(out[F.SCORE], 2 * out["click"] + out["like"], rtol=1e-5)


def test_config_round_trip_override_and_errors(tmp_path):
    assert set(C.PRESETS) == {"qin", "qin_no_stage1", "qin_no_stage2", "qin_no_engagement",
                              "qin_id_only", "dnn", "din", "sim_hard", "sim_soft", "twin"}
    assert len({C.preset(p).to_json() for p in C.PRESETS}) == len(C.PRESETS)
    cfg = C.preset("qin_id_only")
    cfg.save(str(tmp_path))
    assert C.ModelConfig.load(str(tmp_path)) == cfg
    assert json.loads((tmp_path / C.MODEL_CONFIG_FILE).read_text())["attention_fields"] == "id"
    over = cfg.override('{"k1": 50, "k2": 10, "score_weights": {"click": 1.0}}')
    assert (over.k1, over.k2, over.score_weights, over.attention_fields) == (
        50, 10, {"click": 1.0}, "id")
    path = tmp_path / "override.json"
    path.write_text('{"relevance_threshold": 0.2}')
    assert C.resolve("qin", str(path)).relevance_threshold == 0.2
    with pytest.raises(ValueError, match="unknown model config keys"):
        cfg.override('{"k3": 1}')
    with pytest.raises(ValueError, match="k2=30 exceeds k1=20"):
        cfg.override('{"k1": 20, "k2": 30}')
    with pytest.raises(ValueError, match="not valid JSON"):
        cfg.override("{k1: 3")
    with pytest.raises(ValueError, match="neither a JSON object nor an existing file"):
        cfg.override("no_such_file.json")
    with pytest.raises(ValueError, match="unknown model preset"):
        C.preset("qin2")
    with pytest.raises(ValueError, match="does not have"):
        C.preset("qin").override('{"task_loss_weights": {"purchase": 1}}').check_tasks(
            F.DEFAULT_TASKS)


def test_bad_item_embeddings_fail_fast(data):
    with pytest.raises(ValueError, match="expects"):
        M.build_model(C.preset("dnn"), data["metadata"], data["embeddings"][:-1])
    bad = data["embeddings"].copy()
    bad[0] = 1.0
    with pytest.raises(ValueError, match="row 0"):
        M.build_model(C.preset("dnn"), data["metadata"], bad)


def test_content_table_is_frozen_and_saved_weights_reload(data, tmp_path):
    cfg = small("qin")
    model = build(data, cfg)
    names = [v.name for v in model.trainable_variables]
    assert not any("item_content_embeddings" in n for n in names)
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3), run_eagerly=True)
    model.fit(data["train"].take(2), verbose=0)
    np.testing.assert_array_equal(model.embeddings.content_table.numpy(), data["embeddings"])
    model_dir = str(tmp_path / "model")
    cfg.save(model_dir)
    with pytest.raises(FileNotFoundError, match="has training finished"):
        M.load_trained_model(model_dir, data["dir"])
    model.save_weights(M.final_weights_path(model_dir), save_format="tf")
    reloaded = M.load_trained_model(model_dir, data["dir"])
    a, b = numpy_outputs(model(data["batch"])), numpy_outputs(reloaded(data["batch"]))
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=key)


CLEAN_LOAD = """
import json, sys
import numpy as np
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
inputs = dict(np.load(sys.argv[2]))
out = m.signatures["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()})
np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
"""


def test_exports_with_stock_ops_and_loads_in_clean_tensorflow(data, tmp_path):
    model = build(data, small("qin"))
    batch = {k: v for k, v in data["batch"].items() if v.dtype != tf.string
             and not k.startswith(("label_", "prob_"))}
    spec = {k: tf.TensorSpec([None] * v.shape.rank, v.dtype, name=k) for k, v in batch.items()}

    class Serving(tf.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        @tf.function(input_signature=[spec])
        def serve(self, features):
            return self.model(features)

    module = Serving(model)
    graph = module.serve.get_concrete_function().graph.as_graph_def()
    op_types = {node.op for node in graph.node}
    for function in graph.library.function:
        op_types |= {node.op for node in function.node_def}
    assert not any("scann" in op.lower() for op in op_types)
    export_dir = str(tmp_path / "export")
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve})
    np.savez(tmp_path / "in.npz", **{k: v.numpy() for k, v in batch.items()})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", CLEAN_LOAD, export_dir, str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npz")], check=True, timeout=120, env=env,
                   cwd=str(tmp_path))
    loaded = dict(np.load(tmp_path / "out.npz"))
    expected = numpy_outputs(model(batch))
    assert set(loaded) == set(expected)
    for key in expected:
        np.testing.assert_allclose(loaded[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["qin", "twin"])
def test_mixed_precision_outputs_float32_and_finite_gradients(data, name):
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build(data, small(name))
        with tf.GradientTape() as tape:
            loss = model.compute_loss(data["batch"], training=True)
        gradients = tape.gradient(loss, model.trainable_variables)
        out = model(data["batch"])
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert model.embeddings.content_table.dtype == tf.float32
    assert all(out[t].dtype == tf.float32 for t in data["metadata"].tasks)
    assert out[F.RSU_SELECTED_INDEX].dtype == tf.int32 and out[F.SCORE].dtype == tf.float32
    assert np.isfinite(float(loss))
    assert all(g is not None and np.all(np.isfinite(tf.convert_to_tensor(g).numpy()))
               for g in gradients)


def test_stage1_input_mode_and_empty_selection(data):
    import dataclasses

    batch = data["batch"]
    # the sequences are stage-1 selections of K1 = 12 (the small config's k1, which must match)
    metadata = dataclasses.replace(data["metadata"], long_term_mode="stage1",
                                   long_term_length=12, stage1_k=12)
    tf.keras.utils.set_random_seed(0)
    model = M.build_model(small("qin"), metadata, data["embeddings"])
    out = numpy_outputs(model(batch))
    index = out[F.RSU_SELECTED_INDEX]
    long_length = batch[F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)].numpy()
    assert np.all(index < 12) and (index >= 0).any()  # only the first K1 = 12 positions
    assert np.all(index < long_length[:, None, None])
    # A threshold no behaviour can pass: nothing selected, outputs still finite.
    model = build(data, small("qin", relevance_threshold=1.0))
    out = numpy_outputs(model(batch))
    assert np.all(out[F.RSU_SELECTED_INDEX] == -1) and np.all(out[F.RSU_SELECTED_WEIGHT] == 0)
    assert all(np.all(np.isfinite(out[t])) for t in list(data["metadata"].tasks) + [F.SCORE])


def test_missing_features_and_out_of_vocabulary_ids(data):
    model = build(data, small("qin"))
    batch = dict(data["batch"])
    with pytest.raises(ValueError, match="lacks features.*long_length"):
        model({k: v for k, v in batch.items() if k != F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)})
    unknown = dict(batch, **{F.CANDIDATE_ITEM: tf.zeros_like(batch[F.CANDIDATE_ITEM])})
    beyond = dict(batch, **{F.CANDIDATE_ITEM: tf.fill(tf.shape(batch[F.CANDIDATE_ITEM]),
                                                        tf.constant(10 ** 9, tf.int64))})
    a, b = numpy_outputs(model(unknown)), numpy_outputs(model(beyond))
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=key)


def test_k1_and_threshold_come_from_stage1_data_and_contradictions_are_refused():
    """Stage-1 data fixes K1 and eps (metadata.json); recent data leaves K1 to the config."""
    stage1 = F.DatasetMetadata(long_term_length=40, long_term_mode="stage1",
                               stage1_threshold=0.3)
    resolved = C.preset("qin").resolved_for(stage1)
    assert (resolved.k1, resolved.relevance_threshold) == (40, 0.3)
    same = C.preset("qin").override('{"k1": 40, "relevance_threshold": 0.3}')
    assert same.resolved_for(stage1).k1 == 40
    with pytest.raises(ValueError, match="k1=8.*stage1_k=40.*--stage1-k 8"):
        C.preset("qin").override('{"k1": 8, "k2": 4}').resolved_for(stage1)
    with pytest.raises(ValueError, match="relevance_threshold=0.5.*stage1_threshold=0.3"):
        C.preset("qin").override('{"relevance_threshold": 0.5}').resolved_for(stage1)
    recent = F.DatasetMetadata(long_term_length=40)
    assert C.preset("qin").resolved_for(recent).k1 == F.DEFAULT_STAGE1_K
    assert C.preset("qin").override('{"k1": 8, "k2": 4}').resolved_for(recent).k1 == 8
    with pytest.raises(ValueError, match="k2=20 exceeds k1=8"):
        C.preset("qin").override('{"k1": 8}')
    # the model builds its RSU with the data's K1, whatever the preset says
    model = M.build_model(C.preset("qin"), stage1, np.zeros((1, stage1.embedding_dim),
                                                            np.float32))
    assert model.rsu.k1 == 40 and model.rsu.threshold == 0.3 and model.rsu.precomputed_stage1


@pytest.fixture(scope="module")
def watch_data(tmp_path_factory):
    from tests.tiny_dataset import write_tiny_dataset

    directory = write_tiny_dataset(str(tmp_path_factory.mktemp("watch")),
                                   tasks=F.WATCH_TIME_TASKS)
    metadata = F.DatasetMetadata.load(directory)
    files = sorted(glob.glob(os.path.join(directory, "train", "*.tfrecord.gz")))
    batch = next(iter(tf.data.TFRecordDataset(files, compression_type="GZIP").batch(BATCH)
                      .map(lambda s: F.parse_examples(s, metadata))))
    return dict(metadata=metadata, batch=batch,
                embeddings=np.load(os.path.join(directory, F.ITEM_EMBEDDINGS_FILE)))


@pytest.mark.parametrize("method", C.WATCH_TIME_LOSSES)
def test_watch_time_head_outputs_seconds_and_its_loss_is_the_documented_one(watch_data, method):
    """The watch-time output is an expected play time in seconds (not a probability); the loss
    is the Poisson deviance on T / s, or YouTube's weighted logistic loss whose odds times
    P(no play) give E[T]; the default score ignores watch time."""
    cfg = small("dnn", watch_time_loss=method, watch_time_scale_s=10.0)
    model = build(watch_data, cfg)
    batch = watch_data["batch"]
    out = numpy_outputs(model(batch))
    mask = F.candidate_mask(batch).numpy()
    t = out[F.WATCH_TIME]
    assert t.shape == out["click"].shape and t.dtype == np.float32
    assert np.all(t[mask] > 0) and np.all(np.isfinite(t))
    assert np.max(t[mask]) > 1.0  # on the scale of seconds (s = 10 at initialisation)
    expected_score = out["click"] * out["long_view"] ** 0.5 * out["like"] ** 0.5
    np.testing.assert_allclose(out[F.SCORE], expected_score, rtol=1e-4)

    y = batch[F.label_feature(F.WATCH_TIME)].numpy()[mask].astype(np.float64) / 10.0
    pred = t[mask].astype(np.float64) / 10.0
    if method == "poisson":
        watch_loss = np.mean(pred - y * np.log(pred + 1e-7))
    else:
        odds = pred / (1.0 - out["click"][mask])
        q = odds / (1.0 + odds)
        played = (y > 0).astype(float)
        weight = np.where(y > 0, y, 1.0)
        watch_loss = np.sum(weight * -(played * np.log(q) + (1 - played) * np.log(1 - q))) \
            / len(y)
    binary_loss = 0.0
    for task in F.binary_tasks(watch_data["metadata"].tasks):
        p = out[task][mask].astype(np.float64)
        label = batch[F.label_feature(task)].numpy()[mask]
        binary_loss += np.mean(-(label * np.log(p) + (1 - label) * np.log(1 - p)))
    assert y.max() > 0  # the batch has plays: the watch term is not trivial
    np.testing.assert_allclose(float(model.compute_loss(batch)), binary_loss + watch_loss,
                               rtol=1e-4)


def test_tuned_weights_and_calibration_change_outputs_and_score(watch_data):
    from trainer import calibration as Cal

    model = build(watch_data, small("dnn"))
    batch = watch_data["batch"]
    before = numpy_outputs(model(batch))
    knots = Cal.Knots("isotonic", np.array([0.0, 1.0, 100.0]), np.array([2.0, 3.0, 50.0]))
    model.calibration.assign(F.WATCH_TIME, knots)
    model.set_score_weights({"click": 1.0, F.WATCH_TIME: 0.5})
    after = numpy_outputs(model(batch))
    np.testing.assert_allclose(after[F.WATCH_TIME], knots(before[F.WATCH_TIME]), rtol=1e-5)
    np.testing.assert_allclose(after["click"], before["click"])
    np.testing.assert_allclose(after[F.SCORE], after["click"] * after[F.WATCH_TIME] ** 0.5,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="purchase"):
        model.set_score_weights({"purchase": 1.0})
    with pytest.raises(ValueError, match="watch_time_loss"):
        small("dnn", watch_time_loss="mse")
