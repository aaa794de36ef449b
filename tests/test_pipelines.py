"""The Kubeflow pipeline: the committed YAML is what the code compiles to (with the retrieval
steps in their order), and the same pipeline runs end to end on this machine through kfp.local
on tiny generated data: ranker, item-to-item table, PDR, release gate, both exports."""
import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_YAML = os.path.join(REPO, "pipelines", "qin_pipeline.yaml")


def _env():
    env = dict(os.environ)
    for variable in ("QIN_PIPELINE_IMAGE", "QIN_TRAINER_IMAGE"):
        env.pop(variable, None)  # the committed YAML uses the default image names
    env["PYTHONPATH"] = REPO
    return env


def _without_sdk_version(text):
    # The compiling SDK's patch release (requirements pin kfp 2.17.*) is not part of the
    # pipeline definition; every other line is.
    return "\n".join(line for line in text.splitlines() if not line.startswith("sdkVersion:"))


def test_compiled_yaml_matches_the_committed_one(tmp_path):
    out = tmp_path / "pipeline.yaml"
    subprocess.run([sys.executable, "-m", "pipelines.compile", "--output", str(out)],
                   check=True, cwd=REPO, env=_env(), capture_output=True)
    assert _without_sdk_version(out.read_text()) == _without_sdk_version(
        open(COMMITTED_YAML).read()), (
        "pipelines/qin_pipeline.yaml is stale: run `python -m pipelines.compile --output "
        "pipelines/qin_pipeline.yaml`")
    assert "sdkVersion: kfp-2.17." in out.read_text()
    spec = yaml.safe_load(out.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {"acquire-raw-logs", "preprocess", "train", "evaluate", "build-item-to-item",
            "train-pdr", "evaluate-retrieval", "release-gate"} <= set(tasks)

    def after(task):
        return set(tasks[task].get("dependentTasks", []))

    assert "preprocess" in after("build-item-to-item") and "preprocess" in after("train-pdr")
    assert {"build-item-to-item", "train-pdr"} <= after("evaluate-retrieval")
    assert {"evaluate", "evaluate-retrieval"} <= after("release-gate")
    gate_inputs = tasks["release-gate"]["inputs"]["artifacts"]
    assert gate_inputs["retrieval_metrics"]["taskOutputArtifact"]["producerTask"] == \
        "evaluate-retrieval"
    assert tasks["evaluate-retrieval"]["inputs"]["parameters"]["split"]["runtimeValue"][
        "constant"] == "test"
    # both exports run only inside the release gate's condition, the retrieval export after the
    # ranking export, at the version the ranking export returns
    (gate,) = [t for t in tasks.values() if t.get("triggerPolicy", {}).get("condition")]
    assert "release-gate" in json.dumps(gate["triggerPolicy"])
    branch = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert set(branch) == {"export-model", "export-retrieval"}
    assert branch["export-retrieval"]["dependentTasks"] == ["export-model"]
    assert branch["export-retrieval"]["inputs"]["parameters"]["version"] == {
        "taskOutputParameter": {"outputParameterKey": "version", "producerTask": "export-model"}}
    executors = spec["deploymentSpec"]["executors"]
    # The GPU steps (QIN and PDR training) run on the GPU image
    # (dockerfiles/trainer.Dockerfile) with an accelerator and retries, the others on the CPU
    # one.
    gpu_steps = {"exec-train", "exec-train-pdr"}
    for name in gpu_steps:
        container = executors[name]["container"]
        assert container["resources"]["accelerator"]["count"] == "1"
        assert container["image"] == "qin-search-trainer:latest"
    for task in ("train", "train-pdr"):
        assert tasks[task]["retryPolicy"]["maxRetryCount"] == 2
    images = {name: e["container"]["image"] for name, e in executors.items()}
    assert {image for name, image in images.items() if name not in gpu_steps} == {
        "qin-search:latest"}


def _run_local(tmp_path, name, *flags, models=None):
    root, models = tmp_path / name / "runs", models or tmp_path / name / "models"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.run_local", "--pipeline-root", str(root),
         "--model-base-path", str(models), "--users", "40", "--items", "400",
         "--requests", "500", "--epochs", "1", "--batch-size", "32", "--pdr-epochs", "1",
         "--preprocess-workers", "1", "--long-term-length", "100", *flags],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(root / "*"))
    return run_dir, str(models), proc.stdout + proc.stderr


