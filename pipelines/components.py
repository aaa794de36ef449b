"""KFP v2 components of the QIN flow. Each one runs one of the project's own command-line
modules (`python -m preprocessing ...`, `python -m trainer.task ...`) in the component's
container, so no logic lives here and a step behaves exactly as it does from a shell.

Lightweight components must be self-contained (KFP serialises the function body), hence the
imports inside each function and the small `_run` helper repeated as a nested function.
Two container images (see README, "On Vertex AI Pipelines"): the train and train_pdr steps run
on the GPU image of dockerfiles/trainer.Dockerfile (QIN_TRAINER_IMAGE), every other step on the
CPU image of the root Dockerfile (QIN_PIPELINE_IMAGE); set them before compiling.

A step never writes into an input artifact: the item-to-item table goes to its own artifact
(`preprocessing.item_to_item --output`), which the retrieval steps read by path.
"""
import os
from typing import NamedTuple

from kfp import dsl

PIPELINE_IMAGE = os.environ.get("QIN_PIPELINE_IMAGE", "qin-search:latest")
TRAINER_IMAGE = os.environ.get("QIN_TRAINER_IMAGE", "qin-search-trainer:latest")


def _component(func, image=PIPELINE_IMAGE):
    # No pip install per step: the image (or the local environment) already has the project.
    return dsl.component(base_image=image, install_kfp_package=False)(func)


def _gpu_component(func):
    return _component(func, image=TRAINER_IMAGE)


@_component
def acquire_raw_logs(input_format: str, input_uri: str, users: int, items: int, requests: int,
                     lifelong_users: int, seed: int, raw: dsl.Output[dsl.Dataset]) -> str:
    """Generates canonical logs when input_uri is empty, else checks the given logs exist.
    Returns the URI the preprocess step reads."""
    import subprocess
    import sys

    import tensorflow as tf

    if input_uri:
        if not tf.io.gfile.exists(input_uri):
            raise FileNotFoundError(f"input_uri {input_uri} does not exist")
        raw.metadata.update({"input_format": input_format, "source": input_uri})
        tf.io.gfile.makedirs(raw.path)
        with tf.io.gfile.GFile(raw.path + "/SOURCE", "w") as f:
            f.write(input_uri + "\n")
        return input_uri
    if input_format != "canonical":
        raise ValueError("generated data is in the canonical layout; set input_uri to read "
                         f"{input_format} logs")
    subprocess.run([sys.executable, "-m", "preprocessing.synthetic", "--output", raw.path,
                    "--users", str(users), "--items", str(items), "--requests", str(requests),
                    "--lifelong-users", str(lifelong_users), "--seed", str(seed)], check=True)
    raw.metadata.update({"input_format": "canonical", "source": "generated", "seed": seed})
    return raw.path


@_component
def preprocess(raw_uri: str, input_format: str, long_term_length: int, real_time_length: int,
               long_term_mode: str, workers: int, data: dsl.Output[dsl.Dataset]):
    """Beam preprocessing into TFRecords, vocabularies, stats and the feature store."""
    import json
    import subprocess
    import sys

    import tensorflow as tf

    subprocess.run([sys.executable, "-m", "preprocessing", "--input-format", input_format,
                    "--input", raw_uri, "--output", data.path,
                    "--long-term-length", str(long_term_length),
                    "--real-time-length", str(real_time_length),
                    "--long-term-mode", long_term_mode,
                    "--workers", str(workers)], check=True)
    with tf.io.gfile.GFile(data.path + "/stats.json") as f:
        stats = json.load(f)
    data.metadata.update({k: v for k, v in stats.items() if isinstance(v, (int, float, str))})


@_gpu_component
def train(data: dsl.Input[dsl.Dataset], model_preset: str, config_json: str, epochs: int,
          batch_size: int, seed: int, model: dsl.Output[dsl.Model]):
    """Trains one model preset; checkpoints make a retried step resume, not restart."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "trainer.task", "--data", data.path, "--model-dir", model.path,
           "--model", model_preset, "--epochs", str(epochs), "--batch-size", str(batch_size),
           "--seed", str(seed)]
    if config_json:
        cmd += ["--config", config_json]
    subprocess.run(cmd, check=True)
    model.metadata.update({"preset": model_preset, "framework": "tensorflow"})


@_component
def build_item_to_item(data: dsl.Input[dsl.Dataset], workers: int,
                       item_to_item: dsl.Output[dsl.Dataset]):
    """QRCF's item-to-item table (ItemCF-IUF, Beam) from the preprocessing output's feature
    store, behaviours before the eval split only, written to this step's own artifact."""
    import json
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "preprocessing.item_to_item", "--data", data.path,
                    "--output", item_to_item.path, "--workers", str(workers)], check=True)
    with open(item_to_item.path + "/manifest.json") as f:
        manifest = json.load(f)
    item_to_item.metadata.update({"algorithm": manifest["algorithm"],
                                  "before_ms": manifest["before_ms"],
                                  **{k: v for k, v in manifest["counts"].items()
                                     if k in ("items_with_neighbours", "neighbour_edges")}})


