"""`python -m serving.export` end to end on a QIN model trained-format directory and the tiny
dataset: published version layout, version numbering and immutability, atomicity under
interruption and SIGKILL, the real `saved_model_cli` (show --all, run --input_examples), the
warmup file (parses as PredictionLog, replays through the loaded model), and publication to a
remote filesystem (TensorFlow's ram://, standing in for gs://) where no copy is ever seen
half-done under a version number."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from common import features as F
from serving import export as E
from serving import signatures as S
from serving import warmup as W
from tests.helpers import REPO, subprocess_env

TOL = 1e-5
WARMUP_REQUESTS = 3


def _saved_model_cli():
    path = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    assert os.access(path, os.X_OK), f"{path} missing: the pinned tensorflow ships it"
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_dataset, tmp_path_factory):
    """A model directory in the trainer's output layout (config + final/ weights)."""
    import tensorflow as tf
    from trainer import config as TC, model as TM

    tf.random.set_seed(0)
    directory = str(tmp_path_factory.mktemp("model_dir"))
    metadata = F.DatasetMetadata.load(tiny_dataset)
    config = TC.preset("qin")
    config.k1, config.k2 = 10, 4
    config.validate().save(directory)
    model = TM.build_model(config, metadata,
                           np.load(os.path.join(tiny_dataset, F.ITEM_EMBEDDINGS_FILE)))
    model(TM.dummy_features(metadata))
    model.save_weights(TM.final_weights_path(directory), save_format="tf")
    return directory


@pytest.fixture(scope="module")
def trained_model(model_dir, tiny_dataset):
    """The model rebuilt from the directory the way the export CLI does it."""
    from trainer.model import load_trained_model

    return load_trained_model(model_dir, tiny_dataset)


