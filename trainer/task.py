"""Training entry point: `python -m trainer.task --data OUT --model-dir M [--model qin]`.

Reads the request TFRecords of `python -m preprocessing` with tf.data (trainer/data.py), picks a
distribution strategy by itself (trainer/distribution.py), trains the ranking model of
`trainer.model.build_model` and writes:

  M/model_config.json    the ModelConfig (preset + --config overrides + seed)
  M/checkpoints/         BackupAndRestore state: a killed run restarted with the same command
                         continues from the last saved epoch (or step, --checkpoint-every-steps)
  M/checkpoints/eval_state.json   per-epoch eval metrics, best epoch, early-stopping counter
  M/final/weights.*      weights of the epoch with the best eval GAUC by request (click task)
  M/logs/train/          TensorBoard, training: batch_loss (every --log-every-steps steps),
                         epoch_loss and epoch_<task>_auc (per epoch, step = epoch number)
  M/logs/eval/           TensorBoard, evaluation per epoch: eval/gauc, eval/auc, eval/logloss
                         (first task, eval split, step = epoch number)
  M/training_summary.json   epochs run, global step, resume point, best epoch, history

Vertex AI: when set, AIP_MODEL_DIR replaces the default of --model-dir, AIP_CHECKPOINT_DIR the
default checkpoint directory and AIP_TENSORBOARD_LOG_DIR the default --log-dir.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Dict

import common  # noqa: F401  (tf-keras switch before TensorFlow loads)
from common.cli import HelpFormatter

logger = logging.getLogger("trainer")

EVAL_STATE_FILE = "eval_state.json"
SUMMARY_FILE = "training_summary.json"
CHECKPOINT_SUBDIR = "checkpoints"
LOG_SUBDIR = "logs"
EVAL_LOG_SUBDIR = "eval"  # under the TensorBoard directory, beside TensorBoard's train/
# eval-history key -> TensorBoard tag in LOG_DIR/eval
EVAL_SUMMARY_TAGS = {"eval_gauc": "eval/gauc", "eval_auc": "eval/auc",
                     "eval_logloss": "eval/logloss"}


# ---- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from common import features as F

    parser = argparse.ArgumentParser(
        prog="python -m trainer.task",
        description="Train a QIN (or baseline) search ranking model on the output of "
                    "`python -m preprocessing`. Resumable: re-running the same command after a "
                    "crash or preemption continues from the last checkpoint. Keeps the weights "
                    "of the epoch with the best eval GAUC (by request, first task) in "
                    "MODEL_DIR/final.",
        formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True,
                        help="preprocessing output directory (metadata.json, item_embeddings.npy, "
                             f"{'/'.join(F.SPLITS)}/*.tfrecord.gz); local or gs://")
    parser.add_argument("--model-dir", default=None,
                        help="output directory; default: $AIP_MODEL_DIR (Vertex AI)")
    parser.add_argument("--model", default="qin",
                        help="model preset of trainer.config (qin, qin_no_stage1, qin_no_stage2, "
                             "qin_no_engagement, qin_id_only, dnn, din, sim_hard, sim_soft, twin)")
    parser.add_argument("--config", default=None,
                        help="JSON object (or path to a .json file) overriding ModelConfig fields, "
                             "e.g. '{\"k1\": 200, \"k2\": 50}'")
    parser.add_argument("--epochs", type=int, default=5, help="maximum number of epochs")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="global batch size in *requests* (each with its candidate list); "
                             "split evenly over the replicas")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="training steps per epoch; default: one pass over the train split "
                             "(counted before training)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--cold-start-rate", type=float, default=None,
                        help="share of training requests whose history is hidden (half of them "
                             "also as an unknown user), so that new users and empty histories "
                             "get sensible probabilities; 0 turns it off (default: "
                             "trainer.data.DEFAULT_COLD_START_RATE, 0.05)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (weights, shuffling); default: the config's seed")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="mixed_float16 policy (float16 compute, float32 variables and "
                             "outputs, dynamic loss scaling); worth it on GPUs with tensor cores")
    parser.add_argument("--early-stopping-patience", type=int, default=0,
                        help="stop after this many epochs without a better eval GAUC "
                             "(0: never stop early)")
    parser.add_argument("--log-dir", default=None,
                        help="TensorBoard directory; default: $AIP_TENSORBOARD_LOG_DIR or "
                             "MODEL_DIR/logs")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="resumable training state; default: $AIP_CHECKPOINT_DIR or "
                             "MODEL_DIR/checkpoints")
    parser.add_argument("--checkpoint-every-steps", type=int, default=0,
                        help="also checkpoint every N steps inside an epoch (0: at epoch ends)")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="evaluate on at most N eval batches per epoch (default: all)")
    parser.add_argument("--eval-batch-size", type=int, default=256,
                        help="requests per batch when evaluating each epoch")
    parser.add_argument("--log-every-steps", type=int, default=100,
                        help="log progress (loss, requests/s) and TensorBoard scalars every N "
                             "steps")
    parser.add_argument("--strategy", default="auto",
                        choices=("auto", "default", "mirrored", "multi_worker"),
                        help="distribution strategy; auto: multi-worker when TF_CONFIG is set, "
                             "mirrored when several GPUs, else the default strategy")
    parser.add_argument("--cpu-replicas", type=int, default=1,
                        help="split the CPU into N logical devices (with --strategy mirrored: "
                             "N-replica training without GPUs, for checks and tests)")
    return parser


if __name__ == "__main__":
    # Answer --help and argument errors before the callback classes below import TensorFlow.
    build_parser().parse_args()


def resolve_dirs(args) -> Dict[str, str]:
    """model/checkpoint/log directories: explicit flag > Vertex AI variable > default."""
    model_dir = args.model_dir or os.environ.get("AIP_MODEL_DIR")
    if not model_dir:
        raise ValueError("--model-dir is required (or AIP_MODEL_DIR in the environment)")
    checkpoint_dir = (args.checkpoint_dir or os.environ.get("AIP_CHECKPOINT_DIR")
                      or os.path.join(model_dir, CHECKPOINT_SUBDIR))
    log_dir = (args.log_dir or os.environ.get("AIP_TENSORBOARD_LOG_DIR")
               or os.path.join(model_dir, LOG_SUBDIR))
    return {"model_dir": model_dir, "checkpoint_dir": checkpoint_dir, "log_dir": log_dir}


# ---- callbacks ---------------------------------------------------------------------------------
def _callbacks_base():
    import tensorflow as tf

    return tf.keras.callbacks.Callback


class EvalGaucCallback(_callbacks_base()):
    """After every epoch: GAUC by request (first task) on the eval split; keeps the best
    weights in final/, stops after `patience` epochs without improvement. Its state lives in
    the checkpoint directory, so a resumed run keeps the best score and the patience counter."""

    def __init__(self, make_eval_dataset, metadata, state_path, final_weights, patience,
                 max_batches, summary_dir, write_state):
        super().__init__()
        self.make_eval_dataset = make_eval_dataset
        self.metadata = metadata
        self.state_path = state_path
        self.final_weights = final_weights
        self.patience = patience
        self.max_batches = max_batches
        self.summary_dir = summary_dir
        self.write_state = write_state
        self.state = load_eval_state(state_path)
        self._writer = None
        self._infer = None

    def on_epoch_begin(self, epoch, logs=None):
        # a resumed epoch replaces whatever a killed run recorded for it
        self.state["history"] = [h for h in self.state["history"] if h["epoch"] <= epoch]

    def on_epoch_end(self, epoch, logs=None):
        from trainer import metrics as M
        from trainer.evaluate import make_infer_fn, predict_flat

        start = time.time()
        if self._infer is None:
            self._infer = make_infer_fn(self.model, self.metadata.tasks)
        flat = predict_flat(self.model, self.make_eval_dataset(), self.metadata,
                            max_batches=self.max_batches, infer=self._infer)
        task = self.metadata.tasks[0]
        gauc = M.grouped_auc(flat[f"label_{task}"], flat[f"pred_{task}"], flat["request_id"])
        auc = M.auc(flat[f"label_{task}"], flat[f"pred_{task}"])
        logloss = M.log_loss(flat[f"label_{task}"], flat[f"pred_{task}"])
        record = {"epoch": epoch + 1, "eval_gauc": gauc.value, "eval_auc": auc,
                  "eval_logloss": logloss, "gauc_groups": gauc.groups_used,
                  "train_loss": float((logs or {}).get("loss", float("nan")))}
        self.state["history"].append(record)
        improved = math.isfinite(gauc.value) and gauc.value > self.state["best_gauc"]
        if improved:
            self.state.update(best_gauc=gauc.value, best_epoch=epoch + 1, wait=0)
            self.model.save_weights(self.final_weights, save_format="tf")
        else:
            self.state["wait"] += 1
        logger.info("epoch %d: eval %s GAUC(request) %.4f AUC %.4f logloss %.4f over %d "
                    "groups (%.1fs)%s", epoch + 1, task, gauc.value, auc, logloss,
                    gauc.groups_used, time.time() - start,
                    " - best so far, saved to final/" if improved else
                    f" - best {self.state['best_gauc']:.4f} at epoch {self.state['best_epoch']}")
        if self.patience and self.state["wait"] >= self.patience:
            logger.info("early stopping: no better eval GAUC for %d epochs (best %.4f at epoch "
                        "%d)", self.patience, self.state["best_gauc"], self.state["best_epoch"])
            self.state["stopped_early"] = True
            self.model.stop_training = True
        if self.write_state:
            save_json(self.state_path, self.state)
            self._write_summaries(record, task)

    def _write_summaries(self, record, task):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.summary_dir)
        # record_if(True): during fit() the TensorBoard callback leaves a record_if(step %
        # update_freq == 0) condition active, which would drop these epoch-end scalars.
        with self._writer.as_default(step=record["epoch"]), tf.summary.record_if(True):
            for key, tag in EVAL_SUMMARY_TAGS.items():
                if math.isfinite(record[key]):
                    tf.summary.scalar(tag, record[key],
                                      description=f"{task}, eval split, after each epoch")
        self._writer.flush()


class ProgressLogger(_callbacks_base()):
    """Logs resume point, and loss / throughput every N steps (useful in non-TTY job logs)."""

    def __init__(self, every_steps, steps_per_epoch, epochs, batch_size):
        super().__init__()
        self.every = max(1, every_steps)
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.batch_size = batch_size
        self.start_step = None
        self.start_epoch = None
        self._t = None

    def on_train_begin(self, logs=None):
        self.start_step = int(self.model.optimizer.iterations.numpy())
        self._t, self._last_step = time.time(), self.start_step

    def on_epoch_begin(self, epoch, logs=None):
        self.on_epoch_begin_reset()
        if self.start_epoch is None:
            self.start_epoch = epoch
            if self.start_step:
                logger.info("resumed from checkpoint: global step %d, continuing at epoch %d/%d",
                            self.start_step, epoch + 1, self.epochs)
            else:
                logger.info("starting training from scratch: epoch 1/%d, %d steps per epoch",
                            self.epochs, self.steps_per_epoch)

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every == 0:
            now = time.time()
            step = int(self.model.optimizer.iterations.numpy())
            rate = (step - self._last_step) * self.batch_size / max(now - self._t, 1e-9)
            self._t, self._last_step = now, step
            logger.info("step %d/%d of epoch: loss %.4f, %.1f requests/s", batch + 1,
                        self.steps_per_epoch, float((logs or {}).get("loss", float("nan"))),
                        rate)

    def on_epoch_begin_reset(self):
        self._t, self._last_step = time.time(), int(self.model.optimizer.iterations.numpy())


def _tensorboard_base():
    import tensorflow as tf

    return tf.keras.callbacks.TensorBoard


class TrainScalarsTensorBoard(_tensorboard_base()):
    """Keras' TensorBoard callback writing one tag per quantity in LOG_DIR/train.

    The model's logs carry `loss` (mean over the epoch so far), `epoch_loss` (the metric behind
    it), `batch_loss` (this step's loss), `regularization_loss` and `<task>_auc`; Keras prefixes
    every key with `batch_` / `epoch_`, which gave `epoch_epoch_loss`, `batch_batch_loss` and an
    `epoch_batch_loss`. Here: batch_loss = the step's own loss every `update_freq` steps, and per
    epoch epoch_loss plus epoch_<task>_auc, at step = epoch number (1-based, as the eval/
    scalars and training_summary.json)."""

    BATCH_ONLY = ("batch_loss", "regularization_loss")
    DUPLICATES = ("epoch_loss",)

    def on_train_batch_end(self, batch, logs=None):
        if isinstance(logs, dict):
            step_loss = logs.get("batch_loss", logs.get("loss"))
            logs = {} if step_loss is None else {"loss": step_loss}
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: v for k, v in (logs or {}).items()
                if k not in self.BATCH_ONLY + self.DUPLICATES and not k.startswith("val_")}
        super().on_epoch_end(epoch + 1, logs)


# ---- helpers -----------------------------------------------------------------------------------
def load_eval_state(path: str) -> dict:
    import tensorflow as tf

    state = {"best_gauc": -math.inf, "best_epoch": 0, "wait": 0, "stopped_early": False,
             "history": []}
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            state.update(json.load(f))
    return state


def save_json(path: str, value) -> None:
    import tensorflow as tf

    tf.io.gfile.makedirs(os.path.dirname(path))
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def load_item_embeddings(data_dir: str):
    import numpy as np
    import tensorflow as tf

    from common import features as F

    path = os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: --data must be the output directory of "
                                f"`python -m preprocessing`")
    with tf.io.gfile.GFile(path, "rb") as f:
        return np.load(f)


# ---- training ----------------------------------------------------------------------------------
def train(args) -> dict:
    """Runs one training job described by parsed command-line `args`; returns the summary."""
    from trainer import distribution

    if args.cpu_replicas > 1:
        distribution.split_cpu(args.cpu_replicas)
    import tensorflow as tf

    from common import features as F
    from trainer import config as config_lib
    from trainer import data as data_lib
    from trainer import model as model_lib

    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    dirs = resolve_dirs(args)
    metadata = F.DatasetMetadata.load(args.data)
    config = config_lib.resolve(args.model, args.config)
    if args.seed is not None:
        config.seed = args.seed
    config = config.resolved_for(metadata)  # saved with the K1 the model really uses
    config.check_tasks(metadata.tasks)
    item_embeddings = load_item_embeddings(args.data)
    # the strategy first: multi-worker collectives must be configured before any op runs
    strategy = distribution.choose_strategy(args.strategy)
    # read before the seed is set: the read must not shift the seeded random state
    label_means = data_lib.label_means(args.data, metadata)
    tf.keras.utils.set_random_seed(config.seed)
    chief = distribution.is_chief()
    replicas = strategy.num_replicas_in_sync
    if args.batch_size % replicas:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {replicas} "
                         f"replicas in sync")

    steps_per_epoch = args.steps_per_epoch
    if steps_per_epoch is None:
        requests = data_lib.count_requests(args.data, "train")
        steps_per_epoch = max(1, math.ceil(requests / args.batch_size))
        logger.info("train split: %d requests -> %d steps per epoch of %d requests", requests,
                    steps_per_epoch, args.batch_size)
    data_lib.list_files(args.data, "eval")  # fail now, not after the first epoch

    if args.mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
        logger.info("mixed precision: mixed_float16 (variables and outputs float32)")
    if chief:
        tf.io.gfile.makedirs(dirs["model_dir"])
        config.save(dirs["model_dir"])

    cold_start_rate = (data_lib.DEFAULT_COLD_START_RATE if args.cold_start_rate is None
                       else args.cold_start_rate)

    def train_dataset_fn(input_context):
        return data_lib.make_dataset(
            args.data, "train", metadata, args.batch_size, shuffle=True, repeat=True,
            seed=config.seed, input_context=input_context, for_training=False,
            cold_start_rate=cold_start_rate)

    with strategy.scope():
        model = model_lib.build_model(config, metadata, item_embeddings,
                                      model_lib.load_item_durations(args.data, metadata))
        outputs = model(model_lib.dummy_features(metadata, 2, 2))  # creates the variables
        # overwritten by a resumed run's checkpoint; a fresh run starts at the base rates
        biases = model.initialize_output_bias(label_means)
        logger.info("output biases set to the train split's base rates: %s",
                    ", ".join(f"{t} {b:+.3f}" for t, b in biases.items()))
        optimizer = tf.keras.optimizers.Adam(learning_rate=args.learning_rate)
        model.compile(optimizer=optimizer)
    bad = {k: v.dtype.name for k, v in outputs.items()
           if k in metadata.tasks and v.dtype != tf.float32}
    if bad:
        logger.warning("model outputs are not float32 under this policy: %s", bad)

    final_dir = distribution.writable_dir(os.path.join(dirs["model_dir"],
                                                       model_lib.FINAL_WEIGHTS_DIR), strategy)
    final_weights = os.path.join(final_dir, model_lib.FINAL_WEIGHTS_PREFIX)
    state_path = os.path.join(dirs["checkpoint_dir"], EVAL_STATE_FILE)
    previous = load_eval_state(state_path)
    summary_path = os.path.join(dirs["model_dir"], SUMMARY_FILE)
    if previous.get("stopped_early"):
        logger.info("this run already stopped early at epoch %d (best eval GAUC %.4f at epoch "
                    "%d); nothing to do", previous["history"][-1]["epoch"] if previous["history"]
                    else 0, previous["best_gauc"], previous["best_epoch"])
        return _load_summary(summary_path, previous)

    def make_eval_dataset():
        return data_lib.make_dataset(args.data, "eval", metadata, args.eval_batch_size,
                                     for_training=False)

    log_dir = dirs["log_dir"] if chief else distribution.writable_dir(dirs["log_dir"], strategy)
    save_freq = args.checkpoint_every_steps if args.checkpoint_every_steps > 0 else "epoch"
    eval_callback = EvalGaucCallback(make_eval_dataset, metadata, state_path, final_weights,
                                     args.early_stopping_patience, args.eval_batches,
                                     os.path.join(log_dir, EVAL_LOG_SUBDIR), write_state=chief)
    progress = ProgressLogger(args.log_every_steps, steps_per_epoch, args.epochs,
                              args.batch_size)
    callbacks = [
        tf.keras.callbacks.BackupAndRestore(dirs["checkpoint_dir"], save_freq=save_freq,
                                            delete_checkpoint=False),
        progress,
        eval_callback,
        TrainScalarsTensorBoard(log_dir, update_freq=args.log_every_steps, profile_batch=0),
    ]
    logger.info("training %s (%s) on %s: model dir %s, checkpoints %s, TensorBoard %s",
                args.model, config.model_type, args.data, dirs["model_dir"],
                dirs["checkpoint_dir"], log_dir)
    start = time.time()
    train_input = tf.keras.utils.experimental.DatasetCreator(train_dataset_fn)
    history = model.fit(train_input, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                        callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 0)
    elapsed = time.time() - start
    state = eval_callback.state
    if not tf.io.gfile.exists(final_weights + ".index"):
        logger.warning("no epoch produced a finite eval GAUC; final/ holds the last weights")
        model.save_weights(final_weights, save_format="tf")
    global_step = int(model.optimizer.iterations.numpy())
    summary = {
        "model": args.model, "model_type": config.model_type, "seed": config.seed,
        "epochs_requested": args.epochs, "steps_per_epoch": steps_per_epoch,
        "epochs_completed": len(state["history"]), "global_step": global_step,
        "resumed_from_step": progress.start_step or 0,
        "resumed_at_epoch": (progress.start_epoch or 0) + 1 if progress.start_step else 0,
        "best_epoch": state["best_epoch"], "best_eval_gauc": state["best_gauc"],
        "stopped_early": bool(state.get("stopped_early")),
        "replicas": replicas, "strategy": distribution.strategy_name(strategy),
        "mixed_precision": bool(args.mixed_precision), "train_seconds_this_run": elapsed,
        "train_loss_this_run": [float(x) for x in history.history.get("loss", [])],
        "history": state["history"],
    }
    if chief:
        save_json(summary_path, summary)
    logger.info("done: %d epochs, global step %d, best eval GAUC %.4f at epoch %d (%.1fs)",
                summary["epochs_completed"], global_step, state["best_gauc"],
                state["best_epoch"], elapsed)
    return summary


def _load_summary(path: str, state: dict) -> dict:
    import tensorflow as tf

    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    return {"best_epoch": state["best_epoch"], "best_eval_gauc": state["best_gauc"],
            "history": state["history"], "stopped_early": True}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    try:
        train(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
