"""A feature store for the tiny dataset (tests/tiny_dataset.py), for the retrieval tests: every
item with the author and categories its TFRecords give it, users u1..u20 with histories before
NOW, and a query vocabulary whose words are the tiny dataset's topics."""
import glob
import os

import numpy as np
import tensorflow as tf

from common import features as F
from common.feature_store import FEATURE_STORE_FILE, SqliteFeatureStore
from tests.tiny_dataset import write_side_files

NOW = 5_000_000
WORDS = ("topic0", "topic1", "topic2", "topic3")


def item_attributes(data_dir):
    """{item index: (author, category pair)} from every candidate and behaviour of the records."""
    md = F.DatasetMetadata.load(data_dir)
    files = sorted(glob.glob(os.path.join(data_dir, "*", "*.tfrecord.gz")))
    found = {}
    for raw in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(64):
        batch = F.parse_examples(raw, md)
        pairs = [(F.CANDIDATE_ITEM, F.CANDIDATE_AUTHOR, F.CANDIDATE_CATEGORY)] + [
            (F.seq_feature(s, F.SEQ_ITEM), F.seq_feature(s, F.SEQ_AUTHOR),
             F.seq_feature(s, F.SEQ_CATEGORY)) for s in F.SEQUENCES]
        for item_key, author_key, category_key in pairs:
            items = batch[item_key].numpy().reshape(-1)
            authors = batch[author_key].numpy().reshape(-1)
            categories = batch[category_key].numpy().reshape(-1, F.NUM_CATEGORY_LEVELS)
            for i, a, c in zip(items, authors, categories):
                if i > 0:
                    found[int(i)] = (int(a), tuple(int(x) for x in c))
    return found


def write_store(data_dir, seed=0, history_users=range(1, 21), empty_users=(),
                without_embedding=()):
    """DATA/feature_store.sqlite for the tiny dataset; returns its path. Users in
    `empty_users` have a profile and no behaviour; items in `without_embedding` a zero
    content embedding in the store."""
    md = F.DatasetMetadata.load(data_dir)
    emb = np.load(os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE))
    attributes = item_attributes(data_dir)
    stored = emb.copy()
    stored[list(without_embedding)] = 0.0
    rng = np.random.default_rng(seed)
    path = os.path.join(data_dir, FEATURE_STORE_FILE)
    store = SqliteFeatureStore.create(path, md)
    store.write_items((i, f"i{i}", *attributes.get(i, (1, (1, 1 + 4))), stored[i])
                      for i in range(1, md.num_items + 1))
    users = [f"u{u}" for u in history_users] + list(empty_users)
    store.write_users((u, k + 1, (1, 2, 3, 4)) for k, u in enumerate(users))
    for u in history_users:
        items = rng.integers(1, md.num_items + 1, 30)
        times = np.sort(rng.integers(NOW - 10**6, NOW - 1, 30))
        store.write_behaviours(
            (f"u{u}", int(t), int(i), attributes.get(int(i), (1, (1, 5)))[0],
             attributes.get(int(i), (1, (1, 5)))[1], rng.random(F.ENGAGEMENT_DIM),
             F.SOURCE_FEED) for i, t in zip(items, times))
    # a word per topic: the mean embedding of the items whose first category is that topic
    rows = []
    for k, word in enumerate(WORDS):
        members = [i for i, (_, c) in attributes.items() if c[0] == k + 1]
        vector = emb[members].mean(axis=0) if members else rng.normal(size=emb.shape[1])
        rows.append((k + 1, word, vector / np.linalg.norm(vector)))
    store.write_query_vocab(rows)
    store.close()
    return path


def write_retrieval_dataset(directory, requests_per_split=(400, 40, 120), num_items=60,
                            embedding_dim=8, seed=0):
    """A tiny preprocessed dataset (the layout of tests/tiny_dataset.py) with a planted
    retrieval rule: item t of topic t % 4; a request asks about one topic; a candidate of the
    query's topic is clicked with probability 0.9 when its parity is the user's (user u prefers
    parity u % 2, visible in the deep-engaged items of the long-term history), 0.3 otherwise,
    and other candidates with 0.03."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    topics = 4
    item_topic = np.arange(num_items + 1) % topics
    centers = rng.normal(size=(topics, embedding_dim))
    emb = centers[item_topic] + 0.3 * rng.normal(size=(num_items + 1, embedding_dim))
    emb[0] = 0.0
    md = F.DatasetMetadata(embedding_dim=embedding_dim, num_items=num_items, num_authors=10,
                           num_categories=topics * 2, num_users=20, query_token_buckets=50,
                           profile_buckets=20, long_term_length=40, real_time_length=10,
                           max_candidates=12, has_true_probabilities=True)
    write_side_files(directory, md, emb)

    def category(items):
        return np.stack([item_topic[items] + 1, item_topic[items] + 1 + topics], axis=-1)

    counter = 0
    for split, count in zip(F.SPLITS, requests_per_split):
        os.makedirs(os.path.join(directory, split), exist_ok=True)
        path = os.path.join(directory, split, "part-00000-of-00001.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for _ in range(count):
                counter += 1
                user = int(rng.integers(1, 21))
                topic = int(rng.integers(0, topics))
                cands = rng.choice(np.arange(1, num_items + 1), md.max_candidates, replace=False)
                r = {F.REQUEST_ID: f"r{counter}", F.USER_ID: f"u{user}", F.USER_INDEX: user,
                     F.REQUEST_TIME: 1_000_000 + counter,
                     F.QUERY_TOKENS: [topic + 1], F.QUERY_EMBEDDING: centers[topic],
                     F.USER_PROFILE: [1, 2, 3, 4], F.CANDIDATE_ITEM: cands,
                     F.CANDIDATE_AUTHOR: cands % 10 + 1, F.CANDIDATE_CATEGORY: category(cands)}
                for seq, length in ((F.LONG_TERM, 40), (F.REAL_TIME, 10)):
                    items = rng.integers(1, num_items + 1, length)
                    engagement = rng.random((length, F.ENGAGEMENT_DIM)) * 0.3
                    engagement[items % 2 == user % 2, 0] = 1.0  # deep views of the preferred parity
                    r[F.seq_feature(seq, F.SEQ_ITEM)] = items
                    r[F.seq_feature(seq, F.SEQ_AUTHOR)] = items % 10 + 1
                    r[F.seq_feature(seq, F.SEQ_CATEGORY)] = category(items)
                    r[F.seq_feature(seq, F.SEQ_ENGAGEMENT)] = engagement
                    r[F.seq_feature(seq, F.SEQ_SOURCE)] = np.ones(length, np.int64)
                    r[F.seq_feature(seq, F.SEQ_TIME_GAP)] = np.arange(1, length + 1) * 10.0
                on_topic = item_topic[cands] == topic
                p = np.where(on_topic, np.where(cands % 2 == user % 2, 0.9, 0.3), 0.03)
                click = rng.random(len(cands)) < p
                for task, prob in zip(md.tasks, (p, p * 0.5, p * 0.2)):
                    label = click if task == "click" else click & (rng.random(len(cands)) < 0.5)
                    r[F.label_feature(task)] = label.astype(np.float32)
                    r[F.true_prob_feature(task)] = prob
                writer.write(F.make_example(r, md.tasks).SerializeToString())
    return directory
