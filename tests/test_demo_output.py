"""What `make demo` prints, offline and fast: a noisy step's output goes to its log file while
the terminal gets counted stage lines with elapsed times (or everything with --verbose), a
silent step gets heartbeats, and a search result reads as items, distinct behaviours with their
query relevance and engagement, and notes."""
import io
import sys
import textwrap

import numpy as np

from pipelines import progress
from pipelines.demo import build_parser, first_table
from pipelines import explain as explain_module
from pipelines.explain import distinct_drivers, explain

# What kfp.local and the steps write for two tasks (colour codes included), with the noise.
FAKE_PIPELINE = textwrap.dedent(r'''
    import sys, time
    C, R = "\x1b[96m", "\x1b[0m"
    def out(text):
        print(text, flush=True)
    out(f"14:01:02.003 - INFO - Executing task {C}'preprocess'{R}")
    out("14:01:02.004 - INFO - Streamed logs:")
    out('    {"inputs": {"parameterValues": {"users": 300}}, "outputs": {"artifacts": {}}}')
    out("    2026-01-01 E external/local_xla/xla/stream_executor/cuda/cuda_platform.cc:51] "
        "failed call to cuInit: UNKNOWN ERROR (303)")
    out("    [2/3] running the Beam pipeline (in-process, 2 workers)")
    print("    FutureWarning: kfp is noisy", file=sys.stderr, flush=True)
    out(f"14:01:04.500 - INFO - Task {C}'preprocess'{R} finished with status "
        "\x1b[92mSUCCESS\x1b[0m")
    out(f"14:01:04.600 - INFO - Executing task {C}'train'{R}")
    out("    2026-01-01 10:00:00,000 INFO epoch 1: eval click GAUC(request) 0.7012 AUC 0.7100")
    out("    release gate vs served version 1: click_gauc_request 0.7012 >= 0.6900 -> PASS")
    out(f"14:01:05.000 - INFO - Task {C}'train'{R} finished with status SUCCESS")
    out("14:01:05.100 - INFO - Skipping conditional task condition-1 (condition evaluated "
        "to False)")
''')
NOISE = ("cuInit", '"parameterValues"', "FutureWarning", "Streamed logs")


def _run_fake(tmp_path, verbose=False, script=FAKE_PIPELINE, heartbeat_s=30.0):
    log = tmp_path / "logs" / "pipeline.log"
    out = io.StringIO()
    code = progress.run_logged([sys.executable, "-c", script], str(log),
                               progress.KfpStages(3), verbose=verbose, heartbeat_s=heartbeat_s,
                               label="pipeline", out=out)
    return code, out.getvalue(), log.read_text()


def test_noisy_step_output_goes_to_the_log_and_the_terminal_gets_counted_stages(tmp_path):
    code, shown, log = _run_fake(tmp_path)
    assert code == 0
    lines = shown.splitlines()
    assert lines[0] == "[1/3] preprocess ..."
    assert lines[1] == "      [2/3] running the Beam pipeline (in-process, 2 workers)"
    assert lines[2].startswith("[1/3] preprocess done in ") and lines[2].endswith("s")
    assert lines[3] == "[2/3] train ..."
    assert lines[4] == "      epoch 1: eval click GAUC(request) 0.7012 AUC 0.7100"
    assert lines[5].startswith("      release gate vs served version 1:")
    assert lines[6].startswith("[2/3] train done in ")
    assert lines[7] == ("[3/3] not run (1 step(s)): the release gate did not bless the "
                        "candidate")
    assert len(lines) == 8
    for noise in NOISE:
        assert noise not in shown and noise in log  # kept, in the log file only
    assert log.startswith("$ ")  # the command heads its log


def test_verbose_shows_every_line_too(tmp_path):
    _, shown, log = _run_fake(tmp_path, verbose=True)
    for noise in NOISE:
        assert noise in shown
    assert "[1/3] preprocess ..." in shown


