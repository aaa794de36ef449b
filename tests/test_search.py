"""The search call (serving/search.py) end to end: QRCF, PDR (exported query tower + index) and
the content baseline, merged and ranked by an exported QIN model served by the project's gRPC
server on 127.0.0.1 (as tests/test_client.py does)."""
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.config import model_server_config_pb2

from common import features as F
from common.feature_store import FEATURE_STORE_FILE, SqliteFeatureStore
from serving import client as C
from serving import search as SE
from serving.export_retrieval import export_retrieval
from serving.merge import merge_sources, quota_slots
from serving.model_server.server import ModelServer, ServerOptions
from serving.qrcf import QRCFConfig, QRCFRetriever
from tests.retrieval_fixtures import NOW, write_retrieval_dataset, write_store

NO_EMBEDDING = 7


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = write_retrieval_dataset(str(tmp_path_factory.mktemp("search_data")),
                                        requests_per_split=(40, 8, 8))
    write_store(directory, empty_users=("newcomer",), without_embedding=(NO_EMBEDDING,))
    return directory


@pytest.fixture(scope="module")
def base_path(data_dir, tmp_path_factory):
    """QIN (untrained) exported as qin/1, PDR (untrained) as pdr_query/1 + pdr_index/1."""
    from serving.export import export_model
    from trainer import config as trainer_config, model as trainer_model
    from trainer.pdr import ItemCorpus, PDRConfig, build_pdr_model

    md = F.DatasetMetadata.load(data_dir)
    emb = np.load(os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE))
    base = str(tmp_path_factory.mktemp("models"))
    qin = trainer_model.build_model(trainer_config.preset("qin"), md, emb)
    qin(trainer_model.dummy_features(md))
    files = glob.glob(os.path.join(data_dir, "test", "*.tfrecord.gz"))
    samples = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP").take(2)]
    export_model(qin, md, base, "qin", sample_requests=samples, warmup_requests=1, verify=False)
    with SqliteFeatureStore(os.path.join(data_dir, FEATURE_STORE_FILE)) as store:
        corpus = ItemCorpus.from_store(store)
    pdr = build_pdr_model(PDRConfig(output_dim=16, id_dim=8, hidden=16), md, emb, corpus)
    export_retrieval(pdr, md, corpus, base, 1, raw_item_ids=F.read_vocabulary(data_dir, "items"))
    return base


@pytest.fixture(scope="module")
def server(base_path):
    srv = ModelServer(ServerOptions([model_server_config_pb2.ModelConfig(
        name="qin", base_path=os.path.join(base_path, "qin"))], port=0, poll_wait_seconds=0))
    srv.start()
    yield srv
    srv.stop(1)


def _table(num_items=60):
    """Each item's neighbours: the next two items of its topic (topic = index % 4)."""
    return {i: [(j, w) for j, w in ((i + 4, 0.5), (i + 8, 0.25)) if j <= num_items]
            for i in range(1, num_items + 1)}


def _write_table(data_dir, table):
    """The table in common/item_to_item.py's layout (one shard, manifest last)."""
    from common import item_to_item as I2I

    directory = os.path.join(data_dir, I2I.ITEM_TO_ITEM_DIR)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "part-00000-of-00001.jsonl"), "w") as f:
        for item, neighbours in sorted(table.items()):
            f.write(json.dumps({"item": item, "neighbours": [list(n) for n in neighbours]}) + "\n")
    with open(os.path.join(directory, I2I.MANIFEST_FILE), "w") as f:
        json.dump({"format_version": I2I.FORMAT_VERSION}, f)


@pytest.fixture(scope="module")
def searcher(data_dir, base_path, server):
    store = SqliteFeatureStore(os.path.join(data_dir, FEATURE_STORE_FILE))
    stub, channel = C.make_stub(f"127.0.0.1:{server.port}")
    qrcf = QRCFRetriever(store, _table(), QRCFConfig(seed_eps=0.3, min_relevance=0.3))
    pdr = SE.PDRRetriever.from_base_path(base_path, store.metadata())
    quotas = {SE.PDR: 0.4, SE.QRCF: 0.3, SE.CONTENT: 0.3}  # every source takes slots
    yield SE.Searcher(store, stub, qrcf, pdr, SE.SearchConfig(candidates=30, per_source=30,
                                                              quotas=quotas))
    channel.close()


