"""Train/serve consistency of RSU stage 1 for lifelong histories through the client: when
preprocessing selected the long-term sequence by query relevance (--long-term-mode stage1),
the client asks the behaviour index for the same selection, so the model sees at serving time
what it was trained on."""
import numpy as np

from common import features as F
from preprocessing import pipeline as P
from serving import client
from tests.preprocessing_canonical_files import write_canonical
from tests.test_preprocessing_end_to_end import RT, adversarial_tables, read_examples, sequence


def test_client_serves_the_stage1_selection_the_model_was_trained_on(tmp_path):
    raw = write_canonical(str(tmp_path / "raw"), adversarial_tables(seed=5))
    out = str(tmp_path / "out")
    P.run(["--input-format", "canonical", "--input", raw, "--output", out,
           "--long-term-mode", "stage1", "--stage1-k", "4", "--real-time-length", str(RT)],
          progress=lambda m: None)
    metadata, examples = read_examples(out)
    store = client.open_feature_store(out + "/feature_store.sqlite")
    checked = 0
    for rid, (_, row) in examples.items():
        query_embedding = row[F.QUERY_EMBEDDING]
        # The request's own query embedding (as in the training example) instead of an
        # encoding of query words, so both sides rank behaviours against the same vector.
        store.encode_query = lambda _query, e=query_embedding: ([1], e)
        _, request, _, long_history, notes, _ = client.build_request(
            store, row[F.USER_ID].decode(), "query", candidates=3,
            now_ms=int(row[F.REQUEST_TIME]))
        trained = sequence(row, F.LONG_TERM)
        served = list(request[F.seq_feature(F.LONG_TERM, F.SEQ_ITEM)])
        assert served == [item for item, _, _ in trained], rid
        np.testing.assert_allclose(request[F.seq_feature(F.LONG_TERM, F.SEQ_TIME_GAP)],
                                   [gap for _, gap, _ in trained], rtol=1e-5)
        assert len(long_history) == len(served)
        assert any("stage 1" in n for n in notes)
        checked += len(served) > 0
    assert checked >= 3