def test_a_silent_step_gets_heartbeats_with_its_elapsed_time(tmp_path):
    script = "import time; time.sleep(1.6); print('Executing task \\'x\\'', flush=True)"
    code, shown, _ = _run_fake(tmp_path, script=script, heartbeat_s=0.5)
    assert code == 0
    beats = [line for line in shown.splitlines() if "pipeline: still running (" in line]
    assert len(beats) >= 2
    assert shown.splitlines()[-1] == "[1/3] x ..."


def test_a_step_writing_only_log_lines_gets_heartbeats_too(tmp_path):
    script = ("import time\nfor i in range(16):\n    print('noise', i, flush=True)\n"
              "    time.sleep(0.1)")
    code, shown, log = _run_fake(tmp_path, script=script, heartbeat_s=0.5)
    assert code == 0 and "noise 15" in log and "noise" not in shown
    assert len([line for line in shown.splitlines() if "still running" in line]) >= 2


def test_failing_step_returns_its_exit_code_and_tail(tmp_path):
    code, _, log = _run_fake(tmp_path, script="import sys; print('boom'); sys.exit(3)")
    assert code == 3 and progress.tail(str(tmp_path / "logs" / "pipeline.log"))[-1] == "boom\n"


def test_only_the_first_metrics_table_is_printed():
    head = "# qin on test\n\nCandidates: 9.\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    assert first_table(head + "\n\nmore\n| c |") == head


def test_demo_has_a_verbose_flag_and_quiet_children():
    assert build_parser().parse_args(["--verbose"]).verbose
    env = progress.quiet_environment({"PATH": "/bin"})
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2" and env["PYTHONUNBUFFERED"] == "1"
    assert progress.quiet_environment({"TF_CPP_MIN_LOG_LEVEL": "0"})["TF_CPP_MIN_LOG_LEVEL"] == "0"


