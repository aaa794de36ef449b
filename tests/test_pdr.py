"""PDR (trainer/pdr.py, trainer/pdr_task.py), its corpus index (serving/item_index.py) and
its export (serving/export_retrieval.py) on a small version of the tiny dataset."""
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from common import features as F
from serving import export_retrieval as ER
from serving.item_index import IndexConfig, ItemIndex, exact_top_k, latest_version
from tests.retrieval_fixtures import write_retrieval_dataset, write_store
from trainer import pdr as P
from trainer import pdr_task
from trainer import retrieval_metrics as RM
from trainer.data import make_dataset

K = 10


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = write_retrieval_dataset(str(tmp_path_factory.mktemp("pdr_data")))
    write_store(directory)
    return directory


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("pdr_model"))
    code = pdr_task.main(["--data", data_dir, "--model-dir", model_dir, "--epochs", "4",
                          "--batch-size", "50", "--learning-rate", "0.01",
                          "--config", json.dumps({"hard_negatives": "both", "output_dim": 16,
                                                  "id_dim": 8, "hidden": 32,
                                                  "mined_rank_low": 5, "mined_rank_high": 20,
                                                  "long_view_weight": 0.5})])
    assert code == 0
    return model_dir, P.load_pdr_model(model_dir, data_dir)


def _test_recall(model, data_dir):
    md = F.DatasetMetadata.load(data_dir)
    return pdr_task.corpus_recall(model, make_dataset(data_dir, "test", md, 64,
                                                      for_training=False), ks=(K,))[f"recall@{K}"]


def test_pdr_trains_resumably_and_beats_random_recall(trained, data_dir):
    model_dir, model = trained
    summary = json.load(open(os.path.join(model_dir, "training_summary.json")))
    assert summary["epochs_completed"] == 4 and summary["best_epoch"] >= 1
    assert all(np.isfinite(summary["train_loss_this_run"]))
    assert os.path.isdir(os.path.join(model_dir, "logs"))
    # random retrieval finds K / corpus of the clicked items; an untrained model about that
    corpus = len(P.ItemCorpus.from_data_dir(data_dir))
    recall = _test_recall(model, data_dir)
    untrained = P.build_pdr_model(P.PDRConfig.load(model_dir), F.DatasetMetadata.load(data_dir),
                                  np.load(os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE)),
                                  P.ItemCorpus.from_data_dir(data_dir))
    assert recall > 2 * K / corpus, recall
    assert recall > _test_recall(untrained, data_dir) + 0.1
    # a second run with the same command resumes: nothing left to train, same final weights
    assert pdr_task.main(["--data", data_dir, "--model-dir", model_dir, "--epochs", "4",
                          "--batch-size", "50"]) == 0
    resumed = json.load(open(os.path.join(model_dir, "training_summary.json")))
    assert resumed["global_step"] == summary["global_step"]


def test_query_only_tower_ignores_the_user(data_dir):
    md = F.DatasetMetadata.load(data_dir)
    emb = np.load(os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE))
    corpus = P.ItemCorpus.from_data_dir(data_dir)
    batch = next(iter(make_dataset(data_dir, "test", md, 8, for_training=False)))
    other_user = dict(batch)
    for name in (F.USER_INDEX, F.USER_PROFILE, F.seq_feature(F.LONG_TERM, F.SEQ_LENGTH)):
        other_user[name] = tf.zeros_like(batch[name])
    query_only = P.build_pdr_model(P.PDRConfig(use_user=False), md, emb, corpus)
    np.testing.assert_allclose(query_only(batch).numpy(), query_only(other_user).numpy())
    personal = P.build_pdr_model(P.PDRConfig(use_user=True), md, emb, corpus)
    assert np.abs(personal(batch).numpy() - personal(other_user).numpy()).max() > 1e-4


def test_loss_uses_logq_hits_and_hard_negatives(data_dir):
    """Each training option changes the loss of the same batch (so it is wired in)."""
    md = F.DatasetMetadata.load(data_dir)
    emb = np.load(os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE))
    corpus = P.ItemCorpus.from_data_dir(data_dir)
    counts = P.click_counts(data_dir, "train", md.num_items)
    assert counts[0] == 0 and counts.sum() > 0
    batch = next(iter(make_dataset(data_dir, "train", md, 32, for_training=False)))

    def loss(**overrides):
        config = P.PDRConfig(**{"mined_rank_low": 5, "mined_rank_high": 20, **overrides})
        tf.keras.utils.set_random_seed(0)  # the same initial weights for every variant
        model = P.build_pdr_model(config, md, emb, corpus, P.sampling_probability(counts))
        model.refresh_mining_table()
        return float(model.compute_loss(batch))

    base = loss(hard_negatives="none")
    assert np.isfinite(base) and base > 0
    assert loss(hard_negatives="none", logq_correction=False) != pytest.approx(base)
    assert loss(hard_negatives="shown") > base  # more negatives, larger softmax denominators
    assert loss(hard_negatives="mined") > base
    assert loss(hard_negatives="none", long_view_weight=3.0) > base


