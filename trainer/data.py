"""tf.data input pipeline over the preprocessing output (`OUT/{split}/*.tfrecord.gz`).

One tf.train.Example is one search request with its candidate list, so a batch is a batch of
*requests* (each with up to `max_candidates` candidates). The pipeline:

  list files (tf.io.gfile: local paths and gs:// alike) -> shard per input pipeline (multi-worker)
  -> parallel interleaved GZIP TFRecord reads -> shuffle -> repeat -> batch of requests
  -> parse with `common.features.parse_examples` -> (features, labels, sample weights) -> prefetch

Labels and sample weights are dicts keyed by task name, shaped [B, N] like the model's outputs.
The sample weight masks padded candidates (N is the largest candidate count in the batch) and is
scaled so that a batch's loss is the mean over its *real* candidates.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import tensorflow as tf

from common import features as F


class NoDataError(FileNotFoundError):
    """The split has no TFRecord files."""


def list_files(data_dir: str, split: str) -> List[str]:
    """Sorted TFRecord files of one split; raises NoDataError with the pattern tried."""
    pattern = F.tfrecord_pattern(data_dir, split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise NoDataError(
            f"no files match {pattern}: point --data at the output directory of "
            f"`python -m preprocessing` (it holds metadata.json and {'/'.join(F.SPLITS)}/).")
    return files


def count_requests(data_dir: str, split: str) -> int:
    """Number of request examples in a split (one pass over the files, no parsing)."""
    files = list_files(data_dir, split)
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP", num_parallel_reads=4)
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1).numpy())


def split_labels(batch: Dict[str, tf.Tensor], metadata: F.DatasetMetadata):
    """(features, labels, sample_weights) from a parsed batch.

    The features keep every parsed tensor (the model ignores labels); labels are the
    `label_<task>` tensors keyed by task; the weight is the candidate mask rescaled so that
    Keras' SUM_OVER_BATCH_SIZE reduction (sum / (B * N)) equals the mean over real candidates.
    """
    mask = tf.cast(F.candidate_mask(batch), tf.float32)
    total = tf.cast(tf.size(mask), tf.float32)
    weight = mask * total / tf.maximum(tf.reduce_sum(mask), 1.0)
    labels = {t: batch[F.label_feature(t)] for t in metadata.tasks}
    weights = {t: weight for t in metadata.tasks}
    return batch, labels, weights


DEFAULT_COLD_START_RATE = 0.05


def simulate_cold_start(batch: Dict[str, tf.Tensor], rate: float,
                        seed: Optional[int] = None) -> Dict[str, tf.Tensor]:
    """Training-time augmentation for users the model has not seen act.

    Logged search requests almost always come from users with a history, so a model trained on
    them alone has never seen an empty history or an unknown user and answers them with
    arbitrary probabilities. For a `rate` share of the requests of a batch this hides the
    history (every sequence length set to 0: the sequences are masked by their explicit
    lengths); for half of those it also makes the user unknown (user index and profile set to
    the unknown index 0), as the serving client does for a user the feature store lacks.
    """
    if rate <= 0:
        return batch
    draw = tf.random.uniform(tf.shape(batch[F.USER_INDEX]), seed=seed)
    no_history, unknown = draw < rate, draw < rate / 2
    out = dict(batch)
    for seq in F.SEQUENCES:
        name = F.seq_feature(seq, F.SEQ_LENGTH)
        out[name] = tf.where(no_history, tf.zeros_like(batch[name]), batch[name])
    out[F.USER_INDEX] = tf.where(unknown, tf.zeros_like(batch[F.USER_INDEX]),
                                 batch[F.USER_INDEX])
    out[F.USER_PROFILE] = tf.where(unknown[:, tf.newaxis], tf.zeros_like(batch[F.USER_PROFILE]),
                                   batch[F.USER_PROFILE])
    return out


def make_dataset(data_dir: str, split: str, metadata: F.DatasetMetadata, batch_size: int, *,
                 shuffle: bool = False, repeat: bool = False, seed: Optional[int] = None,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 with_labels: bool = True, for_training: bool = True,
                 shuffle_buffer: int = 2048, drop_remainder: bool = False,
                 cold_start_rate: float = 0.0) -> tf.data.Dataset:
    """Batched dataset of one split.

    batch_size: requests per batch *for this input pipeline* (when `input_context` is given it
      is the global batch, divided by the number of replicas in sync).
    input_context: from `strategy.distribute_datasets_from_function`; files are sharded per
      input pipeline (worker) when there are enough of them, else records are sharded.
    for_training: yield (features, labels, sample_weights); otherwise the parsed feature dict
      (which still holds the labels and true probabilities when `with_labels`).
    cold_start_rate: share of requests whose history (and, for half, user) is hidden
      (`simulate_cold_start`); for training splits only.
    """
    if not 0.0 <= cold_start_rate < 1.0:
        raise ValueError(f"cold_start_rate must be in [0, 1), got {cold_start_rate}")
    files = list_files(data_dir, split)
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    shard_records = False
    if input_context is not None and input_context.num_input_pipelines > 1:
        if len(files) >= input_context.num_input_pipelines:
            files_ds = files_ds.shard(input_context.num_input_pipelines,
                                      input_context.input_pipeline_id)
        else:  # fewer files than workers: every worker reads all, keeps its share of records
            shard_records = True
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    elif input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    if shuffle:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = files_ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=seed is not None or not shuffle)
    if shard_records:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda s: F.parse_examples(s, metadata, with_labels=with_labels),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cold_start_rate > 0:
        ds = ds.map(lambda b: simulate_cold_start(b, cold_start_rate, seed),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if for_training:
        ds = ds.map(lambda b: split_labels(b, metadata), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
    options = tf.data.Options()
    # Sharding is done above (per input pipeline), so tf.distribute must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def label_means(data_dir: str, metadata: F.DatasetMetadata, max_requests: int = 20000,
                batch_size: int = 256) -> Dict[str, float]:
    """{task: mean label over the real candidates} of the first `max_requests` train requests
    (file order, no shuffle): enough for an initial value, one bounded read however large the
    split."""
    sums = {task: 0.0 for task in metadata.tasks}
    count = 0.0
    batches = max(1, -(-max_requests // batch_size))
    # take(): the read ends with the dataset (no iterator abandoned mid-prefetch)
    dataset = make_dataset(data_dir, "train", metadata, batch_size, for_training=False)
    for batch in dataset.take(batches):
        mask = tf.cast(F.candidate_mask(batch), tf.float64)
        for task in metadata.tasks:
            label = tf.cast(batch[F.label_feature(task)], tf.float64)
            sums[task] += float(tf.reduce_sum(label * mask))
        count += float(tf.reduce_sum(mask))
    if not count:
        raise NoDataError(f"the train split of {data_dir} has no candidate to take label means "
                          f"from")
    return {task: total / count for task, total in sums.items()}