@_gpu_component
def train_pdr(data: dsl.Input[dsl.Dataset], config_json: str, epochs: int, batch_size: int,
              seed: int, pdr_model: dsl.Output[dsl.Model]):
    """Trains PDR (personalized dense retrieval, `python -m trainer.pdr_task`); its checkpoints
    make a retried step resume, not restart; the epoch with the best eval recall@100 is kept."""
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "trainer.pdr_task", "--data", data.path,
           "--model-dir", pdr_model.path, "--epochs", str(epochs),
           "--batch-size", str(batch_size), "--seed", str(seed)]
    if config_json:
        cmd += ["--config", config_json]
    subprocess.run(cmd, check=True)
    pdr_model.metadata.update({"model": "pdr", "framework": "tensorflow-recommenders"})
    summary = os.path.join(pdr_model.path, "training_summary.json")
    if os.path.exists(summary):
        with open(summary) as f:
            pdr_model.metadata.update({k: v for k, v in json.load(f).items()
                                       if isinstance(v, (int, float, str))})


@_component
def evaluate_retrieval(data: dsl.Input[dsl.Dataset], item_to_item: dsl.Input[dsl.Dataset],
                       pdr_model: dsl.Input[dsl.Model], split: str, max_requests: int,
                       metrics: dsl.Output[dsl.Metrics], report: dsl.Output[dsl.Markdown]):
    """Recall@{50,100,200,500} of the clicked items over the whole corpus, on the first
    `max_requests` requests of a split (0: all), for PDR, the content baseline, QRCF and their
    merge (`python -m trainer.evaluate_retrieval`); the release gate reads PDR and content."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile

    out = tempfile.mkdtemp()
    cmd = [sys.executable, "-m", "trainer.evaluate_retrieval", "--data", data.path,
           "--item-to-item", item_to_item.path, "--pdr-dir", pdr_model.path,
           "--split", split, "--output", out]
    if max_requests > 0:
        cmd += ["--max-requests", str(max_requests)]
    subprocess.run(cmd, check=True)
    with open(out + "/retrieval_metrics.json") as f:
        result = json.load(f)
    for source in ("pdr", "content", "qrcf", "merged"):
        for name, value in result.get(source, {}).items():
            if name.startswith("recall@") and isinstance(value, (int, float)):
                metrics.log_metric(f"{source}_{name.replace('@', '_at_')}", float(value))
    metrics.log_metric("requests", float(result["run"]["requests"]))
    shutil.copy(out + "/retrieval_metrics.md", report.path)
    shutil.copy(out + "/retrieval_metrics.json", metrics.path + ".json")


@_component
def evaluate(data: dsl.Input[dsl.Dataset], model: dsl.Input[dsl.Model], split: str,
             metrics: dsl.Output[dsl.Metrics], report: dsl.Output[dsl.Markdown]):
    """Evaluates on a held-out split: per-task AUC / log loss / GAUC for the model and, on
    generated data, the oracle (true probabilities); the Markdown table goes to `report`."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile

    out = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "trainer.evaluate", "--data", data.path,
                    "--model-dir", model.path, "--split", split, "--output", out], check=True)
    with open(out + "/metrics.json") as f:
        result = json.load(f)
    for predictor in ("model", "oracle"):
        for task, values in result.get(predictor, {}).get("tasks", {}).items():
            for name in ("auc", "logloss", "gauc_request", "gauc_user"):
                value = values.get(name)
                if value is not None:
                    metrics.log_metric(f"{predictor}_{task}_{name}", float(value))
    shutil.copy(out + "/metrics.md", report.path)
    shutil.copy(out + "/metrics.json", metrics.path + ".json")