@pytest.fixture(scope="module")
def published(model_dir, tiny_dataset, tmp_path_factory):
    """Version 1 written by the CLI (default verification on), with its summary."""
    base = str(tmp_path_factory.mktemp("models"))
    proc = subprocess.run(
        [sys.executable, "-m", "serving.export", "--model-dir", model_dir, "--data",
         tiny_dataset, "--base-path", base, "--warmup-requests", str(WARMUP_REQUESTS)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, json.loads(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def loaded(published):
    import tensorflow as tf

    base, summary, _ = published
    return tf.saved_model.load(summary["export_dir"])


def _test_requests(data_dir, count):
    return W.read_sample_requests(data_dir, count)


def test_help_explains_the_command():
    proc = subprocess.run([sys.executable, "-m", "serving.export", "--help"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for text in ("--model-dir", "--data", "--base-path", "--model-name", "--version",
                 "--warmup-requests", "atomically", "rank_listwise"):
        assert text in proc.stdout, text


def test_cli_publishes_a_complete_verified_version(published, tiny_dataset):
    base, summary, stderr = published
    model_root = os.path.join(base, "qin")
    assert summary["version"] == 1 and summary["export_dir"] == os.path.join(model_root, "1")
    assert sorted(os.listdir(model_root)) == ["1"]  # no temporary folder left behind
    version_dir = summary["export_dir"]
    for name in ("saved_model.pb", "fingerprint.pb", "variables/variables.index",
                 "assets.extra/tf_serving_warmup_requests"):
        assert os.path.exists(os.path.join(version_dir, name)), name
    assert summary["signatures"] == S.signature_names(F.DatasetMetadata.load(tiny_dataset).tasks)
    assert summary["warmup_records"] == WARMUP_REQUESTS * W.RECORDS_PER_REQUEST
    assert summary["verification"]["max_abs_difference"] <= TOL
    assert summary["verification"]["calls"] >= summary["warmup_records"]
    assert "verifying in a clean TensorFlow process" in stderr and "published" in stderr
    marker = E.read_completion_marker(version_dir)
    assert marker["version"] == 1 and S.SAVED_MODEL_FILE in marker["files"]


def test_versions_are_numbered_and_immutable(published, model_dir, trained_model, tiny_dataset):
    base, _, _ = published
    model_root = os.path.join(base, "qin")
    os.makedirs(os.path.join(model_root, "notes"))  # non-numeric folders are not versions
    assert E.numeric_versions(model_root) == [1] and E.next_version(model_root) == 2
    metadata = F.DatasetMetadata.load(tiny_dataset)
    summary = E.export_model(trained_model, metadata, base, "qin", sample_requests=_test_requests(
        tiny_dataset, 1), warmup_requests=1, verify=False, log=lambda _: None)
    assert summary["version"] == 2 and E.numeric_versions(model_root) == [1, 2]
    with pytest.raises(E.ExportError, match="immutable"):
        E.resolve_version(base, "qin", 2)
    with pytest.raises(E.ExportError, match="cannot be reached"):
        E.resolve_version("nosuchfs://bucket/models", "qin")
    # The CLI refuses an existing version before it loads anything, with an actionable message.
    proc = subprocess.run(
        [sys.executable, "-m", "serving.export", "--model-dir", model_dir, "--data",
         tiny_dataset, "--base-path", base, "--version", "1"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "omit --version" in proc.stderr
    assert E.numeric_versions(model_root) == [1, 2]


def test_an_interrupted_export_publishes_nothing(trained_model, tiny_dataset, tmp_path,
                                                 monkeypatch):
    metadata = F.DatasetMetadata.load(tiny_dataset)
    base = str(tmp_path / "interrupted")
    written = []

    def half_written(model, md, export_dir):  # Ctrl-C while the SavedModel is being written
        os.makedirs(os.path.join(export_dir, "variables"))
        with open(os.path.join(export_dir, S.SAVED_MODEL_FILE), "wb") as f:
            f.write(b"partial")
        written.append(export_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(E.S, "save_servable", half_written)
    with pytest.raises(KeyboardInterrupt):
        E.export_model(trained_model, metadata, base, "qin", sample_requests=_test_requests(
            tiny_dataset, 1), warmup_requests=1, verify=False, log=lambda _: None)
    assert written and os.path.basename(written[0]).startswith(E.TMP_PREFIX)
    assert os.listdir(os.path.join(base, "qin")) == []  # temporary folder removed too


def test_a_killed_export_leaves_no_numeric_folder(model_dir, tiny_dataset, tmp_path):
    base = str(tmp_path / "killed")
    model_root = os.path.join(base, "qin")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.export", "--model-dir", model_dir, "--data",
         tiny_dataset, "--base-path", base, "--warmup-requests", "1", "--no-verify"],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = [], time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            seen = E.leftover_temp_dirs(model_root)
            # Kill once the SavedModel is being written into the temporary folder.
            if seen and os.listdir(os.path.join(model_root, seen[0])):
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert seen, "the export never started writing (or finished before it could be killed)"
    names = os.listdir(model_root)
    assert not [n for n in names if re.fullmatch(r"\d+", n)], names
    assert E.leftover_temp_dirs(model_root) == seen and E.next_version(model_root) == 1


def _show_blocks(text):
    """signature name -> its block of `saved_model_cli show --all` output."""
    parts = re.split(r"^signature_def\['([^']+)'\]:\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_saved_model_cli_show_all_lists_every_signature(published, tiny_dataset):
    _, summary, _ = published
    metadata = F.DatasetMetadata.load(tiny_dataset)
    proc = subprocess.run([_saved_model_cli(), "show", "--dir", summary["export_dir"], "--all"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    blocks = _show_blocks(proc.stdout)
    for name, method in S.signature_methods(metadata.tasks).items():
        assert name in blocks, name
        assert f"Method name is: {method}" in blocks[name], name
    for name in S.example_signature_names(metadata.tasks):
        assert "inputs['inputs'] tensor_info:\n        dtype: DT_STRING" in blocks[name]
    for task in metadata.tasks:
        block = blocks[S.classify_signature(task)]
        assert "outputs['scores']" in block and "outputs['classes']" in block
    assert "outputs['outputs']" in blocks[S.regress_signature(S.SCORE)]
    for key in S.listwise_input_names():
        assert f"inputs['{key}'] tensor_info" in blocks[S.RANK_LISTWISE], key
    for key in S.predict_output_keys(metadata.tasks, listwise=True):
        assert f"outputs['{key}'] tensor_info" in blocks[S.RANK_LISTWISE], key
    assert f"outputs['{S.SCORE}'] tensor_info" in blocks[S.SERVING_DEFAULT]


def _feature_dict(example):
    """A tf.train.Example as the Python literal saved_model_cli --input_examples takes."""
    out = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        if not values:
            continue  # saved_model_cli infers the type from the first value
        if kind == "bytes_list":
            values = [v.decode() for v in values]
        elif kind == "float_list":
            values = [float(v) for v in values]
        else:
            values = [int(v) for v in values]
        out[name] = values
    return out


def test_saved_model_cli_run_input_examples_on_serving_default(published, loaded, tiny_dataset):
    import tensorflow as tf

    _, summary, _ = published
    metadata = F.DatasetMetadata.load(tiny_dataset)
    raw = _test_requests(tiny_dataset, 1)[0]
    examples = S.per_candidate_examples(raw, metadata)[:3]
    literal = [_feature_dict(tf.train.Example.FromString(e)) for e in examples]
    assert all(F.seq_feature(F.LONG_TERM, F.SEQ_ITEM) in d for d in literal)
    proc = subprocess.run(
        [_saved_model_cli(), "run", "--dir", summary["export_dir"], "--tag_set", "serve",
         "--signature_def", S.SERVING_DEFAULT, "--input_examples", f"inputs={literal!r}"],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(re.findall(r"Result for output key (\w+):\s*\n\[([^\]]*)\]", proc.stdout))
    assert set(printed) == set(S.predict_output_keys(metadata.tasks, listwise=False))
    got = {k: np.array(v.split(), dtype=np.float64) for k, v in printed.items()}
    expected = loaded.signatures[S.SERVING_DEFAULT](
        inputs=tf.constant(examples, dtype=tf.string))
    listwise = loaded.signatures[S.RANK_LISTWISE](**{
        k: tf.constant(v) for k, v in S.listwise_inputs([S.request_from_example(raw)],
                                                        metadata).items()})
    for key in printed:
        assert got[key].shape == (len(examples),), key
        np.testing.assert_allclose(got[key], expected[key].numpy(), atol=TOL)
        np.testing.assert_allclose(got[key], listwise[key].numpy()[0, :len(examples)], atol=TOL)


def test_warmup_file_holds_real_requests_and_replays(published, loaded, tiny_dataset):
    import tensorflow as tf

    _, summary, _ = published
    metadata = F.DatasetMetadata.load(tiny_dataset)
    logs = W.read_warmup(summary["export_dir"])
    assert 0 < len(logs) == WARMUP_REQUESTS * W.RECORDS_PER_REQUEST <= W.MAX_WARMUP_RECORDS
    kinds = [log.WhichOneof("log_type") for log in logs]
    assert kinds.count("predict_log") == 2 * WARMUP_REQUESTS
    for kind in ("classify_log", "regress_log", "multi_inference_log"):
        assert kinds.count(kind) == WARMUP_REQUESTS, kind
    samples = _test_requests(tiny_dataset, WARMUP_REQUESTS)
    listwise_logs = [log.predict_log.request for log in logs if log.HasField("predict_log")
                     and log.predict_log.request.model_spec.signature_name == S.RANK_LISTWISE]
    for request, raw in zip(listwise_logs, samples):  # built from the test split, in order
        assert request.model_spec.name == "qin"
        items = tf.make_ndarray(request.inputs[F.CANDIDATE_ITEM])[0]
        assert items.tolist() == list(S.request_from_example(raw)[F.CANDIDATE_ITEM])
    # Replay every record through the loaded version; the listwise and per-example paths of
    # the same request must agree, so a replay through the wrong signature would show.
    calls = W.warmup_calls(logs)
    assert {name for name, _ in calls} == set(S.signature_names(metadata.tasks))
    outputs = []
    for name, inputs in calls:
        out = loaded.signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
        out = {k: v.numpy() for k, v in out.items()}
        for key, value in out.items():
            assert value.dtype.kind in "SO" or np.all(np.isfinite(value)), (name, key)
        outputs.append((name, out))
    per_request = len(calls) // WARMUP_REQUESTS
    for r in range(WARMUP_REQUESTS):
        chunk = dict((n, o) for n, o in outputs[r * per_request:(r + 1) * per_request])
        n = chunk[S.SERVING_DEFAULT][S.SCORE].shape[0]
        np.testing.assert_allclose(chunk[S.RANK_LISTWISE][S.SCORE][0, :n],
                                   chunk[S.SERVING_DEFAULT][S.SCORE], atol=TOL)
        np.testing.assert_allclose(chunk[S.regress_signature(S.SCORE)][S.REGRESS_OUTPUTS],
                                   chunk[S.SERVING_DEFAULT][S.SCORE], atol=TOL)
        task = metadata.tasks[0]
        np.testing.assert_allclose(chunk[S.classify_signature(task)][S.CLASSIFY_SCORES][:, 1],
                                   chunk[S.SERVING_DEFAULT][task], atol=TOL)


# ---- remote base paths (gs:// in production; TensorFlow's in-memory ram:// filesystem here) ----
def _remote_files(folder, relative_paths):
    """relative path -> size of those of `relative_paths` that exist under a tf.io.gfile folder
    (named one by one: the ram:// filesystem lists `assets.extra` inside `assets`)."""
    import tensorflow as tf

    return {rel: tf.io.gfile.stat(f"{folder}/{rel}").length for rel in relative_paths
            if tf.io.gfile.exists(f"{folder}/{rel}")}


def _model_root_view(model_root, relative_paths):
    """Child folder of the model root -> its files among `relative_paths`, with sizes."""
    import tensorflow as tf

    return {child.rstrip("/"): _remote_files(f"{model_root}/{child.rstrip('/')}", relative_paths)
            for child in tf.io.gfile.listdir(model_root)}


def _record_every_copy(monkeypatch, model_root, relative_paths, interrupt_at=None):
    """After each file copy, the model root as a server polling it would see it; raises
    KeyboardInterrupt instead of the copy for which `interrupt_at(destination)` is true."""
    snapshots, copy = [], E._copy_file

    def recording_copy(source, destination):
        if interrupt_at is not None and interrupt_at(destination):
            raise KeyboardInterrupt
        copy(source, destination)
        snapshots.append(_model_root_view(model_root, relative_paths))

    monkeypatch.setattr(E, "_copy_file", recording_copy)
    return snapshots


def _staged_version(local_version_dir, parent):
    """A copy of a published local version as the export stages it (no marker yet)."""
    staging = os.path.join(parent, f"{E.TMP_PREFIX}1-test")
    shutil.copytree(local_version_dir, staging)
    os.remove(os.path.join(staging, E.COMPLETION_MARKER))
    return staging


def test_a_remote_base_path_publishes_a_loadable_version_that_is_never_seen_half_copied(
        published, trained_model, loaded, tiny_dataset, tmp_path, monkeypatch):
    import tensorflow as tf

    metadata = F.DatasetMetadata.load(tiny_dataset)
    base = f"ram://exports-{uuid.uuid4().hex}/models"
    model_root = base + "/qin"
    expected_files = E.staged_files(_staged_version(published[1]["export_dir"], tmp_path))
    snapshots = _record_every_copy(monkeypatch, model_root,
                                   expected_files + [E.COMPLETION_MARKER])
    summary = E.export_model(trained_model, metadata, base, "qin",
                             sample_requests=_test_requests(tiny_dataset, WARMUP_REQUESTS),
                             warmup_requests=WARMUP_REQUESTS, verify=True, log=lambda _: None)
    final_dir = model_root + "/1"
    assert summary["version"] == 1 and summary["export_dir"] == final_dir
    assert summary["verification"]["max_abs_difference"] <= TOL  # verified before the upload
    # The upload went to a non-numeric folder; the version folder is all that remains.
    assert tf.io.gfile.listdir(model_root) == ["1"] and E.numeric_versions(model_root) == [1]
    marker = E.read_completion_marker(final_dir)
    assert marker["version"] == 1 and marker["model_name"] == "qin"
    assert sorted(marker["files"]) == sorted(expected_files)
    assert _remote_files(final_dir, expected_files) == marker["files"]
    assert len(snapshots) == 2 * len(expected_files)  # the upload, then the copy to "1"
    for number, snapshot in enumerate(snapshots):
        numeric = {name: files for name, files in snapshot.items() if name.isdigit()}
        (staged,) = [files for name, files in snapshot.items() if name.startswith(E.TMP_PREFIX)]
        assert not any(E.COMPLETION_MARKER in files for files in snapshot.values()), \
            "the completion marker must be written last"
        if number < len(expected_files):
            assert not numeric, f"a version folder appeared during the upload: {numeric}"
            continue
        assert staged == marker["files"], "the copy to the version starts after a full upload"
        assert list(numeric) == ["1"]
        if S.SAVED_MODEL_FILE in numeric["1"]:  # loadable only once every file is whole
            assert numeric["1"] == marker["files"]
    # The published version loads from the remote filesystem and scores like the local one.
    remote = tf.saved_model.load(final_dir)
    calls = W.warmup_calls(W.read_warmup(final_dir))
    assert {name for name, _ in calls} == set(S.signature_names(metadata.tasks))
    for name, inputs in calls:
        tensors = {k: tf.constant(v) for k, v in inputs.items()}
        got, want = remote.signatures[name](**tensors), loaded.signatures[name](**tensors)
        for key, value in want.items():
            if value.dtype != tf.string:
                np.testing.assert_allclose(got[key].numpy(), value.numpy(), atol=TOL)


@pytest.mark.parametrize("phase", ["upload", "version copy"])
def test_an_interrupted_remote_publish_leaves_no_version_and_no_temporary_folder(
        published, tmp_path, monkeypatch, phase):
    import tensorflow as tf

    staging = _staged_version(published[1]["export_dir"], str(tmp_path))
    model_root = f"ram://interrupted-{uuid.uuid4().hex}/models/qin"
    files = E.staged_files(staging)
    assert files[-1] == S.SAVED_MODEL_FILE  # copied last

    seen = []

    def second_copy_of_phase(destination):
        in_version = destination.startswith(model_root + "/1/")
        if in_version == (phase == "version copy"):
            seen.append(destination)
        return len(seen) == 2

    snapshots = _record_every_copy(monkeypatch, model_root, files, second_copy_of_phase)
    with pytest.raises(KeyboardInterrupt):
        E.publish_remote(staging, model_root, model_root + "/1", 1, "qin", log=lambda _: None)
    if phase == "version copy":  # the version folder had started to fill in
        assert snapshots[-1]["1"] and S.SAVED_MODEL_FILE not in snapshots[-1]["1"]
    else:
        assert snapshots and not any(name.isdigit() for s in snapshots for name in s)
    assert tf.io.gfile.listdir(model_root) == []
    assert E.numeric_versions(model_root) == [] and E.next_version(model_root) == 1


def test_cli_names_a_remote_filesystem_it_cannot_reach_before_loading(
        model_dir, tiny_dataset, monkeypatch, capsys):
    monkeypatch.setattr(E.signal, "signal", lambda *args: None)  # keep pytest's handlers
    code = E.main(["--model-dir", model_dir, "--data", tiny_dataset,
                   "--base-path", "nosuchfs://bucket/models"])
    assert code == 2
    assert "nosuchfs://bucket/models" in capsys.readouterr().err
