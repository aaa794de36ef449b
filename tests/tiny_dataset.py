"""Writes a tiny preprocessed dataset in exactly the layout `python -m preprocessing` produces
(metadata.json, item_embeddings.npy, vocab/, {train,eval,test}/*.tfrecord.gz), straight from
`common.features.make_example`. Clicks follow a planted rule (the candidate shares the query's
topic and resembles the user's deep-engaged long-term behaviours), so a model can learn it.
With `tasks=F.WATCH_TIME_TASKS` clicked candidates also get a play time (duration of the item
times a uniform watch ratio in [0.2, 1.0]) and the true expected play time; those draws come
from their own stream, so the other features do not change; the item durations are then
written too (item_durations.npy, metadata `item_durations`). With `position_effect` the data
keeps the display order (metadata `display_order`, candidates shown in list order with their
positions) and the click logit falls by `position_effect` per position shown lower (the
random draws are the same).
"""
import os

import numpy as np

from common import features as F


def write_tiny_dataset(directory, requests_per_split=(64, 16, 16), num_items=60, embedding_dim=8,
                       long_term_length=40, real_time_length=10, seed=0,
                       tasks=F.DEFAULT_TASKS, position_effect=None):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    topics = 4
    item_topic = rng.integers(0, topics, num_items + 1)
    centers = rng.normal(size=(topics, embedding_dim))
    emb = centers[item_topic] + 0.3 * rng.normal(size=(num_items + 1, embedding_dim))
    emb[0] = 0.0
    md = F.DatasetMetadata(embedding_dim=embedding_dim, num_items=num_items, num_authors=10,
                           num_categories=topics * 2, num_users=20, query_token_buckets=50,
                           profile_buckets=20, long_term_length=long_term_length,
                           real_time_length=real_time_length, max_candidates=12,
                           has_true_probabilities=True, tasks=tuple(tasks),
                           display_order=position_effect is not None,
                           display_order_source="" if position_effect is None else
                           "tests.tiny_dataset: list order, planted position effect",
                           item_durations=F.WATCH_TIME in tasks)
    watch_rng = np.random.default_rng(seed + 1)
    duration = watch_rng.uniform(5.0, 60.0, num_items + 1)
    duration[0] = 0.0  # the unknown item
    write_side_files(directory, md, emb, duration if md.item_durations else None)

    def category(items):
        return np.stack([item_topic[items] + 1, item_topic[items] + 1 + topics], axis=-1)

    request_counter = 0
    for split, count in zip(F.SPLITS, requests_per_split):
        os.makedirs(os.path.join(directory, split), exist_ok=True)
        path = os.path.join(directory, split, "part-00000-of-00001.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for _ in range(count):
                request_counter += 1
                user = int(rng.integers(1, 21))
                topic = int(rng.integers(0, topics))
                n = int(rng.integers(2, md.max_candidates + 1))
                cands = rng.integers(1, num_items + 1, n)
                r = {F.REQUEST_ID: f"r{request_counter}", F.USER_ID: f"u{user}",
                     F.USER_INDEX: user, F.REQUEST_TIME: 1_000_000 + request_counter,
                     F.QUERY_TOKENS: [topic + 1, int(rng.integers(5, 50))],
                     F.QUERY_EMBEDDING: centers[topic] + 0.2 * rng.normal(size=embedding_dim),
                     F.USER_PROFILE: rng.integers(1, 20, F.USER_PROFILE_DIM),
                     F.CANDIDATE_ITEM: cands, F.CANDIDATE_AUTHOR: cands % 10 + 1,
                     F.CANDIDATE_CATEGORY: category(cands)}
                for seq, max_len in ((F.LONG_TERM, long_term_length),
                                     (F.REAL_TIME, real_time_length)):
                    length = int(rng.integers(0, max_len + 1))
                    items = rng.integers(1, num_items + 1, length)
                    r[F.seq_feature(seq, F.SEQ_ITEM)] = items
                    r[F.seq_feature(seq, F.SEQ_AUTHOR)] = items % 10 + 1
                    r[F.seq_feature(seq, F.SEQ_CATEGORY)] = category(items).reshape(length, 2)
                    r[F.seq_feature(seq, F.SEQ_ENGAGEMENT)] = rng.random((length, F.ENGAGEMENT_DIM))
                    r[F.seq_feature(seq, F.SEQ_SOURCE)] = rng.integers(1, 3, length)
                    r[F.seq_feature(seq, F.SEQ_TIME_GAP)] = np.sort(rng.random(length) * 1e5) + 1
                long_items = r[F.seq_feature(F.LONG_TERM, F.SEQ_ITEM)]
                deep = r[F.seq_feature(F.LONG_TERM, F.SEQ_ENGAGEMENT)][:, 0] > 0.5
                liked_topics = set(item_topic[long_items[deep]].tolist())
                logit = (-1.5 + 1.5 * (item_topic[cands] == topic)
                         + 1.5 * np.isin(item_topic[cands], list(liked_topics)))
                if position_effect is not None:
                    r[F.CANDIDATE_POSITION] = np.arange(n)
                    logit = logit - position_effect * np.arange(n)
                p = 1 / (1 + np.exp(-logit))
                click = rng.random(n) < p
                for task, prob in zip(F.binary_tasks(md.tasks), (p, p * 0.5, p * 0.2)):
                    label = click if task == "click" else click & (rng.random(n) < prob / p)
                    r[F.label_feature(task)] = label.astype(np.float32)
                    r[F.true_prob_feature(task)] = prob
                if F.WATCH_TIME in md.tasks:
                    ratio = watch_rng.uniform(0.2, 1.0, n)
                    r[F.label_feature(F.WATCH_TIME)] = click * duration[cands] * ratio
                    r[F.true_prob_feature(F.WATCH_TIME)] = p * duration[cands] * 0.6
                writer.write(F.make_example(r, md.tasks).SerializeToString())
    return directory


def write_side_files(directory, md, embeddings, durations=None):
    """What a preprocessing run writes beside its TFRecords, for a tiny dataset: metadata.json,
    item_embeddings.npy (item_durations.npy when given) and the vocabularies (ids i1.., a1..,
    c1.., u1..; index 0 = unknown)."""
    os.makedirs(os.path.join(directory, F.VOCAB_DIR), exist_ok=True)
    np.save(os.path.join(directory, F.ITEM_EMBEDDINGS_FILE), embeddings.astype(np.float32))
    if durations is not None:
        np.save(os.path.join(directory, F.ITEM_DURATIONS_FILE), durations.astype(np.float32))
    for name, size in (("items", md.num_items), ("authors", md.num_authors),
                       ("categories", md.num_categories), ("users", md.num_users)):
        with open(os.path.join(directory, F.VOCAB_DIR, f"{name}.txt"), "w") as f:
            f.write("".join(f"{name[0]}{k}\n" for k in range(1, size + 1)))
    md.save(directory)