@_component
def release_gate(metrics: dsl.Input[dsl.Metrics], retrieval_metrics: dsl.Input[dsl.Metrics],
                 model_base_path: str, model_name: str, min_click_gauc: float,
                 min_click_auc: float, min_gain_over_served: float, min_pdr_recall: float,
                 max_pdr_recall_below_content: float,
                 decision: dsl.Output[dsl.Artifact]) -> bool:
    """True when the candidate clears the floors and is not worse than the latest served
    version on the same split (floors only when nothing is served), and its PDR's recall@200
    clears its floor and is at most the margin below the content baseline's: `python -m
    pipelines.release_gate decide`. The pipeline exports only then; `decision` holds why."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipelines.release_gate", "decide",
                           "--metrics", metrics.path + ".json",
                           "--model-base-path", model_base_path, "--model-name", model_name,
                           "--min-click-gauc", str(min_click_gauc),
                           "--min-click-auc", str(min_click_auc),
                           "--min-gain-over-served", str(min_gain_over_served),
                           "--retrieval-metrics", retrieval_metrics.path + ".json",
                           "--min-pdr-recall", str(min_pdr_recall),
                           "--max-pdr-recall-below-content", str(max_pdr_recall_below_content),
                           "--output", decision.path], capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"pipelines.release_gate failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout)
    decision.metadata.update({"blessed": result["blessed"], "baseline": result["baseline"]})
    return bool(result["blessed"])


@_component
def export_model(data: dsl.Input[dsl.Dataset], model: dsl.Input[dsl.Model],
                 metrics: dsl.Input[dsl.Metrics], base_path: str, model_name: str,
                 exported: dsl.Output[dsl.Model]
                 ) -> NamedTuple("Outputs", [("export_dir", str), ("version", int)]):
    """Exports a new numeric version under base_path/model_name for TF Serving to pick up,
    then records the evaluation beside it (<version>/assets.extra/metrics.json), the baseline
    the next run's release gate compares with. Returns the version folder and number."""
    from collections import namedtuple
    import json
    import subprocess
    import sys

    # stdout is the export's JSON summary; its progress lines (stderr) stream as they come
    proc = subprocess.run([sys.executable, "-m", "serving.export", "--model-dir", model.path,
                           "--data", data.path, "--base-path", base_path,
                           "--model-name", model_name], stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError(f"serving.export failed with exit code {proc.returncode}")
    summary = json.loads(proc.stdout)
    subprocess.run([sys.executable, "-m", "pipelines.release_gate", "record",
                    "--metrics", metrics.path + ".json", "--version-dir", summary["export_dir"]],
                   check=True)
    exported.metadata.update({"model_name": model_name, "version": summary["version"],
                              "export_dir": summary["export_dir"]})
    with open(exported.path, "w") as f:
        json.dump(summary, f, indent=2)
    outputs = namedtuple("Outputs", ["export_dir", "version"])
    return outputs(summary["export_dir"], int(summary["version"]))


@_component
def export_retrieval(data: dsl.Input[dsl.Dataset], pdr_model: dsl.Input[dsl.Model],
                     retrieval_metrics: dsl.Input[dsl.Metrics], base_path: str,
                     model_name: str, version: int, exported: dsl.Output[dsl.Model]) -> str:
    """Exports PDR beside ranking version `version` (export_model's): the query tower to
    base_path/pdr_query/<version> and the corpus index to base_path/pdr_index/<version>
    (`python -m serving.export_retrieval`), then records the retrieval evaluation beside the
    ranking version (<model_name>/<version>/assets.extra/retrieval_metrics.json)."""
    import json
    import os
    import subprocess
    import sys

    # serving.export_retrieval writes through local file APIs: a gs:// base path goes through
    # the Cloud Storage FUSE mount that Vertex AI Pipelines gives every step (/gcs/BUCKET/...)
    local_base = base_path
    if base_path.startswith("gs://"):
        local_base = "/gcs/" + base_path[len("gs://"):]
        if not os.path.isdir("/gcs"):
            raise RuntimeError(f"cannot write the retrieval export to {base_path}: no Cloud "
                               "Storage FUSE mount (/gcs) in this step")
    proc = subprocess.run([sys.executable, "-m", "serving.export_retrieval",
                           "--pdr-dir", pdr_model.path, "--data", data.path,
                           "--base-path", local_base, "--version", str(version),
                           "--ranking-model-name", model_name], stdout=subprocess.PIPE,
                          text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        raise RuntimeError(f"serving.export_retrieval failed with exit code {proc.returncode}")
    # stdout: the JSON {index_dir, query_dir}, then one summary line
    summary = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
    subprocess.run([sys.executable, "-m", "pipelines.release_gate", "record",
                    "--metrics", retrieval_metrics.path + ".json",
                    "--version-dir", os.path.join(local_base, model_name, str(version)),
                    "--name", "retrieval_metrics.json"], check=True)
    summary["version"] = int(version)
    exported.metadata.update(summary)
    with open(exported.path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary["index_dir"]
