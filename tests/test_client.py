"""The ranking client against a real exported QIN model served on 127.0.0.1.

The model is built from the tiny dataset and exported with serving.export (warmup records of
every kind included, so loading it also replays them through the server). The feature store is
an in-memory implementation of serving.client.FeatureStoreView over the same vocabularies.
"""
import glob
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.config import model_server_config_pb2

from common import features as F
from serving import client as C
from serving import signatures as S
from serving.model_server.server import ModelServer, ServerOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOW = 10_000_000


class MemoryStore:
    """FeatureStoreView over the tiny dataset's vocabularies with planted histories."""

    def __init__(self, data_dir):
        self.md = F.DatasetMetadata.load(data_dir)
        self.emb = np.load(os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE))
        self.item_ids = F.read_vocabulary(data_dir, "items")
        rng = np.random.default_rng(3)
        n = len(self.item_ids)
        self.author = rng.integers(1, self.md.num_authors + 1, n + 1)
        self.category = rng.integers(1, self.md.num_categories + 1, (n + 1, 2))
        self.words = {w: (k + 1, rng.normal(size=self.md.embedding_dim).astype(np.float32))
                      for k, w in enumerate(["cat", "dog", "cooking", "music"])}
        self.users = {"u1": {"user_index": 1, "user_profile": [3, 4, 5, 6]},
                      "u2": {"user_index": 2, "user_profile": [1, 1, 1, 1]}}
        self.history = {}
        for user, count in (("u1", 60), ("u2", 0)):
            times = np.sort(rng.integers(NOW - 10**7, NOW + 10**6, count))[::-1]  # some after
            self.history[user] = [
                {"item_id": self.item_ids[i - 1], "item_index": int(i),
                 "author_index": int(self.author[i]), "category": self.category[i].tolist(),
                 "engagement": rng.random(F.ENGAGEMENT_DIM).tolist(), "source": 1 + k % 2,
                 "timestamp_ms": int(t)}
                for k, (i, t) in enumerate(zip(rng.integers(1, n + 1, count), times))]

    def metadata(self):
        return self.md

    def user(self, user_id):
        return self.users.get(user_id)

    def behaviours(self, user_id, before_ms, limit):
        return [b for b in self.history.get(user_id, []) if b["timestamp_ms"] < before_ms][:limit]

    def encode_query(self, text):
        known = [self.words[w] for w in text.lower().split() if w in self.words]
        if not known:
            return [], np.zeros(self.md.embedding_dim, np.float32)
        emb = np.mean([e for _, e in known], axis=0)
        return [F.query_token_index(t, self.md.query_token_buckets) for t, _ in known], \
            emb / np.linalg.norm(emb)

    def items(self):
        idx = np.arange(1, len(self.item_ids) + 1)
        return {"item_id": self.item_ids, "item_index": idx, "author_index": self.author[idx],
                "category": self.category[idx], "embedding": self.emb[idx]}


@pytest.fixture(scope="module")
def exported(tiny_dataset, tmp_path_factory):
    from serving.export import export_model
    from trainer import config as trainer_config, model as trainer_model

    md = F.DatasetMetadata.load(tiny_dataset)
    emb = np.load(os.path.join(tiny_dataset, F.ITEM_EMBEDDINGS_FILE))
    model = trainer_model.build_model(trainer_config.preset("qin"), md, emb)
    model(trainer_model.dummy_features(md))
    files = glob.glob(os.path.join(tiny_dataset, "test", "*.tfrecord.gz"))
    samples = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP").take(2)]
    base = str(tmp_path_factory.mktemp("export"))
    summary = export_model(model, md, base, "qin", sample_requests=samples, warmup_requests=2,
                           verify=False)
    return summary["export_dir"], os.path.join(base, "qin")


@pytest.fixture(scope="module")
def served(exported):
    _, base = exported
    srv = ModelServer(ServerOptions([model_server_config_pb2.ModelConfig(name="qin",
                                                                         base_path=base)],
                                    port=0, poll_wait_seconds=0))
    srv.start()
    stub, channel = C.make_stub(f"127.0.0.1:{srv.port}")
    yield srv, stub
    channel.close()
    srv.stop(1)


