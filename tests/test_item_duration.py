"""The item-duration feature: the frozen table's rows against a NumPy reference, a candidate's
outputs follow its own item's duration only, the switch and old configs, and the reload path
(`load_trained_model`) rebuilding the same model from a data directory."""
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from common import features as F
from trainer import config as C
from trainer import model as M
from trainer.layers.embeddings import duration_feature_rows


def test_rows_are_standardised_log_durations_with_a_known_flag():
    seconds = np.array([0.0, 10.0, 0.0, 100.0, 1000.0], np.float32)
    rows = duration_feature_rows(seconds, 5)
    logs = [np.log1p(10.0), np.log1p(100.0), np.log1p(1000.0)]
    mean = sum(logs) / 3
    std = (sum((v - mean) ** 2 for v in logs) / 3) ** 0.5
    expected = np.array([[0, 0], [(logs[0] - mean) / std, 1], [0, 0],
                         [(logs[1] - mean) / std, 1], [(logs[2] - mean) / std, 1]], np.float32)
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)
    # row 0 is the unknown item whatever the file says
    assert not duration_feature_rows(np.array([5.0, 10.0]), 2)[0].any()


@pytest.mark.parametrize("seconds, message", [
    (np.ones(3), "expects"), (np.array([0.0, -1.0]), ">= 0"), (np.array([0.0, np.nan]), ">= 0")])
def test_bad_duration_tables_are_refused(seconds, message):
    with pytest.raises(ValueError, match=message):
        duration_feature_rows(seconds, 2)


@pytest.fixture(scope="module")
def watch_data(tmp_path_factory):
    from tests.tiny_dataset import write_tiny_dataset

    directory = write_tiny_dataset(str(tmp_path_factory.mktemp("duration_data")),
                                   tasks=F.WATCH_TIME_TASKS)
    metadata = F.DatasetMetadata.load(directory)
    files = sorted(glob.glob(os.path.join(directory, "train", "*.tfrecord.gz")))
    batch = next(iter(tf.data.TFRecordDataset(files, compression_type="GZIP").batch(8)
                      .map(lambda s: F.parse_examples(s, metadata))))
    return dict(dir=directory, metadata=metadata, batch=batch,
                embeddings=np.load(os.path.join(directory, F.ITEM_EMBEDDINGS_FILE)),
                durations=M.load_item_durations(directory, metadata))


def _config(**overrides):
    return C.ModelConfig(**{**C.preset("qin").to_dict(), "k1": 12, "k2": 5,
                            "id_embedding_dim": 8, "hidden_units": 16, "attention_units": 8,
                            "expert_units": [16], "tower_units": [8], **overrides}).validate()


def _build(data, config, durations):
    tf.keras.utils.set_random_seed(0)
    model = M.build_model(config, data["metadata"], data["embeddings"], durations)
    model(data["batch"])
    return model


def test_a_candidate_follows_its_own_items_duration_only(watch_data):
    assert watch_data["metadata"].item_durations and watch_data["durations"] is not None
    model = _build(watch_data, _config(), watch_data["durations"])
    assert model.uses_item_duration
    batch = watch_data["batch"]
    before = model(batch)
    items = batch[F.CANDIDATE_ITEM].numpy()
    valid = F.candidate_mask(batch).numpy()
    target = int(items[0, 0])
    rows = model.embeddings.duration_table.numpy()
    rows[target, 0] += 3.0  # a much longer video, every other row unchanged
    model.embeddings.duration_table.assign(rows)
    after = model(batch)
    other = valid & (items != target)
    assert other.any()
    for task in (F.WATCH_TIME, "click"):
        b, a = before[task].numpy(), after[task].numpy()
        assert not np.isclose(b, a, rtol=1e-6, atol=1e-7)[items == target].any(), task
        np.testing.assert_allclose(b[other], a[other], rtol=1e-6, atol=1e-7)


def test_switch_off_or_data_without_durations_builds_no_table(watch_data):
    import dataclasses

    off = _build(watch_data, _config(use_item_duration=False), watch_data["durations"])
    assert not off.uses_item_duration and off.embeddings.duration_table is None
    no_data = dataclasses.replace(watch_data["metadata"], item_durations=False)
    tf.keras.utils.set_random_seed(0)
    model = M.build_model(_config(), no_data, watch_data["embeddings"], watch_data["durations"])
    assert not model.uses_item_duration
    names = [v.name for v in off.variables]
    assert not any("duration" in n for n in names)


def test_a_config_saved_before_the_option_loads_with_it_off(tmp_path):
    raw = _config().to_dict()
    raw.pop("use_item_duration")
    (tmp_path / C.MODEL_CONFIG_FILE).write_text(json.dumps(raw))
    assert C.ModelConfig.load(str(tmp_path)).use_item_duration is False
    assert C.ModelConfig().use_item_duration is True  # new configs use durations


def test_missing_duration_file_is_named(watch_data, tmp_path):
    import shutil

    copy = str(tmp_path / "data")
    shutil.copytree(watch_data["dir"], copy)
    os.remove(os.path.join(copy, F.ITEM_DURATIONS_FILE))
    with pytest.raises(FileNotFoundError, match="item_durations.npy"):
        M.load_item_durations(copy, watch_data["metadata"])


def test_reload_from_the_data_directory_gives_the_same_outputs(watch_data, tmp_path):
    model = _build(watch_data, _config(), watch_data["durations"])
    model_dir = str(tmp_path / "model")
    model.config.save(model_dir)
    model.save_weights(M.final_weights_path(model_dir), save_format="tf")
    reloaded = M.load_trained_model(model_dir, watch_data["dir"])
    assert reloaded.uses_item_duration
    batch = watch_data["batch"]
    first, second = model(batch), reloaded(batch)
    for task in watch_data["metadata"].tasks:
        np.testing.assert_allclose(first[task].numpy(), second[task].numpy(), rtol=1e-5,
                                   atol=1e-6)