def test_index_agrees_with_exact_search():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16))
    vectors = centres[rng.integers(0, 40, 6000)] + 0.3 * rng.normal(size=(6000, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    items = np.arange(1, 6001) * 3  # item indices are not row numbers
    queries = vectors[rng.integers(0, 6000, 50)] + 0.1 * rng.normal(size=(50, 16))
    exact = ItemIndex.build(vectors, items, backend="exact")
    rows, scores = exact_top_k(vectors, queries, K)
    got, got_scores = exact.search(queries, K)
    np.testing.assert_array_equal(got, items[rows])
    np.testing.assert_allclose(got_scores, (queries @ vectors.T)[np.arange(50)[:, None], rows],
                               rtol=1e-5)
    scann = ItemIndex.build(vectors, items, IndexConfig(leaves_to_search_fraction=0.3),
                            backend="scann")
    approx, approx_scores = scann.search(queries, K)
    overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(approx, got)])
    assert overlap >= 0.95, overlap
    np.testing.assert_allclose(approx_scores[:, 0], got_scores[:, 0], atol=1e-4)
    # by corpus size: exact below exact_below, ScaNN above
    assert ItemIndex.build(vectors, items, IndexConfig(exact_below=10_000)).backend == "exact"
    assert ItemIndex.build(vectors, items, IndexConfig(exact_below=1_000)).backend == "scann"


def test_export_rebuild_adds_new_items_and_query_tower_is_stock(trained, data_dir, tmp_path):
    _, model = trained
    md = F.DatasetMetadata.load(data_dir)
    corpus = P.ItemCorpus.from_data_dir(data_dir)
    raw_ids = F.read_vocabulary(data_dir, "items")
    old = corpus.subset(corpus.item_index <= 50)  # items 51..60 arrive later
    base = str(tmp_path)
    first = ER.export_retrieval(model, md, old, base, 1, raw_item_ids=raw_ids, top_k=K)
    new_model = P.load_pdr_model(trained[0], data_dir)  # the same weights, the grown corpus
    second = ER.export_retrieval(new_model, md, corpus, base, 2, raw_item_ids=raw_ids, top_k=K)
    assert first["index"]["items"] == 50 and second["index"]["items"] == 60
    assert latest_version(os.path.join(base, ER.INDEX_NAME)) == 2
    with pytest.raises(FileExistsError):
        ER.export_retrieval(model, md, corpus, base, 2)
    v1 = ItemIndex.load(first["index_dir"])
    v2 = ItemIndex.load(second["index_dir"])
    vectors = new_model.corpus_vectors(corpus)
    new_rows = np.flatnonzero(corpus.item_index > 50)
    found_v2, _ = v2.search(vectors[new_rows], 1)
    np.testing.assert_array_equal(found_v2[:, 0], corpus.item_index[new_rows])
    found_v1, _ = v1.search(vectors[new_rows], K)
    assert not np.isin(found_v1, corpus.item_index[new_rows]).any()
    # Vertex AI Vector Search input: one {"id", "embedding"} per indexed item
    lines = [json.loads(x) for x in open(os.path.join(second["index_dir"], ER.VERTEX_DIR,
                                                      ER.VERTEX_FILE))]
    assert len(lines) == 60 and lines[0]["id"] == raw_ids[v2.item_indices[0] - 1]
    np.testing.assert_allclose(lines[0]["embedding"], v2.vectors[0], rtol=1e-6)
    # the query tower SavedModel: stock ops only, same vectors, BruteForce = exact index search
    ops = ER.savedmodel_op_types(second["query_dir"])
    assert "MatMul" in ops and not any(op.startswith("Scann") for op in ops)
    loaded = tf.saved_model.load(second["query_dir"])
    batch = next(iter(make_dataset(data_dir, "test", md, 8, for_training=False)))
    feed = {name: batch[name] for name in ER.query_input_specs(md)}
    vector = loaded.signatures["serving_default"](**feed)[ER.QUERY_VECTOR].numpy()
    np.testing.assert_allclose(vector, new_model(batch).numpy(), atol=1e-5)
    retrieved = loaded.signatures[ER.RETRIEVE_SIGNATURE](**feed)
    expected, _ = v2.search(vector, K)
    np.testing.assert_array_equal(retrieved["item_index"].numpy(), expected)


