"""Trains PDR, PR2's personalized dense retrieval: `python -m trainer.pdr_task --data OUT
--model-dir P [--config JSON]`.

The same machinery as the ranker's trainer (trainer/task.py): the request TFRecords through
`trainer.data.make_dataset`, the strategy of `trainer.distribution.choose_strategy`
(multi-worker from TF_CONFIG, mirrored over GPUs, `--cpu-replicas` for checks), resumable
BackupAndRestore checkpoints, TensorBoard, and Vertex AI's AIP_MODEL_DIR /
AIP_CHECKPOINT_DIR / AIP_TENSORBOARD_LOG_DIR. It writes:

  P/pdr_config.json       the PDRConfig (trainer/pdr.py)
  P/checkpoints/          resumable state (+ eval_state.json: per-epoch eval recall)
  P/final/weights.*       the weights of the epoch with the best eval recall@100 over the corpus
  P/logs/                 TensorBoard (train loss; eval recall under logs/eval)
  P/training_summary.json epochs, global step, resume point, best epoch, history

Every epoch the eval split's requests retrieve from the whole item corpus (the feature store's
items) and recall@100 of their clicked items is the selection metric.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional

import common  # noqa: F401  (tf-keras switch before TensorFlow loads)

logger = logging.getLogger("trainer")
SELECTION_METRIC = "recall@100"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.pdr_task",
        description="Train PDR (PR2's personalized dense retrieval: a TFRS dual encoder whose "
                    "query tower also sees the user profile and the query-attended behaviours) "
                    "on the output of `python -m preprocessing`. Resumable; keeps the epoch with "
                    "the best eval recall@100 over the item corpus in MODEL_DIR/final.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="preprocessing output directory")
    p.add_argument("--model-dir", default=None, help="output; default: $AIP_MODEL_DIR")
    p.add_argument("--config", default=None,
                   help="JSON object or .json path of PDRConfig fields, e.g. "
                        "'{\"hard_negatives\": \"mined\", \"use_user\": false}'; default: "
                        "MODEL_DIR/pdr_config.json when resuming, else PDRConfig's defaults")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128,
                   help="global batch in requests; every clicked candidate is a positive")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="default: one pass over the train split")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="evaluate on at most N eval batches per epoch (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--early-stopping-patience", type=int, default=0)
    p.add_argument("--log-dir", default=None,
                   help="TensorBoard; default: $AIP_TENSORBOARD_LOG_DIR or MODEL_DIR/logs")
    p.add_argument("--checkpoint-dir", default=None,
                   help="default: $AIP_CHECKPOINT_DIR or MODEL_DIR/checkpoints")
    p.add_argument("--checkpoint-every-steps", type=int, default=0)
    p.add_argument("--log-every-steps", type=int, default=50)
    p.add_argument("--strategy", default="auto",
                   choices=("auto", "default", "mirrored", "multi_worker"))
    p.add_argument("--cpu-replicas", type=int, default=1)
    return p


def request_vectors(model, dataset, max_batches: Optional[int] = None,
                    positive_task: str = "click") -> Dict[str, object]:
    """Query vectors and positive items (label of `positive_task`: clicked, long-viewed,
    liked) of every request of a parsed-feature dataset: {"vectors" [R, d], "clicked": list
    of item-index arrays, "request_id", "user_id", "request_time", "query_embedding" [R, D]}."""
    import numpy as np

    from common import features as F

    out: Dict[str, List] = {k: [] for k in ("vectors", "clicked", "request_id", "user_id",
                                            "request_time", "query_embedding")}
    for n, batch in enumerate(dataset):
        if max_batches is not None and n >= max_batches:
            break
        out["vectors"].append(model(batch).numpy())
        items = batch[F.CANDIDATE_ITEM].numpy()
        labels = batch[F.label_feature(positive_task)].numpy()
        count = batch[F.NUM_CANDIDATES].numpy()
        for r in range(items.shape[0]):
            c = int(count[r])
            out["clicked"].append(items[r, :c][labels[r, :c] > 0])
        out["request_id"] += [x.decode() for x in batch[F.REQUEST_ID].numpy()]
        out["user_id"] += [x.decode() for x in batch[F.USER_ID].numpy()]
        out["request_time"].append(batch[F.REQUEST_TIME].numpy())
        out["query_embedding"].append(batch[F.QUERY_EMBEDDING].numpy())
    dim = model.config.output_dim
    return {"vectors": np.concatenate(out["vectors"]) if out["vectors"] else
            np.zeros((0, dim), np.float32),
            "clicked": out["clicked"], "request_id": out["request_id"],
            "user_id": out["user_id"],
            "request_time": np.concatenate(out["request_time"]) if out["request_time"] else
            np.zeros(0, np.int64),
            "query_embedding": np.concatenate(out["query_embedding"])
            if out["query_embedding"] else np.zeros((0, 0), np.float32)}


def corpus_recall(model, dataset, ks=(50, 100, 200, 500), max_batches=None,
                  positive_task: str = "click") -> Dict[str, float]:
    """Recall@K of the positive items (clicked by default) when each request retrieves from
    the whole corpus."""
    from trainer import retrieval_metrics as RM

    requests = request_vectors(model, dataset, max_batches, positive_task)
    corpus = model.corpus_vectors()
    if not len(requests["clicked"]):
        return {f"recall@{k}": float("nan") for k in ks}
    top = RM.top_k_by_score(requests["vectors"] @ corpus.T, model.corpus_item.numpy(), max(ks))
    return RM.recall_at_k(top, requests["clicked"], ks)


def _callback_base():
    import tensorflow as tf

    return tf.keras.callbacks.Callback


class EvalRecallCallback(_callback_base()):
    """After every epoch: eval recall@K over the corpus; the best epoch's weights go to final/;
    early stopping after `patience` epochs without a better recall@100. State lives in the
    checkpoint directory, so a resumed run keeps its best score."""

    def __init__(self, make_eval_dataset, state_path, final_weights, patience, max_batches,
                 summary_dir, write_state):
        super().__init__()
        from trainer.task import load_eval_state

        self.make_eval_dataset = make_eval_dataset
        self.state_path = state_path
        self.final_weights = final_weights
        self.patience = patience
        self.max_batches = max_batches
        self.summary_dir = summary_dir
        self.write_state = write_state
        self.state = load_eval_state(state_path)
        self.state.setdefault("best_recall", -math.inf)
        self._writer = None

    def on_epoch_begin(self, epoch, logs=None):
        self.state["history"] = [h for h in self.state["history"] if h["epoch"] <= epoch]

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        from trainer.task import save_json

        start = time.time()
        recall = corpus_recall(self.model, self.make_eval_dataset(),
                               max_batches=self.max_batches)
        record = {"epoch": epoch + 1, **{f"eval_{k}": v for k, v in recall.items()},
                  "train_loss": float((logs or {}).get("loss", float("nan")))}
        self.state["history"].append(record)
        value = recall[SELECTION_METRIC]
        improved = math.isfinite(value) and value > self.state["best_recall"]
        if improved:
            self.state.update(best_recall=value, best_epoch=epoch + 1, wait=0)
            self.model.save_weights(self.final_weights, save_format="tf")
        else:
            self.state["wait"] += 1
        logger.info("epoch %d: eval %s (%.1fs)%s", epoch + 1,
                    ", ".join(f"{k} {v:.4f}" for k, v in recall.items()), time.time() - start,
                    " - best so far, saved to final/" if improved else "")
        if self.patience and self.state["wait"] >= self.patience:
            self.state["stopped_early"] = True
            self.model.stop_training = True
        if self.write_state:
            save_json(self.state_path, self.state)
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.summary_dir)
            with self._writer.as_default(step=epoch + 1):
                for key, v in recall.items():
                    if math.isfinite(v):
                        tf.summary.scalar(f"eval_{key}", v)
            self._writer.flush()


def train(args) -> dict:
    """One PDR training job described by parsed command-line `args`; returns the summary."""
    from trainer import distribution

    if args.cpu_replicas > 1:
        distribution.split_cpu(args.cpu_replicas)
    import tensorflow as tf

    from common import features as F
    from trainer import data as data_lib
    from trainer import pdr as pdr_lib
    from trainer.task import load_item_embeddings, resolve_dirs, save_json

    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    dirs = resolve_dirs(args)
    metadata = F.DatasetMetadata.load(args.data)
    if pdr_lib.CLICK_TASK not in metadata.tasks:
        raise ValueError(f"PDR learns from clicks; the dataset's tasks are {metadata.tasks}")
    saved = os.path.join(dirs["model_dir"], pdr_lib.CONFIG_FILE)
    if args.config is None and tf.io.gfile.exists(saved):
        config = pdr_lib.PDRConfig.load(dirs["model_dir"])  # a resumed run keeps its config
    else:
        config = pdr_lib.PDRConfig.from_json(args.config)
    if args.seed is not None:
        config.seed = args.seed
    item_embeddings = load_item_embeddings(args.data)
    corpus = pdr_lib.ItemCorpus.from_data_dir(args.data)
    probability = pdr_lib.sampling_probability(
        pdr_lib.click_counts(args.data, "train", metadata.num_items))
    tf.keras.utils.set_random_seed(config.seed)
    strategy = distribution.choose_strategy(args.strategy)
    chief = distribution.is_chief()
    if args.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the "
                         f"{strategy.num_replicas_in_sync} replicas in sync")
    steps_per_epoch = args.steps_per_epoch or max(1, math.ceil(
        data_lib.count_requests(args.data, "train") / args.batch_size))
    data_lib.list_files(args.data, "eval")
    if chief:
        tf.io.gfile.makedirs(dirs["model_dir"])
        config.save(dirs["model_dir"])

    def train_dataset_fn(input_context):
        return data_lib.make_dataset(args.data, "train", metadata, args.batch_size,
                                     shuffle=True, repeat=True, seed=config.seed,
                                     input_context=input_context, for_training=False)

    def make_eval_dataset():
        return data_lib.make_dataset(args.data, "eval", metadata, args.eval_batch_size,
                                     for_training=False)

    with strategy.scope():
        model = pdr_lib.build_pdr_model(config, metadata, item_embeddings, corpus, probability)
        model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=args.learning_rate))
    final_dir = distribution.writable_dir(
        os.path.join(dirs["model_dir"], pdr_lib.FINAL_WEIGHTS_DIR), strategy)
    final_weights = os.path.join(final_dir, pdr_lib.FINAL_WEIGHTS_PREFIX)
    log_dir = dirs["log_dir"] if chief else distribution.writable_dir(dirs["log_dir"], strategy)
    state_path = os.path.join(dirs["checkpoint_dir"], "eval_state.json")
    eval_callback = EvalRecallCallback(make_eval_dataset, state_path, final_weights,
                                       args.early_stopping_patience, args.eval_batches,
                                       os.path.join(log_dir, "eval"), write_state=chief)
    save_freq = args.checkpoint_every_steps if args.checkpoint_every_steps > 0 else "epoch"
    callbacks = [tf.keras.callbacks.BackupAndRestore(dirs["checkpoint_dir"], save_freq=save_freq,
                                                     delete_checkpoint=False),
                 pdr_lib.RefreshMiningTable(), eval_callback,
                 tf.keras.callbacks.TensorBoard(log_dir, update_freq=args.log_every_steps,
                                                profile_batch=0)]
    logger.info("training PDR (%s) on %s: %d steps per epoch of %d requests, model dir %s",
                config, args.data, steps_per_epoch, args.batch_size, dirs["model_dir"])
    started = time.time()
    history = model.fit(tf.keras.utils.experimental.DatasetCreator(train_dataset_fn),
                        epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                        callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 0)
    global_step = int(model.optimizer.iterations.numpy())
    start_step = global_step - len(history.history.get("loss", [])) * steps_per_epoch
    if not tf.io.gfile.exists(final_weights + ".index"):
        model.save_weights(final_weights, save_format="tf")
    state = eval_callback.state
    summary = {"config": dataclasses.asdict(config), "epochs_requested": args.epochs,
               "steps_per_epoch": steps_per_epoch, "epochs_completed": len(state["history"]),
               "global_step": global_step,
               "resumed_from_step": start_step, "best_epoch": state["best_epoch"],
               f"best_eval_{SELECTION_METRIC}": state["best_recall"],
               "strategy": distribution.strategy_name(strategy),
               "replicas": strategy.num_replicas_in_sync,
               "train_seconds_this_run": time.time() - started,
               "train_loss_this_run": [float(x) for x in history.history.get("loss", [])],
               "history": state["history"]}
    if chief:
        save_json(os.path.join(dirs["model_dir"], "training_summary.json"), summary)
    return summary


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