@pytest.fixture(scope="module")
def store(tiny_dataset):
    return MemoryStore(tiny_dataset)


def test_rank_returns_sorted_top_k_matching_the_saved_model(served, exported, store):
    srv, stub = served
    result = C.rank(stub, store, "u1", "cat music", top_k=5, candidates=20, now_ms=NOW)
    assert result.notes == [] and result.model_version == 1
    assert len(result.items) == 5
    scores = [it.score for it in result.items]
    assert scores == sorted(scores, reverse=True)
    assert set(result.items[0].task_scores) == set(store.md.tasks)
    for item in result.items:
        assert all(0.0 <= p <= 1.0 for p in item.task_scores.values())
    # Only behaviours strictly before now were sent (the store holds later ones too).
    before = [b for b in store.history["u1"] if b["timestamp_ms"] < NOW]
    assert len(before) < len(store.history["u1"])
    assert result.long_term_length == min(len(before), store.md.long_term_length)
    # The same inputs through the SavedModel in-process give the same ranking.
    md, request, retrieved, history, _, _ = C.build_request(store, "u1", "cat music", 20, NOW)
    assert len(retrieved["item_id"]) == 20
    loaded = tf.saved_model.load(exported[0])
    inputs = S.listwise_inputs([request], md)
    fn = loaded.signatures[S.RANK_LISTWISE]
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    local = out[S.SCORE].numpy()[0]
    expected = [retrieved["item_id"][i] for i in np.argsort(-local, kind="stable")[:5]]
    assert [it.item_id for it in result.items] == expected
    np.testing.assert_allclose(scores, np.sort(local)[::-1][:5], rtol=1e-5)
    # Drivers are raw ids of the user's past behaviours at the RSU-selected positions.
    idx = out[S.RSU_SELECTED_INDEX].numpy()[0]
    top = int(np.argmax(local))
    kept = [history[p]["item_id"] for p in idx[top] if 0 <= p < len(history)]
    assert {d.item_id for d in result.items[0].drivers} <= set(kept)
    assert any(it.drivers for it in result.items)
    for it in result.items:
        for d in it.drivers:
            assert history[d.position]["item_id"] == d.item_id and d.seconds_before > 0


def test_unknown_user_still_ranks_with_a_note(served, store):
    _, stub = served
    result = C.rank(stub, store, "nobody", "dog", top_k=3, candidates=10, now_ms=NOW)
    assert len(result.items) == 3 and result.long_term_length == 0
    assert any("unknown user" in n for n in result.notes)
    assert all(not it.drivers for it in result.items)


def test_bad_queries_are_clear_errors(served, store):
    _, stub = served
    with pytest.raises(ValueError, match="empty query"):
        C.rank(stub, store, "u1", "   ", now_ms=NOW)
    with pytest.raises(ValueError, match="vocabulary"):
        C.rank(stub, store, "u1", "zzz qqq", now_ms=NOW)
    with pytest.raises(grpc.RpcError) as err:
        C.rank(stub, store, "u1", "cat", model_name="other", now_ms=NOW)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_format_and_cli_help(served, store):
    _, stub = served
    text = C.format_result(C.rank(stub, store, "u1", "cooking", top_k=4, candidates=12,
                                  now_ms=NOW))
    assert "click" in text and len(text.splitlines()) == 2 + 4
    out = subprocess.run([sys.executable, "-m", "serving.client", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--feature-store" in out.stdout and "--top-k" in out.stdout


def test_format_shows_probabilities_and_expected_watch_time_in_seconds():
    item = C.RankedItem(item_id="i1", score=0.5,
                        task_scores={"click": 0.25, F.WATCH_TIME: 12.345},
                        retrieval_cosine=0.9, drivers=[])
    result = C.RankingResult("u1", "cooking", [item], [], 1, 3.0, 10, 5)
    header, row = C.format_result(result).splitlines()[1:3]
    assert "p(click)" in header and f"E[{F.WATCH_TIME}] s" in header
    assert "0.2500" in row and "12.3" in row and "12.3450" not in row