# ---- the ranked list ----------------------------------------------------------------------
class FakeStore:
    """The feature-store methods explain() reads: 4 items on 2 topics, one user."""

    def __init__(self):
        self.ids = ["", "i1", "i2", "i3", "i4"]
        self.table = np.array([[0, 0], [1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)

    def encode_query(self, text):
        return ([7], np.array([1.0, 0.0], np.float32)) if "cooking" in text else ([], np.zeros(2))

    def item_embeddings(self):
        return self.table

    def item_index(self, raw_ids):
        return np.array([self.ids.index(i) if i in self.ids else 0 for i in raw_ids])

    def metadata(self):
        class Metadata:
            engagement_names = ("watch_ratio", "like", "follow", "share")
        return Metadata()

    def behaviours_before(self, user_id, before_ms, limit=None):
        # most recent first: i2 watched twice (deeply once), i3 skipped
        return {"item_id": np.array(["i2", "i3", "i2"], dtype=object),
                "timestamp_ms": np.array([before_ms - 3_600_000, before_ms - 7_200_000,
                                          before_ms - 5 * 86_400_000]),
                "engagement": np.array([[0.95, 1, 0, 1], [0.05, 0, 0, 0], [0.3, 0, 0, 0]],
                                       np.float32)}


def _result(notes=()):
    from serving.client import Driver
    from serving.search import SearchItem, SearchResult, SourceHit

    now = 10 * 86_400_000
    drivers = [Driver("i2", 0.4, 0, 3600.0), Driver("i2", 0.2, 2, 5 * 86400.0),
               Driver("i3", 0.1, 1, 7200.0)]
    items = [SearchItem("i1", 1, 0.61, {"click": 0.5, "long_view": 0.3, "like": 0.1},
                        {"content": SourceHit(0, 0.99)}, [], drivers),
             SearchItem("i4", 4, 0.20, {"click": 0.2, "long_view": 0.1, "like": 0.0},
                        {"content": SourceHit(1, 0.10)}, [], drivers[:1])]
    return SearchResult("u001", "cooking_1 zebra", now, True, items, list(notes),
                        {"candidates": 2}, {"total": 12.0}, 3)


def test_qrcf_seeds_of_the_same_item_are_merged():
    from serving.search import Seed

    seeds = [Seed("a", 10.0, 0.8, 0.5), Seed("b", 20.0, 0.7, 0.4), Seed("a", 30.0, 0.8, 0.3)]
    assert [(s.item_id, n) for s, n in explain_module.distinct_seeds(seeds)] == [("a", 2),
                                                                                ("b", 1)]
    result = _result()
    result.items[0].qrcf_seeds = seeds
    lines = explain(result, FakeStore(), {}).splitlines()
    assert "     retrieved through a (query relevance 0.80, 2 views); b (query relevance 0.70)" \
        in lines


def test_drivers_of_the_same_item_are_merged():
    from serving.client import Driver

    merged = distinct_drivers([Driver("a", 0.1, 3, 50.0), Driver("b", 0.3, 1, 10.0),
                               Driver("a", 0.25, 0, 5.0)])
    assert [(d["item_id"], d["views"]) for d in merged] == [("a", 2), ("b", 1)]
    assert merged[0]["weight"] == 0.35 and merged[0]["seconds_before"] == 5.0


def test_candidate_drivers_merge_views_and_order_by_attention_times_similarity():
    import numpy as np

    from serving.client import candidate_drivers

    history = [{"item_id": "a", "timestamp_ms": 9_000}, {"item_id": "b", "timestamp_ms": 8_000},
               {"item_id": "a", "timestamp_ms": 7_000}, {"item_id": "c", "timestamp_ms": 6_000}]
    vectors = {"a": np.array([1.0, 0.0]), "b": np.array([0.6, 0.8]), "c": np.array([0.0, 1.0])}
    target = np.array([0.0, 1.0])
    # Nearly flat attention (as QIN's stage 2 gives): a (two views) 0.26, b 0.25, c 0.24;
    # similarity to the target: a 0, b 0.8, c 1 -> c, b first, a last; -1 = no behaviour.
    drivers = candidate_drivers(np.array([0, 1, 2, 3, -1]),
                                np.array([0.13, 0.25, 0.13, 0.24, 0.0]), history, 10_000, 3,
                                vectors, target)
    assert [d.item_id for d in drivers] == ["c", "b", "a"]
    by_id = {d.item_id: d for d in drivers}
    assert by_id["a"].views == 2 and abs(by_id["a"].weight - 0.26) < 1e-9
    assert by_id["a"].position == 0 and by_id["a"].seconds_before == 1.0  # the recent view
    assert abs(by_id["b"].target_similarity - 0.8) < 1e-9
    assert [d.item_id for d in candidate_drivers(np.array([0, 1, 2, 3]),
                                                 np.array([0.13, 0.25, 0.13, 0.24]),
                                                 history, 10_000, 2)] == ["a", "b"]  # no vectors


def test_explained_list_is_readable(tmp_path):
    catalogue = {"i1": {"category_l1": "cooking", "category_l2": "format_2", "author_id": "a7"},
                 "i2": {"category_l1": "cooking", "category_l2": "format_1", "author_id": "a3",
                        "caption": "noodles in 5 minutes"}}
    text = explain(_result(["unknown query word(s) ignored: zebra"]), FakeStore(), catalogue)
    lines = text.splitlines()
    assert lines[0].startswith("query 'cooking_1 zebra', user 'u001': 2 results "
                               "(personalized retrieval, 2 candidates ranked by model version 3")
    assert lines[1] == "  note: unknown query word(s) ignored: zebra"
    assert lines[2] == "  1. i1 (cooking / format_2, author a7)"
    assert lines[3].startswith("     score 0.610 (p(click) 0.50, p(long_view) 0.30, p(like) "
                               "0.10); query match 1.00; found by content #1")
    # i2 twice in the drivers -> one line, with its caption, summed weight and both views;
    # engagement of the view the driver points at (the recent, deep one)
    assert lines[4] == ('     because of i2 (cooking / format_1, author a3) "noodles in 5 '
                        'minutes": attention 0.60, 2 views, query relevance 0.99, watched 95%, '
                        'liked, shared, 1 h ago')
    assert lines[5] == ("     because of i3: attention 0.10, query relevance 0.00, watched 5%, "
                        "2 h ago")
    assert text.count("because of i2") == 2  # behind both results
    assert lines[-1] == ("  2 distinct behaviour(s) explain the 2 results; behind several "
                         "results: i2 (2)")