def test_search_returns_a_ranked_list_with_sources_and_explanations(searcher):
    result = searcher.search("u1", "topic1", NOW, k=8)
    assert result.personalized and result.model_version == 1
    assert not [n for n in result.notes if "non-personalized" in n]
    assert len(result.items) == 8
    scores = [item.score for item in result.items]
    assert scores == sorted(scores, reverse=True)
    for source in SE.SOURCES:
        assert result.counts[f"retrieved_{source}"] > 0, result.counts
    assert result.counts["candidates"] == 30
    history = searcher.store.behaviours("u1", NOW, 1000)
    history_ids = {b["item_id"] for b in history}
    for item in result.items:
        assert item.sources, item
        assert set(item.task_scores) == set(searcher.metadata.tasks)
        if SE.QRCF in item.sources:
            assert item.qrcf_seeds and {s.item_id for s in item.qrcf_seeds} <= history_ids
            assert all(s.seconds_before > 0 for s in item.qrcf_seeds)
        else:
            assert item.qrcf_seeds == []
        for driver in item.drivers:
            assert driver.item_id in history_ids and driver.seconds_before > 0
    taken = {s for item in result.items for s in item.sources}
    assert len(taken) >= 2
    text = SE.format_result(result)
    assert "found by" in text and result.items[0].item_id in text


def test_unknown_user_and_empty_history_get_non_personalized_retrieval(searcher):
    for user in ("nobody", "newcomer"):
        result = searcher.search(user, "topic2", NOW, k=5)
        assert not result.personalized
        assert any("non-personalized" in note for note in result.notes), result.notes
        assert len(result.items) == 5
        assert all(set(item.sources) == {SE.CONTENT} for item in result.items)
        assert result.counts.get("retrieved_qrcf") is None and \
            result.counts.get("retrieved_pdr") is None


def test_unknown_words_are_noted(searcher):
    result = searcher.search("u1", "topic3 blorp", NOW, k=3)
    assert any("blorp" in note and "unknown" in note for note in result.notes)
    assert len(result.items) == 3
    nothing = searcher.search("u1", "blorp zzz", NOW, k=3)
    assert nothing.items == [] and any("no word" in n for n in nothing.notes)


def test_items_without_embeddings_are_counted_and_skipped(searcher):
    everything = SE.Searcher(searcher.store, searcher.stub, searcher.qrcf, searcher.pdr,
                             SE.SearchConfig(candidates=60, per_source=60))
    result = everything.search("u2", "topic3", NOW, k=60)  # the content source returns all
    assert result.counts["content_without_embedding"] == 1
    assert result.items and all(item.item_index != NO_EMBEDDING for item in result.items)
    assert result.counts["candidates"] <= 59


def test_cli_prints_results_and_explains_itself(data_dir, base_path, server, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SE.main(["--help"])
    assert exit_info.value.code == 0
    assert "QRCF" in capsys.readouterr().out
    _write_table(data_dir, _table())
    code = SE.main(["--server", f"127.0.0.1:{server.port}", "--data", data_dir,
                    "--base-path", base_path, "--user", "nobody", "--query", "topic1 blorp",
                    "--k", "3", "--now-ms", str(NOW)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "non-personalized" in out.out and "blorp" in out.out and "found by" in out.out


def test_merge_quotas_and_dedupe_by_hand():
    lists = {"a": [1, 2, 3, 4], "b": [2, 5, 6], "c": [7]}
    assert quota_slots({"a": 0.5, "b": 0.25, "c": 0.25}, ["a", "b", "c"], 4) == \
        {"a": 2, "b": 1, "c": 1}
    merged = merge_sources(lists, {"a": 0.5, "b": 0.25, "c": 0.25}, 4)
    # round robin: a1, b2, c7, a2 (taken) -> a3
    assert [m.item_index for m in merged] == [1, 2, 7, 3]
    assert merged[1].ranks == {"a": 1, "b": 0} and merged[1].taken_by == "b"
    # slots left by a short source are filled by the others
    assert [m.item_index for m in merge_sources(lists, {"a": 0, "b": 0, "c": 1}, 3)] == [7, 1, 2]
    assert merge_sources({"a": [], "b": []}, {"a": 1}, 5) == []