@pytest.mark.timeout(2400)  # two whole pipeline runs; more than the suite's 900 s on 2 cores
def test_local_run_produces_every_artifact_and_the_gate_decides_the_export(tmp_path):
    import tensorflow as tf

    # PDR after one epoch on tiny data may trail the content baseline: margin 1 for this run
    run_dir, models, _ = _run_local(tmp_path, "open", "--min-click-gauc", "0",
                                    "--min-click-auc", "0",
                                    "--max-pdr-recall-below-content", "1")
    raw = os.path.join(run_dir, "acquire-raw-logs", "raw")
    for name in ("items", "users", "behaviours", "requests"):
        assert os.path.getsize(os.path.join(raw, f"{name}.parquet")) > 0
    data = os.path.join(run_dir, "preprocess", "data")
    stats = json.load(open(os.path.join(data, "stats.json")))
    files = tf.io.gfile.glob(os.path.join(data, "train", "*.tfrecord.gz"))
    records = sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    assert records > 0 and os.path.exists(os.path.join(data, "feature_store.sqlite"))
    assert stats  # counts written by the Beam pipeline
    model = os.path.join(run_dir, "train", "model")
    assert os.path.exists(os.path.join(model, "model_config.json"))
    assert glob.glob(os.path.join(model, "final", "*"))
    metrics = json.load(open(os.path.join(run_dir, "evaluate", "metrics.json")))
    assert 0.0 <= metrics["model"]["tasks"]["click"]["auc"] <= 1.0
    assert "oracle" in metrics  # generated data carries the true probabilities
    assert "| predictor |" in open(os.path.join(run_dir, "evaluate", "report")).read()
    versions = os.listdir(os.path.join(models, "qin"))
    assert versions == ["1"]
    version = os.path.join(models, "qin", "1")
    assert os.path.exists(os.path.join(version, "saved_model.pb"))
    assert os.path.exists(os.path.join(version, "assets.extra", "tf_serving_warmup_requests"))
    # the evaluation is recorded beside the version: the next run's gate compares with it
    assert json.load(open(os.path.join(version, "assets.extra", "metrics.json"))) == metrics

    # retrieval: the i2i table in its own artifact (not inside the preprocess output), a PDR
    # model, its evaluation on the test split, and pdr_query/1 + pdr_index/1 beside qin/1
    from common.item_to_item import read_item_to_item, read_manifest

    table_dir = os.path.join(run_dir, "build-item-to-item", "item_to_item")
    assert read_manifest(table_dir)["algorithm"] == "itemcf-iuf" and read_item_to_item(table_dir)
    assert not os.path.exists(os.path.join(data, "item_to_item"))
    pdr = os.path.join(run_dir, "train-pdr", "pdr_model")
    assert os.path.exists(os.path.join(pdr, "pdr_config.json"))
    assert glob.glob(os.path.join(pdr, "final", "weights*"))
    retrieval = json.load(open(os.path.join(run_dir, "evaluate-retrieval", "metrics.json")))
    assert retrieval["run"]["split"] == "test" and retrieval["run"]["requests"] > 0
    for source in ("pdr", "content", "qrcf"):
        assert 0.0 <= retrieval[source]["recall@200"] <= 1.0
    decision = json.load(open(os.path.join(run_dir, "release-gate", "decision")))
    assert decision["blessed"] and "pdr_recall@200" in [c["metric"] for c in decision["checks"]]
    assert sorted(os.listdir(models)) == ["pdr_index", "pdr_query", "qin"]
    assert os.listdir(os.path.join(models, "pdr_query")) == ["1"]
    assert os.listdir(os.path.join(models, "pdr_index")) == ["1"]
    assert os.path.exists(os.path.join(models, "pdr_query", "1", "saved_model.pb"))
    index_manifest = json.load(open(os.path.join(models, "pdr_index", "1", "manifest.json")))
    assert index_manifest["version"] == 1 and index_manifest["ranking_model"] == "qin"
    assert index_manifest["items"] > 0
    assert json.load(open(os.path.join(version, "assets.extra", "retrieval_metrics.json"))) \
        == retrieval

    # The same logs ingested through input_uri into the same model base path, with a gain over
    # served version 1 no model can show and a PDR recall floor above 1: the gate compares
    # with version 1, fails on both, and neither export runs.
    _, _, log = _run_local(tmp_path, "closed", "--input-uri", raw, "--min-click-gauc", "0",
                           "--min-click-auc", "0", "--min-gain-over-served", "1.0",
                           "--min-pdr-recall", "1.01", "--max-pdr-recall-below-content", "1",
                           models=tmp_path / "open" / "models")
    assert "release gate vs served version 1" in log and "-> FAIL" in log
    assert "(version 1)" in log and "< 1.0100 (floor)" in log
    assert os.listdir(os.path.join(models, "qin")) == ["1"]
    assert os.listdir(os.path.join(models, "pdr_index")) == ["1"]
