"""Choice of the tf.distribute strategy for training, and who writes the outputs.

`choose_strategy("auto")` picks, in this order:

* `MultiWorkerMirroredStrategy` when `TF_CONFIG` describes a cluster with more than one task
  (Vertex AI / Kubeflow set it for multi-replica jobs; the chief writes the outputs),
* `MirroredStrategy` over all GPUs when the machine has several,
* the default strategy otherwise (one GPU, or the CPU).

It can be forced with "default", "mirrored" or "multi_worker". `split_cpu(n)` divides the CPU
into n logical devices so that a mirrored run with n replicas works without GPUs (tests, and a
quick check of the distributed code path on a laptop); it must run before TensorFlow
initialises its devices.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Optional, Tuple

import tensorflow as tf

logger = logging.getLogger("trainer")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


def cluster_spec() -> Tuple[dict, Optional[str], int]:
    """(cluster, task_type, task_index) from TF_CONFIG; ({}, None, 0) when unset."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return {}, None, 0
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]}") from None
    cluster = config.get("cluster", {}) or {}
    task = config.get("task", {}) or {}
    return cluster, task.get("type"), int(task.get("index", 0))


def num_cluster_tasks() -> int:
    cluster, _, _ = cluster_spec()
    return sum(len(v) for k, v in cluster.items() if k in ("chief", "worker"))


def is_chief() -> bool:
    """True for the task that writes model_config.json, final/ and TensorBoard logs."""
    cluster, task_type, task_index = cluster_spec()
    if not cluster or task_type is None:
        return True
    if "chief" in cluster:
        return task_type == "chief"
    return task_type == "worker" and task_index == 0


def split_cpu(num_devices: int) -> None:
    """Splits the physical CPU into `num_devices` logical devices (before TF initialises)."""
    if num_devices <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError as e:  # devices already initialised
        raise RuntimeError(f"cannot split the CPU into {num_devices} devices: TensorFlow has "
                           f"already initialised its devices ({e})") from None


def choose_strategy(kind: str = "auto") -> tf.distribute.Strategy:
    """The strategy for `kind` (see the module docstring); logs the choice and why."""
    if kind not in STRATEGIES:
        raise ValueError(f"unknown strategy {kind!r}; choose one of {STRATEGIES}")
    tasks = num_cluster_tasks()
    if kind == "multi_worker" or (kind == "auto" and tasks > 1):
        if tasks == 0:
            raise ValueError("--strategy multi_worker needs TF_CONFIG describing the cluster")
        communication = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication)
        _, task_type, task_index = cluster_spec()
        logger.info("strategy: MultiWorkerMirroredStrategy (TF_CONFIG: %d tasks; this is %s:%d, "
                    "%d replicas in sync)", tasks, task_type, task_index,
                    strategy.num_replicas_in_sync)
        return strategy
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        if gpus:
            devices = [d.name for d in gpus]
        else:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        logger.info("strategy: MirroredStrategy over %d devices %s", len(devices), devices)
        return strategy
    strategy = tf.distribute.get_strategy()
    logger.info("strategy: default (%s)", f"1 GPU: {gpus[0].name}" if gpus else "CPU, no GPU")
    return strategy


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """A readable name (MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "MirroredStrategy"
    return "default" if not tf.distribute.has_strategy() and strategy is \
        tf.distribute.get_strategy() else type(strategy).__name__


def writable_dir(directory: str, strategy: tf.distribute.Strategy) -> str:
    """`directory` on the chief; a private temporary directory on other workers.

    Multi-worker saving is collective (every worker must call save), but only the chief's copy
    is kept; the others write to throw-away locations.
    """
    if is_chief() or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return directory
    _, task_type, task_index = cluster_spec()
    return tempfile.mkdtemp(prefix=f"{task_type}{task_index}_")