def test_recall_metric_on_the_trained_corpus_matches_numpy(trained, data_dir):
    _, model = trained
    md = F.DatasetMetadata.load(data_dir)
    requests = pdr_task.request_vectors(model, make_dataset(data_dir, "test", md, 64,
                                                            for_training=False))
    corpus = model.corpus_vectors()
    scores = requests["vectors"] @ corpus.T
    top = RM.top_k_by_score(scores, model.corpus_item.numpy(), K)
    hits = sum(len(set(top[r]) & set(c)) for r, c in enumerate(requests["clicked"]))
    total = sum(len(set(c)) for c in requests["clicked"])
    assert RM.recall_at_k(top, requests["clicked"], (K,))[f"recall@{K}"] == \
        pytest.approx(hits / total)


def test_interest_summary_reads_deep_engagement_not_watch_ratio():
    """The default read-out (deep engagement, hard relevance gate) points at the subtopic the
    user watches deeply, not at the one seen most often in short views nor at the behaviours
    nearest the query; the earlier read-out (linear watch ratio, relu gate) stays reachable."""
    from trainer.layers.pdr_towers import interest_engagement_weight, interest_summary_vector

    eng = tf.constant([[[0.85, 0, 0, 0], [0.5, 0, 0, 0], [0.2, 1, 0, 0], [1.3, 0, 0, 0]]])
    np.testing.assert_allclose(interest_engagement_weight(eng, "deep").numpy(), [[1, 0, 1, 1]])
    np.testing.assert_allclose(interest_engagement_weight(eng, "watch_ratio").numpy(),
                               [[0.85, 0.5, 0.2, 1.0]])
    # 2 deep views of subtopic b (farther from the query), 8 short views (0.3) of subtopic a
    # (nearer to it), 1 deep off-topic view (below the relevance threshold), 1 padding row
    a, b, off = np.eye(3, dtype=np.float32)
    content = tf.constant([[b] * 2 + [a] * 8 + [off, a]])
    relevance = tf.constant([[0.6] * 2 + [0.9] * 8 + [0.1, 0.9]])
    engagement = tf.constant([[[0.9, 0, 0, 0]] * 2 + [[0.3, 0, 0, 0]] * 8 + [[1.0, 1, 0, 0],
                                                                             [1.0, 1, 0, 0]]])
    mask = tf.constant([[True] * 11 + [False]])
    new = interest_summary_vector(content, relevance, engagement, mask).numpy()[0]
    np.testing.assert_allclose(new, b, atol=1e-6)
    old = interest_summary_vector(content, relevance, engagement, mask, 0.5, "watch_ratio",
                                  "relu").numpy()[0]
    assert old[0] > old[1] > 0 and old[2] == 0  # dominated by the short views of a
    hard_linear = interest_summary_vector(content, relevance, engagement, mask, 0.5,
                                          "watch_ratio", "hard").numpy()[0]
    deep_relu = interest_summary_vector(content, relevance, engagement, mask, 0.5, "deep",
                                        "relu").numpy()[0]
    assert hard_linear[0] > hard_linear[1] and deep_relu[1] == pytest.approx(1.0)
    nothing = interest_summary_vector(content, relevance * 0, engagement, mask).numpy()
    np.testing.assert_array_equal(nothing, 0)


def test_config_defaults_and_models_saved_before_the_deep_read_out(tmp_path):
    config = P.PDRConfig()
    assert (config.interest_engagement, config.interest_gate) == ("deep", "hard")
    with pytest.raises(ValueError):
        P.PDRConfig(interest_engagement="likes")
    with pytest.raises(ValueError):
        P.PDRConfig(interest_gate="soft")
    # a config file written before the options existed loads as the read-out it trained with
    new_fields = ("interest_engagement", "interest_gate", "deep_watch_ratio")
    old = {k: v for k, v in dataclasses.asdict(config).items() if k not in new_fields}
    (tmp_path / P.CONFIG_FILE).write_text(json.dumps(old))
    loaded = P.PDRConfig.load(str(tmp_path))
    assert (loaded.interest_engagement, loaded.interest_gate) == ("watch_ratio", "relu")
    config.save(str(tmp_path))
    assert P.PDRConfig.load(str(tmp_path)) == config
